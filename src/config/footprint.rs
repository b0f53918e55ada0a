//! Where a model runs (its port, host and GPUs): two models whose footprints conflict never
//! run together.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// What a running model takes on its box: two models whose footprints conflict never run
/// together (the supervisor's rule, which the endpoint picker reads from Watch too).
#[derive(Clone, Copy, Debug)]
pub struct Footprint<'a> {
    pub port: u32,
    pub host: &'a str,
    /// None: every GPU.
    pub gpus: Option<&'a [u32]>,
}

impl Footprint<'_> {
    /// They share a port on overlapping hosts, or a GPU.
    pub fn conflicts_with(&self, other: &Footprint<'_>) -> bool {
        if self.port == other.port && hosts_overlap(self.host, other.host) {
            return true;
        }
        match (self.gpus, other.gpus) {
            (Some(a), Some(b)) => a.iter().any(|g| b.contains(g)),
            // Omitted = all GPUs, which overlaps everything.
            _ => true,
        }
    }
}

/// Whether two backends listening on the same port at hosts `a` and `b` can collide: the
/// kernel refuses the second bind, or a client of one reaches the other.
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    match (bind_addresses(a), bind_addresses(b)) {
        (Some(a), Some(b)) => a.iter().any(|ip| b.contains(ip)),
        // A wildcard takes the port on every address.
        _ => true,
    }
}

/// The addresses a server bound to `host` listens on; None when it may be any of the box's
/// (a wildcard, or a name other than localhost, which may resolve to any address and is
/// not looked up: the configuration is checked without DNS).
fn bind_addresses(host: &str) -> Option<Vec<IpAddr>> {
    let bare = host.trim().trim_start_matches('[').trim_end_matches(']');
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Some(vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]);
    }
    // `::ffff:127.0.0.1` is 127.0.0.1 to the kernel.
    let ip = bare.parse::<IpAddr>().ok()?.to_canonical();
    (!ip.is_unspecified()).then(|| vec![ip])
}

/// The GPU indices of a `CUDA_VISIBLE_DEVICES` value; None when it names devices some other
/// way (UUIDs, MIG instances).
fn cuda_device_indices(value: &str) -> Option<BTreeSet<u32>> {
    value
        .split(',')
        .map(|device| device.trim().parse().ok())
        .collect()
}

/// Why a model's `env.CUDA_VISIBLE_DEVICES` is refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum CudaDevicesError {
    #[error(
        "{devices:?} disagrees with gpus = {gpus:?}: omit it (the supervisor sets it from gpus) or make the two the same"
    )]
    Disagrees { devices: String, gpus: Vec<u32> },
    #[error(
        "{devices:?} without gpus: write gpus = {indices:?} instead (the scheduler places models by gpus; without it the model counts as using every GPU)"
    )]
    WithoutGpus { devices: String, indices: Vec<u32> },
}

/// `env.CUDA_VISIBLE_DEVICES` may only repeat `gpus`: the scheduler keeps two models off one
/// GPU by `gpus`, so a backend that sees other GPUs than those would share them unnoticed.
pub(super) fn check_cuda_devices(
    gpus: Option<&[u32]>,
    devices: &str,
) -> Result<(), CudaDevicesError> {
    let indices = cuda_device_indices(devices);
    match (gpus, indices) {
        (Some(gpus), Some(indices)) if gpus.iter().copied().collect::<BTreeSet<_>>() == indices => {
            Ok(())
        }
        (Some(gpus), _) => Err(CudaDevicesError::Disagrees {
            devices: devices.to_owned(),
            gpus: gpus.to_vec(),
        }),
        (None, Some(indices)) => Err(CudaDevicesError::WithoutGpus {
            devices: devices.to_owned(),
            indices: indices.into_iter().collect(),
        }),
        // UUIDs or MIG instances with no gpus: the model counts as using every GPU.
        (None, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ModelConfig, tests::assert_refused_naming};

    fn model_at(host: &str, gpu: u32) -> ModelConfig {
        let text = format!(
            "[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 8000\nhost = \"{host}\"\ngpus = [{gpu}]\n"
        );
        Config::from_toml(&text)
            .unwrap()
            .models
            .remove("m")
            .unwrap()
    }

    #[test]
    fn addresses_that_can_share_a_port_conflict() {
        let collide = [
            ("127.0.0.1", "localhost"),
            ("::1", "[::1]"),
            ("::1", "LOCALHOST."),
            ("0.0.0.0", "10.1.2.3"),
            ("[::]", "127.0.0.1"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("gpu-box.lan", "127.0.0.1"),
        ];
        for (a, b) in collide {
            assert!(model_at(a, 0).conflicts_with(&model_at(b, 1)), "{a} vs {b}");
            assert!(model_at(b, 0).conflicts_with(&model_at(a, 1)), "{b} vs {a}");
        }
        for (a, b) in [("127.0.0.1", "127.0.0.2"), ("::1", "127.0.0.2")] {
            assert!(
                !model_at(a, 0).conflicts_with(&model_at(b, 1)),
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn cuda_visible_devices_must_agree_with_gpus() {
        let model = |extra: &str| {
            format!("[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\n{extra}\n")
        };
        for ok in [
            "gpus = [0, 1]\nenv = { CUDA_VISIBLE_DEVICES = \"1,0\" }",
            "env = { CUDA_VISIBLE_DEVICES = \"GPU-5d3c\" }",
        ] {
            Config::from_toml(&model(ok)).unwrap();
        }
        let bad = [
            "gpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"1\" }",
            "gpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"GPU-5d3c\" }",
            "env = { CUDA_VISIBLE_DEVICES = \"0\" }",
        ];
        assert_refused_naming(
            bad.map(|extra| (model(extra), "models.\"m\".env.CUDA_VISIBLE_DEVICES")),
        );
    }
}

//! Configuration text for tests: a mock-backend model rendered as its `[models."NAME"]`
//! table, and `key = value` sections whose defaults the test can override.

/// The variable that tags every backend process of one test (see
/// [`crate::processes_with_marker`]); the supervisor passes a model's `env` through.
pub const MARKER_ENV: &str = "GPUSWAP_TEST_MARKER";

/// The key of a `key = value` line.
pub fn key_of(line: &str) -> String {
    line.split('=').next().unwrap_or("").trim().to_owned()
}

/// A TOML string.
pub fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A TOML array of strings.
pub fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// `defaults` then `extra`, one per line; an `extra` line replaces the default of its key.
pub fn lines_with_defaults(defaults: &[String], extra: &[String]) -> String {
    let mut text = String::new();
    for line in defaults
        .iter()
        .filter(|d| !extra.iter().any(|e| key_of(e) == key_of(d)))
        .chain(extra)
    {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// One model served by `gpuswap-mock-backend`: a vLLM-like mock on GPU 0 (so any two
/// models swap) that loads in 300 ms and answers without delay, unless told otherwise.
#[derive(Clone, Debug)]
pub struct MockModel {
    pub name: String,
    pub flavor: String,
    pub port: u16,
    pub gpus: Vec<u32>,
    pub load_time: String,
    pub tokens_per_second: u32,
    /// The name the mock serves (it refuses others, except tabbyapi).
    pub served_name: Option<String>,
    pub aliases: Vec<String>,
    /// Extra arguments of the mock, after the ones every model gets.
    pub args: Vec<String>,
    /// Extra `key = value` lines of the model's table (override the defaults).
    pub toml: Vec<String>,
    /// Variables of the model's `env`, next to the test's marker.
    pub env: Vec<(String, String)>,
}

impl MockModel {
    pub fn new(name: &str) -> Self {
        MockModel {
            name: name.into(),
            flavor: "vllm".into(),
            port: crate::free_port(),
            gpus: vec![0],
            load_time: "300ms".into(),
            tokens_per_second: 0,
            served_name: None,
            aliases: Vec::new(),
            args: Vec::new(),
            toml: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn flavor(mut self, flavor: &str) -> Self {
        self.flavor = flavor.into();
        self
    }

    pub fn gpus(mut self, gpus: &[u32]) -> Self {
        self.gpus = gpus.to_vec();
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub fn load_time(mut self, load_time: &str) -> Self {
        self.load_time = load_time.into();
        self
    }

    pub fn tokens_per_second(mut self, tps: u32) -> Self {
        self.tokens_per_second = tps;
        self
    }

    pub fn served_name(mut self, served: &str) -> Self {
        self.served_name = Some(served.into());
        self
    }

    pub fn alias(mut self, alias: &str) -> Self {
        self.aliases.push(alias.into());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn toml(mut self, line: &str) -> Self {
        self.toml.push(line.into());
        self
    }

    /// The name the mock serves.
    pub fn served(&self) -> &str {
        self.served_name.as_deref().unwrap_or(&self.name)
    }

    /// The text the mock puts first in every answer.
    pub fn signature(&self) -> String {
        format!("[served by {}]", self.served())
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The model's table; its backends carry `MARKER_ENV = marker`.
    pub fn render(&self, marker: &str) -> String {
        self.render_with_args(marker, &[])
    }

    /// As [`render_with_args`](Self::render_with_args), with a harness's `sglang_args` for an
    /// SGLang model and none for the others.
    pub fn render_with_sglang_args(&self, marker: &str, sglang_args: &[&str]) -> String {
        let flavor_args = if self.flavor == "sglang" {
            sglang_args
        } else {
            &[]
        };
        self.render_with_args(marker, flavor_args)
    }

    /// As [`render`](Self::render), with `flavor_args` before the model's own extra
    /// arguments (a harness's shape of a flavor, e.g. SGLang's short warm-up).
    pub fn render_with_args(&self, marker: &str, flavor_args: &[&str]) -> String {
        let mut command = vec![
            crate::bin("gpuswap-mock-backend").display().to_string(),
            "--flavor".into(),
            self.flavor.clone(),
            "--port".into(),
            self.port.to_string(),
            "--model".into(),
            self.served().to_owned(),
            "--load-time".into(),
            self.load_time.clone(),
            "--tokens-per-second".into(),
            self.tokens_per_second.to_string(),
        ];
        command.extend(flavor_args.iter().map(|a| a.to_string()));
        command.extend(self.args.iter().cloned());
        self.render_command(&command, marker)
    }

    /// The model's table with `command` as its command (a real server's, say); its
    /// processes carry `MARKER_ENV = marker`.
    pub fn render_command(&self, command: &[String], marker: &str) -> String {
        let gpus: Vec<String> = self.gpus.iter().map(u32::to_string).collect();
        let mut text = format!(
            "\n[models.\"{}\"]\nkind = \"{}\"\ncommand = {}\nport = {}\ngpus = [{}]\n",
            self.name,
            self.flavor,
            toml_list(command),
            self.port,
            gpus.join(", "),
        );
        for (key, default) in [("startup_timeout", "\"30s\""), ("stop_timeout", "\"10s\"")] {
            if !self.toml.iter().any(|line| key_of(line) == key) {
                text.push_str(&format!("{key} = {default}\n"));
            }
        }
        if let Some(served) = &self.served_name {
            text.push_str(&format!("served_name = \"{served}\"\n"));
        }
        if !self.aliases.is_empty() {
            text.push_str(&format!("aliases = {}\n", toml_list(&self.aliases)));
        }
        for line in &self.toml {
            text.push_str(line);
            text.push('\n');
        }
        let mut env = format!("{MARKER_ENV} = \"{marker}\"");
        for (name, value) in &self.env {
            env.push_str(&format!(", {name} = {}", toml_string(value)));
        }
        text.push_str(&format!("env = {{ {env} }}\n"));
        text
    }
}

/// The `[supervisor]` and `[gateway]` sections of a test stack whose supervisor listens on
/// the Unix socket `socket`: no minimum residency, a long drain and queue, fast keepalives;
/// a `supervisor` or `gateway` line replaces the default of its key.
pub fn stack_sections(
    socket: &std::path::Path,
    state_file: &std::path::Path,
    log_lines: u32,
    supervisor: &[String],
    gateway: &[String],
) -> String {
    let mut config = String::from("[supervisor]\n");
    config.push_str(&lines_with_defaults(
        &[
            format!("listen = \"unix://{}\"", socket.display()),
            format!("state_file = \"{}\"", state_file.display()),
            "min_residency = \"0s\"".into(),
            "drain_timeout = \"60s\"".into(),
            format!("log_lines = {log_lines}"),
        ],
        supervisor,
    ));
    config.push_str("\n[gateway]\n");
    config.push_str(&lines_with_defaults(
        &[
            format!("supervisor = \"unix://{}\"", socket.display()),
            "keepalive_interval = \"200ms\"".into(),
            "queue_timeout = \"120s\"".into(),
        ],
        gateway,
    ));
    config
}

//! The picker's integration tests, one binary (one link): real boxes, the real `gpuswap-epp`,
//! real Envoy and etcd; `common` is their harness.

mod common;
mod etcd;
mod failures;
mod kube_api;
mod kubernetes;
mod kubernetes_api;
mod placement;
mod protocol;
mod scale;

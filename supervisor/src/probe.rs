//! Readiness probes per backend kind. (owner: process layer)

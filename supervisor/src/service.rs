//! The gRPC service. (owner: scheduler layer)

//! The guard process: parent of one backend. (owner: process layer)

/// Entry point of `gpuswap-supervisor guard ...`; never returns.
pub fn main() -> ! {
    unimplemented!()
}

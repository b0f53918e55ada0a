//! The guard process: parent of one backend. (owner: process layer)

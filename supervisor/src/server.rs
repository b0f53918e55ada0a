//! Listeners. (owner: scheduler layer)

//! The scheduler actor. (owner: scheduler layer)

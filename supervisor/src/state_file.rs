//! Records live process groups so a restarted supervisor can end its predecessor's leftovers. (owner: process layer)

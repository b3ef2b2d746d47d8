//! Block backends: the BlockDev trait and its per-reactor I/O channels.

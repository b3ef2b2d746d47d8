//! Reactors: pinned polling threads, cross-reactor messages, busy/idle accounting.

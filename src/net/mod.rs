//! Sockets: the poll-driven Sock trait and its implementations.

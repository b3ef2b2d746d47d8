//! The JSON-RPC 2.0 server on a Unix socket.

//! Small helpers shared across modules: the stderr logger, the file descriptor budget, and
//! quoting untrusted input in messages.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = t.as_secs();
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let _ = writeln!(
            std::io::stderr().lock(),
            "{h:02}:{m:02}:{s:02}.{:03} {:5} {}: {}",
            t.subsec_millis(),
            r.level(),
            r.target().trim_start_matches("iscsi_tgt::"),
            r.args()
        );
    }

    fn flush(&self) {}
}

/// Logs to stderr at `level` (error, warn, info, debug, trace); `ISCSI_TGT_LOG` overrides it.
pub fn init_logging(level: &str) {
    let level = std::env::var("ISCSI_TGT_LOG").unwrap_or_else(|_| level.to_string());
    let filter = level.parse().unwrap_or(log::LevelFilter::Info);
    let logger = Box::leak(Box::new(StderrLogger { level: filter }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(filter);
    }
}

/// How the file descriptors of the process are shared out: iSCSI connections may take only
/// what is left after a reserve for the RPC server's clients and the backing files, so a
/// flood of connections never shuts out the management socket (they share one limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// RLIMIT_NOFILE in force.
    pub limit: u64,
    /// Descriptors open when the budget was made (std streams, epoll sets, rings, ...).
    pub open: u64,
    /// The most RPC clients served at once.
    pub rpc_clients: usize,
    /// Kept for backing files, accepted-then-refused sockets and the like.
    pub files: usize,
    /// The most iSCSI connections at once.
    pub connections: usize,
}

impl FdBudget {
    /// Shares `limit` descriptors, `open` of which are in use: an eighth of what is free for
    /// RPC clients (4 to 64) and an eighth for files (16 to 256), the rest for connections.
    pub fn new(limit: u64, open: u64) -> FdBudget {
        let free = usize::try_from(limit.saturating_sub(open)).unwrap_or(usize::MAX);
        let rpc_clients = (free / 8).clamp(4, 64);
        let files = (free / 8).clamp(16, 256);
        FdBudget {
            limit,
            open,
            rpc_clients,
            files,
            connections: free.saturating_sub(rpc_clients + files),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (a target holds a descriptor per
/// connection) and returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// The number of descriptors the process has open.
pub fn open_fds() -> std::io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// The most characters of an untrusted string an error message quotes.
pub const QUOTE_MAX: usize = 64;

/// `s` quoted for an error or log message (Rust debug quoting, so control characters are
/// escaped), cut to its first [`QUOTE_MAX`] characters with its length in bytes when longer:
/// a message never echoes megabytes of input back.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_budget_keeps_a_reserve() {
        let b = FdBudget::new(64, 14);
        assert_eq!((b.rpc_clients, b.files), (6, 16));
        assert_eq!(b.connections, 50 - 6 - 16);
        let b = FdBudget::new(1 << 20, 30);
        assert_eq!((b.rpc_clients, b.files), (64, 256));
        assert_eq!(b.connections, (1 << 20) - 30 - 64 - 256);
        // A limit below what is open already leaves no connection, never an underflow.
        assert_eq!(FdBudget::new(10, 20).connections, 0);
        assert!(raise_fd_limit().unwrap() >= 64);
        assert!(open_fds().unwrap() >= 3);
    }

    #[test]
    fn quote_cuts_long_input() {
        assert_eq!(quote("abc"), "\"abc\"");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(1 << 20);
        let q = quote(&long);
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("... (1048576 bytes)"), "{q}");
        // Cut on a character boundary.
        let wide = "é".repeat(100);
        let q = quote(&wide);
        assert!(
            q.starts_with(&format!("{:?}", "é".repeat(QUOTE_MAX))),
            "{q}"
        );
        assert!(q.ends_with("... (200 bytes)"), "{q}");
    }
}

//! Small helpers shared across modules: the stderr logger, and quoting untrusted input in
//! messages.

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

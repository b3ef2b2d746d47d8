//! Small helpers shared across modules: the stderr logger.

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

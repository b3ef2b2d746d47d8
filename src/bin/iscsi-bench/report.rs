//! What the benchmark measures and how it reports it: latency histograms, error counts by
//! sense key or status, the summary and the `--json` object (its fields are a contract with
//! the scripts and plots that read it: add, never rename).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use iscsi_tgt::initiator::{InitiatorError, ScsiResult, STATUS_CHECK_CONDITION};
use serde::Serialize;

/// Writes `text` to stdout. A reader that went away (`iscsi-bench --json | head`) is no
/// error of the run's: the rest goes unwritten and the exit status still says how the run
/// went. Any other failure to write is said on stderr.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("iscsi-bench: cannot write to stdout: {e}");
        }
    }
}

/// The longest latency the histograms hold apart (longer ones count as this): ten minutes,
/// far past any initiator timeout.
const MAX_LATENCY_NS: u64 = 600_000_000_000;
/// Significant digits the histograms keep: a latency is known to 0.1%.
const SIGNIFICANT_DIGITS: u8 = 3;
/// Points of the CDF per halving of the distance to 100% (HDR histogram's percentile
/// iteration): about 5 points per "nine".
const CDF_TICKS_PER_HALF: u32 = 5;

/// SPC-4 §4.5.6, table 52: the sense keys by name.
const SENSE_KEYS: [&str; 16] = [
    "NO SENSE",
    "RECOVERED ERROR",
    "NOT READY",
    "MEDIUM ERROR",
    "HARDWARE ERROR",
    "ILLEGAL REQUEST",
    "UNIT ATTENTION",
    "DATA PROTECT",
    "BLANK CHECK",
    "VENDOR SPECIFIC",
    "COPY ABORTED",
    "ABORTED COMMAND",
    "OBSOLETE SENSE KEY 0CH",
    "VOLUME OVERFLOW",
    "MISCOMPARE",
    "COMPLETED",
];

/// SAM-5 §5.3.1, table 35: the status codes by name.
fn status_name(status: u8) -> Cow<'static, str> {
    Cow::Borrowed(match status {
        0x00 => "GOOD",
        0x02 => "CHECK CONDITION",
        0x04 => "CONDITION MET",
        0x08 => "BUSY",
        0x10 => "INTERMEDIATE",
        0x14 => "INTERMEDIATE-CONDITION MET",
        0x18 => "RESERVATION CONFLICT",
        0x22 => "COMMAND TERMINATED",
        0x28 => "TASK SET FULL",
        0x30 => "ACA ACTIVE",
        0x40 => "TASK ABORTED",
        other => return Cow::Owned(format!("STATUS {other:#04x}")),
    })
}

/// The name a command that did not end GOOD is counted under: its sense key (SPC-4 name) for
/// CHECK CONDITION, else its status, else what went wrong on the iSCSI level for it alone.
pub fn error_name(r: &Result<ScsiResult, InitiatorError>) -> Cow<'static, str> {
    match r {
        Ok(r) if r.response != 0 => match r.response {
            // RFC 7143 §11.4.3.
            0x01 => Cow::Borrowed("iSCSI TARGET FAILURE"),
            other => Cow::Owned(format!("iSCSI RESPONSE {other:#04x}")),
        },
        Ok(r) if r.status == STATUS_CHECK_CONDITION => match r.sense_key() {
            Some(k) => Cow::Borrowed(SENSE_KEYS[usize::from(k & 0x0f)]),
            None => Cow::Borrowed("CHECK CONDITION WITHOUT SENSE"),
        },
        Ok(r) => status_name(r.status),
        Err(InitiatorError::Rejected { .. }) => Cow::Borrowed("REJECT"),
        Err(_) => Cow::Borrowed("PROTOCOL ERROR"),
    }
}

/// The latencies of one kind of command (reads or writes) of one session, or merged.
pub struct Lat {
    hist: Histogram<u64>,
    /// Exact, beside the histogram's 3 digits.
    min_ns: u64,
    max_ns: u64,
    sum_ns: u128,
}

impl Lat {
    pub fn new() -> Lat {
        Lat {
            // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low,
            // 3 digits).
            hist: Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGNIFICANT_DIGITS)
                .unwrap_or_else(|e| unreachable!("histogram bounds: {e}")),
            min_ns: u64::MAX,
            max_ns: 0,
            sum_ns: 0,
        }
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
        self.sum_ns += u128::from(ns);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn merge(&mut self, other: &Lat) {
        // Both have the same bounds: adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
        self.sum_ns += other.sum_ns;
    }

    /// Latency at percentile `p` (0 to 100) in microseconds; the exact min and max at the
    /// ends.
    fn at(&self, p: f64) -> f64 {
        if self.count() == 0 {
            return 0.0;
        }
        let ns = if p <= 0.0 {
            self.min_ns
        } else if p >= 100.0 {
            self.max_ns
        } else {
            // The histogram's value is the top of its bucket: never below the true one,
            // and never above the largest seen.
            self.hist
                .value_at_quantile(p / 100.0)
                .clamp(self.min_ns, self.max_ns)
        };
        us(ns)
    }

    pub fn summary(&self) -> LatencyJson {
        let mean = match self.count() {
            0 => 0.0,
            n => (self.sum_ns as f64 / n as f64).round() / 1e3,
        };
        LatencyJson {
            min: self.at(0.0),
            mean,
            max: self.at(100.0),
            p50: self.at(50.0),
            p90: self.at(90.0),
            p99: self.at(99.0),
            p99_9: self.at(99.9),
            p99_99: self.at(99.99),
        }
    }

    /// [percentile, latency µs] pairs from 0 (the min) to 100 (the max), percentiles
    /// ascending, latencies never falling.
    pub fn cdf(&self) -> Vec<[f64; 2]> {
        if self.count() == 0 {
            return Vec::new();
        }
        let mut v = vec![[0.0, self.at(0.0)]];
        for it in self.hist.iter_quantiles(CDF_TICKS_PER_HALF) {
            let p = it.quantile_iterated_to() * 100.0;
            let lat = us(it.value_iterated_to().clamp(self.min_ns, self.max_ns));
            if p <= 0.0 || p >= 100.0 {
                continue;
            }
            let Some(&last) = v.last() else { continue };
            if p <= last[0] {
                continue;
            }
            v.push([(p * 1e6).round() / 1e6, lat.max(last[1])]);
        }
        v.push([100.0, self.at(100.0)]);
        v
    }
}

/// Nanoseconds as microseconds, to the nanosecond.
fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// What one kind of command (reads or writes) did: commands answered GOOD, their bytes and
/// latencies.
pub struct Stats {
    pub ios: u64,
    pub bytes: u64,
    pub lat: Lat,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            ios: 0,
            bytes: 0,
            lat: Lat::new(),
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        self.ios += o.ios;
        self.bytes += o.bytes;
        self.lat.merge(&o.lat);
    }
}

/// Commands that did not end GOOD, and connections that failed.
#[derive(Default)]
pub struct Errors {
    /// Connection-level failures: a session whose connection failed (and ended).
    pub transport: u64,
    /// By sense key (SPC-4 name) for CHECK CONDITION, else by status name.
    pub by_key: BTreeMap<Cow<'static, str>, u64>,
}

impl Errors {
    pub fn count(&mut self, name: Cow<'static, str>) {
        *self.by_key.entry(name).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.transport + self.by_key.values().sum::<u64>()
    }

    pub fn merge(&mut self, o: &Errors) {
        self.transport += o.transport;
        for (k, v) in &o.by_key {
            *self.by_key.entry(k.clone()).or_default() += v;
        }
    }
}

/// What was asked for, as the report repeats it.
#[derive(Serialize)]
pub struct Workload {
    pub urls: Vec<String>,
    pub sessions_per_url: usize,
    /// The cores the sessions were pinned to (empty: not pinned).
    pub cores: Vec<usize>,
    pub qd: usize,
    pub bs: u32,
    pub read_pct: u64,
    pub random: bool,
    pub secs: f64,
    pub ramp_secs: f64,
    /// `--timeout` (0: none).
    pub timeout_secs: f64,
}

/// A command that waited for its answer longer than `--timeout`: the run stopped for it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Late {
    /// The target of its session, and the session's index (from 0, over every target).
    pub url: String,
    pub session: usize,
    /// `"READ (16)"` or `"WRITE (16)"`.
    pub op: &'static str,
    pub itt: u32,
    pub lba: u64,
    pub blocks: u32,
    /// From sending it to giving up on it.
    pub waited_secs: f64,
}

impl Late {
    /// What went wrong, in one line.
    pub fn line(&self, timeout_secs: f64) -> String {
        format!(
            "session {} ({}): {} ITT {:#x} LBA {} ({} block{}) had no answer after {:.1} s \
             (--timeout {timeout_secs}): the target stopped answering; the run stops",
            self.session,
            self.url,
            self.op,
            self.itt,
            self.lba,
            self.blocks,
            if self.blocks == 1 { "" } else { "s" },
            self.waited_secs
        )
    }
}

/// A whole run.
pub struct Report {
    pub workload: Workload,
    /// The pattern's fio name, for the summary.
    pub rw_name: &'static str,
    /// From the end of the ramp to the end of the last session's last command.
    pub elapsed: Duration,
    pub read: Stats,
    pub write: Stats,
    pub errors: Errors,
    /// Why sessions ended early, one line each.
    pub ended: Vec<String>,
    /// The commands that waited past `--timeout`, one per session that gave up on one.
    pub late: Vec<Late>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct LatencyJson {
    pub min: f64,
    pub mean: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    #[serde(rename = "p99.99")]
    pub p99_99: f64,
}

#[derive(Serialize)]
pub struct DirectionJson {
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mbps: f64,
    /// This direction's own latencies (an addition to the fields of the contract).
    pub latency_us: LatencyJson,
}

#[derive(Serialize)]
pub struct ErrorsJson {
    pub total: u64,
    pub transport: u64,
    pub by_sense_key: BTreeMap<String, u64>,
}

/// The `--json` object, in the order bench-json documents its fields.
#[derive(Serialize)]
pub struct ReportJson<'a> {
    pub tool: &'static str,
    pub workload: &'a Workload,
    pub elapsed_secs: f64,
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mbps: f64,
    pub read: DirectionJson,
    pub write: DirectionJson,
    pub latency_us: LatencyJson,
    pub cdf: Vec<[f64; 2]>,
    pub errors: ErrorsJson,
    /// Whether a command waited past `--timeout`, which stopped the run.
    pub timed_out: bool,
    /// Those commands, one per session that gave up on one.
    pub timeouts: &'a [Late],
    /// Why sessions ended before their time, one line each (a timeout, a failed connection).
    pub ended: &'a [String],
}

/// Rounded to `digits` decimals, so that the JSON does not carry float noise.
fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

impl Report {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    /// Per second over the measured time (0 when nothing was measured).
    fn rate(&self, n: u64) -> f64 {
        let s = self.secs();
        if s > 0.0 {
            n as f64 / s
        } else {
            0.0
        }
    }

    fn direction(&self, st: &Stats) -> DirectionJson {
        DirectionJson {
            ios: st.ios,
            bytes: st.bytes,
            iops: round(self.rate(st.ios), 1),
            mbps: round(self.rate(st.bytes) / 1e6, 2),
            latency_us: st.lat.summary(),
        }
    }

    /// Reads and writes together.
    pub fn all(&self) -> Stats {
        let mut all = Stats::new();
        all.merge(&self.read);
        all.merge(&self.write);
        all
    }

    pub fn json(&self) -> ReportJson<'_> {
        let all = self.all();
        ReportJson {
            tool: "iscsi-bench",
            workload: &self.workload,
            elapsed_secs: round(self.secs(), 3),
            ios: all.ios,
            bytes: all.bytes,
            iops: round(self.rate(all.ios), 1),
            mbps: round(self.rate(all.bytes) / 1e6, 2),
            read: self.direction(&self.read),
            write: self.direction(&self.write),
            latency_us: all.lat.summary(),
            cdf: all.lat.cdf(),
            errors: ErrorsJson {
                total: self.errors.total(),
                transport: self.errors.transport,
                by_sense_key: self
                    .errors
                    .by_key
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
            },
            timed_out: !self.late.is_empty(),
            timeouts: &self.late,
            ended: &self.ended,
        }
    }

    /// The human-readable summary; its last line is `iops N mbps M`.
    pub fn text(&self) -> String {
        let w = &self.workload;
        let mut out = String::new();
        let n = w.urls.len() * w.sessions_per_url;
        out += &format!(
            "{} of {} bytes, queue depth {} on each of {n} session{} ({} per target){}, {:.1} s \
             measured after a {:.1} s ramp\n",
            self.rw_name,
            w.bs,
            w.qd,
            if n == 1 { "" } else { "s" },
            w.sessions_per_url,
            if w.cores.is_empty() {
                String::new()
            } else {
                format!(
                    ", pinned to cores {}",
                    w.cores
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            },
            self.secs(),
            w.ramp_secs,
        );
        for u in &w.urls {
            out += &format!("  {u}\n");
        }
        let line = |name: &str, st: &Stats| {
            let l = st.lat.summary();
            format!(
                "{name:<5} ios {} iops {:.0} mbps {:.1}\n      latency us: min {:.1} mean {:.1} \
                 max {:.1} p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} p99.99 {:.1}\n",
                st.ios,
                self.rate(st.ios),
                self.rate(st.bytes) / 1e6,
                l.min,
                l.mean,
                l.max,
                l.p50,
                l.p90,
                l.p99,
                l.p99_9,
                l.p99_99
            )
        };
        let mixed = w.read_pct != 0 && w.read_pct != 100;
        if w.read_pct != 0 || self.read.ios > 0 {
            out += &line("read", &self.read);
        }
        if w.read_pct != 100 || self.write.ios > 0 {
            out += &line("write", &self.write);
        }
        let all = self.all();
        if mixed {
            out += &line("all", &all);
        }
        for e in &self.ended {
            out += &format!("session ended: {e}\n");
        }
        let total = self.errors.total();
        out += &format!("errors {total}");
        if total > 0 {
            let mut parts: Vec<String> = Vec::new();
            if self.errors.transport > 0 {
                parts.push(format!("transport {}", self.errors.transport));
            }
            parts.extend(self.errors.by_key.iter().map(|(k, v)| format!("{k} {v}")));
            out += &format!(": {}", parts.join(", "));
        }
        out += "\n";
        out += &format!(
            "iops {:.0} mbps {:.0}\n",
            self.rate(all.ios),
            self.rate(all.bytes) / 1e6
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(us_values: &[u64]) -> Lat {
        let mut l = Lat::new();
        for &v in us_values {
            l.record(Duration::from_micros(v));
        }
        l
    }

    #[test]
    fn percentiles_min_max_and_mean() {
        // 75 fast commands, 25 slow ones.
        let mut v = vec![100u64; 75];
        v.extend([20_000u64; 25]);
        let l = lat(&v);
        let s = l.summary();
        assert_eq!((s.min, s.max), (100.0, 20_000.0), "exact ends");
        assert!((s.p50 - 100.0).abs() <= 0.1, "{s:?}");
        assert!((s.p90 - 20_000.0).abs() <= 20.0, "{s:?}");
        assert!(s.p99 >= 20_000.0 && s.p99_99 <= s.max, "{s:?}");
        assert!((s.mean - 5075.0).abs() < 0.01, "{s:?}");
        // Never below the true value, never above the max.
        let s = lat(&[5000]).summary();
        assert_eq!(
            (s.min, s.p50, s.p99_99, s.max),
            (5000.0, 5000.0, 5000.0, 5000.0)
        );
        assert_eq!(Lat::new().summary().p99, 0.0, "nothing measured");
    }

    #[test]
    fn merged_histograms_are_the_union() {
        let mut a = lat(&[10, 20, 30]);
        let b = lat(&[1, 1000]);
        a.merge(&b);
        let s = a.summary();
        assert_eq!((a.count(), s.min, s.max), (5, 1.0, 1000.0));
        assert!((s.mean - 212.2).abs() < 0.01);
    }

    #[test]
    fn the_cdf_runs_from_min_at_0_to_max_at_100() {
        let v: Vec<u64> = (1..=10_000).collect();
        let c = lat(&v).cdf();
        assert_eq!(c[0], [0.0, 1.0]);
        assert_eq!(*c.last().unwrap(), [100.0, 10_000.0]);
        assert!(c.len() > 20, "dense enough to draw: {}", c.len());
        for w in c.windows(2) {
            assert!(w[0][0] < w[1][0] && w[0][1] <= w[1][1], "{w:?}");
        }
        assert!(Lat::new().cdf().is_empty());
    }

    #[test]
    fn errors_are_named_by_sense_key_or_status() {
        let cc = |sense: Vec<u8>| {
            Ok(ScsiResult {
                status: STATUS_CHECK_CONDITION,
                sense,
                ..Default::default()
            })
        };
        let mut fixed = vec![0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x03;
        assert_eq!(error_name(&cc(fixed)), "MEDIUM ERROR");
        assert_eq!(error_name(&cc(vec![0x72, 0x06, 0x29, 0])), "UNIT ATTENTION");
        assert_eq!(error_name(&cc(vec![0x72, 0x0b, 0, 0])), "ABORTED COMMAND");
        assert_eq!(error_name(&cc(Vec::new())), "CHECK CONDITION WITHOUT SENSE");
        let status = |s: u8| {
            Ok(ScsiResult {
                status: s,
                ..Default::default()
            })
        };
        assert_eq!(error_name(&status(0x08)), "BUSY");
        assert_eq!(error_name(&status(0x28)), "TASK SET FULL");
        assert_eq!(error_name(&status(0x18)), "RESERVATION CONFLICT");
        assert_eq!(error_name(&status(0x66)), "STATUS 0x66");
        let response = Ok(ScsiResult {
            response: 1,
            ..Default::default()
        });
        assert_eq!(error_name(&response), "iSCSI TARGET FAILURE");
        let rejected = Err(InitiatorError::Rejected { itt: 1, reason: 4 });
        assert_eq!(error_name(&rejected), "REJECT");
        assert_eq!(SENSE_KEYS[5], "ILLEGAL REQUEST");
        assert_eq!(SENSE_KEYS[2], "NOT READY");
    }

    fn report() -> Report {
        let mut read = Stats::new();
        for _ in 0..90 {
            read.ios += 1;
            read.bytes += 4096;
            read.lat.record(Duration::from_micros(50));
        }
        let mut write = Stats::new();
        for _ in 0..10 {
            write.ios += 1;
            write.bytes += 4096;
            write.lat.record(Duration::from_micros(500));
        }
        let mut errors = Errors::default();
        errors.count(Cow::Borrowed("MEDIUM ERROR"));
        errors.transport = 1;
        Report {
            workload: Workload {
                urls: vec!["iscsi://127.0.0.1:3260/iqn.x:t/0".into()],
                sessions_per_url: 1,
                cores: vec![0],
                qd: 1,
                bs: 4096,
                read_pct: 90,
                random: true,
                secs: 2.0,
                ramp_secs: 0.0,
                timeout_secs: 30.0,
            },
            rw_name: "randrw",
            elapsed: Duration::from_secs(2),
            read,
            write,
            errors,
            ended: vec!["session 0: connection closed by the target".into()],
            late: Vec::new(),
        }
    }

    /// Every field bench-json names, at its place, with its type.
    #[test]
    fn the_json_has_the_contracts_fields() {
        let j = serde_json::to_value(report().json()).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        let mut top = keys(&j);
        top.sort();
        assert_eq!(
            top,
            [
                "bytes",
                "cdf",
                "elapsed_secs",
                "ended",
                "errors",
                "iops",
                "ios",
                "latency_us",
                "mbps",
                "read",
                "timed_out",
                "timeouts",
                "tool",
                "workload",
                "write"
            ]
        );
        assert_eq!(j["tool"], "iscsi-bench");
        let mut w = keys(&j["workload"]);
        w.sort();
        assert_eq!(
            w,
            [
                "bs",
                "cores",
                "qd",
                "ramp_secs",
                "random",
                "read_pct",
                "secs",
                "sessions_per_url",
                "timeout_secs",
                "urls"
            ]
        );
        assert_eq!(j["workload"]["urls"][0], "iscsi://127.0.0.1:3260/iqn.x:t/0");
        assert!(j["workload"]["secs"].is_f64() && j["workload"]["random"].is_boolean());
        assert_eq!(
            (j["ios"].as_u64(), j["bytes"].as_u64()),
            (Some(100), Some(409_600))
        );
        assert_eq!(j["iops"].as_f64(), Some(50.0));
        assert_eq!(j["mbps"].as_f64(), Some(0.2));
        assert_eq!(j["read"]["ios"], 90);
        assert_eq!(j["write"]["iops"].as_f64(), Some(5.0));
        for k in ["ios", "bytes", "iops", "mbps"] {
            assert!(
                j["read"].get(k).is_some() && j["write"].get(k).is_some(),
                "{k}"
            );
        }
        let mut l = keys(&j["latency_us"]);
        l.sort();
        assert_eq!(
            l,
            ["max", "mean", "min", "p50", "p90", "p99", "p99.9", "p99.99"]
        );
        assert_eq!(j["latency_us"]["min"].as_f64(), Some(50.0));
        assert_eq!(j["latency_us"]["max"].as_f64(), Some(500.0));
        assert_eq!(j["write"]["latency_us"]["min"].as_f64(), Some(500.0));
        let cdf = j["cdf"].as_array().unwrap();
        assert_eq!(cdf[0], serde_json::json!([0.0, 50.0]));
        assert_eq!(*cdf.last().unwrap(), serde_json::json!([100.0, 500.0]));
        assert_eq!(
            j["errors"],
            serde_json::json!({"total": 2, "transport": 1, "by_sense_key": {"MEDIUM ERROR": 1}})
        );
        assert_eq!(j["timed_out"], false);
        assert_eq!(j["timeouts"], serde_json::json!([]));
        assert_eq!(
            j["ended"],
            serde_json::json!(["session 0: connection closed by the target"])
        );
        assert_eq!(j["workload"]["timeout_secs"].as_f64(), Some(30.0));
    }

    #[test]
    fn a_late_command_is_named_in_the_json_and_its_line() {
        let late = Late {
            url: "iscsi://127.0.0.1:3260/iqn.x:t/0".into(),
            session: 1,
            op: "READ (16)",
            itt: 0x1f,
            lba: 4096,
            blocks: 8,
            waited_secs: 2.31,
        };
        let mut r = report();
        r.late.push(late.clone());
        let j = serde_json::to_value(r.json()).unwrap();
        assert_eq!(j["timed_out"], true);
        assert_eq!(
            j["timeouts"],
            serde_json::json!([{
                "url": "iscsi://127.0.0.1:3260/iqn.x:t/0", "session": 1, "op": "READ (16)",
                "itt": 31, "lba": 4096, "blocks": 8, "waited_secs": 2.31
            }])
        );
        let line = late.line(2.0);
        for says in [
            "iscsi://127.0.0.1:3260/iqn.x:t/0",
            "READ (16) ITT 0x1f LBA 4096 (8 blocks)",
            "after 2.3 s",
            "--timeout 2",
        ] {
            assert!(line.contains(says), "{says}: {line}");
        }
    }

    #[test]
    fn the_summary_ends_with_iops_and_mbps() {
        let t = report().text();
        let last = t.lines().last().unwrap();
        assert_eq!(last, "iops 50 mbps 0");
        assert!(t.contains("errors 2: transport 1, MEDIUM ERROR 1"), "{t}");
        assert!(t.contains("session ended: session 0"), "{t}");
        // A mix shows reads, writes and both.
        assert!(
            t.contains("\nread ") && t.contains("\nwrite ") && t.contains("\nall "),
            "{t}"
        );
    }
}

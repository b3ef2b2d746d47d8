//! The report of a `scripts/bench.sh` run: reads the runs it recorded (`results.jsonl`, one JSON
//! object a line) and writes the Markdown tables (`results.md`, also printed) and the PNG plots
//! beside them: IOPS against queue depth for 4 KiB random reads and writes (one line per target
//! and initiator) and latency CDFs for 4 KiB random reads at QD1 and QD32 (one curve per target,
//! from iscsi-bench's `cdf`).
//!
//! ```text
//! iscsi-bench-plot [--out DIR] [--font TTF] [--no-png] RESULTS.jsonl
//! ```
//!
//! A line of `results.jsonl` has a `kind`:
//! - `meta`: the run's settings (`date`, `commit`, `cpu`, `secs`, `ramp`, `mode`, cores, `note`);
//! - `run`: one measurement: `part` (`matrix` for the table and plots, `modes` for the
//!   adaptive-mode comparison), `target` (`iscsi-tgt`, `tgtd`, `spdk` or a peer's name), `net`,
//!   `label` (what the tables and plots call the target), `mode`, `initiator`, `workload` (its
//!   name), `rw`, `bs`, `qd`, `busy_us_per_io` (the target's busy time per I/O, when known),
//!   `result` (iscsi-bench's `--json` object, or iscsi-perf's figures as `iops` and `mbps`) or
//!   `error`;
//! - `iperf3`: the loopback TCP ceiling on the same cores (`mbps`);
//! - `idle`: the target's CPU use with a session logged in and idle (`mode`, `cpu_pct`, `secs`);
//! - `rss`: VmRSS samples of a long mixed run (`samples_kb`, `interval_secs`, `secs`).
//!
//! The plots need a TrueType font, loaded at run time (plotters is built without fontconfig):
//! `--font`, else Debian's DejaVu Sans (fonts-dejavu-core, which scripts/setup.sh installs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

/// Where Debian's fonts-dejavu-core puts the font the plots use unless `--font` names another.
const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The plots' size in pixels.
const SIZE: (u32, u32) = (1100, 650);

/// The deepest tail the CDF plots show: 99.999 % (five nines).
const MAX_NINES: f64 = 5.0;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
enum PlotError {
    /// cannot read {0}: {1}
    Read(PathBuf, std::io::Error),
    /// {0} line {1}: {2}
    Parse(PathBuf, usize, serde_json::Error),
    /// cannot write {0}: {1}
    Write(PathBuf, std::io::Error),
    /// cannot read the font {0}: {1} (install fonts-dejavu-core, as scripts/setup.sh does, or give --font)
    FontRead(PathBuf, std::io::Error),
    /// {0} is not a TrueType or OpenType font
    FontInvalid(PathBuf),
    /// cannot draw {0}: {1}
    Draw(PathBuf, String),
    /// cannot write {0}: {1}
    Encode(PathBuf, png::EncodingError),
    /// {0}
    Usage(String),
}

type Result<T> = std::result::Result<T, PlotError>;

/// One line of `results.jsonl`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Record {
    Meta(Meta),
    Run(Box<Run>),
    Iperf3(Iperf3),
    Idle(Idle),
    Rss(Rss),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Meta {
    date: String,
    commit: String,
    cpu: String,
    secs: f64,
    ramp: f64,
    mode: String,
    target_core: u32,
    init_core: u32,
    /// What the person who ran it wants said about the run (bench.sh's NOTE).
    note: String,
}

#[derive(Debug, Deserialize)]
struct Run {
    #[serde(default = "matrix")]
    part: String,
    target: String,
    #[serde(default)]
    net: String,
    label: String,
    #[serde(default)]
    mode: String,
    initiator: String,
    workload: String,
    rw: String,
    bs: u64,
    qd: u64,
    #[serde(default)]
    busy_us_per_io: Option<f64>,
    #[serde(default)]
    result: Option<Outcome>,
    #[serde(default)]
    error: Option<String>,
}

fn matrix() -> String {
    "matrix".into()
}

/// What either initiator reports; iscsi-bench's latencies and CDF are absent from iscsi-perf's.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Outcome {
    iops: f64,
    mbps: f64,
    latency_us: Option<Latency>,
    /// `[percentile, latency_us]` pairs, percentiles ascending to 100.
    cdf: Vec<[f64; 2]>,
    errors: Option<Errors>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Latency {
    p50: Option<f64>,
    p99: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Errors {
    total: u64,
}

#[derive(Debug, Deserialize)]
struct Iperf3 {
    mbps: f64,
    #[serde(default)]
    secs: f64,
}

#[derive(Debug, Deserialize)]
struct Idle {
    mode: String,
    cpu_pct: f64,
    #[serde(default)]
    secs: f64,
}

#[derive(Debug, Deserialize)]
struct Rss {
    samples_kb: Vec<u64>,
    #[serde(default)]
    interval_secs: f64,
    #[serde(default)]
    secs: f64,
}

/// Everything one results file holds, in the order it was recorded.
#[derive(Debug, Default)]
struct Results {
    meta: Meta,
    runs: Vec<Run>,
    iperf3: Option<Iperf3>,
    idle: Vec<Idle>,
    rss: Option<Rss>,
}

impl Results {
    fn parse(text: &str, path: &Path) -> Result<Results> {
        let mut r = Results::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec = serde_json::from_str::<Record>(line)
                .map_err(|e| PlotError::Parse(path.to_path_buf(), i + 1, e))?;
            match rec {
                Record::Meta(m) => r.meta = m,
                Record::Run(x) => r.runs.push(*x),
                Record::Iperf3(x) => r.iperf3 = Some(x),
                Record::Idle(x) => r.idle.push(x),
                Record::Rss(x) => r.rss = Some(x),
            }
        }
        Ok(r)
    }

    fn matrix(&self) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(|r| r.part == "matrix")
    }
}

/// The names in `names` in order of first appearance, once each.
fn ordered<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// Large transfers are read in MB/s, small ones in IOPS.
fn is_streaming(bs: u64) -> bool {
    bs >= 65536
}

/// `1234567.8` as `1,234,568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency or a time per I/O: two significant decimals below 10, one below 100.
fn micros(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

fn throughput(run: &Run, o: &Outcome) -> String {
    if is_streaming(run.bs) {
        format!("{} MB/s", thousands(o.mbps))
    } else {
        thousands(o.iops)
    }
}

/// The rate the ratio columns compare (IOPS, which is MB/s over the same transfer size).
fn rate(run: &Run) -> Option<f64> {
    run.result.as_ref().map(|o| o.iops).filter(|x| *x > 0.0)
}

/// The Markdown report: settings, one table per initiator, the ceiling and the modes.
fn render_markdown(r: &Results) -> String {
    let mut md = String::new();
    let m = &r.meta;
    let _ = writeln!(md, "# Benchmark matrix\n");
    let _ = writeln!(
        md,
        "{} (commit {}), {}. Target on core {}, initiator on core {}; iscsi-tgt in {} mode. \
         {} s per run after {} s of ramp-up; 1 GiB RAM LUNs filled with the same random data. \
         Busy µs per I/O is the target's busy time over the measured interval divided by the \
         I/Os done in it (iscsi-tgt: its reactors' busy_ns; SPDK and peers with rpc=: framework_get_reactors' \
         busy ticks; tgtd: its process's CPU time). Latency percentiles are iscsi-bench's, from \
         submission of a command to its response. A throughput of `error` means the run \
         failed (its message is in results.jsonl).\n",
        m.date, m.commit, m.cpu, m.target_core, m.init_core, m.mode, m.secs, m.ramp
    );
    if !m.note.is_empty() {
        let _ = writeln!(md, "Note: {}\n", m.note);
    }
    let matrix: Vec<&Run> = r.matrix().collect();
    // Every table has every workload, so that what an initiator cannot do shows as n/a.
    let workloads = ordered(matrix.iter().map(|x| x.workload.as_str()));
    for ini in ordered(matrix.iter().map(|x| x.initiator.as_str())) {
        let runs: Vec<&Run> = matrix
            .iter()
            .copied()
            .filter(|x| x.initiator == ini)
            .collect();
        let _ = writeln!(md, "## Initiator: {ini}\n");
        if ini == "iscsi-perf" {
            let _ = writeln!(
                md,
                "libiscsi's iscsi-perf only reads (it has no option to write): its write rows \
                 are n/a, and writes are measured with iscsi-bench only. It reports no \
                 latencies; its rate is the mean of its per-second figures after the ramp-up.\n"
            );
        }
        let latency = ini == "iscsi-bench" || has_latency(&runs);
        md.push_str(&initiator_table(&runs, &workloads, latency));
        md.push('\n');
    }
    md.push_str(&extras(r));
    let failed: Vec<&Run> = r.runs.iter().filter(|x| x.result.is_none()).collect();
    if !failed.is_empty() {
        let _ = writeln!(md, "## Failed runs\n");
        for x in failed {
            let _ = writeln!(
                md,
                "- {}, {}, {}: {}",
                x.label,
                x.initiator,
                x.workload,
                x.error.as_deref().unwrap_or("no result recorded")
            );
        }
        md.push('\n');
    }
    md
}

fn has_latency(runs: &[&Run]) -> bool {
    runs.iter().any(|x| {
        x.result
            .as_ref()
            .and_then(|o| o.latency_us.as_ref())
            .is_some()
    })
}

/// One initiator's table: a row per workload, per target its throughput, busy time per I/O and
/// (iscsi-bench) p50/p99; then iscsi-tgt against SPDK where SPDK ran.
fn initiator_table(runs: &[&Run], workloads: &[&str], latency: bool) -> String {
    let labels = ordered(runs.iter().map(|x| x.label.as_str()));
    let find = |w: &str, l: &str| runs.iter().find(|x| x.workload == w && x.label == l);
    let spdk = runs
        .iter()
        .find(|x| x.target == "spdk")
        .map(|x| x.label.as_str());
    let ours: Vec<&str> = ordered(
        runs.iter()
            .filter(|x| x.target == "iscsi-tgt")
            .map(|x| x.label.as_str()),
    );
    let mut head = String::from("| workload |");
    let mut rule = String::from("|---|");
    for l in &labels {
        let _ = write!(head, " {l} | busy µs/IO |");
        rule.push_str("---:|---:|");
        if latency {
            head.push_str(" p50 / p99 µs |");
            rule.push_str("---:|");
        }
    }
    if let Some(s) = spdk {
        for o in &ours {
            let _ = write!(head, " {o} / {s} |");
            rule.push_str("---:|");
        }
    }
    let mut out = format!("{head}\n{rule}\n");
    for w in workloads {
        let mut line = format!("| {w} |");
        for l in &labels {
            let cells = match find(w, l) {
                None => vec!["n/a".to_string(); 2 + usize::from(latency)],
                Some(run) => cells(run, latency),
            };
            for c in cells {
                let _ = write!(line, " {c} |");
            }
        }
        if let Some(s) = spdk {
            let base = find(w, s).and_then(|x| rate(x));
            for o in &ours {
                let ratio = match (find(w, o).and_then(|x| rate(x)), base) {
                    (Some(a), Some(b)) => format!("{:.2}×", a / b),
                    _ => "n/a".into(),
                };
                let _ = write!(line, " {ratio} |");
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A run's cells: throughput, busy µs per I/O and, when asked, p50 / p99.
fn cells(run: &Run, latency: bool) -> Vec<String> {
    let Some(o) = &run.result else {
        let mut v = vec!["error".to_string(), "–".to_string()];
        if latency {
            v.push("–".into());
        }
        return v;
    };
    let mut tp = throughput(run, o);
    if let Some(n) = o.errors.as_ref().map(|e| e.total).filter(|n| *n > 0) {
        let _ = write!(tp, " ({n} errors)");
    }
    let busy = run.busy_us_per_io.map_or("–".into(), micros);
    let mut v = vec![tp, busy];
    if latency {
        let l = o.latency_us.as_ref();
        v.push(match (l.and_then(|l| l.p50), l.and_then(|l| l.p99)) {
            (Some(a), Some(b)) => format!("{} / {}", micros(a), micros(b)),
            _ => "–".into(),
        });
    }
    v
}

/// The iperf3 ceiling, the adaptive mode's idle CPU and IOPS, and RSS flatness, when measured.
fn extras(r: &Results) -> String {
    let mut md = String::new();
    if let Some(ip) = &r.iperf3 {
        let _ = writeln!(md, "## Loopback ceiling\n");
        let _ = writeln!(
            md,
            "iperf3 over loopback on the same cores (server on the target's, receiving from the \
             server as a read does), {} s: **{} MB/s**. 128 KiB sequential reads against it:\n",
            ip.secs,
            thousands(ip.mbps)
        );
        let _ = writeln!(
            md,
            "| target | initiator | MB/s | % of iperf3 |\n|---|---|---:|---:|"
        );
        for run in r.matrix().filter(|x| x.rw == "read" && is_streaming(x.bs)) {
            if let Some(o) = &run.result {
                let pct = if ip.mbps > 0.0 {
                    format!("{:.0} %", 100.0 * o.mbps / ip.mbps)
                } else {
                    "n/a".into()
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {pct} |",
                    run.label,
                    run.initiator,
                    thousands(o.mbps)
                );
            }
        }
        md.push('\n');
    }
    let modes: Vec<&Run> = r
        .runs
        .iter()
        .filter(|x| x.part == "modes" || (x.part == "matrix" && x.target == "iscsi-tgt"))
        .filter(|x| x.net == "kernel" && x.rw == "randread" && x.qd == 32)
        .filter(|x| x.bs == 4096 && x.initiator == "iscsi-bench")
        .collect();
    if !r.idle.is_empty() || !modes.is_empty() {
        let _ = writeln!(md, "## Poll and adaptive mode\n");
        let _ = writeln!(
            md,
            "iscsi-tgt on the kernel path: its process's CPU use with one session logged in \
             and idle, and 4 KiB random reads at QD32 (iscsi-bench).\n"
        );
        let _ = writeln!(
            md,
            "| mode | idle CPU | QD32 IOPS | busy µs/IO |\n|---|---:|---:|---:|"
        );
        let mut seen: Vec<&str> = Vec::new();
        for mode in ordered(
            r.idle
                .iter()
                .map(|x| x.mode.as_str())
                .chain(modes.iter().map(|x| x.mode.as_str())),
        ) {
            if seen.contains(&mode) {
                continue;
            }
            seen.push(mode);
            let idle = r.idle.iter().find(|x| x.mode == mode);
            let run = modes.iter().find(|x| x.mode == mode);
            let _ = writeln!(
                md,
                "| {mode} | {} | {} | {} |",
                idle.map_or("–".into(), |i| format!(
                    "{:.1} % over {} s",
                    i.cpu_pct, i.secs
                )),
                run.and_then(|x| x.result.as_ref())
                    .map_or("–".into(), |o| thousands(o.iops)),
                run.and_then(|x| x.busy_us_per_io)
                    .map_or("–".into(), micros),
            );
        }
        md.push('\n');
    }
    if let Some(rss) = &r.rss {
        if let (Some(lo), Some(hi)) = (rss.samples_kb.iter().min(), rss.samples_kb.iter().max()) {
            let _ = writeln!(md, "## Memory under a long mixed run\n");
            let _ = writeln!(
                md,
                "iscsi-tgt's VmRSS every {} s over {} s of 4 KiB random 70/30 reads and writes \
                 (after a warm-up): min {} KiB, max {} KiB, spread {} KiB ({:.1} %).\n",
                rss.interval_secs,
                rss.secs,
                thousands(*lo as f64),
                thousands(*hi as f64),
                thousands((hi - lo) as f64),
                100.0 * (hi - lo) as f64 / (*lo).max(1) as f64
            );
        }
    }
    md
}

/// Loads the font the plots are drawn with; plotters keeps it for the life of the program.
fn load_font(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| PlotError::FontRead(path.to_path_buf(), e))?;
    // Leaked once: plotters' font table holds `'static` references.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| PlotError::FontInvalid(path.to_path_buf()))
}

/// A percentile on the CDF plots' vertical axis: its number of nines (90 % is 1, 99 % is 2,
/// ...), so that the tail is spread out; 100 % is drawn at the top.
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(10f64.powf(-MAX_NINES));
    (-rest.log10()).clamp(0.0, MAX_NINES)
}

/// The inverse of `nines`, for the axis labels.
fn percentile_label(n: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-n));
    let decimals = (n.round() as usize).saturating_sub(2).min(4);
    format!("{p:.decimals$} %")
}

/// A label of the log latency axis: only at 1, 2 and 5 times a power of ten (every tick
/// labelled runs into its neighbours at the top of a decade).
fn latency_label(v: f64) -> String {
    if !(v.is_finite() && v > 0.0) {
        return String::new();
    }
    let lead = v / 10f64.powf(v.log10().floor());
    if [1.0, 2.0, 5.0, 10.0]
        .iter()
        .any(|d| (lead - d).abs() < 1e-6)
    {
        if v >= 1.0 {
            format!("{v:.0}")
        } else {
            format!("{v}")
        }
    } else {
        String::new()
    }
}

/// One line of an IOPS plot: a target and initiator, its points sorted by queue depth.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
    /// The target's place among all the run's targets: its colour, the same on every plot.
    color: usize,
    /// iscsi-perf's lines are thin with hollow markers beside iscsi-bench's.
    thin: bool,
}

/// A target's colour index: its place among the targets of the whole matrix.
fn color_of(r: &Results, label: &str) -> usize {
    ordered(r.matrix().map(|x| x.label.as_str()))
        .iter()
        .position(|l| *l == label)
        .unwrap_or(0)
}

/// The IOPS-against-queue-depth lines for 4 KiB random I/O of one direction.
fn iops_lines(r: &Results, rw: &str) -> Vec<Line> {
    let runs: Vec<&Run> = r
        .matrix()
        .filter(|x| x.rw == rw && x.bs == 4096 && x.qd > 0)
        .collect();
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for x in &runs {
        let k = (x.label.as_str(), x.initiator.as_str());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .filter_map(|(label, ini)| {
            let mut by_qd: BTreeMap<u64, f64> = BTreeMap::new();
            for x in runs
                .iter()
                .filter(|x| x.label == label && x.initiator == ini)
            {
                if let Some(iops) = rate(x) {
                    by_qd.insert(x.qd, iops);
                }
            }
            let points: Vec<(f64, f64)> = by_qd
                .into_iter()
                .map(|(q, i)| ((q as f64).log2(), i))
                .collect();
            (!points.is_empty()).then(|| Line {
                name: format!("{label}, {ini}"),
                points,
                color: color_of(r, label),
                thin: ini == "iscsi-perf",
            })
        })
        .collect()
}

/// The CDF curves (latency µs, nines) of 4 KiB random reads at one queue depth, one per target
/// measured with iscsi-bench.
fn cdf_lines(r: &Results, qd: u64) -> Vec<Line> {
    r.matrix()
        .filter(|x| x.rw == "randread" && x.bs == 4096 && x.qd == qd)
        .filter(|x| x.initiator == "iscsi-bench")
        .filter_map(|x| {
            let o = x.result.as_ref()?;
            let points: Vec<(f64, f64)> = o
                .cdf
                .iter()
                .filter(|[p, lat]| p.is_finite() && lat.is_finite() && *lat > 0.0)
                .map(|[p, lat]| (*lat, nines(*p)))
                .collect();
            (points.len() >= 2).then(|| Line {
                name: x.label.clone(),
                points,
                color: color_of(r, &x.label),
                thin: false,
            })
        })
        .collect()
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw(path.to_path_buf(), e.to_string())
}

fn color(i: usize) -> RGBColor {
    // Distinguishable on white, in the order the lines are listed.
    const COLORS: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    COLORS[i % COLORS.len()]
}

/// Draws the lines on `area` with their legend in the upper left.
fn draw_lines<'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    lines: &[Line],
    path: &Path,
    markers: bool,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for line in lines {
        let c = color(line.color);
        let width = if line.thin { 1 } else { 2 };
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                c.stroke_width(width),
            ))
            .map_err(draw_err(path))?
            .label(line.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
            });
        if markers {
            let style = if line.thin {
                c.stroke_width(2)
            } else {
                c.filled()
            };
            chart
                .draw_series(line.points.iter().map(|&p| Circle::new(p, 4, style)))
                .map_err(draw_err(path))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(draw_err(path))
}

/// Draws a plot into an RGB buffer of `SIZE` and writes it to `path` as a PNG. (plotters'
/// own PNG encoder would bring in the `image` crate, which doubles the plots' build time.)
fn render<F>(path: &Path, draw: F) -> Result<()>
where
    F: FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
{
    let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(path))?;
        draw(&root)?;
        root.present().map_err(draw_err(path))?;
    }
    write_png(path, &rgb).map_err(|e| PlotError::Encode(path.to_path_buf(), e))
}

fn write_png(path: &Path, rgb: &[u8]) -> std::result::Result<(), png::EncodingError> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // The plots are committed: a few hundred KiB less each is worth the milliseconds.
    enc.set_compression(png::Compression::Best);
    enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()
}

/// IOPS against queue depth (a log2 axis labelled with the depths).
fn plot_iops(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
    render(path, |root| draw_iops(root, path, title, lines))
}

fn draw_iops(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    path: &Path,
    title: &str,
    lines: &[Line],
) -> Result<()> {
    let max_x = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let max_y = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(-0.3f64..max_x + 0.3, 0f64..max_y * 1.1)
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc("queue depth")
        .y_desc("IOPS")
        .x_labels((max_x as usize + 2).max(2))
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-6 && *v >= 0.0 {
                format!("{}", 2u64.saturating_pow(v.round() as u32))
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| thousands(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(draw_err(path))?;
    draw_lines(&mut chart, lines, path, true)
}

/// Latency CDFs: latency on a log axis, the percentile on the nines axis.
fn plot_cdf(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
    render(path, |root| draw_cdf(root, path, title, lines))
}

fn draw_cdf(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    path: &Path,
    title: &str,
    lines: &[Line],
) -> Result<()> {
    let lats = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let lo = lats().fold(f64::INFINITY, f64::min).max(0.1);
    let hi = lats().fold(0.0f64, f64::max).max(lo * 2.0);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..MAX_NINES)
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("percentile")
        .y_labels(MAX_NINES as usize + 1)
        .y_label_formatter(&|v| percentile_label(*v))
        .x_label_formatter(&|v| latency_label(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(draw_err(path))?;
    // The median, which falls between the axis' labels.
    let median = nines(50.0);
    chart
        .draw_series([PathElement::new(
            vec![(lo * 0.8, median), (hi * 1.25, median)],
            BLACK.mix(0.35).stroke_width(1),
        )])
        .map_err(draw_err(path))?;
    chart
        .draw_series([Text::new(
            "50 %",
            (lo * 0.82, median + 0.04),
            ("sans-serif", 14).into_font().color(&BLACK.mix(0.6)),
        )])
        .map_err(draw_err(path))?;
    draw_lines(&mut chart, lines, path, false)
}

/// Writes the PNGs the results allow (a plot without data is left out, and said so); returns
/// the files written.
fn plot_all(r: &Results, out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (rw, what) in [("randread", "random read"), ("randwrite", "random write")] {
        let lines = iops_lines(r, rw);
        let path = out.join(format!("iops-qd-4k-{rw}.png"));
        if lines.is_empty() {
            eprintln!(
                "iscsi-bench-plot: no 4 KiB {what} runs: {} not drawn",
                path.display()
            );
            continue;
        }
        plot_iops(&path, &format!("4 KiB {what}: IOPS by queue depth"), &lines)?;
        written.push(path);
    }
    for qd in [1, 32] {
        let lines = cdf_lines(r, qd);
        let path = out.join(format!("latency-cdf-4k-randread-qd{qd}.png"));
        if lines.is_empty() {
            eprintln!(
                "iscsi-bench-plot: no iscsi-bench CDF for 4 KiB random reads at QD{qd}: {} not drawn",
                path.display()
            );
            continue;
        }
        plot_cdf(
            &path,
            &format!("4 KiB random read QD{qd}: latency CDF (iscsi-bench)"),
            &lines,
        )?;
        written.push(path);
    }
    Ok(written)
}

struct Args {
    input: PathBuf,
    out: Option<PathBuf>,
    font: PathBuf,
    png: bool,
}

const USAGE: &str = "usage: iscsi-bench-plot [--out DIR] [--font TTF] [--no-png] RESULTS.jsonl";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut input = None;
    let mut out = None;
    let mut font = PathBuf::from(DEFAULT_FONT);
    let mut png = true;
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| PlotError::Usage(format!("{a} needs a value\n{USAGE}")))
        };
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(val()?)),
            "--font" => font = PathBuf::from(val()?),
            "--no-png" => png = false,
            "-h" | "--help" => return Err(PlotError::Usage(USAGE.into())),
            _ if a.starts_with('-') => {
                return Err(PlotError::Usage(format!("unknown option {a}\n{USAGE}")))
            }
            _ if input.is_none() => input = Some(PathBuf::from(a)),
            _ => return Err(PlotError::Usage(format!("one results file only\n{USAGE}"))),
        }
    }
    let input = input.ok_or_else(|| PlotError::Usage(USAGE.into()))?;
    Ok(Args {
        input,
        out,
        font,
        png,
    })
}

fn run(a: &Args) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.input).map_err(|e| PlotError::Read(a.input.clone(), e))?;
    let results = Results::parse(&text, &a.input)?;
    let out = a
        .out
        .clone()
        .or_else(|| a.input.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let md = render_markdown(&results);
    let md_path = out.join("results.md");
    std::fs::write(&md_path, &md).map_err(|e| PlotError::Write(md_path.clone(), e))?;
    print!("{md}");
    if a.png {
        load_font(&a.font)?;
        for p in plot_all(&results, &out)? {
            eprintln!("iscsi-bench-plot: wrote {}", p.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1)).and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iscsi-bench-plot: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object in the schema of iscsi-bench's `--json`, trimmed to what matters here.
    fn bench_json(iops: f64, bs: u64, p50: f64, p99: f64) -> String {
        format!(
            r#"{{"tool":"iscsi-bench","iops":{iops},"mbps":{},"latency_us":{{"min":1.0,"p50":{p50},"p90":{p50},"p99":{p99},"p99.9":{p99}}},"cdf":[[0.0,{}],[50.0,{p50}],[90.0,{p50}],[99.0,{p99}],[100.0,{}]],"errors":{{"total":0,"transport":0,"by_sense_key":{{}}}}}}"#,
            iops * bs as f64 / 1e6,
            p50 / 2.0,
            p99 * 2.0
        )
    }

    fn run_line(
        label: &str,
        target: &str,
        ini: &str,
        rw: &str,
        bs: u64,
        qd: u64,
        result: &str,
    ) -> String {
        format!(
            r#"{{"kind":"run","part":"matrix","target":"{target}","net":"kernel","label":"{label}","mode":"poll","initiator":"{ini}","workload":"{rw} {bs} QD{qd}","rw":"{rw}","bs":{bs},"qd":{qd},"busy_us_per_io":2.5,"result":{result}}}"#
        )
    }

    fn sample() -> Results {
        let mut lines = vec![
            r#"{"kind":"meta","date":"2026-01-01","commit":"abc","cpu":"cpu","secs":5,"ramp":1,"mode":"poll","target_core":1,"init_core":0,"note":"a test"}"#.to_string(),
        ];
        for qd in [1, 8, 32, 128] {
            let q = qd as f64;
            lines.push(run_line(
                "ours",
                "iscsi-tgt",
                "iscsi-bench",
                "randread",
                4096,
                qd,
                &bench_json(10000.0 * q, 4096, 20.0 * q, 40.0 * q),
            ));
            lines.push(run_line(
                "SPDK",
                "spdk",
                "iscsi-bench",
                "randread",
                4096,
                qd,
                &bench_json(8000.0 * q, 4096, 25.0 * q, 50.0 * q),
            ));
            lines.push(run_line(
                "ours",
                "iscsi-tgt",
                "iscsi-perf",
                "randread",
                4096,
                qd,
                r#"{"tool":"iscsi-perf","iops":9000,"mbps":36.9}"#,
            ));
            lines.push(run_line(
                "ours",
                "iscsi-tgt",
                "iscsi-bench",
                "randwrite",
                4096,
                qd,
                &bench_json(7000.0 * q, 4096, 30.0, 60.0),
            ));
        }
        lines.push(run_line(
            "ours",
            "iscsi-tgt",
            "iscsi-bench",
            "read",
            131072,
            16,
            &bench_json(20000.0, 131072, 100.0, 300.0),
        ));
        lines.push(r#"{"kind":"run","target":"spdk","label":"SPDK","initiator":"iscsi-bench","workload":"read 131072 QD16","rw":"read","bs":131072,"qd":16,"error":"connection refused"}"#.to_string());
        lines.push(r#"{"kind":"iperf3","mbps":5242.88,"secs":5}"#.to_string());
        lines.push(r#"{"kind":"idle","mode":"adaptive","cpu_pct":0.4,"secs":5}"#.to_string());
        lines.push(r#"{"kind":"run","part":"modes","target":"iscsi-tgt","net":"kernel","label":"ours adaptive","mode":"adaptive","initiator":"iscsi-bench","workload":"x","rw":"randread","bs":4096,"qd":32,"result":{"iops":250000}}"#.to_string());
        Results::parse(&lines.join("\n"), Path::new("sample.jsonl")).unwrap()
    }

    #[test]
    fn table_has_throughput_busy_latency_and_ratio() {
        let md = render_markdown(&sample());
        // QD32 random read: 320000 IOPS against SPDK's 256000.
        let row = md
            .lines()
            .find(|l| l.starts_with("| randread 4096 QD32 |") && l.contains("320,000"))
            .expect("the QD32 row of the iscsi-bench table");
        assert!(row.contains("| 2.50 |"), "{row}");
        assert!(row.contains("| 640 / 1280 |"), "{row}");
        assert!(row.contains("| 1.25× |"), "{row}");
        // The 128 KiB row in MB/s; SPDK's failed run says so and has no ratio.
        let row = md
            .lines()
            .find(|l| l.starts_with("| read 131072 QD16 |"))
            .unwrap();
        assert!(row.contains("2,621 MB/s"), "{row}");
        assert!(row.contains("| error |"), "{row}");
        assert!(row.ends_with("| n/a |"), "{row}");
        assert!(md.contains("- SPDK, iscsi-bench, read 131072 QD16: connection refused\n"));
        assert!(md.contains("\nNote: a test\n"));
    }

    #[test]
    fn iscsi_perf_table_has_no_latency_and_no_writes() {
        let md = render_markdown(&sample());
        let table: Vec<&str> = md
            .split("## Initiator: iscsi-perf")
            .nth(1)
            .unwrap()
            .split("## ")
            .next()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with('|'))
            .collect();
        assert!(
            table[0].contains("busy µs/IO") && !table[0].contains("p50"),
            "{}",
            table[0]
        );
        let write = table
            .iter()
            .find(|l| l.contains("randwrite 4096 QD8"))
            .unwrap();
        assert_eq!(*write, "| randwrite 4096 QD8 | n/a | n/a |");
        assert!(table.iter().any(|l| l.contains("9,000")));
    }

    #[test]
    fn extras_give_ceiling_share_and_modes() {
        let md = render_markdown(&sample());
        // 2621.44 MB/s of 5242.88 is 50 %.
        assert!(md.contains("| ours | iscsi-bench | 2,621 | 50 % |"), "{md}");
        assert!(
            md.contains("| adaptive | 0.4 % over 5 s | 250,000 | – |"),
            "{md}"
        );
        assert!(md.contains("| poll | – | 320,000 | 2.50 |"), "{md}");
    }

    #[test]
    fn nines_spread_the_tail() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), MAX_NINES);
        assert_eq!(percentile_label(0.0), "0 %");
        assert_eq!(percentile_label(2.0), "99 %");
        assert_eq!(percentile_label(4.0), "99.99 %");
    }

    #[test]
    fn latency_axis_labels_ones_twos_and_fives() {
        let labels: Vec<String> = [100.0, 200.0, 300.0, 500.0, 900.0, 1000.0, 7000.0, 0.5]
            .iter()
            .map(|v| latency_label(*v))
            .collect();
        assert_eq!(labels, ["100", "200", "", "500", "", "1000", "", "0.5"]);
    }

    #[test]
    fn lines_follow_queue_depth() {
        let r = sample();
        let lines = iops_lines(&r, "randread");
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["ours, iscsi-bench", "SPDK, iscsi-bench", "ours, iscsi-perf"]
        );
        let xs: Vec<f64> = lines[0].points.iter().map(|p| p.0).collect();
        assert_eq!(xs, [0.0, 3.0, 5.0, 7.0]);
        assert_eq!(cdf_lines(&r, 32).len(), 2);
        assert!(cdf_lines(&r, 8).iter().all(|l| l.name != "ours adaptive"));
    }

    #[test]
    fn bad_line_names_its_number() {
        let e = Results::parse(
            "{\"kind\":\"iperf3\",\"mbps\":1}\n{oops",
            Path::new("r.jsonl"),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("r.jsonl line 2:"), "{e}");
    }

    #[test]
    fn draws_pngs() {
        let dir = tempfile::tempdir().unwrap();
        load_font(Path::new(DEFAULT_FONT))
            .expect("fonts-dejavu-core (scripts/setup.sh installs it)");
        let written = plot_all(&sample(), dir.path()).unwrap();
        assert_eq!(written.len(), 4);
        for p in written {
            let bytes = std::fs::read(&p).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{}", p.display());
            assert!(
                bytes.len() > 10_000,
                "{} is {} bytes",
                p.display(),
                bytes.len()
            );
        }
    }

    #[test]
    fn missing_font_is_a_clear_error() {
        let e = load_font(Path::new("/nonexistent/font.ttf")).unwrap_err();
        assert!(e.to_string().contains("fonts-dejavu-core"), "{e}");
    }
}

//! The daemon's command line.
//!
//! `iscsi-tgt [--listen ADDR:PORT]... [--rpc-socket PATH] [--rpc-group GROUP] [--cores LIST]
//! [--mode poll|adaptive] [--config FILE] [--mem-size MB] [--log LEVEL]`
#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use crate::reactor::Mode;

/// Where the RPC socket lives unless `--rpc-socket` says otherwise.
pub const DEFAULT_RPC_SOCKET: &str = "/var/tmp/iscsi-tgt.sock";
/// iscsi-scstd listens on every address by default; so do we.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3260";

pub const USAGE: &str = "\
usage: iscsi-tgt [OPTIONS]

  --listen ADDR:PORT    portal to listen on; repeat for several [0.0.0.0:3260]
  --rpc-socket PATH     JSON-RPC Unix socket [/var/tmp/iscsi-tgt.sock]
  --rpc-group GROUP     make the socket 0660 and owned by this group (a name or a gid)
                        [0600: only the daemon's user]
  --cores LIST          cores to run reactors on: 1,2 or 0-3 or a mask 0x6 [first allowed core]
  -m MASK               the same as a hexadecimal core mask
  --mode poll|adaptive  poll spins; adaptive sleeps in epoll when idle [adaptive]
  --config FILE         configuration to load at start (the save_config format)
  --mem-size MB         size of the DMA buffer pool [512]
  --log LEVEL           error, warn, info, debug or trace [info]
  -h, --help            this text
  -V, --version         print the version
";

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub listen: Vec<SocketAddr>,
    pub rpc_socket: PathBuf,
    /// The group (name or gid) that may use the RPC socket besides the daemon's user.
    pub rpc_group: Option<String>,
    pub cores: Option<Vec<usize>>,
    pub mode: Mode,
    pub config: Option<PathBuf>,
    pub mem_size_mb: usize,
    pub log_level: String,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Options),
    Help,
    Version,
}

/// Parses a core list: `1,2`, `0-3`, `0,2-3` or a hexadecimal mask `0x6`.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let s = s.trim();
    let mut cores = Vec::new();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let mask = u128::from_str_radix(hex, 16).map_err(|_| format!("bad core mask {s:?}"))?;
        for i in 0..128 {
            if mask & (1u128 << i) != 0 {
                cores.push(i);
            }
        }
    } else {
        for part in s.split(',') {
            let part = part.trim();
            let num = |x: &str| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("bad core number {x:?} in {s:?}"))
            };
            if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b >= 4096 {
                    return Err(format!("bad core range {part:?}"));
                }
                cores.extend(a..=b);
            } else {
                let c = num(part)?;
                if c >= 4096 {
                    return Err(format!("core {c} is out of range"));
                }
                cores.push(c);
            }
        }
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return Err(format!("core list {s:?} names no core"));
    }
    Ok(cores)
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("bad --listen address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--listen address {s:?} resolves to nothing"))
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut o = Options {
        listen: Vec::new(),
        rpc_socket: PathBuf::from(DEFAULT_RPC_SOCKET),
        rpc_group: None,
        cores: None,
        mode: Mode::Adaptive,
        config: None,
        mem_size_mb: 512,
        log_level: "info".into(),
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" | "-l" => o.listen.push(parse_listen(&value("--listen")?)?),
            "--rpc-socket" | "-r" => o.rpc_socket = PathBuf::from(value("--rpc-socket")?),
            "--rpc-group" => {
                let v = value("--rpc-group")?;
                if v.is_empty() {
                    return Err("--rpc-group needs a group name or number".into());
                }
                o.rpc_group = Some(v);
            }
            "--cores" => o.cores = Some(parse_cores(&value("--cores")?)?),
            "-m" => {
                let v = value("-m")?;
                let v = if v.starts_with("0x") || v.starts_with("0X") {
                    v
                } else {
                    format!("0x{v}")
                };
                o.cores = Some(parse_cores(&v)?);
            }
            "--mode" => {
                o.mode = match value("--mode")?.as_str() {
                    "poll" => Mode::Poll,
                    "adaptive" => Mode::Adaptive,
                    other => return Err(format!("--mode must be poll or adaptive, not {other:?}")),
                }
            }
            "--config" | "-c" => o.config = Some(PathBuf::from(value("--config")?)),
            "--mem-size" => {
                let v = value("--mem-size")?;
                o.mem_size_mb = v
                    .parse()
                    .ok()
                    .filter(|n| (16..=1 << 20).contains(n))
                    .ok_or_else(|| {
                        format!("--mem-size must be a number of MiB from 16 to 1048576, not {v:?}")
                    })?;
            }
            "--log" => {
                let v = value("--log")?;
                if !["error", "warn", "info", "debug", "trace"].contains(&v.as_str()) {
                    return Err(format!(
                        "--log must be error, warn, info, debug or trace, not {v:?}"
                    ));
                }
                o.log_level = v;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.listen.is_empty() {
        o.listen.push(parse_listen(DEFAULT_LISTEN)?);
    }
    Ok(Command::Run(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, String> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(o) => Ok(o),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn defaults() {
        let o = run(&[]).unwrap();
        assert_eq!(o.listen, vec!["0.0.0.0:3260".parse().unwrap()]);
        assert_eq!(o.rpc_socket, PathBuf::from("/var/tmp/iscsi-tgt.sock"));
        assert_eq!(o.mode, Mode::Adaptive);
        assert_eq!(o.cores, None);
        assert_eq!(o.rpc_group, None);
    }

    #[test]
    fn flags() {
        let o = run(&[
            "--listen",
            "127.0.0.1:3261",
            "--listen=127.0.0.2:3262",
            "--cores",
            "0,2-3",
            "--mode",
            "poll",
        ])
        .unwrap();
        assert_eq!(o.listen.len(), 2);
        assert_eq!(o.cores, Some(vec![0, 2, 3]));
        assert_eq!(o.mode, Mode::Poll);
        assert_eq!(run(&["-m", "0x6"]).unwrap().cores, Some(vec![1, 2]));
        assert_eq!(run(&["-m", "6"]).unwrap().cores, Some(vec![1, 2]));
        assert_eq!(
            run(&["--rpc-group=disk"]).unwrap().rpc_group.as_deref(),
            Some("disk")
        );
        assert!(run(&["--rpc-group", ""])
            .unwrap_err()
            .contains("--rpc-group"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(run(&["--mode", "fast"])
            .unwrap_err()
            .contains("poll or adaptive"));
        assert!(run(&["--cores", "3-1"]).unwrap_err().contains("range"));
        assert!(run(&["--listen"]).unwrap_err().contains("needs a value"));
        assert!(run(&["--bogus"]).unwrap_err().contains("unknown"));
        assert!(run(&["--listen", "nonsense"])
            .unwrap_err()
            .contains("--listen"));
        assert_eq!(parse(["--help".to_string()]).unwrap(), Command::Help);
    }
}

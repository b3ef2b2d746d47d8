//! The daemon's command line, and the network options iscsi-bench shares with it ([`NetOptions`]).
//!
//! `iscsi-tgt [--listen ADDR:PORT]... [--net kernel|af_packet:IF|tap:NAME|dpdk:DEVARGS
//! [--ip ADDR/PREFIX] [--gateway ADDR] [--stack KEY=VALUE]... [--eal "ARGS"]]
//! [--rpc-socket PATH] [--rpc-group GROUP]
//! [--cores LIST] [--mode poll|adaptive] [--config FILE] [--mem-size MB] [--log LEVEL]`
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use smoltcp::wire::IpCidr;

use crate::net::ustack::StackConfig;
use crate::reactor::Mode;

/// Where the RPC socket lives unless `--rpc-socket` says otherwise.
pub const DEFAULT_RPC_SOCKET: &str = "/var/tmp/iscsi-tgt.sock";
/// iscsi-scstd listens on every address by default; so do we.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3260";

pub const USAGE: &str = "\
usage: iscsi-tgt [OPTIONS]

  --listen ADDR:PORT    portal to listen on; repeat for several [0.0.0.0:3260]
  --net NET             the network: kernel (the kernel's TCP), af_packet:IFNAME,
                        tap:NAME or dpdk:DEVARGS (the userspace TCP stack on that interface
                        or DPDK port, one queue per reactor; DEVARGS is a PCI address bound
                        to vfio-pci or a vdev, net_af_packet0,iface=eth1) [kernel]
  --ip ADDR/PREFIX      the userspace stack's address (required with a userspace --net)
  --gateway ADDR        the userspace stack's default route
  --stack KEY=VALUE     a userspace stack setting; repeat for several: rx_buf, tx_buf
                        (bytes, 262144..4194304) [1048576], nagle (0|1) [0], ack_delay_us
                        [0: off], backlog [4], max_half_open [64], syn_timeout_ms [5000],
                        linger_ms [10000]
  --eal ARGS            further DPDK EAL arguments with --net dpdk: (--no-huge, -m MB,
                        --lcores ...); repeat for more
  --rpc-socket PATH     JSON-RPC Unix socket [/var/tmp/iscsi-tgt.sock]
  --rpc-group GROUP     make the socket 0660 and owned by this group (a name or a gid)
                        [0600: only the daemon's user]
  --cores LIST          cores to run reactors on: 1,2 or 0-3 or a mask 0x6 [first allowed core]
  -m MASK               the same as a hexadecimal core mask
  --mode poll|adaptive  poll spins; adaptive sleeps in epoll when idle [adaptive]
  --config FILE         configuration to load at start (the save_config format)
  --mem-size MB         size of the DMA buffer pool [512]
  --coalesce-us US      how long a connection's responses may wait for more to join them
                        while its commands arrive less than US apart (0: never) [20]
  --log LEVEL           error, warn, info, debug or trace [info]
  -h, --help            this text
  -V, --version         print the version
";

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub listen: Vec<SocketAddr>,
    pub net: NetOptions,
    pub rpc_socket: PathBuf,
    /// The group (name or gid) that may use the RPC socket besides the daemon's user.
    pub rpc_group: Option<String>,
    pub cores: Option<Vec<usize>>,
    pub mode: Mode,
    pub config: Option<PathBuf>,
    pub mem_size_mb: usize,
    /// Response coalescing (see [`crate::iscsi::engine::DEFAULT_COALESCE_US`]).
    pub coalesce_us: u64,
    pub log_level: String,
}

/// Which network the portals listen on (the initiator's: which it connects over).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetSpec {
    /// The kernel's TCP.
    #[default]
    Kernel,
    /// The userspace stack over AF_PACKET on an interface.
    AfPacket(String),
    /// The userspace stack over a TAP interface.
    Tap(String),
    /// The userspace stack over a DPDK port: a PCI address or a vdev with its arguments.
    Dpdk(String),
}

impl NetSpec {
    pub fn is_userspace(&self) -> bool {
        !matches!(self, NetSpec::Kernel)
    }
}

fn parse_net(s: &str) -> Result<NetSpec, String> {
    let named = |kind: &str, name: &str| {
        // IFNAMSIZ is 16 with the terminating NUL.
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            Err(format!(
                "--net {kind}: needs an interface name of 1 to 15 characters, not {name:?}"
            ))
        } else {
            Ok(name.to_string())
        }
    };
    match s.split_once(':') {
        None if s == "kernel" => Ok(NetSpec::Kernel),
        Some(("af_packet", n)) => Ok(NetSpec::AfPacket(named("af_packet", n)?)),
        Some(("tap", n)) => Ok(NetSpec::Tap(named("tap", n)?)),
        Some(("dpdk", d)) => {
            if d.is_empty() || d.starts_with(',') || d.contains([' ', '\0']) {
                Err(format!(
                    "--net dpdk: needs a PCI address or a vdev with its arguments (dpdk:0000:01:00.0, dpdk:net_af_packet0,iface=eth1), not {d:?}"
                ))
            } else {
                Ok(NetSpec::Dpdk(d.to_string()))
            }
        }
        _ => Err(format!(
            "--net must be kernel, af_packet:IFNAME, tap:NAME or dpdk:DEVARGS, not {s:?}"
        )),
    }
}

/// The network options the daemon and iscsi-bench share: `--net`, and for the userspace
/// stack `--ip`, `--gateway`, `--stack` and (DPDK) `--eal`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetOptions {
    pub spec: NetSpec,
    /// The userspace stack's address and prefix length, gateway and settings.
    pub ip: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub stack: Vec<(String, String)>,
    /// Further EAL arguments (`--net dpdk:` only).
    pub eal: Vec<String>,
}

impl NetOptions {
    /// Takes `flag` if it is one of the network options, with its value from `value` (given
    /// the flag, for its message when the value is missing): `None` when it is not one.
    pub fn parse_flag(
        &mut self,
        flag: &str,
        value: impl FnOnce(&str) -> Result<String, String>,
    ) -> Option<Result<(), String>> {
        if !matches!(flag, "--net" | "--ip" | "--gateway" | "--stack" | "--eal") {
            return None;
        }
        let take = || -> Result<(), String> {
            let v = value(flag)?;
            match flag {
                "--net" => self.spec = parse_net(&v)?,
                "--ip" => self.ip = Some(parse_cidr(&v)?),
                "--gateway" => {
                    self.gateway = Some(
                        v.parse()
                            .map_err(|_| format!("--gateway must be an IP address, not {v:?}"))?,
                    )
                }
                "--eal" => {
                    if v.trim().is_empty() {
                        return Err(
                            "--eal needs the EAL arguments, as one word: --eal \"--no-huge -m 512\""
                                .into(),
                        );
                    }
                    self.eal.extend(v.split_whitespace().map(str::to_string));
                }
                _ => {
                    let (k, val) = v
                        .split_once('=')
                        .ok_or_else(|| format!("--stack must be KEY=VALUE, not {v:?}"))?;
                    self.stack.push((k.to_string(), val.to_string()));
                }
            }
            Ok(())
        };
        Some(take())
    }

    /// Checks that the options go together once all are parsed.
    pub fn check(&self) -> Result<(), String> {
        if !self.eal.is_empty() && !matches!(self.spec, NetSpec::Dpdk(_)) {
            return Err("--eal passes arguments to DPDK: add --net dpdk:DEVARGS".into());
        }
        if self.spec.is_userspace() {
            if self.ip.is_none() {
                return Err(
                    "--net af_packet, tap and dpdk need the stack's address: --ip ADDR/PREFIX"
                        .into(),
                );
            }
        } else if self.ip.is_some() || self.gateway.is_some() || !self.stack.is_empty() {
            return Err("--ip, --gateway and --stack set the userspace stack: add --net af_packet:IF, tap:NAME or dpdk:DEVARGS".into());
        }
        Ok(())
    }

    /// The userspace stack's configuration: `--ip`, `--gateway` and every `--stack` setting.
    pub fn stack_config(&self) -> Result<StackConfig, String> {
        let Some((ip, prefix)) = self.ip else {
            return Err("the userspace stack needs --ip ADDR/PREFIX".into());
        };
        let mut cfg = StackConfig::new(IpCidr::new(ip.into(), prefix), self.gateway);
        for (k, v) in &self.stack {
            cfg.set(k, v)?;
        }
        Ok(cfg)
    }
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("--ip must be ADDRESS/PREFIX (10.0.0.2/24, fd00::2/64), not {s:?}");
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    let p: u8 = p.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if p > max || ip.is_unspecified() || ip.is_multicast() {
        return Err(bad());
    }
    Ok((ip, p))
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Box<Options>),
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
        net: NetOptions::default(),
        rpc_socket: PathBuf::from(DEFAULT_RPC_SOCKET),
        rpc_group: None,
        cores: None,
        mode: Mode::Adaptive,
        config: None,
        mem_size_mb: 512,
        coalesce_us: crate::iscsi::engine::DEFAULT_COALESCE_US,
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
        if let Some(r) = o.net.parse_flag(&flag, &mut value) {
            r?;
            continue;
        }
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
            "--coalesce-us" => {
                let v = value("--coalesce-us")?;
                o.coalesce_us = v.parse().ok().filter(|n| *n <= 1000).ok_or_else(|| {
                    format!(
                        "--coalesce-us must be a number of microseconds from 0 to 1000, not {v:?}"
                    )
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
    o.net.check()?;
    Ok(Command::Run(Box::new(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, String> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(o) => Ok(*o),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn userspace_network_options() {
        let o = run(&[
            "--net",
            "af_packet:veth1",
            "--ip",
            "10.1.0.2/24",
            "--gateway=10.1.0.1",
            "--stack",
            "rx_buf=524288",
        ])
        .unwrap();
        assert_eq!(o.net.spec, NetSpec::AfPacket("veth1".into()));
        assert_eq!(o.net.ip, Some(("10.1.0.2".parse().unwrap(), 24)));
        assert_eq!(o.net.gateway, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(o.net.stack, vec![("rx_buf".into(), "524288".into())]);
        let cfg = o.net.stack_config().unwrap();
        assert_eq!(cfg.rx_buf, 524288);
        assert_eq!(cfg.ip.to_string(), "10.1.0.2/24");
        let o = run(&["--net=tap:tgt0", "--ip", "fd00::2/64"]).unwrap();
        assert_eq!(o.net.spec, NetSpec::Tap("tgt0".into()));
        assert_eq!(run(&["--net", "kernel"]).unwrap().net.spec, NetSpec::Kernel);
        let o = run(&[
            "--net",
            "dpdk:net_af_packet0,iface=v,qpairs=2",
            "--ip",
            "10.0.0.1/24",
            "--eal",
            "--no-huge -m 256",
            "--eal",
            "--lcores=0@1",
        ])
        .unwrap();
        assert_eq!(
            o.net.spec,
            NetSpec::Dpdk("net_af_packet0,iface=v,qpairs=2".into())
        );
        assert_eq!(o.net.eal, ["--no-huge", "-m", "256", "--lcores=0@1"]);
        for (args, why) in [
            (&["--net", "vpp:0"][..], "--net must be"),
            (&["--net", "dpdk:"], "PCI address or a vdev"),
            (
                &["--net", "dpdk:,iface=x", "--ip", "10.0.0.1/24"],
                "PCI address",
            ),
            (&["--eal", "--no-huge"], "add --net dpdk"),
            (
                &[
                    "--net",
                    "dpdk:net_tap0",
                    "--ip",
                    "10.0.0.1/24",
                    "--eal",
                    " ",
                ],
                "--eal needs",
            ),
            (&["--net", "tap:"], "interface name"),
            (
                &["--net", "af_packet:averyveryverylongname"],
                "interface name",
            ),
            (&["--net", "tap:t0"], "need the stack's address"),
            (&["--net", "tap:t0", "--ip", "10.0.0.1"], "ADDRESS/PREFIX"),
            (
                &["--net", "tap:t0", "--ip", "10.0.0.1/33"],
                "ADDRESS/PREFIX",
            ),
            (&["--ip", "10.0.0.1/24"], "add --net"),
            (
                &["--net", "tap:t0", "--ip", "10.0.0.1/24", "--stack", "x"],
                "KEY=VALUE",
            ),
            (
                &["--net", "tap:t0", "--ip", "10.0.0.1/24", "--gateway", "x"],
                "--gateway",
            ),
        ] {
            let e = run(args).unwrap_err();
            assert!(e.contains(why), "{args:?}: {e}");
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

//! The iscsi-tgt daemon: parses its arguments, binds the portals and the RPC socket, starts one
//! reactor per core, loads the initial configuration and runs until SIGINT or SIGTERM.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{error, info};

use iscsi_tgt::cli::{self, Command, NetSpec, Options};
use iscsi_tgt::iscsi::config::Publisher;
use iscsi_tgt::iscsi::engine::{Engine, Shared};
use iscsi_tgt::iscsi::registry::Registry;
use iscsi_tgt::mgmt::{Hooks, Mgmt, NetView};
use iscsi_tgt::net::ustack::dev::af_packet::AfPacketDev;
use iscsi_tgt::net::ustack::dev::tap::TapDev;
use iscsi_tgt::net::ustack::dev::NetDev;
use iscsi_tgt::net::ustack::UstackNet;
use iscsi_tgt::{env, net, reactor, rpc, util};

fn main() -> ExitCode {
    let cmd = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iscsi-tgt: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(1);
        }
    };
    let opts = match cmd {
        Command::Help => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("iscsi-tgt {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Run(o) => *o,
    };
    util::init_logging(&opts.log_level);
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("iscsi-tgt: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(opts: Options) -> Result<(), String> {
    // Before anything starts: an unknown group is a mistake to hear about at once.
    let mut rpc_opts = rpc::Options {
        group: opts
            .rpc_group
            .as_deref()
            .map(rpc::group_id)
            .transpose()
            .map_err(|e| format!("--rpc-group: {e}"))?,
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot handle signals: {e}"))?;
    }

    // A descriptor per connection: take what the hard limit allows, and share it out once
    // the pool, portals and reactors hold theirs.
    let fd_limit = util::raise_fd_limit().map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;

    let cores = match &opts.cores {
        Some(c) => c.clone(),
        None => vec![reactor::first_allowed_core()
            .map_err(|e| format!("cannot read the CPU affinity: {e}"))?],
    };
    // With DPDK the EAL comes first: the buffer pool is carved from its heap, so that the
    // pool and the mbufs share one hugepage budget.
    let memory = start_dpdk(&opts, cores[0])?;
    env::init(env::PoolConfig {
        mem_size_mb: opts.mem_size_mb,
        memory,
        ..Default::default()
    })
    .map_err(|e| format!("cannot set up the buffer pool: {e}"))?;

    // Portals first: a taken port is a clear error before anything else starts.
    let (network, portals) = open_network(&opts, cores.len())?;
    for a in &portals {
        info!("listening on {a}");
    }

    let publisher = Publisher::new();
    let registry = Registry::new();
    // Each reactor holds an epoll set, an eventfd and an io_uring; count them as open.
    let open = util::open_fds().unwrap_or(0) + 3 * cores.len() as u64;
    let budget = util::FdBudget::new(fd_limit, open);
    info!(
        "file descriptors: limit {}, {} open, room for {} connections and {} RPC clients",
        budget.limit, budget.open, budget.connections, budget.rpc_clients
    );
    // The RPC server takes no more clients than its share of the descriptors.
    rpc_opts.limits.max_clients = budget.rpc_clients;
    let shared = Shared::new(
        publisher.clone(),
        registry.clone(),
        portals,
        cores.len(),
        budget.connections,
    );
    shared
        .coalesce_us
        .store(opts.coalesce_us, std::sync::atomic::Ordering::Relaxed);

    let reactors = reactor::spawn_group(&cores, opts.mode, &*network, {
        let shared = shared.clone();
        move |id, peers, group, now| Engine::new(id, shared.clone(), peers, group, now)
    })
    .map_err(|e| format!("cannot start the reactors: {e}"))?;
    info!(
        "{} reactor(s) on core(s) {:?}, mode {:?}",
        cores.len(),
        cores,
        opts.mode
    );

    let stats = reactors.stats();
    let hooks = Hooks {
        reactors: Box::new(move || stats.iter().map(|s| s.snapshot()).collect()),
        sgv: Box::new(|| {
            let v = env::stats().snapshot();
            #[cfg(feature = "dpdk")]
            let v = [v, env::dpdk::sgv_attrs()].concat();
            v
        }),
        net: Box::new({
            let network = network.clone();
            move || NetView {
                attrs: network.describe(),
                reactors: network.counters(),
                connections: network
                    .connections()
                    .into_iter()
                    .map(|c| {
                        vec![
                            ("peer".into(), c.peer),
                            ("local".into(), c.local),
                            ("state".into(), c.state),
                            ("send_queue".into(), c.send_queue.to_string()),
                            ("recv_queue".into(), c.recv_queue.to_string()),
                            ("recv_window".into(), c.recv_window.to_string()),
                            ("send_window".into(), c.send_window.to_string()),
                            ("retransmits".into(), c.retransmits.to_string()),
                        ]
                    })
                    .collect(),
            }
        }),
        portals: Box::new({
            let shared = shared.clone();
            move || {
                vec![
                    ("connections".into(), shared.connections().to_string()),
                    (
                        "refused_connections".into(),
                        shared.refused.load(Ordering::Relaxed).to_string(),
                    ),
                ]
            }
        }),
    };
    let mgmt = Mgmt::new(publisher.clone(), registry.clone(), hooks);
    if let Some(path) = &opts.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
        mgmt.load_config(&cfg)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        info!("loaded {}", path.display());
    }

    let server = match rpc::Server::start(&opts.rpc_socket, mgmt.clone(), &rpc_opts) {
        Ok(s) => s,
        Err(e) => {
            reactors.stop();
            return Err(format!(
                "cannot open the RPC socket {}: {e}",
                opts.rpc_socket.display()
            ));
        }
    };
    info!("JSON-RPC on {}", opts.rpc_socket.display());

    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    info!("shutting down");
    server.shutdown();
    reactors.stop();
    info!("stopped");
    Ok(())
}

/// The network `--net` names, with its portals bound (kernel TCP) or its device queues open
/// (one per reactor), so that a taken port or a missing interface is an error at start.
fn open_network(
    opts: &Options,
    reactors: usize,
) -> Result<(Arc<dyn net::Net>, Vec<std::net::SocketAddr>), String> {
    match &opts.net.spec {
        NetSpec::Kernel => {
            let k = net::posix::KernelNet::new(&opts.listen, reactors)
                .map_err(|e| format!("cannot listen on {e}"))?;
            let portals = k.portals().to_vec();
            Ok((Arc::new(k), portals))
        }
        NetSpec::AfPacket(ifname) => {
            // One fanout group per process: its id only has to differ from other programs'
            // groups on the same interface.
            let fanout = (std::process::id() & 0xffff) as u16;
            userspace("af_packet", ifname, opts, reactors, |q| {
                AfPacketDev::open(ifname, q, reactors, fanout)
            })
        }
        NetSpec::Tap(name) => userspace("tap", name, opts, reactors, |q| {
            TapDev::open(name, q, reactors)
        }),
        #[cfg(feature = "dpdk")]
        NetSpec::Dpdk(devargs) => {
            use iscsi_tgt::net::ustack::dev::dpdk;
            let mut devs = dpdk::open(devargs, reactors)?.into_iter();
            userspace("dpdk", devargs, opts, reactors, |_| {
                devs.next()
                    .ok_or_else(|| std::io::Error::other("fewer queues than reactors"))
            })
        }
        #[cfg(not(feature = "dpdk"))]
        NetSpec::Dpdk(_) => Err(no_dpdk()),
    }
}

#[cfg(not(feature = "dpdk"))]
fn no_dpdk() -> String {
    "--net dpdk: this build has no DPDK; build with `cargo build --release --features dpdk`".into()
}

/// With `--net dpdk:`, initialises the EAL and returns where the buffer pool's memory comes
/// from; otherwise nothing.
#[cfg(feature = "dpdk")]
fn start_dpdk(opts: &Options, main_core: usize) -> Result<Option<env::MemorySource>, String> {
    let NetSpec::Dpdk(devargs) = &opts.net.spec else {
        return Ok(None);
    };
    let args = iscsi_tgt::net::ustack::dev::dpdk::eal_args(
        "iscsi-tgt",
        devargs,
        main_core,
        opts.mem_size_mb,
        &opts.net.eal,
    );
    env::dpdk::init(&args)?;
    Ok(Some(env::dpdk::region))
}

#[cfg(not(feature = "dpdk"))]
fn start_dpdk(opts: &Options, _main_core: usize) -> Result<Option<env::MemorySource>, String> {
    match opts.net.spec {
        NetSpec::Dpdk(_) => Err(no_dpdk()),
        _ => Ok(None),
    }
}

/// The userspace stack over `reactors` queues of one device.
fn userspace<D: NetDev + 'static>(
    kind: &str,
    ifname: &str,
    opts: &Options,
    reactors: usize,
    mut open: impl FnMut(usize) -> std::io::Result<D>,
) -> Result<(Arc<dyn net::Net>, Vec<std::net::SocketAddr>), String> {
    let cfg = opts.net.stack_config()?;
    let addr = cfg.ip;
    let devices = (0..reactors)
        .map(|q| open(q).map_err(|e| format!("cannot open {kind} queue {q} of {ifname}: {e}")))
        .collect::<Result<Vec<D>, String>>()?;
    let u = UstackNet::new(kind, ifname, cfg, &opts.listen, devices)
        .map_err(|e| format!("cannot start the userspace stack on {ifname}: {e}"))?;
    info!("userspace TCP on {kind}:{ifname}, {addr}, {reactors} queue(s)");
    Ok((Arc::new(u), opts.listen.clone()))
}

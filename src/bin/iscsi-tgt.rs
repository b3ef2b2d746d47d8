//! The iscsi-tgt daemon: parses its arguments, binds the portals and the RPC socket, starts one
//! reactor per core, loads the initial configuration and runs until SIGINT or SIGTERM.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{error, info};

use iscsi_tgt::cli::{self, Command, Options};
use iscsi_tgt::iscsi::config::Publisher;
use iscsi_tgt::iscsi::engine::{Engine, Shared};
use iscsi_tgt::iscsi::registry::Registry;
use iscsi_tgt::mgmt::{Hooks, Mgmt};
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
        Command::Run(o) => o,
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

    env::init(env::PoolConfig {
        mem_size_mb: opts.mem_size_mb,
        ..Default::default()
    })
    .map_err(|e| format!("cannot set up the buffer pool: {e}"))?;

    // Portals first: a taken port is a clear error before anything else starts.
    let cores = match &opts.cores {
        Some(c) => c.clone(),
        None => vec![reactor::first_allowed_core()
            .map_err(|e| format!("cannot read the CPU affinity: {e}"))?],
    };
    let kernel = net::posix::KernelNet::new(&opts.listen, cores.len())
        .map_err(|e| format!("cannot listen on {e}"))?;
    let portals = kernel.portals().to_vec();
    for a in &portals {
        info!("listening on {a}");
    }
    let network: Arc<dyn net::Net> = Arc::new(kernel);

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
        sgv: Box::new(|| env::stats().snapshot()),
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

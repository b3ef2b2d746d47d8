//! What the sessions connect over: the kernel's TCP or the userspace stack's client (`--net`).

use std::time::Duration;

use iscsi_tgt::cli::{NetOptions, NetSpec};
use iscsi_tgt::initiator::transport::tcp_connect;
use iscsi_tgt::initiator::{Initiator, Transport};
use iscsi_tgt::net::ustack::client::ClientStack;
use iscsi_tgt::net::ustack::dev::af_packet::AfPacketDev;
use iscsi_tgt::net::ustack::dev::tap::TapDev;
use iscsi_tgt::net::ustack::dev::NetDev;

/// A session's connection, over whichever network `--net` names.
pub type Conn = Box<dyn Transport + Send>;
pub type Ini = Initiator<Conn>;

/// What the sessions connect over.
pub enum Network {
    Kernel,
    AfPacket(ClientStack<AfPacketDev>),
    Tap(ClientStack<TapDev>),
    #[cfg(feature = "dpdk")]
    Dpdk(ClientStack<iscsi_tgt::net::ustack::dev::dpdk::DpdkDev>),
}

/// How long the program waits at its end for its connections' FIN handshakes.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

impl Network {
    /// Opens the network `--net` names: for the userspace stack, one queue of the interface.
    pub fn open(n: &NetOptions) -> Result<Network, String> {
        fn stack<D: NetDev>(
            n: &NetOptions,
            what: &str,
            dev: std::io::Result<D>,
        ) -> Result<ClientStack<D>, String> {
            let cfg = n.stack_config()?;
            let dev = dev.map_err(|e| format!("cannot open {what}: {e}"))?;
            ClientStack::new(dev, cfg)
                .map_err(|e| format!("cannot start the userspace stack on {what}: {e}"))
        }
        Ok(match &n.spec {
            NetSpec::Kernel => Network::Kernel,
            NetSpec::AfPacket(ifname) => {
                // The fanout group's id only has to differ from other programs' on the
                // interface.
                let fanout = (std::process::id() & 0xffff) as u16;
                let dev = AfPacketDev::open(ifname, 0, 1, fanout);
                Network::AfPacket(stack(n, &format!("af_packet:{ifname}"), dev)?)
            }
            NetSpec::Tap(name) => {
                let dev = TapDev::open(name, 0, 1);
                Network::Tap(stack(n, &format!("tap:{name}"), dev)?)
            }
            #[cfg(feature = "dpdk")]
            NetSpec::Dpdk(devargs) => {
                use iscsi_tgt::net::ustack::dev::dpdk;
                // The EAL's main lcore on the core this process may run on first (taskset).
                let core = iscsi_tgt::reactor::first_allowed_core()
                    .map_err(|e| format!("cannot read the CPU affinity: {e}"))?;
                let args = dpdk::eal_args("iscsi-bench", devargs, core, 0, &n.eal);
                iscsi_tgt::env::dpdk::init(&args)?;
                let dev = dpdk::open(devargs, 1)?
                    .pop()
                    .ok_or_else(|| format!("{devargs}: no queue"))?;
                Network::Dpdk(stack(n, &format!("dpdk:{devargs}"), Ok(dev))?)
            }
            #[cfg(not(feature = "dpdk"))]
            NetSpec::Dpdk(_) => {
                return Err(
                    "--net dpdk: this build has no DPDK; build with `cargo build --release --features dpdk`"
                        .into(),
                )
            }
        })
    }

    pub fn connect(&self, portal: &str) -> Result<Conn, String> {
        let addr = || {
            portal.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("--portal must be ADDRESS:PORT on the userspace stack, not {portal:?}")
            })
        };
        let c: Conn = match self {
            Network::Kernel => Box::new(tcp_connect(portal).map_err(|e| e.to_string())?),
            Network::AfPacket(s) => Box::new(s.connect(addr()?).map_err(|e| e.to_string())?),
            Network::Tap(s) => Box::new(s.connect(addr()?).map_err(|e| e.to_string())?),
            #[cfg(feature = "dpdk")]
            Network::Dpdk(s) => Box::new(s.connect(addr()?).map_err(|e| e.to_string())?),
        };
        Ok(c)
    }

    /// Lets the userspace stack finish closing what the sessions closed.
    pub fn finish(&self) {
        match self {
            Network::Kernel => {}
            Network::AfPacket(s) => {
                s.finish(CLOSE_WAIT);
            }
            Network::Tap(s) => {
                s.finish(CLOSE_WAIT);
            }
            #[cfg(feature = "dpdk")]
            Network::Dpdk(s) => {
                s.finish(CLOSE_WAIT);
            }
        }
    }
}

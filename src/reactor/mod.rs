//! Reactors: one OS thread per core, pinned, each running its poller to completion in a loop
//! (SPDK's reactor). Cross-reactor messages travel on channels; a reactor that sleeps (adaptive
//! mode) is woken by an eventfd write only when it actually sleeps.
//!
//! Every reactor counts the time of iterations that did work (busy) and of those that did not
//! or slept (idle), like SPDK's busy/idle TSC, so cycles per I/O can be measured even while
//! it spins.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::net::{Net, SockGroup, Wake};

/// How a reactor waits when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Spin: lowest latency, the core is busy all the time.
    Poll,
    /// Spin while there is work; after an idle spell sleep in epoll until a socket is ready, a
    /// message arrives or a timer is due.
    Adaptive,
}

/// Idle spell before an adaptive reactor sleeps.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_micros(200);
/// Longest sleep when no timer is due (a safety net; wake-ups are event driven).
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// What a poller gets on each call.
pub struct Ctx {
    id: usize,
    now: Instant,
}

impl Ctx {
    pub fn now(&self) -> Instant {
        self.now
    }
    pub fn id(&self) -> usize {
        self.id
    }
}

/// The work a reactor runs.
pub trait Poller {
    type Msg: Send + 'static;
    /// One iteration; returns whether anything was done.
    fn poll(&mut self, ctx: &mut Ctx) -> bool;
    fn handle(&mut self, msg: Self::Msg, ctx: &mut Ctx);
    /// The earliest timer the poller needs, bounding an adaptive sleep.
    fn next_deadline(&mut self, now: Instant) -> Option<Instant>;
    /// Asked to stop: returns true once everything is closed.
    fn shutdown(&mut self, ctx: &mut Ctx) -> bool;
    /// Sleeps until one of the poller's sockets is ready, the reactor is woken, or `timeout`.
    /// Returns whether an event (not the timeout) ended the sleep.
    fn sleep(&mut self, timeout: Duration) -> bool;
}

/// Adds `n` to a counter of [`ReactorStats`]: only the reactor's own thread writes them, so a
/// load and a store keep them exact without a locked instruction on every iteration.
fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Busy/idle accounting of one reactor, readable from any thread (written by the reactor's
/// thread alone).
#[derive(Debug, Default)]
pub struct ReactorStats {
    pub id: usize,
    pub core: usize,
    pub mode: String,
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub iterations: AtomicU64,
    pub sleeps: AtomicU64,
    /// Sleeps ended by an event (a socket, a new connection, a message) before their timeout.
    pub wakeups: AtomicU64,
    pub messages: AtomicU64,
}

impl ReactorStats {
    /// Name/value pairs for the management tree.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let busy = self.busy_ns.load(Ordering::Relaxed);
        let idle = self.idle_ns.load(Ordering::Relaxed);
        vec![
            ("core".into(), self.core.to_string()),
            ("mode".into(), self.mode.clone()),
            ("busy_ns".into(), busy.to_string()),
            ("idle_ns".into(), idle.to_string()),
            (
                "iterations".into(),
                self.iterations.load(Ordering::Relaxed).to_string(),
            ),
            (
                "sleeps".into(),
                self.sleeps.load(Ordering::Relaxed).to_string(),
            ),
            (
                "wakeups".into(),
                self.wakeups.load(Ordering::Relaxed).to_string(),
            ),
            (
                "messages".into(),
                self.messages.load(Ordering::Relaxed).to_string(),
            ),
        ]
    }
}

/// Sends messages to a reactor from any thread.
pub struct ReactorHandle<M> {
    tx: Sender<M>,
    waker: Arc<dyn Wake>,
    sleeping: Arc<AtomicBool>,
}

impl<M> Clone for ReactorHandle<M> {
    fn clone(&self) -> Self {
        ReactorHandle {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
            sleeping: self.sleeping.clone(),
        }
    }
}

impl<M: Send> ReactorHandle<M> {
    /// Queues `m`; hands it back if the reactor is gone.
    pub fn send(&self, m: M) -> Result<(), M> {
        self.tx.send(m).map_err(|e| e.0)?;
        if self.sleeping.load(Ordering::Acquire) {
            self.waker.wake();
        }
        Ok(())
    }
}

/// Errors starting reactors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ReactorError {
    /// cannot pin a reactor to core {core}: {errno}
    Pin {
        core: usize,
        errno: nix::errno::Errno,
    },
    /// core {0} is not among the cores this process may run on
    CoreNotAllowed(usize),
    /// cannot create the reactor's socket group: {0}
    Group(std::io::Error),
    /// cannot start a reactor thread: {0}
    Thread(std::io::Error),
    /// a reactor failed while starting
    Start,
}

/// The first core this process may run on.
pub fn first_allowed_core() -> Result<usize, nix::errno::Errno> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    (0..nix::sched::CpuSet::count())
        .find(|&c| set.is_set(c).unwrap_or(false))
        .ok_or(nix::errno::Errno::EINVAL)
}

fn pin(core: usize) -> Result<(), ReactorError> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map_err(|errno| ReactorError::Pin { core, errno })?;
    if !allowed.is_set(core).unwrap_or(false) {
        return Err(ReactorError::CoreNotAllowed(core));
    }
    let mut set = nix::sched::CpuSet::new();
    set.set(core)
        .map_err(|errno| ReactorError::Pin { core, errno })?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|errno| ReactorError::Pin { core, errno })
}

/// A group of running reactors.
pub struct Reactors<M> {
    handles: Vec<ReactorHandle<M>>,
    stats: Vec<Arc<ReactorStats>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl<M: Send + 'static> Reactors<M> {
    pub fn handles(&self) -> &[ReactorHandle<M>] {
        &self.handles
    }

    pub fn stats(&self) -> Vec<Arc<ReactorStats>> {
        self.stats.clone()
    }

    /// Asks every reactor to shut its poller down and waits for the threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for h in &self.handles {
            h.waker.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts one reactor per core. `make(id, peers, group, now)` builds each poller on its own
/// thread, with the socket group `net` made for it.
pub fn spawn_group<P, F>(
    cores: &[usize],
    mode: Mode,
    net: &dyn Net,
    make: F,
) -> Result<Reactors<P::Msg>, ReactorError>
where
    P: Poller + 'static,
    F: Fn(usize, Vec<ReactorHandle<P::Msg>>, Box<dyn SockGroup>, Instant) -> P
        + Send
        + Sync
        + 'static,
{
    let make = Arc::new(make);
    let stop = Arc::new(AtomicBool::new(false));
    let mut groups = Vec::new();
    let mut handles = Vec::new();
    let mut rxs: Vec<Receiver<P::Msg>> = Vec::new();
    let mut sleeps = Vec::new();
    for id in 0..cores.len() {
        let g = net.group(id).map_err(ReactorError::Group)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let sleeping = Arc::new(AtomicBool::new(false));
        handles.push(ReactorHandle {
            tx,
            waker: g.waker(),
            sleeping: sleeping.clone(),
        });
        groups.push(g);
        rxs.push(rx);
        sleeps.push(sleeping);
    }
    let mut threads = Vec::new();
    let mut stats = Vec::new();
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<Result<(), ReactorError>>();
    for (id, ((&core, group), (rx, sleeping))) in cores
        .iter()
        .zip(groups)
        .zip(rxs.into_iter().zip(sleeps))
        .enumerate()
    {
        let st = Arc::new(ReactorStats {
            id,
            core,
            mode: match mode {
                Mode::Poll => "poll".into(),
                Mode::Adaptive => "adaptive".into(),
            },
            ..Default::default()
        });
        stats.push(st.clone());
        let peers = handles.clone();
        let make = make.clone();
        let stop = stop.clone();
        let ready = ready_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("reactor_{core}"))
            .spawn(move || {
                if let Err(e) = pin(core) {
                    let _ = ready.send(Err(e));
                    return;
                }
                let _ = ready.send(Ok(()));
                let poller = make(id, peers, group, Instant::now());
                run(id, mode, poller, rx, sleeping, stop, st);
            })
            .map_err(ReactorError::Thread)?;
        threads.push(t);
    }
    drop(ready_tx);
    let mut err = None;
    for _ in cores {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => err = Some(e),
            Err(_) => err = Some(ReactorError::Start),
        }
    }
    let reactors = Reactors {
        handles,
        stats,
        stop,
        threads,
    };
    if let Some(e) = err {
        reactors.stop();
        return Err(e);
    }
    Ok(reactors)
}

#[allow(clippy::too_many_arguments)]
fn run<P: Poller>(
    id: usize,
    mode: Mode,
    mut poller: P,
    rx: Receiver<P::Msg>,
    sleeping: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    st: Arc<ReactorStats>,
) {
    let mut ctx = Ctx {
        id,
        now: Instant::now(),
    };
    let mut idle_since: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        // The clock is read once per iteration: the end of one is the start of the next.
        ctx.now = last;
        let mut did = false;
        while let Ok(m) = rx.try_recv() {
            poller.handle(m, &mut ctx);
            add(&st.messages, 1);
            did = true;
        }
        did |= poller.poll(&mut ctx);
        if stop.load(Ordering::Acquire) && poller.shutdown(&mut ctx) {
            break;
        }
        let end = Instant::now();
        let spent = end.duration_since(last).as_nanos() as u64;
        last = end;
        add(&st.iterations, 1);
        if did {
            add(&st.busy_ns, spent);
            idle_since = None;
            continue;
        }
        add(&st.idle_ns, spent);
        if mode == Mode::Poll || stop.load(Ordering::Acquire) {
            continue;
        }
        let since = *idle_since.get_or_insert(end);
        if end.duration_since(since) < IDLE_BEFORE_SLEEP {
            continue;
        }
        let timeout = match poller.next_deadline(end) {
            Some(d) => d.saturating_duration_since(end).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        sleeping.store(true, Ordering::Release);
        // A message sent between the flag store and the sleep still wakes us through the
        // eventfd; one sent before it is seen here.
        if rx.is_empty() && !stop.load(Ordering::Acquire) {
            add(&st.sleeps, 1);
            if poller.sleep(timeout) {
                add(&st.wakeups, 1);
            }
        }
        sleeping.store(false, Ordering::Release);
        let woke = Instant::now();
        add(&st.idle_ns, woke.duration_since(last).as_nanos() as u64);
        last = woke;
    }
}

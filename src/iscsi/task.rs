//! The commands of one session: a slab of task slots reused without allocation, looked up by
//! ITT (from the initiator) or by Target Transfer Tag (our R2Ts).
#![forbid(unsafe_code)]

use std::collections::HashMap;

use crate::iscsi::ordering::Entry;
use crate::scsi::ScsiTask;

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting for Data-Out (immediate, unsolicited or solicited by R2T).
    ReceivingData,
    /// Admitted, but the buffer pool was exhausted: parked on the connection's list of
    /// commands waiting for a buffer, retried every reactor pass.
    WaitingBuffer,
    /// All its data is in, but older commands hold it back (task attributes, SAM-5 §8.6):
    /// it runs when the connection's task set lets it start.
    Dormant,
    /// Handed to the SCSI core; its completion comes from the backend.
    Executing,
    /// Data-In and/or the response are queued for sending.
    Responding,
    /// Aborted by task management or logout while the backend still owns its buffer: the
    /// completion is dropped silently.
    Aborted,
}

/// One outstanding R2T (RFC 7143 §11.8).
#[derive(Debug, Clone, Copy)]
pub struct R2t {
    pub r2t_sn: u32,
    pub offset: u32,
    pub len: u32,
    pub received: u32,
    pub next_data_sn: u32,
}

pub struct Task {
    pub itt: u32,
    pub cmd_sn: u32,
    pub lun: u64,
    /// iSCSI ExpectedDataTransferLength.
    pub edtl: u32,
    /// The transfer the CDB asks for (SCSI's "SPDTL").
    pub spdtl: u32,
    pub write: bool,
    pub read: bool,
    pub state: TaskState,
    pub scsi: ScsiTask,
    /// Bytes the initiator sends without R2T (immediate plus unsolicited Data-Out).
    pub unsolicited_len: u32,
    pub unsolicited_received: u32,
    pub unsolicited_next_data_sn: u32,
    /// The total the initiator will send: the unsolicited part plus what we solicit.
    pub expected_out: u32,
    /// Data-Out bytes received so far (all sequences).
    pub received: u32,
    /// Next offset to solicit with an R2T.
    pub next_r2t_offset: u32,
    /// Bytes of Data-Out we want (min(EDTL, SPDTL)).
    pub want_out: u32,
    pub next_r2t_sn: u32,
    pub r2ts: Vec<R2t>,
    /// Some of its Data-Out failed the data digest: it ends with CHECK CONDITION once all
    /// data has arrived, and nothing is written (RFC 7143 §7.8, ERL 0).
    pub data_digest_error: bool,
    /// Data-In PDUs queued that reference this task's buffer.
    pub tx_refs: u32,
    /// Generation of the slot, part of our Target Transfer Tags so that a stale tag never
    /// finds a reused slot.
    pub generation: u8,
    /// When the task last waited on the initiator (for RspTimeout).
    pub waiting_since: Option<std::time::Instant>,
    /// Whether the backend still owns the buffer.
    pub in_backend: bool,
    /// Bytes of the pool its buffer counts against the session's share.
    pub buf_charge: usize,
    /// Aborted by another nexus's task management while its I/O was out: TASK ABORTED goes
    /// to the initiator when that I/O is back.
    pub answer_aborted: bool,
    /// Its place in the connection's task set (task attributes); `None` once it has
    /// completed or been aborted, or for a command that never entered it.
    pub order: Option<Entry>,
    /// Admitted while held back: the unit attention and reservation checks run when it
    /// starts (SAM-5 §5.14), not when it arrived.
    pub checks_deferred: bool,
}

/// Our Target Transfer Tag for R2T `r2t_sn` of slot `slot`: generation (8 bits), slot
/// (12 bits), R2TSN (12 bits). Never 0xffffffff, the reserved tag (generations stop at 0xfe).
pub fn ttt(generation: u8, slot: usize, r2t_sn: u32) -> u32 {
    (u32::from(generation) << 24) | ((slot as u32 & 0xfff) << 12) | (r2t_sn & 0xfff)
}

/// The maximum number of task slots per session (QueuedCommands ≤ 2048, plus immediate
/// commands and responses still being sent).
pub const MAX_SLOTS: usize = 4096;

#[derive(Default)]
pub struct Tasks {
    slots: Vec<Option<Task>>,
    free: Vec<usize>,
    by_itt: HashMap<u32, usize>,
    generations: Vec<u8>,
    /// The R2T lists of removed tasks, emptied, for new tasks to reuse (no allocation per
    /// write once warm).
    spare_r2ts: Vec<Vec<R2t>>,
    /// Tasks not yet completed back to the initiator (counted for MaxCmdSN).
    pub active: usize,
}

impl Tasks {
    pub fn with_capacity(n: usize) -> Tasks {
        Tasks {
            slots: Vec::with_capacity(n),
            free: Vec::with_capacity(n),
            by_itt: HashMap::with_capacity(n * 2),
            generations: Vec::with_capacity(n),
            spare_r2ts: Vec::new(),
            active: 0,
        }
    }

    /// Takes a free slot for `task`; `None` when every slot is in use or the ITT is taken.
    pub fn insert(&mut self, mut task: Task) -> Option<usize> {
        if self.by_itt.contains_key(&task.itt) {
            return None;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.slots.len() < MAX_SLOTS => {
                self.slots.push(None);
                self.generations.push(0);
                self.slots.len() - 1
            }
            None => return None,
        };
        let g = &mut self.generations[slot];
        *g = if *g >= 0xfe { 0 } else { *g + 1 };
        task.generation = *g;
        if task.r2ts.capacity() == 0 {
            if let Some(v) = self.spare_r2ts.pop() {
                task.r2ts = v;
            }
        }
        self.by_itt.insert(task.itt, slot);
        self.slots[slot] = Some(task);
        self.active += 1;
        Some(slot)
    }

    pub fn get(&self, slot: usize) -> Option<&Task> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Task> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    pub fn by_itt(&self, itt: u32) -> Option<usize> {
        self.by_itt.get(&itt).copied()
    }

    /// The slot a Target Transfer Tag of ours names, if it is still that task.
    pub fn by_ttt(&self, ttt: u32) -> Option<usize> {
        let slot = ((ttt >> 12) & 0xfff) as usize;
        let generation = (ttt >> 24) as u8;
        match self.get(slot) {
            Some(t) if t.generation == generation => Some(slot),
            _ => None,
        }
    }

    /// Marks the task as answered (no longer counted against the command window) and removes
    /// its ITT so the initiator may reuse it.
    pub fn retire(&mut self, slot: usize) {
        if let Some(t) = self.get(slot) {
            let itt = t.itt;
            if self.by_itt.get(&itt) == Some(&slot) {
                self.by_itt.remove(&itt);
                self.active = self.active.saturating_sub(1);
            }
        }
    }

    /// Frees the slot (after `retire`, once no PDU and no backend I/O references it).
    pub fn remove(&mut self, slot: usize) -> Option<Task> {
        self.retire(slot);
        let mut t = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        if t.r2ts.capacity() > 0 && self.spare_r2ts.len() < MAX_SLOTS {
            let mut v = std::mem::take(&mut t.r2ts);
            v.clear();
            self.spare_r2ts.push(v);
        }
        Some(t)
    }

    pub fn slots(&self) -> impl Iterator<Item = (usize, &Task)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }
}

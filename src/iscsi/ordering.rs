//! Task attributes and the order in which the commands of one task set may start (SAM-5 §8.5
//! to §8.9), as pure logic: the connection tells it what arrives, what completes, and asks it
//! which waiting command may start.
//!
//! The rules, with "older" meaning received earlier:
//! - a HEAD OF QUEUE command starts at once;
//! - a SIMPLE command does not start while an older ORDERED or HEAD OF QUEUE command has not
//!   completed;
//! - an ORDERED command does not start until every older command has completed.
//!
//! A command that has completed (its status decided) or was aborted no longer holds anything
//! back. Commands arrive in CmdSN order (the connection admits only the expected CmdSN), so
//! arrival order is CmdSN order; an immediate command (RFC 7143 §3.2.2.1) is delivered to the
//! SCSI layer when it arrives, so it takes its place in the task set at arrival.
//!
//! Cost: with no ORDERED or HEAD OF QUEUE command outstanding, [`TaskSet::arrive`] and
//! [`TaskSet::complete`] are a few counter updates; a queue is used only while commands wait.
//!
//! Why waiting commands leave strictly in arrival order: every started SIMPLE or ORDERED
//! command is older than every waiting one (a newer one would have had to wait for it), so the
//! head of the queue is the first to become free, and whatever blocks the head (a started
//! ORDERED, an older HEAD OF QUEUE, or the head itself when it is ORDERED) blocks those behind
//! it too.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

/// The task attribute of a command (RFC 7143 §11.3.1 ATTR; SAM-5 §8.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAttr {
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

impl TaskAttr {
    /// The ATTR field of a SCSI Command PDU. RFC 7143 defines 0 (Untagged), 1 (Simple),
    /// 2 (Ordered), 3 (Head of Queue) and 4 (ACA); 5 to 7 are reserved. SAM-5 has no untagged
    /// tasks any more: an untagged command is a SIMPLE one. A reserved value is taken as
    /// SIMPLE too: no sense data can point at a field of the transport's header, and SIMPLE
    /// is what an initiator that does not care about order means.
    pub fn from_wire(attr: u8) -> TaskAttr {
        match attr & 0x07 {
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            _ => TaskAttr::Simple,
        }
    }
}

/// A command's place in the task set, kept with the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    seq: u64,
    attr: TaskAttr,
    /// Waiting for older commands: not started yet.
    held: bool,
}

impl Entry {
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The command has been handed out by [`TaskSet::next_ready`].
    pub fn start(&mut self) {
        self.held = false;
    }
}

/// A command that waits for older ones to complete.
#[derive(Debug, Clone, Copy)]
struct Waiting<K> {
    seq: u64,
    attr: TaskAttr,
    key: K,
}

/// The ordering state of one task set. `K` names a command to the caller (a task slot).
#[derive(Debug)]
pub struct TaskSet<K> {
    next_seq: u64,
    /// Started, not completed, SIMPLE and ORDERED commands.
    simple: usize,
    ordered: usize,
    /// The arrival numbers of started, not completed, HEAD OF QUEUE commands.
    head_of_queue: Vec<u64>,
    /// Commands not yet started, oldest first.
    waiting: VecDeque<Waiting<K>>,
}

impl<K> Default for TaskSet<K> {
    fn default() -> Self {
        TaskSet {
            next_seq: 0,
            simple: 0,
            ordered: 0,
            head_of_queue: Vec::new(),
            waiting: VecDeque::new(),
        }
    }
}

impl<K: Copy> TaskSet<K> {
    /// A command arrives (its attribute is not ACA: there is no ACA condition to take it).
    /// The entry says whether it may start now or is held until [`TaskSet::next_ready`]
    /// hands it out.
    pub fn arrive(&mut self, attr: TaskAttr, key: K) -> Entry {
        let seq = self.next_seq;
        self.next_seq += 1;
        let start = match attr {
            TaskAttr::HeadOfQueue => true,
            // Every outstanding command is older than this one.
            TaskAttr::Ordered => self.waiting.is_empty() && self.outstanding_started() == 0,
            TaskAttr::Simple | TaskAttr::Aca => {
                self.waiting.is_empty() && self.ordered == 0 && self.head_of_queue.is_empty()
            }
        };
        if start {
            self.count_started(attr, seq);
        } else {
            self.waiting.push_back(Waiting { seq, attr, key });
        }
        Entry {
            seq,
            attr,
            held: !start,
        }
    }

    /// The command of `entry` has completed or was aborted, started or not.
    pub fn complete(&mut self, entry: Entry) {
        if entry.held {
            if let Some(i) = self.waiting.iter().position(|w| w.seq == entry.seq) {
                self.waiting.remove(i);
            }
            return;
        }
        match entry.attr {
            TaskAttr::HeadOfQueue => {
                if let Some(i) = self.head_of_queue.iter().position(|&s| s == entry.seq) {
                    self.head_of_queue.swap_remove(i);
                }
            }
            TaskAttr::Ordered => self.ordered = self.ordered.saturating_sub(1),
            TaskAttr::Simple | TaskAttr::Aca => self.simple = self.simple.saturating_sub(1),
        }
    }

    /// Whether commands wait (the caller then asks [`TaskSet::next_ready`] after completions).
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The oldest waiting command, if it may start now: it counts as started from here on
    /// (its entry must be marked with [`Entry::start`]).
    pub fn next_ready(&mut self) -> Option<K> {
        let head = self.waiting.front()?;
        let older_head_of_queue = self.head_of_queue.iter().any(|&s| s < head.seq);
        let ready = !older_head_of_queue
            && self.ordered == 0
            && (head.attr != TaskAttr::Ordered || self.simple == 0);
        if !ready {
            return None;
        }
        let w = self.waiting.pop_front()?;
        self.count_started(w.attr, w.seq);
        Some(w.key)
    }

    fn outstanding_started(&self) -> usize {
        self.simple + self.ordered + self.head_of_queue.len()
    }

    fn count_started(&mut self, attr: TaskAttr, seq: u64) {
        match attr {
            TaskAttr::HeadOfQueue => self.head_of_queue.push(seq),
            TaskAttr::Ordered => self.ordered += 1,
            TaskAttr::Simple | TaskAttr::Aca => self.simple += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TaskAttr::{HeadOfQueue, Ordered, Simple};
    use super::*;

    fn ready(s: &mut TaskSet<u32>) -> Vec<u32> {
        std::iter::from_fn(|| s.next_ready()).collect()
    }

    #[test]
    fn wire_values() {
        assert_eq!(TaskAttr::from_wire(0), Simple);
        assert_eq!(TaskAttr::from_wire(1), Simple);
        assert_eq!(TaskAttr::from_wire(2), Ordered);
        assert_eq!(TaskAttr::from_wire(3), HeadOfQueue);
        assert_eq!(TaskAttr::from_wire(4), TaskAttr::Aca);
        for reserved in 5..8 {
            assert_eq!(TaskAttr::from_wire(reserved), Simple);
        }
    }

    #[test]
    fn simple_commands_start_at_once() {
        let mut s = TaskSet::default();
        let a = s.arrive(Simple, 1);
        let b = s.arrive(Simple, 2);
        assert!(!a.is_held() && !b.is_held());
        s.complete(b);
        s.complete(a);
        assert!(!s.has_waiting());
        assert!(!s.arrive(Ordered, 3).is_held());
    }

    #[test]
    fn ordered_waits_for_every_older_command_and_holds_newer_ones() {
        let mut s = TaskSet::default();
        let a = s.arrive(Simple, 1);
        let b = s.arrive(Simple, 2);
        let mut o = s.arrive(Ordered, 3);
        let mut c = s.arrive(Simple, 4);
        assert!(o.is_held() && c.is_held());
        s.complete(a);
        assert_eq!(ready(&mut s), Vec::<u32>::new());
        s.complete(b);
        assert_eq!(ready(&mut s), vec![3]);
        o.start();
        // The SIMPLE command behind it waits until it completes.
        assert_eq!(ready(&mut s), Vec::<u32>::new());
        s.complete(o);
        assert_eq!(ready(&mut s), vec![4]);
        c.start();
        s.complete(c);
        assert!(!s.has_waiting());
        assert!(!s.arrive(Ordered, 5).is_held());
    }

    #[test]
    fn consecutive_ordered_commands_run_one_at_a_time() {
        let mut s = TaskSet::default();
        let o1 = s.arrive(Ordered, 1);
        let mut o2 = s.arrive(Ordered, 2);
        let mut o3 = s.arrive(Ordered, 3);
        assert!(!o1.is_held() && o2.is_held() && o3.is_held());
        assert_eq!(ready(&mut s), Vec::<u32>::new());
        s.complete(o1);
        assert_eq!(ready(&mut s), vec![2]);
        o2.start();
        s.complete(o2);
        assert_eq!(ready(&mut s), vec![3]);
        o3.start();
        s.complete(o3);
        assert!(!s.has_waiting());
    }

    #[test]
    fn head_of_queue_passes_waiting_commands_and_holds_newer_ones() {
        let mut s = TaskSet::default();
        let a = s.arrive(Simple, 1);
        let o = s.arrive(Ordered, 2);
        let w = s.arrive(Simple, 3);
        let h = s.arrive(HeadOfQueue, 4);
        assert!(o.is_held() && w.is_held());
        assert!(!h.is_held());
        // A SIMPLE command newer than the HEAD OF QUEUE one waits for it.
        let n = s.arrive(Simple, 5);
        assert!(n.is_held());
        s.complete(a);
        // The ORDERED command is older than the HEAD OF QUEUE one: it does not wait for it.
        assert_eq!(ready(&mut s), vec![2]);
        let mut o = o;
        o.start();
        s.complete(o);
        // The SIMPLE command older than the HEAD OF QUEUE command starts; the newer one waits.
        assert_eq!(ready(&mut s), vec![3]);
        s.complete(h);
        assert_eq!(ready(&mut s), vec![5]);
    }

    #[test]
    fn head_of_queue_with_nothing_else_and_ordered_after_it() {
        let mut s = TaskSet::default();
        let h = s.arrive(HeadOfQueue, 1);
        assert!(s.arrive(Simple, 2).is_held());
        assert!(s.arrive(Ordered, 3).is_held());
        s.complete(h);
        assert_eq!(ready(&mut s), vec![2]);
        // The ORDERED command waits for the SIMPLE one that just started.
        assert!(s.has_waiting());
    }

    #[test]
    fn an_aborted_waiting_ordered_command_releases_those_behind_it() {
        let mut s = TaskSet::default();
        let a = s.arrive(Simple, 1);
        let o = s.arrive(Ordered, 2);
        let c = s.arrive(Simple, 3);
        assert!(c.is_held());
        s.complete(o);
        assert_eq!(ready(&mut s), vec![3]);
        s.complete(a);
        assert!(!s.has_waiting());
    }

    #[test]
    fn an_aborted_started_ordered_command_counts_as_completed() {
        let mut s = TaskSet::default();
        let o = s.arrive(Ordered, 1);
        let c = s.arrive(Simple, 2);
        assert!(!o.is_held() && c.is_held());
        s.complete(o);
        assert_eq!(ready(&mut s), vec![2]);
    }

    #[test]
    fn everything_aborted_leaves_an_empty_set() {
        let mut s = TaskSet::default();
        let entries = [
            s.arrive(Simple, 1),
            s.arrive(Ordered, 2),
            s.arrive(HeadOfQueue, 3),
            s.arrive(Simple, 4),
            s.arrive(Ordered, 5),
        ];
        for e in entries.iter().rev() {
            s.complete(*e);
        }
        assert!(!s.has_waiting());
        assert_eq!(s.outstanding_started(), 0);
        assert!(!s.arrive(Ordered, 6).is_held());
    }
}

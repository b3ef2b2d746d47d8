//! Task management (RFC 7143 §11.5, SAM-5 §7): the functions a session asks for, the ones other
//! sessions' functions apply here, aborting tasks, and responses held until aborted I/O is back.

use std::sync::Arc;

use crate::iscsi::pdu::{self, BHS_LEN};
use crate::iscsi::seq;
use crate::iscsi::task::TaskState;
use crate::iscsi::tx::{TxData, TxPdu};
use crate::scsi::{self, ScsiPort};

use super::{update_max_cmd_sn, AbortScope, Conn, ConnCtx, Phase};

impl Conn {
    pub(super) fn handle_tmf(&mut self, t: &pdu::TaskMgmtRequest, cx: &mut ConnCtx<'_>) {
        self.task_management(t, cx);
        // Aborted commands count as completed: those they held back may start.
        self.start_released(cx);
    }

    fn task_management(&mut self, t: &pdu::TaskMgmtRequest, cx: &mut ConnCtx<'_>) {
        if !t.immediate && !self.check_cmd_sn(false, t.cmd_sn) {
            return;
        }
        let lun = pdu::decode_lun(t.lun);
        let response = match t.function {
            pdu::TMF_ABORT_TASK => {
                let live = self.tasks.by_itt(t.referenced_task_tag).filter(|&s| {
                    self.tasks
                        .get_mut(s)
                        .is_some_and(|x| x.state != TaskState::Responding)
                });
                match live {
                    Some(slot) => {
                        self.abort_slot(slot, cx.port);
                        pdu::TMF_RSP_COMPLETE
                    }
                    None => {
                        // RFC 7143 §11.5.1: a task the target never saw whose RefCmdSN is
                        // inside the window (and before this request) counts as aborted; one
                        // already answered, or outside the window, does not exist.
                        let exp = self.sess.as_ref().map_or(0, |s| s.exp_cmd_sn);
                        let max = self.sess.as_ref().map_or(0, |s| s.max_cmd_sn);
                        if seq::in_window(t.ref_cmd_sn, exp, max) && seq::lt(t.ref_cmd_sn, t.cmd_sn)
                        {
                            pdu::TMF_RSP_COMPLETE
                        } else {
                            pdu::TMF_RSP_TASK_DOES_NOT_EXIST
                        }
                    }
                }
            }
            pdu::TMF_ABORT_TASK_SET
            | pdu::TMF_CLEAR_TASK_SET
            | pdu::TMF_LOGICAL_UNIT_RESET
            | pdu::TMF_TARGET_WARM_RESET
            | pdu::TMF_TARGET_COLD_RESET => {
                let target_wide = matches!(
                    t.function,
                    pdu::TMF_TARGET_WARM_RESET | pdu::TMF_TARGET_COLD_RESET
                );
                let Some(sess) = self.sess.as_ref() else {
                    return;
                };
                let nexus = sess.nexus;
                let Some(tg) = sess.target.clone() else {
                    return;
                };
                let entry = tg.lun(lun).cloned();
                if !target_wide && entry.is_none() {
                    pdu::TMF_RSP_LUN_DOES_NOT_EXIST
                } else {
                    // This nexus's own tasks end without a response (SAM-5 §7).
                    let slots: Vec<usize> = self
                        .tasks
                        .slots()
                        .filter(|(_, x)| target_wide || x.lun == lun)
                        .map(|(i, _)| i)
                        .collect();
                    for s in slots {
                        self.abort_slot(s, cx.port);
                    }
                    // Unit attentions: a reset is seen by every I_T nexus, the requester's
                    // included (SAM-5 §7.7, §7.8).
                    match t.function {
                        pdu::TMF_LOGICAL_UNIT_RESET => {
                            if let Some(e) = &entry {
                                e.device.add_ua_all(0x29, 0x03);
                                e.device.clear_prevent_removal();
                                // SPC-2 §5.5.1: a reset releases a RESERVE; persistent
                                // reservations stay (SPC-4 §5.13.1).
                                e.device.reservations().reset();
                            }
                        }
                        pdu::TMF_TARGET_WARM_RESET | pdu::TMF_TARGET_COLD_RESET => {
                            for l in &tg.luns {
                                l.device.add_ua_all(0x29, 0x00);
                                l.device.clear_prevent_removal();
                                l.device.reservations().reset();
                            }
                        }
                        _ => {}
                    }
                    // CLEAR TASK SET and the resets also end the tasks of every other nexus
                    // (with TASK ABORTED, TAS=1), on whichever reactor they run; ABORT TASK SET
                    // is the requester's own business. The response waits for all reactors.
                    if t.function != pdu::TMF_ABORT_TASK_SET {
                        self.tmf_out.push((
                            AbortScope {
                                target: tg.name.clone(),
                                lun: (!target_wide).then_some(lun),
                                requester: nexus,
                                close: t.function == pdu::TMF_TARGET_COLD_RESET,
                                preempted: None,
                            },
                            t.itt,
                        ));
                        if t.function == pdu::TMF_TARGET_COLD_RESET {
                            // RFC 7143 §11.5.1: every connection ends, this one after the
                            // response.
                            self.close_after_tmf = true;
                        }
                        return;
                    }
                    pdu::TMF_RSP_COMPLETE
                }
            }
            // No ACA condition ever exists (NACA=1 is refused), so there is none to clear.
            pdu::TMF_CLEAR_ACA => {
                let known = self
                    .sess
                    .as_ref()
                    .and_then(|s| s.target.as_ref())
                    .is_some_and(|tg| tg.lun(lun).is_some());
                if known {
                    pdu::TMF_RSP_COMPLETE
                } else {
                    pdu::TMF_RSP_LUN_DOES_NOT_EXIST
                }
            }
            // ERL 0 has no task reassignment (RFC 7143 §11.5.1).
            pdu::TMF_TASK_REASSIGN => pdu::TMF_RSP_REASSIGN_NOT_SUPPORTED,
            _ => pdu::TMF_RSP_NOT_SUPPORTED,
        };
        self.respond_tmf(t.itt, response);
        let _ = cx;
    }

    /// Whether a task aborted here still has I/O out in the backend.
    pub fn has_aborted_in_backend(&self) -> bool {
        self.tasks
            .slots()
            .any(|(_, t)| t.state == TaskState::Aborted && t.in_backend)
    }

    /// Answers a task management request once no task it aborted can still reach the medium.
    fn respond_tmf(&mut self, itt: u32, response: u8) {
        self.tmf_deferred.push((itt, response));
        self.release_tmf();
    }

    /// Sends the held task management responses, in order, when their aborted tasks are back.
    pub(super) fn release_tmf(&mut self) {
        if self.tmf_deferred.is_empty() || self.has_aborted_in_backend() {
            return;
        }
        for (itt, response) in std::mem::take(&mut self.tmf_deferred) {
            self.queue_tmf_response(itt, response);
        }
        if self.close_after_tmf {
            self.close_after_tmf = false;
            self.phase = Phase::Closing;
        }
    }

    fn queue_tmf_response(&mut self, itt: u32, response: u8) {
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        update_max_cmd_sn(sess, self.tasks.active);
        let rsp = pdu::TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        rsp.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
    }

    /// Every reactor has applied this connection's task management function (`tmf_out`):
    /// answer it.
    pub fn tmf_done(&mut self, itt: u32, cx: &mut ConnCtx<'_>) {
        if let Some(i) = self.pr_waits.iter().position(|&(x, _)| x == itt) {
            // A PERSISTENT RESERVE OUT whose PREEMPT AND ABORT has aborted every task it
            // reaches: its status goes now (unless it was itself aborted meanwhile).
            let (_, slot) = self.pr_waits.swap_remove(i);
            let live = self
                .tasks
                .get(slot)
                .is_some_and(|t| t.itt == itt && t.state == TaskState::Executing);
            if live {
                self.respond_now(slot);
                self.start_released(cx);
            }
            return;
        }
        self.respond_tmf(itt, pdu::TMF_RSP_COMPLETE);
    }

    /// Another nexus's task management function reaches this connection: end the tasks it
    /// covers with TASK ABORTED (TAS=1, SPC-4 §7.5.8), or close the connection for a cold
    /// reset.
    pub fn apply_abort(&mut self, scope: &AbortScope, cx: &mut ConnCtx<'_>) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        if sess.nexus == scope.requester {
            return;
        }
        // PREEMPT AND ABORT: the LUNs of its device, for the preempted nexuses only.
        let preempted_luns: Option<Vec<u64>> = match &scope.preempted {
            Some(p) => {
                let dev = &p.device;
                if !p.nexuses.contains(&sess.nexus) {
                    return;
                }
                let luns = sess.target.as_ref().map(|t| {
                    t.luns
                        .iter()
                        .filter(|l| Arc::ptr_eq(&l.device, dev))
                        .map(|l| l.lun)
                        .collect()
                });
                Some(luns.unwrap_or_default())
            }
            None if sess.target.as_ref().is_none_or(|t| t.name != scope.target) => return,
            None => None,
        };
        if scope.close {
            self.close(cx, "target cold reset by another initiator");
            return;
        }
        let hit: Vec<(usize, u32, bool)> = self
            .tasks
            .slots()
            .filter(|(_, x)| {
                !matches!(x.state, TaskState::Responding | TaskState::Aborted)
                    && match &preempted_luns {
                        Some(luns) => luns.contains(&x.lun),
                        None => scope.lun.is_none_or(|l| x.lun == l),
                    }
            })
            .map(|(i, x)| (i, x.itt, x.in_backend))
            .collect();
        for (slot, itt, in_backend) in hit {
            self.abort_slot(slot, cx.port);
            if in_backend {
                // TASK ABORTED only once its I/O can no longer reach the medium.
                if let Some(t) = self.tasks.get_mut(slot) {
                    t.answer_aborted = true;
                }
            } else {
                self.queue_task_aborted(itt);
            }
        }
        self.start_released(cx);
    }

    /// A SCSI Response with status TASK ABORTED for a task another nexus's TMF ended.
    pub(super) fn queue_task_aborted(&mut self, itt: u32) {
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        let rsp = pdu::ScsiResponse {
            itt,
            response: 0,
            status: scsi::task::STATUS_TASK_ABORTED,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        rsp.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
    }

    /// Aborts one task: no response is sent for it (RFC 7143 §4.2.3.4 / SAM-5 ABORT TASK).
    pub(super) fn abort_slot(&mut self, slot: usize, port: &mut ScsiPort) {
        let info = self.sess.as_ref().and_then(|s| s.info.clone());
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.state == TaskState::Responding {
            // Its answer is already queued: let it go out.
            return;
        }
        // Aborted counts as completed for the commands it held back.
        if let Some(o) = t.order.take() {
            self.order.complete(o);
        }
        let in_backend = t.in_backend;
        if in_backend {
            // A read-modify-write that has not written yet must not write after the abort.
            port.abort(t.scsi.tag);
        }
        t.state = TaskState::Aborted;
        self.tasks.retire(slot);
        if let Some(info) = &info {
            info.command_done();
        }
        if !in_backend {
            self.remove_task(slot);
        }
    }

    pub(super) fn abort_all(&mut self, port: &mut ScsiPort) {
        let slots: Vec<usize> = self.tasks.slots().map(|(i, _)| i).collect();
        for s in slots {
            self.abort_slot(s, port);
        }
    }
}

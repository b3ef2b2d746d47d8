//! SCSI commands: admission (CmdSN window, LUN, CDB plan, data buffer), commands waiting for a
//! buffer, Data-Out and R2T, execution, backend completions, and the Data-In and SCSI Response
//! that answer each command.

use std::time::Duration;

use log::{debug, warn};

use crate::env::DataBuf;
use crate::iscsi::negotiate::SessionType;
use crate::iscsi::ordering::TaskAttr;
use crate::iscsi::pdu::{self, BHS_LEN};
use crate::iscsi::seq;
use crate::iscsi::task::{self, R2t, Task, TaskState};
use crate::iscsi::tx::{TxData, TxPdu};
use crate::scsi::{self, Exec, ScsiTask};

use super::{
    task_tag, update_max_cmd_sn, BufWait, Conn, ConnCtx, Phase, STATUS_CHECK_CONDITION,
    STATUS_GOOD, STATUS_TASK_SET_FULL,
};

/// How long a command may wait for a buffer from an exhausted pool before it is answered
/// with TASK SET FULL (SAM-5 §5.3.1: the task set cannot take the command now).
const BUF_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// INVALID MESSAGE ERROR (SPC-4 Table 48): what a command with the ACA task attribute gets
/// when no ACA condition exists.
const ASC_INVALID_MESSAGE_ERROR: (u8, u8) = (0x49, 0x00);

impl Conn {
    /// Admits a SCSI Command header: CmdSN window, LUN, CDB plan, buffer. Returns the task slot
    /// when the command goes on (its immediate data then lands in the task's buffer).
    pub(super) fn admit_command(
        &mut self,
        cmd: &pdu::ScsiCommand,
        data_len: usize,
        cx: &mut ConnCtx<'_>,
    ) -> Option<usize> {
        let sess = self.sess.as_mut()?;
        if sess.params.session_type == SessionType::Discovery {
            // RFC 7143 §4.3: only text and logout in discovery sessions.
            let raw = cmd_header(cmd);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return None;
        }
        if !self.check_cmd_sn(cmd.immediate, cmd.cmd_sn) {
            return None;
        }
        let sess = self.sess.as_mut()?;
        let immediate_data = data_len as u32;
        let params = &sess.params;
        let nexus = sess.nexus;
        let lun_id = pdu::decode_lun(cmd.lun);
        let mut scsi_task = ScsiTask::new(&cmd.cdb[..], lun_id, nexus);
        scsi_task.tag = task_tag(cx.index, 0); // slot filled in below
        let mut task = Task {
            itt: cmd.itt,
            cmd_sn: cmd.cmd_sn,
            lun: lun_id,
            edtl: cmd.expected_data_transfer_length,
            spdtl: 0,
            write: cmd.write,
            read: cmd.read,
            state: TaskState::ReceivingData,
            scsi: scsi_task,
            unsolicited_len: 0,
            unsolicited_received: 0,
            unsolicited_next_data_sn: 0,
            expected_out: 0,
            received: 0,
            next_r2t_offset: 0,
            want_out: 0,
            next_r2t_sn: 0,
            r2ts: Vec::new(),
            data_digest_error: false,
            tx_refs: 0,
            generation: 0,
            waiting_since: Some(cx.now),
            in_backend: false,
            buf_charge: 0,
            answer_aborted: false,
            order: None,
            checks_deferred: false,
        };
        if cmd.write && cmd.expected_data_transfer_length > 0 {
            // RFC 7143 §11.3.1: F=1 on the command means no unsolicited Data-Out follows it,
            // whatever InitialR2T allows; the rest is solicited.
            task.unsolicited_len = if params.initial_r2t || cmd.final_flag {
                immediate_data
            } else {
                params
                    .first_burst_length
                    .min(cmd.expected_data_transfer_length)
                    .max(immediate_data)
            };
        } else {
            task.unsolicited_len = immediate_data;
        }
        let first_burst = params.first_burst_length;
        let Some(slot) = self.tasks.insert(task) else {
            // Same ITT as an outstanding task, or out of slots.
            warn!(
                "{}: ITT {:#x} in use or no task slot free",
                self.peer, cmd.itt
            );
            let raw = cmd_header(cmd);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return None;
        };
        self.note_command(cx.now);
        // Counted once it holds a slot: every task is answered (or aborted) exactly once.
        if let Some(info) = self.sess.as_ref().and_then(|s| s.info.as_deref()) {
            info.command_received();
        }
        if immediate_data > first_burst {
            self.fail_task(slot, scsi::sense::ABORTED_COMMAND, 0x0c, 0x0c); // unexpected unsolicited data
            return None;
        }
        // The session's target and LUN are borrowed from the session for the whole admission
        // (no reference count taken per command): the paths that end the task early give
        // the borrow up before they touch the connection.
        let target = self.sess.as_ref().and_then(|s| s.target.as_deref());
        // REPORT LUNS answers for the whole I_T nexus, whatever LUN it addresses (SPC-4 §6.33).
        let has_lun = cmd.cdb[0] != 0xa0 && target.and_then(|t| t.lun(lun_id)).is_some();
        let t = self.tasks.get_mut(slot)?;
        t.scsi.tag = task_tag(cx.index, slot);
        if !has_lun {
            let luns: Vec<u64> = target
                .map(|t| t.luns.iter().map(|l| l.lun).collect())
                .unwrap_or_default();
            if t.read && t.edtl > 0 {
                let len = (t.edtl as usize).min(64 * 1024);
                t.scsi.buf = session_alloc(&mut self.buf_held, self.buf_share, len);
                t.buf_charge = t.scsi.buf.as_ref().map_or(0, DataBuf::len);
            }
            scsi::execute_no_lun(&mut t.scsi, &luns);
            self.finish_task(slot, cx);
            return None;
        }
        // The command enters its logical unit's task set (commands to no logical unit and
        // REPORT LUNS, answered above by the target itself, do not).
        let attr = TaskAttr::from_wire(cmd.attr);
        if attr == TaskAttr::Aca {
            // No ACA condition ever exists here (NACA=1 is refused), and SAM-5 ends a command
            // with the ACA task attribute outside one with CHECK CONDITION, ILLEGAL REQUEST,
            // INVALID MESSAGE ERROR.
            self.fail_task(
                slot,
                scsi::sense::ILLEGAL_REQUEST,
                ASC_INVALID_MESSAGE_ERROR.0,
                ASC_INVALID_MESSAGE_ERROR.1,
            );
            return None;
        }
        let order = self.order.arrive(attr, slot);
        let held = order.is_held();
        let t = self.tasks.get_mut(slot)?;
        t.order = Some(order);
        t.checks_deferred = held;
        // Transport-raised unit attentions (REPORTED LUNS DATA HAS CHANGED) come first; for a
        // command held back by older ones, when it starts.
        if let Some(sess) = self.sess.as_mut().filter(|_| !held) {
            if !sess.pending_ua.is_empty() && scsi::ua_applies(&t.scsi) {
                let (asc, ascq) = sess.pending_ua.remove(0);
                t.scsi
                    .set_check_condition(scsi::sense::UNIT_ATTENTION, asc, ascq);
                self.finish_task(slot, cx);
                return None;
            }
        }
        let sess = self.sess.as_ref()?;
        let entry = sess.target.as_deref().and_then(|tg| tg.lun(lun_id))?;
        t.scsi.read_only = entry.read_only;
        // The target port and its asymmetric access state for this LU: one atomic load.
        t.scsi.rel_tgt_id = sess.target.as_deref().map_or(1, |tg| tg.rel_tgt_id);
        if t.scsi.cdb[0] == scsi::spc::opcode::INQUIRY {
            t.scsi.target_name.clone_from(&sess.target_name);
        }
        if let Some(s) = &entry.alua {
            t.scsi.access_state = s.state();
        }
        t.scsi.data_out_len = Some(if t.write { t.edtl } else { 0 });
        // A held command that its CDB or the device's state refuses is answered now: it never
        // starts, so it touches nothing the commands ahead of it touch.
        let planned = if held {
            scsi::plan_held(&entry.device, &mut t.scsi)
        } else {
            scsi::plan(&entry.device, &mut t.scsi, &sess.pr_nexus)
        };
        let plan = match planned {
            // A reservation conflict: ended at once, as a refusal.
            Ok(_) if t.scsi.status != STATUS_GOOD => {
                self.finish_task(slot, cx);
                return None;
            }
            Ok(p) => p,
            Err(sense) => {
                // Refused before any data moved (bad CDB, LBA out of range, UA, ...).
                t.scsi.fail(sense);
                self.finish_task(slot, cx);
                return None;
            }
        };
        t.spdtl = plan.len;
        let edtl = t.edtl;
        match plan.dir {
            scsi::DataDir::Out => {
                // Without the W bit the initiator sends nothing, whatever EDTL says.
                let out = if t.write { edtl } else { 0 };
                if out < plan.len && !t.scsi.limit_write(out, entry.device.block_size()) {
                    // RFC 7143 §11.4.5.2 / SAM-5: the initiator sends fewer bytes than the
                    // CDB needs and not a whole number of blocks: write nothing, answer
                    // INVALID FIELD IN COMMAND INFORMATION UNIT with the overflow residual.
                    t.scsi
                        .set_check_condition(scsi::sense::ILLEGAL_REQUEST, 0x0e, 0x03);
                    self.finish_task(slot, cx);
                    return None;
                }
                // Otherwise only the blocks the initiator sends are written; the response
                // reports the rest as residual overflow.
                match session_alloc(&mut self.buf_held, self.buf_share, plan.len as usize) {
                    Some(buf) => {
                        t.buf_charge = buf.len();
                        t.scsi.buf = Some(buf);
                    }
                    // Unsolicited Data-Out beyond the immediate data would arrive while the
                    // command has nowhere to put it: such a command cannot wait.
                    None if t.unsolicited_len > immediate_data => {
                        t.scsi.status = STATUS_TASK_SET_FULL;
                        self.finish_task(slot, cx);
                        return None;
                    }
                    None => t.state = TaskState::WaitingBuffer,
                }
                t.want_out = plan.len.min(out);
                t.next_r2t_offset = t.unsolicited_len;
                t.expected_out = t.unsolicited_len.max(t.want_out);
            }
            scsi::DataDir::In => {
                match session_alloc(&mut self.buf_held, self.buf_share, plan.len as usize) {
                    Some(buf) => {
                        t.buf_charge = buf.len();
                        t.scsi.buf = Some(buf);
                    }
                    None => t.state = TaskState::WaitingBuffer,
                }
                t.expected_out = t.unsolicited_len;
            }
            scsi::DataDir::None => {
                t.expected_out = t.unsolicited_len;
            }
        }
        if t.state == TaskState::WaitingBuffer {
            // Waiting on us, not on the initiator: RspTimeout does not run meanwhile.
            t.waiting_since = None;
            crate::env::note_wait();
            self.buf_waiters.push_back(BufWait {
                slot,
                itt: cmd.itt,
                len: plan.len as usize,
                since: cx.now,
                arrived: false,
                data: Vec::new(),
            });
        }
        Some(slot)
    }

    pub(super) fn is_parked(&self, slot: usize) -> bool {
        self.tasks
            .get(slot)
            .is_some_and(|t| t.state == TaskState::WaitingBuffer)
    }

    /// Whether commands wait for a data buffer (the reactor then calls `retry_buffers` every
    /// pass).
    pub fn has_buf_waiters(&self) -> bool {
        !self.buf_waiters.is_empty()
    }

    /// Gives parked commands their buffers, in arrival order, while the pool has them; answers
    /// TASK SET FULL to those that waited longer than [`BUF_WAIT_LIMIT`]. Returns whether any
    /// command moved on.
    pub fn retry_buffers(&mut self, cx: &mut ConnCtx<'_>) -> bool {
        if self.phase != Phase::FullFeature {
            self.buf_waiters.clear();
            return false;
        }
        let mut did = false;
        while let Some(w) = self.buf_waiters.front() {
            let (slot, itt) = (w.slot, w.itt);
            let live = self
                .tasks
                .get(slot)
                .is_some_and(|t| t.itt == itt && t.state == TaskState::WaitingBuffer);
            if !live {
                // Aborted by task management meanwhile.
                self.buf_waiters.pop_front();
                continue;
            }
            if cx.now >= w.since + BUF_WAIT_LIMIT {
                self.buf_waiters.pop_front();
                if let Some(t) = self.tasks.get_mut(slot) {
                    t.scsi.status = STATUS_TASK_SET_FULL;
                }
                self.finish_task(slot, cx);
                did = true;
                continue;
            }
            if !w.arrived {
                // Its immediate data is still on the way; keep the order.
                break;
            }
            let Some(mut buf) = session_alloc(&mut self.buf_held, self.buf_share, w.len) else {
                break;
            };
            let Some(w) = self.buf_waiters.pop_front() else {
                break;
            };
            buf.write_at(0, &w.data);
            if let Some(t) = self.tasks.get_mut(slot) {
                t.buf_charge = buf.len();
                t.scsi.buf = Some(buf);
                t.state = TaskState::ReceivingData;
                t.waiting_since = Some(cx.now);
            }
            self.command_data_done(itt, w.data.len() as u32, cx);
            did = true;
        }
        did
    }

    /// The immediate data of a command (if any) has arrived.
    pub(super) fn command_data_done(&mut self, itt: u32, received: u32, cx: &mut ConnCtx<'_>) {
        let Some(slot) = self.tasks.by_itt(itt) else {
            return;
        };
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.state != TaskState::ReceivingData {
            return;
        }
        t.received += received;
        t.unsolicited_received += received;
        self.progress_write(slot, cx);
    }

    /// Sends R2Ts while the window allows, or starts the command once all data is in.
    fn progress_write(&mut self, slot: usize, cx: &mut ConnCtx<'_>) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let max_r2t = sess.params.max_outstanding_r2t.max(1) as usize;
        let max_burst = sess.params.max_burst_length.max(512);
        let (exp_cmd_sn, max_cmd_sn) = (sess.exp_cmd_sn, sess.max_cmd_sn);
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.state != TaskState::ReceivingData {
            return;
        }
        if t.received >= t.expected_out {
            self.execute(slot, cx);
            return;
        }
        // Solicit the rest (RFC 7143 §11.8), at most MaxOutstandingR2T at a time, once the
        // unsolicited sequence has ended: until then its end is not known (an F bit may end it
        // early), and with DataSequenceInOrder=Yes (§13.19) no R2T may ask for an offset
        // below one already asked for.
        let unsolicited_done = t.unsolicited_received >= t.unsolicited_len;
        while unsolicited_done && t.r2ts.len() < max_r2t && t.next_r2t_offset < t.want_out {
            let len = (t.want_out - t.next_r2t_offset).min(max_burst);
            let r2t = R2t {
                r2t_sn: t.next_r2t_sn,
                offset: t.next_r2t_offset,
                len,
                received: 0,
                next_data_sn: 0,
            };
            t.next_r2t_sn = t.next_r2t_sn.wrapping_add(1);
            t.next_r2t_offset += len;
            t.r2ts.push(r2t);
            let pdu = pdu::R2t {
                lun: pdu::encode_lun(t.lun),
                itt: t.itt,
                ttt: task::ttt(t.generation, slot, r2t.r2t_sn),
                stat_sn: self.stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                r2t_sn: r2t.r2t_sn,
                buffer_offset: r2t.offset,
                desired_data_transfer_length: len,
                ..Default::default()
            };
            let mut bhs = [0u8; BHS_LEN];
            pdu.emit(&mut bhs);
            self.tx.push(TxPdu::new(bhs, TxData::None, 0));
        }
        t.waiting_since = Some(cx.now);
    }

    /// A Data-Out header: find its task and check it. Returns where its data goes.
    pub(super) fn admit_data_out(
        &mut self,
        d: &pdu::DataOut,
        data_len: usize,
    ) -> Option<(usize, usize)> {
        let slot = if d.ttt == pdu::RESERVED_TAG {
            self.tasks.by_itt(d.itt)?
        } else {
            self.tasks.by_ttt(d.ttt)?
        };
        let t = self.tasks.get_mut(slot)?;
        if t.itt != d.itt || t.state != TaskState::ReceivingData {
            return None;
        }
        let end = u64::from(d.buffer_offset) + data_len as u64;
        let ok = if d.ttt == pdu::RESERVED_TAG {
            // Unsolicited data: in order, within the unsolicited range.
            d.data_sn == t.unsolicited_next_data_sn && end <= u64::from(t.unsolicited_len)
        } else {
            let r2t_sn = d.ttt & 0xfff;
            match t.r2ts.iter().find(|r| r.r2t_sn & 0xfff == r2t_sn) {
                Some(r) => {
                    d.data_sn == r.next_data_sn
                        && d.buffer_offset >= r.offset
                        && end <= u64::from(r.offset) + u64::from(r.len)
                }
                None => false,
            }
        };
        if !ok {
            debug!(
                "{}: bad Data-Out for ITT {:#x}: DataSN {} offset {} len {}",
                self.peer, d.itt, d.data_sn, d.buffer_offset, data_len
            );
            // ERL 0 (RFC 7143 §7.1.1): a sequence error ends the command with an error.
            t.scsi
                .set_check_condition(scsi::sense::ABORTED_COMMAND, 0x0c, 0x0d);
            t.state = TaskState::Responding;
            return None;
        }
        Some((slot, d.buffer_offset as usize))
    }

    pub(super) fn data_out_done(&mut self, d: &pdu::DataOut, received: u32, cx: &mut ConnCtx<'_>) {
        let slot = if d.ttt == pdu::RESERVED_TAG {
            self.tasks.by_itt(d.itt)
        } else {
            self.tasks.by_ttt(d.ttt)
        };
        let Some(slot) = slot else { return };
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.itt != d.itt {
            return;
        }
        if t.state == TaskState::Responding
            && t.scsi.status == STATUS_CHECK_CONDITION
            && !t.in_backend
        {
            // The Data-Out was refused in admit_data_out.
            self.finish_task(slot, cx);
            return;
        }
        if t.state != TaskState::ReceivingData {
            return;
        }
        t.received += received;
        if d.ttt == pdu::RESERVED_TAG {
            t.unsolicited_received += received;
            t.unsolicited_next_data_sn = t.unsolicited_next_data_sn.wrapping_add(1);
            if d.final_flag && t.unsolicited_received < t.unsolicited_len {
                // RFC 7143 §11.7.1: F=1 ends the unsolicited sequence short of FirstBurstLength
                // (§13.14); the target solicits what it did not carry (§11.8).
                t.unsolicited_len = t.unsolicited_received;
                t.next_r2t_offset = t.unsolicited_len;
                t.expected_out = t.unsolicited_len.max(t.want_out);
            }
        } else {
            let r2t_sn = d.ttt & 0xfff;
            if let Some(i) = t.r2ts.iter().position(|r| r.r2t_sn & 0xfff == r2t_sn) {
                let r = &mut t.r2ts[i];
                r.received += received;
                r.next_data_sn = r.next_data_sn.wrapping_add(1);
                if r.received >= r.len || d.final_flag {
                    t.r2ts.swap_remove(i);
                }
            }
        }
        self.progress_write(slot, cx);
    }

    fn execute(&mut self, slot: usize, cx: &mut ConnCtx<'_>) {
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        t.waiting_since = None;
        if t.order.is_some_and(|o| o.is_held()) {
            // Older commands hold it back: it runs when the task set lets it start.
            t.state = TaskState::Dormant;
            return;
        }
        let deferred = std::mem::take(&mut t.checks_deferred);
        if deferred && !t.data_digest_error {
            if let Some(sess) = self.sess.as_mut() {
                if !sess.pending_ua.is_empty() && scsi::ua_applies(&t.scsi) {
                    let (asc, ascq) = sess.pending_ua.remove(0);
                    t.scsi
                        .set_check_condition(scsi::sense::UNIT_ATTENTION, asc, ascq);
                    self.finish_task(slot, cx);
                    return;
                }
            }
        }
        // Borrowed, not cloned: no reference count per command.
        let target = self.sess.as_ref().and_then(|s| s.target.as_deref());
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.data_digest_error {
            // PROTOCOL SERVICE CRC ERROR (SPC-4 Table 48 / RFC 7143 §11.4.7.2).
            t.scsi
                .set_check_condition(scsi::sense::ABORTED_COMMAND, 0x47, 0x05);
            self.finish_task(slot, cx);
            return;
        }
        let Some(entry) = target.and_then(|tg| tg.lun(t.lun)) else {
            let luns: Vec<u64> = target
                .map(|t| t.luns.iter().map(|l| l.lun).collect())
                .unwrap_or_default();
            scsi::execute_no_lun(&mut t.scsi, &luns);
            self.finish_task(slot, cx);
            return;
        };
        let sess = self.sess.as_ref();
        if deferred {
            // Held back when it arrived: its unit attention and reservation checks run now
            // that it starts (SAM-5 §5.14).
            let checked = sess.map_or(Ok(true), |s| {
                scsi::start_checks(&entry.device, &mut t.scsi, &s.pr_nexus)
            });
            match checked {
                Ok(true) => {}
                Ok(false) => {
                    self.finish_task(slot, cx);
                    return;
                }
                Err(sense) => {
                    t.scsi.fail(sense);
                    self.finish_task(slot, cx);
                    return;
                }
            }
        }
        t.state = TaskState::Executing;
        if let Some(pr) = sess.map(|s| &s.pr_nexus) {
            if let Some(aborts) = scsi::execute_reservation(&entry.device, &mut t.scsi, pr) {
                let device = entry.device.clone();
                self.preempt_and_abort(slot, device, aborts, cx);
                return;
            }
        }
        // EXTENDED COPY may name the other logical units of the session's target, and acts
        // for its I_T nexus (the only command that needs them: built for it alone).
        if scsi::spc::xcopy::wants_scope(&t.scsi) {
            t.scsi.copy_scope = sess.zip(target).map(|(s, tg)| {
                let luns = tg.luns.iter().map(|l| (&l.device, l.read_only));
                scsi::spc::xcopy::CopyScope::new(&s.pr_nexus, luns)
            });
        }
        match cx.port.execute(&entry.device, &mut t.scsi) {
            Exec::Done => self.finish_task(slot, cx),
            Exec::Pending => t.in_backend = true,
        }
    }

    /// Ends a reservation command that has run. PREEMPT AND ABORT (SPC-4 §5.13.11.2.4)
    /// aborts the tasks of the preempted I_T nexuses on the logical unit first: this
    /// nexus's own here, without a response (SAM-5: the nexus that caused it), those of other
    /// nexuses on every reactor, with TASK ABORTED (TAS=1 in our control mode page); the
    /// command's status goes once every reactor has done so.
    fn preempt_and_abort(
        &mut self,
        slot: usize,
        device: std::sync::Arc<scsi::Device>,
        mut aborts: Vec<u64>,
        cx: &mut ConnCtx<'_>,
    ) {
        // Without a session or target (not reachable from a logged-in PR OUT) there is
        // nothing to abort: the command is still answered.
        let Some(sess) = self.sess.as_ref() else {
            self.finish_task(slot, cx);
            return;
        };
        let own = sess.nexus;
        let Some(target) = sess.target.as_ref() else {
            self.finish_task(slot, cx);
            return;
        };
        let luns: Vec<u64> = target
            .luns
            .iter()
            .filter(|l| std::sync::Arc::ptr_eq(&l.device, &device))
            .map(|l| l.lun)
            .collect();
        let target = target.name.clone();
        if aborts.contains(&own) {
            let mine: Vec<usize> = self
                .tasks
                .slots()
                .filter(|&(i, x)| i != slot && luns.contains(&x.lun))
                .map(|(i, _)| i)
                .collect();
            for s in mine {
                self.abort_slot(s, cx.port);
            }
            aborts.retain(|&n| n != own);
        }
        let Some(itt) = self.tasks.get(slot).map(|t| t.itt) else {
            return;
        };
        if aborts.is_empty() {
            self.finish_task(slot, cx);
            return;
        }
        self.tmf_out.push((
            super::AbortScope {
                target,
                lun: None,
                requester: own,
                close: false,
                preempted: Some(super::Preempted {
                    device,
                    nexuses: aborts,
                }),
            },
            itt,
        ));
        self.pr_waits.push((itt, slot));
    }

    /// A backend completion for one of this connection's tasks.
    pub fn on_completion(&mut self, slot: usize, c: scsi::Completion, cx: &mut ConnCtx<'_>) {
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        t.in_backend = false;
        scsi::complete(&mut t.scsi, c);
        if t.state == TaskState::Aborted || matches!(self.phase, Phase::Closing | Phase::Closed) {
            let (answer, itt) = (t.answer_aborted, t.itt);
            self.remove_task(slot);
            if answer && self.phase == Phase::FullFeature {
                self.queue_task_aborted(itt);
            }
            self.release_tmf();
            if self.phase == Phase::Closed {
                self.release_session(&cx.shared.registry);
            }
            return;
        }
        self.finish_task(slot, cx);
    }

    /// Ends a task with CHECK CONDITION.
    fn fail_task(&mut self, slot: usize, key: u8, asc: u8, ascq: u8) {
        if let Some(t) = self.tasks.get_mut(slot) {
            t.scsi.set_check_condition(key, asc, ascq);
            t.state = TaskState::Responding;
        }
        // Sent by the next finish_task call from the receive path.
        self.respond(slot);
    }

    /// Builds the Data-In PDUs and/or the SCSI Response of a finished task, and starts the
    /// commands its completion lets start.
    fn finish_task(&mut self, slot: usize, cx: &mut ConnCtx<'_>) {
        self.respond_now(slot);
        self.start_released(cx);
    }

    /// Starts the held-back commands that the task set now lets start, oldest first. Cheap
    /// when nothing waits; not re-entered from the commands it starts (their completions only
    /// update the task set, and this loop goes on).
    pub(super) fn start_released(&mut self, cx: &mut ConnCtx<'_>) {
        if self.releasing || !self.order.has_waiting() || self.phase != Phase::FullFeature {
            return;
        }
        self.releasing = true;
        while let Some(slot) = self.order.next_ready() {
            let Some(t) = self.tasks.get_mut(slot) else {
                continue;
            };
            if let Some(o) = t.order.as_mut() {
                o.start();
            }
            // One still receiving its data (or waiting for a buffer) starts when that is in.
            if t.state == TaskState::Dormant {
                self.execute(slot, cx);
            }
        }
        self.releasing = false;
    }

    /// Builds the response of a finished task (what [`Conn::finish_task`] does, for callers
    /// without the reactor's context).
    pub(super) fn respond_now(&mut self, slot: usize) {
        if let Some(t) = self.tasks.get_mut(slot) {
            t.state = TaskState::Responding;
        }
        self.respond(slot);
    }

    fn respond(&mut self, slot: usize) {
        let max_xmit = self.max_xmit_data();
        let Some(sess) = self.sess.as_mut() else {
            return;
        };
        let max_burst = sess.params.max_burst_length.max(512) as usize;
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        // Completed: the commands it held back may start (the caller starts them).
        if let Some(o) = t.order.take() {
            self.order.complete(o);
        }
        // The task no longer counts as active once its status is decided.
        if let Some(info) = &sess.info {
            info.command_done();
        }
        let status = t.scsi.status;
        let sense_len = t.scsi.sense_len();
        // Residuals (RFC 7143 §11.4.5) against the amount the command transfers.
        let (xfer, is_read) = if t.read || (!t.write && t.scsi.data_in_len > 0) {
            (t.scsi.data_in_len, true)
        } else {
            (t.spdtl, false)
        };
        let (overflow, underflow, residual) = if xfer > t.edtl {
            (true, false, xfer - t.edtl)
        } else if xfer < t.edtl {
            (false, true, t.edtl - xfer)
        } else {
            (false, false, 0)
        };
        let data_len = if is_read && (status == STATUS_GOOD || sense_len == 0) {
            xfer.min(t.edtl) as usize
        } else if is_read {
            // SPC-4: data may accompany CHECK CONDITION only in rare cases; send none.
            0
        } else {
            0
        };
        let data_len = data_len.min(t.scsi.buf.as_ref().map_or(0, DataBuf::len));
        let itt = t.itt;
        let lun = pdu::encode_lun(t.lun);
        let collapse = status == STATUS_GOOD && sense_len == 0 && data_len > 0;
        // A RAM disk lends its own memory to a read, and a later write of the same blocks
        // changes the bytes still to be sent (SAM leaves that read's data undefined). A data
        // digest, though, is computed once and must match the bytes on the wire, or the
        // initiator sees a digest error and recovers the connection: with data digests the
        // data is copied into the buffer's own chunks first.
        if data_len > 0 && self.tx.data_digest() {
            if let Some(b) = t.scsi.buf.as_mut() {
                b.own();
            }
        }
        // Data-In PDUs, split at MaxXmitDataSegmentLength; F closes each MaxBurstLength sequence.
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        while offset < data_len {
            let len = (data_len - offset).min(max_xmit);
            let last = offset + len == data_len;
            let burst_end = last || (offset + len).is_multiple_of(max_burst);
            let mut din = pdu::DataIn {
                final_flag: burst_end,
                lun,
                itt,
                ttt: pdu::RESERVED_TAG,
                data_sn,
                buffer_offset: offset as u32,
                data_segment_length: len as u32,
                ..Default::default()
            };
            if last && collapse {
                din.status_flag = true;
                din.status = status;
                din.residual_overflow = overflow;
                din.residual_underflow = underflow;
                din.residual_count = residual;
                din.stat_sn = self.stat_sn;
                self.stat_sn = self.stat_sn.wrapping_add(1);
            }
            din.exp_cmd_sn = sess.exp_cmd_sn;
            din.max_cmd_sn = sess.max_cmd_sn;
            let mut bhs = [0u8; BHS_LEN];
            din.emit(&mut bhs);
            self.tx
                .push(TxPdu::new(bhs, TxData::Task { slot, offset }, len));
            t.tx_refs += 1;
            offset += len;
            data_sn += 1;
        }
        // The task no longer counts against the window once its status is decided.
        self.tasks.retire(slot);
        let sess = self.sess.as_mut().unwrap_or_else(|| unreachable!());
        update_max_cmd_sn(sess, self.tasks.active);
        if !collapse {
            let t = self.tasks.get(slot);
            let sense = t.map(|t| t.scsi.sense().to_vec()).unwrap_or_default();
            let mut data = Vec::new();
            if !sense.is_empty() {
                data.extend_from_slice(&(sense.len() as u16).to_be_bytes());
                data.extend_from_slice(&sense);
            }
            let rsp = pdu::ScsiResponse {
                itt,
                response: 0,
                status,
                residual_overflow: overflow,
                residual_underflow: underflow,
                residual_count: residual,
                stat_sn: self.stat_sn,
                exp_cmd_sn: sess.exp_cmd_sn,
                max_cmd_sn: sess.max_cmd_sn,
                exp_data_sn: data_sn,
                data_segment_length: data.len() as u32,
                ..Default::default()
            };
            self.stat_sn = self.stat_sn.wrapping_add(1);
            let mut bhs = [0u8; BHS_LEN];
            rsp.emit(&mut bhs);
            let len = data.len();
            self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
        }
        if self
            .tasks
            .get(slot)
            .is_some_and(|t| t.tx_refs == 0 && !t.in_backend)
        {
            self.remove_task(slot);
        }
    }

    /// Checks a non-immediate command's CmdSN against the window and advances ExpCmdSN.
    /// RFC 7143 §4.2.2.1: commands outside the window are silently ignored.
    pub(super) fn check_cmd_sn(&mut self, immediate: bool, cmd_sn: u32) -> bool {
        let active = self.tasks.active;
        let Some(sess) = self.sess.as_mut() else {
            return false;
        };
        if immediate {
            return true;
        }
        if cmd_sn != sess.exp_cmd_sn {
            debug!(
                "{}: CmdSN {} outside the window [{}, {}]; ignored",
                self.peer, cmd_sn, sess.exp_cmd_sn, sess.max_cmd_sn
            );
            return false;
        }
        if !seq::in_window(cmd_sn, sess.exp_cmd_sn, sess.max_cmd_sn) {
            return false;
        }
        sess.exp_cmd_sn = sess.exp_cmd_sn.wrapping_add(1);
        update_max_cmd_sn(sess, active + 1);
        true
    }
}

fn cmd_header(cmd: &pdu::ScsiCommand) -> [u8; BHS_LEN] {
    let mut raw = [0u8; BHS_LEN];
    cmd.emit(&mut raw);
    raw
}

/// A data buffer of `len` bytes for a session that holds `held` bytes of its `share`: `None`
/// when the pool is exhausted or the session would exceed its share (the command then waits,
/// as for an exhausted pool). A session holding nothing may always try.
fn session_alloc(held: &mut usize, share: usize, len: usize) -> Option<DataBuf> {
    if *held > 0 && held.saturating_add(len) > share {
        return None;
    }
    let buf = DataBuf::alloc(len)?;
    *held += buf.len();
    Some(buf)
}

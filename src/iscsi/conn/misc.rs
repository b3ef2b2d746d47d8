//! The other PDUs of full feature phase: NOP-Out and NOP-In, Text, Logout, Asynchronous Message
//! and Reject.

use std::time::Instant;

use log::debug;

use crate::iscsi::negotiate::SessionType;
use crate::iscsi::pdu::{self, BHS_LEN};
use crate::iscsi::tx::{TxData, TxPdu};

use super::{Conn, ConnCtx, Phase};

/// A text request longer than this is refused (RFC 7143 §6.2 sets 64 KiB for login text).
const MAX_TEXT: usize = 64 * 1024;

fn text_header(t: &pdu::TextRequest) -> [u8; BHS_LEN] {
    let mut raw = [0u8; BHS_LEN];
    t.emit(&mut raw);
    raw
}

impl Conn {
    pub(super) fn handle_nop_out(&mut self, n: &pdu::NopOut, data: Vec<u8>) {
        if !n.immediate && !self.check_cmd_sn(false, n.cmd_sn) {
            return;
        }
        if n.itt == pdu::RESERVED_TAG {
            // The answer to our NOP-In ping (RFC 7143 §11.18): no reply.
            return;
        }
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let mut data = data;
        data.truncate(self.max_xmit_data());
        let nop = pdu::NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: pdu::RESERVED_TAG,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        nop.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    pub(super) fn handle_text(
        &mut self,
        t: &pdu::TextRequest,
        data: Vec<u8>,
        cx: &mut ConnCtx<'_>,
    ) {
        if !t.immediate && !self.check_cmd_sn(false, t.cmd_sn) {
            return;
        }
        if self.sess.is_none() {
            return;
        }
        // The rest of a long answer, asked for with our TTT and no data (RFC 7143 §11.10).
        let continuing = self
            .text_in
            .as_ref()
            .is_some_and(|(itt, ttt, _)| *itt == t.itt && *ttt == t.ttt);
        if t.ttt != pdu::RESERVED_TAG && !continuing {
            match self.text_out.take() {
                Some((ttt, itt, rest)) if ttt == t.ttt && itt == t.itt => {
                    self.send_text_part(t, ttt, rest);
                }
                _ => {
                    // An unknown TTT.
                    let raw = text_header(t);
                    self.queue_reject(pdu::REJECT_INVALID_PDU_FIELD, &raw);
                }
            }
            return;
        }
        // A request continued over several PDUs (C=1): gather, answer each with an empty
        // response whose TTT the initiator echoes with the next part.
        if !continuing {
            self.text_in = Some((t.itt, pdu::RESERVED_TAG, Vec::new()));
        }
        let Some((_, _, buf)) = self.text_in.as_mut() else {
            return;
        };
        buf.extend_from_slice(&data);
        if buf.len() > MAX_TEXT {
            self.text_in = None;
            let raw = text_header(t);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return;
        }
        if t.cont {
            let ttt = self.next_text_ttt();
            if let Some(x) = self.text_in.as_mut() {
                x.1 = ttt;
            }
            self.queue_text_response(t.itt, t.lun, ttt, false, false, Vec::new());
            return;
        }
        let data = self.text_in.take().map(|(_, _, d)| d).unwrap_or_default();
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let local_ip = self.local.ip().to_string();
        let targets: Vec<(String, Vec<String>)> = cx
            .snapshot
            .targets
            .values()
            .filter(|t| t.enabled && t.portal_allowed(&local_ip))
            .map(|t| {
                let addrs = cx
                    .shared
                    .portals_for(self.local)
                    .into_iter()
                    .filter(|a| t.portal_allowed(portal_ip(a)))
                    .collect();
                (t.name.clone(), addrs)
            })
            .collect();
        let current = match sess.params.session_type {
            SessionType::Normal => Some(sess.params.target_name.as_str()),
            SessionType::Discovery => None,
        };
        let resp_data =
            crate::iscsi::login::text_request(&data, sess.params.session_type, current, &targets);
        let Ok(resp_data) = resp_data else {
            let raw = text_header(t);
            self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &raw);
            return;
        };
        let ttt = self.next_text_ttt();
        self.send_text_part(t, ttt, resp_data);
    }

    /// Sends as much of a text answer as the initiator takes in one PDU; a longer answer
    /// continues (C=1) when the initiator asks with `ttt`.
    fn send_text_part(&mut self, t: &pdu::TextRequest, ttt: u32, mut data: Vec<u8>) {
        let max = self.max_xmit_data();
        if data.len() > max {
            let rest = data.split_off(max);
            self.text_out = Some((ttt, t.itt, rest));
            self.queue_text_response(t.itt, t.lun, ttt, false, true, data);
        } else {
            self.queue_text_response(t.itt, t.lun, pdu::RESERVED_TAG, true, false, data);
        }
    }

    fn next_text_ttt(&mut self) -> u32 {
        self.text_ttt = self.text_ttt.wrapping_add(1) & 0x7fff_ffff;
        self.text_ttt.max(1)
    }

    fn queue_text_response(
        &mut self,
        itt: u32,
        lun: u64,
        ttt: u32,
        final_flag: bool,
        cont: bool,
        data: Vec<u8>,
    ) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let resp = pdu::TextResponse {
            final_flag,
            cont,
            lun,
            itt,
            ttt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        resp.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    pub(super) fn handle_logout(&mut self, l: &pdu::LogoutRequest, cx: &mut ConnCtx<'_>) {
        if !l.immediate {
            let _ = self.check_cmd_sn(false, l.cmd_sn);
        }
        // ERL 0: outstanding commands of the session are dropped (RFC 7143 §11.14).
        self.abort_all(cx.port);
        let response = match l.reason_code {
            0 | 1 => 0,
            // Removing a connection for recovery needs ERL 2.
            _ => 2,
        };
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let resp = pdu::LogoutResponse {
            response,
            itt: l.itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            time2wait: 0,
            time2retain: 0,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        resp.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
        debug!("{}: logout", self.peer);
        self.phase = Phase::Closing;
        let _ = cx;
    }

    pub(super) fn queue_reject(&mut self, reason: u8, raw: &[u8; BHS_LEN]) {
        let (exp_cmd_sn, max_cmd_sn) = self
            .sess
            .as_ref()
            .map_or((0, 0), |s| (s.exp_cmd_sn, s.max_cmd_sn));
        let rej = pdu::Reject {
            reason,
            stat_sn: self.stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            data_sn: 0,
            data_segment_length: BHS_LEN as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        rej.emit(&mut bhs);
        self.tx
            .push(TxPdu::new(bhs, TxData::Owned(raw.to_vec()), BHS_LEN));
    }

    pub(super) fn send_nop_in(&mut self, now: Instant) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let ttt = self.next_nop_ttt;
        self.next_nop_ttt = self.next_nop_ttt.wrapping_add(1).max(1);
        if self.next_nop_ttt == pdu::RESERVED_TAG {
            self.next_nop_ttt = 1;
        }
        let nop = pdu::NopIn {
            lun: 0,
            itt: pdu::RESERVED_TAG,
            ttt,
            // RFC 7143 §11.19: StatSN is not advanced for a ping.
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            ..Default::default()
        };
        let mut bhs = [0u8; BHS_LEN];
        nop.emit(&mut bhs);
        self.tx.push(TxPdu::new(bhs, TxData::None, 0));
        self.nop_ping = Some((ttt, now));
    }

    /// Queues an Asynchronous Message (RFC 7143 §11.9); it takes a StatSN like a response.
    pub(super) fn queue_async(&mut self, event: u8, lun: u64, param3: u16, data: Vec<u8>) {
        let Some(sess) = self.sess.as_ref() else {
            return;
        };
        let m = pdu::AsyncMessage {
            lun: pdu::encode_lun(lun),
            stat_sn: self.stat_sn,
            exp_cmd_sn: sess.exp_cmd_sn,
            max_cmd_sn: sess.max_cmd_sn,
            async_event: event,
            parameter3: param3,
            data_segment_length: data.len() as u32,
            ..Default::default()
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let mut bhs = [0u8; BHS_LEN];
        m.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    /// Asks the initiator to log out within `secs` seconds (AsyncEvent 1), as the target
    /// does before it stops. Returns whether the connection is in full feature phase (and so
    /// was asked).
    pub fn request_logout(&mut self, secs: u16) -> bool {
        if self.phase != Phase::FullFeature || self.sess.is_none() {
            return false;
        }
        self.queue_async(1, 0, secs, Vec::new());
        true
    }
}

/// The address part of a TargetAddress value (`10.0.0.1:3260,1`, `[fe80::1]:3260,1`).
fn portal_ip(addr: &str) -> &str {
    let a = addr.split(',').next().unwrap_or(addr);
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    a.rsplit_once(':').map_or(a, |(ip, _)| ip)
}

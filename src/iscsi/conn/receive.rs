//! Receiving PDUs: the BHS, AHS, digests and data segment of each PDU, its payload placed where
//! it belongs (straight into a command's buffer when it can), and the whole PDU handed on.

use std::io::IoSliceMut;

use log::{debug, warn};

use crate::iscsi::pdu::{self, Pdu, BHS_LEN};
use crate::iscsi::rx::{self, Fill};

use super::{opcode_name, Conn, ConnCtx, Dest, PduHeader, Phase, RxState};

/// How many PDUs one readiness event may process before other connections get their turn.
const RX_BUDGET: usize = 64;

/// Most pieces a direct receive scatters into: one per chunk of the largest buffer.
const DIRECT_SEGS: usize = crate::env::buf::MAX_TRANSFER / crate::env::buf::CHUNK_SIZE;

impl Conn {
    /// The socket is readable: receive and handle PDUs. Returns whether anything happened.
    pub fn on_readable(&mut self, cx: &mut ConnCtx<'_>) -> bool {
        if matches!(self.phase, Phase::Closing | Phase::Closed) {
            // Discard input while closing; a peer that closed is noticed here.
            let mut scratch = [0u8; 4096];
            if let Ok(0) = cx.net.recv(self.sock, &mut scratch) {
                self.close(cx, "peer closed");
            }
            return false;
        }
        let mut did = false;
        self.rx_more = false;
        self.rx_drained = false;
        if !self.wants_read() {
            // Its answers are not being read: read on once they drain (the reactor stops
            // polling the socket for input meanwhile).
            return false;
        }
        for i in 0..RX_BUDGET {
            match self.rx_step(cx) {
                Ok(true) => did = true,
                Ok(false) => break,
                Err(why) => {
                    self.close(cx, &why);
                    return true;
                }
            }
            if matches!(self.phase, Phase::Closing | Phase::Closed) || !self.wants_read() {
                break;
            }
            self.rx_more = i + 1 == RX_BUDGET;
        }
        if did {
            self.last_rx = cx.now;
            self.heard = true;
            self.nop_ping = None;
        }
        // The reactor flushes once per pass, after backend completions, so the responses of
        // everything received and completed in one pass leave in one writev.
        did
    }

    /// One step of the receive machine: `Ok(true)` if progress was made.
    fn rx_step(&mut self, cx: &mut ConnCtx<'_>) -> Result<bool, String> {
        match &mut self.rx_state {
            RxState::Header => {
                if self.staging.len() < BHS_LEN {
                    return self.fill(cx);
                }
                let avail = self.staging.available();
                let mut raw = [0u8; BHS_LEN];
                raw.copy_from_slice(&avail[..BHS_LEN]);
                let ahs_len = usize::from(raw[4]) * 4;
                let data_len =
                    (usize::from(raw[5]) << 16) | (usize::from(raw[6]) << 8) | usize::from(raw[7]);
                let hd = if self.rx_header_digest { 4 } else { 0 };
                if self.staging.len() < BHS_LEN + ahs_len + hd {
                    return self.fill(cx);
                }
                let ahs = avail[BHS_LEN..BHS_LEN + ahs_len].to_vec();
                if hd > 0 {
                    // RFC 7143 §7.8: a header digest error leaves nothing of the PDU to trust
                    // (not even its length); at ERL 0 the connection ends.
                    let got = &avail[BHS_LEN + ahs_len..BHS_LEN + ahs_len + 4];
                    let crc = crc32c::crc32c(&avail[..BHS_LEN + ahs_len]);
                    if crc.to_le_bytes() != got {
                        return Err(format!(
                            "header digest error on a {} PDU",
                            opcode_name(raw[0])
                        ));
                    }
                }
                self.staging.consume(BHS_LEN + ahs_len + hd);
                let digest_left = if self.rx_data_digest && data_len > 0 {
                    4
                } else {
                    0
                };
                let max = self.max_recv_data();
                if data_len > max {
                    return Err(format!(
                        "PDU data segment of {data_len} bytes exceeds MaxRecvDataSegmentLength {max}"
                    ));
                }
                let pdu = match Pdu::parse(&raw, &ahs) {
                    Ok(p) => p,
                    Err(e) => {
                        if self.phase == Phase::FullFeature {
                            // RFC 7143 §11.17: answer an unknown opcode with Reject and go on.
                            debug!("{}: {e}; rejecting", self.peer);
                            self.queue_reject(pdu::REJECT_COMMAND_NOT_SUPPORTED, &raw);
                            self.rx_hdr = Some(PduHeader { pdu: None, raw });
                            self.rx_state = RxState::Payload {
                                dest: Dest::Discard,
                                remaining: data_len,
                                pad: pdu::padded(data_len) - data_len,
                                pos: 0,
                                crc: 0,
                                digest_left,
                                digest: [0; 4],
                            };
                            return Ok(true);
                        }
                        return Err(format!("malformed PDU during login: {e}"));
                    }
                };
                let dest = self.begin_pdu(&pdu, &raw, data_len, cx);
                self.rx_hdr = Some(PduHeader {
                    pdu: Some(pdu),
                    raw,
                });
                self.rx_state = RxState::Payload {
                    dest,
                    remaining: data_len,
                    pad: pdu::padded(data_len) - data_len,
                    pos: 0,
                    crc: 0,
                    digest_left,
                    digest: [0; 4],
                };
                Ok(true)
            }
            RxState::Payload {
                dest,
                remaining,
                pad,
                pos,
                crc,
                digest_left,
                digest,
                ..
            } => {
                let want_crc = *digest_left > 0;
                if *remaining > 0 {
                    if self.staging.is_empty() {
                        // Large payloads go straight into their buffer.
                        if let Dest::Task { slot, offset } = dest {
                            if *remaining >= rx::DIRECT_MIN {
                                if let Some(buf) =
                                    self.tasks.get_mut(*slot).and_then(|t| t.scsi.buf.as_mut())
                                {
                                    let start = *offset + *pos;
                                    let n_in_buf = buf.len().saturating_sub(start).min(*remaining);
                                    if n_in_buf > 0 {
                                        // On the stack: a range of a buffer spans at most
                                        // MAX_TRANSFER / CHUNK_SIZE chunks.
                                        let mut segs: [IoSliceMut<'_>; DIRECT_SEGS] =
                                            std::array::from_fn(|_| IoSliceMut::new(&mut []));
                                        let mut k = 0;
                                        for (slot, seg) in
                                            segs.iter_mut().zip(buf.segments_mut(start, n_in_buf))
                                        {
                                            *slot = IoSliceMut::new(seg);
                                            k += 1;
                                        }
                                        let segs = &mut segs[..k];
                                        if self.rx_drained {
                                            return Ok(false);
                                        }
                                        return match rx::recv_direct(cx.net, self.sock, segs) {
                                            Ok(Some(n)) => {
                                                self.rx_drained = n < n_in_buf;
                                                if want_crc {
                                                    for seg in buf.segments(start, n) {
                                                        *crc = crc32c::crc32c_append(*crc, seg);
                                                    }
                                                }
                                                *remaining -= n;
                                                *pos += n;
                                                Ok(n > 0)
                                            }
                                            Ok(None) => Ok(false),
                                            Err(e) => Err(format!("receive failed: {e}")),
                                        };
                                    }
                                }
                            }
                        }
                        return self.fill(cx);
                    }
                    let avail = self.staging.available();
                    let n = avail.len().min(*remaining);
                    if want_crc {
                        *crc = crc32c::crc32c_append(*crc, &avail[..n]);
                    }
                    match dest {
                        Dest::Discard => {}
                        Dest::Collect(v) => v.extend_from_slice(&avail[..n]),
                        Dest::Task { slot, offset } => {
                            if let Some(buf) =
                                self.tasks.get_mut(*slot).and_then(|t| t.scsi.buf.as_mut())
                            {
                                buf.write_at(*offset + *pos, &avail[..n]);
                            }
                        }
                    }
                    self.staging.consume(n);
                    *remaining -= n;
                    *pos += n;
                    return Ok(true);
                }
                if *pad > 0 {
                    if self.staging.is_empty() {
                        return self.fill(cx);
                    }
                    let n = self.staging.len().min(*pad);
                    if want_crc {
                        *crc = crc32c::crc32c_append(*crc, &self.staging.available()[..n]);
                    }
                    self.staging.consume(n);
                    *pad -= n;
                    return Ok(true);
                }
                if *digest_left > 0 {
                    if self.staging.is_empty() {
                        return self.fill(cx);
                    }
                    let n = self.staging.len().min(*digest_left);
                    let at = 4 - *digest_left;
                    digest[at..at + n].copy_from_slice(&self.staging.available()[..n]);
                    self.staging.consume(n);
                    *digest_left -= n;
                    return Ok(true);
                }
                let RxState::Payload {
                    dest,
                    pos,
                    crc,
                    digest,
                    ..
                } = std::mem::replace(&mut self.rx_state, RxState::Header)
                else {
                    return Ok(true);
                };
                let Some(hdr) = self.rx_hdr.take() else {
                    return Ok(true);
                };
                let digest_ok = !self.rx_data_digest || pos == 0 || crc.to_le_bytes() == digest;
                self.end_pdu(hdr, dest, pos, digest_ok, cx);
                Ok(true)
            }
        }
    }

    fn fill(&mut self, cx: &mut ConnCtx<'_>) -> Result<bool, String> {
        if self.rx_drained {
            return Ok(false);
        }
        match self.staging.fill(cx.net, self.sock) {
            Ok(Fill::Data(n)) => Ok(n > 0),
            Ok(Fill::Short(n)) => {
                self.rx_drained = true;
                Ok(n > 0)
            }
            Ok(Fill::WouldBlock) => Ok(false),
            Ok(Fill::Closed) => Err("peer closed the connection".into()),
            Err(e) => Err(format!("receive failed: {e}")),
        }
    }

    /// A header arrived: decide where its payload goes (and admit SCSI commands, so that
    /// immediate data lands in the command's own buffer).
    fn begin_pdu(
        &mut self,
        pdu: &Pdu,
        raw: &[u8; BHS_LEN],
        data_len: usize,
        cx: &mut ConnCtx<'_>,
    ) -> Dest {
        if self.phase == Phase::Login {
            return Dest::Collect(Vec::with_capacity(data_len));
        }
        match pdu {
            Pdu::ScsiCommand(cmd) => match self.admit_command(cmd, data_len, cx) {
                Some(slot) if data_len > 0 && self.is_parked(slot) => {
                    // Slow path: no buffer yet, keep the immediate data aside.
                    Dest::Collect(Vec::with_capacity(data_len))
                }
                Some(slot) if data_len > 0 => Dest::Task { slot, offset: 0 },
                _ => Dest::Discard,
            },
            Pdu::DataOut(d) => match self.admit_data_out(d, data_len) {
                Some((slot, offset)) => Dest::Task { slot, offset },
                None => Dest::Discard,
            },
            _ if data_len == 0 => Dest::Discard,
            _ => {
                let _ = raw;
                Dest::Collect(Vec::with_capacity(data_len))
            }
        }
    }

    /// A whole PDU (header and payload) arrived.
    fn end_pdu(
        &mut self,
        hdr: PduHeader,
        dest: Dest,
        received: usize,
        digest_ok: bool,
        cx: &mut ConnCtx<'_>,
    ) {
        let data = match dest {
            Dest::Collect(v) => v,
            _ => Vec::new(),
        };
        if self.phase == Phase::Login {
            self.handle_login_pdu(hdr, data, cx);
            return;
        }
        let Some(pdu) = hdr.pdu else { return };
        if !digest_ok {
            // RFC 7143 §7.8: Reject the PDU with "data digest error" and discard its payload.
            // The data of a SCSI write still counts towards the transfer, so the command ends
            // when all of it has arrived, with CHECK CONDITION and nothing written (ERL 0).
            warn!(
                "{}: data digest error on a {} PDU",
                self.peer,
                opcode_name(hdr.raw[0])
            );
            self.queue_reject(pdu::REJECT_DATA_DIGEST_ERROR, &hdr.raw);
            let itt = match &pdu {
                Pdu::ScsiCommand(c) => Some(c.itt),
                Pdu::DataOut(d) => Some(d.itt),
                _ => None,
            };
            let Some(itt) = itt else { return };
            if let Some(t) = self.tasks.by_itt(itt).and_then(|s| self.tasks.get_mut(s)) {
                t.data_digest_error = true;
            }
        }
        match pdu {
            Pdu::ScsiCommand(cmd) => {
                if let Some(w) = self
                    .buf_waiters
                    .iter_mut()
                    .find(|w| w.itt == cmd.itt && !w.arrived)
                {
                    w.arrived = true;
                    w.data = data;
                } else {
                    self.command_data_done(cmd.itt, received as u32, cx);
                }
            }
            Pdu::DataOut(d) => self.data_out_done(&d, received as u32, cx),
            Pdu::NopOut(n) => self.handle_nop_out(&n, data),
            Pdu::TextRequest(t) => self.handle_text(&t, data, cx),
            Pdu::LogoutRequest(l) => self.handle_logout(&l, cx),
            Pdu::TaskMgmtRequest(t) => self.handle_tmf(&t, cx),
            Pdu::LoginRequest(_) => {
                // RFC 7143 §6.1: a Login Request in full feature phase is a protocol error.
                self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &hdr.raw);
            }
            Pdu::Snack(_) => {
                // ERL 0: SNACK is not supported (RFC 7143 §11.16).
                self.queue_reject(pdu::REJECT_SNACK_REJECT, &hdr.raw);
            }
            _ => {
                // A target-side opcode sent by the initiator.
                self.queue_reject(pdu::REJECT_PROTOCOL_ERROR, &hdr.raw);
            }
        }
    }
}

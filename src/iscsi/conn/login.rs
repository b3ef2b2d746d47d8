//! Login (RFC 7143 §6): Login Requests, Login Responses sent in parts, session reinstatement
//! (§6.3.5) and the start of the session in full feature phase.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{info, warn};

use crate::iscsi::config::Snapshot;
use crate::iscsi::login::{LoginRequestFields, LoginStep, LoginTarget, TargetLookup};
use crate::iscsi::negotiate::{SessionParams, SessionType};
use crate::iscsi::pdu::{self, Pdu, BHS_LEN};
use crate::iscsi::registry::{ConnInfo, SessionInfo};
use crate::iscsi::tx::{TxData, TxPdu};
use crate::scsi;

use super::{opcode_name, Conn, ConnCtx, PduHeader, Phase, Session, LOGIN_MAX_DATA};

/// A Login Response whose text does not fit in one PDU (RFC 7143 §11.13.3: C=1, T=0 on every
/// part but the last). The initiator asks for each further part with an empty Login Request;
/// the last part carries the response's own flags and status, and what the login step decided
/// happens only then.
pub(super) struct LoginTail {
    resp: pdu::LoginResponse,
    data: Vec<u8>,
    sent: usize,
    then: LoginThen,
}

enum LoginThen {
    Continue,
    Complete(Box<SessionParams>, [u8; 6], u32),
}

/// Where to cut `data[from..]` for a PDU of at most `max` bytes: after the last key=value pair
/// that fits (pairs may span PDUs, RFC 7143 §6.1, but whole ones are kinder to initiators),
/// or at `max` when a single pair is longer.
fn text_cut(data: &[u8], from: usize, max: usize) -> usize {
    let end = from.saturating_add(max).min(data.len());
    if end == data.len() {
        return end;
    }
    match data[from..end].iter().rposition(|&b| b == 0) {
        Some(i) => from + i + 1,
        None => end,
    }
}

struct Lookup<'a> {
    snap: &'a Snapshot,
    /// The local address the initiator connected to (for `allowed_portal`).
    local_ip: String,
    registry: &'a crate::iscsi::registry::Registry,
}

impl TargetLookup for Lookup<'_> {
    fn target(&self, name: &str, initiator: &str, isid: [u8; 6]) -> Option<LoginTarget> {
        let t = self.snap.targets.get(name)?;
        if !t.enabled || !t.portal_allowed(&self.local_ip) {
            return None;
        }
        let max = t.params.max_sessions;
        let sessions_full = max > 0 && {
            // A login that reinstates one of the initiator's own sessions does not add one.
            let isid = isid_u48(&isid);
            let others = self
                .registry
                .sessions(name)
                .into_iter()
                .filter(|(_, s)| {
                    !(s.initiator_name == initiator && s.sid & 0xffff_ffff_ffff == isid)
                })
                .count();
            others >= max as usize
        };
        Some(LoginTarget {
            params: t.params.clone(),
            alias: t.alias.clone(),
            auth: t.auth.clone(),
            redirect: t.redirect.clone(),
            sessions_full,
        })
    }

    fn discovery_auth(&self) -> crate::iscsi::login::Auth {
        self.snap.discovery_auth.clone()
    }

    fn session_exists(&self, isid: [u8; 6], tsih: u16) -> bool {
        self.registry
            .contains_sid((u64::from(tsih) << 48) | isid_u48(&isid))
    }
}

impl Conn {
    pub(super) fn handle_login_pdu(&mut self, hdr: PduHeader, data: Vec<u8>, cx: &mut ConnCtx<'_>) {
        let Some(Pdu::LoginRequest(req)) = hdr.pdu else {
            // RFC 7143 §6: only Login Requests are allowed before full feature phase.
            warn!(
                "{}: {} PDU before login completed; closing",
                self.peer,
                opcode_name(hdr.raw[0])
            );
            let resp = pdu::LoginResponse {
                itt: u32::from_be_bytes([hdr.raw[16], hdr.raw[17], hdr.raw[18], hdr.raw[19]]),
                status_class: 2,
                status_detail: 0,
                ..Default::default()
            };
            self.queue_login_response(resp, Vec::new());
            self.phase = Phase::Closing;
            return;
        };
        let fields = LoginRequestFields {
            transit: req.transit,
            cont: req.cont,
            csg: req.csg,
            nsg: req.nsg,
            version_max: req.version_max,
            version_min: req.version_min,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            cid: req.cid,
            cmd_sn: req.cmd_sn,
            exp_stat_sn: req.exp_stat_sn,
            data,
        };
        self.cid = req.cid;
        if !cx.snapshot.iscsi_enabled {
            let resp = pdu::LoginResponse {
                itt: req.itt,
                isid: req.isid,
                status_class: 3,
                status_detail: 1, // service unavailable
                ..Default::default()
            };
            self.queue_login_response(resp, Vec::new());
            self.phase = Phase::Closing;
            return;
        }
        if self.login_tail.is_some() {
            // RFC 7143 §11.13.3: the initiator answers a C=1 Login Response with an empty
            // Login Request; anything else breaks the exchange, and so does a request while
            // the final response waits for a reinstated session to end.
            if !fields.data.is_empty() || req.cont || self.reinstating {
                self.reinstating = false;
                self.login_tail = None;
                let resp = pdu::LoginResponse {
                    itt: req.itt,
                    isid: req.isid,
                    status_class: 2,
                    status_detail: 0,
                    ..Default::default()
                };
                warn!(
                    "{}: Login Request with text while a continued Login Response was pending",
                    self.peer
                );
                self.queue_login_response(resp, Vec::new());
                self.phase = Phase::Closing;
                return;
            }
            self.send_login_part(cx);
            return;
        }
        let Some(login) = self.login.as_mut() else {
            return;
        };
        let lookup = Lookup {
            snap: cx.snapshot,
            local_ip: self.local.ip().to_string(),
            registry: &cx.shared.registry,
        };
        let step = login.step(&fields, &lookup);
        let exp_cmd_sn = req.cmd_sn;
        match step {
            LoginStep::Continue(r) => {
                let data = r.data.clone();
                self.login_tail = Some(LoginTail {
                    resp: login_resp(&r, exp_cmd_sn),
                    data,
                    sent: 0,
                    then: LoginThen::Continue,
                });
                self.send_login_part(cx);
            }
            LoginStep::Fail(r) => {
                let who = login.initiator_name().unwrap_or("an unnamed initiator");
                match login.failure_reason() {
                    Some(why) => warn!(
                        "{}: login of {who} refused with status {:02x}{:02x}: {why}",
                        self.peer, r.status_class, r.status_detail
                    ),
                    None => info!(
                        "{}: login of {who} failed with status {:02x}{:02x}",
                        self.peer, r.status_class, r.status_detail
                    ),
                }
                // The status is what matters in a refusal: its text is cut to one PDU.
                let mut data = r.data.clone();
                data.truncate(text_cut(&data, 0, LOGIN_MAX_DATA));
                self.queue_login_response(login_resp(&r, exp_cmd_sn), data);
                self.phase = Phase::Closing;
            }
            LoginStep::Complete(mut r, params) => {
                r.tsih = cx.shared.next_tsih();
                let data = r.data.clone();
                self.stat_sn = req.exp_stat_sn;
                self.login_tail = Some(LoginTail {
                    resp: login_resp(&r, exp_cmd_sn),
                    data,
                    sent: 0,
                    then: LoginThen::Complete(Box::new(params), req.isid, exp_cmd_sn),
                });
                // RFC 7143 §6.3.5: a login with the ISID of a session still there reinstates
                // it. The old session must be gone, its commands ended and none of its writes
                // still on their way to the medium, before the new one may issue any: ask it
                // to close and hold the final response until it has (on_timer).
                let old = self.sessions_reinstated(cx);
                if old.is_empty() {
                    self.send_login_part(cx);
                } else {
                    for o in &old {
                        info!(
                            "{}: reinstating session {:x} of {}",
                            self.peer, o.sid, o.initiator_name
                        );
                        o.reinstating.store(true, Ordering::Relaxed);
                        o.close_requested.store(true, Ordering::Relaxed);
                    }
                    self.reinstating = true;
                }
            }
        }
    }

    /// The sessions of the I_T nexus the pending login would start (same initiator name and
    /// ISID at the same target), running or still draining after their connection closed.
    fn sessions_reinstated(&self, cx: &ConnCtx<'_>) -> Vec<Arc<SessionInfo>> {
        let Some(LoginTail {
            then: LoginThen::Complete(params, isid, _),
            ..
        }) = &self.login_tail
        else {
            return Vec::new();
        };
        if params.session_type != SessionType::Normal {
            return Vec::new();
        }
        let isid = isid_u48(isid);
        cx.shared
            .registry
            .sessions(&params.target_name)
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| {
                s.initiator_name == params.initiator_name && s.sid & 0xffff_ffff_ffff == isid
            })
            .collect()
    }

    /// A reinstating login: once the old session has gone, the login completes; if it has not
    /// gone by the end of the login timeout (its backend does not answer), the login is
    /// refused as "service unavailable" and the initiator may try again later.
    pub(super) fn check_reinstatement(&mut self, cx: &mut ConnCtx<'_>) {
        if self.sessions_reinstated(cx).is_empty() {
            self.reinstating = false;
            self.send_login_part(cx);
            self.flush(cx);
        } else if cx.now >= self.login_deadline {
            self.reinstating = false;
            let Some(tail) = self.login_tail.take() else {
                return;
            };
            warn!(
                "{}: the session being reinstated did not end within the login timeout; login refused",
                self.peer
            );
            let resp = pdu::LoginResponse {
                status_class: 3,
                status_detail: 1,
                tsih: 0,
                transit: false,
                ..tail.resp
            };
            self.queue_login_response(resp, Vec::new());
            self.phase = Phase::Closing;
            self.flush(cx);
        }
    }

    /// Sends the next part of the pending Login Response; after the last one, does what the
    /// login step decided (full feature phase starts after the final response).
    fn send_login_part(&mut self, cx: &mut ConnCtx<'_>) {
        let Some(mut tail) = self.login_tail.take() else {
            return;
        };
        let end = text_cut(&tail.data, tail.sent, LOGIN_MAX_DATA);
        let part = tail.data[tail.sent..end].to_vec();
        if end < tail.data.len() {
            let resp = pdu::LoginResponse {
                transit: false,
                cont: true,
                nsg: 0,
                tsih: 0,
                status_class: 0,
                status_detail: 0,
                ..tail.resp.clone()
            };
            tail.sent = end;
            self.queue_login_response(resp, part);
            self.login_tail = Some(tail);
            return;
        }
        let mut resp = tail.resp;
        match tail.then {
            LoginThen::Continue => self.queue_login_response(resp, part),
            LoginThen::Complete(params, isid, exp_cmd_sn) => {
                let (hd, dd) = (params.header_digest, params.data_digest);
                self.start_session(*params, isid, resp.tsih, exp_cmd_sn, cx);
                if let Some(s) = &self.sess {
                    resp.max_cmd_sn = s.max_cmd_sn;
                }
                self.queue_login_response(resp, part);
                // Digests start with the first PDU after the final Login Response.
                self.tx.set_digests(hd, dd);
                self.rx_header_digest = hd;
                self.rx_data_digest = dd;
                self.login = None;
            }
        }
    }

    fn queue_login_response(&mut self, mut resp: pdu::LoginResponse, data: Vec<u8>) {
        resp.stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        if resp.max_cmd_sn == 0 && resp.exp_cmd_sn == 0 {
            resp.max_cmd_sn = 0;
        }
        resp.data_segment_length = data.len() as u32;
        let mut bhs = [0u8; BHS_LEN];
        resp.emit(&mut bhs);
        let len = data.len();
        self.tx.push(TxPdu::new(bhs, TxData::Owned(data), len));
    }

    fn start_session(
        &mut self,
        params: SessionParams,
        isid: [u8; 6],
        tsih: u16,
        cmd_sn: u32,
        cx: &mut ConnCtx<'_>,
    ) {
        let target = match params.session_type {
            SessionType::Normal => cx
                .snapshot
                .targets
                .get(&params.target_name)
                .map(|t| t.view_for(&params.initiator_name)),
            SessionType::Discovery => None,
        };
        let nexus = (u64::from(tsih) << 48) | isid_u48(&isid);
        let pr_nexus = scsi::pr::Nexus::new(
            &params.initiator_name,
            isid,
            target.as_ref().map_or(0, |t| t.rel_tgt_id),
        );
        if let Some(t) = &target {
            // Session reinstatement (RFC 7143 §6.3.5): a login with TSIH 0 whose InitiatorName
            // and ISID match a running session replaces it. The old session leaves the
            // registry now and its connection closes on its next timer tick.
            for (_, old) in cx.shared.registry.sessions(&t.name) {
                if old.initiator_name == params.initiator_name
                    && old.sid & 0xffff_ffff_ffff == isid_u48(&isid)
                {
                    info!(
                        "{}: session {:x} of {} reinstated",
                        self.peer, old.sid, old.initiator_name
                    );
                    old.close_requested.store(true, Ordering::Relaxed);
                    cx.shared.registry.remove(&t.name, old.sid);
                }
            }
        }
        let info = target.as_ref().map(|t| {
            let info = Arc::new(SessionInfo {
                sid: nexus,
                target: t.name.clone(),
                initiator_name: params.initiator_name.clone(),
                params: params.tree_values(),
                connections: std::sync::Mutex::new(vec![ConnInfo {
                    cid: self.cid,
                    ip: self.peer.ip().to_string(),
                    target_ip: self.local.ip().to_string(),
                    state: "established".into(),
                }]),
                commands: Default::default(),
                active_commands: Default::default(),
                reinstating: Default::default(),
                close_requested: Default::default(),
            });
            cx.shared.registry.add(info.clone());
            for l in &t.luns {
                l.device.register_nexus(nexus, &pr_nexus);
            }
            info!(
                "{}: session {:x} of {} logged in to {}",
                self.peer, nexus, params.initiator_name, t.name
            );
            info
        });
        let queued = params.queued_commands.max(1);
        self.phase = Phase::FullFeature;
        let target_name = target.as_ref().map(|t| t.name.as_str().into());
        self.sess = Some(Session {
            params,
            target,
            target_name,
            info,
            exp_cmd_sn: cmd_sn,
            max_cmd_sn: cmd_sn.wrapping_add(queued - 1),
            pending_ua: Vec::new(),
            nexus,
            pr_nexus,
        });
    }
}

fn isid_u48(isid: &[u8; 6]) -> u64 {
    isid.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

fn login_resp(r: &crate::iscsi::login::LoginResponseFields, exp_cmd_sn: u32) -> pdu::LoginResponse {
    pdu::LoginResponse {
        transit: r.transit,
        cont: r.cont,
        csg: r.csg,
        nsg: r.nsg,
        version_max: r.version_max,
        version_active: r.version_active,
        isid: r.isid,
        tsih: r.tsih,
        itt: r.itt,
        status_class: r.status_class,
        status_detail: r.status_detail,
        exp_cmd_sn,
        max_cmd_sn: exp_cmd_sn,
        ..Default::default()
    }
}

//! The login phase (RFC 7143 §6.3, §11.12, §11.13) as a sans-I/O state machine: it takes the
//! fields of each Login Request and returns the Login Response to send, and at the end the
//! negotiated session parameters. Also the Text Request answers (SendTargets, RFC 7143 §13.3).
#![forbid(unsafe_code)]

use crate::iscsi::chap::{Account, Chap};
use crate::iscsi::negotiate::{self, Limits, SessionParams, SessionType};
use crate::iscsi::param::TargetParams;
use crate::iscsi::text;

/// Stages (CSG/NSG values, RFC 7143 §11.12).
pub const SECURITY: u8 = 0;
pub const OPERATIONAL: u8 = 1;
pub const FULL_FEATURE: u8 = 3;

/// Login status classes and details (RFC 7143 §11.13.5).
pub mod status {
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTH_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const REDIRECT_TEMPORARY: (u8, u8) = (0x01, 0x01);
    pub const REDIRECT_PERMANENT: (u8, u8) = (0x01, 0x02);
    pub const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (0x02, 0x06);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginRequestFields {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginResponseFields {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}

/// The CHAP accounts that guard a target (or discovery): initiators must prove they know an
/// `incoming` secret when there is one; `outgoing` answers mutual CHAP.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub incoming: Vec<Account>,
    pub outgoing: Option<Account>,
}

impl Auth {
    pub fn required(&self) -> bool {
        !self.incoming.is_empty()
    }
}

/// What the login needs to know of a target.
pub struct LoginTarget {
    pub params: TargetParams,
    pub alias: String,
    pub auth: Auth,
    /// Login redirection (`redirect`): the TargetAddress to send, and whether it is permanent.
    pub redirect: Option<(String, bool)>,
    /// `MaxSessions` reached (a reinstatement of one of its own sessions does not count).
    pub sessions_full: bool,
}

pub trait TargetLookup {
    /// `None`: no such target, it is disabled, or not reachable through this portal (→ 0x0203
    /// Not Found). `initiator` and `isid` identify the login for MaxSessions.
    fn target(&self, name: &str, initiator: &str, isid: [u8; 6]) -> Option<LoginTarget>;
    /// The accounts of discovery sessions (`targets/iscsi/IncomingUser`, `OutgoingUser`).
    fn discovery_auth(&self) -> Auth {
        Auth::default()
    }
    /// Whether a session with this ISID and TSIH is running (a login that names it wants to
    /// add a connection to it).
    fn session_exists(&self, _isid: [u8; 6], _tsih: u16) -> bool {
        false
    }
}

#[derive(Debug)]
pub enum LoginStep {
    /// Send this response and wait for the next Login Request.
    Continue(LoginResponseFields),
    /// Send this response (T=1, NSG=3); full feature phase starts with these parameters.
    /// The caller fills in the TSIH.
    Complete(LoginResponseFields, SessionParams),
    /// Send this response and close the connection.
    Fail(LoginResponseFields),
}

/// The login state of one connection.
pub struct Login {
    first: bool,
    isid: [u8; 6],
    itt: u32,
    cid: u16,
    stage: u8,
    params: SessionParams,
    target: Option<TargetParams>,
    alias: String,
    seen: Vec<String>,
    /// Text of Login Requests with C=1 not yet complete.
    partial: Vec<u8>,
    done: bool,
    /// Whether the target has sent its declarations (MaxRecvDataSegmentLength, ...).
    declared: bool,
    auth: Auth,
    /// The negotiated AuthMethod: `Some(true)` CHAP, `Some(false)` None.
    chap_chosen: Option<bool>,
    chap: Chap,
    /// Why the login failed, for the log (never a secret).
    reason: Option<String>,
    /// The CHAP user that authenticated.
    user: Option<String>,
}

/// Login text larger than this is refused (RFC 7143 §6.2: up to 64 KiB of text).
const MAX_LOGIN_TEXT: usize = 64 * 1024;

impl Login {
    pub fn new(_local_portal: String) -> Login {
        Login {
            first: true,
            isid: [0; 6],
            itt: 0,
            cid: 0,
            stage: SECURITY,
            params: SessionParams::default(),
            target: None,
            alias: String::new(),
            seen: Vec::new(),
            partial: Vec::new(),
            done: false,
            declared: false,
            auth: Auth::default(),
            chap_chosen: None,
            chap: Chap::new(),
            reason: None,
            user: None,
        }
    }

    /// Why the login failed, when it did for a reason worth logging (authentication).
    pub fn failure_reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The initiator's name, once its first request was read.
    pub fn initiator_name(&self) -> Option<&str> {
        Some(self.params.initiator_name.as_str()).filter(|n| !n.is_empty())
    }

    /// The CHAP user name the initiator authenticated as, if it did.
    pub fn chap_user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    fn auth_fail(&mut self, req: &LoginRequestFields, why: String) -> LoginStep {
        self.reason = Some(why);
        self.fail(req, status::AUTH_FAILURE)
    }

    fn response(&self, req: &LoginRequestFields) -> LoginResponseFields {
        LoginResponseFields {
            csg: req.csg,
            isid: req.isid,
            tsih: 0,
            itt: req.itt,
            version_max: 0,
            version_active: 0,
            ..Default::default()
        }
    }

    fn fail(&mut self, req: &LoginRequestFields, (class, detail): (u8, u8)) -> LoginStep {
        self.done = true;
        let mut r = self.response(req);
        r.status_class = class;
        r.status_detail = detail;
        LoginStep::Fail(r)
    }

    pub fn step(&mut self, req: &LoginRequestFields, lookup: &dyn TargetLookup) -> LoginStep {
        if self.done {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        // RFC 7143 §11.12.4: version 0 only.
        if req.version_min > 0 {
            return self.fail(req, status::UNSUPPORTED_VERSION);
        }
        if self.first {
            self.isid = req.isid;
            self.itt = req.itt;
            self.cid = req.cid;
            if req.tsih != 0 {
                // A non-zero TSIH adds a connection to a running session (RFC 7143 §6.3):
                // sessions here have one connection (MaxConnections=1), so that is one too
                // many; a TSIH that names no session is "session does not exist".
                let s = if lookup.session_exists(req.isid, req.tsih) {
                    status::TOO_MANY_CONNECTIONS
                } else {
                    status::SESSION_DOES_NOT_EXIST
                };
                return self.fail(req, s);
            }
            self.stage = req.csg;
        } else if req.isid != self.isid || req.cid != self.cid {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        if req.csg != self.stage
            || req.csg == 2
            || (req.transit && (req.nsg == 2 || req.nsg <= req.csg))
        {
            // Stages move forward only, and stage 2 does not exist.
            return self.fail(req, status::INITIATOR_ERROR);
        }
        self.partial.extend_from_slice(&req.data);
        if self.partial.len() > MAX_LOGIN_TEXT {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        if req.cont {
            // RFC 7143 §6.2: answer each continued PDU with an empty response.
            let mut r = self.response(req);
            r.nsg = 0;
            return LoginStep::Continue(r);
        }
        let text = std::mem::take(&mut self.partial);
        let Ok(keys) = text::parse(&text) else {
            return self.fail(req, status::INITIATOR_ERROR);
        };
        // RFC 7143 §6.2: a key declared or offered twice is a renegotiation attempt the target
        // must answer with a Login reject (initiator error), not "first value wins".
        let mut names = std::collections::HashSet::with_capacity(keys.len());
        if let Some((dup, _)) = keys.iter().find(|(k, _)| !names.insert(k.as_str())) {
            self.reason = Some(format!("key {dup} appears twice in one Login Request"));
            return self.fail(req, status::INITIATOR_ERROR);
        }
        let mut out: Vec<(String, String)> = Vec::new();
        if self.first {
            self.first = false;
            let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
            let Some(ini) = get("InitiatorName").filter(|n| !n.is_empty()) else {
                return self.fail(req, status::MISSING_PARAMETER);
            };
            self.params.initiator_name = ini;
            self.params.initiator_alias = get("InitiatorAlias").unwrap_or_default();
            match get("SessionType").as_deref() {
                None | Some("Normal") => self.params.session_type = SessionType::Normal,
                Some("Discovery") => self.params.session_type = SessionType::Discovery,
                Some(_) => return self.fail(req, status::INITIATOR_ERROR),
            }
            if self.params.session_type == SessionType::Normal {
                let Some(name) = get("TargetName").filter(|n| !n.is_empty()) else {
                    return self.fail(req, status::MISSING_PARAMETER);
                };
                let Some(t) = lookup.target(&name, &self.params.initiator_name, req.isid) else {
                    return self.fail(req, status::NOT_FOUND);
                };
                if let Some((addr, permanent)) = t.redirect {
                    // RFC 7143 §11.13.5: redirection carries the new TargetAddress.
                    self.done = true;
                    let mut r = self.response(req);
                    let (class, detail) = if permanent {
                        status::REDIRECT_PERMANENT
                    } else {
                        status::REDIRECT_TEMPORARY
                    };
                    r.status_class = class;
                    r.status_detail = detail;
                    r.data = encode(&[("TargetAddress".into(), addr)]);
                    self.reason = Some(format!(
                        "redirected ({})",
                        if permanent { "permanent" } else { "temporary" }
                    ));
                    return LoginStep::Fail(r);
                }
                if t.sessions_full {
                    self.reason = Some(format!("MaxSessions of {name} reached"));
                    return self.fail(req, status::OUT_OF_RESOURCES);
                }
                self.params.target_name = name;
                self.target = Some(t.params);
                self.alias = t.alias;
                self.auth = t.auth;
            } else {
                self.target = Some(TargetParams::default());
                self.auth = lookup.discovery_auth();
            }
            if self.auth.required() && req.csg != SECURITY {
                // RFC 7143 §6.3: a target that requires authentication does not let an
                // initiator skip the security stage.
                return self.auth_fail(
                    req,
                    "authentication is required but the initiator skipped the security stage"
                        .into(),
                );
            }
            if let Some(t) = &self.target {
                self.params.queued_commands = t.queued_commands;
                self.params.rsp_timeout = t.rsp_timeout;
                self.params.nop_in_interval = t.nop_in_interval;
                self.params.max_recv_data_segment_length = t.max_recv_data_segment_length;
                // RFC defaults for keys not sent, target defaults for values it may lower.
                self.params.max_xmit_data_segment_length = 8192.min(t.max_xmit_data_segment_length);
                self.params.max_burst_length = self.params.max_burst_length.min(t.max_burst_length);
                self.params.first_burst_length =
                    self.params.first_burst_length.min(t.first_burst_length);
                self.params.max_outstanding_r2t = 1;
            }
        } else if keys
            .iter()
            .any(|(k, _)| matches!(k.as_str(), "InitiatorName" | "TargetName" | "SessionType"))
        {
            // Declarations of identity belong to the first request only (RFC 7143 §13.4).
            if keys.iter().any(|(k, v)| match k.as_str() {
                "InitiatorName" => *v != self.params.initiator_name,
                "TargetName" => *v != self.params.target_name,
                _ => false,
            }) {
                return self.fail(req, status::INITIATOR_ERROR);
            }
        }
        let Some(tparams) = self.target.clone() else {
            return self.fail(req, status::INITIATOR_ERROR);
        };
        let mut ops: Vec<(String, String)> = Vec::new();
        let mut chap_keys: Vec<(String, String)> = Vec::new();
        for (k, v) in keys {
            match k.as_str() {
                "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => {}
                "AuthMethod" => {
                    if self.stage != SECURITY {
                        out.push((k, "Irrelevant".into()));
                        continue;
                    }
                    // CHAP when accounts guard the target, None only when none do.
                    let want = if self.auth.required() { "CHAP" } else { "None" };
                    if self.chap_chosen.is_none() && v.split(',').any(|m| m.trim() == want) {
                        self.chap_chosen = Some(want == "CHAP");
                        out.push((k, want.into()));
                    } else {
                        out.push((k, "Reject".into()));
                        let mut r = self.response(req);
                        r.data = encode(&out);
                        r.status_class = status::AUTH_FAILURE.0;
                        r.status_detail = status::AUTH_FAILURE.1;
                        self.done = true;
                        self.reason = Some(format!(
                            "AuthMethod {:?} offered, {want} required",
                            v.chars().take(64).collect::<String>()
                        ));
                        return LoginStep::Fail(r);
                    }
                }
                "CHAP_A" if self.stage == SECURITY && self.chap_chosen == Some(true) => {
                    match self.chap.offer(&v) {
                        Ok(keys) => out.extend(keys),
                        Err(e) => return self.auth_fail(req, e.to_string()),
                    }
                }
                "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C"
                    if self.stage == SECURITY && self.chap_chosen == Some(true) =>
                {
                    chap_keys.push((k, v));
                }
                k2 if k2.starts_with("CHAP_") => {
                    // CHAP without a CHAP exchange under way.
                    return self.auth_fail(req, format!("{k2} without a CHAP exchange"));
                }
                _ => ops.push((k, v)),
            }
        }
        if !chap_keys.is_empty() {
            match self
                .chap
                .answer(&chap_keys, &self.auth.incoming, self.auth.outgoing.as_ref())
            {
                Ok((user, keys)) => {
                    self.user = Some(user);
                    out.extend(keys);
                }
                Err(e) => return self.auth_fail(req, e.to_string()),
            }
        }
        let mut hold = false;
        if self.stage == SECURITY && req.transit {
            // Leaving the security stage needs the negotiated method done: CHAP answered, or
            // None allowed because no account guards the target.
            let authed = match self.chap_chosen {
                Some(true) => self.chap.is_done(),
                Some(false) => true,
                None => !self.auth.required(),
            };
            if !authed {
                if self.chap_chosen != Some(true) {
                    return self
                        .auth_fail(req, "left the security stage before authenticating".into());
                }
                // The CHAP exchange is under way: stay in the security stage (T=0 in the
                // answer, RFC 7143 §6.2) until it completes.
                hold = true;
            }
        }
        let limits = Limits {
            target: &tparams,
            session_type: self.params.session_type,
            max_connections: 1,
        };
        if negotiate::negotiate(&ops, &limits, &mut self.params, &mut self.seen, &mut out).is_err()
        {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        // Target declarations, once, in the first response that can carry them.
        if !self.declared
            && (self.stage == OPERATIONAL || (req.transit && !hold && req.nsg == FULL_FEATURE))
        {
            self.declared = true;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                tparams.max_recv_data_segment_length.to_string(),
            ));
            if self.params.session_type == SessionType::Normal {
                out.push(("TargetPortalGroupTag".into(), "1".into()));
                if !self.alias.is_empty() {
                    out.push(("TargetAlias".into(), self.alias.clone()));
                }
            }
        }
        let mut r = self.response(req);
        if req.transit && !hold {
            r.transit = true;
            r.nsg = req.nsg;
            if req.nsg == FULL_FEATURE {
                if !self.declared {
                    self.declared = true;
                    out.push((
                        "MaxRecvDataSegmentLength".into(),
                        tparams.max_recv_data_segment_length.to_string(),
                    ));
                }
                r.data = encode(&out);
                self.done = true;
                return LoginStep::Complete(r, self.params.clone());
            }
            self.stage = req.nsg;
        }
        r.data = encode(&out);
        LoginStep::Continue(r)
    }
}

fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    text::encode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// Answers the keys of a Text Request (RFC 7143 §11.10): SendTargets (§13.3, Appendix C) and
/// `NotUnderstood`/`Irrelevant` for others. `targets` lists enabled targets with their
/// `TargetAddress` values.
pub fn text_request(
    data: &[u8],
    session_type: SessionType,
    current_target: Option<&str>,
    targets: &[(String, Vec<String>)],
) -> Result<Vec<u8>, text::TextError> {
    let keys = text::parse(data)?;
    let mut out = Vec::new();
    for (k, v) in keys {
        if k != "SendTargets" {
            // Operational keys in full feature phase are not renegotiated here.
            text::push(
                &mut out,
                &k,
                if negotiable_in_ffp(&k) {
                    "Reject"
                } else {
                    "NotUnderstood"
                },
            );
            continue;
        }
        let list: Vec<&(String, Vec<String>)> = match v.as_str() {
            "All" => {
                if session_type == SessionType::Discovery || current_target.is_some() {
                    targets.iter().collect()
                } else {
                    Vec::new()
                }
            }
            // RFC 7143 §13.3: an empty value means the session's own target (normal sessions).
            "" => targets
                .iter()
                .filter(|(n, _)| Some(n.as_str()) == current_target)
                .collect(),
            name => targets.iter().filter(|(n, _)| n == name).collect(),
        };
        if v.is_empty() && session_type == SessionType::Discovery {
            text::push(&mut out, "SendTargets", "Reject");
            continue;
        }
        for (name, addrs) in list {
            text::push(&mut out, "TargetName", name);
            for a in addrs {
                text::push(&mut out, "TargetAddress", a);
            }
        }
    }
    Ok(out)
}

fn negotiable_in_ffp(k: &str) -> bool {
    matches!(k, "MaxRecvDataSegmentLength")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    impl TargetLookup for One {
        fn target(&self, name: &str, _: &str, _: [u8; 6]) -> Option<LoginTarget> {
            (name == "iqn.2026-11.x:t").then(|| LoginTarget {
                params: TargetParams::default(),
                alias: String::new(),
                auth: Auth::default(),
                redirect: None,
                sessions_full: false,
            })
        }
    }

    fn req(csg: u8, nsg: u8, transit: bool, pairs: &[(&str, &str)]) -> LoginRequestFields {
        LoginRequestFields {
            transit,
            csg,
            nsg,
            isid: [0x80, 0, 0, 0, 0, 1],
            itt: 1,
            data: text::encode(pairs.iter().copied()),
            ..Default::default()
        }
    }

    fn keys(r: &LoginResponseFields) -> Vec<(String, String)> {
        text::parse(&r.data).unwrap()
    }

    #[test]
    fn libiscsi_like_login() {
        let mut l = Login::new(String::new());
        let s = l.step(
            &req(
                0,
                1,
                true,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("TargetName", "iqn.2026-11.x:t"),
                    ("SessionType", "Normal"),
                    ("AuthMethod", "None"),
                ],
            ),
            &One,
        );
        let LoginStep::Continue(r) = s else {
            panic!("{s:?}")
        };
        assert!(r.transit);
        assert_eq!(r.nsg, 1);
        assert!(keys(&r).contains(&("AuthMethod".into(), "None".into())));
        let s = l.step(
            &req(
                1,
                3,
                true,
                &[
                    ("MaxRecvDataSegmentLength", "262144"),
                    ("ImmediateData", "Yes"),
                    ("InitialR2T", "No"),
                ],
            ),
            &One,
        );
        let LoginStep::Complete(r, p) = s else {
            panic!("{s:?}")
        };
        assert!(r.transit && r.nsg == 3);
        assert!(keys(&r)
            .iter()
            .any(|(k, _)| k == "MaxRecvDataSegmentLength"));
        assert!(!p.initial_r2t && p.immediate_data);
        assert_eq!(p.max_xmit_data_segment_length, 262144);
    }

    #[test]
    fn failures() {
        let mut l = Login::new(String::new());
        let LoginStep::Fail(r) = l.step(
            &req(
                0,
                1,
                true,
                &[("InitiatorName", "iqn.x:i"), ("TargetName", "iqn.nope:t")],
            ),
            &One,
        ) else {
            panic!()
        };
        assert_eq!((r.status_class, r.status_detail), (2, 3));
        let mut l = Login::new(String::new());
        let LoginStep::Fail(r) =
            l.step(&req(0, 1, true, &[("TargetName", "iqn.2026-11.x:t")]), &One)
        else {
            panic!()
        };
        assert_eq!((r.status_class, r.status_detail), (2, 7));
        let mut l = Login::new(String::new());
        let LoginStep::Fail(r) = l.step(&req(0, 1, true, &[("InitiatorName", "iqn.x:i")]), &One)
        else {
            panic!()
        };
        assert_eq!(
            (r.status_class, r.status_detail),
            (2, 7),
            "normal session needs TargetName"
        );
        let mut l = Login::new(String::new());
        let mut bad = req(
            0,
            1,
            true,
            &[("InitiatorName", "iqn.x:i"), ("SessionType", "Discovery")],
        );
        bad.version_min = 2;
        let LoginStep::Fail(r) = l.step(&bad, &One) else {
            panic!()
        };
        assert_eq!((r.status_class, r.status_detail), (2, 5));
        let mut l = Login::new(String::new());
        let LoginStep::Fail(r) = l.step(
            &req(
                0,
                1,
                true,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("SessionType", "Discovery"),
                    ("AuthMethod", "CHAP"),
                ],
            ),
            &One,
        ) else {
            panic!()
        };
        assert_eq!((r.status_class, r.status_detail), (2, 1));
        let mut l = Login::new(String::new());
        let LoginStep::Fail(_) = l.step(
            &req(
                1,
                0,
                true,
                &[("InitiatorName", "iqn.x:i"), ("SessionType", "Discovery")],
            ),
            &One,
        ) else {
            panic!("backwards transit")
        };
    }

    #[test]
    fn discovery_straight_to_ffp_and_continued_text() {
        let mut l = Login::new(String::new());
        let mut first = req(1, 3, true, &[]);
        first.data = b"InitiatorName=iqn.x:i\0Sess".to_vec();
        first.cont = true;
        first.transit = false;
        let LoginStep::Continue(r) = l.step(&first, &One) else {
            panic!()
        };
        assert!(r.data.is_empty() && !r.transit);
        let mut second = req(1, 3, true, &[]);
        second.data = b"ionType=Discovery\0".to_vec();
        let s = l.step(&second, &One);
        let LoginStep::Complete(_, p) = s else {
            panic!("{s:?}")
        };
        assert_eq!(p.session_type, SessionType::Discovery);
    }

    #[test]
    fn send_targets() {
        let targets = vec![
            ("iqn.a:1".to_string(), vec!["127.0.0.1:3260,1".to_string()]),
            ("iqn.b:2".to_string(), vec![]),
        ];
        let out =
            text_request(b"SendTargets=All\0", SessionType::Discovery, None, &targets).unwrap();
        let k = text::parse(&out).unwrap();
        assert_eq!(k[0], ("TargetName".into(), "iqn.a:1".into()));
        assert_eq!(k[1], ("TargetAddress".into(), "127.0.0.1:3260,1".into()));
        assert_eq!(k[2], ("TargetName".into(), "iqn.b:2".into()));
        let out = text_request(
            b"SendTargets=\0",
            SessionType::Normal,
            Some("iqn.b:2"),
            &targets,
        )
        .unwrap();
        assert_eq!(
            text::parse(&out).unwrap(),
            vec![("TargetName".into(), "iqn.b:2".into())]
        );
        let out = text_request(b"Foo=1\0", SessionType::Normal, Some("iqn.b:2"), &targets).unwrap();
        assert_eq!(
            text::parse(&out).unwrap(),
            vec![("Foo".into(), "NotUnderstood".into())]
        );
    }

    /// A target guarded by CHAP: IncomingUser joe, OutgoingUser tgt.
    struct Guarded;
    impl TargetLookup for Guarded {
        fn target(&self, name: &str, _: &str, _: [u8; 6]) -> Option<LoginTarget> {
            (name == "iqn.2026-11.x:t").then(|| LoginTarget {
                params: TargetParams::default(),
                alias: String::new(),
                auth: Auth {
                    incoming: vec![Account {
                        user: "joe".into(),
                        secret: "initiator-secret".into(),
                    }],
                    outgoing: Some(Account {
                        user: "tgt".into(),
                        secret: "target-secret-x".into(),
                    }),
                },
                redirect: None,
                sessions_full: false,
            })
        }
    }

    fn get(r: &LoginResponseFields, k: &str) -> String {
        keys(r)
            .into_iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no {k} in {:?}", keys(r)))
    }

    /// Runs a CHAP login to the point of the initiator's response and returns the step.
    fn chap_login(secret: &str, mutual: Option<&[u8]>) -> (Login, LoginStep) {
        use crate::iscsi::chap::{decode_binary, encode_hex, Algorithm};
        let mut l = Login::new(String::new());
        let s = l.step(
            &req(
                0,
                1,
                false,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("TargetName", "iqn.2026-11.x:t"),
                    ("AuthMethod", "None,CHAP"),
                ],
            ),
            &Guarded,
        );
        let LoginStep::Continue(r) = s else {
            panic!("{s:?}")
        };
        assert_eq!(
            get(&r, "AuthMethod"),
            "CHAP",
            "None is not allowed with accounts"
        );
        let LoginStep::Continue(r) = l.step(&req(0, 1, false, &[("CHAP_A", "7,5")]), &Guarded)
        else {
            panic!()
        };
        assert_eq!(get(&r, "CHAP_A"), "7");
        let id: u8 = get(&r, "CHAP_I").parse().unwrap();
        let c = decode_binary(&get(&r, "CHAP_C")).unwrap();
        let resp = encode_hex(&Algorithm::Sha256.response(id, secret.as_bytes(), &c));
        let mut pairs = vec![("CHAP_N", "joe".to_string()), ("CHAP_R", resp)];
        if let Some(mc) = mutual {
            pairs.push(("CHAP_I", "9".into()));
            pairs.push(("CHAP_C", encode_hex(mc)));
        }
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let s = l.step(&req(0, 1, true, &pairs), &Guarded);
        (l, s)
    }

    #[test]
    fn chap_one_way_and_mutual() {
        use crate::iscsi::chap::{decode_binary, Algorithm};
        let (l, s) = chap_login("initiator-secret", None);
        let LoginStep::Continue(r) = s else {
            panic!("{s:?}")
        };
        assert!(r.transit && r.nsg == OPERATIONAL);
        assert_eq!(l.chap_user(), Some("joe"));

        let mc = [0x5au8; 16];
        let (_, s) = chap_login("initiator-secret", Some(&mc));
        let LoginStep::Continue(r) = s else {
            panic!("{s:?}")
        };
        assert_eq!(get(&r, "CHAP_N"), "tgt");
        assert_eq!(
            decode_binary(&get(&r, "CHAP_R")).unwrap(),
            Algorithm::Sha256.response(9, b"target-secret-x", &mc)
        );
    }

    #[test]
    fn chap_wrong_secret_is_0201_and_the_reason_hides_the_secret() {
        let (l, s) = chap_login("not-the-secret", None);
        let LoginStep::Fail(r) = s else {
            panic!("{s:?}")
        };
        assert_eq!((r.status_class, r.status_detail), status::AUTH_FAILURE);
        let why = l.failure_reason().unwrap();
        assert!(why.contains("joe") && !why.contains("secret\""), "{why}");
        assert!(!why.contains("initiator-secret") && !why.contains("not-the-secret"));
    }

    #[test]
    fn chap_cannot_be_skipped() {
        // Straight to the operational stage.
        let mut l = Login::new(String::new());
        let s = l.step(
            &req(
                1,
                3,
                true,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("TargetName", "iqn.2026-11.x:t"),
                ],
            ),
            &Guarded,
        );
        let LoginStep::Fail(r) = s else {
            panic!("{s:?}")
        };
        assert_eq!((r.status_class, r.status_detail), status::AUTH_FAILURE);
        // AuthMethod=None only.
        let mut l = Login::new(String::new());
        let s = l.step(
            &req(
                0,
                1,
                true,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("TargetName", "iqn.2026-11.x:t"),
                    ("AuthMethod", "None"),
                ],
            ),
            &Guarded,
        );
        assert!(
            matches!(s, LoginStep::Fail(ref r) if r.status_detail == 1),
            "{s:?}"
        );
        // CHAP chosen, but transit before the response.
        let mut l = Login::new(String::new());
        l.step(
            &req(
                0,
                1,
                false,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("TargetName", "iqn.2026-11.x:t"),
                    ("AuthMethod", "CHAP"),
                ],
            ),
            &Guarded,
        );
        let s = l.step(&req(0, 1, true, &[("CHAP_A", "5")]), &Guarded);
        assert!(
            matches!(s, LoginStep::Continue(ref r) if !r.transit),
            "{s:?}"
        );
        // No CHAP without accounts.
        let mut l = Login::new(String::new());
        let s = l.step(
            &req(
                0,
                1,
                true,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("TargetName", "iqn.2026-11.x:t"),
                    ("AuthMethod", "CHAP,None"),
                ],
            ),
            &One,
        );
        let LoginStep::Continue(r) = s else {
            panic!("{s:?}")
        };
        assert_eq!(get(&r, "AuthMethod"), "None");
    }

    #[test]
    fn a_key_sent_twice_is_an_initiator_error() {
        // In the first request (identity keys: the first value used to win).
        let mut l = Login::new(String::new());
        let s = l.step(
            &req(
                0,
                1,
                true,
                &[
                    ("InitiatorName", "iqn.x:i"),
                    ("InitiatorName", "iqn.x:other"),
                    ("TargetName", "iqn.2026-11.x:t"),
                ],
            ),
            &One,
        );
        let LoginStep::Fail(r) = s else {
            panic!("{s:?}")
        };
        assert_eq!((r.status_class, r.status_detail), (2, 0));
        assert!(l.failure_reason().unwrap().contains("InitiatorName"));
        // Unknown keys and operational keys alike, later in the login.
        for key in ["X-com.example.k", "MaxRecvDataSegmentLength", "AuthMethod"] {
            let mut l = Login::new(String::new());
            let first = l.step(
                &req(
                    0,
                    0,
                    false,
                    &[
                        ("InitiatorName", "iqn.x:i"),
                        ("TargetName", "iqn.2026-11.x:t"),
                    ],
                ),
                &One,
            );
            assert!(matches!(first, LoginStep::Continue(_)), "{first:?}");
            let s = l.step(&req(0, 1, true, &[(key, "None"), (key, "None")]), &One);
            let LoginStep::Fail(r) = s else {
                panic!("{key}: {s:?}")
            };
            assert_eq!((r.status_class, r.status_detail), (2, 0), "{key}");
        }
    }
}

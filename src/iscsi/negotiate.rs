//! Key negotiation (RFC 7143 §6.2, §13; RFC 7144 key semantics): the target's answer to each
//! key the initiator offers, and the operational values in effect afterwards.
//!
//! Result functions: list keys take the first of the initiator's values the target supports;
//! boolean OR keys are Yes if either side says Yes, AND keys Yes only if both do; numerical
//! keys take the minimum (or, for DefaultTime2Wait, the maximum) of the offer and the target's
//! limit; declaratives are recorded. Unknown keys are answered `NotUnderstood`, keys that make
//! no sense in the session type `Irrelevant`, values out of range or malformed `Reject`.
#![forbid(unsafe_code)]

use crate::iscsi::param::{DigestOffer, TargetParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// The operational values of a session once negotiation is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: String,
    pub target_name: String,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
    /// What the target receives (its own declaration).
    pub max_recv_data_segment_length: u32,
    /// What the target may send: the initiator's MaxRecvDataSegmentLength capped by the
    /// target's MaxXmitDataSegmentLength.
    pub max_xmit_data_segment_length: u32,
    pub queued_commands: u32,
    pub rsp_timeout: u32,
    pub nop_in_interval: u32,
}

/// RFC 7143 §13: defaults of keys nobody sent.
impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: String::new(),
            target_name: String::new(),
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            max_recv_data_segment_length: 8192,
            max_xmit_data_segment_length: 8192,
            queued_commands: 32,
            rsp_timeout: 30,
            nop_in_interval: 30,
        }
    }
}

fn yn(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

impl SessionParams {
    /// What the management tree shows under `sessions/INITIATOR/`.
    pub fn tree_values(&self) -> Vec<(String, String)> {
        let d = |b: bool| if b { "CRC32C" } else { "None" }.to_string();
        vec![
            ("DataDigest".into(), d(self.data_digest)),
            (
                "FirstBurstLength".into(),
                self.first_burst_length.to_string(),
            ),
            ("HeaderDigest".into(), d(self.header_digest)),
            ("ImmediateData".into(), yn(self.immediate_data).into()),
            ("InitialR2T".into(), yn(self.initial_r2t).into()),
            ("MaxBurstLength".into(), self.max_burst_length.to_string()),
            (
                "MaxOutstandingR2T".into(),
                self.max_outstanding_r2t.to_string(),
            ),
            (
                "MaxRecvDataSegmentLength".into(),
                self.max_recv_data_segment_length.to_string(),
            ),
            (
                "MaxXmitDataSegmentLength".into(),
                self.max_xmit_data_segment_length.to_string(),
            ),
        ]
    }
}

/// How a key is negotiated (RFC 7143 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    List,
    Or,
    And,
    Min { lo: u32, hi: u32 },
    Max { lo: u32, hi: u32 },
    Declarative,
}

/// Where a key may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Any session (connection-only or discovery-relevant keys).
    Any,
    /// Normal sessions only: Irrelevant in discovery.
    NormalOnly,
}

fn rule(key: &str) -> Option<(Rule, Scope)> {
    const M: u32 = 16_777_215;
    Some(match key {
        "HeaderDigest" | "DataDigest" | "AuthMethod" => (Rule::List, Scope::Any),
        "MaxConnections" => (Rule::Min { lo: 1, hi: 65535 }, Scope::NormalOnly),
        "InitialR2T" => (Rule::Or, Scope::NormalOnly),
        "ImmediateData" | "DataPDUInOrder" | "DataSequenceInOrder" => {
            (Rule::And, Scope::NormalOnly)
        }
        "IFMarker" | "OFMarker" => (Rule::And, Scope::Any),
        "MaxBurstLength" | "FirstBurstLength" => (Rule::Min { lo: 512, hi: M }, Scope::NormalOnly),
        "DefaultTime2Wait" => (Rule::Max { lo: 0, hi: 3600 }, Scope::Any),
        "DefaultTime2Retain" => (Rule::Min { lo: 0, hi: 3600 }, Scope::Any),
        "MaxOutstandingR2T" => (Rule::Min { lo: 1, hi: 65535 }, Scope::NormalOnly),
        "ErrorRecoveryLevel" => (Rule::Min { lo: 0, hi: 2 }, Scope::Any),
        "MaxRecvDataSegmentLength" => (Rule::Declarative, Scope::Any),
        "InitiatorName"
        | "InitiatorAlias"
        | "TargetName"
        | "SessionType"
        | "TargetAlias"
        | "TargetAddress"
        | "TargetPortalGroupTag"
        | "SendTargets" => (Rule::Declarative, Scope::Any),
        "OFMarkInt" | "IFMarkInt" => (Rule::Declarative, Scope::Any),
        _ => return None,
    })
}

/// The target's limits during one negotiation.
pub struct Limits<'a> {
    pub target: &'a TargetParams,
    pub session_type: SessionType,
    /// MaxConnections the target allows (1: one connection per session).
    pub max_connections: u32,
}

/// What went wrong with the offered keys as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum NegotiationError {
    /// key {0} was offered twice
    Duplicate(String),
}

fn parse_num(v: &str) -> Option<u32> {
    let v = v.trim();
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// Negotiates one batch of operational keys, updating `p` and appending the target's answers
/// to `out`. `seen` collects every key negotiated so far (a key offered twice in one login is
/// an error, RFC 7143 §6.2).
pub fn negotiate(
    offered: &[(String, String)],
    limits: &Limits<'_>,
    p: &mut SessionParams,
    seen: &mut Vec<String>,
    out: &mut Vec<(String, String)>,
) -> Result<(), NegotiationError> {
    let t = limits.target;
    for (key, value) in offered {
        let Some((rule, scope)) = rule(key) else {
            // RFC 7143 §6.2: unknown keys (X- extensions included) are answered NotUnderstood.
            out.push((key.clone(), "NotUnderstood".into()));
            continue;
        };
        if matches!(rule, Rule::Declarative)
            && !matches!(
                key.as_str(),
                "MaxRecvDataSegmentLength" | "OFMarkInt" | "IFMarkInt"
            )
        {
            // Login identity keys are handled by the login state machine; nothing to answer.
            continue;
        }
        if seen.iter().any(|k| k == key) && key != "MaxRecvDataSegmentLength" {
            return Err(NegotiationError::Duplicate(key.clone()));
        }
        seen.push(key.clone());
        if scope == Scope::NormalOnly && limits.session_type == SessionType::Discovery {
            out.push((key.clone(), "Irrelevant".into()));
            continue;
        }
        let reject = |out: &mut Vec<(String, String)>| out.push((key.clone(), "Reject".into()));
        match (key.as_str(), rule) {
            ("HeaderDigest" | "DataDigest", _) => {
                let ours = if key == "HeaderDigest" {
                    t.header_digest
                } else {
                    t.data_digest
                };
                let offer: Vec<&str> = value.split(',').map(str::trim).collect();
                if offer
                    .iter()
                    .any(|v| v.is_empty() || !matches!(*v, "None" | "CRC32C"))
                    && !offer.iter().any(|v| matches!(*v, "None" | "CRC32C"))
                {
                    reject(out);
                    continue;
                }
                // The first of the initiator's values that we accept.
                let pick = offer.iter().find(|v| ours.choices().contains(v)).copied();
                match pick {
                    Some(v) => {
                        let on = v == "CRC32C";
                        if key == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        out.push((key.clone(), v.to_string()));
                    }
                    None => reject(out),
                }
                let _ = DigestOffer::None;
            }
            ("AuthMethod", _) => {
                // Security keys are the login state machine's business; an operational-stage
                // AuthMethod is irrelevant.
                out.push((key.clone(), "Irrelevant".into()));
            }
            ("IFMarker" | "OFMarker", _) => match parse_bool(value) {
                // Markers are not supported: AND with No.
                Some(_) => out.push((key.clone(), "No".into())),
                None => reject(out),
            },
            ("OFMarkInt" | "IFMarkInt", _) => out.push((key.clone(), "Reject".into())),
            ("MaxRecvDataSegmentLength", _) => match parse_num(value) {
                Some(n) if (512..=16_777_215).contains(&n) => {
                    p.max_xmit_data_segment_length = n.min(t.max_xmit_data_segment_length);
                }
                _ => reject(out),
            },
            (_, Rule::Or) => match parse_bool(value) {
                Some(b) => {
                    let r = b || t.initial_r2t;
                    p.initial_r2t = r;
                    out.push((key.clone(), yn(r).into()));
                }
                None => reject(out),
            },
            (_, Rule::And) => match parse_bool(value) {
                Some(b) => {
                    let r = match key.as_str() {
                        "ImmediateData" => {
                            let r = b && t.immediate_data;
                            p.immediate_data = r;
                            r
                        }
                        "DataPDUInOrder" => {
                            // We accept out-of-order Data-Out PDUs within a sequence? No: the
                            // receive path checks offsets in order, so answer Yes only.
                            p.data_pdu_in_order = true;
                            b
                        }
                        _ => {
                            p.data_sequence_in_order = true;
                            b
                        }
                    };
                    if matches!(key.as_str(), "DataPDUInOrder" | "DataSequenceInOrder") && !b {
                        // RFC 7143 §13.19/§13.20: AND semantics; No from the initiator makes
                        // it No, which we cannot honour: reject so the initiator knows.
                        out.push((key.clone(), "Reject".into()));
                    } else {
                        out.push((key.clone(), yn(r).into()));
                    }
                }
                None => reject(out),
            },
            (_, Rule::Min { lo, hi }) | (_, Rule::Max { lo, hi }) => {
                let Some(n) = parse_num(value).filter(|n| (lo..=hi).contains(n)) else {
                    reject(out);
                    continue;
                };
                let r = match key.as_str() {
                    "MaxConnections" => {
                        p.max_connections = n.min(limits.max_connections);
                        p.max_connections
                    }
                    "MaxBurstLength" => {
                        p.max_burst_length = n.min(t.max_burst_length);
                        p.max_burst_length
                    }
                    "FirstBurstLength" => {
                        p.first_burst_length = n.min(t.first_burst_length);
                        p.first_burst_length
                    }
                    "DefaultTime2Wait" => {
                        p.default_time2wait = n;
                        p.default_time2wait
                    }
                    "DefaultTime2Retain" => {
                        // ERL 0: no state is kept after a connection fails.
                        let _ = n;
                        p.default_time2retain = 0;
                        p.default_time2retain
                    }
                    "MaxOutstandingR2T" => {
                        p.max_outstanding_r2t = n.min(t.max_outstanding_r2t);
                        p.max_outstanding_r2t
                    }
                    _ => {
                        // ErrorRecoveryLevel: 0 only.
                        p.error_recovery_level = 0;
                        0
                    }
                };
                out.push((key.clone(), r.to_string()));
            }
            _ => out.push((key.clone(), "NotUnderstood".into())),
        }
    }
    // RFC 7143 §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
    if p.first_burst_length > p.max_burst_length {
        p.first_burst_length = p.max_burst_length;
        if let Some(e) = out.iter_mut().find(|(k, _)| k == "FirstBurstLength") {
            e.1 = p.first_burst_length.to_string();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn run(pairs: &[(&str, &str)], st: SessionType) -> (SessionParams, Vec<(String, String)>) {
        let t = TargetParams::default();
        let limits = Limits {
            target: &t,
            session_type: st,
            max_connections: 1,
        };
        let mut p = SessionParams::default();
        let mut out = Vec::new();
        negotiate(&kv(pairs), &limits, &mut p, &mut Vec::new(), &mut out).unwrap();
        (p, out)
    }

    fn answer<'a>(out: &'a [(String, String)], k: &str) -> &'a str {
        out.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("<none>")
    }

    #[test]
    fn open_iscsi_like_offer() {
        let (p, out) = run(
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxConnections", "1"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "262144"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
                ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("ErrorRecoveryLevel", "0"),
                ("IFMarker", "No"),
                ("OFMarker", "No"),
            ],
            SessionType::Normal,
        );
        assert_eq!(answer(&out, "InitialR2T"), "Yes", "OR");
        assert!(p.initial_r2t);
        assert_eq!(
            answer(&out, "MaxBurstLength"),
            "1048576",
            "min with the target's limit"
        );
        assert_eq!(answer(&out, "FirstBurstLength"), "65536");
        assert_eq!(p.max_xmit_data_segment_length, 262144);
        assert_eq!(
            answer(&out, "MaxRecvDataSegmentLength"),
            "<none>",
            "declarative: no answer"
        );
        assert_eq!(answer(&out, "ErrorRecoveryLevel"), "0");
    }

    #[test]
    fn bool_rules() {
        let (p, out) = run(
            &[("InitialR2T", "No"), ("ImmediateData", "No")],
            SessionType::Normal,
        );
        assert!(!p.initial_r2t, "No OR No (target default No)");
        assert!(!p.immediate_data, "No AND Yes");
        assert_eq!(answer(&out, "ImmediateData"), "No");
    }

    #[test]
    fn errors_and_irrelevance() {
        let (_, out) = run(
            &[
                ("MaxBurstLength", "100"),
                ("X-com.example.Foo", "1"),
                ("Bogus", "x"),
                ("HeaderDigest", "MD5"),
            ],
            SessionType::Normal,
        );
        assert_eq!(answer(&out, "MaxBurstLength"), "Reject");
        assert_eq!(answer(&out, "X-com.example.Foo"), "NotUnderstood");
        assert_eq!(answer(&out, "Bogus"), "NotUnderstood");
        assert_eq!(answer(&out, "HeaderDigest"), "Reject");
        let (_, out) = run(
            &[("MaxBurstLength", "65536"), ("HeaderDigest", "None")],
            SessionType::Discovery,
        );
        assert_eq!(answer(&out, "MaxBurstLength"), "Irrelevant");
        assert_eq!(answer(&out, "HeaderDigest"), "None");
    }

    #[test]
    fn duplicates_are_an_error() {
        let t = TargetParams::default();
        let limits = Limits {
            target: &t,
            session_type: SessionType::Normal,
            max_connections: 1,
        };
        let mut p = SessionParams::default();
        let r = negotiate(
            &kv(&[("MaxBurstLength", "65536"), ("MaxBurstLength", "65536")]),
            &limits,
            &mut p,
            &mut Vec::new(),
            &mut Vec::new(),
        );
        assert!(r.is_err());
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let (p, _) = run(
            &[("MaxBurstLength", "16384"), ("FirstBurstLength", "65536")],
            SessionType::Normal,
        );
        assert!(p.first_burst_length <= p.max_burst_length);
    }

    proptest::proptest! {
        #[test]
        fn numeric_results_stay_within_both_limits(mbl in 0u32..20_000_000, fbl in 0u32..20_000_000, r2t in 0u32..70000) {
            let (p, _) = run(&[("MaxBurstLength", &mbl.to_string()), ("FirstBurstLength", &fbl.to_string()), ("MaxOutstandingR2T", &r2t.to_string())], SessionType::Normal);
            let t = TargetParams::default();
            proptest::prop_assert!(p.max_burst_length <= t.max_burst_length);
            proptest::prop_assert!(p.first_burst_length <= p.max_burst_length);
            proptest::prop_assert!(p.max_outstanding_r2t <= t.max_outstanding_r2t && p.max_outstanding_r2t >= 1);
        }
    }
}

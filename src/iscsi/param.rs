//! Per-target iSCSI parameters: the defaults and limits a target offers in negotiation, as the
//! management tree shows them (`targets/iscsi/IQN/QueuedCommands`, …).
//!
//! Names, defaults and ranges are iSCSI-SCST's (`iscsi-scst/usr/param.c`); where the seed
//! README names a default (RspTimeout 30 s) that one is used. Writing `:default:` resets an
//! attribute.
#![forbid(unsafe_code)]

use std::fmt;

/// A digest choice a target offers (RFC 7143 §13.1: HeaderDigest, DataDigest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestOffer {
    /// `None` only.
    None,
    /// `CRC32C` only: initiators that cannot do CRC32C are refused.
    Crc32c,
    /// `CRC32C,None`: prefer CRC32C, accept None.
    Crc32cOrNone,
    /// `None,CRC32C`: prefer None, accept CRC32C.
    NoneOrCrc32c,
}

impl DigestOffer {
    pub fn parse(s: &str) -> Option<Self> {
        let norm: Vec<String> = s
            .split(',')
            .map(|t| t.trim().to_ascii_uppercase())
            .collect();
        let parts: Vec<&str> = norm.iter().map(String::as_str).collect();
        match parts.as_slice() {
            ["NONE"] => Some(Self::None),
            ["CRC32C"] => Some(Self::Crc32c),
            ["CRC32C", "NONE"] => Some(Self::Crc32cOrNone),
            ["NONE", "CRC32C"] => Some(Self::NoneOrCrc32c),
            _ => None,
        }
    }

    /// The values offered, in order of preference.
    pub fn choices(self) -> &'static [&'static str] {
        match self {
            Self::None => &["None"],
            Self::Crc32c => &["CRC32C"],
            Self::Crc32cOrNone => &["CRC32C", "None"],
            Self::NoneOrCrc32c => &["None", "CRC32C"],
        }
    }
}

impl fmt::Display for DigestOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.choices().join(","))
    }
}

/// The largest data segment the target receives or sends: SCST's
/// `(PAGE_SIZE / sizeof(kvec)) * PAGE_SIZE`, 1 MiB with 4 KiB pages.
pub const MAX_DATA_SEGMENT_LENGTH: u32 = 1 << 20;

/// Negotiation defaults and per-session limits of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetParams {
    pub queued_commands: u32,
    pub rsp_timeout: u32,
    pub nop_in_interval: u32,
    pub nop_in_timeout: u32,
    pub max_sessions: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_recv_data_segment_length: u32,
    pub max_xmit_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub header_digest: DigestOffer,
    pub data_digest: DigestOffer,
}

impl Default for TargetParams {
    fn default() -> Self {
        Self {
            queued_commands: 32,
            rsp_timeout: 30,
            nop_in_interval: 30,
            nop_in_timeout: 30,
            max_sessions: 0,
            initial_r2t: false,
            immediate_data: true,
            max_recv_data_segment_length: MAX_DATA_SEGMENT_LENGTH,
            max_xmit_data_segment_length: MAX_DATA_SEGMENT_LENGTH,
            max_burst_length: MAX_DATA_SEGMENT_LENGTH,
            first_burst_length: 65536,
            max_outstanding_r2t: 32,
            header_digest: DigestOffer::None,
            data_digest: DigestOffer::None,
        }
    }
}

/// Why an attribute could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum ParamError {
    /// unknown iSCSI parameter {0}
    Unknown(String),
    /// {name}: {value:?} is not allowed; {allowed}
    BadValue {
        name: String,
        value: String,
        allowed: String,
    },
}

enum Kind {
    Num { min: u32, max: u32 },
    Bool,
    Digest,
}

/// The attribute names, in the order the tree lists them.
pub const NAMES: &[&str] = &[
    "DataDigest",
    "FirstBurstLength",
    "HeaderDigest",
    "ImmediateData",
    "InitialR2T",
    "MaxBurstLength",
    "MaxOutstandingR2T",
    "MaxRecvDataSegmentLength",
    "MaxSessions",
    "MaxXmitDataSegmentLength",
    "NopInInterval",
    "NopInTimeout",
    "QueuedCommands",
    "RspTimeout",
];

fn kind(name: &str) -> Option<Kind> {
    let m = MAX_DATA_SEGMENT_LENGTH;
    Some(match name {
        "QueuedCommands" => Kind::Num { min: 1, max: 2048 },
        "RspTimeout" => Kind::Num { min: 2, max: 65535 },
        "NopInInterval" => Kind::Num { min: 0, max: 65535 },
        "NopInTimeout" => Kind::Num { min: 2, max: 65535 },
        "MaxSessions" => Kind::Num { min: 0, max: 65535 },
        "MaxOutstandingR2T" => Kind::Num { min: 1, max: 65535 },
        "MaxRecvDataSegmentLength"
        | "MaxXmitDataSegmentLength"
        | "MaxBurstLength"
        | "FirstBurstLength" => Kind::Num { min: 512, max: m },
        "InitialR2T" | "ImmediateData" => Kind::Bool,
        "HeaderDigest" | "DataDigest" => Kind::Digest,
        _ => return None,
    })
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl TargetParams {
    /// The value of attribute `name` as the tree shows it.
    pub fn get(&self, name: &str) -> Option<String> {
        Some(match name {
            "QueuedCommands" => self.queued_commands.to_string(),
            "RspTimeout" => self.rsp_timeout.to_string(),
            "NopInInterval" => self.nop_in_interval.to_string(),
            "NopInTimeout" => self.nop_in_timeout.to_string(),
            "MaxSessions" => self.max_sessions.to_string(),
            "InitialR2T" => yes_no(self.initial_r2t),
            "ImmediateData" => yes_no(self.immediate_data),
            "MaxRecvDataSegmentLength" => self.max_recv_data_segment_length.to_string(),
            "MaxXmitDataSegmentLength" => self.max_xmit_data_segment_length.to_string(),
            "MaxBurstLength" => self.max_burst_length.to_string(),
            "FirstBurstLength" => self.first_burst_length.to_string(),
            "MaxOutstandingR2T" => self.max_outstanding_r2t.to_string(),
            "HeaderDigest" => self.header_digest.to_string(),
            "DataDigest" => self.data_digest.to_string(),
            _ => return None,
        })
    }

    /// Whether attribute `name` differs from its default (SCST marks such attributes `[key]`).
    pub fn is_key(&self, name: &str) -> bool {
        self.get(name) != Self::default().get(name)
    }

    /// Sets attribute `name` from its text form; `:default:` restores the default.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ParamError> {
        let kind = kind(name).ok_or_else(|| ParamError::Unknown(name.to_string()))?;
        let value = value.trim();
        if value == ":default:" {
            let def = Self::default().get(name).unwrap_or_default();
            return self.set(name, &def);
        }
        let bad = |allowed: String| ParamError::BadValue {
            name: name.to_string(),
            value: value.to_string(),
            allowed,
        };
        match kind {
            Kind::Num { min, max } => {
                let n: u32 = value
                    .parse()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| bad(format!("a number from {min} to {max}, or :default:")))?;
                match name {
                    "QueuedCommands" => self.queued_commands = n,
                    "RspTimeout" => self.rsp_timeout = n,
                    "NopInInterval" => self.nop_in_interval = n,
                    "NopInTimeout" => self.nop_in_timeout = n,
                    "MaxSessions" => self.max_sessions = n,
                    "MaxOutstandingR2T" => self.max_outstanding_r2t = n,
                    "MaxRecvDataSegmentLength" => self.max_recv_data_segment_length = n,
                    "MaxXmitDataSegmentLength" => self.max_xmit_data_segment_length = n,
                    "MaxBurstLength" => self.max_burst_length = n,
                    _ => self.first_burst_length = n,
                }
            }
            Kind::Bool => {
                let b = match value.to_ascii_lowercase().as_str() {
                    "yes" | "1" => true,
                    "no" | "0" => false,
                    _ => return Err(bad("Yes or No, or :default:".into())),
                };
                if name == "InitialR2T" {
                    self.initial_r2t = b;
                } else {
                    self.immediate_data = b;
                }
            }
            Kind::Digest => {
                let d = DigestOffer::parse(value).ok_or_else(|| {
                    bad("None, CRC32C, CRC32C,None or None,CRC32C, or :default:".into())
                })?;
                if name == "HeaderDigest" {
                    self.header_digest = d;
                } else {
                    self.data_digest = d;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_scst_and_the_seed() {
        let p = TargetParams::default();
        assert_eq!(p.get("QueuedCommands").unwrap(), "32");
        assert_eq!(p.get("RspTimeout").unwrap(), "30");
        assert_eq!(p.get("NopInInterval").unwrap(), "30");
        assert_eq!(p.get("InitialR2T").unwrap(), "No");
        assert_eq!(p.get("ImmediateData").unwrap(), "Yes");
        assert_eq!(p.get("MaxRecvDataSegmentLength").unwrap(), "1048576");
        assert_eq!(p.get("FirstBurstLength").unwrap(), "65536");
        assert_eq!(p.get("HeaderDigest").unwrap(), "None");
        for n in NAMES {
            assert!(p.get(n).is_some(), "{n}");
            assert!(!p.is_key(n));
        }
    }

    #[test]
    fn set_checks_ranges_and_resets() {
        let mut p = TargetParams::default();
        p.set("MaxRecvDataSegmentLength", "8192").unwrap();
        assert!(p.is_key("MaxRecvDataSegmentLength"));
        assert!(p.set("MaxRecvDataSegmentLength", "100").is_err());
        assert!(p.set("QueuedCommands", "abc").is_err());
        assert!(matches!(p.set("Bogus", "1"), Err(ParamError::Unknown(_))));
        p.set("HeaderDigest", "crc32c,none").unwrap();
        assert_eq!(p.get("HeaderDigest").unwrap(), "CRC32C,None");
        p.set("InitialR2T", "Yes").unwrap();
        assert!(p.initial_r2t);
        p.set("MaxRecvDataSegmentLength", ":default:").unwrap();
        p.set("InitialR2T", ":default:").unwrap();
        assert_eq!(
            p,
            TargetParams {
                header_digest: DigestOffer::Crc32cOrNone,
                ..Default::default()
            }
        );
    }
}

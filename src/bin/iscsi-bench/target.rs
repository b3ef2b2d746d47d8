//! Where the sessions go (`iscsi://HOST[:PORT]/IQN/LUN`, libiscsi's form), logging in, and
//! sizing the LUN, for every mode.

use iscsi_tgt::initiator::{cdb, Initiator, LoginOptions};

use crate::net::Ini;
use crate::opts::Opts;

/// RFC 7143 §4.1: the well-known iSCSI port.
pub const ISCSI_PORT: u16 = 3260;
/// The initiator name of the benchmark's and the verification's sessions.
const BENCH_INITIATOR: &str = "iqn.2026-11.org.iscsi-tgt:bench";
/// SPC-4 sense key UNIT ATTENTION.
const SENSE_UNIT_ATTENTION: u8 = 0x06;
/// READ CAPACITY (10)'s RETURNED LOGICAL BLOCK ADDRESS when the LUN is too large for it
/// (SBC-3 §5.15.2): READ CAPACITY (16) tells.
const RC10_TOO_LARGE: u32 = 0xffff_ffff;
/// READ CAPACITY (16) parameter data: the first 12 bytes are the LBA and block length.
const RC16_LEN: u32 = 32;

/// A LUN of a target at a portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    /// `HOST:PORT` (`[ADDRESS]:PORT` for IPv6), as a connect takes it.
    pub portal: String,
    pub iqn: String,
    pub lun: u64,
}

impl std::fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "iscsi://{}/{}/{}", self.portal, self.iqn, self.lun)
    }
}

impl TargetUrl {
    /// Parses libiscsi's `iscsi://HOST[:PORT]/IQN/LUN`; HOST is a name, an IPv4 address or an
    /// IPv6 address in brackets. Credentials (`user%password@`) and `?arguments` are refused:
    /// the benchmark logs in without CHAP.
    pub fn parse(s: &str) -> Result<TargetUrl, String> {
        let bad = |why: &str| format!("{s:?} is not iscsi://HOST[:PORT]/IQN/LUN: {why}");
        let rest = s
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("it must start with iscsi://"))?;
        if rest.contains('@') {
            return Err(bad(
                "credentials in the URL are not supported (no CHAP here)",
            ));
        }
        if rest.contains('?') {
            return Err(bad("URL arguments are not supported"));
        }
        let (hostport, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("the target's name and LUN are missing"))?;
        let (iqn, lun) = path
            .rsplit_once('/')
            .ok_or_else(|| bad("the LUN is missing"))?;
        if iqn.is_empty() || iqn.contains('/') {
            return Err(bad("the target's name is missing"));
        }
        let lun = lun
            .parse::<u64>()
            .ok()
            .filter(|&l| l < 1 << 14)
            .ok_or_else(|| bad("the LUN must be a number below 16384"))?;
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing ]"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad("only :PORT may follow the IPv6 address"))?,
                ),
            };
            (format!("[{addr}]"), port)
        } else {
            match hostport.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(bad("an IPv6 address goes in brackets: [ADDRESS]:PORT"))
                }
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("the host is missing"));
        }
        let port = match port {
            None => ISCSI_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
        };
        Ok(TargetUrl {
            portal: format!("{host}:{port}"),
            iqn: iqn.to_string(),
            lun,
        })
    }
}

/// Session `index` of this process: the ISID carries the process id and the index (a
/// random-qualifier ISID, RFC 7143 §10.12.5), so that several sessions, and several runs at
/// once, are several sessions, not reinstatements of one.
pub fn login(o: &Opts, t: &TargetUrl, index: u8) -> Result<Ini, String> {
    let pid = std::process::id().to_be_bytes();
    let mut isid = LoginOptions::default().isid;
    isid[1] = index;
    isid[2..].copy_from_slice(&pid);
    login_as(o, t, BENCH_INITIATOR, isid)
}

pub fn login_as(
    o: &Opts,
    t: &TargetUrl,
    initiator_name: &str,
    isid: [u8; 6],
) -> Result<Ini, String> {
    let conn = o.network.connect(&t.portal)?;
    let mut ini = Initiator::with_transport(conn).map_err(|e| e.to_string())?;
    ini.set_timeout(o.timeout()).map_err(|e| e.to_string())?;
    let mut keys = vec![("MaxRecvDataSegmentLength".to_string(), "262144".to_string())];
    let d = if o.digests { "CRC32C" } else { "None" };
    keys.push(("HeaderDigest".into(), d.into()));
    keys.push(("DataDigest".into(), d.into()));
    ini.login(&LoginOptions {
        initiator_name: initiator_name.into(),
        target_name: Some(t.iqn.clone()),
        isid,
        keys,
        ..Default::default()
    })
    .map_err(|e| format!("login: {e}"))?;
    Ok(ini)
}

/// READ CAPACITY (10), or (16) for a LUN too large for it, clearing the new nexus's unit
/// attentions: (blocks, block size).
pub fn capacity(ini: &mut Ini, lun: u64) -> Result<(u64, u32), String> {
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    for _ in 0..8 {
        let r = ini
            .scsi(lun, &cdb::read_capacity10(), None, 8, true)
            .map_err(|e| e.to_string())?;
        if r.is_good() && r.data.len() >= 8 {
            let last = be32(&r.data[0..4]);
            if last != RC10_TOO_LARGE {
                return Ok((u64::from(last) + 1, be32(&r.data[4..8])));
            }
            let r = ini
                .scsi(lun, &cdb::read_capacity16(RC16_LEN), None, RC16_LEN, true)
                .map_err(|e| e.to_string())?;
            if !r.is_good() || r.data.len() < 12 {
                return Err(format!("READ CAPACITY (16) failed: {r:?}"));
            }
            let last = u64::from_be_bytes([
                r.data[0], r.data[1], r.data[2], r.data[3], r.data[4], r.data[5], r.data[6],
                r.data[7],
            ]);
            return Ok((last.saturating_add(1), be32(&r.data[8..12])));
        }
        if r.sense_key() != Some(SENSE_UNIT_ATTENTION) {
            return Err(format!("READ CAPACITY failed: {r:?}"));
        }
    }
    Err("READ CAPACITY kept reporting unit attentions".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(portal: &str, iqn: &str, lun: u64) -> TargetUrl {
        TargetUrl {
            portal: portal.into(),
            iqn: iqn.into(),
            lun,
        }
    }

    #[test]
    fn urls_in_libiscsi_form() {
        let iqn = "iqn.2026-11.org.iscsi-tgt:bench";
        for (s, want) in [
            (
                format!("iscsi://127.0.0.1:3261/{iqn}/1"),
                url("127.0.0.1:3261", iqn, 1),
            ),
            (format!("iscsi://host/{iqn}/0"), url("host:3260", iqn, 0)),
            (format!("iscsi://[::1]/{iqn}/7"), url("[::1]:3260", iqn, 7)),
            (
                format!("iscsi://[fe80::1%eth0]:99/{iqn}/2"),
                url("[fe80::1%eth0]:99", iqn, 2),
            ),
        ] {
            let got = TargetUrl::parse(&s).unwrap();
            assert_eq!(got, want, "{s}");
            // It prints back as a URL that parses to the same.
            assert_eq!(TargetUrl::parse(&got.to_string()).unwrap(), want);
        }
        assert_eq!(
            url("10.0.0.2:3260", iqn, 0).to_string(),
            format!("iscsi://10.0.0.2:3260/{iqn}/0")
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (s, says) in [
            ("http://h/iqn.x:t/0", "iscsi://"),
            ("iscsi://h", "missing"),
            ("iscsi://h/iqn.x:t", "LUN is missing"),
            ("iscsi://h/iqn.x:t/", "LUN must be"),
            ("iscsi://h/iqn.x:t/x", "LUN must be"),
            ("iscsi://h/iqn.x:t/16384", "LUN must be"),
            ("iscsi://h//0", "name is missing"),
            ("iscsi://h/a/b/0", "name is missing"),
            ("iscsi://h:0/iqn.x:t/0", "port"),
            ("iscsi://h:65536/iqn.x:t/0", "port"),
            ("iscsi://h:/iqn.x:t/0", "port"),
            ("iscsi://:3260/iqn.x:t/0", "host is missing"),
            ("iscsi://::1/iqn.x:t/0", "brackets"),
            ("iscsi://[::1/iqn.x:t/0", "closing ]"),
            ("iscsi://[::1]x/iqn.x:t/0", ":PORT"),
            ("iscsi://u%p@h/iqn.x:t/0", "credentials"),
            ("iscsi://h/iqn.x:t/0?iser", "arguments"),
        ] {
            let e = TargetUrl::parse(s).unwrap_err();
            assert!(e.contains(says), "{s}: {e}");
        }
    }
}

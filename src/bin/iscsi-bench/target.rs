//! Logging in to the target and sizing its LUN, for every mode.

use iscsi_tgt::initiator::{Initiator, LoginOptions};

use crate::net::Ini;
use crate::opts::Opts;

/// One session per process: the ISID carries the process id (a random-qualifier ISID, RFC
/// 7143 §10.12.5), so that several runs at once are several sessions, not reinstatements of
/// one.
pub fn login(o: &Opts) -> Result<Ini, String> {
    let pid = std::process::id().to_be_bytes();
    let mut isid = LoginOptions::default().isid;
    isid[2..].copy_from_slice(&pid);
    login_as(o, "iqn.2026-11.org.iscsi-tgt:bench", isid)
}

pub fn login_as(o: &Opts, initiator_name: &str, isid: [u8; 6]) -> Result<Ini, String> {
    let conn = o.network.connect(&o.portal)?;
    let mut ini = Initiator::with_transport(conn).map_err(|e| e.to_string())?;
    let mut keys = vec![("MaxRecvDataSegmentLength".to_string(), "262144".to_string())];
    let d = if o.digests { "CRC32C" } else { "None" };
    keys.push(("HeaderDigest".into(), d.into()));
    keys.push(("DataDigest".into(), d.into()));
    ini.login(&LoginOptions {
        initiator_name: initiator_name.into(),
        target_name: Some(o.target.clone()),
        isid,
        keys,
        ..Default::default()
    })
    .map_err(|e| format!("login: {e}"))?;
    Ok(ini)
}

/// READ CAPACITY (10), clearing the new nexus's unit attentions: (blocks, block size).
pub fn capacity(ini: &mut Ini, lun: u64) -> Result<(u64, u32), String> {
    for _ in 0..8 {
        let r = ini
            .scsi(lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 8, true)
            .map_err(|e| e.to_string())?;
        if r.is_good() && r.data.len() >= 8 {
            let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            return Ok((u64::from(be(&r.data[0..4])) + 1, be(&r.data[4..8])));
        }
        if r.sense_key() != Some(6) {
            return Err(format!("READ CAPACITY failed: {r:?}"));
        }
    }
    Err("READ CAPACITY kept reporting unit attentions".into())
}

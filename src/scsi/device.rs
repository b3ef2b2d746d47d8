//! A SCSI device: a block backend with its identity (INQUIRY data, VPD designators), its unit
//! attentions, and its attributes as the management tree shows them (`devices/NAME/...`).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::bdev::{BlockDev, NullDev, RamDev};

/// Why a device could not be created or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum DeviceError {
    /// {0}
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> DeviceError {
    DeviceError::Invalid(s.into())
}

/// The virtual device handlers, as `handlers/` lists them.
pub const HANDLERS: &[&str] = &["vdisk_nullio", "vdisk_ramio"];

/// SCST's nullio default size: 5 TiB / 2.
const NULLIO_DEFAULT_SIZE: u64 = (5u64 << 40) / 2;

/// The identity of a device: what INQUIRY reports. Writable attributes change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    pub t10_vend_id: String,
    pub prod_id: String,
    pub prod_rev_lvl: String,
    pub t10_dev_id: String,
    pub usn: String,
    /// NAA designator (8 or 16 bytes).
    pub naa_id: Vec<u8>,
    pub opt_trans_len: u32,
}

/// One attribute of a device.
pub struct AttrInfo {
    pub name: &'static str,
    pub writable: bool,
}

/// A device shared by every LUN that exports it and every reactor that serves them.
pub struct Device {
    name: String,
    handler: String,
    pub(crate) bdev: Arc<dyn BlockDev>,
    block_size: u32,
    size: u64,
    read_only: bool,
    removable: bool,
    rotational: bool,
    thin: bool,
    /// Creation parameters as given (saved with the configuration).
    params: Vec<(String, String)>,
    ident: Mutex<Ident>,
    default_ident: Ident,
    /// Pending unit attentions per I_T nexus, in order (SAM-5 §5.14).
    ua: Mutex<HashMap<u64, Vec<(u8, u8)>>>,
    /// Fast path: whether any unit attention is pending at all.
    ua_pending: AtomicBool,
    /// The I_T nexuses that prevent medium removal.
    prevent: Mutex<Vec<u64>>,
    /// Whether the (removable) medium is loaded.
    medium: AtomicBool,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, DeviceError> {
    match v.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(invalid(format!("{name} must be 0 or 1, not {v:?}"))),
    }
}

fn parse_u64(name: &str, v: &str) -> Result<u64, DeviceError> {
    v.trim()
        .parse()
        .map_err(|_| invalid(format!("{name} must be a number, not {v:?}")))
}

/// A hash of the device name (FNV-1a), the source of the default identifiers.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Device {
    /// Creates a device of `handler` from `add_device` parameters.
    pub fn create(
        handler: &str,
        name: &str,
        params: &[(String, String)],
    ) -> Result<Arc<Device>, DeviceError> {
        if name.is_empty()
            || name.len() > 64
            || name.contains('/')
            || name.chars().any(char::is_whitespace)
        {
            return Err(invalid(format!(
                "device name {name:?} must be 1 to 64 characters without '/' or blanks"
            )));
        }
        let allowed = add_device_params(handler).ok_or_else(|| {
            invalid(format!(
                "unknown handler {handler}; handlers are {}",
                HANDLERS.join(", ")
            ))
        })?;
        let mut block_size: u32 = 512;
        let mut size: Option<u64> = None;
        let mut read_only = false;
        let mut removable = false;
        let mut rotational = true;
        let mut thin = false;
        let mut t10_dev_id = None;
        for (k, v) in params {
            if !allowed.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "{handler} does not accept parameter {k:?}; it accepts {}",
                    allowed.join(", ")
                )));
            }
            match k.as_str() {
                "blocksize" => {
                    let b = parse_u64(k, v)?;
                    if !(512..=65536).contains(&b) || !b.is_power_of_two() {
                        return Err(invalid(format!(
                            "blocksize must be a power of two from 512 to 65536, not {v}"
                        )));
                    }
                    block_size = b as u32;
                }
                "size" => size = Some(parse_u64(k, v)?),
                "size_mb" => {
                    size = Some(
                        parse_u64(k, v)?
                            .checked_mul(1 << 20)
                            .ok_or_else(|| invalid(format!("size_mb {v} is too large")))?,
                    )
                }
                "read_only" => read_only = parse_bool(k, v)?,
                "removable" => removable = parse_bool(k, v)?,
                "rotational" => rotational = parse_bool(k, v)?,
                "thin_provisioned" => thin = parse_bool(k, v)?,
                "t10_dev_id" => t10_dev_id = Some(v.trim().to_string()),
                _ => {}
            }
        }
        let size = match (handler, size) {
            (_, Some(s)) => s,
            ("vdisk_nullio", None) => NULLIO_DEFAULT_SIZE,
            _ => return Err(invalid(format!("{handler} needs size or size_mb"))),
        };
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(invalid(format!(
                "size {size} must be a non-zero multiple of the block size {block_size}"
            )));
        }
        let bdev: Arc<dyn BlockDev> = match handler {
            "vdisk_nullio" => NullDev::new(block_size, size / u64::from(block_size)),
            _ => {
                if size > 1 << 40 {
                    return Err(invalid(format!(
                        "a RAM disk of {size} bytes is larger than 1 TiB"
                    )));
                }
                RamDev::new(block_size, size)
            }
        };
        let h = name_hash(name);
        let id = h & 0xffff_ffff;
        let default_ident = Ident {
            t10_vend_id: "ISCSITGT".into(),
            prod_id: name.chars().take(16).collect(),
            prod_rev_lvl: "0100".into(),
            t10_dev_id: t10_dev_id
                .clone()
                .unwrap_or_else(|| format!("{id:x}-{name}").chars().take(24).collect()),
            usn: format!("{id:x}"),
            // NAA 3 (locally assigned), 60 bits from the name hash.
            naa_id: ((3u64 << 60) | (h >> 4)).to_be_bytes().to_vec(),
            opt_trans_len: 524_288,
        };
        Ok(Arc::new(Device {
            name: name.to_string(),
            handler: handler.to_string(),
            bdev,
            block_size,
            size,
            read_only,
            removable,
            rotational,
            thin,
            params: params.to_vec(),
            ident: Mutex::new(default_ident.clone()),
            default_ident,
            ua: Mutex::new(HashMap::new()),
            ua_pending: AtomicBool::new(false),
            prevent: Mutex::new(Vec::new()),
            medium: AtomicBool::new(true),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn handler(&self) -> &str {
        &self.handler
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.size / u64::from(self.block_size)
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn is_removable(&self) -> bool {
        self.removable
    }

    pub fn is_rotational(&self) -> bool {
        self.rotational
    }

    /// SPC peripheral device type: 0x00 direct access (disks), 0x05 CD/DVD (vcdrom).
    pub fn scsi_type(&self) -> u8 {
        0x00
    }

    /// Whether a medium is loaded (always, except an ejected vcdrom).
    pub fn medium_present(&self) -> bool {
        self.medium.load(Ordering::Acquire)
    }

    /// START STOP UNIT with LOEJ=1 and START=0 on a removable device: the medium goes away
    /// (commands that need it get NOT READY, MEDIUM NOT PRESENT), unless some nexus prevents
    /// its removal.
    pub fn eject(&self) -> Result<(), DeviceError> {
        if self.removal_prevented() {
            return Err(invalid(format!(
                "{}: medium removal is prevented by an initiator",
                self.name
            )));
        }
        self.medium.store(false, Ordering::Release);
        Ok(())
    }

    /// START STOP UNIT with LOEJ=1 and START=1: the medium is back; every nexus hears NOT
    /// READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED (SPC-4).
    pub fn load(&self) {
        if !self.medium.swap(true, Ordering::AcqRel) {
            self.add_ua_all(0x28, 0x00);
        }
    }

    /// Whether the device is thin provisioned (`thin_provisioned=1`): LBPME in READ CAPACITY
    /// 16, UNMAP and WRITE SAME with UNMAP deallocate, GET LBA STATUS reports holes.
    pub fn thin_provisioned(&self) -> bool {
        self.thin
    }

    /// PREVENT ALLOW MEDIUM REMOVAL from one I_T nexus (SPC-4 §6.13): removal stays
    /// prevented while any nexus prevents it.
    pub fn set_prevent_removal(&self, nexus: u64, prevent: bool) {
        let mut p = self.prevent.lock().unwrap_or_else(|e| e.into_inner());
        if prevent {
            if !p.contains(&nexus) {
                p.push(nexus);
            }
        } else {
            p.retain(|&n| n != nexus);
        }
    }

    /// A reset releases every PREVENT (SPC-4 §6.13: logical unit reset and hard reset clear
    /// the prevent state).
    pub fn clear_prevent_removal(&self) {
        self.prevent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether some nexus prevents medium removal (an eject is then refused).
    pub fn removal_prevented(&self) -> bool {
        !self
            .prevent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub fn ident(&self) -> Ident {
        self.ident.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The parameters the device was created with.
    pub fn creation_params(&self) -> &[(String, String)] {
        &self.params
    }

    /// The attributes of this device, in the order the tree lists them.
    pub fn attrs(&self) -> Vec<AttrInfo> {
        let ro = |name| AttrInfo {
            name,
            writable: false,
        };
        let rw = |name| AttrInfo {
            name,
            writable: true,
        };
        vec![
            ro("blocksize"),
            rw("naa_id"),
            rw("opt_trans_len"),
            rw("prod_id"),
            rw("prod_rev_lvl"),
            ro("read_only"),
            ro("removable"),
            ro("rotational"),
            ro("size"),
            ro("size_mb"),
            rw("t10_dev_id"),
            rw("t10_vend_id"),
            ro("thin_provisioned"),
            ro("type"),
            rw("usn"),
        ]
    }

    pub fn get_attr(&self, name: &str) -> Option<String> {
        let id = self.ident();
        let b = |x: bool| if x { "1" } else { "0" }.to_string();
        Some(match name {
            "blocksize" => self.block_size.to_string(),
            "naa_id" => id.naa_id.iter().map(|b| format!("{b:02x}")).collect(),
            "opt_trans_len" => id.opt_trans_len.to_string(),
            "prod_id" => id.prod_id,
            "prod_rev_lvl" => id.prod_rev_lvl,
            "read_only" => b(self.read_only),
            "removable" => b(self.removable),
            "rotational" => b(self.rotational),
            "size" => self.size.to_string(),
            "size_mb" => (self.size >> 20).to_string(),
            "t10_dev_id" => id.t10_dev_id,
            "t10_vend_id" => id.t10_vend_id,
            "thin_provisioned" => b(self.thin),
            "type" => "0 - direct-access device (e.g., magnetic disk)".into(),
            "usn" => id.usn,
            _ => return None,
        })
    }

    /// Whether the attribute differs from its default (SCST's `[key]` mark).
    pub fn is_key_attr(&self, name: &str) -> bool {
        let given = |k: &str| self.params.iter().any(|(p, _)| p == k);
        match name {
            "blocksize" | "read_only" | "removable" | "rotational" | "thin_provisioned" => {
                given(name)
            }
            "size" | "size_mb" => given("size") || given("size_mb"),
            "t10_dev_id" => {
                given("t10_dev_id") || self.ident().t10_dev_id != self.default_ident.t10_dev_id
            }
            "naa_id" | "opt_trans_len" | "prod_id" | "prod_rev_lvl" | "t10_vend_id" | "usn" => {
                self.get_attr(name) != self.default_attr(name)
            }
            _ => false,
        }
    }

    fn default_attr(&self, name: &str) -> Option<String> {
        let d = &self.default_ident;
        Some(match name {
            "naa_id" => d.naa_id.iter().map(|b| format!("{b:02x}")).collect(),
            "opt_trans_len" => d.opt_trans_len.to_string(),
            "prod_id" => d.prod_id.clone(),
            "prod_rev_lvl" => d.prod_rev_lvl.clone(),
            "t10_vend_id" => d.t10_vend_id.clone(),
            "usn" => d.usn.clone(),
            _ => return None,
        })
    }

    /// Sets a writable attribute; INQUIRY DATA HAS CHANGED is raised for identity changes.
    pub fn set_attr(&self, name: &str, value: &str) -> Result<(), DeviceError> {
        let v = value.trim_end_matches('\n');
        let mut id = self.ident.lock().unwrap_or_else(|e| e.into_inner());
        let ascii = |max: usize| -> Result<String, DeviceError> {
            if v.len() > max || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(invalid(format!(
                    "{name} must be at most {max} printable ASCII characters"
                )));
            }
            Ok(v.to_string())
        };
        match name {
            "t10_vend_id" => id.t10_vend_id = ascii(8)?,
            "prod_id" => id.prod_id = ascii(16)?,
            "prod_rev_lvl" => id.prod_rev_lvl = ascii(4)?,
            "t10_dev_id" => id.t10_dev_id = ascii(24)?,
            "usn" => id.usn = ascii(20)?,
            "opt_trans_len" => {
                let n: u32 = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| n % self.block_size == 0)
                    .ok_or_else(|| {
                        invalid(format!(
                            "opt_trans_len must be a multiple of the block size {}",
                            self.block_size
                        ))
                    })?;
                id.opt_trans_len = n;
            }
            "naa_id" => {
                let hex = v.trim().trim_start_matches("0x");
                let bytes: Option<Vec<u8>> = (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                    })
                    .collect();
                match bytes {
                    Some(b) if b.len() == 8 || b.len() == 16 => id.naa_id = b,
                    _ => return Err(invalid("naa_id must be 8 or 16 bytes in hex")),
                }
            }
            _ => {
                drop(id);
                return Err(if self.get_attr(name).is_some() {
                    invalid(format!("{name} is read-only"))
                } else {
                    invalid(format!("device {} has no attribute {name}", self.name))
                });
            }
        }
        drop(id);
        // SPC-4: INQUIRY DATA HAS CHANGED to every I_T nexus.
        self.add_ua_all(0x3f, 0x03);
        Ok(())
    }

    /// A new I_T nexus sees POWER ON, RESET, OR BUS DEVICE RESET OCCURRED first (SAM-5).
    pub fn register_nexus(&self, nexus: u64) {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        ua.insert(nexus, vec![(0x29, 0x00)]);
        self.ua_pending.store(true, Ordering::Release);
    }

    pub fn unregister_nexus(&self, nexus: u64) {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        ua.remove(&nexus);
        if ua.values().all(Vec::is_empty) {
            self.ua_pending.store(false, Ordering::Release);
        }
        drop(ua);
        // A nexus that goes away releases its PREVENT (SPC-4 §6.13).
        self.set_prevent_removal(nexus, false);
    }

    /// Queues a unit attention for every I_T nexus.
    pub fn add_ua_all(&self, asc: u8, ascq: u8) {
        self.add_ua_others(u64::MAX, asc, ascq);
    }

    /// Queues a unit attention for every I_T nexus except `except`.
    pub fn add_ua_others(&self, except: u64, asc: u8, ascq: u8) {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        for (n, q) in ua.iter_mut() {
            if *n != except && !q.contains(&(asc, ascq)) {
                q.push((asc, ascq));
            }
        }
        if ua.values().any(|q| !q.is_empty()) {
            self.ua_pending.store(true, Ordering::Release);
        }
    }

    /// Takes the oldest unit attention of `nexus`, if any.
    pub fn take_ua(&self, nexus: u64) -> Option<(u8, u8)> {
        if !self.ua_pending.load(Ordering::Acquire) {
            return None;
        }
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        let q = ua.get_mut(&nexus)?;
        let first = if q.is_empty() {
            None
        } else {
            Some(q.remove(0))
        };
        if ua.values().all(Vec::is_empty) {
            self.ua_pending.store(false, Ordering::Release);
        }
        first
    }
}

/// The parameters `add_device` accepts for `handler`.
pub fn add_device_params(handler: &str) -> Option<&'static [&'static str]> {
    const P: &[&str] = &[
        "blocksize",
        "read_only",
        "removable",
        "rotational",
        "size",
        "size_mb",
        "t10_dev_id",
        "thin_provisioned",
    ];
    match handler {
        "vdisk_nullio" | "vdisk_ramio" => Some(P),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn create_validates() {
        let d = Device::create(
            "vdisk_ramio",
            "r0",
            &p(&[("size_mb", "4"), ("blocksize", "4096")]),
        )
        .unwrap();
        assert_eq!(d.num_blocks(), 1024);
        assert_eq!(d.get_attr("size_mb").unwrap(), "4");
        assert!(d.is_key_attr("blocksize"));
        assert!(!d.is_key_attr("prod_id"));
        let e = |r: Result<Arc<Device>, DeviceError>| {
            r.err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(e(Device::create(
            "vdisk_ramio",
            "r1",
            &p(&[("size_mb", "4"), ("blocksize", "1000")])
        ))
        .contains("power of two"));
        assert!(
            e(Device::create("vdisk_ramio", "r1", &p(&[("size", "1000")]))).contains("multiple")
        );
        assert!(e(Device::create("vdisk_ramio", "r1", &[])).contains("size"));
        assert!(e(Device::create(
            "vdisk_ramio",
            "r1",
            &p(&[("filename", "/x")])
        ))
        .contains("filename"));
        assert!(e(Device::create("vdisk_bogus", "r1", &[])).contains("unknown handler"));
        assert!(e(Device::create("vdisk_nullio", "a/b", &[])).contains("name"));
        let n = Device::create("vdisk_nullio", "n0", &[]).unwrap();
        assert_eq!(n.num_blocks(), NULLIO_DEFAULT_SIZE / 512);
    }

    #[test]
    fn attributes() {
        let d = Device::create("vdisk_nullio", "n0", &[]).unwrap();
        d.set_attr("prod_id", "MyDisk").unwrap();
        assert_eq!(d.get_attr("prod_id").unwrap(), "MyDisk");
        assert!(d.is_key_attr("prod_id"));
        assert!(d
            .set_attr("prod_id", "this is far too long for it")
            .is_err());
        assert!(d
            .set_attr("blocksize", "4096")
            .unwrap_err()
            .to_string()
            .contains("read-only"));
        assert!(d
            .set_attr("nonsense", "1")
            .unwrap_err()
            .to_string()
            .contains("no attribute"));
        for a in d.attrs() {
            assert!(d.get_attr(a.name).is_some(), "{}", a.name);
        }
    }

    #[test]
    fn unit_attentions() {
        let d = Device::create("vdisk_nullio", "n0", &[]).unwrap();
        assert_eq!(d.take_ua(1), None);
        d.register_nexus(1);
        d.register_nexus(2);
        assert_eq!(d.take_ua(1), Some((0x29, 0)));
        assert_eq!(d.take_ua(1), None);
        d.add_ua_others(2, 0x29, 0x03);
        assert_eq!(d.take_ua(1), Some((0x29, 3)));
        assert_eq!(d.take_ua(2), Some((0x29, 0)));
        assert_eq!(d.take_ua(2), None);
    }
}

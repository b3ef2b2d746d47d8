//! A SCSI device: a block backend with its identity (INQUIRY data, VPD designators), its unit
//! attentions, and its attributes as the management tree shows them (`devices/NAME/...`).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::bdev::nvme::dev::NvmeDev;
use crate::bdev::nvme::passthru::PassthruDev;
use crate::bdev::nvme::pci::parse_bdf;
use crate::bdev::nvme::spec::{IdentifyController, IdentifyNamespace};
use crate::bdev::nvme::vfio::{Bar0, VfioAlloc};
use crate::bdev::{
    BlockDev, Fault, FileDev, FileOptions, Kind, NullDev, RamDev, MAX_FAULT_DELAY_US,
};
use crate::scsi::alua::LuAlua;
use crate::scsi::pr::{self, Nexus, OutOutcome, Reservations, Snapshot};
use crate::scsi::sense::Format;
use crate::scsi::spc::xcopy::CopyTable;
use crate::util::quote;

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
pub const HANDLERS: &[&str] = &[
    "vdisk_fileio",
    "vdisk_blockio",
    "vdisk_nullio",
    "vcdrom",
    "vdisk_ramio",
    "vdisk_nvme",
];

/// A namespace of a controller driven by the userspace NVMe driver through vfio-pci.
type VfioNvme = NvmeDev<Arc<Bar0>, VfioAlloc>;

/// The most I/O queue pairs asked of a controller: one per reactor, and reactors are at
/// most one per core.
const MAX_NVME_QUEUES: usize = 64;

/// SCST's nullio default size: 5 TiB / 2.
const NULLIO_DEFAULT_SIZE: u64 = (5u64 << 40) / 2;
/// MMC: a CD's logical block.
const CDROM_BLOCK_SIZE: u32 = 2048;

/// Unit attention codes the device raises (SPC-4 Annex D).
const UA_INQUIRY_DATA_CHANGED: (u8, u8) = (0x3f, 0x03);
const UA_CAPACITY_DATA_CHANGED: (u8, u8) = (0x2a, 0x09);
/// NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED.
const UA_MEDIUM_CHANGED: (u8, u8) = (0x28, 0x00);
/// MODE PARAMETERS CHANGED.
pub const UA_MODE_PARAMETERS_CHANGED: (u8, u8) = (0x2a, 0x01);

/// The mode parameters MODE SELECT can change (SPC-4 §7.5, SBC-3 §6.4): WCE of the caching
/// page, SWP and D_SENSE of the control page. A device has current and saved values; the
/// saved ones are its attributes `write_through` (WCE's complement), `swp` and `d_sense`,
/// which the saved configuration keeps, and the current ones start from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeParams {
    /// Write cache enabled: writes may complete before they are durable.
    pub wce: bool,
    /// Software write protect: writes end with DATA PROTECT, WRITE PROTECTED.
    pub swp: bool,
    /// Descriptor-format sense data.
    pub d_sense: bool,
}

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
    /// EUI-64 designator (8, 12 or 16 bytes); empty: none.
    pub eui64_id: Vec<u8>,
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
    /// The same backend when it is a file, block device or CD (its own attributes).
    file: Option<Arc<FileDev>>,
    /// The same backend when it is an NVMe namespace (`vdisk_nvme`), with its PCI address.
    nvme: Option<(Arc<VfioNvme>, String)>,
    /// The same backend when it is an NVMe namespace through the kernel's driver
    /// (`vdisk_nvme` with `filename=/dev/ngXnY`).
    nvme_kernel: Option<Arc<PassthruDev>>,
    /// `nv_cache`: the backend's volatile cache is treated as non-volatile (NVMe: WCE off
    /// and no FLUSH needed, as the file handlers' `nv_cache`).
    nv_cache: bool,
    block_size: u32,
    read_only: bool,
    removable: bool,
    rotational: bool,
    thin: bool,
    /// Report the logical blocks per physical block exponent (READ CAPACITY 16).
    lb_per_pb_exp: AtomicBool,
    /// `expl_alua`: in a device group, SET TARGET PORT GROUPS is served (INQUIRY TPGS 11b).
    expl_alua: AtomicBool,
    /// Creation parameters as given (saved with the configuration).
    params: Vec<(String, String)>,
    ident: Mutex<Ident>,
    default_ident: Ident,
    /// Pending unit attentions per I_T nexus, in order (SAM-5 §5.14).
    ua: Mutex<HashMap<u64, Vec<(u8, u8)>>>,
    /// Fast path: whether any unit attention is pending at all.
    ua_pending: AtomicBool,
    /// Names the unit attentions queued so far ([`crate::scsi::pr::next_epoch`]): a new one,
    /// stored under `ua`'s lock, whenever one is queued. A nexus that found its queue empty
    /// at an epoch need not look again until the next.
    ua_epoch: AtomicU64,
    /// The registered I_T nexuses as persistent reservations name them (initiator port and
    /// target port), by the transport's id: whom a PERSISTENT RESERVE OUT reaches.
    nexuses: Mutex<HashMap<u64, Nexus>>,
    /// The I_T nexuses that prevent medium removal.
    prevent: Mutex<Vec<u64>>,
    /// Whether the (removable) medium is loaded.
    medium: AtomicBool,
    /// Byte ranges held by read-modify-write commands (COMPARE AND WRITE, ORWRITE) between
    /// their read and their write, on any reactor.
    rmw_locked: Mutex<Vec<(u64, u64)>>,
    /// Persistent reservations and RESERVE/RELEASE (SPC-4 §5.13).
    pr: Reservations,
    /// Current SWP and D_SENSE (WCE's current value is the backend's write-through mode).
    swp: AtomicBool,
    d_sense: AtomicBool,
    /// Saved mode parameters; taken by every change of mode parameters, so that MODE
    /// SELECTs from several nexuses apply one after the other.
    saved_mode: Mutex<ModeParams>,
    /// Its device group's ALUA configuration (SPC-4 §5.15), set by the management tree.
    alua: LuAlua,
    /// SANITIZE (SBC-3 §4.11): [`Sanitize`] as a number, and the progress of the one under
    /// way (0..=65535 of the whole).
    sanitize: AtomicU8,
    sanitize_progress: AtomicU16,
    /// The identified EXTENDED COPY commands sent to it, and their status (SPC-4 §6.18).
    copies: CopyTable,
}

/// Where a device stands with SANITIZE (SBC-3 §4.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sanitize {
    /// No sanitize operation under way, and the last one (if any) succeeded.
    Idle = 0,
    /// A sanitize operation is under way: the medium answers nothing else.
    InProgress = 1,
    /// The last sanitize operation failed: the medium stays unusable until a SANITIZE
    /// completes (or EXIT FAILURE MODE, after one that allowed it).
    Failed = 2,
    /// The last one failed, and it was started with AUSE set: EXIT FAILURE MODE may end
    /// the failure mode.
    FailedAuse = 3,
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

fn parse_hex(v: &str) -> Option<Vec<u8>> {
    let hex = v.trim().trim_start_matches("0x");
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// SCST's longest `t10_dev_id`. It follows the 8-byte vendor ID in the T10 vendor ID based
/// designator of the Device Identification VPD page, whose one-byte length it must not
/// overflow.
const MAX_T10_DEV_ID: usize = 24;

/// A `t10_dev_id` as `add_device` and `set` take it: the blanks around it dropped, and at
/// most [`MAX_T10_DEV_ID`] printable ASCII characters without `;`, which separates
/// `add_device` parameters (the saved configuration carries it as one, so that it could
/// not be loaded back).
fn parse_t10_dev_id(v: &str) -> Result<String, DeviceError> {
    let v = v.trim();
    if v.len() > MAX_T10_DEV_ID || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) || v.contains(';')
    {
        return Err(invalid(format!(
            "t10_dev_id must be at most {MAX_T10_DEV_ID} printable ASCII characters without ';', not {}",
            crate::util::quote(v)
        )));
    }
    Ok(v.to_string())
}

/// A hash of the device name (FNV-1a), the source of the default identifiers.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `vdisk_nvme`'s `pci` (required, `DDDD:BB:DD.F` or `BB:DD.F`) and `nsid` (1 unless
/// given) from `add_device` parameters: the PCI address in its long form and the namespace.
pub fn parse_nvme_params(params: &[(String, String)]) -> Result<(String, u32), DeviceError> {
    let get = |k: &str| params.iter().rev().find(|(p, _)| p == k).map(|(_, v)| v);
    let pci = get("pci").ok_or_else(|| {
        invalid(
            "vdisk_nvme needs pci=DDDD:BB:DD.F (the controller's PCI address, for the userspace driver) or filename=/dev/ngXnY (the namespace's NVMe generic device, through the kernel's driver)",
        )
    })?;
    let bdf = parse_bdf(pci).ok_or_else(|| {
        invalid(format!(
            "pci must be a PCI address DDDD:BB:DD.F (as 0000:00:04.0), not {}",
            quote(pci)
        ))
    })?;
    let nsid = match get("nsid") {
        None => 1,
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=0xffff_fffe).contains(n))
            .ok_or_else(|| {
                invalid(format!(
                    "nsid must be a namespace ID from 1 to 4294967294, not {}",
                    quote(v)
                ))
            })?,
    };
    Ok((bdf, nsid))
}

/// `vdisk_nvme`'s passthrough form: `filename` (the NVMe generic device) and no `pci` or
/// `nsid` (the device is one namespace). Returns the path.
fn check_passthru_params<'a>(
    params: &[(String, String)],
    filename: Option<&'a str>,
) -> Result<&'a str, DeviceError> {
    if params.iter().any(|(k, _)| k == "pci") {
        return Err(invalid(
            "vdisk_nvme takes either pci= (the userspace driver) or filename= (passthrough through the kernel's driver), not both",
        ));
    }
    if params.iter().any(|(k, _)| k == "nsid") {
        return Err(invalid(
            "nsid goes with pci=; with filename= the namespace is the one of the NVMe generic device",
        ));
    }
    match filename {
        Some(p) if !p.is_empty() => Ok(p),
        _ => Err(invalid(
            "filename must name the namespace's NVMe generic device, as /dev/ng0n1",
        )),
    }
}

/// The attributes of a namespace through the kernel's driver that differ from the
/// userspace driver's.
fn kernel_nvme_attr(dev: &PassthruDev, name: &str) -> Option<String> {
    Some(match name {
        "filename" => dev.path().to_string(),
        "firmware" => dev.controller().firmware.clone(),
        "model" => dev.controller().model.clone(),
        "serial" => dev.controller().serial.clone(),
        "nsid" => dev.nsid().to_string(),
        "outstanding" => dev.outstanding().to_string(),
        // The kernel's I/O queues: it owns them.
        "queue_pairs" => dev.kernel_queues().unwrap_or(0).to_string(),
        _ => return None,
    })
}

/// Printable ASCII without `;`, at most `max` characters, the blanks around it dropped.
fn ident_text(s: &str, max: usize) -> String {
    s.trim()
        .chars()
        .filter(|c| (' '..='~').contains(c) && *c != ';')
        .take(max)
        .collect::<String>()
        .trim()
        .to_string()
}

/// The default identity of a `vdisk_nvme` device: vendor `NVMe`, product from the model,
/// revision from the firmware, `t10_dev_id` and `usn` from the controller's serial number
/// and the namespace, the EUI-64 designator from the namespace's EUI64 (or NGUID) where it
/// has one, and a locally assigned NAA designator hashed from the namespace's globally
/// unique identifier where it has one, else from the controller and namespace ID.
fn nvme_ident(
    name: &str,
    t10_dev_id: Option<&str>,
    ctrl: &IdentifyController,
    ns: &IdentifyNamespace,
    nsid: u32,
) -> Ident {
    let serial = ident_text(&ctrl.serial, MAX_T10_DEV_ID);
    let serial = if serial.is_empty() {
        format!("{:x}", name_hash(name) & 0xffff_ffff)
    } else {
        serial
    };
    let eui64_id = if ns.eui64 != [0; 8] {
        ns.eui64.to_vec()
    } else if ns.nguid != [0; 16] {
        ns.nguid.to_vec()
    } else {
        Vec::new()
    };
    let key = if eui64_id.is_empty() {
        format!("nvme:{}:{}:{nsid}", ctrl.model.trim(), ctrl.serial.trim())
    } else {
        format!("nvme:{}", hex(&eui64_id))
    };
    let h = name_hash(&key);
    let prod_id = ident_text(&ctrl.model, 16);
    let rev = ident_text(&ctrl.firmware, 4);
    Ident {
        t10_vend_id: "NVMe".into(),
        prod_id: if prod_id.is_empty() {
            name.chars().take(16).collect()
        } else {
            prod_id
        },
        prod_rev_lvl: if rev.is_empty() { "0100".into() } else { rev },
        t10_dev_id: t10_dev_id.map_or_else(
            || ident_text(&format!("{serial}-{nsid}"), MAX_T10_DEV_ID),
            str::to_string,
        ),
        usn: ident_text(&format!("{serial}-{nsid}"), MAX_T10_DEV_ID),
        naa_id: ((3u64 << 60) | (h >> 4)).to_be_bytes().to_vec(),
        eui64_id,
        opt_trans_len: 524_288,
    }
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
        let cdrom = handler == "vcdrom";
        let mut block_size: u32 = if cdrom { CDROM_BLOCK_SIZE } else { 512 };
        let mut size: Option<u64> = None;
        let mut read_only = cdrom;
        let mut removable = cdrom;
        let mut rotational = true;
        let mut thin = false;
        let mut t10_dev_id = None;
        let mut thin_given = false;
        let mut filename: Option<String> = None;
        let mut active = true;
        let mut o_direct = false;
        let mut nv_cache = false;
        let mut write_through = false;
        let mut lb_per_pb_exp = true;
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
                "thin_provisioned" => {
                    thin = parse_bool(k, v)?;
                    thin_given = true;
                }
                "t10_dev_id" => t10_dev_id = Some(parse_t10_dev_id(v)?),
                "filename" => filename = Some(v.trim().to_string()),
                "active" => active = parse_bool(k, v)?,
                "o_direct" => o_direct = parse_bool(k, v)?,
                "nv_cache" => nv_cache = parse_bool(k, v)?,
                "write_through" => write_through = parse_bool(k, v)?,
                "lb_per_pb_exp" => lb_per_pb_exp = parse_bool(k, v)?,
                // TST 001b: a task set per I_T nexus is all this target implements.
                "tst" if v.trim() != "1" => {
                    return Err(invalid(
                        "only tst=1 (a separate task set per I_T nexus) is supported",
                    ));
                }
                _ => {}
            }
        }
        if let Some(s) = size {
            if s == 0 || s % u64::from(block_size) != 0 {
                return Err(invalid(format!(
                    "size {s} must be a non-zero multiple of the block size {block_size}"
                )));
            }
        }
        let mut nvme = None;
        let mut nvme_kernel = None;
        let kind = match handler {
            "vdisk_fileio" => Some(Kind::File),
            "vdisk_blockio" => Some(Kind::Block),
            "vcdrom" => Some(Kind::Cdrom),
            _ => None,
        };
        let (bdev, file): (Arc<dyn BlockDev>, Option<Arc<FileDev>>) = match kind {
            Some(kind) => {
                if kind != Kind::Cdrom && filename.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid(format!("{handler} needs filename=PATH")));
                }
                if write_through && nv_cache {
                    return Err(invalid("write_through and nv_cache exclude each other"));
                }
                let opts = FileOptions {
                    kind,
                    block_size,
                    read_only,
                    o_direct,
                    write_through,
                    nv_cache,
                    thin,
                };
                let f =
                    FileDev::new(name, opts, filename.as_deref(), size, active).map_err(invalid)?;
                (f.clone(), Some(f))
            }
            None if handler == "vdisk_nvme" && filename.is_some() => {
                let path = check_passthru_params(params, filename.as_deref())?;
                let dev = PassthruDev::open(path)
                    .map_err(|e| invalid(format!("cannot use {path} for NVMe passthrough: {e}")))?;
                let dev = Arc::new(dev.with_nv_cache(nv_cache));
                block_size = dev.block_size();
                let unmap = dev.supports_unmap();
                if thin && !unmap {
                    return Err(invalid(format!(
                        "thin_provisioned=1: namespace {} behind {path} cannot deallocate blocks so that they read as zeros",
                        dev.nsid()
                    )));
                }
                if !thin_given {
                    thin = unmap;
                }
                nvme_kernel = Some(dev.clone());
                (dev as Arc<dyn BlockDev>, None)
            }
            None if handler == "vdisk_nvme" => {
                let (bdf, nsid) = parse_nvme_params(params)?;
                let queues = std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .clamp(1, MAX_NVME_QUEUES) as u16;
                let dev = VfioNvme::open_vfio(&bdf, nsid, queues)
                    .map_err(|e| invalid(format!("cannot open NVMe controller {bdf}: {e}")))?;
                let dev = Arc::new(dev.with_nv_cache(nv_cache));
                dev.watch().map_err(|e| {
                    invalid(format!(
                        "cannot start the watchdog of NVMe controller {bdf}: {e}"
                    ))
                })?;
                block_size = dev.block_size();
                let unmap = dev.supports_unmap();
                if thin && !unmap {
                    return Err(invalid(format!(
                        "thin_provisioned=1: namespace {nsid} of {bdf} cannot deallocate blocks so that they read as zeros"
                    )));
                }
                if !thin_given {
                    thin = unmap;
                }
                nvme = Some((dev.clone(), bdf));
                (dev as Arc<dyn BlockDev>, None)
            }
            None => {
                let size = match (handler, size) {
                    (_, Some(s)) => s,
                    ("vdisk_nullio", None) => NULLIO_DEFAULT_SIZE,
                    _ => return Err(invalid(format!("{handler} needs size or size_mb"))),
                };
                let bdev: Arc<dyn BlockDev> = match handler {
                    "vdisk_nullio" => NullDev::new(block_size, size / u64::from(block_size)),
                    _ => {
                        if size > 1 << 40 {
                            return Err(invalid(format!(
                                "a RAM disk of {size} bytes is larger than 1 TiB"
                            )));
                        }
                        RamDev::new(block_size, size).map_err(invalid)?
                    }
                };
                (bdev, None)
            }
        };
        let saved_mode = ModeParams {
            wce: bdev.has_volatile_cache(),
            swp: false,
            d_sense: false,
        };
        let h = name_hash(name);
        let id = h & 0xffff_ffff;
        let default_ident = match (&nvme, &nvme_kernel) {
            (Some((dev, _)), _) => nvme_ident(
                name,
                t10_dev_id.as_deref(),
                dev.controller(),
                dev.namespace(),
                dev.nsid(),
            ),
            (None, Some(dev)) => nvme_ident(
                name,
                t10_dev_id.as_deref(),
                dev.controller(),
                dev.namespace(),
                dev.nsid(),
            ),
            (None, None) => Ident {
                t10_vend_id: "ISCSITGT".into(),
                prod_id: name.chars().take(16).collect(),
                prod_rev_lvl: "0100".into(),
                t10_dev_id: t10_dev_id
                    .clone()
                    .unwrap_or_else(|| format!("{id:x}-{name}").chars().take(24).collect()),
                usn: format!("{id:x}"),
                // NAA 3 (locally assigned), 60 bits from the name hash.
                naa_id: ((3u64 << 60) | (h >> 4)).to_be_bytes().to_vec(),
                eui64_id: Vec::new(),
                opt_trans_len: 524_288,
            },
        };
        Ok(Arc::new(Device {
            name: name.to_string(),
            handler: handler.to_string(),
            bdev,
            file,
            nvme,
            nvme_kernel,
            nv_cache,
            block_size,
            read_only,
            removable,
            rotational,
            thin,
            lb_per_pb_exp: AtomicBool::new(lb_per_pb_exp),
            expl_alua: AtomicBool::new(false),
            params: params.to_vec(),
            ident: Mutex::new(default_ident.clone()),
            default_ident,
            ua: Mutex::new(HashMap::new()),
            nexuses: Mutex::new(HashMap::new()),
            ua_pending: AtomicBool::new(false),
            ua_epoch: AtomicU64::new(0),
            prevent: Mutex::new(Vec::new()),
            sanitize: AtomicU8::new(Sanitize::Idle as u8),
            sanitize_progress: AtomicU16::new(0),
            copies: CopyTable::default(),
            medium: AtomicBool::new(true),
            rmw_locked: Mutex::new(Vec::new()),
            pr: Reservations::new(),
            swp: AtomicBool::new(false),
            d_sense: AtomicBool::new(false),
            saved_mode: Mutex::new(saved_mode),
            alua: LuAlua::default(),
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

    /// The capacity in blocks; it changes with `resync_size`, a new CD or blockio's `size`
    /// (and is 0 while a CD drive is empty).
    pub fn num_blocks(&self) -> u64 {
        self.bdev.num_blocks()
    }

    fn size(&self) -> u64 {
        self.num_blocks() * u64::from(self.block_size)
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

    fn is_cdrom(&self) -> bool {
        self.handler == "vcdrom"
    }

    /// SPC peripheral device type: 0x00 direct access (disks), 0x05 CD/DVD (vcdrom).
    pub fn scsi_type(&self) -> u8 {
        if self.is_cdrom() {
            0x05
        } else {
            0x00
        }
    }

    /// Whether a medium is loaded (always, except an ejected vcdrom).
    pub fn medium_present(&self) -> bool {
        self.medium.load(Ordering::Acquire)
            && match &self.file {
                Some(f) if self.is_cdrom() => f.is_open(),
                _ => true,
            }
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

    /// START STOP UNIT with LOEJ=1 and START=1 from nexus `by`: the medium is back; every
    /// other nexus hears NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED (SPC-4).
    pub fn load_medium(&self, by: u64) {
        if !self.medium.swap(true, Ordering::AcqRel) {
            self.add_ua_others(by, 0x28, 0x00);
        }
    }

    /// Whether the backing is open (`active`). A disk whose file failed or that was
    /// deactivated answers NOT READY.
    pub fn is_active(&self) -> bool {
        self.file
            .as_ref()
            .is_none_or(|f| self.is_cdrom() || f.is_open())
    }

    /// Why the device cannot serve media access commands now, as the NOT READY additional
    /// sense code: MEDIUM NOT PRESENT (3A/00) for an empty CD drive, LOGICAL UNIT NOT READY,
    /// MANUAL INTERVENTION REQUIRED (04/03) for an inactive disk. `None` when ready.
    pub fn not_ready(&self) -> Option<(u8, u8)> {
        if !self.medium_present() {
            Some((0x3a, 0x00))
        } else if !self.is_active() {
            Some((0x04, 0x03))
        } else {
            None
        }
    }

    /// Whether SANITIZE BLOCK ERASE is served: the device deallocates blocks (thin) and its
    /// backend can show that they are (GET LBA STATUS after the erase: SBC-3 §4.11).
    pub fn can_block_erase(&self) -> bool {
        self.thin_provisioned() && self.bdev.reports_provisioning()
    }

    /// The SANITIZE state: one atomic load on the I/O path (acquire, pairing with the
    /// release in `sanitize_end`).
    pub fn sanitize_state(&self) -> Sanitize {
        match self.sanitize.load(Ordering::Acquire) {
            1 => Sanitize::InProgress,
            2 => Sanitize::Failed,
            3 => Sanitize::FailedAuse,
            _ => Sanitize::Idle,
        }
    }

    /// Starts a sanitize operation unless one is under way (on any reactor).
    pub fn sanitize_begin(&self) -> bool {
        let mut cur = self.sanitize.load(Ordering::Acquire);
        loop {
            if cur == Sanitize::InProgress as u8 {
                return false;
            }
            match self.sanitize.compare_exchange(
                cur,
                Sanitize::InProgress as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.sanitize_progress.store(0, Ordering::Relaxed);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// How far the sanitize operation under way is, out of 65536.
    pub fn sanitize_progress(&self) -> u16 {
        self.sanitize_progress.load(Ordering::Relaxed)
    }

    pub fn set_sanitize_progress(&self, p: u16) {
        self.sanitize_progress.store(p, Ordering::Relaxed);
    }

    /// Ends the sanitize operation under way, or a failure mode (EXIT FAILURE MODE).
    pub fn sanitize_end(&self, outcome: Sanitize) {
        self.sanitize.store(outcome as u8, Ordering::Release);
    }

    /// The LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT of READ CAPACITY(16) (SBC-3 §5.16.2):
    /// from the backing's physical block size when `lb_per_pb_exp` is 1, else 0.
    pub fn lb_per_pb_exponent(&self) -> u8 {
        if !self.lb_per_pb_exp.load(Ordering::Relaxed) {
            return 0;
        }
        let pb = self.file.as_ref().map_or(0, |f| f.physical_block_size());
        if pb > self.block_size && pb.is_power_of_two() {
            (pb / self.block_size).trailing_zeros().min(15) as u8
        } else {
            0
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

    /// Takes the byte range `[offset, offset + len)` for one read-modify-write command;
    /// false (nothing taken) while another holds an overlapping range.
    pub fn try_lock_range(&self, offset: u64, len: u64) -> bool {
        let mut held = self.rmw_locked.lock().unwrap_or_else(|e| e.into_inner());
        if held
            .iter()
            .any(|&(o, l)| offset < o + l && o < offset + len)
        {
            return false;
        }
        held.push((offset, len));
        true
    }

    /// Releases a range taken with [`try_lock_range`](Self::try_lock_range).
    pub fn unlock_range(&self, offset: u64, len: u64) {
        let mut held = self.rmw_locked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|&r| r == (offset, len)) {
            held.swap_remove(i);
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

    /// Current software write protect (control mode page SWP): writes are refused.
    pub fn swp(&self) -> bool {
        self.swp.load(Ordering::Relaxed)
    }

    /// The format of the sense data commands on this device end with (control mode page
    /// D_SENSE).
    pub fn sense_format(&self) -> Format {
        if self.d_sense.load(Ordering::Relaxed) {
            Format::Descriptor
        } else {
            Format::Fixed
        }
    }

    /// The current mode parameters.
    pub fn mode_params(&self) -> ModeParams {
        ModeParams {
            wce: self.bdev.has_volatile_cache(),
            swp: self.swp(),
            d_sense: self.sense_format() == Format::Descriptor,
        }
    }

    /// The saved mode parameters (MODE SENSE with PC 11b).
    pub fn saved_mode_params(&self) -> ModeParams {
        *self.saved_mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The default mode parameters (PC 10b): the write cache as the device was created,
    /// no write protect, fixed-format sense.
    pub fn default_mode_params(&self) -> ModeParams {
        ModeParams {
            wce: self.write_cache_changeable()
                && !self
                    .file
                    .as_ref()
                    .is_some_and(|f| f.options().write_through),
            swp: false,
            d_sense: false,
        }
    }

    /// Which mode parameters MODE SELECT may change (PC 01b): WCE where the backend has a
    /// volatile cache to turn on and off (file and block devices without `nv_cache`), SWP
    /// on disks (a CD is read-only anyway), D_SENSE everywhere.
    pub fn changeable_mode_params(&self) -> ModeParams {
        ModeParams {
            wce: self.write_cache_changeable(),
            swp: !self.is_cdrom(),
            d_sense: true,
        }
    }

    /// Whether the device has a volatile write cache (WCE can turn it on and off): V_SUP in the
    /// Extended INQUIRY Data VPD page.
    pub fn has_volatile_cache(&self) -> bool {
        self.write_cache_changeable()
    }

    /// Whether the device's cache is declared non-volatile (`nv_cache`): NV_SUP in the
    /// Extended INQUIRY Data VPD page.
    pub fn has_nv_cache(&self) -> bool {
        !self.is_cdrom() && self.file.as_ref().is_some_and(|f| f.options().nv_cache)
    }

    fn write_cache_changeable(&self) -> bool {
        !self.is_cdrom() && self.file.as_ref().is_some_and(|f| !f.options().nv_cache)
    }

    /// Sets the current mode parameters to `p` and, with `save`, the saved ones too.
    /// Parameters that are not changeable must be passed as they are (the caller checks
    /// them: this applies only what may change). Returns whether a current value changed.
    pub fn set_mode_params(&self, p: ModeParams, save: bool) -> bool {
        let mut saved = self.saved_mode.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.mode_params();
        let ch = self.changeable_mode_params();
        if ch.wce {
            if let Some(f) = &self.file {
                f.set_write_through(!p.wce);
            }
        }
        if ch.swp {
            self.swp.store(p.swp, Ordering::Relaxed);
        }
        self.d_sense.store(p.d_sense, Ordering::Relaxed);
        if save {
            *saved = self.mode_params();
        }
        before != self.mode_params()
    }

    /// The reservations of the logical unit, which every LUN exporting the device shares.
    /// The identified copies of EXTENDED COPY commands sent to it.
    pub fn copies(&self) -> &CopyTable {
        &self.copies
    }

    pub fn reservations(&self) -> &Reservations {
        &self.pr
    }

    /// The ALUA configuration of the device group it is in.
    /// `expl_alua`: SET TARGET PORT GROUPS is served while the device is in a device group.
    pub fn expl_alua(&self) -> bool {
        self.expl_alua.load(Ordering::Relaxed)
    }

    pub fn alua(&self) -> &LuAlua {
        &self.alua
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
        let fileio = self.handler == "vdisk_fileio";
        let blockio = self.handler == "vdisk_blockio";
        let disk_file = fileio || blockio;
        // The userspace driver's controller, and a namespace through the kernel's driver
        // (which owns the controller: no timeouts or resets of ours to show).
        let pci = self.nvme.is_some();
        let kernel = self.nvme_kernel.is_some();
        let nvme = pci || kernel;
        let cdrom = self.is_cdrom();
        let mut v = Vec::new();
        if disk_file {
            v.push(rw("active"));
        }
        if !cdrom {
            v.push(ro("blocksize"));
        }
        v.push(rw("d_sense"));
        v.push(rw("eui64_id"));
        if !cdrom {
            v.push(rw("expl_alua"));
        }
        if self.fault_injectable() {
            v.extend([
                rw("fault_delay_every"),
                rw("fault_delay_us"),
                rw("fault_inject"),
            ]);
        }
        if disk_file || cdrom {
            v.push(rw("filename"));
        }
        if kernel {
            v.push(ro("filename"));
        }
        if nvme {
            v.extend([ro("firmware"), ro("model")]);
        }
        if disk_file {
            v.push(rw("lb_per_pb_exp"));
        }
        v.push(rw("naa_id"));
        if nvme {
            v.push(ro("nsid"));
        }
        if disk_file || nvme {
            v.push(ro("nv_cache"));
        }
        if fileio {
            v.push(ro("o_direct"));
        }
        if !cdrom {
            v.push(rw("opt_trans_len"));
        }
        if nvme {
            v.push(ro("outstanding"));
        }
        if pci {
            v.push(ro("pci"));
        }
        v.extend([rw("pr_file_name"), rw("pr_state")]);
        if nvme {
            v.push(ro("queue_pairs"));
        }
        v.extend([rw("prod_id"), rw("prod_rev_lvl")]);
        if !cdrom {
            v.extend([ro("read_only"), ro("removable")]);
        }
        if nvme {
            v.push(rw("reset"));
        }
        if pci {
            v.push(ro("resets"));
        }
        if disk_file {
            v.push(rw("resync_size"));
        }
        if !cdrom {
            v.push(ro("rotational"));
        }
        if blockio {
            v.extend([rw("size"), rw("size_mb")]);
        } else {
            v.extend([ro("size"), ro("size_mb")]);
        }
        if nvme {
            v.push(ro("serial"));
        }
        if !cdrom {
            v.push(rw("swp"));
        }
        if disk_file {
            v.push(rw("sync"));
        }
        v.extend([rw("t10_dev_id"), rw("t10_vend_id")]);
        if !cdrom {
            v.push(ro("thin_provisioned"));
        }
        if pci {
            v.push(ro("timeouts"));
        }
        v.extend([ro("tst"), ro("type"), rw("usn")]);
        if disk_file {
            v.push(rw("write_through"));
        }
        v
    }

    /// Whether the device has the `fault_inject` attribute: file and block devices and RAM
    /// disks.
    fn fault_injectable(&self) -> bool {
        matches!(
            self.handler.as_str(),
            "vdisk_fileio" | "vdisk_blockio" | "vdisk_ramio" | "vdisk_nvme"
        ) && self.bdev.fault().is_some()
    }

    fn has_attr(&self, name: &str) -> bool {
        self.attrs().iter().any(|a| a.name == name)
    }

    pub fn get_attr(&self, name: &str) -> Option<String> {
        if !self.has_attr(name) {
            return None;
        }
        let id = self.ident();
        let b = |x: bool| if x { "1" } else { "0" }.to_string();
        let opts = self.file.as_ref().map(|f| f.options().clone());
        let opt = |f: fn(&FileOptions) -> bool| b(opts.as_ref().is_some_and(f));
        if let Some(k) = &self.nvme_kernel {
            if let Some(v) = kernel_nvme_attr(k, name) {
                return Some(v);
            }
        }
        let nvme = self.nvme.as_ref().map(|(d, _)| d);
        let info = || nvme.map(|d| d.info()).unwrap_or_default();
        Some(match name {
            "firmware" => nvme.map(|d| d.controller().firmware.clone())?,
            "model" => nvme.map(|d| d.controller().model.clone())?,
            "serial" => nvme.map(|d| d.controller().serial.clone())?,
            "nsid" => nvme.map(|d| d.nsid().to_string())?,
            "pci" => self.nvme.as_ref().map(|(_, p)| p.clone())?,
            "queue_pairs" => info().queue_pairs.to_string(),
            "outstanding" => info().outstanding.to_string(),
            "timeouts" => info().timeouts.to_string(),
            "resets" => info().resets.to_string(),
            "nv_cache" if nvme.is_some() || self.nvme_kernel.is_some() => b(self.nv_cache),
            "active" => b(self.is_active()),
            "blocksize" => self.block_size.to_string(),
            "d_sense" => b(self.saved_mode_params().d_sense),
            "eui64_id" => hex(&id.eui64_id),
            "expl_alua" => b(self.expl_alua()),
            "fault_inject" => self
                .bdev
                .fault()
                .map_or(Fault::None, |f| f.get())
                .name()
                .into(),
            "fault_delay_us" => self.bdev.fault().map_or(0, |f| f.delay_us()).to_string(),
            "fault_delay_every" => self.bdev.fault().map_or(1, |f| f.delay_every()).to_string(),
            "filename" => self.file.as_ref().map(|f| f.filename()).unwrap_or_default(),
            "lb_per_pb_exp" => b(self.lb_per_pb_exp.load(Ordering::Relaxed)),
            "naa_id" => hex(&id.naa_id),
            "nv_cache" => opt(|o| o.nv_cache),
            "o_direct" => opt(|o| o.o_direct),
            "opt_trans_len" => id.opt_trans_len.to_string(),
            "pr_file_name" => self
                .pr
                .file()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "pr_state" => self.pr.snapshot().to_text(),
            "prod_id" => id.prod_id,
            "prod_rev_lvl" => id.prod_rev_lvl,
            "read_only" => b(self.read_only),
            "removable" => b(self.removable),
            // Write-only: reading shows nothing, as in SCST.
            "resync_size" | "sync" | "reset" => String::new(),
            "rotational" => b(self.rotational),
            "size" => self.size().to_string(),
            "size_mb" => (self.size() >> 20).to_string(),
            "swp" => b(self.saved_mode_params().swp),
            "t10_dev_id" => id.t10_dev_id,
            "t10_vend_id" => id.t10_vend_id,
            "thin_provisioned" => b(self.thin),
            "tst" => "1".into(),
            "type" => handler_type(&self.handler).into(),
            "usn" => id.usn,
            // The saved caching page: the write cache off where it can be on.
            "write_through" => b(self.write_cache_changeable() && !self.saved_mode_params().wce),
            _ => return None,
        })
    }

    /// Whether the attribute differs from its default (SCST's `[key]` mark).
    pub fn is_key_attr(&self, name: &str) -> bool {
        let given = |k: &str| self.params.iter().any(|(p, _)| p == k);
        match name {
            "blocksize" | "read_only" | "removable" | "rotational" | "thin_provisioned"
            | "nv_cache" | "o_direct" | "pci" | "nsid" => given(name),
            "write_through" | "swp" | "d_sense" => {
                given(name) || self.get_attr(name).is_some_and(|v| v == "1")
            }
            "size" | "size_mb" => given("size") || given("size_mb"),
            "t10_dev_id" => {
                given("t10_dev_id") || self.ident().t10_dev_id != self.default_ident.t10_dev_id
            }
            "filename" => given("filename") || !self.get_attr(name).unwrap_or_default().is_empty(),
            "active" => given("active") || !self.is_active(),
            "expl_alua" => self.expl_alua(),
            "fault_inject" => self.bdev.fault().is_some_and(|f| f.get() != Fault::None),
            "fault_delay_us" => self.bdev.fault().is_some_and(|f| f.delay_us() != 0),
            "fault_delay_every" => self.bdev.fault().is_some_and(|f| f.delay_every() != 1),
            "lb_per_pb_exp" => given(name) || !self.lb_per_pb_exp.load(Ordering::Relaxed),
            "pr_file_name" => self.pr.file().is_some(),
            "naa_id" | "eui64_id" | "opt_trans_len" | "prod_id" | "prod_rev_lvl"
            | "t10_vend_id" | "usn" => self.get_attr(name) != self.default_attr(name),
            _ => false,
        }
    }

    fn default_attr(&self, name: &str) -> Option<String> {
        let d = &self.default_ident;
        Some(match name {
            "naa_id" => hex(&d.naa_id),
            "eui64_id" => hex(&d.eui64_id),
            "opt_trans_len" => d.opt_trans_len.to_string(),
            "prod_id" => d.prod_id.clone(),
            "prod_rev_lvl" => d.prod_rev_lvl.clone(),
            "t10_vend_id" => d.t10_vend_id.clone(),
            "usn" => d.usn.clone(),
            _ => return None,
        })
    }

    /// Sets a writable attribute and raises the unit attention the change calls for:
    /// INQUIRY DATA HAS CHANGED for identity, CAPACITY DATA HAS CHANGED for a new size,
    /// NOT READY TO READY CHANGE when a medium is loaded or a disk becomes active.
    pub fn set_attr(&self, name: &str, value: &str) -> Result<(), DeviceError> {
        let v = value.trim_end_matches('\n');
        match self.attrs().iter().find(|a| a.name == name) {
            None => {
                return Err(invalid(format!(
                    "device {} has no attribute {name}",
                    self.name
                )))
            }
            Some(a) if !a.writable => return Err(invalid(format!("{name} is read-only"))),
            Some(_) => {}
        }
        if name == "reset" {
            if v.trim() != "1" {
                return Err(invalid("write 1 to reset"));
            }
            if let Some(k) = &self.nvme_kernel {
                return k
                    .reset_controller()
                    .map_err(|e| invalid(format!("reset of the NVMe controller failed: {e}")));
            }
            let Some((dev, bdf)) = self.nvme.as_ref() else {
                return Err(invalid("reset: not an NVMe device"));
            };
            return dev
                .reset_controller(&crate::bdev::nvme::controller::SystemClock)
                .map_err(|e| invalid(format!("reset of NVMe controller {bdf} failed: {e}")));
        }
        if name == "fault_inject" {
            let f = Fault::parse(v.trim()).ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|(_, n)| *n).collect();
                invalid(format!(
                    "fault_inject must be one of {}, not {}",
                    names.join(", "),
                    quote(v)
                ))
            })?;
            if let Some(fi) = self.bdev.fault() {
                fi.set(f);
            }
            return Ok(());
        }
        if name == "pr_file_name" {
            // SCST's pr_file_name, without a default: empty, APTPL is refused (PTPL_C=0).
            let path = v.trim();
            let path = (!path.is_empty()).then(|| std::path::Path::new(path));
            return self
                .pr
                .set_file(path)
                .map_err(|e| invalid(format!("pr_file_name: {e}")));
        }
        if name == "pr_state" {
            let s = Snapshot::from_text(value).map_err(|e| invalid(format!("pr_state: {e}")))?;
            let persist = self
                .pr
                .restore(&s)
                .map_err(|e| invalid(format!("pr_state: {e}")))?;
            if let Some(p) = persist {
                self.pr
                    .persist(&p)
                    .map_err(|e| invalid(format!("pr_state: {e}")))?;
            }
            return Ok(());
        }
        if matches!(name, "write_through" | "swp" | "d_sense") {
            return self.set_mode_attr(name, parse_bool(name, v)?);
        }
        if name == "expl_alua" {
            let on = parse_bool(name, v)?;
            // TPGS in the standard INQUIRY data changes with it, in a device group.
            if self.expl_alua.swap(on, Ordering::Relaxed) != on && self.alua().group().is_some() {
                self.add_ua_all(UA_INQUIRY_DATA_CHANGED.0, UA_INQUIRY_DATA_CHANGED.1);
            }
            return Ok(());
        }
        if name == "fault_delay_us" {
            let us = parse_u64(name, v)?;
            if us > MAX_FAULT_DELAY_US {
                return Err(invalid(format!(
                    "fault_delay_us must be at most {MAX_FAULT_DELAY_US} (a minute), not {us}"
                )));
            }
            if let Some(fi) = self.bdev.fault() {
                fi.set_delay_us(us);
            }
            return Ok(());
        }
        if name == "fault_delay_every" {
            let n = u32::try_from(parse_u64(name, v)?)
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| {
                    invalid(format!(
                        "fault_delay_every must be 1 (every I/O) to {} (one I/O in that many), not {}",
                        u32::MAX,
                        quote(v)
                    ))
                })?;
            if let Some(fi) = self.bdev.fault() {
                fi.set_delay_every(n);
            }
            return Ok(());
        }
        if let Some(f) = &self.file {
            let before = self.size();
            match name {
                "filename" => {
                    let path = v.trim();
                    if self.is_cdrom() {
                        return self.change_medium(f, path);
                    }
                    f.set_filename(path).map_err(invalid)?;
                    self.add_ua_all(UA_MEDIUM_CHANGED.0, UA_MEDIUM_CHANGED.1);
                    if self.size() != before {
                        self.capacity_changed();
                    }
                    return Ok(());
                }
                "active" => {
                    let on = parse_bool(name, v)?;
                    let was = self.is_active();
                    f.set_active(on).map_err(invalid)?;
                    if on && !was {
                        self.add_ua_all(UA_MEDIUM_CHANGED.0, UA_MEDIUM_CHANGED.1);
                        if self.size() != before {
                            self.capacity_changed();
                        }
                    }
                    return Ok(());
                }
                "resync_size" => {
                    if v.trim() != "1" {
                        return Err(invalid("write 1 to resync_size"));
                    }
                    f.resync_size().map_err(invalid)?;
                    // SCST raises it on every resync, changed or not.
                    self.capacity_changed();
                    return Ok(());
                }
                "size" | "size_mb" => {
                    let n = parse_u64(name, v)?;
                    let bytes = if name == "size_mb" {
                        n.checked_mul(1 << 20)
                            .ok_or_else(|| invalid(format!("size_mb {v} is too large")))?
                    } else {
                        n
                    };
                    f.set_size(bytes).map_err(invalid)?;
                    if self.size() != before {
                        self.capacity_changed();
                    }
                    return Ok(());
                }
                "sync" => {
                    if v.trim() != "1" {
                        return Err(invalid("write 1 to sync"));
                    }
                    return f.sync().map_err(invalid);
                }
                "lb_per_pb_exp" => {
                    let on = parse_bool(name, v)?;
                    self.lb_per_pb_exp.store(on, Ordering::Relaxed);
                    self.capacity_changed();
                    return Ok(());
                }
                _ => {}
            }
        }
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
            "t10_dev_id" => id.t10_dev_id = parse_t10_dev_id(v)?,
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
            "naa_id" => match parse_hex(v) {
                Some(b) if b.len() == 8 || b.len() == 16 => id.naa_id = b,
                _ => return Err(invalid("naa_id must be 8 or 16 bytes in hex")),
            },
            "eui64_id" => match parse_hex(v) {
                Some(b) if b.is_empty() || b.len() == 8 || b.len() == 12 || b.len() == 16 => {
                    id.eui64_id = b
                }
                _ => {
                    return Err(invalid(
                        "eui64_id must be 8, 12 or 16 bytes in hex (or empty)",
                    ))
                }
            },
            _ => {
                drop(id);
                return Err(invalid(format!("{name} is read-only")));
            }
        }
        drop(id);
        // SPC-4: INQUIRY DATA HAS CHANGED to every I_T nexus.
        self.add_ua_all(UA_INQUIRY_DATA_CHANGED.0, UA_INQUIRY_DATA_CHANGED.1);
        Ok(())
    }

    /// Sets a saved mode parameter from its attribute, and the current one with it: the
    /// administrator's MODE SELECT with SP=1. Every nexus hears MODE PARAMETERS CHANGED when
    /// a current value changes.
    fn set_mode_attr(&self, name: &str, on: bool) -> Result<(), DeviceError> {
        let mut cur = self.mode_params();
        let mut saved = self.saved_mode_params();
        match name {
            "write_through" => {
                if on && !self.write_cache_changeable() {
                    return Err(invalid("write_through and nv_cache exclude each other"));
                }
                cur.wce = !on && self.write_cache_changeable();
                saved.wce = cur.wce;
            }
            "swp" => (cur.swp, saved.swp) = (on, on),
            _ => (cur.d_sense, saved.d_sense) = (on, on),
        }
        let changed = self.set_mode_params(cur, false);
        *self.saved_mode.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        if changed {
            self.add_ua_all(UA_MODE_PARAMETERS_CHANGED.0, UA_MODE_PARAMETERS_CHANGED.1);
        }
        Ok(())
    }

    fn capacity_changed(&self) {
        self.add_ua_all(UA_CAPACITY_DATA_CHANGED.0, UA_CAPACITY_DATA_CHANGED.1);
    }

    /// Ejects (`path` empty) or loads a CD. An eject is refused while an initiator prevents
    /// medium removal (SPC-4 §6.13); so is a load over a disc already in the drive.
    ///
    /// Unit attentions (MMC-6 §4.1.6 media changes): a load raises NOT READY TO READY
    /// CHANGE, MEDIUM MAY HAVE CHANGED (28/00), so initiators drop what they cached. An eject
    /// raises none: the drive simply becomes not ready, and every media access command then
    /// fails with NOT READY, MEDIUM NOT PRESENT (3A/00), which is how a real drive reports a
    /// removed disc (28/00 would claim a transition *to* ready).
    fn change_medium(&self, f: &FileDev, path: &str) -> Result<(), DeviceError> {
        if f.is_open() && self.removal_prevented() {
            return Err(invalid(format!(
                "cannot {} the medium of {}: an initiator prevents medium removal (PREVENT ALLOW MEDIUM REMOVAL)",
                if path.is_empty() { "eject" } else { "replace" },
                self.name
            )));
        }
        if path.is_empty() {
            f.set_filename("").map_err(invalid)?;
            return Ok(());
        }
        f.set_filename(path).map_err(invalid)?;
        self.add_ua_all(UA_MEDIUM_CHANGED.0, UA_MEDIUM_CHANGED.1);
        Ok(())
    }

    /// A new I_T nexus, `nexus` to the transport and `pr` to persistent reservations, sees
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED first (SAM-5).
    pub fn register_nexus(&self, nexus: u64, pr: &Nexus) {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        ua.insert(nexus, vec![(0x29, 0x00)]);
        self.ua_queued();
        drop(ua);
        self.lock_nexuses().insert(nexus, pr.clone());
    }

    /// The I_T nexus is gone (SAM-5 I_T nexus loss).
    pub fn unregister_nexus(&self, nexus: u64) {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        ua.remove(&nexus);
        if ua.values().all(Vec::is_empty) {
            self.ua_pending.store(false, Ordering::Release);
        }
        drop(ua);
        // A nexus that goes away releases its PREVENT (SPC-4 §6.13) and its RESERVE (SPC-2
        // §5.5.1), unless a newer session of the same I_T nexus (one that reinstated it) is
        // registered still.
        self.set_prevent_removal(nexus, false);
        let mut nexuses = self.lock_nexuses();
        if let Some(pr) = nexuses.remove(&nexus) {
            if !nexuses.values().any(|n| *n == pr) {
                drop(nexuses);
                self.pr.nexus_lost(&pr);
            }
        }
    }

    fn lock_nexuses(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Nexus>> {
        self.nexuses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Establishes the unit attentions a PERSISTENT RESERVE OUT leaves for the registered
    /// I_T nexuses (SPC-4 §5.13.11), and returns those whose tasks its PREEMPT AND ABORT
    /// aborts (SPC-4 §5.13.11.2.4).
    pub fn deliver_reservation_outcome(&self, o: &OutOutcome) -> Vec<u64> {
        let nexuses = self.lock_nexuses();
        let mut aborts = Vec::new();
        for (&id, n) in nexuses.iter() {
            for (asc, ascq) in o.unit_attentions_for(n) {
                self.add_ua(id, asc, ascq);
            }
            if o.aborts(n) {
                aborts.push(id);
            }
        }
        aborts
    }

    /// Queues a unit attention for every I_T nexus.
    pub fn add_ua_all(&self, asc: u8, ascq: u8) {
        self.add_ua_others(u64::MAX, asc, ascq);
    }

    /// Queues a unit attention for one registered I_T nexus (the unit attentions a
    /// PERSISTENT RESERVE OUT establishes for other nexuses, SPC-4 §5.13.11).
    pub fn add_ua(&self, nexus: u64, asc: u8, ascq: u8) {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = ua.get_mut(&nexus) {
            if !q.contains(&(asc, ascq)) {
                q.push((asc, ascq));
            }
            self.ua_queued();
        }
    }

    /// Called with `ua` locked after a unit attention was queued.
    fn ua_queued(&self) {
        self.ua_epoch.store(pr::next_epoch(), Ordering::Release);
        self.ua_pending.store(true, Ordering::Release);
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
            self.ua_queued();
        }
    }

    /// [`Self::take_ua`] for the commands of a session, whose nexus `seen` remembers when
    /// its queue was last found empty: while other nexuses have unit attentions pending
    /// (one that never sends a command keeps its own forever), this one's commands cost two
    /// atomic loads, not the lock.
    pub fn take_ua_of(&self, nexus: u64, seen: &Nexus) -> Option<(u8, u8)> {
        if !self.ua_pending.load(Ordering::Acquire)
            || seen.ua_clear_at(self.ua_epoch.load(Ordering::Acquire))
        {
            return None;
        }
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        let q = ua.get_mut(&nexus)?;
        let first = (!q.is_empty()).then(|| q.remove(0));
        if q.is_empty() {
            seen.set_ua_clear_at(self.ua_epoch.load(Ordering::Relaxed));
        }
        if ua.values().all(Vec::is_empty) {
            self.ua_pending.store(false, Ordering::Release);
        }
        first
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

/// The `type` attribute of a handler and of its devices, as SCST shows it: the SPC
/// peripheral device type and its name.
pub fn handler_type(handler: &str) -> &'static str {
    if handler == "vcdrom" {
        "5 - CD-ROM device"
    } else {
        "0 - direct-access device (e.g., magnetic disk)"
    }
}

/// Counts the devices dropped so far: a reactor's port compares it with the count it last
/// saw (one atomic load a pass) to know when a channel of its may have lost its device.
static DEVICES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// [`DEVICES_DROPPED`] now.
pub fn devices_dropped() -> u64 {
    DEVICES_DROPPED.load(Ordering::Acquire)
}

impl Drop for Device {
    fn drop(&mut self) {
        // The strong count is already 0: a port that loads the new count sees it so.
        DEVICES_DROPPED.fetch_add(1, Ordering::Release);
        // I/O held by a stall would otherwise wait for a device nobody can reach any more
        // (and delayed I/O for its deadline).
        if let Some(f) = self.bdev.fault() {
            f.set(Fault::None);
            f.set_delay_us(0);
        }
    }
}

/// The parameters `add_device` accepts for `handler` (SCST's lists, less what has no
/// meaning in a userspace target: DIF, ALUA binding, cluster mode, NUMA node, `async`).
pub fn add_device_params(handler: &str) -> Option<&'static [&'static str]> {
    const RAM: &[&str] = &[
        "blocksize",
        "read_only",
        "removable",
        "rotational",
        "size",
        "size_mb",
        "t10_dev_id",
        "thin_provisioned",
        "tst",
    ];
    const FILEIO: &[&str] = &[
        "active",
        "blocksize",
        "filename",
        "lb_per_pb_exp",
        "nv_cache",
        "o_direct",
        "read_only",
        "removable",
        "rotational",
        "size",
        "size_mb",
        "t10_dev_id",
        "thin_provisioned",
        "tst",
        "write_through",
    ];
    const BLOCKIO: &[&str] = &[
        "active",
        "blocksize",
        "filename",
        "lb_per_pb_exp",
        "nv_cache",
        "read_only",
        "removable",
        "rotational",
        "t10_dev_id",
        "thin_provisioned",
        "tst",
        "write_through",
    ];
    const NVME: &[&str] = &[
        "filename",
        "nsid",
        "nv_cache",
        "pci",
        "read_only",
        "t10_dev_id",
        "thin_provisioned",
        "tst",
    ];
    match handler {
        "vdisk_nullio" | "vdisk_ramio" => Some(RAM),
        "vdisk_nvme" => Some(NVME),
        "vdisk_fileio" => Some(FILEIO),
        "vdisk_blockio" => Some(BLOCKIO),
        "vcdrom" => Some(&["tst"]),
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
    fn passthrough_parameters_are_one_form() {
        assert_eq!(
            check_passthru_params(&p(&[("filename", "/dev/ng0n1")]), Some("/dev/ng0n1")).ok(),
            Some("/dev/ng0n1")
        );
        let e = |pairs: &[(&str, &str)], f: Option<&str>| {
            check_passthru_params(&p(pairs), f).unwrap_err().to_string()
        };
        assert!(e(
            &[("filename", "/dev/ng0n1"), ("pci", "00:04.0")],
            Some("/dev/ng0n1")
        )
        .contains("not both"));
        assert!(e(
            &[("filename", "/dev/ng0n1"), ("nsid", "2")],
            Some("/dev/ng0n1")
        )
        .contains("nsid goes with pci="));
        assert!(e(&[("filename", "")], Some("")).contains("filename must name"));
        // The add_device of neither form says what it needs.
        let m = Device::create("vdisk_nvme", "n", &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            m.contains("pci=") && m.contains("filename=/dev/ngXnY"),
            "{m}"
        );
    }

    #[test]
    fn nvme_parameters_parse() {
        assert_eq!(
            parse_nvme_params(&p(&[("pci", "0000:00:04.0"), ("nsid", "1")])),
            Ok(("0000:00:04.0".to_string(), 1))
        );
        assert_eq!(
            parse_nvme_params(&p(&[("pci", "3B:00.0")])),
            Ok(("0000:3b:00.0".to_string(), 1)),
            "the short form, and nsid 1 by default"
        );
        assert_eq!(
            parse_nvme_params(&p(&[("pci", "0000:00:04.0"), ("nsid", "4294967294")])),
            Ok(("0000:00:04.0".to_string(), 0xffff_fffe))
        );
        let e = |pairs: &[(&str, &str)]| parse_nvme_params(&p(pairs)).unwrap_err().to_string();
        assert!(e(&[("nsid", "1")]).contains("needs pci="));
        assert!(e(&[("pci", "")]).contains("must be a PCI address"));
        assert!(e(&[("pci", "0000:00:04.0.1")]).contains("must be a PCI address"));
        assert!(e(&[("pci", "/dev/nvme0")]).contains("must be a PCI address"));
        for bad in ["0", "4294967295", "-1", "one", ""] {
            assert!(
                e(&[("pci", "0000:00:04.0"), ("nsid", bad)]).contains("nsid must be"),
                "{bad}"
            );
        }
        // Through create: parameters of other handlers are refused before anything opens.
        let e = Device::create(
            "vdisk_nvme",
            "n",
            &p(&[("pci", "0:0:4.0"), ("size_mb", "1")]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("does not accept parameter \"size_mb\""), "{e}");
        assert!(HANDLERS.contains(&"vdisk_nvme"));
    }

    #[test]
    fn nvme_identity_comes_from_the_controller_and_namespace() {
        let ctrl = IdentifyController {
            serial: "SN;0001  ".into(),
            model: "QEMU NVMe Ctrl with a long model".into(),
            firmware: "8.0.2   ".into(),
            ..Default::default()
        };
        let mut ns = IdentifyNamespace::default();
        let id = nvme_ident("dev", None, &ctrl, &ns, 1);
        assert_eq!(id.t10_vend_id, "NVMe");
        assert_eq!(id.prod_id, "QEMU NVMe Ctrl w");
        assert_eq!(id.prod_rev_lvl, "8.0.");
        assert_eq!(id.t10_dev_id, "SN0001-1", "printable, without ';'");
        assert_eq!(id.usn, "SN0001-1");
        assert!(
            id.eui64_id.is_empty(),
            "no EUI64 or NGUID: no EUI-64 designator"
        );
        assert_eq!(id.naa_id.len(), 8);
        assert_eq!(id.naa_id[0] >> 4, 3, "NAA 3, locally assigned");
        // Another namespace of the same controller gets other identifiers.
        let id2 = nvme_ident("dev", None, &ctrl, &ns, 2);
        assert_ne!(id.naa_id, id2.naa_id);
        assert_ne!(id.t10_dev_id, id2.t10_dev_id);

        // A namespace with an NGUID: the EUI-64 designator carries it, and the NAA follows
        // it rather than the device name or controller.
        ns.nguid = [0x11; 16];
        let a = nvme_ident("a", None, &ctrl, &ns, 1);
        let b = nvme_ident("b", Some("mine"), &IdentifyController::default(), &ns, 1);
        assert_eq!(a.eui64_id, vec![0x11; 16]);
        assert_eq!(a.naa_id, b.naa_id);
        assert_eq!(b.t10_dev_id, "mine", "a given t10_dev_id wins");
        // EUI64 is preferred to NGUID.
        ns.eui64 = [0x22; 8];
        assert_eq!(nvme_ident("a", None, &ctrl, &ns, 1).eui64_id, vec![0x22; 8]);
        // A controller with a blank serial and model still gets valid identifiers.
        let blank = nvme_ident("n", None, &IdentifyController::default(), &ns, 1);
        assert!(!blank.t10_dev_id.is_empty() && !blank.usn.is_empty());
        assert_eq!(blank.prod_id, "n");
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
    fn fault_inject_attribute() {
        let dir = tmp();
        let f = dir.path().join("fi.img");
        let file = Device::create(
            "vdisk_fileio",
            "f",
            &p(&[("filename", f.to_str().unwrap()), ("size_mb", "1")]),
        )
        .unwrap();
        let ram = Device::create("vdisk_ramio", "r", &p(&[("size_mb", "1")])).unwrap();
        for d in [&file, &ram] {
            assert_eq!(d.get_attr("fault_inject").unwrap(), "none");
            assert!(!d.is_key_attr("fault_inject"), "saved at its default");
            for v in ["eio_read", "eio_write", "eio", "stall", "none\n", "eio"] {
                d.set_attr("fault_inject", v).unwrap();
                assert_eq!(d.get_attr("fault_inject").unwrap(), v.trim());
            }
            assert!(d.is_key_attr("fault_inject"));
            let e = d
                .set_attr("fault_inject", "sometimes")
                .unwrap_err()
                .to_string();
            assert!(e.contains("eio_write") && e.contains("sometimes"), "{e}");
            assert_eq!(d.get_attr("fault_inject").unwrap(), "eio");
            d.set_attr("fault_inject", "none").unwrap();
        }
        for d in [&file, &ram] {
            assert_eq!(d.get_attr("fault_delay_us").unwrap(), "0");
            assert_eq!(d.get_attr("fault_delay_every").unwrap(), "1");
            assert!(!d.is_key_attr("fault_delay_us") && !d.is_key_attr("fault_delay_every"));
            d.set_attr("fault_delay_us", "20000\n").unwrap();
            d.set_attr("fault_delay_every", "4").unwrap();
            assert_eq!(d.get_attr("fault_delay_us").unwrap(), "20000");
            assert_eq!(d.get_attr("fault_delay_every").unwrap(), "4");
            assert!(d.is_key_attr("fault_delay_us") && d.is_key_attr("fault_delay_every"));
            let fi = d.bdev.fault().unwrap();
            assert_eq!(
                (fi.delay_us(), fi.delay_every(), fi.get()),
                (20000, 4, Fault::None)
            );
            for (attr, bad, says) in [
                ("fault_delay_us", "60000001", "a minute"),
                ("fault_delay_us", "-1", "number"),
                ("fault_delay_us", "soon", "number"),
                ("fault_delay_every", "0", "every I/O"),
                ("fault_delay_every", "4294967296", "every I/O"),
            ] {
                let e = d.set_attr(attr, bad).unwrap_err().to_string();
                assert!(e.contains(says) && e.contains(attr), "{attr} {bad}: {e}");
            }
            assert_eq!(d.get_attr("fault_delay_us").unwrap(), "20000", "unchanged");
            d.set_attr("fault_delay_us", "0").unwrap();
            d.set_attr("fault_delay_every", "1").unwrap();
            assert!(!d.is_key_attr("fault_delay_us") && !d.is_key_attr("fault_delay_every"));
        }
        // Not on devices that are neither a file, a block device nor RAM.
        let n = Device::create("vdisk_nullio", "n", &[]).unwrap();
        assert!(n.get_attr("fault_inject").is_none());
        assert!(n.get_attr("fault_delay_us").is_none());
        let cd = Device::create("vcdrom", "cd", &[]).unwrap();
        assert!(cd.get_attr("fault_inject").is_none());
        // A device that goes away releases what a stall holds.
        ram.set_attr("fault_inject", "stall").unwrap();
        let bdev = ram.bdev.clone();
        drop(ram);
        assert_eq!(bdev.fault().unwrap().get(), crate::bdev::Fault::None);
    }

    #[test]
    fn unit_attentions() {
        let d = Device::create("vdisk_nullio", "n0", &[]).unwrap();
        assert_eq!(d.take_ua(1), None);
        d.register_nexus(
            1,
            &crate::scsi::pr::Nexus::new("iqn.test", [0, 0, 0, 0, 0, 1], 1),
        );
        d.register_nexus(
            2,
            &crate::scsi::pr::Nexus::new("iqn.test", [0, 0, 0, 0, 0, 2], 1),
        );
        assert_eq!(d.take_ua(1), Some((0x29, 0)));
        assert_eq!(d.take_ua(1), None);
        d.add_ua_others(2, 0x29, 0x03);
        assert_eq!(d.take_ua(1), Some((0x29, 3)));
        assert_eq!(d.take_ua(2), Some((0x29, 0)));
        assert_eq!(d.take_ua(2), None);
        // One nexus only, once, and none for a nexus that is not registered.
        d.add_ua(2, 0x2a, 0x05);
        d.add_ua(2, 0x2a, 0x05);
        d.add_ua(9, 0x2a, 0x05);
        assert_eq!(d.take_ua(1), None);
        assert_eq!(d.take_ua(9), None);
        assert_eq!(d.take_ua(2), Some((0x2a, 0x05)));
        assert_eq!(d.take_ua(2), None);
    }

    /// A session's commands skip the lock once its own queue is empty, and still see every
    /// unit attention queued after that.
    #[test]
    fn unit_attentions_of_a_session() {
        let d = Device::create("vdisk_nullio", "n0", &[]).unwrap();
        let (n1, n2) = (
            Nexus::new("iqn.test", [0, 0, 0, 0, 0, 1], 1),
            Nexus::new("iqn.test", [0, 0, 0, 0, 0, 2], 1),
        );
        d.register_nexus(1, &n1);
        d.register_nexus(2, &n2);
        let clear = |n: &Nexus| n.ua_clear_at(d.ua_epoch.load(Ordering::Relaxed));
        assert!(!clear(&n1));
        assert_eq!(d.take_ua_of(1, &n1), Some((0x29, 0)));
        // Nexus 2 never asks: unit attentions stay pending, but nexus 1 knows it has none.
        assert!(d.ua_pending.load(Ordering::Relaxed));
        assert!(clear(&n1));
        assert_eq!(d.take_ua_of(1, &n1), None);
        d.add_ua(1, 0x2a, 0x05);
        assert!(!clear(&n1), "a new unit attention is a new epoch");
        assert_eq!(d.take_ua_of(1, &n1), Some((0x2a, 0x05)));
        // One queued for another nexus changes the epoch too: a look, and nothing.
        d.add_ua(2, 0x2a, 0x03);
        assert_eq!(d.take_ua_of(1, &n1), None);
        assert!(clear(&n1));
        d.add_ua_all(0x3f, 0x03);
        assert_eq!(d.take_ua_of(1, &n1), Some((0x3f, 0x03)));
        assert_eq!(d.take_ua_of(2, &n2), Some((0x29, 0)));
        assert_eq!(d.take_ua_of(2, &n2), Some((0x2a, 0x03)));
        assert_eq!(d.take_ua_of(2, &n2), Some((0x3f, 0x03)));
        assert_eq!(d.take_ua_of(2, &n2), None);
        assert!(!d.ua_pending.load(Ordering::Relaxed));
        // A nexus that comes back (a new session of the same I_T nexus) hears POWER ON again.
        d.unregister_nexus(1);
        d.register_nexus(1, &n1);
        assert_eq!(d.take_ua_of(1, &n1), Some((0x29, 0)));
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").unwrap()
    }

    #[test]
    fn fileio_parameters_and_attributes() {
        let dir = tmp();
        let f = dir.path().join("disk.img");
        let fs = f.to_str().unwrap();
        let e = |r: Result<Arc<Device>, DeviceError>| {
            r.err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(e(Device::create("vdisk_fileio", "f", &[])).contains("filename"));
        assert!(
            e(Device::create("vdisk_fileio", "f", &p(&[("filename", fs)])))
                .contains("No such file")
        );
        assert!(e(Device::create(
            "vdisk_fileio",
            "f",
            &p(&[("filename", fs), ("blocksize", "1536")])
        ))
        .contains("power of two"));
        assert!(e(Device::create(
            "vdisk_fileio",
            "f",
            &p(&[("filename", fs), ("size", "1000")])
        ))
        .contains("multiple"));
        assert!(e(Device::create(
            "vdisk_fileio",
            "f",
            &p(&[("filename", fs), ("size_mb", "1"), ("tst", "0")])
        ))
        .contains("tst"));
        let d = Device::create(
            "vdisk_fileio",
            "f",
            &p(&[
                ("filename", fs),
                ("size_mb", "2"),
                ("blocksize", "4096"),
                ("thin_provisioned", "1"),
                ("write_through", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 2 << 20, "created");
        assert_eq!(d.num_blocks(), 512);
        assert!(d.thin_provisioned() && d.bdev.supports_unmap());
        assert!(!d.bdev.has_volatile_cache(), "write_through reports WCE=0");
        for a in d.attrs() {
            assert!(d.get_attr(a.name).is_some(), "{}", a.name);
        }
        assert_eq!(d.get_attr("filename").unwrap(), fs);
        assert_eq!(d.get_attr("active").unwrap(), "1");
        assert_eq!(d.get_attr("o_direct").unwrap(), "0");
        assert!(d.is_key_attr("filename") && d.is_key_attr("write_through"));
        assert!(!d.is_key_attr("nv_cache"));
        assert!(d
            .set_attr("size", "4096")
            .unwrap_err()
            .to_string()
            .contains("read-only"));
        // resync_size picks up a grown file and raises CAPACITY DATA HAS CHANGED.
        d.register_nexus(
            1,
            &crate::scsi::pr::Nexus::new("iqn.test", [0, 0, 0, 0, 0, 1], 1),
        );
        d.take_ua(1);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        d.set_attr("resync_size", "1").unwrap();
        assert_eq!(d.num_blocks(), 768);
        assert_eq!(d.get_attr("size_mb").unwrap(), "3");
        assert_eq!(d.take_ua(1), Some((0x2a, 0x09)));
        // active=0 closes, commands see NOT READY; active=1 reopens.
        d.set_attr("active", "0").unwrap();
        assert_eq!(d.not_ready(), Some((0x04, 0x03)));
        assert_eq!(d.get_attr("active").unwrap(), "0");
        assert!(d.is_key_attr("active"));
        d.set_attr("active", "1").unwrap();
        assert_eq!(d.not_ready(), None);
        assert_eq!(d.take_ua(1), Some((0x28, 0x00)));
        d.set_attr("eui64_id", "0011223344556677").unwrap();
        assert_eq!(d.ident().eui64_id.len(), 8);
        assert!(d.set_attr("eui64_id", "0011").is_err());
        d.set_attr("sync", "1").unwrap();
        d.set_attr("lb_per_pb_exp", "0").unwrap();
        assert_eq!(d.lb_per_pb_exponent(), 0);
    }

    #[test]
    fn persistent_reservation_attributes() {
        use crate::scsi::pr::{self, Nexus};
        let dir = tmp();
        let file = dir.path().join("pr").join("r0");
        let d = Device::create("vdisk_ramio", "r0", &p(&[("size_mb", "1")])).unwrap();
        assert_eq!(d.get_attr("pr_file_name").unwrap(), "");
        assert!(!d.is_key_attr("pr_file_name"));
        let e = d.set_attr("pr_file_name", "relative/path").unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        d.set_attr("pr_file_name", file.to_str().unwrap()).unwrap();
        assert_eq!(d.get_attr("pr_file_name").unwrap(), file.to_str().unwrap());
        assert!(d.is_key_attr("pr_file_name"));
        // An APTPL registration is written to the file...
        let a = Nexus::new("iqn.2024-01.test:a", [0x40, 0, 0, 0, 0, 1], 1);
        let mut params = [0u8; 24];
        params[8..16].copy_from_slice(&0xabcdu64.to_be_bytes());
        params[20] = 0x01; // APTPL
        let cdb = [
            pr::opcode::PERSISTENT_RESERVE_OUT,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            24,
            0,
        ];
        let o = d.reservations().persistent_reserve_out(&a, &cdb, &params);
        assert_eq!(o.status, pr::Status::Good);
        d.reservations()
            .persist(o.persist.as_ref().unwrap())
            .unwrap();
        let state = d.get_attr("pr_state").unwrap();
        assert!(state.contains("0x000000000000abcd"), "{state}");
        // ...and a device given the file has it back; pr_state carries it to another.
        let d2 = Device::create("vdisk_ramio", "r1", &p(&[("size_mb", "1")])).unwrap();
        d2.set_attr("pr_file_name", file.to_str().unwrap()).unwrap();
        assert_eq!(d2.get_attr("pr_state").unwrap(), state);
        let e = d2.set_attr("pr_file_name", "").unwrap_err();
        assert!(e.to_string().contains("registrations exist"), "{e}");
        let d3 = Device::create("vdisk_nullio", "n3", &[]).unwrap();
        let e = d3.set_attr("pr_state", &state).unwrap_err();
        assert!(
            e.to_string().contains("pr_file_name"),
            "APTPL needs a file: {e}"
        );
        let file3 = dir.path().join("n3");
        d3.set_attr("pr_file_name", file3.to_str().unwrap())
            .unwrap();
        d3.set_attr("pr_state", &state).unwrap();
        assert_eq!(d3.get_attr("pr_state").unwrap(), state);
        assert!(file3.exists(), "restored with APTPL: written");
        let e = d3
            .set_attr("pr_state", &state.replace("abcd", "abce"))
            .unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // A damaged file is refused, and the device keeps what it had.
        std::fs::write(&file, "not a state\n").unwrap();
        let d4 = Device::create("vdisk_nullio", "n4", &[]).unwrap();
        let e = d4
            .set_attr("pr_file_name", file.to_str().unwrap())
            .unwrap_err();
        assert!(e.to_string().contains(file.to_str().unwrap()), "{e}");
        assert_eq!(d4.get_attr("pr_file_name").unwrap(), "");
    }

    #[test]
    fn vcdrom_eject_and_insert() {
        let dir = tmp();
        let iso = dir.path().join("a.iso");
        std::fs::write(&iso, vec![1u8; 2048 * 4]).unwrap();
        let d = Device::create("vcdrom", "cd0", &[]).unwrap();
        assert_eq!(d.scsi_type(), 0x05);
        assert_eq!(d.block_size(), 2048);
        assert!(d.is_read_only() && d.is_removable());
        assert!(!d.medium_present());
        assert_eq!(d.not_ready(), Some((0x3a, 0x00)));
        assert_eq!(d.get_attr("filename").unwrap(), "");
        assert!(d.get_attr("blocksize").is_none());
        assert!(Device::create("vcdrom", "cd1", &p(&[("filename", "/x.iso")])).is_err());
        d.register_nexus(
            4,
            &crate::scsi::pr::Nexus::new("iqn.test", [0, 0, 0, 0, 0, 4], 1),
        );
        d.take_ua(4);
        d.set_attr("filename", iso.to_str().unwrap()).unwrap();
        assert!(d.medium_present());
        assert_eq!(d.num_blocks(), 4);
        assert_eq!(d.take_ua(4), Some((0x28, 0x00)));
        assert!(d.is_key_attr("filename"));
        // PREVENT ALLOW MEDIUM REMOVAL blocks the eject.
        d.set_prevent_removal(4, true);
        let e = d.set_attr("filename", "").unwrap_err().to_string();
        assert!(e.contains("prevents medium removal"), "{e}");
        assert!(d.medium_present());
        d.set_prevent_removal(4, false);
        d.set_attr("filename", "").unwrap();
        assert!(!d.medium_present());
        assert_eq!(d.num_blocks(), 0);
        assert_eq!(d.take_ua(4), None, "an eject raises no unit attention");
        assert!(d
            .set_attr("filename", "/nonexistent.iso")
            .unwrap_err()
            .to_string()
            .contains("No such file"));
    }
}

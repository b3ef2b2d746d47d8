//! MMC (multimedia commands, MMC-5) for CD-ROM logical units (peripheral device type 05h):
//! the response builders of READ TOC/PMA/ATIP, GET CONFIGURATION, GET EVENT STATUS
//! NOTIFICATION, READ DISC INFORMATION, MECHANISM STATUS and the CD capabilities mode page.
//! They are pure functions of the CDB and a few facts about the drive, so that they can be
//! tested without a device; the entries of [`COMMANDS`] feed them and send what they build.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;

use crate::scsi::command::{Alua, Command, DeviceTypes, Reservation, Run};
use crate::scsi::device::Device;
use crate::scsi::sense::Sense;
use crate::scsi::spc::{CTL, FF};
use crate::scsi::task::{Plan, ScsiTask};

/// Operation codes of MMC commands.
pub mod opcode {
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MECHANISM_STATUS: u8 = 0xbd;
}
use opcode::*;

/// The peripheral device type of a CD/DVD device.
pub const TYPE_CDROM: u8 = 0x05;

/// The logical block size of CD-ROM data (mode 1 user data).
pub const CD_BLOCK_SIZE: u32 = 2048;

/// The CD-ROM profile (MMC-5 §5.3.1).
pub const PROFILE_CDROM: u16 = 0x0008;

/// The mode page of CD capabilities and mechanical status (MMC-3 §6.3.11).
pub const MODE_PAGE_CAPABILITIES: u8 = 0x2a;

/// What the drive is like at the moment a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drive {
    pub medium_present: bool,
    /// Medium removal is prevented (PREVENT ALLOW MEDIUM REMOVAL from some I_T nexus).
    pub prevented: bool,
    /// Logical blocks (of [`CD_BLOCK_SIZE`]) on the loaded medium.
    pub blocks: u64,
}

impl Drive {
    /// What the builders need to know of a CD-ROM device.
    pub fn of(dev: &Device) -> Drive {
        Drive {
            medium_present: dev.medium_present(),
            prevented: dev.removal_prevented(),
            blocks: if dev.medium_present() {
                dev.num_blocks()
            } else {
                0
            },
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// An LBA as MSF (minute, second, frame), with the 2-second pregap (MMC-5 §4.2.3.2).
pub fn lba_to_msf(lba: u64) -> [u8; 4] {
    let f = lba + 150;
    let m = (f / (75 * 60)).min(255) as u8;
    [0, m, ((f / 75) % 60) as u8, (f % 75) as u8]
}

fn address(lba: u64, msf: bool) -> [u8; 4] {
    if msf {
        lba_to_msf(lba)
    } else {
        u32::try_from(lba).unwrap_or(u32::MAX).to_be_bytes()
    }
}

/// ADR 1 (current position data), CONTROL 4 (data track, recorded uninterrupted).
const ADR_CONTROL_DATA: u8 = 0x14;

/// READ TOC/PMA/ATIP (MMC-5 §6.26) of a single-session disc with one data track: format 0
/// (TOC) and format 1 (session information), LBA or MSF addresses. The caller checks that a
/// medium is present.
pub fn read_toc(cdb: &[u8], blocks: u64) -> Result<Vec<u8>, Sense> {
    let msf = cdb[1] & 0x02 != 0;
    let format = cdb[2] & 0x0f;
    let track = cdb[6];
    let alloc = usize::from(be16(&cdb[7..9]));
    let mut d = vec![0, 0, 1, 1];
    match format {
        0 => {
            if track > 1 && track != 0xaa {
                return Err(Sense::invalid_cdb_field(6, None));
            }
            if track <= 1 {
                d.extend_from_slice(&[0, ADR_CONTROL_DATA, 1, 0]);
                d.extend_from_slice(&address(0, msf));
            }
            // The lead-out "track" starts after the last block.
            d.extend_from_slice(&[0, ADR_CONTROL_DATA, 0xaa, 0]);
            d.extend_from_slice(&address(blocks, msf));
        }
        1 => {
            d.extend_from_slice(&[0, ADR_CONTROL_DATA, 1, 0]);
            d.extend_from_slice(&address(0, msf));
        }
        _ => return Err(Sense::invalid_cdb_field(2, Some(0))),
    }
    let len = (d.len() - 2) as u16;
    d[0..2].copy_from_slice(&len.to_be_bytes());
    d.truncate(alloc);
    Ok(d)
}

/// One feature descriptor (MMC-5 §5.2.2): code, version, persistent, current, data.
fn feature(
    out: &mut Vec<u8>,
    code: u16,
    version: u8,
    persistent: bool,
    current: bool,
    data: &[u8],
) {
    out.extend_from_slice(&code.to_be_bytes());
    out.push((version << 2) | if persistent { 0x02 } else { 0 } | u8::from(current));
    out.push(data.len() as u8);
    out.extend_from_slice(data);
}

/// The features of the drive, in feature-code order: (code, descriptor bytes, current).
fn features(drive: &Drive) -> Vec<(u16, Vec<u8>, bool)> {
    let present = drive.medium_present;
    let mut list = Vec::new();
    // Profile List: the one profile, current while a disc is loaded.
    let mut d = Vec::new();
    feature(&mut d, 0x0000, 0, true, true, &{
        let mut p = PROFILE_CDROM.to_be_bytes().to_vec();
        p.extend_from_slice(&[u8::from(present), 0]);
        p
    });
    list.push((0x0000, d, true));
    // Core: physical interface SCSI family, DBE.
    let mut d = Vec::new();
    feature(&mut d, 0x0001, 1, true, true, &[0, 0, 0, 1, 0x01, 0, 0, 0]);
    list.push((0x0001, d, true));
    // Morphing: polled GET EVENT STATUS NOTIFICATION (ASYNC 0), no OCEvent.
    let mut d = Vec::new();
    feature(&mut d, 0x0002, 1, true, true, &[0, 0, 0, 0]);
    list.push((0x0002, d, true));
    // Removable Medium: tray loading mechanism, eject, lock; no prevent jumper.
    let mut d = Vec::new();
    feature(&mut d, 0x0003, 0, true, true, &[0x29, 0, 0, 0]);
    list.push((0x0003, d, true));
    // Random Readable: 2048-byte blocks, blocking 1, no page present.
    let mut d = Vec::new();
    let mut r = CD_BLOCK_SIZE.to_be_bytes().to_vec();
    r.extend_from_slice(&[0, 1, 0, 0]);
    feature(&mut d, 0x0010, 0, false, present, &r);
    list.push((0x0010, d, present));
    // CD Read: no CD-Text, C2 error pointers or digital audio play.
    let mut d = Vec::new();
    feature(&mut d, 0x001e, 2, false, present, &[0, 0, 0, 0]);
    list.push((0x001e, d, present));
    list
}

/// GET CONFIGURATION (MMC-5 §6.6): RT 00b all features from the starting feature number,
/// 01b the current ones, 10b the one feature named.
pub fn get_configuration(cdb: &[u8], drive: &Drive) -> Result<Vec<u8>, Sense> {
    let rt = cdb[1] & 0x03;
    let start = be16(&cdb[2..4]);
    let alloc = usize::from(be16(&cdb[7..9]));
    if rt == 3 {
        return Err(Sense::invalid_cdb_field(1, Some(0)));
    }
    let mut d = vec![0u8; 8];
    let profile = if drive.medium_present {
        PROFILE_CDROM
    } else {
        0
    };
    d[6..8].copy_from_slice(&profile.to_be_bytes());
    for (code, desc, current) in features(drive) {
        let take = match rt {
            0 => code >= start,
            1 => code >= start && current,
            _ => code == start,
        };
        if take {
            d.extend_from_slice(&desc);
        }
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    d.truncate(alloc);
    Ok(d)
}

/// A media class event (MMC-5 §6.7.2.6, Table 166).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaEvent {
    NoChange = 0,
    NewMedia = 2,
    MediaRemoval = 3,
}

/// The notification class of media events, and its bit in the class masks.
const CLASS_MEDIA: u8 = 4;

/// GET EVENT STATUS NOTIFICATION (MMC-5 §6.7), polled only; the media class is the one
/// class supported. `event` is what the drive has to report for it.
pub fn get_event_status(cdb: &[u8], drive: &Drive, event: MediaEvent) -> Result<Vec<u8>, Sense> {
    if cdb[1] & 0x01 == 0 {
        // Asynchronous operation is not supported.
        return Err(Sense::invalid_cdb_field(1, Some(0)));
    }
    let request = cdb[4];
    let alloc = usize::from(be16(&cdb[7..9]));
    let supported = 1u8 << CLASS_MEDIA;
    let mut d = Vec::with_capacity(8);
    if request & supported == 0 {
        // No event available (NEA): header only.
        d.extend_from_slice(&[0, 2, 0x80, supported]);
    } else {
        d.extend_from_slice(&[0, 6, CLASS_MEDIA, supported]);
        d.push(event as u8);
        d.push(if drive.medium_present { 0x02 } else { 0 });
        d.extend_from_slice(&[0, 0]);
    }
    d.truncate(alloc);
    Ok(d)
}

/// Remembers, per device and I_T nexus, whether the last GET EVENT STATUS NOTIFICATION saw a
/// medium, to report NEW MEDIA and MEDIA REMOVAL once each.
#[derive(Default)]
pub struct MediaEvents {
    seen: Mutex<HashMap<(String, u64), bool>>,
}

impl MediaEvents {
    /// The media event for `nexus` given the medium state now; the first poll of a nexus
    /// reports NEW MEDIA when a disc is loaded.
    pub fn poll(&self, device: &str, nexus: u64, present: bool) -> MediaEvent {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let before = seen.insert((device.to_string(), nexus), present);
        match (before, present) {
            (Some(b), p) if b == p => MediaEvent::NoChange,
            (None, false) => MediaEvent::NoChange,
            (_, true) => MediaEvent::NewMedia,
            (_, false) => MediaEvent::MediaRemoval,
        }
    }
}

/// The media event state of every CD-ROM logical unit in this process.
pub fn media_events() -> &'static MediaEvents {
    static EVENTS: std::sync::OnceLock<MediaEvents> = std::sync::OnceLock::new();
    EVENTS.get_or_init(MediaEvents::default)
}

/// READ DISC INFORMATION (MMC-5 §6.22), data type 000b: a finalized single-session disc
/// with one track. The caller checks that a medium is present.
pub fn read_disc_information(cdb: &[u8]) -> Result<Vec<u8>, Sense> {
    if cdb[1] & 0x07 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(0)));
    }
    let alloc = usize::from(be16(&cdb[7..9]));
    let mut d = vec![0u8; 34];
    d[0..2].copy_from_slice(&32u16.to_be_bytes());
    // Not erasable, last session complete (11b), disc finalized (10b).
    d[2] = 0x0e;
    d[3] = 1; // first track on disc
    d[4] = 1; // number of sessions (LSB)
    d[5] = 1; // first track in last session (LSB)
    d[6] = 1; // last track in last session (LSB)
    d[8] = 0x00; // disc type: CD-DA or CD-ROM
                 // Last session lead-in start and last possible lead-out start: none (complete disc).
    d[16..24].fill(0xff);
    d.truncate(alloc);
    Ok(d)
}

/// MECHANISM STATUS (MMC-5 §6.11): no changer, idle mechanism, door closed while loaded.
pub fn mechanism_status(cdb: &[u8], drive: &Drive) -> Vec<u8> {
    let alloc = usize::from(be16(&cdb[8..10]));
    let mut d = vec![0u8; 8];
    d[1] = if drive.medium_present { 0 } else { 0x10 };
    d.truncate(alloc);
    d
}

/// Mode page 2Ah, CD capabilities and mechanical status (MMC-3 §6.3.11); `changeable`
/// gives the changeable-values mask (nothing is).
pub fn capabilities_page(drive: &Drive, changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 22];
    p[0] = MODE_PAGE_CAPABILITIES;
    p[1] = (p.len() - 2) as u8;
    if changeable {
        return p;
    }
    // Reads CD-ROM only (no CD-R/RW/DVD bits), writes nothing.
    p[4] = 0x40; // multi-session
    p[5] = 0x00;
    // Lock supported, lock state, eject supported, tray loading mechanism (001b).
    p[6] = 0x01 | if drive.prevented { 0x02 } else { 0 } | 0x08 | 0x20;
    // Obsolete speed fields, number of volume levels and buffer size: not reported.
    p
}

/// A CD-ROM command of MMC-5 that is not in SPC or SBC.
const fn cd(
    name: &'static str,
    op: u8,
    usage: &'static [u8],
    works_without_medium: bool,
    reports_ua: bool,
    reservation: Reservation,
    emulate: fn(&Device, &mut ScsiTask),
) -> Command {
    Command {
        name,
        op,
        sa: None,
        usage,
        types: DeviceTypes::CDROM,
        only_if: None,
        works_without_medium,
        reports_ua,
        reservation,
        alua: Alua::Active,
        decode: decode_alloc_7,
        run: Run::Emulate(emulate),
    }
}

/// The MMC commands. GET CONFIGURATION and GET EVENT STATUS NOTIFICATION do not report
/// unit attentions: a host polls them while a CD drive has one pending (MMC-5 §4.1.6.1).
#[rustfmt::skip]
pub const COMMANDS: &[Command] = &[
    cd("READ TOC/PMA/ATIP", READ_TOC,
        &[READ_TOC, 0x02, 0x0f, 0, 0, 0, FF, FF, FF, CTL],
        false, true, Reservation::Read, emulate_read_toc),
    cd("GET CONFIGURATION", GET_CONFIGURATION,
        &[GET_CONFIGURATION, 0x03, FF, FF, 0, 0, 0, FF, FF, CTL],
        true, false, Reservation::Allowed, emulate_get_configuration),
    cd("GET EVENT STATUS NOTIFICATION", GET_EVENT_STATUS_NOTIFICATION,
        &[GET_EVENT_STATUS_NOTIFICATION, 0x01, 0, 0, FF, 0, 0, FF, FF, CTL],
        true, false, Reservation::Allowed, emulate_get_event_status),
    cd("READ DISC INFORMATION", READ_DISC_INFORMATION,
        &[READ_DISC_INFORMATION, 0x07, 0, 0, 0, 0, 0, FF, FF, CTL],
        false, true, Reservation::Read, emulate_read_disc_information),
    Command {
        decode: decode_alloc_8,
        ..cd("MECHANISM STATUS", MECHANISM_STATUS,
            &[MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, FF, FF, 0, CTL],
            true, true, Reservation::Allowed, emulate_mechanism_status)
    },
];

/// The commands whose allocation length is in bytes 7-8.
fn decode_alloc_7(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(u32::from(be16(&task.cdb[7..9]))))
}

/// MECHANISM STATUS: its allocation length is in bytes 8-9.
fn decode_alloc_8(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(u32::from(be16(&task.cdb[8..10]))))
}

/// Sends what a builder built, or fails the task with its sense.
fn send(task: &mut ScsiTask, r: Result<Vec<u8>, Sense>) {
    match r {
        Ok(d) => task.reply(&d),
        Err(s) => task.fail(s),
    }
}

fn emulate_read_toc(dev: &Device, task: &mut ScsiTask) {
    let r = read_toc(&task.cdb, Drive::of(dev).blocks);
    send(task, r);
}

fn emulate_get_configuration(dev: &Device, task: &mut ScsiTask) {
    let r = get_configuration(&task.cdb, &Drive::of(dev));
    send(task, r);
}

fn emulate_get_event_status(dev: &Device, task: &mut ScsiTask) {
    let drive = Drive::of(dev);
    let c = &task.cdb;
    // Polled (IMMED) for the media class: the event since this I_T nexus last asked.
    let event = if c[1] & 0x01 != 0 && c[4] & 0x10 != 0 {
        media_events().poll(dev.name(), task.nexus, drive.medium_present)
    } else {
        MediaEvent::NoChange
    };
    let r = get_event_status(c, &drive, event);
    send(task, r);
}

fn emulate_read_disc_information(_: &Device, task: &mut ScsiTask) {
    let r = read_disc_information(&task.cdb);
    send(task, r);
}

fn emulate_mechanism_status(dev: &Device, task: &mut ScsiTask) {
    let r = mechanism_status(&task.cdb, &Drive::of(dev));
    task.reply(&r);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(present: bool) -> Drive {
        Drive {
            medium_present: present,
            prevented: false,
            blocks: 300_000,
        }
    }

    #[test]
    fn msf() {
        assert_eq!(lba_to_msf(0), [0, 0, 2, 0]);
        assert_eq!(lba_to_msf(300_000 - 150), [0, 66, 40, 0]);
        assert_eq!(lba_to_msf(74), [0, 0, 2, 74]);
    }

    #[test]
    fn toc_formats() {
        // Format 0, LBA: header + track 1 + lead-out.
        let t = read_toc(&[0x43, 0, 0, 0, 0, 0, 0, 0, 100, 0], 300_000).unwrap();
        assert_eq!(t.len(), 20);
        assert_eq!(&t[0..4], &[0, 18, 1, 1]);
        assert_eq!(&t[4..12], &[0, 0x14, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&t[12..16], &[0, 0x14, 0xaa, 0]);
        assert_eq!(&t[16..20], &300_000u32.to_be_bytes());
        // MSF.
        let t = read_toc(&[0x43, 2, 0, 0, 0, 0, 0, 0, 100, 0], 300_000).unwrap();
        assert_eq!(&t[8..12], &[0, 0, 2, 0]);
        assert_eq!(&t[16..20], &lba_to_msf(300_000));
        // Starting at the lead-out.
        let t = read_toc(&[0x43, 0, 0, 0, 0, 0, 0xaa, 0, 100, 0], 300_000).unwrap();
        assert_eq!(&t[0..4], &[0, 10, 1, 1]);
        assert_eq!(t[6], 0xaa);
        // Beyond the last track; unsupported format.
        let e = read_toc(&[0x43, 0, 0, 0, 0, 0, 2, 0, 100, 0], 300_000).unwrap_err();
        assert_eq!((e.key, e.asc), (5, 0x24));
        assert!(read_toc(&[0x43, 0, 2, 0, 0, 0, 0, 0, 100, 0], 300_000).is_err());
        // Session information.
        let t = read_toc(&[0x43, 0, 1, 0, 0, 0, 0, 0, 100, 0], 300_000).unwrap();
        assert_eq!(t, vec![0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
        // Allocation length truncates.
        let t = read_toc(&[0x43, 0, 0, 0, 0, 0, 0, 0, 4, 0], 300_000).unwrap();
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn configuration() {
        let all = [0x46, 0, 0, 0, 0, 0, 0, 0x10, 0, 0];
        let c = get_configuration(&all, &drive(true)).unwrap();
        assert_eq!(
            u32::from_be_bytes(c[0..4].try_into().unwrap()) as usize,
            c.len() - 4
        );
        assert_eq!(&c[6..8], &[0, 8], "CD-ROM profile current");
        // Profile list first: profile 0008h, current.
        assert_eq!(&c[8..12], &[0, 0, 0x03, 4]);
        assert_eq!(&c[12..16], &[0, 8, 1, 0]);
        let codes = |c: &[u8]| {
            let mut v = Vec::new();
            let mut i = 8;
            while i + 4 <= c.len() {
                v.push(u16::from_be_bytes([c[i], c[i + 1]]));
                i += 4 + c[i + 3] as usize;
            }
            v
        };
        assert_eq!(codes(&c), vec![0, 1, 2, 3, 0x10, 0x1e]);
        // Without a disc: no current profile, random readable and CD read are not current.
        let c = get_configuration(&all, &drive(false)).unwrap();
        assert_eq!(&c[6..8], &[0, 0]);
        assert_eq!(c[14], 0, "profile not current");
        let current = [0x46, 1, 0, 0, 0, 0, 0, 0x10, 0, 0];
        let c = get_configuration(&current, &drive(false)).unwrap();
        assert_eq!(codes(&c), vec![0, 1, 2, 3]);
        // One feature (RT 10b), and a starting feature number.
        let one = [0x46, 2, 0, 0x1e, 0, 0, 0, 0x10, 0, 0];
        let c = get_configuration(&one, &drive(true)).unwrap();
        assert_eq!(codes(&c), vec![0x1e]);
        let from = [0x46, 0, 0, 0x03, 0, 0, 0, 0x10, 0, 0];
        assert_eq!(
            codes(&get_configuration(&from, &drive(true)).unwrap()),
            vec![3, 0x10, 0x1e]
        );
        let bad = [0x46, 3, 0, 0, 0, 0, 0, 0x10, 0, 0];
        assert!(get_configuration(&bad, &drive(true)).is_err());
        // Header only when allocation length is 8.
        let short = [0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0];
        assert_eq!(get_configuration(&short, &drive(true)).unwrap().len(), 8);
    }

    #[test]
    fn event_status() {
        let media = [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0];
        let e = get_event_status(&media, &drive(true), MediaEvent::NewMedia).unwrap();
        assert_eq!(e, vec![0, 6, 4, 0x10, 2, 0x02, 0, 0]);
        let e = get_event_status(&media, &drive(false), MediaEvent::MediaRemoval).unwrap();
        assert_eq!(&e[4..6], &[3, 0]);
        // A class that is not supported: no event available.
        let other = [0x4a, 1, 0, 0, 0x02, 0, 0, 0, 8, 0];
        let e = get_event_status(&other, &drive(true), MediaEvent::NoChange).unwrap();
        assert_eq!(e, vec![0, 2, 0x80, 0x10]);
        // Asynchronous is refused.
        let asyn = [0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0];
        assert!(get_event_status(&asyn, &drive(true), MediaEvent::NoChange).is_err());
    }

    #[test]
    fn media_event_tracking() {
        let ev = MediaEvents::default();
        assert_eq!(ev.poll("cd", 1, true), MediaEvent::NewMedia);
        assert_eq!(ev.poll("cd", 1, true), MediaEvent::NoChange);
        assert_eq!(ev.poll("cd", 2, false), MediaEvent::NoChange);
        assert_eq!(ev.poll("cd", 1, false), MediaEvent::MediaRemoval);
        assert_eq!(ev.poll("cd", 1, false), MediaEvent::NoChange);
        assert_eq!(ev.poll("cd", 2, true), MediaEvent::NewMedia);
    }

    #[test]
    fn disc_information_and_mechanism() {
        let d = read_disc_information(&[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0]).unwrap();
        assert_eq!(d.len(), 34);
        assert_eq!(&d[0..2], &[0, 32]);
        assert_eq!(d[2], 0x0e);
        assert!(read_disc_information(&[0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0]).is_err());
        let cdb = [0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0];
        assert_eq!(mechanism_status(&cdb, &drive(true)), vec![0; 8]);
        assert_eq!(mechanism_status(&cdb, &drive(false))[1], 0x10, "door open");
    }

    #[test]
    fn capabilities() {
        let mut dr = drive(true);
        let p = capabilities_page(&dr, false);
        assert_eq!((p[0], p[1] as usize), (0x2a, p.len() - 2));
        assert_eq!(p[6] & 0x0b, 0x09, "lock and eject supported, unlocked");
        dr.prevented = true;
        assert_eq!(capabilities_page(&dr, false)[6] & 0x02, 0x02);
        assert!(capabilities_page(&dr, true)[2..].iter().all(|&b| b == 0));
    }
}

//! MODE SENSE (6) and (10) (SPC-4 §6.11, §6.12), MODE SELECT (6) and (10) (§6.9, §6.10) and
//! the mode pages the target reports.
//!
//! Every page is built by [`page`] for one page control: current, changeable, default or
//! saved values. MODE SELECT checks a page it is sent against the current and changeable
//! versions of the same page, so that what MODE SENSE reports and what MODE SELECT accepts
//! come from one place: a bit may differ from its current value only where the changeable
//! page has a one. The parameters that do change ([`ModeParams`]: WCE, SWP, D_SENSE) live in
//! the device, whose attributes hold the saved values.
//!
//! The control page reports what the target does: TST 001b (a task set per I_T nexus, the
//! `tst` attribute), QErr 00b (a CHECK CONDITION affects no other command: there is no ACA)
//! and TAS 1 (commands another nexus's task management function aborts end with TASK
//! ABORTED); none of them is changeable.
#![forbid(unsafe_code)]

use crate::scsi::cdb::be16;
use crate::scsi::device::{Device, ModeParams, UA_MODE_PARAMETERS_CHANGED};
use crate::scsi::mmc;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{DataDir, Plan, ScsiTask};

use super::opcode::{MODE_SELECT_10, MODE_SENSE_10};

/// Page codes (SBC-3 §6.4, SPC-4 §7.5).
pub const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
pub const PAGE_CACHING: u8 = 0x08;
pub const PAGE_CONTROL: u8 = 0x0a;
pub const ALL_PAGES: u8 = 0x3f;

/// Fields of the pages that MODE SELECT changes.
mod field {
    /// Caching page byte 2: WCE.
    pub const WCE: (usize, u8) = (2, 0x04);
    /// Control page byte 2: D_SENSE; byte 4: SWP.
    pub const D_SENSE: (usize, u8) = (2, 0x04);
    pub const SWP: (usize, u8) = (4, 0x08);
    /// Byte 0 of a page: PS (MODE SENSE: the page can be saved; reserved in MODE SELECT)
    /// and SPF (a sub-page).
    pub const PS: u8 = 0x80;
    pub const SPF: u8 = 0x40;
}

/// The page control field of MODE SENSE (SPC-4 §6.11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pc {
    Current,
    Changeable,
    Default,
    Saved,
}

impl Pc {
    fn from_bits(b: u8) -> Pc {
        match b & 3 {
            0 => Pc::Current,
            1 => Pc::Changeable,
            2 => Pc::Default,
            _ => Pc::Saved,
        }
    }
}

/// The page codes `dev` serves, in the order MODE SENSE returns them.
fn page_codes(dev: &Device) -> &'static [u8] {
    if dev.scsi_type() == mmc::TYPE_CDROM {
        &[
            PAGE_RW_ERROR_RECOVERY,
            PAGE_CONTROL,
            mmc::MODE_PAGE_CAPABILITIES,
        ]
    } else {
        &[PAGE_RW_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL]
    }
}

fn set(p: &mut [u8], (byte, mask): (usize, u8), on: bool) {
    if on {
        p[byte] |= mask;
    }
}

/// Mode page `code` of `dev` with the values `pc` asks for; `None` when the device has no
/// such page.
pub fn page(dev: &Device, code: u8, pc: Pc) -> Option<Vec<u8>> {
    if !page_codes(dev).contains(&code) {
        return None;
    }
    let changeable = dev.changeable_mode_params();
    let values = match pc {
        Pc::Current => dev.mode_params(),
        Pc::Changeable => changeable,
        Pc::Default => dev.default_mode_params(),
        Pc::Saved => dev.saved_mode_params(),
    };
    let mask = pc == Pc::Changeable;
    let mut p = match code {
        PAGE_RW_ERROR_RECOVERY => {
            // SBC-3 §6.4.8: AWRE and ARRE (reallocation is the backing's business).
            let mut p = vec![0u8; 12];
            if !mask {
                p[2] = 0xc0;
            }
            p
        }
        PAGE_CACHING => {
            // SBC-3 §6.4.5: WCE; everything else zero (no read cache control).
            let mut p = vec![0u8; 20];
            set(&mut p, field::WCE, values.wce);
            if changeable.wce {
                p[0] |= field::PS;
            }
            p
        }
        PAGE_CONTROL => {
            // SPC-4 §7.5.8.
            let mut p = vec![0u8; 12];
            if !mask {
                p[2] = 0x20; // TST 001b
                p[5] = 0x40; // TAS
                p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
            }
            set(&mut p, field::D_SENSE, values.d_sense);
            set(&mut p, field::SWP, values.swp);
            p[0] |= field::PS;
            p
        }
        _ => mmc::capabilities_page(&mmc::Drive::of(dev), mask),
    };
    p[0] |= code;
    p[1] = (p.len() - 2) as u8;
    Some(p)
}

/// The length field of a MODE SENSE or MODE SELECT CDB: the allocation length, or the
/// parameter list length; bytes 7-8 of the (10) variants, byte 4 of the (6).
fn length_field(c: &[u8; 16]) -> u32 {
    if c[0] == MODE_SENSE_10 || c[0] == MODE_SELECT_10 {
        be16(&c[7..9])
    } else {
        u32::from(c[4])
    }
}

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    Ok(Plan::emulated_in(length_field(&task.cdb)))
}

/// MODE SENSE (6) and (10): the read-write error recovery, caching and control pages, and
/// a CD's capabilities page, with current, changeable, default or saved values.
pub(super) fn emulate(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let ten = c[0] == MODE_SENSE_10;
    let dbd = c[1] & 0x08 != 0;
    let llbaa = ten && c[1] & 0x10 != 0;
    let pc = Pc::from_bits(c[2] >> 6);
    let code = c[2] & 0x3f;
    let subpage = c[3];
    let alloc = length_field(&c) as usize;
    if subpage != 0 && subpage != 0xff {
        task.fail(Sense::invalid_cdb_field(3, None));
        return;
    }
    let mut pages: Vec<u8> = Vec::new();
    for &p in page_codes(dev) {
        if code == ALL_PAGES || code == p {
            pages.extend(page(dev, p, pc).unwrap_or_default());
        }
    }
    if pages.is_empty() {
        task.fail(Sense::invalid_cdb_field(2, Some(5)));
        return;
    }
    let mut block_desc: Vec<u8> = Vec::new();
    if !dbd {
        let bs = dev.block_size();
        if llbaa {
            block_desc.extend_from_slice(&dev.num_blocks().to_be_bytes());
            block_desc.extend_from_slice(&[0, 0, 0, 0]);
            block_desc.extend_from_slice(&bs.to_be_bytes());
        } else {
            let n = u32::try_from(dev.num_blocks()).unwrap_or(u32::MAX);
            block_desc.extend_from_slice(&n.to_be_bytes());
            block_desc.push(0);
            block_desc.extend_from_slice(&bs.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP and DPOFUA (SBC-3 §6.4.1); SWP write protects too.
    // MMC-5 §7.2.3: both are reserved for CD/DVD devices.
    let cd = dev.scsi_type() == mmc::TYPE_CDROM;
    let wp = if crate::scsi::sbc::write_protected(dev, task) {
        0x80
    } else {
        0
    };
    let dsp = if cd { 0 } else { wp | 0x10 };
    let mut d = Vec::new();
    if ten {
        let total = 8 + block_desc.len() + pages.len();
        d.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        d.push(0);
        d.push(dsp);
        d.push(if llbaa { 0x01 } else { 0 });
        d.push(0);
        d.extend_from_slice(&(block_desc.len() as u16).to_be_bytes());
    } else {
        let total = 4 + block_desc.len() + pages.len();
        d.push((total - 1).min(255) as u8);
        d.push(0);
        d.push(dsp);
        d.push(block_desc.len() as u8);
    }
    d.extend_from_slice(&block_desc);
    d.extend_from_slice(&pages);
    d.truncate(alloc);
    task.reply(&d);
}

pub(super) fn decode_select(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = &task.cdb;
    let len = length_field(c);
    // PF 0: the pages would be vendor specific (SPC-4 §6.9); only the standard's are
    // understood.
    if c[1] & 0x10 == 0 && len > 0 {
        return Err(Sense::invalid_cdb_field(1, Some(4)));
    }
    Ok(Plan {
        dir: if len > 0 { DataDir::Out } else { DataDir::None },
        len,
    })
}

/// MODE SELECT (6) and (10): checks the whole parameter list, then applies it; SP=1 saves
/// the pages too. A change of current values is reported to every other I_T nexus as
/// MODE PARAMETERS CHANGED (SPC-4 §6.9).
pub(super) fn select(dev: &Device, task: &mut ScsiTask) {
    let len = length_field(&task.cdb) as usize;
    if len == 0 {
        return;
    }
    let mut data = vec![0u8; len];
    let got = task.buf.as_ref().map_or(0, |b| b.read_at(0, &mut data));
    data.truncate(got);
    let ten = task.cdb[0] == MODE_SELECT_10;
    match parse_select(dev, &data, ten) {
        Ok(p) => {
            let save = task.cdb[1] & 0x01 != 0;
            if dev.set_mode_params(p, save) {
                dev.add_ua_others(
                    task.nexus,
                    UA_MODE_PARAMETERS_CHANGED.0,
                    UA_MODE_PARAMETERS_CHANGED.1,
                );
            }
        }
        Err(s) => task.fail(s),
    }
}

fn length_error() -> Sense {
    Sense::new(sense::ILLEGAL_REQUEST, sense::PARAMETER_LIST_LENGTH_ERROR)
}

/// The mode parameters a MODE SELECT parameter list asks for, or the sense data that ends
/// the command (nothing has changed then). Field pointers count from the start of the
/// parameter list.
pub fn parse_select(dev: &Device, data: &[u8], ten: bool) -> Result<ModeParams, Sense> {
    let header_len = if ten { 8 } else { 4 };
    let header = data.get(..header_len).ok_or_else(length_error)?;
    // The mode data length is reserved in MODE SELECT; the medium type is 00h for the
    // devices here; the device-specific parameter (WP, DPOFUA) is ignored.
    if header[1] != 0 && !ten || ten && header[2] != 0 {
        return Err(Sense::invalid_param_field(if ten { 2 } else { 1 }));
    }
    let (bd_len, long_lba) = if ten {
        (be16(&header[6..8]) as usize, header[4] & 0x01 != 0)
    } else {
        (usize::from(header[3]), false)
    };
    let bd_field = if ten { 6 } else { 3 };
    let one_bd = if long_lba { 16 } else { 8 };
    if bd_len != 0 && bd_len != one_bd {
        return Err(Sense::invalid_param_field(bd_field));
    }
    let bd = data
        .get(header_len..header_len + bd_len)
        .ok_or_else(length_error)?;
    if !bd.is_empty() {
        check_block_descriptor(dev, bd, long_lba, header_len)?;
    }
    let mut p = dev.mode_params();
    let mut i = header_len + bd_len;
    while i < data.len() {
        let at = |off: usize| u16::try_from(i + off).unwrap_or(u16::MAX);
        let (b0, plen) = match data.get(i..i + 2) {
            Some(&[b0, plen]) => (b0, usize::from(plen)),
            _ => return Err(length_error()),
        };
        if b0 & field::SPF != 0 {
            // No sub-pages here.
            return Err(Sense::invalid_param_bit(at(0), 6));
        }
        let code = b0 & 0x3f;
        let (Some(cur), Some(ch)) = (
            page(dev, code, Pc::Current),
            page(dev, code, Pc::Changeable),
        ) else {
            return Err(Sense::invalid_param_field(at(0)));
        };
        let new = data.get(i..i + 2 + plen).ok_or_else(length_error)?;
        if new.len() != cur.len() {
            return Err(Sense::invalid_param_field(at(1)));
        }
        for j in 2..new.len() {
            let wrong = (new[j] ^ cur[j]) & !ch[j];
            if wrong != 0 {
                return Err(Sense::invalid_param_bit(
                    at(j),
                    7 - wrong.leading_zeros() as u8,
                ));
            }
        }
        let bit = |(byte, mask): (usize, u8)| new[byte] & mask != 0;
        match code {
            PAGE_CACHING => p.wce = bit(field::WCE),
            PAGE_CONTROL => {
                p.d_sense = bit(field::D_SENSE);
                p.swp = bit(field::SWP);
            }
            _ => {}
        }
        i += new.len();
    }
    Ok(p)
}

/// A MODE SELECT block descriptor: the block length must be the device's (it cannot be
/// changed), the number of blocks zero (no change) or the capacity MODE SENSE reports.
fn check_block_descriptor(dev: &Device, bd: &[u8], long_lba: bool, at: usize) -> Result<(), Sense> {
    let ptr = |off: usize| u16::try_from(at + off).unwrap_or(u16::MAX);
    let (blocks, blocks_now, bl_off) = if long_lba {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bd[..8]);
        (u64::from_be_bytes(b), dev.num_blocks(), 12)
    } else {
        let b = u64::from(u32::from_be_bytes([bd[0], bd[1], bd[2], bd[3]]));
        let now = u64::from(u32::try_from(dev.num_blocks()).unwrap_or(u32::MAX));
        (b, now, 5)
    };
    if blocks != 0 && blocks != blocks_now {
        return Err(Sense::invalid_param_field(ptr(0)));
    }
    let block_len = bd[bl_off..]
        .iter()
        .fold(0u32, |a, &b| a << 8 | u32::from(b));
    if block_len != dev.block_size() {
        return Err(Sense::invalid_param_field(ptr(bl_off)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn disk(dir: &std::path::Path) -> Arc<Device> {
        let f = dir.join("d.img");
        let params = vec![
            ("filename".to_string(), f.to_str().unwrap().to_string()),
            ("size_mb".to_string(), "1".to_string()),
        ];
        Device::create("vdisk_fileio", "m0", &params).unwrap()
    }

    /// A MODE SELECT(6) parameter list: header without block descriptor, then `pages`.
    fn list6(pages: &[&[u8]]) -> Vec<u8> {
        let mut d = vec![0u8; 4];
        for p in pages {
            let mut p = p.to_vec();
            p[0] &= !field::PS;
            d.extend(p);
        }
        d
    }

    #[test]
    fn pages_round_trip_through_select() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let d = disk(dir.path());
        assert!(d.mode_params().wce, "a file's write cache is on by default");
        // What MODE SENSE reports, sent back, changes nothing.
        let all: Vec<Vec<u8>> = page_codes(&d)
            .iter()
            .map(|&c| page(&d, c, Pc::Current).unwrap())
            .collect();
        let refs: Vec<&[u8]> = all.iter().map(|p| &p[..]).collect();
        assert_eq!(parse_select(&d, &list6(&refs), false), Ok(d.mode_params()));
        // Changeable: exactly WCE, D_SENSE and SWP.
        let ch = page(&d, PAGE_CACHING, Pc::Changeable).unwrap();
        assert_eq!(
            &ch[2..],
            &[0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let ch = page(&d, PAGE_CONTROL, Pc::Changeable).unwrap();
        assert_eq!(&ch[2..6], &[0x04, 0, 0x08, 0]);
        assert!(
            page(&d, PAGE_RW_ERROR_RECOVERY, Pc::Changeable).unwrap()[2..]
                .iter()
                .all(|&b| b == 0)
        );
        // Turn the write cache off and SWP and D_SENSE on, without saving.
        let mut caching = page(&d, PAGE_CACHING, Pc::Current).unwrap();
        caching[2] &= !0x04;
        let mut control = page(&d, PAGE_CONTROL, Pc::Current).unwrap();
        control[2] |= 0x04;
        control[4] |= 0x08;
        let p = parse_select(&d, &list6(&[&caching, &control]), false).unwrap();
        assert_eq!(
            p,
            ModeParams {
                wce: false,
                swp: true,
                d_sense: true
            }
        );
        assert!(d.set_mode_params(p, false));
        assert!(!d.bdev.has_volatile_cache(), "the backend writes through");
        assert!(d.swp());
        assert_eq!(page(&d, PAGE_CONTROL, Pc::Current).unwrap()[4], 0x08);
        assert_eq!(page(&d, PAGE_CACHING, Pc::Current).unwrap()[2], 0);
        // Saved values are untouched until SP=1, and the attributes are the saved values.
        assert_eq!(page(&d, PAGE_CONTROL, Pc::Saved).unwrap()[4], 0);
        assert_eq!(d.get_attr("swp").unwrap(), "0");
        assert!(!d.set_mode_params(p, true), "no current value changes");
        assert_eq!(page(&d, PAGE_CONTROL, Pc::Saved).unwrap()[4], 0x08);
        assert_eq!(page(&d, PAGE_CACHING, Pc::Saved).unwrap()[2], 0);
        assert_eq!(page(&d, PAGE_CACHING, Pc::Default).unwrap()[2], 0x04);
        for a in ["swp", "d_sense", "write_through"] {
            assert_eq!(d.get_attr(a).unwrap(), "1", "{a}");
            assert!(d.is_key_attr(a), "{a}");
        }
    }

    #[test]
    fn select_errors_point_at_the_field() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let d = disk(dir.path());
        let fp = |s: Sense| (s.asc, s.ascq, s.field_pointer);
        let control = page(&d, PAGE_CONTROL, Pc::Current).unwrap();
        // Shorter than the header, or than a page.
        for short in [&list6(&[])[..3], &list6(&[&control])[..10]] {
            assert_eq!(parse_select(&d, short, false), Err(length_error()));
        }
        // TAS is not changeable: byte 5 of the page, bit 6.
        let mut c = control.clone();
        c[5] &= !0x40;
        let e = parse_select(&d, &list6(&[&c]), false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 4 + 5, Some(6)))));
        // QErr is not changeable either.
        let mut c = control.clone();
        c[3] |= 0x02;
        let e = parse_select(&d, &list6(&[&c]), false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 4 + 3, Some(1)))));
        // A wrong page length, an unknown page, a sub-page.
        let mut c = control.clone();
        c[1] = 9;
        c.pop();
        let e = parse_select(&d, &list6(&[&c]), false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 5, None))));
        let e = parse_select(&d, &list6(&[&[0x1c, 2, 0, 0]]), false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 4, None))));
        let e = parse_select(&d, &list6(&[&[0x4a, 0x01, 0, 8, 0, 0]]), false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 4, Some(6)))));
        // Block descriptors: the block length must stay, a wrong length is refused.
        let mut l = vec![0u8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x02, 0x00];
        assert!(parse_select(&d, &l, false).is_ok());
        l[10] = 0x10;
        let e = parse_select(&d, &l, false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 4 + 5, None))));
        let e = parse_select(&d, &[0, 0, 0, 4, 0, 0, 0, 0], false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 3, None))));
        assert_eq!(
            parse_select(&d, &[0, 0, 0, 8, 0, 0], false),
            Err(length_error())
        );
        // MODE SELECT(10): an 8-byte header.
        let mut l = vec![0u8; 8];
        l.extend(&control);
        l[8] &= !field::PS;
        assert_eq!(parse_select(&d, &l, true), Ok(d.mode_params()));
        // Nothing changed on error.
        assert_eq!(d.mode_params(), d.saved_mode_params());
        // RAM: the write cache cannot be turned on.
        let ram = Device::create(
            "vdisk_ramio",
            "r",
            &[("size_mb".to_string(), "1".to_string())],
        )
        .unwrap();
        let mut c = page(&ram, PAGE_CACHING, Pc::Current).unwrap();
        c[2] |= 0x04;
        let e = parse_select(&ram, &list6(&[&c]), false).unwrap_err();
        assert_eq!(fp(e), (0x26, 0, Some((false, 6, Some(2)))));
    }
}

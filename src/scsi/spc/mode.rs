//! MODE SENSE (6) and (10) (SPC-4 §6.11, §6.12) and the mode pages the target reports.
#![forbid(unsafe_code)]

use crate::scsi::cdb::be16;
use crate::scsi::device::Device;
use crate::scsi::mmc;
use crate::scsi::sense::{self, Sense};
use crate::scsi::task::{Plan, ScsiTask};

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = &task.cdb;
    Ok(Plan::emulated_in(if c[0] == super::opcode::MODE_SENSE_10 {
        be16(&c[7..9])
    } else {
        u32::from(c[4])
    }))
}

/// MODE SENSE (6) and (10): the read-write error recovery, caching and control pages, and
/// a CD's capabilities page, current or changeable values.
pub(super) fn emulate(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let ten = c[0] == super::opcode::MODE_SENSE_10;
    let dbd = c[1] & 0x08 != 0;
    let llbaa = ten && c[1] & 0x10 != 0;
    let pc = c[2] >> 6;
    let page = c[2] & 0x3f;
    let subpage = c[3];
    let alloc = if ten { be16(&c[7..9]) } else { u32::from(c[4]) } as usize;
    if pc == 3 {
        task.fail(Sense::new(
            sense::ILLEGAL_REQUEST,
            sense::SAVING_PARAMETERS_NOT_SUPPORTED,
        ));
        return;
    }
    let changeable = pc == 1;
    let cd = dev.scsi_type() == mmc::TYPE_CDROM;
    let mut pages: Vec<u8> = Vec::new();
    let want = |p: u8| page == 0x3f || page == p;
    if subpage != 0 && subpage != 0xff {
        task.fail(Sense::invalid_cdb_field(3, None));
        return;
    }
    if want(0x01) {
        // Read-Write Error Recovery (SBC-3 §6.4.8).
        let mut p = [0u8; 12];
        p[0] = 0x01;
        p[1] = 10;
        if !changeable {
            p[2] = 0xc0; // AWRE, ARRE
        }
        pages.extend_from_slice(&p);
    }
    if want(0x08) && !cd {
        // Caching (SBC-3 §6.4.5): WCE when the backend has a volatile cache.
        let mut p = [0u8; 20];
        p[0] = 0x08;
        p[1] = 18;
        if !changeable && dev.bdev.has_volatile_cache() {
            p[2] = 0x04;
        }
        pages.extend_from_slice(&p);
    }
    if want(0x0a) {
        // Control (SPC-4 §7.5.8): TST 000b, QErr 00b, TAS 1, D_SENSE 0.
        let mut p = [0u8; 12];
        p[0] = 0x0a;
        p[1] = 10;
        if !changeable {
            p[5] = 0x40; // TAS
            p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
        }
        pages.extend_from_slice(&p);
    }
    if want(mmc::MODE_PAGE_CAPABILITIES) && cd {
        pages.extend_from_slice(&mmc::capabilities_page(&mmc::Drive::of(dev), changeable));
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
    // Device-specific parameter: WP and DPOFUA (SBC-3 §6.4.1).
    // MMC-5 §7.2.3: both are reserved for CD/DVD devices.
    let wp = if task.read_only || dev.is_read_only() {
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

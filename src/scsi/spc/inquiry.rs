//! INQUIRY (SPC-4 §6.4): the standard data and the VPD pages (supported pages, unit serial
//! number, device identification, and for disks the SBC-3 block limits, block device
//! characteristics and, when thin provisioned, logical block provisioning pages).
#![forbid(unsafe_code)]

use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::be16;
use crate::scsi::device::Device;
use crate::scsi::mmc;
use crate::scsi::sbc::{
    max_compare_and_write_blocks, max_unmap_blocks, max_write_same_blocks, unmap_granularity,
    MAX_UNMAP_DESCRIPTORS,
};
use crate::scsi::sense::Sense;
use crate::scsi::task::{Plan, ScsiTask};

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = &task.cdb;
    // A page code without EVPD.
    if c[1] & 0x01 == 0 && c[2] != 0 {
        return Err(Sense::invalid_cdb_field(2, None));
    }
    if c[1] & 0xfe != 0 {
        return Err(Sense::invalid_cdb_field(1, None));
    }
    Ok(Plan::emulated_in(be16(&c[3..5])))
}

/// INQUIRY (SPC-4 §6.4): the standard data, or the VPD page asked for.
pub(super) fn emulate(dev: &Device, task: &mut ScsiTask) {
    let c = task.cdb;
    let alloc = be16(&c[3..5]) as usize;
    let id = dev.ident();
    let mut d: Vec<u8> = Vec::with_capacity(96);
    let cd = dev.scsi_type() == mmc::TYPE_CDROM;
    if c[1] & 0x01 == 0 {
        // Standard INQUIRY data (SPC-4 §6.4.2).
        d.resize(96, 0);
        // Connected; direct access block device or CD/DVD device (always removable).
        d[0] = dev.scsi_type();
        d[1] = if dev.is_removable() || cd { 0x80 } else { 0 };
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HiSup, response data format 2
                     // TPGS: implicit, or implicit and explicit, ALUA in a device group (SPC-4 §5.15).
        d[5] |= dev.alua().group().map_or(0, |g| g.tpgs());
        d[7] = 0x02; // CmdQue
        d[8..16].copy_from_slice(&pad(&id.t10_vend_id, 8));
        d[16..32].copy_from_slice(&pad(&id.prod_id, 16));
        d[32..36].copy_from_slice(&pad(&id.prod_rev_lvl, 4));
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3 or MMC-5.
        let command_set = if cd { 0x02a0u16 } else { 0x04c0 };
        for (i, v) in [0x00a0u16, 0x0960, 0x0460, command_set].iter().enumerate() {
            d[58 + i * 2..60 + i * 2].copy_from_slice(&v.to_be_bytes());
        }
        d[4] = (d.len() - 5) as u8;
    } else {
        let page = c[2];
        d.extend_from_slice(&[dev.scsi_type(), page, 0, 0]);
        let thin = dev.thin_provisioned();
        let sbc_page = matches!(page, 0xb0 | 0xb1) && !cd || page == 0xb2 && thin && !cd;
        if page >= 0xb0 && !sbc_page {
            task.fail(Sense::invalid_cdb_field(2, None));
            return;
        }
        match page {
            0x00 => {
                d.extend_from_slice(&[0x00, 0x80, 0x83, 0x86]);
                if !cd {
                    d.extend_from_slice(&[0xb0, 0xb1]);
                    if thin {
                        d.push(0xb2);
                    }
                }
            }
            0x80 => d.extend_from_slice(id.usn.as_bytes()),
            0x83 => {
                // T10 vendor ID based designator (ASCII, logical unit).
                let mut t10 = pad(&id.t10_vend_id, 8);
                t10.extend_from_slice(id.t10_dev_id.as_bytes());
                d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                d.extend_from_slice(&t10);
                // NAA designator (binary, logical unit).
                d.extend_from_slice(&[0x01, 0x03, 0x00, id.naa_id.len() as u8]);
                d.extend_from_slice(&id.naa_id);
                // Relative target port (binary, target port, PIV, iSCSI).
                d.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
                d.extend_from_slice(&task.rel_tgt_id.to_be_bytes());
                // Target port group (binary, target port, PIV, iSCSI), in a device group.
                let group = dev.alua().group();
                if let Some(tg) = group.as_ref().and_then(|g| g.group_of(task.rel_tgt_id)) {
                    d.extend_from_slice(&[0x51, 0x95, 0x00, 0x04, 0, 0]);
                    d.extend_from_slice(&tg.id.to_be_bytes());
                }
                // SCSI name string of the target device (UTF-8, PIV, iSCSI).
                if let Some(name) = task.target_name.as_deref() {
                    let mut s = name.as_bytes().to_vec();
                    s.push(0);
                    while s.len() % 4 != 0 {
                        s.push(0);
                    }
                    if s.len() <= 252 {
                        d.extend_from_slice(&[0x53, 0xa8, 0x00, s.len() as u8]);
                        d.extend_from_slice(&s);
                    }
                }
            }
            0x86 => d.extend_from_slice(&extended_inquiry(dev)),
            0xb0 => {
                // Block Limits (SBC-3 §6.5.3).
                let mut p = [0u8; 0x3c];
                let bs = dev.block_size();
                p[1] = max_compare_and_write_blocks(bs) as u8;
                p[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal transfer length granularity
                p[4..8].copy_from_slice(&((MAX_TRANSFER as u32) / bs).to_be_bytes());
                p[8..12].copy_from_slice(&(id.opt_trans_len / bs).to_be_bytes());
                if thin {
                    p[16..20].copy_from_slice(&max_unmap_blocks(bs).to_be_bytes());
                    p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                    p[24..28].copy_from_slice(&unmap_granularity(bs).to_be_bytes());
                }
                // MAXIMUM WRITE SAME LENGTH (WSNZ=0: 0 blocks means to the end).
                p[32..40].copy_from_slice(&u64::from(max_write_same_blocks(bs)).to_be_bytes());
                d.extend_from_slice(&p);
            }
            0xb1 => {
                // Block Device Characteristics: rotation rate 1 = non-rotating medium.
                let mut p = [0u8; 0x3c];
                let rate: u16 = if dev.is_rotational() { 0 } else { 1 };
                p[0..2].copy_from_slice(&rate.to_be_bytes());
                // WABEREQ (byte 7, bits 7-6): where SANITIZE BLOCK ERASE is served, blocks
                // read after it succeed, as zeros (01b).
                if dev.can_block_erase() {
                    p[3] |= 0x40;
                }
                d.extend_from_slice(&p);
            }
            0xb2 => {
                // Logical Block Provisioning (SBC-3 §6.5.4): threshold exponent 0; LBPU,
                // LBPWS, LBPWS10, LBPRZ; no anchors, no descriptor; thin provisioned (010b).
                d.extend_from_slice(&[0, 0xe4, 0x02, 0]);
            }
            _ => {
                task.fail(Sense::invalid_cdb_field(2, None));
                return;
            }
        }
        let len = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
    }
    d.truncate(alloc);
    task.reply(&d);
}

/// The Extended INQUIRY Data VPD page after its header (SPC-4 §7.8.7).
fn extended_inquiry(dev: &Device) -> [u8; 0x3c] {
    let mut p = [0u8; 0x3c];
    // Byte 4 (here 0): no protection information, so SPT, GRD_CHK, APP_CHK, REF_CHK are 0;
    // no microcode to activate.
    // Byte 5: HEADSUP, ORDSUP, SIMPSUP: the HEAD OF QUEUE, ORDERED and SIMPLE task attributes
    // are served (the connection's task set orders commands by them); no priority, no
    // grouping, no UASK_SUP.
    p[1] = 0x07;
    // Byte 6: NV_SUP where the device's cache is declared non-volatile (nv_cache), V_SUP
    // where it has a volatile write cache that WCE turns on and off.
    p[2] = u8::from(dev.has_nv_cache()) << 1 | u8::from(dev.has_volatile_cache());
    // Byte 7: LUICLR: REPORTED LUNS DATA HAS CHANGED is held once per I_T nexus and cleared
    // for every logical unit once one of them has reported it.
    p[3] = 0x01;
    p
}

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(n).collect();
    v.resize(n, b' ');
    v
}

//! INQUIRY (SPC-4 §6.4): the standard data and the VPD pages (supported pages, unit serial
//! number, device identification, and for disks the SBC-3 block limits, block device
//! characteristics and, when thin provisioned, logical block provisioning pages).
#![forbid(unsafe_code)]

use crate::env::buf::MAX_TRANSFER;
use crate::scsi::cdb::be16;
use crate::scsi::device::Device;
use crate::scsi::device::Ident;
use crate::scsi::mmc;
use crate::scsi::sbc::{
    max_compare_and_write_blocks, max_unmap_blocks, max_write_same_blocks, unmap_granularity,
    MAX_UNMAP_DESCRIPTORS,
};
use crate::scsi::sense::Sense;
use crate::scsi::spc::xcopy;
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
        d[5] |= crate::scsi::alua::tpgs(dev);
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
                    d.push(xcopy::VPD_THIRD_PARTY_COPY);
                    d.extend_from_slice(&[0xb0, 0xb1]);
                    if thin {
                        d.push(0xb2);
                    }
                }
            }
            0x80 => d.extend_from_slice(id.usn.as_bytes()),
            // Third-party Copy (SPC-4 §7.8.17): the copy manager of a disk.
            xcopy::VPD_THIRD_PARTY_COPY if !cd => d.extend_from_slice(&xcopy::vpd_page(dev)),
            0x83 => {
                // The logical unit's designators: T10 vendor ID based, then NAA.
                for (code_set, kind, value) in lu_designators(&id) {
                    d.extend_from_slice(&[code_set, kind, 0x00, value.len() as u8]);
                    d.extend_from_slice(&value);
                }
                // Relative target port (binary, target port, PIV, iSCSI).
                d.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
                d.extend_from_slice(&task.rel_tgt_id.to_be_bytes());
                // Target port group (binary, target port, PIV, iSCSI), in a device group.
                let group = dev.alua().group();
                if let Some(tg) = group.as_ref().and_then(|g| g.group_of(task.rel_tgt_id)) {
                    d.extend_from_slice(&[0x51, 0x95, 0x00, 0x04, 0, 0]);
                    d.extend_from_slice(&tg.id.to_be_bytes());
                }
                // SCSI name strings (UTF-8, PIV, iSCSI; RFC 7143 §10.1.3): the target port
                // ("<name>,t,0x<TPGT>") and the target device (the iSCSI name).
                if let Some(name) = task.target_name.as_deref() {
                    let port = format!("{name},t,0x{TPGT:04x}");
                    name_string(&mut d, 0x98, &port);
                    name_string(&mut d, 0xa8, name);
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

/// The target portal group tag every portal of this target has (the TargetPortalGroupTag
/// login key is always 1).
const TPGT: u16 = 1;

/// A SCSI name string designator (SPC-4 §7.8.6.11): `piv_assoc_type` is byte 1 (PIV,
/// association and designator type 8h); the name is null terminated and padded to a multiple
/// of four bytes. A name too long for the one-byte length is left out.
fn name_string(d: &mut Vec<u8>, piv_assoc_type: u8, name: &str) {
    let len = (name.len() + 1).next_multiple_of(4);
    let Ok(len8) = u8::try_from(len) else {
        return;
    };
    d.extend_from_slice(&[0x53, piv_assoc_type, 0x00, len8]);
    d.extend_from_slice(name.as_bytes());
    d.resize(d.len() + len - name.len(), 0);
}

/// The designators of the logical unit (association 00b) in the Device Identification page,
/// as (CODE SET, ASSOCIATION and DESIGNATOR TYPE byte, designator): the T10 vendor ID based
/// one (ASCII) and the NAA one (binary). EXTENDED COPY names a logical unit by one of them.
pub(in crate::scsi) fn lu_designators(id: &Ident) -> [(u8, u8, Vec<u8>); 2] {
    let mut t10 = pad(&id.t10_vend_id, 8);
    t10.extend_from_slice(id.t10_dev_id.as_bytes());
    // At most 255 bytes: the DESIGNATOR LENGTH is one byte.
    t10.truncate(255);
    [(0x02, 0x01, t10), (0x01, 0x03, id.naa_id.clone())]
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

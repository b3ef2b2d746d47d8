//! LOG SENSE (SPC-4 §6.6): the supported log pages page (00h), with its sub-page variant
//! (00h/FFh), and the informational exceptions page (2Fh), which reports no failure
//! prediction. No log parameter is ever saved or reset, so there is no LOG SELECT.
#![forbid(unsafe_code)]

use crate::scsi::cdb::be16;
use crate::scsi::device::Device;
use crate::scsi::sense::Sense;
use crate::scsi::task::{Plan, ScsiTask};

/// Page codes (SPC-4 §7.3).
pub const PAGE_SUPPORTED: u8 = 0x00;
pub const PAGE_INFORMATIONAL_EXCEPTIONS: u8 = 0x2f;
/// The sub-page code of "supported pages and sub-pages".
const SUBPAGE_ALL: u8 = 0xff;

/// The pages served, in ascending order.
const PAGES: &[u8] = &[PAGE_SUPPORTED, PAGE_INFORMATIONAL_EXCEPTIONS];

pub(super) fn decode(_: &Device, task: &mut ScsiTask) -> Result<Plan, Sense> {
    let c = &task.cdb;
    // SP: saving log parameters is not supported.
    if c[1] & 0x01 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(0)));
    }
    Ok(Plan::emulated_in(be16(&c[7..9])))
}

pub(super) fn emulate(_: &Device, task: &mut ScsiTask) {
    match page(&task.cdb) {
        Ok(d) => {
            let n = d.len().min(be16(&task.cdb[7..9]) as usize);
            task.reply(&d[..n]);
        }
        Err(s) => task.fail(s),
    }
}

/// The log page a LOG SENSE CDB asks for, whole.
fn page(c: &[u8; 16]) -> Result<Vec<u8>, Sense> {
    let code = c[2] & 0x3f;
    let subpage = c[3];
    let pointer = be16(&c[5..7]);
    let mut d = vec![code, subpage, 0, 0];
    match (code, subpage) {
        (PAGE_SUPPORTED, 0) => d.extend_from_slice(PAGES),
        (PAGE_SUPPORTED, SUBPAGE_ALL) => {
            // SPF set: the header names the sub-page; one (page, sub-page) pair each.
            d[0] |= 0x40;
            d.extend_from_slice(&[PAGE_SUPPORTED, 0, PAGE_SUPPORTED, SUBPAGE_ALL]);
            d.extend_from_slice(&[PAGE_INFORMATIONAL_EXCEPTIONS, 0]);
        }
        (PAGE_INFORMATIONAL_EXCEPTIONS, 0) => {
            // One parameter, code 0000h (SPC-4 §7.3.8): its control byte (FORMAT AND
            // LINKING 11b), length 3, then the INFORMATIONAL EXCEPTION ADDITIONAL SENSE CODE
            // and QUALIFIER (none) and the most recent temperature reading (FFh: not
            // available).
            if pointer > 0 {
                return Err(Sense::invalid_cdb_field(5, None));
            }
            d.extend_from_slice(&[0, 0, 0x03, 3, 0, 0, 0xff]);
        }
        (_, 0) | (_, SUBPAGE_ALL) => return Err(Sense::invalid_cdb_field(2, Some(5))),
        _ => return Err(Sense::invalid_cdb_field(3, None)),
    }
    let len = (d.len() - 4) as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(page: u8, sub: u8, pointer: u16) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x4d;
        c[2] = 0x40 | page; // PC 01b: cumulative values
        c[3] = sub;
        c[5..7].copy_from_slice(&pointer.to_be_bytes());
        c[8] = 0xff;
        c
    }

    #[test]
    fn pages() {
        assert_eq!(page(&cdb(0, 0, 0)).unwrap(), [0, 0, 0, 2, 0x00, 0x2f]);
        let d = page(&cdb(0, 0xff, 0)).unwrap();
        assert_eq!(&d[..4], &[0x40, 0xff, 0, 6]);
        assert_eq!(&d[4..], &[0, 0, 0, 0xff, 0x2f, 0]);
        let d = page(&cdb(0x2f, 0, 0)).unwrap();
        assert_eq!(&d[..4], &[0x2f, 0, 0, 7]);
        assert_eq!(&d[4..8], &[0, 0, 0x03, 3]);
        let fp = |c| page(&c).unwrap_err().field_pointer;
        assert_eq!(fp(cdb(0x2f, 0, 1)), Some((true, 5, None)));
        assert_eq!(fp(cdb(0x0d, 0, 0)), Some((true, 2, Some(5))));
        assert_eq!(fp(cdb(0x2f, 1, 0)), Some((true, 3, None)));
    }
}

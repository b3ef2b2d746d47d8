//! Physical Region Page entries for a transfer (NVMe Base §4.1.1, "PRP Entry" and "PRP
//! List").
//!
//! A transfer is described to the controller page by page, in pages of the size CC.MPS
//! selected. PRP1 points at the first byte and may carry an offset into its page (dword
//! aligned). Every later entry points at a whole page. When the data touches at most two
//! pages, PRP2 is the second page; otherwise PRP2 points at a PRP list: a page of 8-byte
//! entries whose last entry, when more follow than fit, points at the next list page.
//!
//! The data comes as (IOVA, length) pieces of pool buffers. The pieces can be expressed as
//! PRPs only if every boundary between two pieces falls on a page boundary: the first piece
//! may start anywhere dword aligned, and the last may end anywhere, but each piece other
//! than the last ends on a page boundary and each piece other than the first starts on one.
//! Anything else is [`PrpError::Misaligned`], for the caller to bounce through a buffer of
//! its own (or to describe with an SGL where the controller has them).
//!
//! List pages come from a [`PrpArea`]: pages set aside per command identifier when the
//! queue is created, in memory the IOMMU already maps, so building a list allocates nothing.

#![forbid(unsafe_code)]

use super::DmaMem;

/// A piece of a transfer: `len` bytes at `iova`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub iova: u64,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum PrpError {
    /// the transfer is empty
    Empty,
    /// piece {0} does not meet its neighbours on a page boundary (or PRP1 is not dword aligned)
    Misaligned(usize),
    /// the transfer needs {0} PRP list pages, more than the {1} set aside per command
    TooLong(usize, usize),
    /// the transfer's addresses overflow
    Overflow,
}

/// The two PRP fields of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prps {
    pub prp1: u64,
    pub prp2: u64,
}

/// Size of a PRP entry.
const ENTRY: usize = 8;

/// Checks that `pieces` can be expressed as PRPs with pages of `page` bytes (a power of
/// two, at least 4096) and returns the number of entries after PRP1.
fn count_entries(pieces: &[Piece], page: u64) -> Result<usize, PrpError> {
    let mask = page - 1;
    let last = pieces.len().checked_sub(1).ok_or(PrpError::Empty)?;
    let mut entries = 0usize;
    for (i, p) in pieces.iter().enumerate() {
        if p.len == 0 {
            return Err(PrpError::Misaligned(i));
        }
        let end = p
            .iova
            .checked_add(u64::from(p.len))
            .ok_or(PrpError::Overflow)?;
        let start_ok = if i == 0 {
            p.iova & 3 == 0
        } else {
            p.iova & mask == 0
        };
        if !start_ok || (i != last && end & mask != 0) {
            return Err(PrpError::Misaligned(i));
        }
        // Pages this piece touches.
        let first_page = p.iova & !mask;
        let pages = (end - first_page).div_ceil(page);
        entries = entries
            .checked_add(usize::try_from(pages).map_err(|_| PrpError::Overflow)?)
            .ok_or(PrpError::Overflow)?;
    }
    // PRP1 covers the first page.
    Ok(entries - 1)
}

/// List pages needed for `entries` entries after PRP1, with `per_page` entries to a page
/// (the last of which chains to the next page when more follow).
fn list_pages(entries: usize, per_page: usize) -> usize {
    if entries <= 1 {
        0
    } else if entries <= per_page {
        1
    } else {
        // Every page but the last gives one entry to the chain pointer.
        1 + (entries - per_page).div_ceil(per_page - 1)
    }
}

/// The page addresses after the first, in order.
fn page_addrs(pieces: &[Piece], page: u64) -> impl Iterator<Item = u64> + '_ {
    let mask = page - 1;
    pieces
        .iter()
        .flat_map(move |p| {
            let first = p.iova & !mask;
            let end = p.iova + u64::from(p.len);
            (0..(end - first).div_ceil(page)).map(move |k| first + k * page)
        })
        .skip(1)
}

/// Per-command PRP list pages: `per_cmd` pages of `page` bytes for each command identifier.
pub struct PrpArea<M> {
    mem: M,
    page: usize,
    per_cmd: usize,
}

impl<M: DmaMem> PrpArea<M> {
    /// `mem` must hold `per_cmd * page` bytes for every command identifier in use; list
    /// pages that would fall outside it are refused as [`PrpError::TooLong`].
    pub fn new(mem: M, page: usize, per_cmd: usize) -> PrpArea<M> {
        PrpArea { mem, page, per_cmd }
    }

    /// The bytes needed for `cids` command identifiers.
    pub fn size_for(cids: usize, page: usize, per_cmd: usize) -> usize {
        cids.saturating_mul(page).saturating_mul(per_cmd)
    }

    pub fn pages_per_cmd(&self) -> usize {
        self.per_cmd
    }

    /// The largest transfer a command can always describe here, whatever PRP1's offset.
    pub fn max_transfer(&self) -> usize {
        Self::max_transfer_for(self.page, self.per_cmd)
    }

    /// [`PrpArea::max_transfer`] for pages of `page` bytes and `per_cmd` list pages.
    pub fn max_transfer_for(page: usize, per_cmd: usize) -> usize {
        // Entries: PRP1 and PRP2 without a list; PRP1 and the lists' entries (each list page
        // but the last gives one to the chain) with one. PRP1's page may begin at an offset,
        // so one page less is certain.
        let entries = match per_cmd {
            0 => 2,
            n => n.saturating_mul(page / ENTRY - 1).saturating_add(2),
        };
        (entries - 1).saturating_mul(page)
    }

    /// Writes `data` (at most a page) into the first list page of `cid` and returns its
    /// address: for a command whose data is a small structure of the driver's own (DATASET
    /// MANAGEMENT ranges) and which therefore needs no PRP list.
    pub fn write_page(&self, cid: u16, data: &[u8]) -> Option<u64> {
        if self.per_cmd == 0 || data.len() > self.page {
            return None;
        }
        let off = usize::from(cid)
            .checked_mul(self.per_cmd)?
            .checked_mul(self.page)?;
        if off.checked_add(self.page)? > self.mem.len() {
            return None;
        }
        self.mem.write(off, data);
        Some(self.mem.iova() + off as u64)
    }

    /// Builds the PRPs of command `cid` for `pieces`, writing its list pages as needed.
    pub fn build(&self, cid: u16, pieces: &[Piece]) -> Result<Prps, PrpError> {
        let page = self.page as u64;
        let entries = count_entries(pieces, page)?;
        let per_page = self.page / ENTRY;
        let need = list_pages(entries, per_page);
        let base = usize::from(cid)
            .checked_mul(self.per_cmd)
            .and_then(|p| p.checked_mul(self.page))
            .ok_or(PrpError::Overflow)?;
        let room = if base >= self.mem.len() {
            0
        } else {
            self.per_cmd.min((self.mem.len() - base) / self.page)
        };
        if need > room {
            return Err(PrpError::TooLong(need, room));
        }
        let prp1 = pieces.first().map_or(0, |p| p.iova);
        let mut addrs = page_addrs(pieces, page);
        let prp2 = match need {
            0 => addrs.next().unwrap_or(0),
            _ => {
                let mut written = 0usize;
                let mut buf = [0u8; 512];
                for pg in 0..need {
                    let off = base + pg * self.page;
                    let left = entries - written;
                    // On a page that is not the last, the last slot chains onward.
                    let here = if pg + 1 < need { per_page - 1 } else { left };
                    let mut fill = 0usize;
                    let mut slot = 0usize;
                    for a in addrs.by_ref().take(here) {
                        buf[fill..fill + ENTRY].copy_from_slice(&a.to_le_bytes());
                        fill += ENTRY;
                        if fill == buf.len() {
                            self.mem.write(off + slot * ENTRY, &buf);
                            slot += buf.len() / ENTRY;
                            fill = 0;
                        }
                    }
                    if fill > 0 {
                        self.mem.write(off + slot * ENTRY, &buf[..fill]);
                    }
                    written += here;
                    if pg + 1 < need {
                        let next = self.mem.iova() + (off + self.page) as u64;
                        self.mem
                            .write(off + (per_page - 1) * ENTRY, &next.to_le_bytes());
                    }
                }
                self.mem.iova() + base as u64
            }
        };
        Ok(Prps { prp1, prp2 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::nvme::queue::tests::Plain;

    const PAGE: usize = 4096;

    fn p(iova: u64, len: u32) -> Piece {
        Piece { iova, len }
    }

    /// Follows PRP1/PRP2 and the list chain like a controller, returning the page addresses
    /// a `len`-byte transfer uses.
    fn walk(area: &Plain, prps: Prps, len: u64) -> Vec<u64> {
        let page = PAGE as u64;
        let mut out = vec![prp1_page(prps.prp1)];
        let first = page - (prps.prp1 % page);
        if len <= first {
            return out;
        }
        let rest = (len - first).div_ceil(page);
        if rest == 1 {
            out.push(prps.prp2);
            return out;
        }
        let mut list = prps.prp2;
        let mut left = rest;
        let per = (PAGE / 8) as u64;
        loop {
            let off = (list - area.iova()) as usize;
            let here = if left > per { per - 1 } else { left };
            for k in 0..here {
                let mut b = [0u8; 8];
                area.read(off + k as usize * 8, &mut b);
                out.push(u64::from_le_bytes(b));
            }
            left -= here;
            if left == 0 {
                return out;
            }
            let mut b = [0u8; 8];
            area.read(off + (per as usize - 1) * 8, &mut b);
            list = u64::from_le_bytes(b);
        }
    }

    fn prp1_page(a: u64) -> u64 {
        a & !(PAGE as u64 - 1)
    }

    #[test]
    fn one_or_two_pages_need_no_list() {
        let area = PrpArea::new(Plain::new(4 * PAGE), PAGE, 2);
        assert_eq!(
            area.build(0, &[p(0x20_0000, 4096)]),
            Ok(Prps {
                prp1: 0x20_0000,
                prp2: 0
            })
        );
        // 4 KiB at an offset touches two pages: PRP2 is the second page.
        assert_eq!(
            area.build(0, &[p(0x20_0200, 4096)]),
            Ok(Prps {
                prp1: 0x20_0200,
                prp2: 0x20_1000
            })
        );
        // Two pieces of a page each.
        assert_eq!(
            area.build(0, &[p(0x20_0000, 4096), p(0x50_0000, 512)]),
            Ok(Prps {
                prp1: 0x20_0000,
                prp2: 0x50_0000
            })
        );
    }

    #[test]
    fn a_list_crosses_a_page_boundary_of_the_data() {
        let mem = Plain::new(4 * PAGE);
        let area = PrpArea::new(mem.clone(), PAGE, 2);
        // 16 KiB starting 0x100 into a page: five pages of data, the list holds four; one
        // piece ends at a chunk boundary and the next chunk lies elsewhere.
        let pieces = [p(0x20_0100, 0x2f00), p(0x80_0000, 0x1100)];
        let prps = area.build(1, &pieces).unwrap();
        assert_eq!(prps.prp1, 0x20_0100);
        assert_eq!(
            prps.prp2,
            mem.iova() + 2 * PAGE as u64,
            "cid 1's first page"
        );
        assert_eq!(
            walk(&mem, prps, 0x4000),
            [0x20_0000, 0x20_1000, 0x20_2000, 0x80_0000, 0x80_1000]
        );
    }

    #[test]
    fn long_lists_chain() {
        let mem = Plain::new(8 * PAGE);
        let area = PrpArea::new(mem.clone(), PAGE, 4);
        // 3 MiB in 128 KiB chunks scattered in reverse: 768 pages, 767 entries after PRP1:
        // a first list page of 511 entries and a chain pointer, then 256 on the second.
        let pieces: Vec<Piece> = (0..24u64)
            .map(|i| p(0x1000_0000 - i * 0x10_0000, 128 * 1024))
            .collect();
        let prps = area.build(1, &pieces).unwrap();
        let pages = walk(&mem, prps, 3 << 20);
        let want: Vec<u64> = pieces
            .iter()
            .flat_map(|q| (0..32).map(move |k| q.iova + k * 4096))
            .collect();
        assert_eq!(pages, want);
        // The chain pointer is the next page of cid 1's area.
        let mut b = [0u8; 8];
        mem.read(4 * PAGE + 511 * 8, &mut b);
        assert_eq!(u64::from_le_bytes(b), mem.iova() + 5 * PAGE as u64);
        assert_eq!(list_pages(767, 512), 2);
        assert_eq!(list_pages(512, 512), 1);
        assert_eq!(list_pages(513, 512), 2);
        assert_eq!(list_pages(1023, 512), 2);
        assert_eq!(list_pages(1024, 512), 3);
        // Past what a command's pages hold.
        let area1 = PrpArea::new(mem.clone(), PAGE, 1);
        assert_eq!(area1.build(0, &pieces), Err(PrpError::TooLong(2, 1)));
        assert_eq!(area1.max_transfer(), 512 * PAGE);
        // The last command identifier's pages lie past the memory.
        assert_eq!(area.build(2, &pieces), Err(PrpError::TooLong(2, 0)));
    }

    #[test]
    fn misaligned_transfers_are_refused() {
        let area = PrpArea::new(Plain::new(2 * PAGE), PAGE, 1);
        // A middle piece that starts inside a page.
        assert_eq!(
            area.build(0, &[p(0x20_0000, 4096), p(0x30_0200, 4096)]),
            Err(PrpError::Misaligned(1))
        );
        // A first piece that ends inside a page while another follows.
        assert_eq!(
            area.build(0, &[p(0x20_0000, 1000), p(0x30_0000, 4096)]),
            Err(PrpError::Misaligned(0))
        );
        // PRP1 must be dword aligned.
        assert_eq!(
            area.build(0, &[p(0x20_0002, 512)]),
            Err(PrpError::Misaligned(0))
        );
        assert_eq!(area.build(0, &[]), Err(PrpError::Empty));
        assert_eq!(
            area.build(0, &[p(u64::MAX - 10, 512)]),
            Err(PrpError::Overflow)
        );
    }
}

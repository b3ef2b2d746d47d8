//! PCI addresses and the checks made before a controller is opened through vfio-pci, so
//! that a device that cannot be used is refused with the reason (not an NVMe controller,
//! bound to another driver, no IOMMU group) instead of an ioctl's error number.

#![forbid(unsafe_code)]

use std::path::Path;

/// PCI class code of an NVM Express I/O controller: mass storage (01h), non-volatile
/// memory (08h), NVM Express (02h).
const NVME_CLASS: u32 = 0x01_08_02;

/// A PCI address as `DDDD:BB:DD.F` (domain, bus, device, function) in lower case, from
/// that form or the short `BB:DD.F` (domain 0000). `None` when it is not one.
pub fn parse_bdf(s: &str) -> Option<String> {
    let s = s.trim();
    let parts: Vec<&str> = s.split(':').collect();
    let (domain, bus, rest) = match parts.as_slice() {
        [d, b, r] => (*d, *b, *r),
        [b, r] => ("0000", *b, *r),
        _ => return None,
    };
    let (dev, func) = rest.split_once('.')?;
    let num = |x: &str, digits: usize, max: u32| -> Option<u32> {
        if x.is_empty() || x.len() > digits || !x.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(x, 16).ok().filter(|v| *v <= max)
    };
    let domain = num(domain, 4, 0xffff)?;
    let bus = num(bus, 2, 0xff)?;
    let dev = num(dev, 2, 0x1f)?;
    let func = num(func, 1, 7)?;
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// Checks that PCI device `bdf` is an NVMe controller bound to vfio-pci with an IOMMU
/// group, under the sysfs root `sys` (`/sys` on a real system).
pub fn check_nvme_vfio_in(sys: &Path, bdf: &str) -> Result<(), String> {
    let dir = sys.join("bus/pci/devices").join(bdf);
    if !dir.exists() {
        return Err(format!("there is no PCI device {bdf}"));
    }
    let class = std::fs::read_to_string(dir.join("class"))
        .map_err(|e| format!("cannot read the PCI class of {bdf}: {e}"))?;
    let class = u32::from_str_radix(class.trim().trim_start_matches("0x"), 16)
        .map_err(|_| format!("{bdf} has an unreadable PCI class {:?}", class.trim()))?;
    if class != NVME_CLASS {
        return Err(format!(
            "{bdf} is not an NVMe controller (PCI class {class:06x}, not {NVME_CLASS:06x})"
        ));
    }
    let driver = std::fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string));
    match driver.as_deref() {
        Some("vfio-pci") => {}
        Some(d) => {
            return Err(format!(
                "{bdf} is bound to {d}, not vfio-pci (scripts/setup.sh binds it: PCI_ALLOWED={bdf})"
            ))
        }
        None => {
            return Err(format!(
                "{bdf} is bound to no driver, not vfio-pci (scripts/setup.sh binds it: PCI_ALLOWED={bdf})"
            ))
        }
    }
    if std::fs::read_link(dir.join("iommu_group")).is_err() {
        return Err(format!(
            "{bdf} has no IOMMU group (is the IOMMU enabled, intel_iommu=on?)"
        ));
    }
    Ok(())
}

/// [`check_nvme_vfio_in`] on this system.
pub fn check_nvme_vfio(bdf: &str) -> Result<(), String> {
    check_nvme_vfio_in(Path::new("/sys"), bdf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn pci_addresses_parse_in_the_long_and_short_forms() {
        assert_eq!(parse_bdf("0000:00:04.0").as_deref(), Some("0000:00:04.0"));
        assert_eq!(parse_bdf(" 00:04.0 ").as_deref(), Some("0000:00:04.0"));
        assert_eq!(parse_bdf("0001:AF:1f.7").as_deref(), Some("0001:af:1f.7"));
        for bad in [
            "",
            "0000:00:04",
            "0000:00:04.8",
            "0000:00:20.0",
            "0000:100:04.0",
            "00000:00:04.0",
            "0000:00:04.0.1",
            "x:00:04.0",
            "0000:00:-4.0",
            "0000:00:04.",
            "a:b:c:d.0",
            "/dev/nvme0",
        ] {
            assert_eq!(parse_bdf(bad), None, "{bad:?}");
        }
    }

    fn fake_dev(sys: &Path, bdf: &str, class: &str, driver: Option<&str>, group: bool) {
        let dir = sys.join("bus/pci/devices").join(bdf);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("class"), format!("{class}\n")).unwrap();
        if let Some(d) = driver {
            let dd = sys.join("bus/pci/drivers").join(d);
            std::fs::create_dir_all(&dd).unwrap();
            symlink(&dd, dir.join("driver")).unwrap();
        }
        if group {
            let g = sys.join("kernel/iommu_groups/7");
            std::fs::create_dir_all(&g).unwrap();
            symlink(&g, dir.join("iommu_group")).unwrap();
        }
    }

    #[test]
    fn a_device_that_cannot_be_opened_is_refused_with_the_reason() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        fake_dev(sys, "0000:00:01.0", "0x020000", Some("vfio-pci"), true);
        fake_dev(sys, "0000:00:02.0", "0x010802", Some("nvme"), true);
        fake_dev(sys, "0000:00:03.0", "0x010802", None, false);
        fake_dev(sys, "0000:00:04.0", "0x010802", Some("vfio-pci"), false);
        fake_dev(sys, "0000:00:05.0", "0x010802", Some("vfio-pci"), true);
        let e = |b| check_nvme_vfio_in(sys, b).unwrap_err();
        assert!(e("0000:00:09.0").contains("no PCI device 0000:00:09.0"));
        assert!(e("0000:00:01.0").contains("not an NVMe controller"));
        assert!(e("0000:00:02.0").contains("bound to nvme, not vfio-pci"));
        assert!(e("0000:00:03.0").contains("bound to no driver"));
        assert!(e("0000:00:04.0").contains("no IOMMU group"));
        assert_eq!(check_nvme_vfio_in(sys, "0000:00:05.0"), Ok(()));
    }
}

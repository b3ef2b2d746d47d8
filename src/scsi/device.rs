//! A SCSI device: a block backend with its identity (INQUIRY data, VPD designators) and its
//! attributes as the management tree shows them (`devices/NAME/...`).
use std::sync::Arc;

/// Why a device could not be created or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum DeviceError {
    /// {0}
    Invalid(String),
}

/// The virtual device handlers, as `handlers/` lists them.
pub const HANDLERS: &[&str] = &["vdisk_nullio", "vdisk_ramio"];

/// A device shared by every LUN that exports it and every reactor that serves them.
pub struct Device {
    name: String,
    handler: String,
}

/// One attribute of a device.
pub struct AttrInfo {
    pub name: &'static str,
    pub writable: bool,
}

impl Device {
    /// Creates a device of `handler` from `add_device` parameters.
    pub fn create(
        handler: &str,
        name: &str,
        _params: &[(String, String)],
    ) -> Result<Arc<Device>, DeviceError> {
        if !HANDLERS.contains(&handler) {
            return Err(DeviceError::Invalid(format!("unknown handler {handler}")));
        }
        Ok(Arc::new(Device { name: name.to_string(), handler: handler.to_string() }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The attributes of this device, in the order the tree lists them.
    pub fn attrs(&self) -> Vec<AttrInfo> {
        Vec::new()
    }

    pub fn get_attr(&self, _name: &str) -> Option<String> {
        None
    }

    /// Whether the attribute differs from its default (SCST's `[key]` mark).
    pub fn is_key_attr(&self, _name: &str) -> bool {
        false
    }

    pub fn set_attr(&self, name: &str, _value: &str) -> Result<(), DeviceError> {
        Err(DeviceError::Invalid(format!("{name} is read-only")))
    }
}

/// The parameters `add_device` accepts for `handler`.
pub fn add_device_params(handler: &str) -> Option<&'static [&'static str]> {
    match handler {
        "vdisk_nullio" => Some(&["blocksize", "read_only", "removable", "rotational", "size", "size_mb", "t10_dev_id"]),
        "vdisk_ramio" => Some(&["blocksize", "read_only", "removable", "rotational", "size", "size_mb", "t10_dev_id"]),
        _ => None,
    }
}

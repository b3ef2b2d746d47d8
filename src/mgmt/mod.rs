//! The management tree: the SCST sysfs model, its validation and config save/load.

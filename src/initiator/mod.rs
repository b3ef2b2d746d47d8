//! A small iSCSI initiator, used by the tests and the benchmark tool.

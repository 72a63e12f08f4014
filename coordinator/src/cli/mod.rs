//! The `coordinator` binary's own modules (not part of the library): what the command line prints
//! and `coordinator run`.

pub(crate) mod figures;
pub(crate) mod local;
pub(crate) mod tables;

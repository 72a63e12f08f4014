//! The `coordinator` binary's own modules (not part of the library): what the command line prints,
//! `coordinator run`, and `status --watch`.

pub(crate) mod figures;
pub(crate) mod local;
pub(crate) mod tables;
pub(crate) mod watch;

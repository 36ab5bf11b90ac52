//! churnlog: an open, self-hostable scale-out process server for disaster-recovery
//! replication. The heart is [`cache`], an embedded, log-structured, crash-safe cache
//! engine; around it sit the command-line tools.

#![deny(unsafe_code)]

pub mod bench;
pub mod cache;
pub mod size;

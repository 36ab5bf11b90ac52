//! churnlog: an open, self-hostable scale-out process server for disaster-recovery
//! replication. The heart is [`cache`], an embedded, log-structured, crash-safe cache
//! engine. Around it: the wire [`protocol`], the TLS [`ingest`] server, the [`drain`] to
//! object storage in the [`store`] layout, the [`agent`] and [`restore`]. Dependencies point one way:
//! command line → server parts → engine → I/O.

#![deny(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod cache;
pub mod config;
pub mod control;
pub mod drain;
pub mod ingest;
pub mod plan;
pub mod process_server;
pub mod protocol;
pub mod proxy;
pub mod restore;
pub mod secrets;
pub mod size;
pub mod store;
pub mod tls;

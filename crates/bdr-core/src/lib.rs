//! The pure logic of bdr: nothing here touches PostgreSQL, so all of it is
//! tested with plain `cargo test`.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod conflict;
pub mod consensus;
pub mod ddl;
pub mod dmllock;
pub mod dsn;
pub mod dump;
pub mod flow;
pub mod hlc;
pub mod lsn;
pub mod naming;
pub mod node;
pub mod protocol;
pub mod quote;
pub mod sequence;
pub mod settings;
pub mod tables;
pub mod time;
pub mod version;

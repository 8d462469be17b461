//! bdr's user-facing errors, each with an SQLSTATE and a hint, raised as a
//! PostgreSQL ERROR at the SQL boundary.

use bdr_core::dsn::DsnError;
use bdr_core::node::NameError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BdrError {
    #[error("{0}")]
    BadName(#[from] NameError),
    #[error("invalid connection string \"{dsn}\": {err}")]
    BadDsn { dsn: String, err: DsnError },
    #[error("node \"{0}\" already exists")]
    NodeExists(String),
    #[error("this database already has a local BDR node \"{0}\"")]
    LocalNodeExists(String),
    #[error("node id {id} of \"{name}\" collides with existing node \"{other}\"")]
    NodeIdCollision {
        id: u32,
        name: String,
        other: String,
    },
    #[error("no local BDR node exists in this database")]
    NoLocalNode,
    #[error("node \"{0}\" does not exist")]
    NoSuchNode(String),
    #[error("node group \"{0}\" already exists")]
    GroupExists(String),
    #[error("node group \"{0}\" does not exist")]
    NoSuchGroup(String),
    #[error("local node \"{node}\" is already a member of node group \"{group}\"")]
    AlreadyInGroup { node: String, group: String },
    #[error("node \"{0}\" is still an active member of its group")]
    NodeStillActive(String),
    #[error("local node \"{node}\" still has peers that are not parted: {}", .peers.join(", "))]
    LocalNodeHasPeers { node: String, peers: Vec<String> },
    #[error("{msg}")]
    Prerequisite { msg: String, hint: String },
    #[error("{0} is not supported yet")]
    NotSupported(String),
    #[error("invalid value for {what}: {msg}")]
    InvalidValue { what: &'static str, msg: String },
    #[error("could not connect to {what} (\"{dsn}\"): {msg}")]
    PeerUnreachable {
        what: String,
        dsn: String,
        msg: crate::walrcv::PeerError,
    },
    #[error("{what} failed on node \"{node}\": {msg}")]
    PeerCommand {
        what: String,
        node: String,
        msg: crate::walrcv::PeerError,
    },
    #[error("{msg}")]
    JoinRefused { msg: String, hint: String },
    /// A statement bdr will not replicate, because the nodes would diverge.
    #[error("{msg}")]
    Refused { msg: String, hint: String },
    /// A request may or may not have taken effect (a consensus timeout
    /// after it was handed to Raft).
    #[error("{msg}")]
    OutcomeUnknown { msg: String, hint: String },
    /// A global sequence asked to do what its kind or type cannot.
    #[error("{msg}")]
    Sequence { msg: String, hint: String },
    /// The group's consensus did not answer; the request was not applied.
    #[error("{msg}")]
    NoMajority { msg: String, hint: String },
    /// A global lock that could not be had.
    #[error("{msg}")]
    GlobalLock { msg: String, hint: String },
    #[error("must be owner of {0}")]
    NotOwner(String),
    #[error("{msg}")]
    Timeout { msg: String, hint: String },
    #[error("{0}")]
    Spi(#[from] pgrx::spi::Error),
}

impl BdrError {
    pub fn code(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            BdrError::BadName(_) => ERRCODE_INVALID_NAME,
            BdrError::BadDsn { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            BdrError::NodeExists(_) | BdrError::LocalNodeExists(_) | BdrError::GroupExists(_) => {
                ERRCODE_DUPLICATE_OBJECT
            }
            BdrError::NodeIdCollision { .. } => ERRCODE_DUPLICATE_OBJECT,
            BdrError::NoLocalNode
            | BdrError::AlreadyInGroup { .. }
            | BdrError::NodeStillActive(_)
            | BdrError::LocalNodeHasPeers { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            BdrError::Prerequisite { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            BdrError::NoSuchNode(_) | BdrError::NoSuchGroup(_) => ERRCODE_UNDEFINED_OBJECT,
            BdrError::NotSupported(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            BdrError::InvalidValue { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            BdrError::PeerUnreachable { .. } => ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            BdrError::PeerCommand { .. } => ERRCODE_CONNECTION_EXCEPTION,
            BdrError::JoinRefused { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            BdrError::OutcomeUnknown { .. } => ERRCODE_T_R_STATEMENT_COMPLETION_UNKNOWN,
            BdrError::Refused { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            BdrError::Sequence { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            BdrError::GlobalLock { .. } => ERRCODE_LOCK_NOT_AVAILABLE,
            BdrError::NoMajority { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            BdrError::NotOwner(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            BdrError::Timeout { .. } => ERRCODE_QUERY_CANCELED,
            BdrError::Spi(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    pub fn hint(&self) -> Option<String> {
        Some(match self {
            BdrError::BadName(_) => "Use lowercase letters, digits, hyphens and underscores, at most 63 bytes.".into(),
            BdrError::BadDsn { .. } => {
                "Give a libpq connection string such as 'host=db1 port=5432 dbname=app' or a URI such as 'postgresql://db1:5432/app'.".into()
            }
            BdrError::NodeExists(_) => "Choose a different node name, or remove the old node with bdr.drop_node().".into(),
            BdrError::LocalNodeExists(_) => {
                "A database can hold only one BDR node; remove it first with bdr.drop_node() if you mean to replace it.".into()
            }
            BdrError::NodeIdCollision { .. } => "Choose a different node name.".into(),
            BdrError::NoLocalNode => "Create the local node first with bdr.create_node(node_name, local_dsn).".into(),
            BdrError::GroupExists(_) => "Choose a different group name, or join the existing group with bdr.join_node_group().".into(),
            BdrError::NoSuchNode(_) => "See bdr.node_summary for the nodes this database knows.".into(),
            BdrError::NoSuchGroup(_) => "See bdr.node_group for the groups this database knows.".into(),
            BdrError::AlreadyInGroup { .. } => "A node can be a member of one group only.".into(),
            BdrError::NodeStillActive(_) | BdrError::LocalNodeHasPeers { .. } => {
                "Part the node first with bdr.part_node(), or pass force => true to remove its metadata anyway.".into()
            }
            BdrError::Prerequisite { hint, .. } => hint.clone(),
            BdrError::NotSupported(_) => "See docs/ in the bdr sources for what is implemented.".into(),
            BdrError::PeerUnreachable { .. } => {
                "Check that the node is running and that the connection string, pg_hba.conf and the network allow a replication connection from this node.".into()
            }
            BdrError::PeerCommand { .. } => "See that node's server log for details.".into(),
            BdrError::JoinRefused { hint, .. } => hint.clone(),
            BdrError::OutcomeUnknown { hint, .. } => hint.clone(),
            BdrError::Refused { hint, .. } => hint.clone(),
            BdrError::Sequence { hint, .. } => hint.clone(),
            BdrError::GlobalLock { hint, .. } => hint.clone(),
            BdrError::NoMajority { hint, .. } => hint.clone(),
            BdrError::Timeout { hint, .. } => hint.clone(),
            BdrError::NotOwner(_) => "Only the owner (or a superuser) can do this.".into(),
            BdrError::InvalidValue { .. } | BdrError::Spi(_) => return None,
        })
    }

    /// Raises this error as a PostgreSQL ERROR; does not return.
    pub fn raise(self) -> ! {
        let code = self.code();
        self.raise_with(code)
    }

    /// Raises the error with another SQLSTATE than its own (one PostgreSQL
    /// itself uses for the same condition).
    pub fn raise_with(self, code: PgSqlErrorCode) -> ! {
        let mut report = ErrorReport::new(code, self.to_string(), "bdr");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

pub type BdrResult<T> = Result<T, BdrError>;

/// Unwraps a result at the SQL boundary, raising the error as an ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for BdrResult<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}

/// The report of an error caught with `PgTryBuilder`, whatever raised it.
pub fn caught_report(
    e: &pgrx::pg_sys::panic::CaughtError,
) -> &pgrx::pg_sys::panic::ErrorReportWithLevel {
    use pgrx::pg_sys::panic::CaughtError::*;
    match e {
        PostgresError(r) | ErrorReport(r) | RustPanic { ereport: r, .. } => r,
    }
}

/// Raises an ERROR with SQLSTATE `code` below the SQL boundary (workers,
/// apply, triggers), where no `BdrError` carries one; does not return.
pub fn raise_code(code: PgSqlErrorCode, message: String) -> ! {
    ErrorReport::new(code, message, "bdr").report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// `crate::fail!(ERRCODE_..., "format", args...)`: an ERROR with that SQLSTATE.
#[macro_export]
macro_rules! fail {
    ($code:ident, $($arg:tt)*) => {
        $crate::error::raise_code(pgrx::PgSqlErrorCode::$code, format!($($arg)*))
    };
}

//! The global DML lock's rules: which DDL needs it, which statements must
//! also send their values as rows, and when a node has applied everything
//! the others wrote before the lock.
//!
//! The lock stops writes to a relation on every node and waits until every
//! node has applied what each node committed to it before: then the
//! relation holds the same rows everywhere, so a new constraint, a table
//! rewrite or a new column computed from the rows gives the same result on
//! every node.

use crate::lsn;

/// The prefix of the logical message a node commits once writes to a
/// locked relation have stopped there: a peer that has applied that
/// transaction has applied every earlier one of that node.
pub const MARKER_PREFIX: &str = "bdr_marker";

/// What an expression in a statement is, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expr {
    /// There is none.
    None,
    /// A literal (possibly cast), or for `USING` a plain column reference:
    /// every node computes the same value from the same row.
    Simple,
    /// Anything else: a function call may give each node another value
    /// (`random()`, `now()`, `nextval()`, `clock_timestamp()`).
    Computed,
}

/// One sub-command of `ALTER TABLE`, as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlterPiece {
    AddColumn {
        default: Expr,
        /// NOT NULL, CHECK, UNIQUE, PRIMARY KEY or REFERENCES on the column.
        constraints: bool,
        /// IDENTITY or GENERATED ... STORED: each node computes it itself.
        generated: bool,
    },
    /// ADD CONSTRAINT (or ADD PRIMARY KEY / UNIQUE USING INDEX).
    AddConstraint {
        not_valid: bool,
    },
    SetNotNull,
    AlterType {
        using: Expr,
    },
    /// VALIDATE CONSTRAINT: checks rows that may still be on their way.
    ValidateConstraint,
    Other,
}

/// Whether an `ALTER TABLE` must hold the DML lock: what checks or
/// rewrites the rows must see the same rows on every node. BDR 4 takes it
/// for these too; what only changes the catalog (SET DEFAULT, a column
/// without a default, RENAME, OWNER, storage parameters) does not need it.
pub fn alter_needs_dml_lock(pieces: &[AlterPiece]) -> bool {
    pieces.iter().any(|p| match *p {
        AlterPiece::AddColumn {
            default,
            constraints,
            ..
        } => constraints || default == Expr::Computed,
        AlterPiece::AddConstraint { not_valid } => !not_valid,
        AlterPiece::SetNotNull | AlterPiece::ValidateConstraint => true,
        AlterPiece::AlterType { .. } => true,
        AlterPiece::Other => false,
    })
}

/// Whether a piece computes values each node would compute differently,
/// so that the origin sends its own values as row changes after it ran
/// (under the DML lock, so that nothing else writes the rows meanwhile).
pub fn replicates_values(piece: &AlterPiece) -> bool {
    match *piece {
        AlterPiece::AddColumn {
            default, generated, ..
        } => default == Expr::Computed && !generated,
        AlterPiece::AlterType { using } => using == Expr::Computed,
        _ => false,
    }
}

/// Whether `CREATE INDEX` must hold the DML lock: a unique index checks
/// rows that may still be on their way from other nodes. `CONCURRENTLY`
/// does not block writes, so it does not take a lock that would.
pub fn index_needs_dml_lock(unique: bool, concurrently: bool) -> bool {
    unique && !concurrently
}

/// Each node's marker: `(node id, LSN)` pairs as text (`"2:0/1A2B,3:0/FF"`),
/// what the lock asks every node about.
pub fn encode_targets(targets: &[(u32, u64)]) -> String {
    targets
        .iter()
        .map(|(n, l)| format!("{n}:{}", lsn::format(*l)))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn parse_targets(s: &str) -> Option<Vec<(u32, u64)>> {
    if s.trim().is_empty() {
        return Some(vec![]);
    }
    s.split(',')
        .map(|t| {
            let (n, l) = t.trim().split_once(':')?;
            Some((n.parse().ok()?, lsn::parse(l)?))
        })
        .collect()
}

/// The first target node `me` has not applied up to: `(node, applied,
/// wanted)`, with `applied` `None` when `me` does not receive from it.
/// `progress` is what `me` has applied of a node (its origin's LSN).
pub fn lagging(
    me: u32,
    targets: &[(u32, u64)],
    progress: impl Fn(u32) -> Option<u64>,
) -> Option<(u32, Option<u64>, u64)> {
    targets
        .iter()
        .filter(|(n, _)| *n != me)
        .find_map(|&(n, want)| match progress(n) {
            Some(p) if p >= want => None,
            p => Some((n, p, want)),
        })
}

/// A lock's id: unique in the group for the life of the requesting
/// backend (node, backend pid and the time it asked).
pub fn lock_id(node_id: u32, pid: i32, now_us: i64) -> i64 {
    let mix = (node_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ ((pid as u32 as u64) << 32)
        ^ (now_us as u64);
    (mix & (i64::MAX as u64)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_needs_the_dml_lock() {
        let plain = AlterPiece::AddColumn {
            default: Expr::None,
            constraints: false,
            generated: false,
        };
        let constant = AlterPiece::AddColumn {
            default: Expr::Simple,
            constraints: false,
            generated: false,
        };
        let computed = AlterPiece::AddColumn {
            default: Expr::Computed,
            constraints: false,
            generated: false,
        };
        let not_null = AlterPiece::AddColumn {
            default: Expr::Simple,
            constraints: true,
            generated: false,
        };
        assert!(!alter_needs_dml_lock(&[plain, constant, AlterPiece::Other]));
        assert!(alter_needs_dml_lock(&[plain, computed]));
        assert!(alter_needs_dml_lock(&[not_null]));
        assert!(alter_needs_dml_lock(&[AlterPiece::AddConstraint {
            not_valid: false
        }]));
        assert!(!alter_needs_dml_lock(&[AlterPiece::AddConstraint {
            not_valid: true
        }]));
        assert!(alter_needs_dml_lock(&[AlterPiece::SetNotNull]));
        assert!(alter_needs_dml_lock(&[AlterPiece::ValidateConstraint]));
        assert!(alter_needs_dml_lock(&[AlterPiece::AlterType {
            using: Expr::None
        }]));
        assert!(!alter_needs_dml_lock(&[]));
        assert!(index_needs_dml_lock(true, false));
        assert!(!index_needs_dml_lock(true, true));
        assert!(!index_needs_dml_lock(false, false));
    }

    #[test]
    fn which_pieces_send_their_values() {
        let computed = |generated| AlterPiece::AddColumn {
            default: Expr::Computed,
            constraints: false,
            generated,
        };
        assert!(replicates_values(&computed(false)));
        assert!(!replicates_values(&computed(true)));
        assert!(!replicates_values(&AlterPiece::AddColumn {
            default: Expr::Simple,
            constraints: true,
            generated: false
        }));
        assert!(replicates_values(&AlterPiece::AlterType {
            using: Expr::Computed
        }));
        assert!(!replicates_values(&AlterPiece::AlterType {
            using: Expr::Simple
        }));
        assert!(!replicates_values(&AlterPiece::SetNotNull));
    }

    #[test]
    fn targets_round_trip() {
        let t = vec![(2, 0x1_0000_00A0), (3, 42)];
        let s = encode_targets(&t);
        assert_eq!(s, "2:1/A0,3:0/2A");
        assert_eq!(parse_targets(&s), Some(t));
        assert_eq!(parse_targets(""), Some(vec![]));
        assert_eq!(parse_targets("2:zz"), None);
        assert_eq!(parse_targets("x:0/1"), None);
    }

    #[test]
    fn lagging_finds_the_first_node_behind() {
        let targets = [(1, 100), (2, 200), (3, 300)];
        let progress = |n| match n {
            1 => Some(150),
            2 => Some(199),
            _ => None,
        };
        // The node's own marker is never waited for.
        assert_eq!(lagging(3, &targets, progress), Some((2, Some(199), 200)));
        assert_eq!(lagging(2, &targets, progress), Some((3, None, 300)));
        assert_eq!(lagging(3, &targets, |_| Some(500)), None);
        assert_eq!(lagging(1, &[(1, 100)], |_| None), None);
    }

    #[test]
    fn lock_ids_differ_and_are_positive() {
        let a = lock_id(1, 100, 1_000);
        let b = lock_id(2, 100, 1_000);
        let c = lock_id(1, 101, 1_000);
        assert!(a >= 0 && b >= 0 && c >= 0);
        assert!(a != b && a != c && b != c);
    }
}

//! The hybrid logical clock behind local commit timestamps.
//!
//! Last update wins compares commit timestamps, so a local write that
//! replaces a version must carry a later timestamp than that version, or it
//! loses on every other node while it stays here. A version applied from a
//! peer whose clock runs ahead carries a timestamp in this node's future; a
//! local commit that follows it therefore takes `newest + 1 µs` instead of
//! the wall clock. `newest` is the latest commit timestamp this node has
//! applied or handed out, published before the commit that carries it
//! becomes visible.

/// The commit timestamp a local transaction must take instead of the wall
/// clock, or `None` when the wall clock (`now`, µs) is already past every
/// timestamp published so far (`newest`): the common case, in which nothing
/// changes.
pub fn local_commit_stamp(now: i64, newest: i64) -> Option<i64> {
    (now <= newest).then(|| newest.saturating_add(1))
}

/// The replication origin under which sessions commit local changes with a
/// timestamp of their choosing (part's catch-up, tests of ties).
pub const LOCAL_ORIGIN: &str = "bdr_local";

/// `LOCAL_ORIGIN` as a C string, for PostgreSQL's origin lookups.
pub const LOCAL_ORIGIN_C: &std::ffi::CStr = c"bdr_local";

/// Replication origins a local transaction can borrow to commit with a
/// chosen timestamp (PostgreSQL 15 records a chosen commit timestamp only
/// for a session with an origin, and one origin serves one backend at a
/// time). Each is named `bdr_local_<n>`, n from 1.
pub const POOL_SIZE: usize = 4;

/// The name of pool origin `n` (1-based).
pub fn pool_origin_name(n: usize) -> String {
    format!("bdr_local_{n}")
}

/// Whether a replication origin's name is one under which this node commits
/// its own transactions: `bdr_local` (sessions choosing their timestamp) or a
/// pool origin. Transactions committed under them are local changes.
pub fn is_local_origin(name: &str) -> bool {
    match name.strip_prefix(LOCAL_ORIGIN) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('_')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// The SQL condition `is_local_origin` on a column holding an origin name.
pub fn local_origin_sql(column: &str) -> String {
    format!("{column} ~ '^bdr_local(_[0-9]+)?$'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_past_newest_is_kept() {
        assert_eq!(local_commit_stamp(1_000, 999), None);
        assert_eq!(local_commit_stamp(1_000, 0), None);
    }

    #[test]
    fn wall_clock_behind_newest_follows_it() {
        assert_eq!(local_commit_stamp(1_000, 1_000), Some(1_001));
        assert_eq!(local_commit_stamp(1_000, 400_000), Some(400_001));
        assert_eq!(local_commit_stamp(0, i64::MAX), Some(i64::MAX));
    }

    #[test]
    fn local_origin_names() {
        assert!(is_local_origin("bdr_local"));
        assert_eq!(LOCAL_ORIGIN_C.to_str(), Ok(LOCAL_ORIGIN));
        assert!(is_local_origin(&pool_origin_name(1)));
        assert!(is_local_origin("bdr_local_12"));
        assert!(!is_local_origin("bdr_local_"));
        assert!(!is_local_origin("bdr_local_x"));
        assert!(!is_local_origin("bdr_localx"));
        assert!(!is_local_origin("bdr_node1"));
        assert_eq!(
            local_origin_sql("o.roname"),
            "o.roname ~ '^bdr_local(_[0-9]+)?$'"
        );
    }
}

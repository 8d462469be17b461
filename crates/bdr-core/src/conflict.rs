//! The rule that makes concurrent writes converge: last update wins on the
//! commit timestamp, and on equal timestamps the higher node id wins. Every
//! node evaluates the same comparison on the same numbers (applied rows keep
//! their origin's commit timestamp), so every node picks the same winner.

/// Who last wrote a row: commit timestamp (microseconds since 2000-01-01, as
/// PostgreSQL counts) and the id of the node where that write was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Writer {
    pub commit_ts: i64,
    pub node_id: u32,
}

/// Whether an incoming change from `remote` replaces the local row last
/// written by `local`. `None` means the local row's writer is unknown (a row
/// older than `track_commit_timestamp`, or frozen): any remote write is newer.
pub fn remote_wins(remote: Writer, local: Option<Writer>) -> bool {
    match local {
        None => true,
        Some(l) => remote > l,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(ts: i64, node: u32) -> Writer {
        Writer {
            commit_ts: ts,
            node_id: node,
        }
    }

    #[test]
    fn later_timestamp_wins() {
        assert!(remote_wins(w(10, 1), Some(w(9, 2))));
        assert!(!remote_wins(w(9, 2), Some(w(10, 1))));
    }

    #[test]
    fn ties_go_to_the_higher_node_id_on_both_sides() {
        // Node 1 sees node 2's change against its own: node 2 wins.
        assert!(remote_wins(w(10, 2), Some(w(10, 1))));
        // Node 2 sees node 1's change against its own: node 2 keeps its row.
        assert!(!remote_wins(w(10, 1), Some(w(10, 2))));
    }

    #[test]
    fn the_same_write_twice_is_not_newer() {
        assert!(!remote_wins(w(10, 2), Some(w(10, 2))));
    }

    #[test]
    fn unknown_local_writer_loses() {
        assert!(remote_wins(w(i64::MIN, 0), None));
    }

    #[test]
    fn every_order_of_arrival_picks_one_winner() {
        // Three writers of one row; whatever order they arrive in, applying
        // only winners ends with the maximum.
        let writes = [w(5, 3), w(7, 1), w(7, 2)];
        let orders = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for o in orders {
            let mut cur: Option<Writer> = None;
            for i in o {
                if remote_wins(writes[i], cur) {
                    cur = Some(writes[i]);
                }
            }
            assert_eq!(cur, Some(w(7, 2)));
        }
    }
}

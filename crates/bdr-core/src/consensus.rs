//! The replicated state machine behind bdr's consensus: the commands nodes
//! agree on through Raft (raft-rs drives the log; this module only says
//! what a committed command does), applied deterministically so that every
//! node that applies the same log holds the same state.
//!
//! A command carries everything its effect depends on, the proposer's clock
//! included (a key-value entry's expiry is decided by the time written into
//! the command, never by the applying node's clock).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The version of the consensus messages and commands this code speaks.
pub const PROTO_VERSION: i32 = 1;

/// How often the consensus worker ticks its Raft node.
pub const TICK_MS: i64 = 100;

/// Raft's election timeout in ticks for `bdr.raft_election_timeout`
/// (raft-rs randomises it further between this and twice this).
pub fn election_ticks(election_timeout_ms: i64) -> usize {
    (election_timeout_ms / TICK_MS).max(3) as usize
}

/// The leader's heartbeat interval in ticks: several per election timeout,
/// so that one lost heartbeat does not start an election.
pub fn heartbeat_ticks(election_ticks: usize) -> usize {
    (election_ticks / 5).max(1)
}

/// What the group decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Nothing: a new leader's first entry, or a probe that the group
    /// answers (`bdr.consensus_kv_fetch` reads after one, so it sees every
    /// write committed before it).
    Noop,
    /// Sets `key` to `value` (jsonb text; `None` deletes it), if `prev` is
    /// `None` or equals the current value (compare-and-set: `Some(None)`
    /// asks that the key be absent). `ttl_ms`: the entry expires that long
    /// after `now_us`, the proposer's clock.
    KvStore {
        key: String,
        value: Option<String>,
        prev: Option<Option<String>>,
        ttl_ms: Option<i64>,
        now_us: i64,
    },
    /// Reads `key` in log order: the answer reflects every command
    /// committed before it (a linearizable read); changes nothing.
    KvFetch { key: String, now_us: i64 },
    /// Replaces the whole state machine with an exported one
    /// (`bdr.consensus_snapshot_import`), on every node at the same point
    /// of the log.
    Restore { state: Vec<u8> },
    /// Hands the next chunk of galloc sequence `key` to a node: values
    /// from `start` (for the first chunk) up to `max_value`, `chunk_size`
    /// at a time. The answer's value is the chunk as JSON.
    SeqAlloc {
        key: String,
        start: i64,
        chunk_size: i64,
        max_value: i64,
        now_us: i64,
    },
}

/// What a backend asks its consensus worker for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Commit a command and return what applying it gave.
    Command(Command),
    /// Make a node a voter of the group.
    AddVoter(u64),
    /// Take a node out of the group.
    RemoveVoter(u64),
    /// Hand the leadership to this voter (answered at once; the caller
    /// watches the status to see it happen).
    TransferLeader(u64),
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<Request> {
        bincode::deserialize(b).ok()
    }
}

impl Applied {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<Applied> {
        bincode::deserialize(b).ok()
    }
}

/// A command as it travels in the Raft log: who proposed it, so that the
/// proposer's waiting backend gets the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub origin: u64,
    pub request_id: u64,
    pub command: Command,
}

impl Proposal {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<Proposal> {
        bincode::deserialize(b).ok()
    }
}

/// What applying a command gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The command took effect (a compare-and-set whose `prev` did not
    /// match did not).
    pub ok: bool,
    /// The key's value after the command.
    pub value: Option<String>,
    /// When it took effect, by the proposer's clock.
    pub at_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KvEntry {
    value: String,
    expires_us: Option<i64>,
}

/// The state every node derives from the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    kv: BTreeMap<String, KvEntry>,
    /// The newest proposer clock seen: expiry is judged against the later
    /// of it and a command's own clock, so a proposer whose clock lags
    /// cannot bring an expired entry back to life.
    clock_us: i64,
    /// Galloc sequences by qualified name.
    seqs: BTreeMap<String, crate::sequence::Allocation>,
}

/// The state as it was encoded before galloc sequences.
#[derive(Deserialize)]
struct StateV1 {
    kv: BTreeMap<String, KvEntry>,
    clock_us: i64,
}

impl State {
    /// Applies one committed command.
    pub fn apply(&mut self, c: &Command) -> Applied {
        match c {
            Command::Noop => Applied {
                ok: true,
                value: None,
                at_us: self.clock_us,
            },
            Command::Restore { state } => match State::decode(state) {
                Some(s) => {
                    *self = s;
                    Applied {
                        ok: true,
                        value: None,
                        at_us: self.clock_us,
                    }
                }
                None => Applied {
                    ok: false,
                    value: None,
                    at_us: self.clock_us,
                },
            },
            Command::SeqAlloc {
                key,
                start,
                chunk_size,
                max_value,
                now_us,
            } => {
                self.clock_us = self.clock_us.max(*now_us);
                let now = self.clock_us;
                let current = self.seqs.get(key);
                match crate::sequence::next_chunk(current, *start, *chunk_size, *max_value) {
                    Ok(c) => {
                        let a = self.seqs.entry(key.clone()).or_default();
                        a.chunk_size = *chunk_size;
                        a.allocated_up_to = c.end;
                        a.nallocs += 1;
                        a.last_alloc_us = now;
                        Applied {
                            ok: true,
                            value: Some(c.encode()),
                            at_us: now,
                        }
                    }
                    Err(msg) => Applied {
                        ok: false,
                        value: Some(msg),
                        at_us: now,
                    },
                }
            }
            Command::KvFetch { key, now_us } => {
                let now = self.clock_us.max(*now_us);
                Applied {
                    ok: true,
                    value: self.get(key, now),
                    at_us: now,
                }
            }
            Command::KvStore {
                key,
                value,
                prev,
                ttl_ms,
                now_us,
            } => {
                self.clock_us = self.clock_us.max(*now_us);
                let now = self.clock_us;
                let current = self.get(key, now);
                if let Some(expected) = prev {
                    if *expected != current {
                        return Applied {
                            ok: false,
                            value: current,
                            at_us: now,
                        };
                    }
                }
                match value {
                    Some(v) => {
                        self.kv.insert(
                            key.clone(),
                            KvEntry {
                                value: v.clone(),
                                expires_us: ttl_ms.map(|t| now.saturating_add(t * 1000)),
                            },
                        );
                    }
                    None => {
                        self.kv.remove(key);
                    }
                }
                Applied {
                    ok: true,
                    value: value.clone(),
                    at_us: now,
                }
            }
        }
    }

    /// The value of `key` at `now_us` (an expired entry has none).
    pub fn get(&self, key: &str, now_us: i64) -> Option<String> {
        self.kv
            .get(key)
            .filter(|e| e.expires_us.is_none_or(|x| x > now_us))
            .map(|e| e.value.clone())
    }

    /// Every live key and value at `now_us`, by key.
    pub fn entries(&self, now_us: i64) -> Vec<(String, String)> {
        self.kv
            .iter()
            .filter(|(_, e)| e.expires_us.is_none_or(|x| x > now_us))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<State> {
        if b.is_empty() {
            return Some(State::default());
        }
        bincode::deserialize(b).ok().or_else(|| {
            let old: StateV1 = bincode::deserialize(b).ok()?;
            Some(State {
                kv: old.kv,
                clock_us: old.clock_us,
                seqs: BTreeMap::new(),
            })
        })
    }

    /// Every galloc sequence's allocation, by name.
    pub fn allocations(&self) -> Vec<(String, crate::sequence::Allocation)> {
        self.seqs
            .iter()
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect()
    }
}

/// The header of an exported snapshot: "BDRC", then the protocol version.
const SNAPSHOT_MAGIC: &[u8; 4] = b"BDRC";

/// A snapshot of the state machine (its encoding as `State::encode` gives
/// it) for `bdr.consensus_snapshot_export`.
pub fn export_snapshot(state: &[u8]) -> Vec<u8> {
    let mut v = SNAPSHOT_MAGIC.to_vec();
    v.extend_from_slice(&PROTO_VERSION.to_le_bytes());
    v.extend_from_slice(state);
    v
}

/// Checks an exported snapshot; returns its state machine.
pub fn verify_snapshot(b: &[u8]) -> Result<State, String> {
    if b.len() < 8 || &b[..4] != SNAPSHOT_MAGIC {
        return Err("not a bdr consensus snapshot".into());
    }
    let v = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    if v != PROTO_VERSION {
        return Err(format!(
            "a snapshot of consensus protocol version {v}; this node speaks {PROTO_VERSION}"
        ));
    }
    State::decode(&b[8..]).ok_or_else(|| "the snapshot's state machine does not decode".into())
}

/// How many log entries to keep after compaction, and where to compact:
/// with `keep` > 0, once more than twice `keep` entries are applied past
/// the last snapshot, the log is compacted up to `applied - keep`.
pub fn compaction_point(snapshot_index: u64, applied: u64, keep: u64) -> Option<u64> {
    (keep > 0 && applied > snapshot_index + 2 * keep).then(|| applied - keep)
}

/// Whether a node's Raft state, as the group's members report them, is
/// healthy: BDR 4's `bdr.monitor_group_raft()` statuses and messages.
/// `states`: (node reachable, role, leader it follows) per node.
pub fn raft_health(states: &[(bool, Role, u64)]) -> (&'static str, &'static str) {
    if states.is_empty() {
        return ("UNKNOWN", "This node is not part of any BDR group");
    }
    if states.len() == 1 {
        return ("CRITICAL", "There is a single node in Raft Consensus");
    }
    let leaders: Vec<usize> = states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.0 && s.1 == Role::Leader)
        .map(|(i, _)| i)
        .collect();
    let candidates = states.iter().any(|s| s.0 && s.1 == Role::Candidate);
    if leaders.is_empty() {
        return (
            "WARNING",
            "There is no RAFT_LEADER, an election might be in progress",
        );
    }
    if candidates {
        return (
            "CRITICAL",
            "There are node(s) as RAFT_CANDIDATE while a RAFT_LEADER is defined",
        );
    }
    let leader_id = states[leaders[0]].2;
    if states
        .iter()
        .any(|s| s.0 && s.1 == Role::Follower && s.2 != leader_id)
    {
        return (
            "CRITICAL",
            "There are node(s) following a leader different than the node set as RAFT_LEADER",
        );
    }
    if states.iter().any(|s| !s.0) {
        return ("WARNING", "There is at least 1 node that is not accessible");
    }
    ("OK", "Raft Consensus is working correctly")
}

/// A node's part in the Raft group, as BDR 4 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Role {
    #[default]
    Follower,
    Candidate,
    Leader,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "RAFT_FOLLOWER",
            Role::Candidate => "RAFT_CANDIDATE",
            Role::Leader => "RAFT_LEADER",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(key: &str, v: Option<&str>, prev: Option<Option<&str>>, now: i64) -> Command {
        Command::KvStore {
            key: key.into(),
            value: v.map(String::from),
            prev: prev.map(|p| p.map(String::from)),
            ttl_ms: None,
            now_us: now,
        }
    }

    #[test]
    fn galloc_chunks_are_handed_out_once() {
        let alloc = |now| Command::SeqAlloc {
            key: "public.s".into(),
            start: 1,
            chunk_size: 1000,
            max_value: 2500,
            now_us: now,
        };
        let mut s = State::default();
        let a = s.apply(&alloc(1));
        assert_eq!(
            a.value.as_deref().and_then(crate::sequence::Chunk::decode),
            Some(crate::sequence::Chunk {
                start: 1,
                end: 1000
            })
        );
        let b = s.apply(&alloc(2));
        assert_eq!(b.value.as_deref(), Some("1001 2000"));
        assert_eq!(s.apply(&alloc(3)).value.as_deref(), Some("2001 2500"));
        let d = s.apply(&alloc(4));
        assert!(!d.ok);
        let all = s.allocations();
        assert_eq!(all[0].1.allocated_up_to, 2500);
        assert_eq!(all[0].1.nallocs, 3);
        // Survives a snapshot.
        let s2 = State::decode(&s.encode()).unwrap();
        assert_eq!(s2, s);
    }

    #[test]
    fn states_encoded_before_galloc_still_decode() {
        #[derive(Serialize)]
        struct Old {
            kv: BTreeMap<String, KvEntry>,
            clock_us: i64,
        }
        let mut kv = BTreeMap::new();
        kv.insert(
            "k".to_string(),
            KvEntry {
                value: "1".into(),
                expires_us: None,
            },
        );
        let b = bincode::serialize(&Old { kv, clock_us: 7 }).unwrap();
        let s = State::decode(&b).unwrap();
        assert_eq!(s.get("k", 7), Some("1".into()));
    }

    #[test]
    fn store_fetch_delete() {
        let mut s = State::default();
        assert!(s.apply(&store("a", Some("1"), None, 10)).ok);
        assert_eq!(s.get("a", 10), Some("1".into()));
        assert!(s.apply(&store("a", None, None, 11)).ok);
        assert_eq!(s.get("a", 11), None);
    }

    #[test]
    fn fetch_reads_without_changing() {
        let mut s = State::default();
        s.apply(&store("a", Some("1"), None, 10));
        let before = s.clone();
        let r = s.apply(&Command::KvFetch {
            key: "a".into(),
            now_us: 99,
        });
        assert_eq!(r.value, Some("1".into()));
        assert_eq!(s, before);
        let q = Request::AddVoter(3);
        assert_eq!(Request::decode(&q.encode()), Some(q));
        assert_eq!(Applied::decode(&r.encode()), Some(r));
    }

    #[test]
    fn compare_and_set() {
        let mut s = State::default();
        // Absent expected: only the first of two such writes wins.
        assert!(s.apply(&store("n", Some("1"), Some(None), 1)).ok);
        let r = s.apply(&store("n", Some("9"), Some(None), 2));
        assert!(!r.ok);
        assert_eq!(r.value, Some("1".into()));
        // A matching previous value wins, a stale one does not.
        assert!(s.apply(&store("n", Some("2"), Some(Some("1")), 3)).ok);
        assert!(!s.apply(&store("n", Some("3"), Some(Some("1")), 4)).ok);
        assert_eq!(s.get("n", 5), Some("2".into()));
    }

    #[test]
    fn ttl_follows_the_proposers_clock_and_never_goes_back() {
        let mut s = State::default();
        s.apply(&Command::KvStore {
            key: "k".into(),
            value: Some("v".into()),
            prev: None,
            ttl_ms: Some(1),
            now_us: 1_000,
        });
        assert_eq!(s.get("k", 1_999), Some("v".into()));
        assert_eq!(s.get("k", 2_000), None);
        // A later command moves the state's clock past the expiry; one from
        // a proposer whose clock lags does not see the entry again.
        s.apply(&store("other", Some("x"), None, 5_000));
        let r = s.apply(&store("k", Some("w"), Some(Some("v")), 1_500));
        assert!(!r.ok, "expired by the group's clock");
        assert_eq!(r.at_us, 5_000);
    }

    #[test]
    fn the_same_log_gives_the_same_state() {
        let log: Vec<Command> = (0..200)
            .map(|i| {
                store(
                    &format!("k{}", i % 7),
                    (i % 5 != 0).then(|| i.to_string()).as_deref(),
                    (i % 3 == 0).then_some(None),
                    i,
                )
            })
            .collect();
        let (mut a, mut b) = (State::default(), State::default());
        let ra: Vec<Applied> = log.iter().map(|c| a.apply(c)).collect();
        let rb: Vec<Applied> = log.iter().map(|c| b.apply(c)).collect();
        assert_eq!(ra, rb);
        assert_eq!(a, b);
        assert_eq!(State::decode(&a.encode()), Some(a));
    }

    #[test]
    fn proposals_round_trip() {
        let p = Proposal {
            origin: 7,
            request_id: 42,
            command: store("a", Some("{\"x\": 1}"), Some(None), 3),
        };
        assert_eq!(Proposal::decode(&p.encode()), Some(p));
        assert_eq!(Proposal::decode(b"junk"), None);
    }

    #[test]
    fn snapshots_export_and_verify() {
        let mut s = State::default();
        s.apply(&store("a", Some("1"), None, 1));
        let b = export_snapshot(&s.encode());
        assert_eq!(verify_snapshot(&b), Ok(s));
        assert!(verify_snapshot(b"nope").is_err());
        let mut other = b.clone();
        other[4] = 9;
        assert!(verify_snapshot(&other).unwrap_err().contains("version"));
        let mut broken = b;
        broken.truncate(9);
        assert!(verify_snapshot(&broken).is_err());
    }

    #[test]
    fn restore_replaces_the_state_on_every_node_alike() {
        let mut src = State::default();
        src.apply(&store("kept", Some("1"), None, 50));
        let mut a = State::default();
        a.apply(&store("gone", Some("x"), None, 10));
        let mut b = a.clone();
        let cmd = Command::Restore {
            state: src.encode(),
        };
        assert!(a.apply(&cmd).ok);
        assert!(b.apply(&cmd).ok);
        assert_eq!(a, src);
        assert_eq!(a, b);
        assert!(
            !a.apply(&Command::Restore {
                state: b"junk".to_vec()
            })
            .ok
        );
        assert_eq!(a, src, "a snapshot that does not decode changes nothing");
    }

    #[test]
    fn ticks_and_compaction() {
        assert_eq!(election_ticks(6000), 60);
        assert_eq!(election_ticks(1), 3);
        assert_eq!(heartbeat_ticks(60), 12);
        assert_eq!(heartbeat_ticks(3), 1);
        assert_eq!(compaction_point(0, 150, 100), None);
        assert_eq!(compaction_point(0, 201, 100), Some(101));
        assert_eq!(compaction_point(0, 10_000, 0), None);
    }

    #[test]
    fn health_messages() {
        use Role::*;
        assert_eq!(raft_health(&[]).0, "UNKNOWN");
        assert_eq!(raft_health(&[(true, Leader, 1)]).0, "CRITICAL");
        let ok = [(true, Leader, 1), (true, Follower, 1), (true, Follower, 1)];
        assert_eq!(raft_health(&ok).0, "OK");
        let down = [(true, Leader, 1), (false, Follower, 0), (true, Follower, 1)];
        assert_eq!(
            raft_health(&down).1,
            "There is at least 1 node that is not accessible"
        );
        let none = [(true, Follower, 0), (true, Candidate, 0)];
        assert_eq!(raft_health(&none).0, "WARNING");
        let split = [(true, Leader, 1), (true, Follower, 3)];
        assert_eq!(raft_health(&split).0, "CRITICAL");
    }
}

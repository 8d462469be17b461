//! Nodes and groups: states, name rules and identifiers.

use thiserror::Error;

/// A node's state, stored as an oid in `bdr.node.node_state`, as BDR 4 does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NodeState {
    None = 0,
    Created = 1,
    JoinStart = 2,
    Joining = 3,
    Catchup = 4,
    Standby = 5,
    Promote = 6,
    Promoting = 7,
    Active = 8,
    PartStart = 9,
    Parting = 10,
    PartCatchup = 11,
    Parted = 12,
}

const ALL_STATES: [NodeState; 13] = [
    NodeState::None,
    NodeState::Created,
    NodeState::JoinStart,
    NodeState::Joining,
    NodeState::Catchup,
    NodeState::Standby,
    NodeState::Promote,
    NodeState::Promoting,
    NodeState::Active,
    NodeState::PartStart,
    NodeState::Parting,
    NodeState::PartCatchup,
    NodeState::Parted,
];

impl NodeState {
    pub fn from_oid(v: u32) -> Option<NodeState> {
        ALL_STATES.get(v as usize).copied()
    }

    pub fn oid(self) -> u32 {
        self as u32
    }

    /// Whether the local node receives from a peer in this state: active
    /// peers, and parting ones until they are parted (their last changes
    /// must still arrive).
    pub fn is_streamed_from(self) -> bool {
        matches!(
            self,
            NodeState::Active | NodeState::PartStart | NodeState::Parting | NodeState::PartCatchup
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            NodeState::None => "NONE",
            NodeState::Created => "CREATED",
            NodeState::JoinStart => "JOIN_START",
            NodeState::Joining => "JOINING",
            NodeState::Catchup => "CATCHUP",
            NodeState::Standby => "STANDBY",
            NodeState::Promote => "PROMOTE",
            NodeState::Promoting => "PROMOTING",
            NodeState::Active => "ACTIVE",
            NodeState::PartStart => "PART_START",
            NodeState::Parting => "PARTING",
            NodeState::PartCatchup => "PART_CATCHUP",
            NodeState::Parted => "PARTED",
        }
    }

    pub fn all() -> &'static [NodeState] {
        &ALL_STATES
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} name must not be empty")]
    Empty { what: &'static str },
    #[error("{what} name \"{name}\" is too long ({len} bytes, at most 63)")]
    TooLong {
        what: &'static str,
        name: String,
        len: usize,
    },
    #[error("{what} name \"{name}\" contains \"{ch}\"; only lowercase letters, digits, hyphens and underscores are allowed")]
    BadChar {
        what: &'static str,
        name: String,
        ch: char,
    },
}

/// BDR 4's rule for node and group names: lowercase letters, digits, hyphens
/// and underscores, at most 63 bytes (PostgreSQL's `name`).
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > 63 {
        return Err(NameError::TooLong {
            what,
            name: name.to_string(),
            len: name.len(),
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(NameError::BadChar {
            what,
            name: name.to_string(),
            ch,
        });
    }
    Ok(())
}

/// 32-bit FNV-1a: stable across builds and platforms, unlike `std`'s hasher.
pub fn fnv1a32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A node's id is derived from its name so that every node computes the same
/// id for it without coordination; ids below 16384 are avoided so they never
/// look like a system oid.
pub fn node_id_for(name: &str) -> u32 {
    derive_id(b"node:", name)
}

/// A group's id, derived from its name like a node's.
pub fn group_id_for(name: &str) -> u32 {
    derive_id(b"group:", name)
}

fn derive_id(prefix: &[u8], name: &str) -> u32 {
    let mut buf = prefix.to_vec();
    buf.extend_from_slice(name.as_bytes());
    let h = fnv1a32(&buf);
    if h < 16384 {
        h.wrapping_add(16384)
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_roundtrip() {
        for s in NodeState::all() {
            assert_eq!(NodeState::from_oid(s.oid()), Some(*s));
        }
        assert_eq!(NodeState::from_oid(99), None);
        assert_eq!(NodeState::Active.name(), "ACTIVE");
    }

    #[test]
    fn names() {
        assert!(validate_name("node", "node-1_a").is_ok());
        assert_eq!(
            validate_name("node", ""),
            Err(NameError::Empty { what: "node" })
        );
        assert!(matches!(
            validate_name("node", "Node"),
            Err(NameError::BadChar { ch: 'N', .. })
        ));
        assert!(matches!(
            validate_name("node", "a b"),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            validate_name("group", &"x".repeat(64)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(node_id_for("a"), node_id_for("a"));
        assert_ne!(node_id_for("a"), node_id_for("b"));
        assert_ne!(node_id_for("a"), group_id_for("a"));
        assert!(node_id_for("") >= 16384);
        // FNV-1a reference value
        assert_eq!(fnv1a32(b"a"), 0xe40c292c);
    }
}

#[cfg(test)]
mod part_tests {
    use super::NodeState;

    #[test]
    fn parting_peers_are_still_streamed_from_until_parted() {
        assert!(NodeState::Active.is_streamed_from());
        assert!(NodeState::PartStart.is_streamed_from());
        assert!(NodeState::Parting.is_streamed_from());
        assert!(!NodeState::Parted.is_streamed_from());
        assert!(!NodeState::Joining.is_streamed_from());
    }
}

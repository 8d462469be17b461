//! bdr's replication protocol: the messages the `bdr` output plugin sends and
//! receivers read, and the walsender framing around them.
//!
//! Each logical message is one CopyData payload: a version byte followed by a
//! bincode-encoded [`Message`]. The walsender wraps payloads in XLogData
//! (`'w'`) frames and sends keepalives (`'k'`); the receiver answers with
//! standby status updates (`'r'`). All of it is pure Rust, tested here.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the message encoding. A peer that speaks another refuses the stream.
pub const PROTO_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change: keep the local one.
    UnchangedToast,
    /// The type's text output.
    Text(String),
    /// The type's binary send format, used when both sides agreed on binary.
    Binary(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// Qualified type name, so the receiver can check it matches its own.
    pub type_name: String,
    pub type_oid: u32,
    pub typmod: i32,
    /// Part of the replica identity (primary key or REPLICA IDENTITY index).
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `pg_class.relreplident`: b'd' default, b'f' full, b'i' index, b'n' nothing.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Begin {
        xid: u32,
        final_lsn: u64,
        commit_time: i64,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    /// The transaction originated on another node (only when forwarding).
    Origin {
        name: String,
        lsn: u64,
    },
    Relation(Relation),
    Insert {
        relid: u32,
        new: Vec<Value>,
    },
    /// `old` is the key (or the full old row with REPLICA IDENTITY FULL) when
    /// the key changed or identity is full; otherwise the key is taken from `new`.
    Update {
        relid: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relid: u32,
        old: Vec<Value>,
    },
    Truncate {
        relids: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A logical message (DDL, locks, consensus), in or outside a transaction.
    Message {
        transactional: bool,
        prefix: String,
        content: Vec<u8>,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("empty message")]
    Empty,
    #[error("protocol version {got} is not supported (this node speaks {PROTO_VERSION})")]
    Version { got: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("truncated {0} frame")]
    Truncated(&'static str),
    #[error("unknown frame type {0:#04x}")]
    UnknownFrame(u8),
}

pub fn encode(m: &Message) -> Vec<u8> {
    let mut out = vec![PROTO_VERSION];
    // Serialising plain data into a Vec cannot fail.
    out.extend(bincode::serialize(m).expect("bincode serialises plain data"));
    out
}

pub fn decode(buf: &[u8]) -> Result<Message, ProtoError> {
    let (&v, body) = buf.split_first().ok_or(ProtoError::Empty)?;
    if v != PROTO_VERSION {
        return Err(ProtoError::Version { got: v });
    }
    // Limit allocations to the frame size so a corrupt length cannot exhaust memory.
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(body.len() as u64 * 4 + 64)
        .deserialize(body)
        .map_err(|e| ProtoError::Malformed(e.to_string()))
}

/// What a receiver needs to know of a message to track transactions,
/// without decoding its rows: the writer decodes them once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    Begin,
    Commit { end_lsn: u64 },
    Other,
}

/// Reads the message kind (and a COMMIT's end LSN) from an encoded message.
/// Relies on bincode's layout: version byte, variant index (u32 LE), fields
/// in order (`Commit { commit_lsn, end_lsn, .. }`).
pub fn peek_boundary(buf: &[u8]) -> Result<Boundary, ProtoError> {
    let (&v, body) = buf.split_first().ok_or(ProtoError::Empty)?;
    if v != PROTO_VERSION {
        return Err(ProtoError::Version { got: v });
    }
    let tag = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or(ProtoError::Truncated("message"))?;
    Ok(match tag {
        0 => Boundary::Begin,
        1 => {
            let end = body.get(12..20).ok_or(ProtoError::Truncated("COMMIT"))?;
            Boundary::Commit {
                end_lsn: u64::from_le_bytes(end.try_into().expect("8 bytes")),
            }
        }
        _ => Boundary::Other,
    })
}

/// A frame from the walsender inside COPY BOTH.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<'a> {
    XLogData {
        start_lsn: u64,
        end_lsn: u64,
        send_time: i64,
        data: &'a [u8],
    },
    Keepalive {
        end_lsn: u64,
        send_time: i64,
        reply_requested: bool,
    },
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

pub fn parse_frame(buf: &[u8]) -> Result<Frame<'_>, ProtoError> {
    match buf.first() {
        None => Err(ProtoError::Empty),
        Some(b'w') => {
            if buf.len() < 25 {
                return Err(ProtoError::Truncated("XLogData"));
            }
            Ok(Frame::XLogData {
                start_lsn: be_u64(&buf[1..]),
                end_lsn: be_u64(&buf[9..]),
                send_time: be_u64(&buf[17..]) as i64,
                data: &buf[25..],
            })
        }
        Some(b'k') => {
            if buf.len() < 18 {
                return Err(ProtoError::Truncated("keepalive"));
            }
            Ok(Frame::Keepalive {
                end_lsn: be_u64(&buf[1..]),
                send_time: be_u64(&buf[9..]) as i64,
                reply_requested: buf[17] != 0,
            })
        }
        Some(&other) => Err(ProtoError::UnknownFrame(other)),
    }
}

/// A standby status update (`'r'`): what was received, flushed and applied.
pub fn status_update(write: u64, flush: u64, apply: u64, now: i64, reply: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.push(b'r');
    out.extend_from_slice(&write.to_be_bytes());
    out.extend_from_slice(&flush.to_be_bytes());
    out.extend_from_slice(&apply.to_be_bytes());
    out.extend_from_slice(&now.to_be_bytes());
    out.push(reply as u8);
    out
}

/// Options a receiver sends in START_REPLICATION, as the plugin understands them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartOptions {
    pub proto_version: u8,
    pub binary: bool,
    /// Names of origins whose changes are forwarded (join catch-up); empty
    /// means only locally originated changes are sent.
    pub forward_origins: Vec<String>,
}

pub fn parse_start_options<'a>(
    opts: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<StartOptions, String> {
    let mut out = StartOptions::default();
    let mut seen_version = false;
    for (k, v) in opts {
        match k {
            "proto_version" => {
                let n: u8 = v
                    .parse()
                    .map_err(|_| format!("invalid proto_version \"{v}\""))?;
                if n != PROTO_VERSION {
                    return Err(format!("bdr protocol version {n} is not supported; this node speaks {PROTO_VERSION}"));
                }
                out.proto_version = n;
                seen_version = true;
            }
            "binary" => {
                out.binary =
                    parse_bool(v).ok_or_else(|| format!("invalid value \"{v}\" for binary"))?
            }
            "forward_origins" => {
                out.forward_origins = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            other => {
                return Err(format!(
                    "unknown option \"{other}\" for the bdr output plugin"
                ))
            }
        }
    }
    if !seen_version {
        return Err("option proto_version is required by the bdr output plugin".into());
    }
    Ok(out)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_read_without_decoding() {
        let b = encode(&Message::Begin {
            xid: 7,
            final_lsn: 9,
            commit_time: 3,
        });
        assert_eq!(peek_boundary(&b), Ok(Boundary::Begin));
        let c = encode(&Message::Commit {
            commit_lsn: 10,
            end_lsn: 0x1234_5678_9abc,
            commit_time: 5,
        });
        assert_eq!(
            peek_boundary(&c),
            Ok(Boundary::Commit {
                end_lsn: 0x1234_5678_9abc
            })
        );
        let i = encode(&Message::Truncate {
            relids: vec![1],
            cascade: false,
            restart_identity: true,
        });
        assert_eq!(peek_boundary(&i), Ok(Boundary::Other));
        assert_eq!(peek_boundary(&[]), Err(ProtoError::Empty));
        assert_eq!(
            peek_boundary(&[PROTO_VERSION, 1, 0]),
            Err(ProtoError::Truncated("message"))
        );
        assert_eq!(
            peek_boundary(&c[..10]),
            Err(ProtoError::Truncated("COMMIT"))
        );
    }
    use crate::backoff::Jitter;

    struct Gen(Jitter);
    impl Gen {
        fn n(&mut self, max: u64) -> u64 {
            (self.0.next_f64() * max as f64) as u64
        }
        fn s(&mut self) -> String {
            let len = self.n(12) as usize;
            (0..len)
                .map(|_| char::from_u32(0x20 + self.n(0x2FF) as u32).unwrap_or('x'))
                .collect()
        }
        fn value(&mut self) -> Value {
            match self.n(4) {
                0 => Value::Null,
                1 => Value::UnchangedToast,
                2 => Value::Text(self.s()),
                _ => Value::Binary((0..self.n(20)).map(|_| self.n(256) as u8).collect()),
            }
        }
        fn row(&mut self) -> Vec<Value> {
            (0..self.n(6)).map(|_| self.value()).collect()
        }
        fn message(&mut self) -> Message {
            match self.n(9) {
                0 => Message::Begin {
                    xid: self.n(u32::MAX as u64) as u32,
                    final_lsn: self.n(u64::MAX),
                    commit_time: self.n(1 << 60) as i64 - (1 << 59),
                },
                1 => Message::Commit {
                    commit_lsn: self.n(u64::MAX),
                    end_lsn: self.n(u64::MAX),
                    commit_time: self.n(1 << 40) as i64,
                },
                2 => Message::Origin {
                    name: self.s(),
                    lsn: self.n(u64::MAX),
                },
                3 => Message::Relation(Relation {
                    id: self.n(100_000) as u32,
                    schema: self.s(),
                    name: self.s(),
                    replica_identity: b"dfin"[self.n(4) as usize],
                    columns: (0..self.n(5))
                        .map(|_| Column {
                            name: self.s(),
                            type_name: self.s(),
                            type_oid: self.n(9999) as u32,
                            typmod: self.n(100) as i32 - 1,
                            is_key: self.n(2) == 1,
                        })
                        .collect(),
                }),
                4 => Message::Insert {
                    relid: self.n(100) as u32,
                    new: self.row(),
                },
                5 => Message::Update {
                    relid: self.n(100) as u32,
                    old: if self.n(2) == 0 {
                        None
                    } else {
                        Some(self.row())
                    },
                    new: self.row(),
                },
                6 => Message::Delete {
                    relid: self.n(100) as u32,
                    old: self.row(),
                },
                7 => Message::Truncate {
                    relids: (0..self.n(4)).map(|_| self.n(100) as u32).collect(),
                    cascade: self.n(2) == 1,
                    restart_identity: self.n(2) == 1,
                },
                _ => Message::Message {
                    transactional: self.n(2) == 1,
                    prefix: self.s(),
                    content: (0..self.n(30)).map(|_| self.n(256) as u8).collect(),
                },
            }
        }
    }

    #[test]
    fn roundtrip_random_messages() {
        let mut g = Gen(Jitter::new(7));
        for _ in 0..5000 {
            let m = g.message();
            let bytes = encode(&m);
            assert_eq!(decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut g = Gen(Jitter::new(99));
        for _ in 0..20000 {
            let len = g.n(64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| g.n(256) as u8).collect();
            if !buf.is_empty() && g.n(2) == 0 {
                buf[0] = PROTO_VERSION;
            }
            let _ = decode(&buf);
            let _ = parse_frame(&buf);
        }
        // Truncations of valid messages fail cleanly.
        let m = g.message();
        let bytes = encode(&Message::Insert {
            relid: 1,
            new: vec![Value::Text("abc".into()), Value::Null],
        });
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut]);
        }
        let _ = m;
    }

    #[test]
    fn version_is_checked() {
        let mut bytes = encode(&Message::Commit {
            commit_lsn: 1,
            end_lsn: 2,
            commit_time: 3,
        });
        bytes[0] = 9;
        assert_eq!(decode(&bytes), Err(ProtoError::Version { got: 9 }));
        assert_eq!(decode(&[]), Err(ProtoError::Empty));
    }

    #[test]
    fn frames() {
        let mut w = vec![b'w'];
        w.extend(16u64.to_be_bytes());
        w.extend(32u64.to_be_bytes());
        w.extend(5i64.to_be_bytes());
        w.extend(b"xyz");
        assert_eq!(
            parse_frame(&w).unwrap(),
            Frame::XLogData {
                start_lsn: 16,
                end_lsn: 32,
                send_time: 5,
                data: b"xyz"
            }
        );
        let mut k = vec![b'k'];
        k.extend(99u64.to_be_bytes());
        k.extend(7i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_frame(&k).unwrap(),
            Frame::Keepalive {
                end_lsn: 99,
                send_time: 7,
                reply_requested: true
            }
        );
        assert_eq!(
            parse_frame(&k[..10]),
            Err(ProtoError::Truncated("keepalive"))
        );
        assert_eq!(parse_frame(b"zz"), Err(ProtoError::UnknownFrame(b'z')));
        let r = status_update(1, 2, 3, 4, true);
        assert_eq!(r.len(), 34);
        assert_eq!(r[0], b'r');
        assert_eq!(&r[1..9], &1u64.to_be_bytes());
        assert_eq!(r[33], 1);
    }

    #[test]
    fn start_options() {
        let o = parse_start_options([
            ("proto_version", "1"),
            ("binary", "on"),
            ("forward_origins", "a, b"),
        ])
        .unwrap();
        assert_eq!(
            o,
            StartOptions {
                proto_version: 1,
                binary: true,
                forward_origins: vec!["a".into(), "b".into()]
            }
        );
        assert!(parse_start_options([("proto_version", "2")])
            .unwrap_err()
            .contains("not supported"));
        assert!(
            parse_start_options([("proto_version", "1"), ("publication_names", "x")])
                .unwrap_err()
                .contains("unknown option")
        );
        assert!(parse_start_options([("binary", "on")])
            .unwrap_err()
            .contains("required"));
        assert!(parse_start_options([("proto_version", "1"), ("binary", "maybe")]).is_err());
    }
}

//! Global sequences: the kinds, the bit layouts of snowflakeid and
//! timeshard values, the snowflakeid generator's decision (which never goes
//! backwards), galloc chunk arithmetic and KSUUID v2.
//!
//! Layouts, most significant bit first:
//! - snowflakeid: 42 bits of milliseconds since 2016-10-07 00:00 UTC, 10
//!   bits node sequence id, 12 bits counter (4096 values per millisecond
//!   and node). The top timestamp bit is the sign: values turn negative in
//!   2086 and run out in 2156.
//! - timeshard (BDR's legacy layout): 40 bits of milliseconds since the
//!   same epoch, 10 bits node, 14 bits taken from an ordinary sequence
//!   (16384 per millisecond, no protection against the counter wrapping);
//!   negative in 2033, out in 2050.

use serde::{Deserialize, Serialize};

/// 2016-10-07 00:00:00 UTC in milliseconds since the Unix epoch.
pub const EPOCH_MS: i64 = 1_475_798_400_000;
/// The most nodes a group can have had (active or parted): the node field
/// of both layouts is 10 bits.
pub const MAX_NODE_SEQ_ID: i64 = 1023;
const NODE_BITS: u32 = 10;
pub const SNOWFLAKE_COUNTER_BITS: u32 = 12;
pub const TIMESHARD_COUNTER_BITS: u32 = 14;
/// The snowflakeid counter value the generator never issues: an ordinary
/// `nextval` of the sequence (a path bdr cannot intercept, such as `COPY`)
/// yields values with it, so the two never meet.
pub const FALLBACK_COUNTER: i64 = (1 << SNOWFLAKE_COUNTER_BITS) - 1;
/// The increment of the sequence behind a snowflakeid sequence: one
/// millisecond of the layout, so that plain `nextval` keeps the node and
/// counter fields and only moves the timestamp.
pub const SNOWFLAKE_TICK: i64 = 1 << (SNOWFLAKE_COUNTER_BITS + NODE_BITS);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Local,
    Snowflakeid,
    Timeshard,
    Galloc,
}

/// The column or sequence type, as far as the kinds care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqType {
    Int2,
    Int4,
    Int8,
}

impl SeqType {
    pub fn from_name(n: &str) -> Option<SeqType> {
        match n {
            "smallint" | "int2" => Some(SeqType::Int2),
            "integer" | "int4" => Some(SeqType::Int4),
            "bigint" | "int8" => Some(SeqType::Int8),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SeqType::Int2 => "smallint",
            SeqType::Int4 => "integer",
            SeqType::Int8 => "bigint",
        }
    }
    /// The galloc chunk size BDR 4 uses for the type.
    pub fn chunk_size(self) -> i64 {
        match self {
            SeqType::Int2 => 1_000,
            SeqType::Int4 => 1_000_000,
            SeqType::Int8 => 1_000_000_000,
        }
    }
    pub fn max_value(self) -> i64 {
        match self {
            SeqType::Int2 => i16::MAX as i64,
            SeqType::Int4 => i32::MAX as i64,
            SeqType::Int8 => i64::MAX,
        }
    }
}

impl Kind {
    /// A kind as `bdr.alter_sequence_set_kind` and
    /// `bdr.default_sequence_kind` spell it; `distributed` picks by type.
    pub fn parse(s: &str, ty: SeqType) -> Result<Kind, String> {
        match s.to_ascii_lowercase().as_str() {
            "local" => Ok(Kind::Local),
            "snowflakeid" => Ok(Kind::Snowflakeid),
            "timeshard" => Ok(Kind::Timeshard),
            "galloc" => Ok(Kind::Galloc),
            "distributed" => Ok(if ty == SeqType::Int8 {
                Kind::Snowflakeid
            } else {
                Kind::Galloc
            }),
            other => Err(format!("unknown sequence kind \"{other}\"")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Snowflakeid => "snowflakeid",
            Kind::Timeshard => "timeshard",
            Kind::Galloc => "galloc",
        }
    }
    /// BDR 4's one-letter code in `bdr.sequence_kind`.
    pub fn code(self) -> &'static str {
        match self {
            Kind::Local => "l",
            Kind::Snowflakeid => "s",
            Kind::Timeshard => "t",
            Kind::Galloc => "g",
        }
    }
    pub fn from_code(c: &str) -> Option<Kind> {
        match c {
            "l" => Some(Kind::Local),
            "s" => Some(Kind::Snowflakeid),
            "t" => Some(Kind::Timeshard),
            "g" => Some(Kind::Galloc),
            _ => None,
        }
    }
    /// Whether a sequence of type `ty` can be of this kind: the 64-bit
    /// layouts need bigint.
    pub fn fits(self, ty: SeqType) -> Result<(), String> {
        match self {
            Kind::Snowflakeid | Kind::Timeshard if ty != SeqType::Int8 => Err(format!(
                "a {} sequence needs the bigint type, not {}",
                self.name(),
                ty.name()
            )),
            _ => Ok(()),
        }
    }
    /// Whether values come from bdr's generator rather than the sequence.
    pub fn generated(self) -> bool {
        matches!(self, Kind::Snowflakeid | Kind::Timeshard)
    }
}

/// Whether `seq_id` fits the node field of the layouts.
pub fn check_node_seq_id(seq_id: i64) -> Result<(), String> {
    if (1..=MAX_NODE_SEQ_ID).contains(&seq_id) {
        Ok(())
    } else {
        Err(format!(
            "node sequence id {seq_id} is outside 1..{MAX_NODE_SEQ_ID}, which the snowflakeid and timeshard layouts hold"
        ))
    }
}

/// Packs (milliseconds since the Unix epoch, node, counter) into a
/// layout of `counter_bits` and `ts_bits` (the node field is always 10).
fn compose(ms: i64, node: i64, counter: i64, counter_bits: u32, ts_bits: u32) -> i64 {
    let t = ((ms - EPOCH_MS) as u64) & ((1u64 << ts_bits) - 1);
    ((t << (NODE_BITS + counter_bits))
        | (((node as u64) & ((1 << NODE_BITS) - 1)) << counter_bits)
        | ((counter as u64) & ((1 << counter_bits) - 1))) as i64
}

fn parts(v: i64, counter_bits: u32) -> (i64, i64, i64) {
    let u = v as u64;
    let t = (u >> (NODE_BITS + counter_bits)) as i64;
    let node = ((u >> counter_bits) & ((1 << NODE_BITS) - 1)) as i64;
    let counter = (u & ((1 << counter_bits) - 1)) as i64;
    (t + EPOCH_MS, node, counter)
}

/// A snowflakeid of millisecond `ms` (since the Unix epoch), node and counter.
pub fn snowflake_compose(ms: i64, node: i64, counter: i64) -> i64 {
    compose(ms, node, counter, SNOWFLAKE_COUNTER_BITS, 42)
}

/// (milliseconds since the Unix epoch, node, counter) of a snowflakeid.
pub fn snowflake_parts(v: i64) -> (i64, i64, i64) {
    parts(v, SNOWFLAKE_COUNTER_BITS)
}

/// A timeshard value of millisecond `ms`, node and the low 14 bits of `local`.
pub fn timeshard_compose(ms: i64, node: i64, local: i64) -> i64 {
    compose(ms, node, local, TIMESHARD_COUNTER_BITS, 40)
}

/// (milliseconds since the Unix epoch, node, local part) of a timeshard value.
pub fn timeshard_parts(v: i64) -> (i64, i64, i64) {
    parts(v, TIMESHARD_COUNTER_BITS)
}

/// The generator's memory for one snowflakeid (or timeshard) sequence on
/// one node: the millisecond and counter it issued last, and the counter
/// value kept for plain `nextval` (the largest the layout holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generator {
    pub last_ms: i64,
    pub counter: i64,
    pub fallback: i64,
}

impl Default for Generator {
    fn default() -> Self {
        Generator {
            last_ms: 0,
            counter: 0,
            fallback: FALLBACK_COUNTER,
        }
    }
}

/// The timeshard counter value kept for plain `nextval`.
pub const TIMESHARD_FALLBACK_COUNTER: i64 = (1 << TIMESHARD_COUNTER_BITS) - 1;
/// The increment of the sequence behind a timeshard sequence.
pub const TIMESHARD_TICK: i64 = 1 << (TIMESHARD_COUNTER_BITS + NODE_BITS);

/// What the generator does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Issue the value of this millisecond and counter.
    Issue { ms: i64, counter: i64 },
    /// 4095 values have been issued in the current millisecond: sleep
    /// until the clock shows a later one.
    WaitNextMs,
}

impl Generator {
    /// Resumes after a restart: nothing below `floor_ms` is issued (the
    /// durable mark, which is ahead of every value issued before).
    pub fn resume(floor_ms: i64, fallback: i64) -> Generator {
        Generator {
            last_ms: floor_ms,
            counter: fallback - 1,
            fallback,
        }
    }

    /// The next value at clock `now_ms`. `waited`: the caller already
    /// waited for the clock once and it did not move past `last_ms` (it went
    /// backwards): the generator then moves on by itself, one millisecond
    /// ahead of what it issued, instead of waiting for the clock to catch up.
    pub fn next(&mut self, now_ms: i64, waited: bool) -> Step {
        if now_ms > self.last_ms {
            self.last_ms = now_ms;
            self.counter = 0;
        } else if self.counter + 1 < self.fallback {
            self.counter += 1;
        } else if now_ms == self.last_ms && !waited {
            return Step::WaitNextMs;
        } else {
            self.last_ms += 1;
            self.counter = 0;
        }
        Step::Issue {
            ms: self.last_ms,
            counter: self.counter,
        }
    }
}

/// How far ahead of the generator's clock its durable mark is written: a
/// restart resumes at most this far in the future, and the mark is
/// written about once per this many milliseconds.
pub const FLOOR_AHEAD_MS: i64 = 1000;

/// Whether issuing at `ms` needs a new durable mark first (the mark must be
/// ahead of every value issued), and the mark to write.
pub fn floor_to_write(ms: i64, durable_floor_ms: i64) -> Option<i64> {
    (ms >= durable_floor_ms).then_some(ms + FLOOR_AHEAD_MS)
}

/// One galloc chunk: the values `start..=end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub start: i64,
    pub end: i64,
}

impl Chunk {
    /// "start end", as a consensus answer carries it.
    pub fn encode(&self) -> String {
        format!("{} {}", self.start, self.end)
    }
    pub fn decode(s: &str) -> Option<Chunk> {
        let (a, b) = s.split_once(' ')?;
        Some(Chunk {
            start: a.parse().ok()?,
            end: b.parse().ok()?,
        })
    }
}

/// The group-wide allocation of one galloc sequence, as the consensus
/// state machine keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Allocation {
    pub chunk_size: i64,
    /// The last value handed to any node.
    pub allocated_up_to: i64,
    pub nallocs: i64,
    /// When the last chunk was allocated, by the proposer's clock.
    pub last_alloc_us: i64,
}

/// The next chunk of a sequence whose allocation is `a` (`None`: none
/// yet, chunks start at `start`), or why there is none.
pub fn next_chunk(
    a: Option<&Allocation>,
    start: i64,
    chunk_size: i64,
    max_value: i64,
) -> Result<Chunk, String> {
    if chunk_size <= 0 {
        return Err("the chunk size must be positive".into());
    }
    // A later conversion may pass a larger start (values handed out while
    // the sequence was local): chunks never start below it.
    let from = match a {
        Some(a) => a.allocated_up_to.saturating_add(1).max(start),
        None => start,
    };
    if from > max_value {
        return Err(format!(
            "the sequence's values up to {max_value} are all allocated"
        ));
    }
    let end = from.saturating_add(chunk_size - 1).min(max_value);
    Ok(Chunk { start: from, end })
}

/// When the node asks for its reserved chunk: once no reserved chunk is
/// held. When it moves from its current chunk to the reserved one: when
/// fewer than this share of the current one is left (the rest is given up,
/// so that plain `nextval`, which bdr cannot intercept, never hits the end).
pub fn should_switch(chunk: Chunk, next_value: i64) -> bool {
    let size = chunk.end - chunk.start + 1;
    let left = chunk.end - next_value + 1;
    left * 10 < size
}

/// A KSUUID v2: 8 bytes of microseconds since the Unix epoch, big-endian
/// (so that uuid order is time order), then 8 random bytes with the RFC
/// 4122 variant bits.
pub fn ksuuid_v2(unix_us: i64, random: [u8; 8]) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&(unix_us as u64).to_be_bytes());
    u[8..].copy_from_slice(&random);
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The microseconds since the Unix epoch of a KSUUID v2.
pub fn ksuuid_v2_unix_us(u: &[u8; 16]) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&u[..8]);
    u64::from_be_bytes(b) as i64
}

/// Orders KSUUID v2 values by time, then by their random part.
pub fn ksuuid_v2_cmp(a: &[u8; 16], b: &[u8; 16]) -> std::cmp::Ordering {
    ksuuid_v2_unix_us(a)
        .cmp(&ksuuid_v2_unix_us(b))
        .then_with(|| a[8..].cmp(&b[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snowflake_bits_round_trip() {
        let ms = EPOCH_MS + 321_123_456_789;
        let v = snowflake_compose(ms, 1023, 4094);
        assert_eq!(snowflake_parts(v), (ms, 1023, 4094));
        assert!(v > 0);
        let v = snowflake_compose(EPOCH_MS, 1, 0);
        assert_eq!(v, 1 << 12);
        assert_eq!(snowflake_parts(v), (EPOCH_MS, 1, 0));
        // 2^41 ms after the epoch the sign bit is reached (2086).
        let v = snowflake_compose(EPOCH_MS + (1 << 41), 1, 0);
        assert!(v < 0);
        assert_eq!(snowflake_parts(v).0, EPOCH_MS + (1 << 41));
    }

    #[test]
    fn snowflake_orders_by_time_then_node_then_counter() {
        let a = snowflake_compose(EPOCH_MS + 10, 5, 4000);
        let b = snowflake_compose(EPOCH_MS + 11, 1, 0);
        assert!(a < b);
        assert!(snowflake_compose(EPOCH_MS + 10, 5, 1) < snowflake_compose(EPOCH_MS + 10, 5, 2));
    }

    #[test]
    fn fallback_values_keep_node_and_counter() {
        let base = snowflake_compose(EPOCH_MS + 1000, 7, FALLBACK_COUNTER);
        let next = base + SNOWFLAKE_TICK;
        assert_eq!(
            snowflake_parts(next),
            (EPOCH_MS + 1001, 7, FALLBACK_COUNTER)
        );
    }

    #[test]
    fn timeshard_bits_round_trip() {
        let ms = EPOCH_MS + 123_456_789;
        let v = timeshard_compose(ms, 12, 16383);
        assert_eq!(timeshard_parts(v), (ms, 12, 16383));
        // The local part wraps (no protection, as BDR documents).
        assert_eq!(timeshard_parts(timeshard_compose(ms, 12, 16384)).2, 0);
    }

    #[test]
    fn generator_counts_within_a_millisecond_and_resets() {
        let mut g = Generator::default();
        assert_eq!(
            g.next(100, false),
            Step::Issue {
                ms: 100,
                counter: 0
            }
        );
        assert_eq!(
            g.next(100, false),
            Step::Issue {
                ms: 100,
                counter: 1
            }
        );
        assert_eq!(
            g.next(101, false),
            Step::Issue {
                ms: 101,
                counter: 0
            }
        );
    }

    #[test]
    fn generator_waits_when_the_counter_overflows() {
        let mut g = Generator::default();
        for c in 0..FALLBACK_COUNTER {
            assert_eq!(
                g.next(100, false),
                Step::Issue {
                    ms: 100,
                    counter: c
                }
            );
        }
        // 4095 issued (0..=4094); 4095 is the fallback's.
        assert_eq!(g.next(100, false), Step::WaitNextMs);
        assert_eq!(
            g.next(101, false),
            Step::Issue {
                ms: 101,
                counter: 0
            }
        );
    }

    #[test]
    fn generator_never_goes_backwards_with_the_clock() {
        let mut g = Generator::default();
        let mut last = snowflake_compose(500, 1, 0);
        assert_eq!(
            g.next(500, false),
            Step::Issue {
                ms: 500,
                counter: 0
            }
        );
        // The clock jumps back 200 ms: values go on increasing.
        for _ in 0..10_000 {
            let (ms, counter) = match g.next(300, true) {
                Step::Issue { ms, counter } => (ms, counter),
                Step::WaitNextMs => unreachable!(),
            };
            let v = snowflake_compose(ms, 1, counter);
            assert!(v > last);
            assert!(counter < FALLBACK_COUNTER);
            last = v;
        }
        assert!(g.last_ms > 500);
    }

    #[test]
    fn generator_resumes_above_its_durable_mark() {
        let mut g = Generator::resume(1000, FALLBACK_COUNTER);
        // The clock is behind the mark after a restart (the mark is ahead).
        match g.next(900, false) {
            Step::Issue { ms, .. } => assert!(ms >= 1000),
            Step::WaitNextMs => {}
        }
        let mut g = Generator::resume(1000, FALLBACK_COUNTER);
        assert_eq!(
            g.next(1500, false),
            Step::Issue {
                ms: 1500,
                counter: 0
            }
        );
    }

    #[test]
    fn durable_mark_stays_ahead() {
        assert_eq!(floor_to_write(100, 500), None);
        assert_eq!(floor_to_write(500, 500), Some(500 + FLOOR_AHEAD_MS));
        assert_eq!(floor_to_write(700, 500), Some(700 + FLOOR_AHEAD_MS));
    }

    #[test]
    fn kinds_fit_types() {
        assert_eq!(
            Kind::parse("distributed", SeqType::Int8),
            Ok(Kind::Snowflakeid)
        );
        assert_eq!(Kind::parse("distributed", SeqType::Int4), Ok(Kind::Galloc));
        assert_eq!(Kind::parse("GALLOC", SeqType::Int2), Ok(Kind::Galloc));
        assert!(Kind::parse("nope", SeqType::Int2).is_err());
        assert!(Kind::Snowflakeid.fits(SeqType::Int4).is_err());
        assert!(Kind::Timeshard.fits(SeqType::Int2).is_err());
        assert!(Kind::Galloc.fits(SeqType::Int2).is_ok());
        for k in [
            Kind::Local,
            Kind::Snowflakeid,
            Kind::Timeshard,
            Kind::Galloc,
        ] {
            assert_eq!(Kind::from_code(k.code()), Some(k));
        }
    }

    #[test]
    fn node_ids_fit_the_layout() {
        assert!(check_node_seq_id(1).is_ok());
        assert!(check_node_seq_id(1023).is_ok());
        assert!(check_node_seq_id(1024).is_err());
        assert!(check_node_seq_id(0).is_err());
    }

    #[test]
    fn galloc_chunks_follow_each_other_and_end_at_the_type() {
        let c = next_chunk(None, 1, 1000, i16::MAX as i64).unwrap();
        assert_eq!(
            c,
            Chunk {
                start: 1,
                end: 1000
            }
        );
        let a = Allocation {
            chunk_size: 1000,
            allocated_up_to: 32000,
            nallocs: 32,
            last_alloc_us: 0,
        };
        let c = next_chunk(Some(&a), 1, 1000, i16::MAX as i64).unwrap();
        assert_eq!(
            c,
            Chunk {
                start: 32001,
                end: 32767
            }
        );
        let a = Allocation {
            allocated_up_to: 32767,
            ..a
        };
        assert!(next_chunk(Some(&a), 1, 1000, i16::MAX as i64).is_err());
        assert!(next_chunk(None, 5, 0, 100).is_err());
        // A new start above what was allocated moves the next chunk up.
        let a = Allocation {
            chunk_size: 1000,
            allocated_up_to: 2000,
            nallocs: 2,
            last_alloc_us: 0,
        };
        assert_eq!(
            next_chunk(Some(&a), 5000, 1000, 100_000).unwrap(),
            Chunk {
                start: 5000,
                end: 5999
            }
        );
        assert_eq!(
            next_chunk(Some(&a), 1, 1000, 100_000).unwrap(),
            Chunk {
                start: 2001,
                end: 3000
            }
        );
    }

    #[test]
    fn switch_before_the_end() {
        let c = Chunk {
            start: 1,
            end: 1000,
        };
        assert!(!should_switch(c, 1));
        assert!(!should_switch(c, 900));
        assert!(should_switch(c, 902));
        assert!(should_switch(c, 1001));
    }

    #[test]
    fn ksuuid_orders_by_time() {
        let a = ksuuid_v2(1_000_000, [0xff; 8]);
        let b = ksuuid_v2(1_000_001, [0; 8]);
        assert_eq!(ksuuid_v2_cmp(&a, &b), std::cmp::Ordering::Less);
        assert!(a < b);
        assert_eq!(ksuuid_v2_unix_us(&a), 1_000_000);
        assert_eq!(a[8] & 0xc0, 0x80);
    }
}

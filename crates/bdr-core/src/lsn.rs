//! Log sequence numbers as PostgreSQL prints them, and the bookkeeping that
//! lets a receiver report a remote position as flushed only once the local
//! transaction that applied it is durable.

use std::collections::VecDeque;

pub fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

pub fn parse(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
        return None;
    }
    Some(hi << 32 | lo)
}

/// Applied remote transactions whose local commit may not be flushed yet.
#[derive(Debug, Default)]
pub struct FlushTracker {
    /// (remote end LSN, local commit end LSN), in apply order.
    pending: VecDeque<(u64, u64)>,
    flushed: u64,
}

impl FlushTracker {
    pub fn applied(&mut self, remote_end: u64, local_end: u64) {
        self.pending.push_back((remote_end, local_end));
    }

    /// Given how far the local WAL is flushed, the remote position that is
    /// now safe to confirm to the peer.
    pub fn flushed_up_to(&mut self, local_flush: u64) -> u64 {
        while let Some(&(remote, local)) = self.pending.front() {
            if local > local_flush {
                break;
            }
            self.flushed = self.flushed.max(remote);
            self.pending.pop_front();
        }
        self.flushed
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Everything sent was applied and flushed: positions up to `lsn`
    /// (e.g. a keepalive's) need nothing more from us.
    pub fn idle_at(&mut self, lsn: u64) {
        if self.pending.is_empty() {
            self.flushed = self.flushed.max(lsn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_parse_round_trip() {
        for v in [0u64, 1, 0x1_0000_0000, 0x16_B374_D848, u64::MAX] {
            assert_eq!(parse(&format(v)), Some(v));
        }
        assert_eq!(format(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse("0/0"), Some(0));
        assert_eq!(parse("x/0"), None);
        assert_eq!(parse("10"), None);
        assert_eq!(parse("100000000/0"), None);
    }

    #[test]
    fn flush_waits_for_local_durability_in_order() {
        let mut t = FlushTracker::default();
        t.applied(100, 1000);
        t.applied(200, 2000);
        assert_eq!(t.flushed_up_to(999), 0);
        assert_eq!(t.flushed_up_to(1500), 100);
        assert!(t.has_pending());
        t.idle_at(5000);
        assert_eq!(
            t.flushed_up_to(1500),
            100,
            "idle must not skip pending work"
        );
        assert_eq!(t.flushed_up_to(2000), 200);
        t.idle_at(300);
        assert_eq!(t.flushed_up_to(2000), 300);
    }
}

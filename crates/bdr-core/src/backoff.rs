//! Launch rate limiting for background workers: exponential backoff with
//! jitter between `bdr.min_worker_backoff_delay` and `bdr.max_worker_backoff_delay`.

/// The delay before the next launch after `failures` consecutive failures.
///
/// The first failure waits `min`; each further one doubles it, up to `max`.
/// `jitter` in `[0, 1)` adds up to half the delay again (capped at `max`), so
/// that workers that failed together do not all retry in the same instant.
pub fn delay_ms(failures: u32, min: u64, max: u64, jitter: f64) -> u64 {
    if failures == 0 {
        return 0;
    }
    let max = max.max(min);
    let exp = failures.saturating_sub(1).min(40);
    let base = min.saturating_mul(1u64 << exp).min(max);
    let jitter = jitter.clamp(0.0, 0.999_999);
    let extra = ((base as f64) * 0.5 * jitter) as u64;
    base.saturating_add(extra).min(max)
}

/// A small, seedable xorshift generator: the jitter needs no cryptographic
/// quality, and this keeps the module free of dependencies.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// A value in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        assert_eq!(delay_ms(0, 1000, 60_000, 0.0), 0);
        assert_eq!(delay_ms(1, 1000, 60_000, 0.0), 1000);
        assert_eq!(delay_ms(2, 1000, 60_000, 0.0), 2000);
        assert_eq!(delay_ms(3, 1000, 60_000, 0.0), 4000);
        assert_eq!(delay_ms(10, 1000, 60_000, 0.0), 60_000);
        assert_eq!(delay_ms(1000, 1000, 60_000, 0.9), 60_000);
    }

    #[test]
    fn jitter_bounds() {
        let mut j = Jitter::new(42);
        for _ in 0..1000 {
            let v = j.next_f64();
            assert!((0.0..1.0).contains(&v));
            let d = delay_ms(2, 1000, 60_000, v);
            assert!((2000..3000).contains(&d), "{d}");
        }
    }

    #[test]
    fn min_above_max_uses_min() {
        assert_eq!(delay_ms(5, 5000, 1000, 0.0), 5000);
    }
}

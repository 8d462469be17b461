//! The bdr version, in the forms BDR 4 exposes.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// MAJOR*10000 + MINOR*100 + PATCH, as `bdr.bdr_version_num()` returns.
pub const VERSION_NUM: i32 = version_num(VERSION);

/// Version of the replication protocol this build speaks.
pub const PROTOCOL_VERSION: i32 = 1;

const fn parse_part(bytes: &[u8], mut i: usize) -> (i32, usize) {
    let mut n = 0i32;
    while i < bytes.len() && bytes[i] >= b'0' && bytes[i] <= b'9' {
        n = n * 10 + (bytes[i] - b'0') as i32;
        i += 1;
    }
    // skip the separator
    if i < bytes.len() {
        i += 1;
    }
    (n, i)
}

pub const fn version_num(v: &str) -> i32 {
    let bytes = v.as_bytes();
    let (major, i) = parse_part(bytes, 0);
    let (minor, i) = parse_part(bytes, i);
    let (patch, _) = parse_part(bytes, i);
    major * 10000 + minor * 100 + patch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num() {
        assert_eq!(version_num("4.0.0"), 40000);
        assert_eq!(version_num("3.6.18"), 30618);
        assert_eq!(version_num("12.3.4"), 120304);
        assert_eq!(VERSION_NUM, version_num(VERSION));
    }
}

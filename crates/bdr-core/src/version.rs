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

/// Whether a node can join a group through a target running PostgreSQL
/// `target_pg` (server_version_num) and bdr `target_bdr` (bdr_version_num):
/// the same PostgreSQL major version and the same bdr major version (which
/// fixes the replication protocol). The error says what differs.
pub fn join_compatible(
    local_pg: u32,
    target_pg: u32,
    local_bdr: i32,
    target_bdr: i32,
) -> Result<(), String> {
    if local_pg / 10000 != target_pg / 10000 {
        return Err(format!(
            "the join target runs PostgreSQL {}; this node runs PostgreSQL {}",
            target_pg / 10000,
            local_pg / 10000
        ));
    }
    if local_bdr / 10000 != target_bdr / 10000 {
        return Err(format!(
            "the join target runs bdr version number {target_bdr} (protocol of bdr {}); this node runs {local_bdr}",
            target_bdr / 10000
        ));
    }
    Ok(())
}

#[cfg(test)]
mod join_tests {
    use super::join_compatible;

    #[test]
    fn same_majors_join_and_others_are_refused_with_the_reason() {
        assert!(join_compatible(150020, 150018, 40000, 40102).is_ok());
        let e = join_compatible(150020, 160004, 40000, 40000).unwrap_err();
        assert!(
            e.contains("PostgreSQL 16") && e.contains("PostgreSQL 15"),
            "{e}"
        );
        let e = join_compatible(150020, 150020, 40000, 50000).unwrap_err();
        assert!(e.contains("50000"), "{e}");
        // An unreadable version (0) never matches.
        assert!(join_compatible(150020, 0, 40000, 40000).is_err());
    }
}

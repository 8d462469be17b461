//! Names of the slots, origins and subscriptions bdr creates.
//!
//! Slot names may only hold lowercase letters, digits and underscores and at
//! most 63 bytes, so other characters become `_` and a name that had to change
//! or be shortened gets a hash of the full name appended, which keeps distinct
//! inputs distinct.

use crate::node::fnv1a32;

const MAX: usize = 63;

fn sanitize(s: &str) -> (String, bool) {
    let mut changed = false;
    let out = s
        .chars()
        .map(|c| {
            let l = c.to_ascii_lowercase();
            if l.is_ascii_lowercase() || l.is_ascii_digit() || l == '_' {
                if l != c {
                    changed = true;
                }
                l
            } else {
                changed = true;
                '_'
            }
        })
        .collect();
    (out, changed)
}

fn build(parts: &[&str]) -> String {
    let full = parts.join("_");
    let sanitized: Vec<(String, bool)> = parts.iter().map(|p| sanitize(p)).collect();
    let changed = sanitized.iter().any(|(_, c)| *c);
    let plain = sanitized
        .iter()
        .map(|(s, _)| s.as_str())
        .collect::<Vec<_>>()
        .join("_");
    if !changed && plain.len() <= MAX {
        return plain;
    }
    // Shorten every part but the "bdr" prefix evenly, then add the hash.
    let hash = format!("{:08x}", fnv1a32(full.as_bytes()));
    let budget = MAX - hash.len() - 1;
    let mut out = String::new();
    let n = parts.len();
    let per = (budget - (n - 1)) / n;
    for (i, (s, _)) in sanitized.iter().enumerate() {
        if i > 0 {
            out.push('_');
        }
        out.push_str(&s[..s.len().min(per.max(1))]);
    }
    out.truncate(budget);
    out.push('_');
    out.push_str(&hash);
    out
}

/// Slot on a provider for subscriber `target`: `bdr_<db>_<group>_<target>`.
pub fn slot_name(db: &str, group: &str, target: &str) -> String {
    build(&["bdr", db, group, target])
}

/// Replication origin on a subscriber for provider `origin`: `bdr_<db>_<group>_<origin>`.
pub fn origin_name(db: &str, group: &str, origin: &str) -> String {
    build(&["bdr", db, group, origin])
}

/// Subscription name: `bdr_<db>_<group>_<origin>_<target>`.
pub fn subscription_name(db: &str, group: &str, origin: &str, target: &str) -> String {
    build(&["bdr", db, group, origin, target])
}

/// The group slot: `bdr_<db>_<group>`.
pub fn group_slot_name(db: &str, group: &str) -> String {
    build(&["bdr", db, group])
}

pub fn is_valid_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names() {
        assert_eq!(slot_name("app", "g", "b"), "bdr_app_g_b");
        assert_eq!(origin_name("app", "g", "a"), "bdr_app_g_a");
        assert_eq!(subscription_name("app", "g", "a", "b"), "bdr_app_g_a_b");
        assert_eq!(group_slot_name("app", "g"), "bdr_app_g");
    }

    #[test]
    fn sanitized_and_hashed() {
        let a = slot_name("app", "g", "node-1");
        let b = slot_name("app", "g", "node_1");
        assert_ne!(a, b);
        assert!(is_valid_slot_name(&a), "{a}");
        assert_eq!(b, "bdr_app_g_node_1");
        let long = slot_name(&"d".repeat(40), &"g".repeat(40), &"n".repeat(40));
        assert!(long.len() <= 63 && is_valid_slot_name(&long), "{long}");
        let long2 = slot_name(
            &"d".repeat(40),
            &"g".repeat(40),
            &format!("{}x", "n".repeat(40)),
        );
        assert_ne!(long, long2);
        let weird = slot_name("My DB", "g", "a");
        assert!(is_valid_slot_name(&weird), "{weird}");
    }
}

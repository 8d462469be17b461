//! Parsing and rewriting libpq connection strings (DSNs), both the
//! `key=value` form and the `postgresql://` URI form.
//!
//! bdr checks a DSN when a node is created (so that a typo is caught before a
//! peer tries to use it) and rewrites it to add options such as
//! `replication=database` when it connects.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DsnError {
    #[error("connection string is empty")]
    Empty,
    #[error("missing \"=\" after \"{0}\" in connection string")]
    MissingEquals(String),
    #[error("unterminated quoted string in connection string")]
    UnterminatedQuote,
    #[error("invalid connection option \"{0}\"")]
    UnknownKeyword(String),
    #[error("invalid URI in connection string: {0}")]
    BadUri(String),
}

/// Every keyword PostgreSQL 15's libpq accepts.
pub const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "sslmode",
    "requiressl",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "service",
    "target_session_attrs",
];

/// A parsed connection string: its options in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    pub options: Vec<(String, String)>,
}

impl Dsn {
    pub fn parse(s: &str) -> Result<Dsn, DsnError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(DsnError::Empty);
        }
        let options = if t.starts_with("postgresql://") || t.starts_with("postgres://") {
            parse_uri(t)?
        } else {
            parse_kv(t)?
        };
        for (k, _) in &options {
            if !KEYWORDS.contains(&k.as_str()) {
                return Err(DsnError::UnknownKeyword(k.clone()));
            }
        }
        Ok(Dsn { options })
    }

    /// The last value given for `key`, as libpq would use it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key`, replacing any earlier value.
    pub fn set(&mut self, key: &str, value: &str) {
        self.options.retain(|(k, _)| k != key);
        self.options.push((key.to_string(), value.to_string()));
    }

    /// Renders in `key=value` form, quoting where libpq needs it.
    pub fn to_conninfo(&self) -> String {
        self.options
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn quote(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn parse_kv(s: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(DsnError::MissingEquals(key));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(e) => value.push(e),
                        None => return Err(DsnError::UnterminatedQuote),
                    },
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(DsnError::UnterminatedQuote);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(e) = chars.next() {
                        value.push(e);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, DsnError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| DsnError::BadUri(format!("bad percent-encoding in \"{s}\"")))?;
            let b = u8::from_str_radix(hex, 16)
                .map_err(|_| DsnError::BadUri(format!("bad percent-encoding in \"{s}\"")))?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DsnError::BadUri("not UTF-8 after percent-decoding".into()))
}

fn parse_uri(s: &str) -> Result<Vec<(String, String)>, DsnError> {
    let rest = s.split_once("://").map(|(_, r)| r).unwrap_or("");
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    let mut out = Vec::new();
    let hostpart = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".into(), percent_decode(user)?));
            }
            if let Some(p) = password {
                out.push(("password".into(), percent_decode(p)?));
            }
            host
        }
        None => authority,
    };
    if !hostpart.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for hp in hostpart.split(',') {
            let (h, p) = if let Some(stripped) = hp.strip_prefix('[') {
                let (h, after) = stripped.split_once(']').ok_or_else(|| {
                    DsnError::BadUri(format!("unterminated IPv6 address in \"{hp}\""))
                })?;
                (h.to_string(), after.strip_prefix(':').map(str::to_string))
            } else {
                match hp.split_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p.to_string())),
                    None => (hp.to_string(), None),
                }
            };
            if let Some(p) = &p {
                if p.parse::<u16>().is_err() {
                    return Err(DsnError::BadUri(format!("invalid port \"{p}\"")));
                }
            }
            hosts.push(percent_decode(&h)?);
            ports.push(p.unwrap_or_default());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path {
        if !db.is_empty() {
            out.push(("dbname".into(), percent_decode(db)?));
        }
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| DsnError::BadUri(format!("missing \"=\" in \"{pair}\"")))?;
            let k = percent_decode(k)?;
            // libpq accepts ssl=true as an alias in URIs.
            if k == "ssl" && v == "true" {
                out.push(("sslmode".into(), "require".into()));
            } else {
                out.push((k, percent_decode(v)?));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value() {
        let d = Dsn::parse("host=localhost port=5432 dbname='my db' password='it\\'s'").unwrap();
        assert_eq!(d.get("host"), Some("localhost"));
        assert_eq!(d.get("port"), Some("5432"));
        assert_eq!(d.get("dbname"), Some("my db"));
        assert_eq!(d.get("password"), Some("it's"));
        let round = Dsn::parse(&d.to_conninfo()).unwrap();
        assert_eq!(round, d);
    }

    #[test]
    fn spaces_around_equals() {
        let d = Dsn::parse("host = a  dbname= b").unwrap();
        assert_eq!(d.get("host"), Some("a"));
        assert_eq!(d.get("dbname"), Some("b"));
    }

    #[test]
    fn uri() {
        let d =
            Dsn::parse("postgresql://u:p%40ss@h1:5433,h2/app?sslmode=disable&application_name=x")
                .unwrap();
        assert_eq!(d.get("user"), Some("u"));
        assert_eq!(d.get("password"), Some("p@ss"));
        assert_eq!(d.get("host"), Some("h1,h2"));
        assert_eq!(d.get("port"), Some("5433,"));
        assert_eq!(d.get("dbname"), Some("app"));
        assert_eq!(d.get("sslmode"), Some("disable"));
        let d = Dsn::parse("postgres://[::1]:5000/db").unwrap();
        assert_eq!(d.get("host"), Some("::1"));
        assert_eq!(d.get("port"), Some("5000"));
    }

    #[test]
    fn errors() {
        assert_eq!(Dsn::parse("  "), Err(DsnError::Empty));
        assert_eq!(
            Dsn::parse("host"),
            Err(DsnError::MissingEquals("host".into()))
        );
        assert_eq!(Dsn::parse("host='abc"), Err(DsnError::UnterminatedQuote));
        assert_eq!(
            Dsn::parse("hots=abc"),
            Err(DsnError::UnknownKeyword("hots".into()))
        );
        assert!(matches!(
            Dsn::parse("postgresql://h:notaport/db"),
            Err(DsnError::BadUri(_))
        ));
        assert!(matches!(
            Dsn::parse("this is not a dsn"),
            Err(DsnError::MissingEquals(_))
        ));
    }

    #[test]
    fn set_replaces() {
        let mut d = Dsn::parse("host=a dbname=x replication=false").unwrap();
        d.set("replication", "database");
        assert_eq!(d.get("replication"), Some("database"));
        assert_eq!(
            d.options.iter().filter(|(k, _)| k == "replication").count(),
            1
        );
        assert_eq!(d.to_conninfo(), "host=a dbname=x replication=database");
        d.set("application_name", "");
        assert!(d.to_conninfo().ends_with("application_name=''"));
    }
}

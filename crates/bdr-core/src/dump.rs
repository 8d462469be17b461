//! Making pg_dump's schema script fit to run inside the join's transaction.

/// pg_dump's script made fit to run in this transaction: settings only for
/// the transaction, no psql meta-commands, no tombstone triggers (bdr's
/// event trigger adds them), not the bdr extension (it is here). Only lines
/// outside dollar-quoted bodies are touched.
pub fn schema_script(dump: &str) -> String {
    let mut out = String::with_capacity(dump.len());
    let mut quote: Option<String> = None;
    for line in dump.lines() {
        if quote.is_none() {
            if line.starts_with('\\')
                || line.starts_with("CREATE TRIGGER bdr_tombstone ")
                || line.starts_with("CREATE TRIGGER bdr_tombstone_key ")
                || line.starts_with("CREATE EXTENSION IF NOT EXISTS bdr ")
                || line.starts_with("COMMENT ON EXTENSION bdr ")
            {
                continue;
            }
            if let Some(rest) = line.strip_prefix("SET ") {
                out.push_str("SET LOCAL ");
                out.push_str(rest);
                out.push('\n');
                continue;
            }
            if line.starts_with("SELECT pg_catalog.set_config(") {
                out.push_str(&line.replace(", false);", ", true);"));
                out.push('\n');
                continue;
            }
        }
        track_dollar_quotes(line, &mut quote);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Follows `$tag$ ... $tag$` quoting through a line of SQL.
fn track_dollar_quotes(line: &str, quote: &mut Option<String>) {
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let mut j = i + 1;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            let tag_ok = j < b.len() && b[j] == b'$' && !(j > i + 1 && b[i + 1].is_ascii_digit());
            if tag_ok {
                let tag = &line[i..=j];
                match quote {
                    Some(q) if q == tag => *quote = None,
                    None => *quote = Some(tag.to_string()),
                    _ => {}
                }
                i = j + 1;
                continue;
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::schema_script;

    #[test]
    fn settings_become_local_and_bdr_objects_go() {
        let dump = "\\restrict abc\nSET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\nCREATE EXTENSION IF NOT EXISTS bdr WITH SCHEMA bdr;\nCOMMENT ON EXTENSION bdr IS 'x';\nCREATE TABLE public.t (id integer);\nCREATE TRIGGER bdr_tombstone AFTER DELETE ON public.t FOR EACH ROW EXECUTE FUNCTION bdr._tombstone_trigger();\nCREATE TRIGGER bdr_tombstone_key BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION bdr._key_change_trigger();\n\\unrestrict abc\n";
        let out = schema_script(dump);
        assert_eq!(
            out,
            "SET LOCAL statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', true);\nCREATE TABLE public.t (id integer);\n"
        );
    }

    #[test]
    fn function_bodies_are_left_alone() {
        let dump = "CREATE FUNCTION public.f() RETURNS void\n    LANGUAGE sql\n    AS $_$\nSET work_mem = '1MB';\n\\x\n$_$;\nCREATE FUNCTION public.g(a int) RETURNS int LANGUAGE sql AS $$ SELECT $1 $$;\nSET x = 1;\n";
        let out = schema_script(dump);
        assert!(out.contains("\nSET work_mem = '1MB';\n"), "{out}");
        assert!(out.contains("\n\\x\n"), "{out}");
        assert!(out.ends_with("SET LOCAL x = 1;\n"), "{out}");
    }
}

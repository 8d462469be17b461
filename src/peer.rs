//! Calls to another node of the group: every statement join and part send a
//! peer, each a typed function. walrcv_exec takes no parameters, so values
//! are quoted here, by `bdr_core::quote`, and nowhere else; callers pass
//! values, never SQL.

use crate::error::{BdrError, BdrResult};
use crate::walrcv::{Conn, PeerError, Received};
use bdr_core::lsn;
use bdr_core::node::NodeState;
use bdr_core::quote::{self, ident, literal};

type Rows = Vec<Vec<Option<String>>>;

/// An open connection to a named peer; errors name the peer and the step.
pub struct Peer {
    pub name: String,
    conn: Conn,
}

/// What a peer says of itself: its node, its group and its versions.
pub struct Identity {
    pub node_name: String,
    pub group_id: u32,
    pub group_name: String,
    pub group_uuid: String,
    pub bdr_version_num: i32,
    pub pg_version_num: u32,
}

/// A node as a peer's `bdr.node` records it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: u32,
    pub name: String,
    pub dsn: String,
    pub dbname: String,
    pub state: NodeState,
    /// The node's sequence id (the node field of snowflakeid values).
    pub seq_id: i32,
}

/// A global sequence as a peer records it.
pub struct GlobalSeq {
    pub name: String,
    pub kind: String,
    pub start: Option<i64>,
    pub alloc_key: Option<String>,
}

/// A table whose rows replicate, with its replicated columns.
pub struct Table {
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
}

impl Table {
    pub fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How a slot created on a peer treats its snapshot.
#[derive(Clone, Copy)]
pub enum SlotSnapshot {
    /// The snapshot is not needed.
    Nothing,
    /// The snapshot becomes this connection's transaction snapshot (inside
    /// a REPEATABLE READ transaction begun by `begin_snapshot_copy`).
    Use,
}

/// A change the parted node made, as a member holds it, for the others to
/// catch up.
pub struct PartedChange {
    /// The table, as a qualified name.
    pub table: String,
    /// The row as jsonb text, or the key hash of a delete.
    pub value: String,
    /// The parted node's commit time, as timestamptz text.
    pub commit_time: String,
    pub deleted: bool,
}

fn text(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn parse_oid(s: &Option<String>) -> u32 {
    s.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn first_text(rows: Rows) -> Option<String> {
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
}

/// Which of a peer's tables replicate, as a condition on `pg_class c` and
/// `pg_namespace n` (`bdr._replicated_table` is the same rule).
const REPLICATED_TABLE: &str = "bdr._replicated_table(c.oid)";

impl Peer {
    /// Connects to `name` (for messages: "the join target", a node name) at
    /// `dsn`, as application `appname`.
    pub fn connect(name: &str, dsn: &str, appname: &str) -> BdrResult<Peer> {
        let conn = Conn::connect(dsn, appname).map_err(|msg| BdrError::PeerUnreachable {
            what: if name.starts_with("the ") {
                name.to_string()
            } else {
                format!("node \"{name}\"")
            },
            dsn: dsn.to_string(),
            msg,
        })?;
        Ok(Peer {
            name: name.to_string(),
            conn,
        })
    }

    /// Names the peer in later errors (once its node name is known).
    pub fn rename(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn failed(&self, what: &str, msg: PeerError) -> BdrError {
        BdrError::PeerCommand {
            what: what.to_string(),
            node: self.name.clone(),
            msg,
        }
    }

    fn query(&self, what: &str, sql: &str, ncols: usize) -> BdrResult<Rows> {
        self.conn
            .query(sql, ncols)
            .map_err(|e| self.failed(what, e))
    }

    fn command(&self, what: &str, sql: &str) -> BdrResult<()> {
        self.conn.command(sql).map_err(|e| self.failed(what, e))
    }

    /// Runs a SELECT of one column for its effect.
    fn call(&self, what: &str, sql: &str) -> BdrResult<()> {
        self.query(what, sql, 1).map(|_| ())
    }

    fn lsn_of(&self, what: &str, sql: &str) -> BdrResult<Option<u64>> {
        Ok(first_text(self.query(what, sql, 1)?).and_then(|l| lsn::parse(&l)))
    }

    /// Fails at once if the peer went away.
    pub fn ping(&self) -> BdrResult<()> {
        self.call("checking the connection", "SELECT 1")
    }

    /// The peer's local node and its group; `None` when it has no local node.
    pub fn identity(&self) -> BdrResult<Option<Identity>> {
        let rows = self
            .query(
                "reading the group",
                "SELECT n.node_name::text, g.node_group_id::text, g.node_group_name::text,
                        g.node_group_uuid::text, bdr.bdr_version_num()::text,
                        current_setting('server_version_num')
                   FROM bdr.local_node l JOIN bdr.node n USING (node_id)
                   LEFT JOIN bdr.node_group g ON g.node_group_id = n.node_group_id",
                6,
            )
            .map_err(|e| match e {
                BdrError::PeerCommand { msg, .. } if msg.to_string().contains("bdr.") => {
                    BdrError::JoinRefused {
                        msg: format!("the join target is not a BDR node: {msg}"),
                        hint: "Point join_target_dsn at a node of the group you want to join."
                            .into(),
                    }
                }
                e => e,
            })?;
        Ok(rows.first().map(|t| Identity {
            node_name: text(&t[0]),
            group_id: parse_oid(&t[1]),
            group_name: text(&t[2]),
            group_uuid: text(&t[3]),
            bdr_version_num: text(&t[4]).parse().unwrap_or(0),
            pg_version_num: text(&t[5]).parse().unwrap_or(0),
        }))
    }

    /// The nodes of group `group_id` the peer knows, by id.
    pub fn members(&self, group_id: u32) -> BdrResult<Vec<Member>> {
        let sql = format!(
            "SELECT node_id::text, node_name::text, node_dsn, dbname::text, node_state::text, seq_id::text
               FROM bdr.node WHERE node_group_id = {group_id} ORDER BY node_id"
        );
        Ok(self
            .query("reading the members", &sql, 6)?
            .iter()
            .map(|r| Member {
                id: parse_oid(&r[0]),
                name: text(&r[1]),
                dsn: text(&r[2]),
                dbname: text(&r[3]),
                state: NodeState::from_oid(parse_oid(&r[4])).unwrap_or(NodeState::None),
                seq_id: text(&r[5]).parse().unwrap_or(0),
            })
            .collect())
    }

    /// The peer's global sequences: (qualified name, kind code, galloc
    /// start, galloc key in the consensus state).
    pub fn global_sequences(&self) -> BdrResult<Vec<GlobalSeq>> {
        let sql =
            "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname),
                          k.seqkind::text, k.start_value::text, k.alloc_key
                     FROM bdr.sequence_kind k
                     JOIN pg_catalog.pg_class c ON c.oid = k.seqid
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                    WHERE k.seqkind <> 'l'";
        Ok(self
            .query("reading the global sequences", sql, 4)?
            .iter()
            .map(|r| GlobalSeq {
                name: text(&r[0]),
                kind: text(&r[1]),
                start: r[2].as_deref().and_then(|v| v.parse().ok()),
                alloc_key: r[3].clone(),
            })
            .collect())
    }

    /// The peer's tables that replicate, with their replicated columns
    /// (not dropped, not generated).
    pub fn replicated_tables(&self) -> BdrResult<Vec<Table>> {
        let sql = format!(
            "SELECT n.nspname::text, c.relname::text,
                    array_to_string(array_agg(quote_ident(a.attname) ORDER BY a.attnum), ',')
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
                    AND NOT a.attisdropped AND a.attgenerated = ''
              WHERE {REPLICATED_TABLE}
              GROUP BY 1, 2 ORDER BY 1, 2"
        );
        Ok(self
            .query("listing tables", &sql, 3)?
            .iter()
            .map(|r| Table {
                schema: text(&r[0]),
                name: text(&r[1]),
                // quote_ident output, split back; names with commas are quoted.
                columns: quote::split_ident_list(&text(&r[2])),
            })
            .collect())
    }

    /// A slot's confirmed position; `None` when the slot does not exist.
    pub fn slot_confirmed(&self, slot: &str) -> BdrResult<Option<u64>> {
        let rows = self.query(
            "looking up a slot",
            &format!(
                "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                literal(slot)
            ),
            1,
        )?;
        Ok(rows
            .first()
            .map(|r| r[0].as_deref().and_then(lsn::parse).unwrap_or(0)))
    }

    /// Creates a logical slot of the `bdr` plugin; returns its consistent point.
    pub fn create_slot(&self, slot: &str, snapshot: SlotSnapshot) -> BdrResult<u64> {
        let mode = match snapshot {
            SlotSnapshot::Nothing => "nothing",
            SlotSnapshot::Use => "use",
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL bdr (SNAPSHOT '{mode}')",
            ident(slot)
        );
        self.query("creating a slot", &sql, 4)?
            .first()
            .and_then(|r| r[1].as_deref())
            .and_then(lsn::parse)
            .ok_or_else(|| {
                self.failed(
                    "creating a slot",
                    PeerError::Answer("no consistent point returned".into()),
                )
            })
    }

    pub fn drop_slot(&self, slot: &str) -> BdrResult<()> {
        self.command(
            "dropping an unfinished slot",
            &format!("DROP_REPLICATION_SLOT {}", ident(slot)),
        )
    }

    /// Records the joining node `me` in the peer's group `group_id`.
    pub fn register_node(&self, me: &Member, group_id: u32) -> BdrResult<()> {
        self.call(
            "registering the joining node",
            &format!(
                "SELECT bdr._join_register({}, {}, {}, {}, {}, {})::text",
                me.id,
                literal(&me.name),
                literal(&me.dsn),
                literal(&me.dbname),
                group_id,
                me.seq_id
            ),
        )
    }

    /// Records `state` as node `node_id`'s state on the peer.
    pub fn set_node_state(&self, node_id: u32, state: NodeState) -> BdrResult<()> {
        self.call(
            "recording the node's state",
            &format!(
                "SELECT bdr._set_node_state({node_id}, {})::text",
                state.oid()
            ),
        )
    }

    /// Marks the joined node `node_id` active on the peer.
    pub fn activate_node(&self, node_id: u32) -> BdrResult<()> {
        self.call(
            "activating the joining node",
            &format!("SELECT bdr._join_activate({node_id})::text"),
        )
    }

    /// How far the peer has applied the stream of replication origin
    /// `origin` (0 when it has not).
    pub fn origin_progress(&self, origin: &str) -> BdrResult<u64> {
        Ok(self
            .lsn_of(
                "reading replication progress",
                &format!(
                    "SELECT pg_catalog.pg_replication_origin_progress({}, true)::text",
                    literal(origin)
                ),
            )?
            .unwrap_or(0))
    }

    /// An origin's progress and its id; `None` when the origin does not exist.
    pub fn origin(&self, origin: &str) -> BdrResult<Option<(u64, u32)>> {
        let rows = self.query(
            "reading replication progress",
            &format!(
                "SELECT COALESCE(pg_catalog.pg_replication_origin_progress(o.roname, true), '0/0')::text, o.roident::text
                   FROM pg_catalog.pg_replication_origin o WHERE o.roname = {}",
                literal(origin)
            ),
            2,
        )?;
        Ok(rows.first().map(|r| {
            (
                r[0].as_deref().and_then(lsn::parse).unwrap_or(0),
                parse_oid(&r[1]),
            )
        }))
    }

    /// Opens the read-only REPEATABLE READ transaction a slot created with
    /// `SlotSnapshot::Use` sets the snapshot of.
    pub fn begin_snapshot_copy(&self) -> BdrResult<()> {
        self.command(
            "starting the copy",
            "BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ",
        )
    }

    /// Exports the running transaction's snapshot, for pg_dump.
    pub fn export_snapshot(&self) -> BdrResult<String> {
        Ok(first_text(self.query(
            "exporting the copy's snapshot",
            "SELECT pg_catalog.pg_export_snapshot()",
            1,
        )?)
        .unwrap_or_default())
    }

    pub fn commit(&self, what: &str) -> BdrResult<()> {
        self.command(what, "COMMIT")
    }

    /// Sets in the peer's session what key texts must look like when they
    /// are compared across nodes (`tombstone::canonical_output_sql`).
    pub fn set_canonical_output(&self) -> BdrResult<()> {
        self.command(
            "preparing the copy",
            &crate::tombstone::canonical_output_sql(),
        )
    }

    /// Starts `COPY <table> (<columns>) TO STDOUT`; read it with `receive`.
    pub fn copy_out_table(&self, t: &Table) -> BdrResult<()> {
        self.start_copy(
            t,
            &format!("COPY {} ({}) TO STDOUT", t.qualified(), t.column_list()),
        )
    }

    /// Starts the COPY of the real last writers of table `t`'s rows and
    /// deletes, into `bdr.copied_row` as `local_relid` (the table's oid
    /// here). `node_id` is the peer's node id.
    pub fn copy_out_row_writers(&self, t: &Table, local_relid: u32, node_id: u32) -> BdrResult<()> {
        // The node behind a row's replication origin on the peer; rows the
        // peer copied at its own join have their real writer in its
        // bdr.copied_row.
        let writer = format!(
            "{micros},
             CASE WHEN x.roident = 0 THEN {node_id}::oid
                  ELSE (SELECT CASE WHEN {local} THEN {node_id}::oid ELSE s.origin_node_id END
                          FROM pg_catalog.pg_replication_origin o
                          LEFT JOIN bdr.subscription s ON s.origin_name = o.roname
                         WHERE o.roident = x.roident) END",
            micros = bdr_core::time::micros_sql("x.timestamp"),
            local = bdr_core::hlc::local_origin_sql("o.roname")
        );
        let rel = literal(&t.qualified());
        let source = format!(
            "COPY (
               SELECT {local_relid}, h.key_hash, COALESCE(c.commit_us, w.commit_us), COALESCE(c.node_id, w.node_id), false
                 FROM ONLY {q} t
                 CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(t.xmin) x
                 CROSS JOIN LATERAL (SELECT pg_catalog.md5(bdr._key_text({rel}::regclass, t)) AS key_hash) h
                 CROSS JOIN LATERAL (SELECT {writer}) AS w(commit_us, node_id)
                 LEFT JOIN LATERAL (SELECT c.commit_us, c.node_id FROM bdr.copied_row c
                                     WHERE c.relid = {rel}::regclass AND c.key_hash = h.key_hash
                                       AND NOT c.deleted AND x.timestamp = {copied}
                                     LIMIT 1) c ON true
                WHERE h.key_hash IS NOT NULL
               UNION ALL
               SELECT {local_relid}, tb.key_hash, w.commit_us, w.node_id, true
                 FROM bdr.tombstone tb
                 CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(tb.xmin) x
                 CROSS JOIN LATERAL (SELECT {writer}) AS w(commit_us, node_id)
                WHERE tb.relid = {rel}::regclass
               UNION ALL
               SELECT {local_relid}, c.key_hash, c.commit_us, c.node_id, true
                 FROM bdr.copied_row c WHERE c.relid = {rel}::regclass AND c.deleted
             ) TO STDOUT",
            q = t.qualified(),
            copied = bdr_core::time::COPIED_COMMIT_TS_SQL,
        );
        self.start_copy(t, &source)
    }

    fn start_copy(&self, t: &Table, sql: &str) -> BdrResult<()> {
        self.conn
            .start_copy(sql)
            .map_err(|e| self.failed(&format!("copying {}", t.qualified()), e))
    }

    /// The next piece of a COPY started by `copy_out_*`.
    pub fn receive(&mut self) -> Received<'_> {
        self.conn.receive()
    }

    /// Enables the peer's subscription from node `origin_name`.
    pub fn resume_subscription_from(&self, origin_name: &str) -> BdrResult<()> {
        self.call(
            "resuming the subscription from the parting node",
            &format!(
                "SELECT bdr._set_subscription_enabled(sub_name, true)::text FROM bdr.subscription_summary WHERE origin_name = {}",
                literal(origin_name)
            ),
        )
    }

    /// The end of the peer's WAL: everything it committed so far is before it.
    pub fn wal_insert_end(&self) -> BdrResult<u64> {
        Ok(self
            .lsn_of(
                "reading its WAL position",
                "SELECT bdr._wal_insert_end_lsn()::text",
            )?
            .unwrap_or(0))
    }

    /// Asks whether `check` holds on the peer: `Ok(None)` when it does,
    /// else what is still missing.
    pub fn check(&self, check: &Check, what: &str) -> BdrResult<Option<String>> {
        let sql = match check {
            Check::SlotConfirmed { slot, lsn: at } => format!(
                "SELECT COALESCE((SELECT CASE WHEN confirmed_flush_lsn >= {0}::pg_lsn THEN 't'
                                              ELSE format('slot %s has confirmed %s of %s; active: %s', slot_name, confirmed_flush_lsn, {0}, active) END
                                    FROM pg_catalog.pg_replication_slots WHERE slot_name = {1}), 't')",
                literal(&lsn::format(*at)),
                literal(slot)
            ),
            Check::SlotAndOriginGone { slot, origin } => format!(
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {0})
                              AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = {1})
                        THEN 't' ELSE 'slot ' || {0} || ' or origin ' || {1} || ' still exists' END",
                literal(slot),
                literal(origin)
            ),
            Check::NoSlotsWithPrefix(prefix) => format!(
                "SELECT COALESCE('slots left: ' || string_agg(slot_name::text, ', '), 't')
                   FROM pg_catalog.pg_replication_slots
                  WHERE database = current_database() AND plugin = 'bdr'
                    AND starts_with(slot_name::text, {})",
                literal(prefix)
            ),
        };
        let state = first_text(self.query(what, &sql, 1)?).unwrap_or_default();
        Ok((state != "t").then_some(state))
    }

    /// The rows and remembered deletes whose last writer on the peer is the
    /// node behind replication origin `roident`, oldest first.
    pub fn changes_of_origin(&self, roident: u32) -> BdrResult<Vec<PartedChange>> {
        let tables: Vec<String> = self
            .query(
                "listing tables",
                &format!(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE {REPLICATED_TABLE}"
                ),
                1,
            )?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        let mut changes = Vec::new();
        for t in &tables {
            let sql = format!(
                "SELECT to_jsonb(t)::text, x.timestamp::text FROM ONLY {t} t
                  CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(t.xmin) x
                 WHERE x.roident = {roident}"
            );
            for r in self.query("reading the parted node's rows", &sql, 2)? {
                if let (Some(value), Some(commit_time)) = (r[0].clone(), r[1].clone()) {
                    changes.push(PartedChange {
                        table: t.clone(),
                        value,
                        commit_time,
                        deleted: false,
                    });
                }
            }
        }
        let sql = format!(
            "SELECT format('%I.%I', n.nspname, c.relname), tb.key_hash, x.timestamp::text
               FROM bdr.tombstone tb
               JOIN pg_catalog.pg_class c ON c.oid = tb.relid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(tb.xmin) x
              WHERE x.roident = {roident}"
        );
        for r in self.query("reading the parted node's deletes", &sql, 3)? {
            if let (Some(table), Some(value), Some(commit_time)) =
                (r[0].clone(), r[1].clone(), r[2].clone())
            {
                changes.push(PartedChange {
                    table,
                    value,
                    commit_time,
                    deleted: true,
                });
            }
        }
        // Oldest first, as the parted node committed them.
        changes.sort_by(|x, y| x.commit_time.cmp(&y.commit_time));
        Ok(changes)
    }

    /// Applies the parted node's `changes` on the peer, each in its own
    /// transaction with the parted node's commit time, under the
    /// `bdr_local` origin (so that it replicates on); the peer keeps a
    /// newer version it holds. Stops at the first failure.
    pub fn catch_up(&self, changes: &[PartedChange]) -> BdrResult<()> {
        let what = "catching up the parted node's changes";
        let begin = format!("BEGIN; {}", crate::tombstone::canonical_output_sql());
        self.call(
            what,
            &format!(
                "SELECT pg_catalog.pg_replication_origin_session_setup({})",
                literal(bdr_core::hlc::LOCAL_ORIGIN)
            ),
        )?;
        let mut result = Ok(());
        for c in changes {
            let apply = if c.deleted {
                format!(
                    "SELECT bdr._catchup_delete({}::regclass, {}, {}::timestamptz)",
                    literal(&c.table),
                    literal(&c.value),
                    literal(&c.commit_time)
                )
            } else {
                format!(
                    "SELECT bdr._catchup_row({}::regclass, {}::jsonb, {}::timestamptz)",
                    literal(&c.table),
                    literal(&c.value),
                    literal(&c.commit_time)
                )
            };
            result = (|| {
                self.command(what, &begin)?;
                self.call(
                    what,
                    &format!(
                        "SELECT pg_catalog.pg_replication_origin_xact_setup('0/0', {}::timestamptz)",
                        literal(&c.commit_time)
                    ),
                )?;
                self.call(what, &apply)?;
                self.command(what, "COMMIT")
            })();
            if result.is_err() {
                let _ = self.command(what, "ROLLBACK");
                break;
            }
        }
        let _ = self.call(
            what,
            "SELECT pg_catalog.pg_replication_origin_session_reset()",
        );
        result
    }

    /// Removes node `node_id`'s rows from the peer's catalogs.
    pub fn drop_node_rows(&self, node_id: u32) -> BdrResult<()> {
        self.call(
            "dropping the node",
            &format!("SELECT bdr._drop_node_rows({node_id})::text"),
        )
    }

    /// Hands a batch of Raft messages to the peer's consensus worker;
    /// false when it did not take them (not running, or no room).
    pub fn deliver_consensus(&self, batch: &[u8]) -> BdrResult<bool> {
        let hex: String = batch.iter().map(|b| format!("{b:02x}")).collect();
        let rows = self.query(
            "delivering consensus messages",
            &format!("SELECT bdr._consensus_deliver('\\x{hex}'::bytea)::text"),
            1,
        )?;
        Ok(first_text(rows).as_deref() == Some("true"))
    }

    /// Asks the peer to make node `node_id` a voter of the group's
    /// consensus (or, `add` false, to take it out), and waits for it.
    pub fn change_voter(&self, node_id: u32, add: bool) -> BdrResult<()> {
        self.call(
            "changing the consensus voters",
            &format!("SELECT bdr._consensus_change_voter({node_id}, {add})::text"),
        )
    }

    /// The peer's consensus state (BDR 4's RAFT_* names) and the leader it
    /// follows (0: none).
    pub fn consensus_state(&self) -> BdrResult<(String, u64)> {
        let rows = self.query(
            "reading the consensus status",
            "SELECT state, COALESCE(leader_id::bigint, 0)::text FROM bdr.get_consensus_status()",
            2,
        )?;
        Ok(rows
            .first()
            .map(|r| (text(&r[0]), text(&r[1]).parse().unwrap_or(0)))
            .unwrap_or_default())
    }

    /// Records `dsn` as node `node_id`'s connection string on the peer.
    pub fn set_node_dsn(&self, node_id: u32, dsn: &str) -> BdrResult<()> {
        self.call(
            "changing the node's interface",
            &format!(
                "SELECT bdr._set_node_dsn({node_id}, {})::text",
                literal(dsn)
            ),
        )
    }
}

/// A condition `Peer::check` asks of a peer.
pub enum Check {
    /// The slot has confirmed `lsn` (or does not exist).
    SlotConfirmed { slot: String, lsn: u64 },
    /// Neither the slot nor the origin exists.
    SlotAndOriginGone { slot: String, origin: String },
    /// No bdr slot of this database starts with the prefix.
    NoSlotsWithPrefix(String),
}

/// The global DML lock's calls (`crate::dmllock`).
impl Peer {
    /// Stops writes to `relation` (a qualified name) on the peer for lock
    /// `lock_id` of node `origin`, waiting at most `timeout_ms` for the
    /// writes in progress; returns the LSN the peer's marker transaction
    /// ends after.
    pub fn dml_lock_acquire(
        &self,
        relation: &str,
        lock_id: i64,
        origin: u32,
        timeout_ms: i64,
    ) -> BdrResult<u64> {
        self.lsn_of(
            "taking the global DML lock",
            &format!(
                "SELECT bdr._dml_lock_acquire({}, {lock_id}, {origin}, {timeout_ms})",
                literal(relation)
            ),
        )?
        .ok_or_else(|| {
            self.failed(
                "taking the global DML lock",
                PeerError::Answer("no marker LSN".into()),
            )
        })
    }

    /// Hands lock `lock_id` over to the peer's writer: it holds until the
    /// peer applies a transaction of this node that ends after `after`.
    pub fn dml_lock_handover(&self, lock_id: i64, after: u64) -> BdrResult<bool> {
        let rows = self.query(
            "handing over the global DML lock",
            &format!(
                "SELECT bdr._dml_lock_handover({lock_id}, {})::text",
                literal(&lsn::format(after))
            ),
            1,
        )?;
        Ok(first_text(rows).as_deref() == Some("true"))
    }

    /// Commits a marker transaction on the peer; returns the LSN it ends
    /// after.
    pub fn progress_marker(&self) -> BdrResult<u64> {
        self.lsn_of("writing a progress marker", "SELECT bdr._progress_marker()")?
            .ok_or_else(|| {
                self.failed(
                    "writing a progress marker",
                    PeerError::Answer("no marker LSN".into()),
                )
            })
    }

    /// Which node the peer has not applied up to its target yet ("" when
    /// it has applied them all); `targets` as `bdr_core::dmllock` encodes them.
    pub fn caught_up(&self, targets: &str) -> BdrResult<String> {
        Ok(first_text(self.query(
            "checking replication progress",
            &format!("SELECT bdr._caught_up({})", literal(targets)),
            1,
        )?)
        .unwrap_or_default())
    }

    /// Whether the peer's transaction `xid` has ended ("committed",
    /// "aborted"; "in progress"; "" when too old to tell).
    pub fn xact_status(&self, xid: u32) -> BdrResult<String> {
        Ok(first_text(self.query(
            "reading a transaction's status",
            &format!("SELECT COALESCE(bdr._xid_status({xid}), '')"),
            1,
        )?)
        .unwrap_or_default())
    }
}

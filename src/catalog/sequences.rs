//! `bdr.sequence_kind` and what bdr reads of a sequence itself.

use super::{oid, select, select_first, Args};
use crate::error::{BdrError, BdrResult};
use bdr_core::sequence::{Chunk, Kind, SeqType};
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;

/// A sequence's row of `bdr.sequence_kind`.
#[derive(Debug, Clone)]
pub struct KindRow {
    pub seqid: u32,
    pub kind: Kind,
    pub start_value: Option<i64>,
    pub alloc_key: String,
    pub current: Option<Chunk>,
    pub reserved: Option<Chunk>,
}

fn chunk(row: &SpiHeapTupleData<'_>, i: usize) -> BdrResult<Option<Chunk>> {
    Ok(match (row.get::<i64>(i)?, row.get::<i64>(i + 1)?) {
        (Some(start), Some(end)) => Some(Chunk { start, end }),
        _ => None,
    })
}

fn kind_row(row: &SpiHeapTupleData<'_>) -> BdrResult<KindRow> {
    let code = row.get::<String>(2)?.unwrap_or_default();
    Ok(KindRow {
        seqid: row.get::<pg_sys::Oid>(1)?.map(|o| o.to_u32()).unwrap_or(0),
        kind: Kind::from_code(&code).unwrap_or(Kind::Local),
        start_value: row.get::<i64>(3)?,
        alloc_key: row.get::<String>(4)?.unwrap_or_default(),
        current: chunk(row, 5)?,
        reserved: chunk(row, 7)?,
    })
}

const KIND_QUERY: &str =
    "SELECT seqid, seqkind::text, start_value, alloc_key, current_start, current_end,
                                 reserved_start, reserved_end FROM bdr.sequence_kind";

pub fn kind_of(seqid: u32) -> BdrResult<Option<KindRow>> {
    select_first(
        &format!("{KIND_QUERY} WHERE seqid = $1"),
        &[oid(seqid).into()],
        kind_row,
    )
}

/// Galloc sequences of this database (that still exist).
pub fn galloc_sequences() -> BdrResult<Vec<KindRow>> {
    select(
        &format!(
            "{KIND_QUERY} k WHERE seqkind = 'g'
               AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = k.seqid)"
        ),
        &[],
        kind_row,
    )
}

/// Records the kind of a sequence (galloc: with no chunk yet).
pub fn set_kind(seqid: u32, kind: Kind, start: Option<i64>, alloc_key: &str) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.sequence_kind (seqid, seqkind, start_value, alloc_key) VALUES ($1, $2::\"char\", $3, $4)
         ON CONFLICT (seqid) DO UPDATE SET seqkind = EXCLUDED.seqkind, start_value = EXCLUDED.start_value,
                alloc_key = EXCLUDED.alloc_key, current_start = NULL, current_end = NULL, reserved_start = NULL, reserved_end = NULL",
        &[oid(seqid).into(), kind.code().into(), start.into(), alloc_key.into()],
    )?;
    Ok(())
}

/// The galloc chunks this node holds for a sequence.
pub fn set_chunks(seqid: u32, current: Option<Chunk>, reserved: Option<Chunk>) -> BdrResult<()> {
    let args: &Args<'_> = &[
        oid(seqid).into(),
        current.map(|c| c.start).into(),
        current.map(|c| c.end).into(),
        reserved.map(|c| c.start).into(),
        reserved.map(|c| c.end).into(),
    ];
    Spi::run_with_args(
        "UPDATE bdr.sequence_kind SET current_start = $2, current_end = $3,
                reserved_start = $4, reserved_end = $5 WHERE seqid = $1",
        args,
    )?;
    Ok(())
}

/// Forgets the kinds of sequences that were dropped (their oids may be
/// taken again by new ones).
pub fn purge_dropped() -> BdrResult<()> {
    Spi::run(
        "DELETE FROM bdr.sequence_kind k
          WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = k.seqid)",
    )?;
    Ok(())
}

/// Of the relations `created`, the logged sequences with no kind recorded
/// (an unlogged one starts over after a crash: it stays local).
pub fn new_logged_sequences(created: &[u32]) -> BdrResult<Vec<u32>> {
    let oids: Vec<pg_sys::Oid> = created.iter().map(|o| oid(*o)).collect();
    select(
        "SELECT c.oid FROM pg_catalog.pg_class c
          WHERE c.oid = ANY($1) AND c.relkind = 'S' AND c.relpersistence = 'p'
            AND NOT EXISTS (SELECT 1 FROM bdr.sequence_kind k WHERE k.seqid = c.oid)
          ORDER BY c.oid",
        &[oids.into()],
        |row| Ok(row.get::<pg_sys::Oid>(1)?.map(|o| o.to_u32()).unwrap_or(0)),
    )
}

/// The global sequences owned by (the identity or serial columns of) the
/// relations `rels`, by name.
pub fn global_sequences_of(rels: &[u32]) -> BdrResult<Vec<String>> {
    let oids: Vec<pg_sys::Oid> = rels.iter().map(|o| oid(*o)).collect();
    select(
        "SELECT d.objid::regclass::text FROM pg_catalog.pg_depend d
           JOIN bdr.sequence_kind k ON k.seqid = d.objid AND k.seqkind <> 'l'
          WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
            AND d.refobjid = ANY($1) AND d.deptype IN ('a', 'i')",
        &[oids.into()],
        |row| Ok(row.get::<String>(1)?.unwrap_or_default()),
    )
}

/// The local node's sequence id (0 before it is in a group).
pub fn local_seq_id() -> BdrResult<i64> {
    Ok(select_first(
        "SELECT n.seq_id FROM bdr.local_node l JOIN bdr.node n USING (node_id)",
        &[],
        |row| Ok(row.get::<i32>(1)?.unwrap_or(0) as i64),
    )?
    .unwrap_or(0))
}

/// What bdr needs to know of a sequence.
#[derive(Debug, Clone)]
pub struct SeqInfo {
    pub oid: u32,
    /// The name as regclass prints it (quoted, qualified where needed).
    pub regclass: String,
    /// The schema-qualified, quoted name: the same on every node.
    pub qualified: String,
    pub ty: SeqType,
    pub increment: i64,
    pub last_value: i64,
    pub is_called: bool,
    /// `relpersistence`: 'p' logged, 'u' unlogged, 't' temporary.
    pub persistence: char,
}

pub fn seq_info(seqid: u32) -> BdrResult<SeqInfo> {
    let head = select_first(
        "SELECT c.oid::regclass::text, pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname),
                pg_catalog.format_type(s.seqtypid, NULL), s.seqincrement, c.relpersistence::text
           FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_catalog.pg_sequence s ON s.seqrelid = c.oid
          WHERE c.oid = $1",
        &[oid(seqid).into()],
        |row| {
            Ok((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<i64>(4)?.unwrap_or(1),
                row.get::<String>(5)?.unwrap_or_default().chars().next().unwrap_or('p'),
            ))
        },
    )?;
    let Some((regclass, qualified, ty, increment, persistence)) = head else {
        return Err(BdrError::Sequence {
            msg: format!("relation with oid {seqid} is not a sequence"),
            hint: "Pass a sequence, such as 'public.items_id_seq'::regclass.".into(),
        });
    };
    let ty = SeqType::from_name(&ty).ok_or_else(|| BdrError::Sequence {
        msg: format!("sequence {regclass} has unsupported type {ty}"),
        hint: String::new(),
    })?;
    let (last_value, is_called) = select_first(
        &format!("SELECT last_value, is_called FROM {regclass}"),
        &[],
        |row| {
            Ok((
                row.get::<i64>(1)?.unwrap_or(0),
                row.get::<bool>(2)?.unwrap_or(false),
            ))
        },
    )?
    .unwrap_or((0, false));
    Ok(SeqInfo {
        oid: seqid,
        regclass,
        qualified,
        ty,
        increment,
        last_value,
        is_called,
        persistence,
    })
}

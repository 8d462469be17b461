//! The `bdr` logical decoding output plugin. A peer's receiver streams from a
//! slot created with it; it turns each decoded change into a bdr protocol
//! message (`bdr_core::protocol`), one per CopyData.
//!
//! Only changes made on this node are sent (`filter_by_origin_cb`): in a full
//! mesh every node hears every other directly, so forwarding would apply
//! changes twice.

use bdr_core::protocol::{self, Column, Message, StartOptions, Value};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;

struct State {
    opts: StartOptions,
    /// Relations whose RELATION message this stream already carries.
    sent_relations: HashSet<u32>,
    /// Whether a relation's changes are sent at all, decided once per relation.
    wanted: HashMap<u32, bool>,
    begin_sent: bool,
    /// The replication origins under which this node commits its own
    /// transactions (`bdr_local` and the `bdr_local_<n>` pool, see
    /// `bdr_core::hlc`).
    local_origins: Vec<pg_sys::RepOriginId>,
    /// Per-change allocations (type output results); reset after each change.
    change_cxt: pg_sys::MemoryContext,
}

fn take_invalidations(state: &mut State) {
    if let Some(changed) = crate::relcache::take() {
        if changed.all {
            state.sent_relations.clear();
            state.wanted.clear();
        }
        for r in changed.relids {
            state.sent_relations.remove(&r);
            state.wanted.remove(&r);
        }
    }
}

/// The plugin's entry point, found by name when a slot uses plugin `bdr`.
///
/// # Safety
/// Called by PostgreSQL with a valid callback table.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        *cb = pg_sys::OutputPluginCallbacks::default();
        (*cb).startup_cb = Some(startup);
        (*cb).begin_cb = Some(begin);
        (*cb).change_cb = Some(change);
        (*cb).truncate_cb = Some(truncate);
        (*cb).commit_cb = Some(commit);
        (*cb).message_cb = Some(message);
        (*cb).filter_by_origin_cb = Some(filter_by_origin);
        (*cb).shutdown_cb = Some(shutdown);
    }
}

unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut State {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe { &mut *((*ctx).output_plugin_private as *mut State) }
}

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: PostgreSQL strings are NUL-terminated.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opt: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        (*opt).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*opt).receive_rewrites = false;

        let mut opts = StartOptions {
            proto_version: protocol::PROTO_VERSION,
            ..Default::default()
        };
        if !is_init {
            let list = (*ctx).output_plugin_options;
            let mut pairs = Vec::new();
            if !list.is_null() {
                for i in 0..(*list).length as usize {
                    let d = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
                    let name = cstr((*d).defname);
                    let value = if (*d).arg.is_null() {
                        String::new()
                    } else {
                        cstr(pg_sys::defGetString(d))
                    };
                    pairs.push((name, value));
                }
            }
            match protocol::parse_start_options(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            {
                Ok(o) => opts = o,
                Err(msg) => {
                    pgrx::pg_sys::panic::ErrorReport::new(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        msg,
                        "bdr output plugin",
                    )
                    .set_hint("Connect with a bdr receiver of the same protocol version.")
                    .report(PgLogLevel::ERROR);
                }
            }
        }

        crate::relcache::watch();

        let change_cxt = pg_sys::AllocSetContextCreateExtended(
            (*ctx).context,
            c"bdr output change".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        // A walsender starts decoding outside a transaction; the origin's id
        // is read from the catalog once, here. Not when the slot is being made:
        // a catalog snapshot then would keep it from exporting its own.
        let local_origins = if is_init {
            Vec::new()
        } else {
            let own_txn = !pg_sys::IsTransactionState();
            if own_txn {
                pg_sys::StartTransactionCommand();
            }
            let names = std::iter::once(LOCAL_ORIGIN.to_string_lossy().into_owned())
                .chain((1..=bdr_core::hlc::POOL_SIZE).map(bdr_core::hlc::pool_origin_name));
            let ids = names
                .filter_map(|n| std::ffi::CString::new(n).ok())
                .map(|n| pg_sys::replorigin_by_name(n.as_ptr(), true))
                .filter(|id| *id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId)
                .collect();
            if own_txn {
                pg_sys::CommitTransactionCommand();
            }
            ids
        };
        // Freed with the decoding context, also when decoding ends in an ERROR.
        let st = PgMemoryContexts::For((*ctx).context).leak_and_drop_on_delete(State {
            opts,
            sent_relations: HashSet::new(),
            wanted: HashMap::new(),
            begin_sent: false,
            local_origins,
            change_cxt,
        });
        (*ctx).output_plugin_private = st as *mut std::ffi::c_void;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(_ctx: *mut pg_sys::LogicalDecodingContext) {}

/// Transactions committed under this replication origin count as local
/// changes of this node and are replicated. With
/// `pg_replication_origin_xact_setup` they carry a commit timestamp of the
/// session's choosing, which is how tests make two nodes' commits tie.
pub const LOCAL_ORIGIN: &std::ffi::CStr = bdr_core::hlc::LOCAL_ORIGIN_C;

#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    origin_id: pg_sys::RepOriginId,
) -> bool {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        if origin_id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            return false;
        }
        // bdr.xact_replication = off: never sent, not even when forwarding.
        if origin_id as u32 == pg_sys::DoNotReplicateId {
            return true;
        }
        let st = state(ctx);
        // Local transactions that chose their commit timestamp.
        if st.local_origins.contains(&origin_id) {
            return false;
        }
        // Forwarding of other nodes' changes is only for join/part catch-up.
        !st.opts.forward_origins.iter().any(|o| o == "all")
    }
}

fn write(ctx: *mut pg_sys::LogicalDecodingContext, m: &Message) {
    let bytes = protocol::encode(m);
    // SAFETY: the decoding context is live during callbacks; `out` is its buffer.
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, true);
        pg_sys::appendBinaryStringInfo((*ctx).out, bytes.as_ptr() as *const _, bytes.len() as i32);
        pg_sys::OutputPluginWrite(ctx, true);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        // BEGIN waits for the first change, so that transactions with nothing to
        // send (filtered, or only bdr catalogs) cost the peer nothing.
        state(ctx).begin_sent = false;
    }
}

unsafe fn ensure_begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let st = state(ctx);
        if st.begin_sent {
            return;
        }
        st.begin_sent = true;
        write(
            ctx,
            &Message::Begin {
                xid: (*txn).xid.into_inner(),
                final_lsn: (*txn).final_lsn,
                commit_time: (*txn).xact_time.commit_time,
            },
        );
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let st = state(ctx);
        if !st.begin_sent {
            // Lets the walsender confirm progress past skipped transactions.
            pg_sys::OutputPluginUpdateProgress(ctx, true);
            return;
        }
        st.begin_sent = false;
        pg_sys::OutputPluginUpdateProgress(ctx, false);
        write(
            ctx,
            &Message::Commit {
                commit_lsn,
                end_lsn: (*txn).end_lsn,
                commit_time: (*txn).xact_time.commit_time,
            },
        );
    }
}

/// Transactional logical messages of bdr's own (the DDL a session queued,
/// `crate::ddl`; the global DML lock's markers, `crate::dmllock`) go to the peers inside their transaction; others are
/// not bdr's business.
#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    size: pg_sys::Size,
    content: *const std::ffi::c_char,
) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let prefix = cstr(prefix);
        if !transactional
            || txn.is_null()
            || (prefix != bdr_core::ddl::DDL_PREFIX && prefix != bdr_core::dmllock::MARKER_PREFIX)
        {
            return;
        }
        let content = std::slice::from_raw_parts(content as *const u8, size).to_vec();
        in_change_context(ctx, || {
            ensure_begin(ctx, txn);
            write(
                ctx,
                &Message::Message {
                    transactional,
                    prefix: prefix.to_string(),
                    content,
                },
            );
        });
    }
}

unsafe fn attr(desc: pg_sys::TupleDesc, i: usize) -> &'static pg_sys::FormData_pg_attribute {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe { &*(*desc).attrs.as_ptr().add(i) }
}

/// Columns that replicate: not dropped, not generated (the target computes those).
unsafe fn replicated(a: &pg_sys::FormData_pg_attribute) -> bool {
    !a.attisdropped && a.attgenerated == 0
}

/// Whether this relation's changes are sent at all (`bdr_core::tables`):
/// ordinary tables outside the system schemas and bdr's. Decided once per
/// relation and cached, so no per-change catalog lookups or allocations.
unsafe fn wanted(ctx: *mut pg_sys::LogicalDecodingContext, rel: pg_sys::Relation) -> bool {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let st = state(ctx);
        take_invalidations(st);
        let relid = (*rel).rd_id.to_u32();
        if let Some(w) = st.wanted.get(&relid) {
            return *w;
        }
        let form = &*(*rel).rd_rel;
        let ns = pg_sys::get_namespace_name(form.relnamespace);
        let w =
            bdr_core::tables::replicates(form.relkind as u8, form.relpersistence as u8, &cstr(ns));
        if !ns.is_null() {
            pg_sys::pfree(ns.cast());
        }
        st.wanted.insert(relid, w);
        w
    }
}

/// Whether a type's binary form means the same on every node. Built-in types
/// qualify, except OID aliases (regclass and friends) and arrays of them,
/// whose binary form is an OID of this node.
unsafe fn binary_portable(typid: pg_sys::Oid) -> bool {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let base = {
            let elem = pg_sys::get_element_type(typid);
            if elem == pg_sys::InvalidOid {
                typid
            } else {
                elem
            }
        };
        const OID_ALIASES: &[pg_sys::Oid] = &[
            pg_sys::REGCLASSOID,
            pg_sys::REGTYPEOID,
            pg_sys::REGPROCOID,
            pg_sys::REGPROCEDUREOID,
            pg_sys::REGOPEROID,
            pg_sys::REGOPERATOROID,
            pg_sys::REGCONFIGOID,
            pg_sys::REGDICTIONARYOID,
            pg_sys::REGNAMESPACEOID,
            pg_sys::REGROLEOID,
            pg_sys::REGCOLLATIONOID,
        ];
        typid.to_u32() < pg_sys::FirstGenbkiObjectId && !OID_ALIASES.contains(&base)
    }
}

/// Callers have asked `wanted` first, which took pending invalidations.
unsafe fn ensure_relation(ctx: *mut pg_sys::LogicalDecodingContext, rel: pg_sys::Relation) -> u32 {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let st = state(ctx);
        let relid = (*rel).rd_id.to_u32();
        if st.sent_relations.contains(&relid) {
            return relid;
        }
        let form = &*(*rel).rd_rel;
        let desc = (*rel).rd_att;
        let keys = pg_sys::RelationGetIdentityKeyBitmap(rel);
        let mut columns = Vec::new();
        for i in 0..(*desc).natts as usize {
            let a = attr(desc, i);
            if !replicated(a) {
                continue;
            }
            let bit = a.attnum as i32 - pg_sys::FirstLowInvalidHeapAttributeNumber;
            columns.push(Column {
                name: cstr(a.attname.data.as_ptr()),
                type_name: cstr(pg_sys::format_type_be(a.atttypid)),
                type_oid: a.atttypid.to_u32(),
                typmod: a.atttypmod,
                is_key: !keys.is_null() && pg_sys::bms_is_member(bit, keys),
            });
        }
        write(
            ctx,
            &Message::Relation(protocol::Relation {
                id: relid,
                schema: cstr(pg_sys::get_namespace_name(form.relnamespace)),
                name: cstr(form.relname.data.as_ptr()),
                replica_identity: form.relreplident as u8,
                columns,
            }),
        );
        st.sent_relations.insert(relid);
        relid
    }
}

unsafe fn is_unchanged_toast(d: pg_sys::Datum) -> bool {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let p = d.cast_mut_ptr::<pg_sys::varlena>();
        pgrx::varlena::varatt_is_1b_e(p)
            && pgrx::varlena::vartag_external(p) as u32 == pg_sys::vartag_external::VARTAG_ONDISK
    }
}

/// The replicated columns of a decoded tuple, as protocol values.
unsafe fn tuple_values(
    ctx: *mut pg_sys::LogicalDecodingContext,
    rel: pg_sys::Relation,
    buf: *mut pg_sys::ReorderBufferTupleBuf,
) -> Vec<Value> {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let st = state(ctx);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(
            &mut (*buf).tuple,
            desc,
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        );
        let mut out = Vec::with_capacity(natts);
        for i in 0..natts {
            let a = attr(desc, i);
            if !replicated(a) {
                continue;
            }
            if nulls[i] {
                out.push(Value::Null);
                continue;
            }
            if a.attlen == -1 && is_unchanged_toast(values[i]) {
                out.push(Value::UnchangedToast);
                continue;
            }
            // Binary only for built-in types: their send format is the same on
            // every node, while user types' OIDs (inside arrays, records) differ.
            if st.opts.binary && binary_portable(a.atttypid) {
                let mut send = pg_sys::InvalidOid;
                let mut varlena = false;
                pg_sys::getTypeBinaryOutputInfo(a.atttypid, &mut send, &mut varlena);
                let b = pg_sys::OidSendFunctionCall(send, values[i]);
                out.push(Value::Binary(
                    pgrx::varlena::varlena_to_byte_slice(b).to_vec(),
                ));
            } else {
                let mut output = pg_sys::InvalidOid;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(a.atttypid, &mut output, &mut varlena);
                out.push(Value::Text(cstr(pg_sys::OidOutputFunctionCall(
                    output, values[i],
                ))));
            }
        }
        out
    }
}

unsafe fn in_change_context<R>(
    ctx: *mut pg_sys::LogicalDecodingContext,
    f: impl FnOnce() -> R,
) -> R {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let cxt = state(ctx).change_cxt;
        let old = pg_sys::MemoryContextSwitchTo(cxt);
        let r = f();
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::MemoryContextReset(cxt);
        r
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        if !wanted(ctx, rel) {
            return;
        }
        in_change_context(ctx, || {
            use pg_sys::ReorderBufferChangeType::*;
            let tp = (*change).data.tp;
            let action = (*change).action;
            // The tuple a change needs: the new row, or a delete's old key.
            let needed = match action {
                REORDER_BUFFER_CHANGE_INSERT | REORDER_BUFFER_CHANGE_UPDATE => tp.newtuple,
                REORDER_BUFFER_CHANGE_DELETE => tp.oldtuple,
                _ => return,
            };
            if needed.is_null() {
                if action == REORDER_BUFFER_CHANGE_DELETE {
                    // No replica identity: the origin refuses such deletes, so
                    // this is a table whose identity changed while in flight.
                    pgrx::warning!(
                        "bdr: DELETE on \"{}\" has no replica identity and is not replicated",
                        cstr((*(*rel).rd_rel).relname.data.as_ptr())
                    );
                }
                return;
            }
            ensure_begin(ctx, txn);
            let relid = ensure_relation(ctx, rel);
            let msg = match action {
                REORDER_BUFFER_CHANGE_INSERT => Message::Insert {
                    relid,
                    new: tuple_values(ctx, rel, tp.newtuple),
                },
                REORDER_BUFFER_CHANGE_UPDATE => Message::Update {
                    relid,
                    old: (!tp.oldtuple.is_null()).then(|| tuple_values(ctx, rel, tp.oldtuple)),
                    new: tuple_values(ctx, rel, tp.newtuple),
                },
                _ => Message::Delete {
                    relid,
                    old: tuple_values(ctx, rel, tp.oldtuple),
                },
            };
            write(ctx, &msg);
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: std::ffi::c_int,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        in_change_context(ctx, || {
            let mut relids = Vec::new();
            for i in 0..nrelations as usize {
                let rel = *relations.add(i);
                if !wanted(ctx, rel) {
                    continue;
                }
                ensure_begin(ctx, txn);
                relids.push(ensure_relation(ctx, rel));
            }
            if relids.is_empty() {
                return;
            }
            let t = (*change).data.truncate;
            write(
                ctx,
                &Message::Truncate {
                    relids,
                    cascade: t.cascade,
                    restart_identity: t.restart_seqs,
                },
            );
        });
    }
}

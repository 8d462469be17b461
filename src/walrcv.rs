//! A thin safe layer over PostgreSQL's walreceiver library
//! (libpqwalreceiver), which is how a backend talks to another server: it is
//! latch-aware and interruptible, and reports failures as ERRORs. Connections
//! use `replication=database`, so they can both stream changes and run SQL.

use pgrx::pg_sys;
use pgrx::pg_sys::ffi::pg_guard_ffi_boundary;
use std::ffi::{CStr, CString};

/// Why a call to a peer failed, as libpq or the peer said it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The connection could not be made.
    #[error("{0}")]
    Connect(String),
    /// The peer ran the statement and reported an error.
    #[error("{0}")]
    Remote(String),
    /// The peer's answer lacked what was asked for.
    #[error("{0}")]
    Answer(String),
    /// The peer answered with another shape than asked for.
    #[error("expected {expected} columns, got {got} from: {sql}")]
    Columns {
        expected: usize,
        got: usize,
        sql: String,
    },
}

pub struct Conn {
    conn: *mut pg_sys::WalReceiverConn,
}

/// What one `receive` call found.
pub enum Received<'a> {
    /// One CopyData frame.
    Data(&'a [u8]),
    /// Nothing waiting: wait for this socket to become readable.
    WouldBlock(pg_sys::pgsocket),
    /// The server ended the stream.
    End,
}

fn functions() -> &'static pg_sys::WalReceiverFunctionsType {
    // SAFETY: loading a core library by name; afterwards the function table is
    // set for the life of the process.
    unsafe {
        if pg_sys::WalReceiverFunctions.is_null() {
            pg_sys::load_file(c"libpqwalreceiver".as_ptr(), false);
        }
        if pg_sys::WalReceiverFunctions.is_null() {
            crate::fail!(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "libpqwalreceiver did not initialise"
            );
        }
        &*pg_sys::WalReceiverFunctions
    }
}

fn cstring(s: &str) -> CString {
    // NUL cannot appear in SQL text or connection strings we build.
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

impl Conn {
    /// Connects, or returns libpq's reason for failing.
    pub fn connect(dsn: &str, appname: &str) -> Result<Conn, PeerError> {
        let f = functions();
        let dsn = cstring(dsn);
        let app = cstring(appname);
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        let connect = f.walrcv_connect.expect("walrcv_connect");
        // SAFETY: a function pointer from libpqwalreceiver's table, called with
        // NUL-terminated strings that outlive the call. The connection is
        // allocated in TopMemoryContext: it may outlive the transaction it
        // is made in (Drop frees it).
        let conn = unsafe {
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let c = pg_guard_ffi_boundary(|| connect(dsn.as_ptr(), true, app.as_ptr(), &mut err));
            pg_sys::MemoryContextSwitchTo(old);
            c
        };
        if conn.is_null() {
            let msg = if err.is_null() {
                "could not connect".to_string()
            } else {
                // SAFETY: libpq's error message is a NUL-terminated palloc'd string.
                unsafe { CStr::from_ptr(err) }
                    .to_string_lossy()
                    .trim()
                    .to_string()
            };
            return Err(PeerError::Connect(msg));
        }
        Ok(Conn { conn })
    }

    fn exec_raw(&self, sql: &str, ncols: usize) -> *mut pg_sys::WalRcvExecResult {
        let exec = functions().walrcv_exec.expect("walrcv_exec");
        let q = cstring(sql);
        let types = vec![pg_sys::TEXTOID; ncols.max(1)];
        let conn = self.conn;
        // SAFETY: live connection; the query and type array outlive the call.
        unsafe { pg_guard_ffi_boundary(|| exec(conn, q.as_ptr(), ncols as i32, types.as_ptr())) }
    }

    /// Runs a query whose `ncols` result columns are read as text.
    pub fn query(&self, sql: &str, ncols: usize) -> Result<Vec<Vec<Option<String>>>, PeerError> {
        let res = self.exec_raw(sql, ncols);
        // SAFETY: `res` is a palloc'd result from walrcv_exec; the tuple store
        // and descriptor are valid until walrcv_clear_result.
        unsafe {
            let out = match (*res).status {
                pg_sys::WalRcvExecStatus::WALRCV_OK_TUPLES => {
                    let desc = (*res).tupledesc;
                    let natts = (*desc).natts as usize;
                    if natts != ncols {
                        Err(PeerError::Columns {
                            expected: ncols,
                            got: natts,
                            sql: sql.to_string(),
                        })
                    } else {
                        let slot =
                            pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
                        let mut rows = Vec::new();
                        while pg_sys::tuplestore_gettupleslot((*res).tuplestore, true, false, slot)
                        {
                            pg_sys::slot_getallattrs(slot);
                            let mut row = Vec::with_capacity(natts);
                            for i in 0..natts {
                                if *(*slot).tts_isnull.add(i) {
                                    row.push(None);
                                } else {
                                    let d = *(*slot).tts_values.add(i);
                                    let s = pg_sys::text_to_cstring(d.cast_mut_ptr());
                                    row.push(Some(
                                        CStr::from_ptr(s).to_string_lossy().into_owned(),
                                    ));
                                    pg_sys::pfree(s.cast());
                                }
                            }
                            rows.push(row);
                        }
                        pg_sys::ExecDropSingleTupleTableSlot(slot);
                        Ok(rows)
                    }
                }
                pg_sys::WalRcvExecStatus::WALRCV_OK_COMMAND => Ok(vec![]),
                _ => Err(PeerError::Remote(err_text(res))),
            };
            pg_sys::walrcv_clear_result(res);
            out
        }
    }

    /// Runs a statement that returns no rows (or whose rows do not matter).
    pub fn command(&self, sql: &str) -> Result<(), PeerError> {
        let res = self.exec_raw(sql, 0);
        // SAFETY: as in `query`.
        unsafe {
            let out = match (*res).status {
                pg_sys::WalRcvExecStatus::WALRCV_OK_COMMAND
                | pg_sys::WalRcvExecStatus::WALRCV_OK_TUPLES => Ok(()),
                _ => Err(PeerError::Remote(err_text(res))),
            };
            pg_sys::walrcv_clear_result(res);
            out
        }
    }

    /// Starts a COPY BOTH (START_REPLICATION) or COPY OUT (`COPY ... TO STDOUT`).
    pub fn start_copy(&self, sql: &str) -> Result<(), PeerError> {
        let res = self.exec_raw(sql, 0);
        // SAFETY: as in `query`.
        unsafe {
            let out = match (*res).status {
                pg_sys::WalRcvExecStatus::WALRCV_OK_COPY_BOTH
                | pg_sys::WalRcvExecStatus::WALRCV_OK_COPY_OUT => Ok(()),
                _ => Err(PeerError::Remote(err_text(res))),
            };
            pg_sys::walrcv_clear_result(res);
            out
        }
    }

    /// Reads one frame without blocking. The slice lives until the next call.
    pub fn receive(&mut self) -> Received<'_> {
        let recv = functions().walrcv_receive.expect("walrcv_receive");
        let mut buf: *mut std::ffi::c_char = std::ptr::null_mut();
        let mut fd: pg_sys::pgsocket = -1;
        let conn = self.conn;
        // SAFETY: live connection; libpq owns the buffer until the next call.
        let n = unsafe { pg_guard_ffi_boundary(|| recv(conn, &mut buf, &mut fd)) };
        if n > 0 {
            // SAFETY: libpq returned `n` readable bytes at `buf`.
            Received::Data(unsafe { std::slice::from_raw_parts(buf as *const u8, n as usize) })
        } else if n == 0 {
            Received::WouldBlock(fd)
        } else {
            Received::End
        }
    }

    pub fn send(&self, data: &[u8]) {
        let send = functions().walrcv_send.expect("walrcv_send");
        let conn = self.conn;
        // SAFETY: live connection; `data` outlives the call.
        unsafe {
            pg_guard_ffi_boundary(|| send(conn, data.as_ptr() as *const _, data.len() as i32))
        };
    }
}

fn err_text(res: *mut pg_sys::WalRcvExecResult) -> String {
    // SAFETY: `err` is NULL or a NUL-terminated string owned by the result.
    unsafe {
        if (*res).err.is_null() {
            "the remote command failed".to_string()
        } else {
            CStr::from_ptr((*res).err)
                .to_string_lossy()
                .trim()
                .to_string()
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(disconnect) = functions().walrcv_disconnect {
            let conn = self.conn;
            // SAFETY: closes the connection this value owns, once.
            unsafe { pg_guard_ffi_boundary(|| disconnect(conn)) };
        }
    }
}

pub use bdr_core::quote::{ident, literal};

//! WAL checkpoints off the request path, for the server.
//!
//! SQLite's own checkpoint runs inside the commit that crosses its threshold, holding the
//! store for as long as copying a thousand frames back and two fsyncs take (about 4 ms on
//! the project's machine, far more when the disk stalls): under steady load that stall was
//! the p99. Here a thread with its own connection copies frames back while requests go on;
//! once the WAL is long enough, it holds the store for a moment to copy the few committed
//! meanwhile. With every frame copied and no write under way, the next write starts the
//! WAL from the beginning again; without that moment, a write is always under way and the
//! WAL grows without end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{Store, StoreError, configure};
use crate::periodic::Periodic;

/// SQLite's own checkpoint threshold (its default), handed back to the serving connection
/// while this thread fails and once it ends.
const SQLITE_CHECKPOINT_FRAMES: i64 = 1_000;

/// What the WAL file is cut back to when it restarts, should a long read have grown it.
const WAL_SIZE_LIMIT_BYTES: i64 = 16 * 1024 * 1024;

/// How often a checkpoint that keeps failing is reported again.
const REPORT_FAILURE_EVERY: Duration = Duration::from_secs(60);

/// What one `PRAGMA wal_checkpoint(PASSIVE)` found.
struct Pass {
    /// Frames in the WAL (-1 when another checkpoint was under way).
    frames: i64,
    /// Frames copied back to the database so far.
    backfilled: i64,
}

fn passive(conn: &Connection) -> Result<Pass, StoreError> {
    Ok(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(Pass {
            frames: r.get(1)?,
            backfilled: r.get(2)?,
        })
    })?)
}

impl Store {
    /// Checkpoints this store's WAL every `every` on a thread of its own, and lets it
    /// restart once it holds `restart_after` frames, until the returned handle is stopped
    /// or dropped.
    pub fn checkpoint_in_background(
        self: &Arc<Self>,
        every: Duration,
        restart_after: i64,
    ) -> Result<Periodic, StoreError> {
        let conn = Connection::open(&self.path)?;
        // Synchronous NORMAL: a checkpoint syncs the WAL before copying and the database
        // after, as the serving connection's own would.
        configure(&conn)?;
        self.connection()
            .pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        // The task's handle on the store; dropped with the task when the thread ends,
        // however it ends.
        let sqlite = SqliteCheckpoints(Arc::clone(self));
        let mut frames_before = 0;
        let mut failing_since: Option<Instant> = None;
        let thread = Periodic::spawn("wal-checkpoint", every, move || {
            match sqlite.0.checkpoint_pass(&conn, frames_before, restart_after) {
                Ok(frames) => {
                    frames_before = frames;
                    if failing_since.take().is_some() {
                        sqlite.take_over();
                        tracing::info!("WAL checkpoints work again");
                    }
                }
                Err(e) => {
                    if failing_since.is_none() {
                        sqlite.hand_back();
                    }
                    if failing_since.is_none_or(|t| t.elapsed() >= REPORT_FAILURE_EVERY) {
                        tracing::warn!(error = %e, "WAL checkpoint failed; SQLite checkpoints in the commit meanwhile");
                        failing_since = Some(Instant::now());
                    }
                }
            }
        })
        .map_err(StoreError::CheckpointThread)?;
        // Only with the thread running (if this fails, dropping it stops the thread and
        // hands SQLite its checkpoints back).
        self.connection()
            .pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(thread)
    }

    /// One checkpoint; `frames_before` is what the previous one left in the WAL. Returns
    /// the frames in the WAL now.
    fn checkpoint_pass(
        &self,
        conn: &Connection,
        frames_before: i64,
        restart_after: i64,
    ) -> Result<i64, StoreError> {
        let first = passive(conn)?;
        // Much left to copy (a long read held the checkpoint back, or the WAL is catching
        // up after one): the next passes copy it without holding requests off, unless the
        // WAL has grown so long that copying cannot be keeping up with the writes.
        let catching_up = first.frames - first.backfilled > restart_after / 2
            && first.frames < restart_after.saturating_mul(50);
        // Short enough to keep going (or another checkpoint under way: -1), untouched since
        // the last pass and all copied, or catching up: nothing to finish now.
        if first.frames < restart_after.max(1)
            || (first.frames == frames_before && first.backfilled == first.frames)
            || catching_up
        {
            return Ok(first.frames);
        }
        // Finish with this process's writers held off: the one moment requests wait, for
        // the frames committed during the first pass and two fsyncs, so only every
        // `restart_after` frames. Even when the pass above copied everything, a write that
        // began before it ended appends to the WAL instead of restarting it; only a write
        // that begins after everything is copied restarts it.
        let _writers = self.connection();
        Ok(passive(conn)?.frames)
    }
}

/// The serving connection's own checkpoints: off while the thread does them, back on
/// (SQLite's default) while it fails and once it ends.
struct SqliteCheckpoints(Arc<Store>);

impl SqliteCheckpoints {
    fn set(&self, frames: i64) {
        if let Err(e) = self
            .0
            .connection()
            .pragma_update(None, "wal_autocheckpoint", frames)
        {
            tracing::error!(error = %e, frames, "cannot set wal_autocheckpoint");
        }
    }

    fn take_over(&self) {
        self.set(0);
    }

    fn hand_back(&self) {
        self.set(SQLITE_CHECKPOINT_FRAMES);
    }
}

impl Drop for SqliteCheckpoints {
    fn drop(&mut self) {
        self.hand_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;

    fn record(store: &Store, outcome: String) {
        let event = AuditEvent {
            action: "test".into(),
            outcome,
            ..AuditEvent::default()
        };
        store.write(|tx| tx.append_audit(&event)).unwrap();
    }

    #[test]
    fn once_all_is_copied_the_next_write_restarts_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        configure(&conn).unwrap();
        for i in 0..200 {
            record(&store, i.to_string());
        }
        let frames = store.checkpoint_pass(&conn, 0, 100).unwrap();
        assert!(frames >= 400, "{frames} frames");
        assert_eq!(passive(&conn).unwrap().backfilled, frames);
        record(&store, "after".into());
        // The WAL holds only the write after the pass: it started from the beginning.
        let after = passive(&conn).unwrap();
        assert!((1..=3).contains(&after.frames), "{} frames", after.frames);
        assert_eq!(store.read(|tx| tx.audit_records(None)).unwrap().len(), 201);
    }

    #[test]
    fn the_wal_restarts_under_continuous_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(Store::open(&path).unwrap());
        let checkpointer = store
            .checkpoint_in_background(Duration::from_millis(10), 200)
            .unwrap();
        let records = 3_000;
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..records / 2 {
                        record(&store, format!("{w}-{i}"));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let own = |store: &Store| -> i64 {
            store
                .connection()
                .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(
            own(&store),
            0,
            "SQLite checkpoints in the commit while the thread runs"
        );
        checkpointer.stop();
        assert_eq!(own(&store), 1_000, "and again once it has stopped");
        // Each record adds two frames of 4 KiB (the table's last page and its time index's),
        // and new pages as they fill: a WAL never restarted holds about 28 MB here, below
        // the backstop. Half that leaves the thread room to be scheduled late.
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        assert!(wal < 14_000_000, "WAL is {wal} bytes");
        let all = store.read(|tx| tx.audit_records(None)).unwrap();
        assert_eq!(all.len(), records);
        assert_eq!(crate::audit::verify(all).unwrap().records, records as u64);
    }
}

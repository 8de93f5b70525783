//! WAL checkpoints off the request path, for the server.
//!
//! SQLite's own checkpoint runs inside the commit that crosses its threshold, holding the
//! store for as long as copying a thousand frames back takes (about 4 ms on the project's
//! machine): under steady load that stall was the p99. Here a thread with its own
//! connection copies frames back while requests go on, then holds the store for a moment
//! to copy the few committed meanwhile. With every frame copied and no write under way, the
//! next write starts the WAL from the beginning again; without that moment, a write is
//! always under way and the WAL grows without end.

use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::{Store, StoreError};

/// Frames in the WAL at which a commit still checkpoints by itself, should this thread
/// fall behind (it lets the WAL restart long before: at saturation, 50 ms of writes are
/// about 1,000 frames).
const BACKSTOP_FRAMES: i64 = 10_000;

/// The background checkpoint thread; [`WalCheckpointer::stop`] ends it.
pub struct WalCheckpointer {
    stop: SyncSender<()>,
    thread: JoinHandle<()>,
}

/// What one `PRAGMA wal_checkpoint(PASSIVE)` did.
struct Pass {
    /// Frames in the WAL.
    log: i64,
    /// Frames copied back to the database (all of them, once it catches up).
    copied: i64,
}

fn passive(conn: &Connection) -> Result<Pass, StoreError> {
    Ok(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(Pass {
            log: r.get(1)?,
            copied: r.get(2)?,
        })
    })?)
}

impl Store {
    /// Starts checkpointing this store's WAL every `every` on a thread of its own.
    pub fn checkpoint_in_background(
        self: &Arc<Self>,
        every: Duration,
    ) -> Result<WalCheckpointer, StoreError> {
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // A checkpoint syncs the WAL before copying and the database after, as the serving
        // connection's own would.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.connection()
            .pragma_update(None, "wal_autocheckpoint", BACKSTOP_FRAMES)?;
        let store = Arc::clone(self);
        let (stop, stopped) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || {
                let (mut failing, mut rested) = (false, 0);
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    match store.checkpoint_step(&conn, rested) {
                        Ok(log) => {
                            rested = log;
                            if failing {
                                tracing::info!("WAL checkpoints work again");
                                failing = false;
                            }
                        }
                        // Once per failing spell: the backstop keeps the WAL bounded meanwhile.
                        Err(e) if !failing => {
                            tracing::warn!(error = %e, "WAL checkpoint failed");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(StoreError::CheckpointThread)?;
        Ok(WalCheckpointer { stop, thread })
    }

    /// One pass; `rested` is the WAL's size after the previous one. Returns its size now.
    fn checkpoint_step(&self, conn: &Connection, rested: i64) -> Result<i64, StoreError> {
        let bulk = passive(conn)?;
        // Restarted since (0), busy with another checkpointer (-1), or unchanged and all
        // copied: nothing to finish.
        if bulk.log <= 0 || (bulk.log == rested && bulk.copied == bulk.log) {
            return Ok(bulk.log);
        }
        // Finish with the writers held off. Even when the pass above copied everything, a
        // write that began before it ended appends to the WAL instead of restarting it;
        // only a write that begins after everything is copied restarts it.
        let _writers = self.connection();
        Ok(passive(conn)?.log)
    }
}

impl WalCheckpointer {
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;

    #[test]
    fn the_wal_restarts_under_continuous_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(Store::open(&path).unwrap());
        let checkpointer = store
            .checkpoint_in_background(Duration::from_millis(10))
            .unwrap();
        let records = 3_000;
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..records / 2 {
                        let event = AuditEvent {
                            action: "test".into(),
                            outcome: format!("{w}-{i}"),
                            ..AuditEvent::default()
                        };
                        store.write(|tx| tx.append_audit(&event)).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        checkpointer.stop();
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

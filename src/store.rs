//! The SQLite store of requests and smart cards, with schema migrations.
//!
//! All access goes through [`Store::read`] and [`Store::write`], which run a closure over a
//! transaction: the rules live in `service`, the SQL lives here, and every read-check-write
//! sequence is atomic.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use uuid::Uuid;

use crate::audit::{AuditEvent, AuditRecord, GENESIS, chain_hash};
use crate::diversify::Derivation;
use crate::domain::{Atr, CardId, RequestStatus, RequestType, SmartcardStatus};

mod checkpoint;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: corrupt row: {0}")]
    Corrupt(String),
    #[error("store: cannot start the WAL checkpoint thread: {0}")]
    CheckpointThread(std::io::Error),
}

/// Schema steps; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE requests (
    uuid               TEXT PRIMARY KEY,
    request_type       INTEGER NOT NULL,
    status             INTEGER NOT NULL,
    template_uuid      TEXT NOT NULL,
    new_smartcard_uuid TEXT REFERENCES smartcards(uuid),
    old_smartcard_uuid TEXT REFERENCES smartcards(uuid),
    originator_uuid    TEXT NOT NULL,
    originator_name    TEXT NOT NULL,
    target             TEXT,
    comment            TEXT,
    priority           INTEGER NOT NULL DEFAULT 0,
    submitted          TEXT NOT NULL,
    completed          TEXT
);
CREATE TABLE approvals (
    request_uuid TEXT NOT NULL REFERENCES requests(uuid),
    approver     TEXT NOT NULL,
    decided      TEXT NOT NULL,
    PRIMARY KEY (request_uuid, approver)
);
CREATE TABLE smartcards (
    uuid              TEXT PRIMARY KEY,
    card_id           TEXT NOT NULL UNIQUE,
    status            INTEGER NOT NULL,
    template_uuid     TEXT NOT NULL,
    atr               TEXT,
    master_key_label  TEXT,
    admin_key_version INTEGER,
    derivation        TEXT,
    created           TEXT NOT NULL
);
CREATE INDEX requests_new_card ON requests(new_smartcard_uuid);
CREATE INDEX requests_old_card ON requests(old_smartcard_uuid);
"#,
    r#"
CREATE TABLE audit (
    id                 INTEGER PRIMARY KEY,
    time               TEXT NOT NULL,
    caller             TEXT,
    source             TEXT,
    correlation_id     TEXT,
    action             TEXT NOT NULL,
    request_uuid       TEXT,
    smartcard_uuid     TEXT,
    card_id            TEXT,
    template_uuid      TEXT,
    algorithm          TEXT,
    master_key_label   TEXT,
    master_key_version INTEGER,
    kcv                TEXT,
    outcome            TEXT NOT NULL,
    prev_hash          TEXT NOT NULL,
    hash               TEXT NOT NULL
);
CREATE INDEX audit_time ON audit(time);
-- Append-only for divkey itself; the hash chain catches what bypasses these.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"#,
    r#"
-- The KCV of the master key a card's key was first derived with: a different key under the
-- same label and version is refused instead of handing the card a wrong key.
ALTER TABLE smartcards ADD COLUMN master_key_kcv TEXT;
-- The status a card had before an open request took it over, restored if that request ends
-- without completing.
ALTER TABLE smartcards ADD COLUMN status_before_request INTEGER;
"#,
    r#"
-- Master key versions no longer used for new cards; cards issued under them keep working.
CREATE TABLE retired_master_key_versions (
    label   TEXT NOT NULL,
    version INTEGER NOT NULL,
    retired TEXT NOT NULL,
    PRIMARY KEY (label, version)
);
"#,
];

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ','now')";

#[derive(Debug, Clone)]
pub struct Request {
    pub uuid: Uuid,
    pub request_type: RequestType,
    pub status: RequestStatus,
    pub template: Uuid,
    pub new_smartcard: Option<Uuid>,
    pub old_smartcard: Option<Uuid>,
    pub originator_uuid: Uuid,
    pub originator_name: String,
    pub target: Option<String>,
    pub comment: Option<String>,
    pub priority: i64,
    pub submitted: String,
    pub completed: Option<String>,
}

impl Request {
    /// Whether `card` is this request's new or existing card.
    pub fn binds(&self, card: &Uuid) -> bool {
        self.new_smartcard.as_ref() == Some(card) || self.old_smartcard.as_ref() == Some(card)
    }
}

/// How a card's admin key is derived: pinned at first binding, never changed afterwards.
#[derive(Debug, Clone)]
pub struct KeyBinding {
    pub master_key_label: String,
    pub version: u32,
    /// KCV of that master key version (absent only on cards bound before it was recorded).
    pub master_key_kcv: Option<String>,
    pub derivation: Derivation,
}

#[derive(Debug, Clone)]
pub struct Smartcard {
    pub uuid: Uuid,
    pub card_id: CardId,
    pub status: SmartcardStatus,
    pub template: Uuid,
    pub atr: Option<String>,
    pub key: Option<KeyBinding>,
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn uuid_col(row: &Row, i: usize) -> rusqlite::Result<Uuid> {
    let s: String = row.get(i)?;
    Uuid::parse_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn opt_uuid_col(row: &Row, i: usize) -> rusqlite::Result<Option<Uuid>> {
    let s: Option<String> = row.get(i)?;
    s.map(|s| {
        Uuid::parse_str(&s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Integer,
        format!("unknown {what}").into(),
    )
}

const REQUEST_COLUMNS: &str = "uuid, request_type, status, template_uuid, new_smartcard_uuid, \
     old_smartcard_uuid, originator_uuid, originator_name, target, comment, priority, submitted, completed";

fn request_row(row: &Row) -> rusqlite::Result<Request> {
    Ok(Request {
        uuid: uuid_col(row, 0)?,
        request_type: RequestType::from_number(row.get(1)?)
            .ok_or_else(|| corrupt("request type"))?,
        status: RequestStatus::from_number(row.get(2)?).ok_or_else(|| corrupt("request status"))?,
        template: uuid_col(row, 3)?,
        new_smartcard: opt_uuid_col(row, 4)?,
        old_smartcard: opt_uuid_col(row, 5)?,
        originator_uuid: uuid_col(row, 6)?,
        originator_name: row.get(7)?,
        target: row.get(8)?,
        comment: row.get(9)?,
        priority: row.get(10)?,
        submitted: row.get(11)?,
        completed: row.get(12)?,
    })
}

const CARD_COLUMNS: &str = "uuid, card_id, status, template_uuid, atr, master_key_label, \
     admin_key_version, derivation, master_key_kcv";

fn card_row(row: &Row) -> rusqlite::Result<Smartcard> {
    let card_id = CardId::from_uuid(uuid_col(row, 1)?);
    let label: Option<String> = row.get(5)?;
    let version: Option<u32> = row.get(6)?;
    let derivation: Option<String> = row.get(7)?;
    let key = match (label, version, derivation) {
        (Some(master_key_label), Some(version), Some(d)) => Some(KeyBinding {
            master_key_label,
            version,
            master_key_kcv: row.get(8)?,
            derivation: serde_json::from_str(&d).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    7,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
        }),
        _ => None,
    };
    Ok(Smartcard {
        uuid: uuid_col(row, 0)?,
        card_id,
        status: SmartcardStatus::from_number(row.get(2)?).ok_or_else(|| corrupt("card status"))?,
        template: uuid_col(row, 3)?,
        atr: row.get(4)?,
        key,
    })
}

/// Typed queries inside one transaction.
pub struct Tx<'a>(&'a Connection);

/// Runs one statement from the connection's statement cache.
fn execute_cached(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Rolls back the transaction if it is still open when dropped: an error, a failed
/// commit or a panic inside the closure leaves nothing half-written behind.
struct OpenTx<'a>(&'a Connection);

impl Drop for OpenTx<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            let _ = self.0.execute_batch("ROLLBACK");
        }
    }
}

impl Tx<'_> {
    pub fn request(&self, id: &Uuid) -> Result<Option<Request>, StoreError> {
        Ok(self
            .0
            .prepare_cached(&format!(
                "SELECT {REQUEST_COLUMNS} FROM requests WHERE uuid = ?1"
            ))?
            .query_row([id.to_string()], request_row)
            .optional()?)
    }

    pub fn card(&self, id: &Uuid) -> Result<Option<Smartcard>, StoreError> {
        Ok(self
            .0
            .prepare_cached(&format!(
                "SELECT {CARD_COLUMNS} FROM smartcards WHERE uuid = ?1"
            ))?
            .query_row([id.to_string()], card_row)
            .optional()?)
    }

    pub fn card_by_card_id(&self, card_id: &CardId) -> Result<Option<Smartcard>, StoreError> {
        Ok(self
            .0
            .prepare_cached(&format!(
                "SELECT {CARD_COLUMNS} FROM smartcards WHERE card_id = ?1"
            ))?
            .query_row([card_id.to_string()], card_row)
            .optional()?)
    }

    /// Every (master key label, version, KCV) that issued cards were derived with.
    pub fn master_keys_in_use(&self) -> Result<Vec<(String, u32, Option<String>)>, StoreError> {
        let mut stmt = self.0.prepare(
            "SELECT DISTINCT master_key_label, admin_key_version, master_key_kcv FROM smartcards \
             WHERE master_key_label IS NOT NULL AND admin_key_version IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Versions of `label` retired for new cards.
    pub fn retired_versions(&self, label: &str) -> Result<Vec<u32>, StoreError> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT version FROM retired_master_key_versions WHERE label = ?1")?;
        let rows = stmt.query_map([label], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn retire_version(&self, label: &str, version: u32) -> Result<(), StoreError> {
        self.0.execute(
            &format!(
                "INSERT OR IGNORE INTO retired_master_key_versions (label, version, retired) \
                 VALUES (?1, ?2, {NOW})"
            ),
            params![label, version],
        )?;
        Ok(())
    }

    /// How many cards were issued under this master key version.
    pub fn cards_using(&self, label: &str, version: u32) -> Result<i64, StoreError> {
        Ok(self.0.query_row(
            "SELECT COUNT(*) FROM smartcards WHERE master_key_label = ?1 AND admin_key_version = ?2",
            params![label, version],
            |r| r.get(0),
        )?)
    }

    /// Requests that are still open (not in a final state) and bind `card`.
    pub fn open_requests_binding(&self, card: &Uuid) -> Result<Vec<Request>, StoreError> {
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT {REQUEST_COLUMNS} FROM requests \
             WHERE (new_smartcard_uuid = ?1 OR old_smartcard_uuid = ?1) AND status IN (?2, ?3, ?4)"
        ))?;
        let rows = stmt.query_map(
            params![
                card.to_string(),
                RequestStatus::Pending.number(),
                RequestStatus::Approved.number(),
                RequestStatus::Executing.number()
            ],
            request_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn insert_request(&self, r: &Request) -> Result<Request, StoreError> {
        self.0.execute(
            &format!(
                "INSERT INTO requests ({REQUEST_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, {NOW}, NULL)"
            ),
            params![
                r.uuid.to_string(),
                r.request_type.number(),
                r.status.number(),
                r.template.to_string(),
                r.new_smartcard.map(|u| u.to_string()),
                r.old_smartcard.map(|u| u.to_string()),
                r.originator_uuid.to_string(),
                r.originator_name,
                r.target,
                r.comment,
                r.priority,
            ],
        )?;
        self.request(&r.uuid)?
            .ok_or_else(|| StoreError::Corrupt("inserted request vanished".into()))
    }

    /// Sets the status (and the completion time when the status is final).
    pub fn set_request_status(&self, id: &Uuid, status: RequestStatus) -> Result<(), StoreError> {
        self.0.execute(
            &format!(
                "UPDATE requests SET status = ?2, \
                 completed = CASE WHEN ?3 THEN {NOW} ELSE completed END WHERE uuid = ?1"
            ),
            params![id.to_string(), status.number(), status.is_final()],
        )?;
        Ok(())
    }

    pub fn set_request_new_card(&self, id: &Uuid, card: &Uuid) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE requests SET new_smartcard_uuid = ?2 WHERE uuid = ?1",
            params![id.to_string(), card.to_string()],
        )?;
        Ok(())
    }

    /// Records an approval; returns the number of distinct approvers so far.
    pub fn add_approval(&self, id: &Uuid, approver: &str) -> Result<u32, StoreError> {
        self.0.execute(
            &format!(
                "INSERT OR IGNORE INTO approvals (request_uuid, approver, decided) VALUES (?1, ?2, {NOW})"
            ),
            params![id.to_string(), approver],
        )?;
        Ok(self.0.query_row(
            "SELECT COUNT(*) FROM approvals WHERE request_uuid = ?1",
            [id.to_string()],
            |r| r.get(0),
        )?)
    }

    pub fn insert_card(&self, c: &Smartcard) -> Result<(), StoreError> {
        let derivation = c
            .key
            .as_ref()
            .map(|k| serde_json::to_string(&k.derivation))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.0.execute(
            &format!(
                "INSERT INTO smartcards ({CARD_COLUMNS}, created) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, {NOW})"
            ),
            params![
                c.uuid.to_string(),
                c.card_id.to_string(),
                c.status.number(),
                c.template.to_string(),
                c.atr,
                c.key.as_ref().map(|k| k.master_key_label.clone()),
                c.key.as_ref().map(|k| k.version),
                derivation,
                c.key.as_ref().and_then(|k| k.master_key_kcv.clone()),
            ],
        )?;
        Ok(())
    }

    pub fn set_card_status(&self, id: &Uuid, status: SmartcardStatus) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE smartcards SET status = ?2, status_before_request = NULL WHERE uuid = ?1",
            params![id.to_string(), status.number()],
        )?;
        Ok(())
    }

    /// Marks the card as taken over by an open request, remembering its status.
    pub fn assign_card(&self, id: &Uuid) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE smartcards SET status_before_request = status, status = ?2 WHERE uuid = ?1",
            params![id.to_string(), SmartcardStatus::Assigned.number()],
        )?;
        Ok(())
    }

    /// Gives the card back the status it had before an open request took it over (New for a
    /// card first bound by that request).
    pub fn restore_card_status(&self, id: &Uuid) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE smartcards SET status = COALESCE(status_before_request, ?2), \
             status_before_request = NULL WHERE uuid = ?1 AND status = ?3",
            params![
                id.to_string(),
                SmartcardStatus::New.number(),
                SmartcardStatus::Assigned.number()
            ],
        )?;
        Ok(())
    }

    pub fn set_card_atr(&self, id: &Uuid, atr: &Atr) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE smartcards SET atr = ?2 WHERE uuid = ?1",
            params![id.to_string(), atr.as_str()],
        )?;
        Ok(())
    }
}

const AUDIT_COLUMNS: &str = "id, time, caller, source, correlation_id, action, request_uuid, \
     smartcard_uuid, card_id, template_uuid, algorithm, master_key_label, master_key_version, kcv, \
     outcome, prev_hash, hash";

fn audit_row(row: &Row) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        id: row.get(0)?,
        time: row.get(1)?,
        event: AuditEvent {
            caller: row.get(2)?,
            source: row.get(3)?,
            correlation_id: row.get(4)?,
            action: row.get(5)?,
            request: opt_uuid_col(row, 6)?,
            smartcard: opt_uuid_col(row, 7)?,
            card_id: row.get(8)?,
            template: opt_uuid_col(row, 9)?,
            algorithm: row.get(10)?,
            master_key_label: row.get(11)?,
            master_key_version: row.get(12)?,
            kcv: row.get(13)?,
            outcome: row.get(14)?,
        },
        prev_hash: row.get(15)?,
        hash: row.get(16)?,
    })
}

impl Tx<'_> {
    /// Appends one audit record, chained to the last one.
    pub fn append_audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
        let (last_id, prev): (i64, String) = self
            .0
            .prepare_cached("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .unwrap_or((0, GENESIS.to_owned()));
        let id = last_id + 1;
        let time: String = self
            .0
            .prepare_cached(&format!("SELECT {NOW}"))?
            .query_row([], |r| r.get(0))?;
        let hash = chain_hash(&prev, id, &time, e);
        self.0
            .prepare_cached(&format!(
                "INSERT INTO audit ({AUDIT_COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
            ))?
            .execute(params![
                id,
                time,
                e.caller,
                e.source,
                e.correlation_id,
                e.action,
                e.request.map(|u| u.to_string()),
                e.smartcard.map(|u| u.to_string()),
                e.card_id,
                e.template.map(|u| u.to_string()),
                e.algorithm,
                e.master_key_label,
                e.master_key_version,
                e.kcv,
                e.outcome,
                prev,
                hash,
            ])?;
        Ok(())
    }

    /// Audit records in chain order, from `since` (an RFC 3339 time) on when given.
    pub fn audit_records(&self, since: Option<&str>) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = self.0.prepare(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE ?1 IS NULL OR time >= ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([since], audit_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// What every connection to the database sets (SQLite keeps these per connection): wait for
/// another process's lock rather than fail, and sync the WAL at checkpoints, not commits.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

impl Store {
    /// Opens (or creates) the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        // Requests, cards and the audit trail are for divkey's user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        configure(&conn)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    fn run<T, E: From<StoreError>>(
        &self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&Tx) -> Result<T, E>,
    ) -> Result<T, E> {
        let conn = self.connection();
        if !conn.is_autocommit() {
            // A rollback that failed earlier: clear it before starting anew.
            conn.execute_batch("ROLLBACK").map_err(StoreError::from)?;
        }
        // Cached BEGIN/COMMIT: on the key path every request runs two transactions, and
        // parsing them anew each time is measurable.
        let begin = match behavior {
            TransactionBehavior::Immediate => "BEGIN IMMEDIATE",
            TransactionBehavior::Exclusive => "BEGIN EXCLUSIVE",
            _ => "BEGIN DEFERRED",
        };
        execute_cached(&conn, begin)?;
        let _open = OpenTx(&conn);
        let out = f(&Tx(&conn))?;
        execute_cached(&conn, "COMMIT")?;
        Ok(out)
    }

    /// The connection. A panic inside a transaction poisons the lock but leaves nothing
    /// half-done (`OpenTx` rolled it back), so the connection stays usable.
    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` in a read transaction.
    pub fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Tx) -> Result<T, E>,
    ) -> Result<T, E> {
        self.run(TransactionBehavior::Deferred, f)
    }

    /// Runs `f` in a write transaction, committed only if `f` succeeds.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Tx) -> Result<T, E>,
    ) -> Result<T, E> {
        self.run(TransactionBehavior::Immediate, f)
    }

    /// Opens an existing database read-only, for reading the audit trail: nothing is
    /// written (an auditor needs read access only, and a live server's files are left
    /// alone), and a mistyped path is an error, not an empty, intact trail.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Corrupt(format!(
                "no database at {}",
                path.display()
            )));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&conn)?;
        let done = schema_version(&conn)?;
        if done < MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "schema version {done} is older than this divkey's ({}): start `divkey serve` \
                 once to bring it up to date",
                MIGRATIONS.len()
            )));
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    /// Whether the database answers (for readiness).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.connection().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }
}

/// The number of schema steps the database has had (`PRAGMA user_version`).
fn schema_version(conn: &Connection) -> Result<usize, StoreError> {
    let done: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let done = usize::try_from(done).unwrap_or(usize::MAX);
    if done > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "schema version {done} is newer than this divkey knows ({})",
            MIGRATIONS.len()
        )));
    }
    Ok(done)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // Up to date, the usual case: nothing is written, so opening a database that a running
    // server writes to leaves it alone.
    if schema_version(conn)? == MIGRATIONS.len() {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    // Again under the lock: another process may have migrated it meanwhile.
    let done = schema_version(&tx)?;
    for step in &MIGRATIONS[done..] {
        tx.execute_batch(step)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(outcome: &str) -> AuditEvent {
        AuditEvent {
            action: "test".into(),
            outcome: outcome.into(),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn the_audit_trail_is_read_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Store::open(&path).unwrap();
        store.write(|tx| tx.append_audit(&event("first"))).unwrap();
        // Read-only while the writer is open, as `divkey audit verify` beside the server.
        let reader = Store::open_read_only(&path).unwrap();
        assert_eq!(reader.read(|tx| tx.audit_records(None)).unwrap().len(), 1);
        let refused = reader.write(|tx| tx.append_audit(&event("no")));
        assert!(matches!(refused, Err(StoreError::Sqlite(_))), "{refused:?}");
        assert!(Store::open_read_only(&dir.path().join("missing.db")).is_err());
        drop(reader);
        assert_eq!(store.read(|tx| tx.audit_records(None)).unwrap().len(), 1);
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_the_store_usable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).unwrap();
        store.write(|tx| tx.append_audit(&event("first"))).unwrap();
        let failed: Result<(), StoreError> = store.write(|tx| {
            tx.append_audit(&event("rolled back"))?;
            Err(StoreError::Corrupt("refused".into()))
        });
        assert!(failed.is_err());
        // The connection is back in autocommit: the next transactions begin and commit.
        store.write(|tx| tx.append_audit(&event("second"))).unwrap();
        let records = store.read(|tx| tx.audit_records(None)).unwrap();
        let outcomes: Vec<_> = records.iter().map(|r| r.event.outcome.as_str()).collect();
        assert_eq!(outcomes, ["first", "second"]);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(records[1].id, 2);
    }
}

//! The audit trail's record format and its hash chain: every record carries the SHA-256 of
//! the record before it, so an altered, deleted or reordered record breaks the chain.
//! The store keeps the records; this module knows how they are hashed and verified.

use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Hash that precedes the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, by whom, to what. Never key bytes: the released key is named by its KCV.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvent {
    pub caller: Option<String>,
    pub source: Option<String>,
    pub correlation_id: Option<String>,
    pub action: String,
    pub request: Option<Uuid>,
    pub smartcard: Option<Uuid>,
    pub card_id: Option<String>,
    pub template: Option<Uuid>,
    pub algorithm: Option<String>,
    pub master_key_label: Option<String>,
    pub master_key_version: Option<u32>,
    pub kcv: Option<String>,
    pub outcome: String,
}

/// A stored record: the event, its place and time, and its links in the chain.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub time: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// SHA-256 over the previous hash and every field, each length-prefixed (absent fields
/// marked apart from empty ones), so no two different records hash alike.
pub fn chain_hash(prev_hash: &str, id: i64, time: &str, e: &AuditEvent) -> String {
    let mut h = Sha256::new();
    let mut field = |v: Option<&str>| match v {
        Some(s) => {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        }
        None => h.update(u64::MAX.to_be_bytes()),
    };
    let uuid = |u: &Option<Uuid>| u.map(|u| u.to_string());
    field(Some(prev_hash));
    field(Some(&id.to_string()));
    field(Some(time));
    field(e.caller.as_deref());
    field(e.source.as_deref());
    field(e.correlation_id.as_deref());
    field(Some(&e.action));
    field(uuid(&e.request).as_deref());
    field(uuid(&e.smartcard).as_deref());
    field(e.card_id.as_deref());
    field(uuid(&e.template).as_deref());
    field(e.algorithm.as_deref());
    field(e.master_key_label.as_deref());
    field(e.master_key_version.map(|v| v.to_string()).as_deref());
    field(e.kcv.as_deref());
    field(Some(&e.outcome));
    hex::encode(h.finalize())
}

#[derive(Debug, PartialEq, Eq)]
pub struct ChainBreak {
    /// Id of the first record that does not verify (or the id missing at that place).
    pub id: i64,
    pub reason: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub records: u64,
    pub last_hash: String,
}

/// Checks ids run 1, 2, 3… without gaps, each record links to the one before, and each hash
/// matches its content. Returns the head (to anchor elsewhere) or the first break.
pub fn verify(records: impl IntoIterator<Item = AuditRecord>) -> Result<ChainHead, ChainBreak> {
    let mut prev = GENESIS.to_owned();
    let mut count = 0;
    for (expected_id, r) in (1..).zip(records) {
        if r.id != expected_id {
            return Err(ChainBreak {
                id: r.id,
                reason: format!(
                    "record {expected_id} is missing or out of order (found {})",
                    r.id
                ),
            });
        }
        if r.prev_hash != prev {
            return Err(ChainBreak {
                id: r.id,
                reason: "does not link to the record before it".into(),
            });
        }
        if chain_hash(&r.prev_hash, r.id, &r.time, &r.event) != r.hash {
            return Err(ChainBreak {
                id: r.id,
                reason: "its content does not match its hash".into(),
            });
        }
        prev = r.hash;
        count += 1;
    }
    Ok(ChainHead {
        records: count,
        last_hash: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|id| {
                let event = AuditEvent {
                    action: "key.release".into(),
                    outcome: format!("ok {id}"),
                    ..Default::default()
                };
                let time = format!("2026-01-01T00:00:{id:02}Z");
                let hash = chain_hash(&prev, id, &time, &event);
                let r = AuditRecord {
                    id,
                    time,
                    event,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                r
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify(chain(5)).unwrap().records, 5);
    }

    #[test]
    fn tampering_is_found_at_the_first_bad_record() {
        let mut c = chain(5);
        c[2].event.outcome = "changed".into();
        assert_eq!(verify(c).unwrap_err().id, 3);
        let mut c = chain(5);
        c.remove(1);
        assert_eq!(verify(c).unwrap_err().id, 3);
        let mut c = chain(5);
        c.swap(1, 3);
        assert_eq!(verify(c).unwrap_err().id, 4);
        let mut c = chain(5);
        c[3].event.card_id = Some(String::new());
        assert_eq!(verify(c).unwrap_err().id, 4);
    }
}

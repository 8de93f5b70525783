//! Who may do what: callers, their credentials, and their permissions per profile template.
//! Default is nothing: a caller holds only the permissions its configuration lists.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::config::CallerConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Create requests.
    Request,
    /// Approve or deny pending requests.
    Approve,
    /// Bind cards to requests.
    Bind,
    /// Obtain diversified admin keys: the sensitive permission.
    ReadKey,
    /// Obtain admin challenge responses.
    Authenticate,
    /// Administer the template.
    Admin,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    /// Stable identifier, derived from the name, reported as `OriginatorUserUuid`.
    pub uuid: Uuid,
    permissions: BTreeMap<Uuid, BTreeSet<Permission>>,
}

impl Caller {
    pub fn may(&self, permission: Permission, template: &Uuid) -> bool {
        self.permissions
            .get(template)
            .is_some_and(|p| p.contains(&permission))
    }

    /// Whether the caller holds `permission` on any template.
    pub fn may_anywhere(&self, permission: Permission) -> bool {
        self.permissions.values().any(|p| p.contains(&permission))
    }

    /// Whether the caller holds any permission on any template.
    pub fn sees_any(&self) -> bool {
        self.permissions.values().any(|p| !p.is_empty())
    }

    /// Whether the caller holds any permission on the template.
    pub fn sees(&self, template: &Uuid) -> bool {
        self.permissions
            .get(template)
            .is_some_and(|p| !p.is_empty())
    }
}

struct Credential {
    token_sha256: [u8; 32],
    caller: Caller,
}

/// The configured callers, looked up by credential.
pub struct Policy {
    credentials: Vec<Credential>,
}

/// Namespace for caller UUIDs (v5 of the caller name).
const CALLER_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_2b9a_4d4c_4e0b_9a53_0c7d_2a51_d1e3);

impl Policy {
    pub fn new(callers: &[CallerConfig]) -> Self {
        let credentials = callers
            .iter()
            .filter_map(|c| {
                let mut token_sha256 = [0u8; 32];
                hex::decode_to_slice(c.token_sha256.as_deref()?, &mut token_sha256).ok()?;
                Some(Credential {
                    token_sha256,
                    caller: Caller {
                        name: c.name.clone(),
                        uuid: Uuid::new_v5(&CALLER_NAMESPACE, c.name.as_bytes()),
                        permissions: c
                            .permissions
                            .iter()
                            .map(|(t, p)| (*t, p.iter().copied().collect()))
                            .collect(),
                    },
                })
            })
            .collect();
        Self { credentials }
    }

    /// The caller presenting `token`, compared by hash in constant time against every
    /// configured credential.
    pub fn authenticate_token(&self, token: &[u8]) -> Option<&Caller> {
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for cred in &self.credentials {
            if bool::from(cred.token_sha256.ct_eq(&presented)) && found.is_none() {
                found = Some(&cred.caller);
            }
        }
        found
    }
}

/// SHA-256 of a token, as hex: what the config stores.
pub fn token_hash_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

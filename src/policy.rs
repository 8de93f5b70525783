//! Who may do what: callers, their credentials, and their permissions per profile template.
//! Default is nothing: a caller holds only the permissions its configuration lists.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use x509_parser::extensions::GeneralName;

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

/// What a verified client certificate says about its holder; computed once per connection.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    pub sha256: [u8; 32],
    pub subject: String,
    pub sans: Vec<String>,
}

impl ClientCertificate {
    /// Reads the fingerprint, subject and subject alternative names of a DER certificate
    /// that the TLS layer has already verified.
    pub fn from_der(der: &[u8]) -> Self {
        let sha256 = Sha256::digest(der).into();
        let (subject, sans) = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => {
                let sans = cert
                    .subject_alternative_name()
                    .ok()
                    .flatten()
                    .map(|ext| {
                        ext.value
                            .general_names
                            .iter()
                            .filter_map(|n| match n {
                                GeneralName::DNSName(s)
                                | GeneralName::RFC822Name(s)
                                | GeneralName::URI(s) => Some((*s).to_owned()),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (cert.subject().to_string(), sans)
            }
            Err(_) => (String::new(), Vec::new()),
        };
        Self {
            sha256,
            subject,
            sans,
        }
    }
}

/// "CN=a, O=b" and "cn=a,o=b" compare equal.
fn normalize_dn(dn: &str) -> String {
    dn.split(',')
        .map(|part| {
            part.split_once('=').map_or_else(
                || part.trim().to_lowercase(),
                |(k, v)| format!("{}={}", k.trim().to_lowercase(), v.trim().to_lowercase()),
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("credentials required")]
    Missing,
    #[error("invalid credentials")]
    UnknownToken,
    #[error("client certificate not mapped to a caller")]
    UnknownCertificate,
    #[error("the certificate and the token name different callers")]
    Mismatch,
}

struct Credential {
    token_sha256: Option<[u8; 32]>,
    cert_sha256: Option<[u8; 32]>,
    cert_subject: Option<String>,
    cert_san: Option<String>,
    caller: Caller,
}

impl Credential {
    fn matches_cert(&self, cert: &ClientCertificate) -> bool {
        let by_hash = self
            .cert_sha256
            .is_some_and(|h| bool::from(h.ct_eq(&cert.sha256)));
        let by_subject = self.cert_subject.as_ref().is_some_and(|s| {
            !cert.subject.is_empty() && normalize_dn(s) == normalize_dn(&cert.subject)
        });
        let by_san = self
            .cert_san
            .as_ref()
            .is_some_and(|s| cert.sans.iter().any(|n| n.eq_ignore_ascii_case(s)));
        by_hash || by_subject || by_san
    }
}

/// The configured callers, looked up by credential.
pub struct Policy {
    credentials: Vec<Credential>,
}

/// Namespace for caller UUIDs (v5 of the caller name).
const CALLER_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_2b9a_4d4c_4e0b_9a53_0c7d_2a51_d1e3);

impl Policy {
    pub fn new(callers: &[CallerConfig]) -> Self {
        let hash = |h: &Option<String>| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h.as_deref()?, &mut out).ok()?;
            Some(out)
        };
        let credentials = callers
            .iter()
            .map(|c| Credential {
                token_sha256: hash(&c.token_sha256),
                cert_sha256: hash(&c.cert_sha256),
                cert_subject: c.cert_subject.clone(),
                cert_san: c.cert_san.clone(),
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
            .collect();
        Self { credentials }
    }

    /// The caller presenting `token`, compared by hash in constant time against every
    /// configured credential.
    pub fn authenticate_token(&self, token: &[u8]) -> Option<&Caller> {
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for cred in &self.credentials {
            let equal = cred
                .token_sha256
                .is_some_and(|h| bool::from(h.ct_eq(&presented)));
            if equal && found.is_none() {
                found = Some(&cred.caller);
            }
        }
        found
    }

    /// The caller behind the presented credentials. Every credential presented must be known,
    /// and when both a certificate and a token are presented they must name the same caller.
    pub fn authenticate(
        &self,
        token: Option<&[u8]>,
        cert: Option<&ClientCertificate>,
    ) -> Result<&Caller, AuthError> {
        let by_token = token
            .map(|t| self.authenticate_token(t).ok_or(AuthError::UnknownToken))
            .transpose()?;
        let by_cert = cert
            .map(|c| {
                self.credentials
                    .iter()
                    .find(|cred| cred.matches_cert(c))
                    .map(|cred| &cred.caller)
                    .ok_or(AuthError::UnknownCertificate)
            })
            .transpose()?;
        match (by_token, by_cert) {
            (Some(t), Some(c)) if t.name != c.name => Err(AuthError::Mismatch),
            (Some(caller), _) | (None, Some(caller)) => Ok(caller),
            (None, None) => Err(AuthError::Missing),
        }
    }
}

/// SHA-256 of a token, as hex: what the config stores.
pub fn token_hash_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

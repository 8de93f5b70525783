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
    /// The subject in canonical form (see [`canonical_dn`]); empty if unreadable.
    pub subject: String,
    /// Subject alternative names as `dns:…`, `email:…` or `uri:…`, lower case.
    pub sans: Vec<String>,
}

/// RFC 4514 special characters, escaped in canonical values so that a value holding
/// ", O=…" can never pass for another attribute.
fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.trim().chars() {
        if matches!(c, '\\' | ',' | '+' | '"' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.extend(c.to_lowercase());
    }
    out
}

impl ClientCertificate {
    /// Reads the fingerprint, subject and subject alternative names of a DER certificate
    /// that the TLS layer has already verified.
    pub fn from_der(der: &[u8]) -> Self {
        let sha256 = Sha256::digest(der).into();
        let (subject, sans) = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => {
                let registry = x509_parser::objects::oid_registry();
                let rdns: Option<Vec<String>> = cert
                    .subject()
                    .iter_rdn()
                    .map(|rdn| {
                        let attrs: Option<Vec<String>> = rdn
                            .iter()
                            .map(|attr| {
                                let kind =
                                    x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                                        .map_or_else(
                                            |_| attr.attr_type().to_id_string(),
                                            str::to_owned,
                                        );
                                let value = attr.as_str().ok()?;
                                Some(format!("{}={}", kind.to_lowercase(), escape_value(value)))
                            })
                            .collect();
                        attrs.map(|a| a.join("+"))
                    })
                    .collect();
                let sans = cert
                    .subject_alternative_name()
                    .ok()
                    .flatten()
                    .map(|ext| {
                        ext.value
                            .general_names
                            .iter()
                            .filter_map(|n| match n {
                                GeneralName::DNSName(s) => {
                                    Some(format!("dns:{}", s.to_lowercase()))
                                }
                                GeneralName::RFC822Name(s) => {
                                    Some(format!("email:{}", s.to_lowercase()))
                                }
                                GeneralName::URI(s) => Some(format!("uri:{}", s.to_lowercase())),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (rdns.map(|r| r.join(",")).unwrap_or_default(), sans)
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

/// Splits on `sep` where it is not escaped; escapes are kept for [`unescape`].
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let (mut parts, mut cur, mut escaped) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// A configured subject ("CN=agent, O=Example", RFC 4514 escapes honoured) in the canonical
/// form certificates are compared in: attribute types and values lower case, RDNs in the
/// order written (the certificate's encoding order), special characters in values escaped.
pub fn canonical_dn(dn: &str) -> Option<String> {
    let rdns: Option<Vec<String>> = split_unescaped(dn, ',')
        .iter()
        .map(|rdn| {
            let attrs: Option<Vec<String>> = split_unescaped(rdn, '+')
                .iter()
                .map(|attr| {
                    let (kind, value) = attr.split_once('=')?;
                    let kind = unescape(kind).trim().to_lowercase();
                    (!kind.is_empty()).then(|| format!("{kind}={}", escape_value(&unescape(value))))
                })
                .collect();
            attrs.map(|a| a.join("+"))
        })
        .collect();
    rdns.map(|r| r.join(","))
}

/// A configured SAN as certificates are compared: `dns:`, `email:` or `uri:`; bare = DNS.
fn typed_san(san: &str) -> String {
    let san = san.trim().to_lowercase();
    if san.starts_with("dns:") || san.starts_with("email:") || san.starts_with("uri:") {
        san
    } else {
        format!("dns:{san}")
    }
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
    #[error("client certificate claimed by several callers")]
    AmbiguousCertificate,
}

struct Credential {
    token_sha256: Option<[u8; 32]>,
    cert_sha256: Option<[u8; 32]>,
    cert_subject: Option<String>,
    cert_san: Option<String>,
    caller: Caller,
}

impl Credential {
    fn matches_fingerprint(&self, cert: &ClientCertificate) -> bool {
        self.cert_sha256
            .is_some_and(|h| bool::from(h.ct_eq(&cert.sha256)))
    }

    fn matches_name(&self, cert: &ClientCertificate) -> bool {
        let by_subject = self
            .cert_subject
            .as_ref()
            .is_some_and(|s| !cert.subject.is_empty() && *s == cert.subject);
        let by_san = self
            .cert_san
            .as_ref()
            .is_some_and(|s| cert.sans.contains(s));
        by_subject || by_san
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
                cert_subject: c.cert_subject.as_deref().and_then(canonical_dn),
                cert_san: c.cert_san.as_deref().map(typed_san),
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

    /// A pinned fingerprint wins; otherwise exactly one caller may claim the certificate by
    /// subject or SAN, and several claims are refused as ambiguous.
    fn caller_of_certificate(&self, cert: &ClientCertificate) -> Result<&Caller, AuthError> {
        if let Some(cred) = self
            .credentials
            .iter()
            .find(|c| c.matches_fingerprint(cert))
        {
            return Ok(&cred.caller);
        }
        let mut named = self.credentials.iter().filter(|c| c.matches_name(cert));
        match (named.next(), named.next()) {
            (Some(one), None) => Ok(&one.caller),
            (Some(_), Some(_)) => Err(AuthError::AmbiguousCertificate),
            (None, _) => Err(AuthError::UnknownCertificate),
        }
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
        let by_cert = cert.map(|c| self.caller_of_certificate(c)).transpose()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_compare_canonically_and_escapes_keep_values_apart() {
        assert_eq!(
            canonical_dn("CN=Agent, O=Example").unwrap(),
            "cn=agent,o=example"
        );
        assert_eq!(
            canonical_dn("cn = agent ,o=Example").unwrap(),
            "cn=agent,o=example"
        );
        // A CN holding ", O=Example" stays one value and cannot pass for two attributes.
        assert_eq!(escape_value("agent2, O=Example"), r"agent2\, o\=example");
        assert_eq!(
            canonical_dn(r"CN=agent2\, O\=Example").unwrap(),
            r"cn=agent2\, o\=example"
        );
        assert_ne!(
            canonical_dn("CN=agent2, O=Example").unwrap(),
            r"cn=agent2\, o\=example"
        );
    }

    #[test]
    fn sans_are_typed() {
        assert_eq!(typed_san("Agent.Example"), "dns:agent.example");
        assert_eq!(typed_san("email:a@b"), "email:a@b");
    }
}

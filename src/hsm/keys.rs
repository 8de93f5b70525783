//! Master keys on the token: lookup with the checks SPEC section 3 demands, generation,
//! import from components, listing, and check values.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::{Zeroize, Zeroizing};

use super::{Hsm, HsmError};
use crate::diversify::{AesKeySize, Block, CmacPrf, Kcv, aes_kcv};

/// A master key found on the token and checked: the handle is valid for every session of
/// this process. Key bytes are never here.
#[derive(Clone, Debug)]
pub struct MasterKeyRef {
    pub label: String,
    pub version: u32,
    pub size: AesKeySize,
    pub kcv: Kcv,
    pub(super) handle: ObjectHandle,
    /// The generation of the library initialisation `handle` belongs to.
    pub(super) generation: u64,
}

/// A key as `keys list` shows it.
#[derive(Debug)]
pub struct KeyInfo {
    pub label: String,
    /// From CKA_ID; `None` when the ID is not a divkey version.
    pub version: Option<u32>,
    pub key_type: String,
    pub bits: u64,
    pub kcv: Option<Kcv>,
    pub sensitive: bool,
    pub extractable: bool,
    pub sign: bool,
}

/// AES-CMAC with a key on the token, through one session.
pub(super) struct SessionPrf<'a> {
    pub session: &'a Session,
    pub key: ObjectHandle,
}

impl CmacPrf for SessionPrf<'_> {
    type Error = HsmError;
    fn cmac(&mut self, message: &[u8]) -> Result<Zeroizing<Block>, HsmError> {
        let mac = Zeroizing::new(self.session.sign(&Mechanism::AesCMac, self.key, message)?);
        let block: Block = mac
            .as_slice()
            .try_into()
            .map_err(|_| HsmError::Other(format!("CMAC returned {} bytes", mac.len())))?;
        Ok(Zeroizing::new(block))
    }
}

/// Version 1 is the only version for now; it is recorded in CKA_ID as 4 bytes big-endian.
const VERSION_1: u32 = 1;

struct Attrs(Vec<Attribute>);

impl Attrs {
    fn read(session: &Session, key: ObjectHandle) -> Result<Self, HsmError> {
        Ok(Self(session.get_attributes(
            key,
            &[
                AttributeType::Class,
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Sign,
                AttributeType::Derive,
                AttributeType::Wrap,
                AttributeType::Label,
                AttributeType::Id,
            ],
        )?))
    }
    fn flag(&self, t: AttributeType) -> Option<bool> {
        self.0.iter().find_map(|a| match (a, t) {
            (Attribute::Sensitive(v), AttributeType::Sensitive)
            | (Attribute::Extractable(v), AttributeType::Extractable)
            | (Attribute::Sign(v), AttributeType::Sign)
            | (Attribute::Derive(v), AttributeType::Derive)
            | (Attribute::Wrap(v), AttributeType::Wrap) => Some(*v),
            _ => None,
        })
    }
    fn class(&self) -> Option<ObjectClass> {
        self.0.iter().find_map(|a| match a {
            Attribute::Class(c) => Some(*c),
            _ => None,
        })
    }
    fn key_type(&self) -> Option<KeyType> {
        self.0.iter().find_map(|a| match a {
            Attribute::KeyType(k) => Some(*k),
            _ => None,
        })
    }
    fn value_len(&self) -> Option<u64> {
        self.0.iter().find_map(|a| match a {
            Attribute::ValueLen(l) => Some(u64::from(*l)),
            _ => None,
        })
    }
    /// The version recorded in CKA_ID (4 bytes big-endian); a key without an ID is version 1.
    fn version(&self) -> Result<u32, String> {
        let id = self.0.iter().find_map(|a| match a {
            Attribute::Id(id) => Some(id.as_slice()),
            _ => None,
        });
        match id {
            None | Some([]) => Ok(VERSION_1),
            Some(bytes) => <[u8; 4]>::try_from(bytes)
                .ok()
                .map(u32::from_be_bytes)
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    format!(
                        "CKA_ID {} is not a divkey version (4 bytes, big-endian, from 1)",
                        hex::encode(bytes)
                    )
                }),
        }
    }

    fn label(&self) -> String {
        self.0
            .iter()
            .find_map(|a| match a {
                Attribute::Label(l) => Some(String::from_utf8_lossy(l).into_owned()),
                _ => None,
            })
            .unwrap_or_default()
    }
}

fn secret_key_template(size: AesKeySize, token: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::ValueLen((size.byte_len() as u64).into()),
    ]
}

/// Drops the clear key bytes inside an attribute list.
fn wipe(template: Vec<Attribute>) {
    for a in template {
        if let Attribute::Value(mut v) = a {
            v.zeroize();
        }
    }
}

fn find_by_label(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, HsmError> {
    Ok(session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?)
}

/// A clear key combined from ceremony components, ready to be stored.
pub struct PreparedImport {
    pub size: AesKeySize,
    pub component_kcvs: Vec<Kcv>,
    pub kcv: Kcv,
    key: Zeroizing<Vec<u8>>,
}

impl Hsm {
    /// Every version of the master key `label`, oldest first, each checked: a sensitive,
    /// non-extractable AES key with CKA_SIGN and neither CKA_DERIVE nor CKA_WRAP, exactly one
    /// object per version. Anything else is refused with the reason.
    pub fn master_key_versions(&self, label: &str) -> Result<Vec<MasterKeyRef>, HsmError> {
        self.with_session(|session| self.versions_on(session, self.generation(), label))
    }

    /// [`Self::master_key_versions`] on a given session of `generation`.
    fn versions_on(
        &self,
        session: &Session,
        generation: u64,
        label: &str,
    ) -> Result<Vec<MasterKeyRef>, HsmError> {
        let problem = |p: String| HsmError::MasterKey {
            label: label.to_owned(),
            problem: p,
        };
        let found = find_by_label(session, label)?;
        if found.is_empty() {
            return Err(problem(format!(
                "not found on token {:?}",
                self.token_label
            )));
        }
        let mut versions: Vec<MasterKeyRef> = Vec::with_capacity(found.len());
        for handle in found {
            let attrs = Attrs::read(session, handle)?;
            let version = attrs.version().map_err(problem)?;
            let problem = |p: &str| problem(format!("version {version} {p}"));
            if attrs.class() != Some(ObjectClass::SECRET_KEY) {
                return Err(problem("is not a secret key"));
            }
            if attrs.key_type() != Some(KeyType::AES) {
                return Err(problem("is not an AES key"));
            }
            let size = attrs
                .value_len()
                .and_then(|l| AesKeySize::from_len(l as usize))
                .ok_or_else(|| problem("has an unsupported length"))?;
            if attrs.flag(AttributeType::Sensitive) != Some(true) {
                return Err(problem("is not sensitive (CKA_SENSITIVE must be true)"));
            }
            if attrs.flag(AttributeType::Extractable) != Some(false) {
                return Err(problem("is extractable (CKA_EXTRACTABLE must be false)"));
            }
            if attrs.flag(AttributeType::Sign) != Some(true) {
                return Err(problem("lacks CKA_SIGN, which CMAC needs"));
            }
            if attrs.flag(AttributeType::Derive) == Some(true)
                || attrs.flag(AttributeType::Wrap) == Some(true)
            {
                return Err(problem(
                    "allows CKA_DERIVE or CKA_WRAP, a way for key bytes to leave; only CKA_SIGN is allowed",
                ));
            }
            if versions.iter().any(|v| v.version == version) {
                let n = 1 + versions.iter().filter(|v| v.version == version).count();
                return Err(HsmError::MasterKey {
                    label: label.to_owned(),
                    problem: format!(
                        "{n} objects carry this label as version {version}; exactly one is required"
                    ),
                });
            }
            let kcv = aes_kcv(&mut SessionPrf {
                session,
                key: handle,
            })?;
            versions.push(MasterKeyRef {
                label: label.to_owned(),
                version,
                size,
                kcv,
                handle,
                generation,
            });
        }
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    /// One version of the master key `label`, checked as [`Self::master_key_versions`].
    pub fn master_key_version(&self, label: &str, version: u32) -> Result<MasterKeyRef, HsmError> {
        pick_version(&self.master_key_versions(label)?, label, version).cloned()
    }

    /// The newest version of the master key `label`, checked as [`Self::master_key_versions`].
    pub fn master_key(&self, label: &str) -> Result<MasterKeyRef, HsmError> {
        self.master_key_versions(label)?
            .pop()
            .ok_or_else(|| HsmError::MasterKey {
                label: label.to_owned(),
                problem: "no version found".into(),
            })
    }

    /// Generates the next version of an existing master key inside the HSM, with the same
    /// size and attributes. Cards keep the version they were issued with.
    pub fn rotate_master_key(&self, label: &str) -> Result<MasterKeyRef, HsmError> {
        let current = self.master_key(label)?;
        let next = current.version.checked_add(1).ok_or_else(|| {
            HsmError::Refused(format!(
                "master key {label:?} has no version after {}",
                current.version
            ))
        })?;
        self.with_session(|session| {
            let mut template = secret_key_template(current.size, true);
            template.push(Attribute::Label(label.as_bytes().to_vec()));
            template.push(Attribute::Id(next.to_be_bytes().to_vec()));
            session.generate_key(&Mechanism::AesKeyGen, &template)?;
            Ok(())
        })?;
        self.master_key_version(label, next)
    }

    fn refuse_existing(&self, session: &Session, label: &str) -> Result<(), HsmError> {
        if !find_by_label(session, label)?.is_empty() {
            return Err(HsmError::Refused(format!(
                "an object labelled {label:?} already exists on token {:?}",
                self.token_label
            )));
        }
        Ok(())
    }

    /// Generates a master key inside the HSM: sensitive, non-extractable, CKA_SIGN only.
    pub fn generate_master_key(
        &self,
        label: &str,
        size: AesKeySize,
    ) -> Result<MasterKeyRef, HsmError> {
        self.with_session(|session| {
            self.refuse_existing(session, label)?;
            let mut template = secret_key_template(size, true);
            template.push(Attribute::Label(label.as_bytes().to_vec()));
            template.push(Attribute::Id(VERSION_1.to_be_bytes().to_vec()));
            session.generate_key(&Mechanism::AesKeyGen, &template)?;
            Ok(())
        })?;
        self.master_key(label)
    }

    /// KCV of a clear AES key, computed in the HSM on a session object destroyed at once.
    fn clear_key_kcv(&self, session: &Session, key: &[u8]) -> Result<Kcv, HsmError> {
        let size = AesKeySize::from_len(key.len())
            .ok_or_else(|| HsmError::Refused(format!("{} bytes is not an AES key", key.len())))?;
        let mut template = secret_key_template(size, false);
        template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
        template.push(Attribute::Value(key.to_vec()));
        let created = session.create_object(&template);
        wipe(template);
        let handle = created?;
        let kcv = aes_kcv(&mut SessionPrf {
            session,
            key: handle,
        });
        session.destroy_object(handle)?;
        kcv
    }

    /// XORs the components (all of one AES size) and computes every check value in the HSM.
    /// Nothing is stored yet.
    pub fn prepare_import(
        &self,
        components: &[Zeroizing<Vec<u8>>],
    ) -> Result<PreparedImport, HsmError> {
        let first = components
            .first()
            .ok_or_else(|| HsmError::Refused("at least one component is required".into()))?;
        let size = AesKeySize::from_len(first.len()).ok_or_else(|| {
            HsmError::Refused(format!(
                "a component is {} bytes; AES keys have 16, 24 or 32",
                first.len()
            ))
        })?;
        if components.iter().any(|c| c.len() != size.byte_len()) {
            return Err(HsmError::Refused(
                "components must all have the same length".into(),
            ));
        }
        let mut key = Zeroizing::new(vec![0u8; size.byte_len()]);
        for c in components {
            key.iter_mut().zip(c.iter()).for_each(|(k, b)| *k ^= b);
        }
        if key.iter().all(|b| *b == 0) {
            return Err(HsmError::Refused("the combined key is all zero".into()));
        }
        self.with_session(|session| {
            let component_kcvs = components
                .iter()
                .map(|c| self.clear_key_kcv(session, c))
                .collect::<Result<Vec<_>, _>>()?;
            let kcv = self.clear_key_kcv(session, &key)?;
            Ok(PreparedImport {
                size,
                component_kcvs,
                kcv,
                key,
            })
        })
    }

    /// Stores a prepared key on the token: sensitive, non-extractable, CKA_SIGN only.
    pub fn import_master_key(
        &self,
        label: &str,
        prepared: PreparedImport,
    ) -> Result<MasterKeyRef, HsmError> {
        self.import_master_key_version(label, prepared, false)
    }

    /// Stores a prepared key as the first version of a new label or, with `next_version`, as
    /// the next version of an existing one (rotation by key ceremony).
    pub fn import_master_key_version(
        &self,
        label: &str,
        prepared: PreparedImport,
        next_version: bool,
    ) -> Result<MasterKeyRef, HsmError> {
        let version = if next_version {
            let current = self.master_key(label)?;
            if current.size != prepared.size {
                return Err(HsmError::Refused(format!(
                    "{label:?} is an {} key; the new version must be too",
                    current.size.name()
                )));
            }
            current.version.checked_add(1).ok_or_else(|| {
                HsmError::Refused(format!(
                    "{label:?} has no version after {}",
                    current.version
                ))
            })?
        } else {
            VERSION_1
        };
        self.with_session(|session| {
            if !next_version {
                self.refuse_existing(session, label)?;
            }
            let mut template = secret_key_template(prepared.size, true);
            template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
            template.push(Attribute::Label(label.as_bytes().to_vec()));
            template.push(Attribute::Id(version.to_be_bytes().to_vec()));
            template.push(Attribute::Value(prepared.key.to_vec()));
            let created = session.create_object(&template);
            wipe(template);
            created.map(|_| ()).map_err(HsmError::from)
        })?;
        let stored = self.master_key_version(label, version)?;
        if stored.kcv != prepared.kcv {
            return Err(HsmError::Other(
                "the stored key's check value differs from the prepared one".into(),
            ));
        }
        Ok(stored)
    }

    /// Destroys a master key object (used to undo a key action whose audit record failed).
    pub fn destroy_master_key(&self, key: &MasterKeyRef) -> Result<(), HsmError> {
        self.with_session(|session| Ok(session.destroy_object(key.handle)?))
    }

    /// Every secret key on the token, with its flags and (for AES keys that may sign) its KCV.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError> {
        self.with_session(|session| {
            let handles = session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])?;
            let mut out = Vec::with_capacity(handles.len());
            for handle in handles {
                let attrs = Attrs::read(session, handle)?;
                let sign = attrs.flag(AttributeType::Sign) == Some(true);
                let is_aes = attrs.key_type() == Some(KeyType::AES);
                let kcv = if is_aes && sign {
                    Some(aes_kcv(&mut SessionPrf {
                        session,
                        key: handle,
                    })?)
                } else {
                    None
                };
                out.push(KeyInfo {
                    label: attrs.label(),
                    version: attrs.version().ok(),
                    key_type: attrs
                        .key_type()
                        .map_or_else(|| "?".to_owned(), |k| k.to_string()),
                    bits: attrs.value_len().unwrap_or(0) * 8,
                    kcv,
                    sensitive: attrs.flag(AttributeType::Sensitive) == Some(true),
                    extractable: attrs.flag(AttributeType::Extractable) != Some(false),
                    sign,
                });
            }
            out.sort_by(|a, b| (&a.label, a.version).cmp(&(&b.label, b.version)));
            Ok(out)
        })
    }
}

impl Hsm {
    /// Derives an admin key on the management session, blocking. The service uses
    /// [`super::DerivationPool`]; this serves tools and tests.
    pub fn derive_admin_key(
        &self,
        master: &MasterKeyRef,
        derivation: &crate::diversify::Derivation,
        card: &crate::domain::CardId,
    ) -> Result<crate::diversify::AdminKey, HsmError> {
        self.with_session(|session| {
            crate::diversify::derive_admin_key(
                &mut SessionPrf {
                    session,
                    key: master.handle,
                },
                derivation,
                card,
            )
        })
    }
}

impl Hsm {
    /// One AES-CMAC under a master key, blocking: for known-answer tests of the raw KDF.
    pub fn cmac(
        &self,
        master: &MasterKeyRef,
        message: &[u8],
    ) -> Result<Zeroizing<Block>, HsmError> {
        self.with_session(|session| {
            SessionPrf {
                session,
                key: master.handle,
            }
            .cmac(message)
        })
    }
}

/// The master key versions loaded at start, and the version each label issues new cards with
/// (its newest version not retired).
#[derive(Default)]
pub struct MasterKeys {
    versions: Vec<MasterKeyRef>,
    current: Vec<(String, u32)>,
}

impl MasterKeys {
    /// Adds every version of a label; `retired` versions serve their cards but no new ones.
    pub fn add(&mut self, versions: Vec<MasterKeyRef>, retired: &[u32]) {
        if let Some(newest) = versions
            .iter()
            .filter(|v| !retired.contains(&v.version))
            .max_by_key(|v| v.version)
        {
            self.current.push((newest.label.clone(), newest.version));
        }
        self.versions.extend(versions);
    }

    pub fn has_label(&self, label: &str) -> bool {
        self.versions.iter().any(|v| v.label == label)
    }

    /// The version new cards of `label` get.
    pub fn current(&self, label: &str) -> Option<&MasterKeyRef> {
        let (_, version) = self.current.iter().find(|(l, _)| l == label)?;
        self.version(label, *version)
    }

    pub fn version(&self, label: &str, version: u32) -> Option<&MasterKeyRef> {
        self.versions
            .iter()
            .find(|v| v.label == label && v.version == version)
    }

    pub fn all(&self) -> impl Iterator<Item = &MasterKeyRef> {
        self.versions.iter()
    }
}

impl Hsm {
    /// Derives with a clear test key held in a session object for the call only (created,
    /// used, destroyed): the self-test's path through the HSM's own CMAC.
    pub fn known_answer(
        &self,
        test_key: &[u8],
        derivation: &crate::diversify::Derivation,
        card: &crate::domain::CardId,
    ) -> Result<crate::diversify::AdminKey, HsmError> {
        let size = AesKeySize::from_len(test_key.len())
            .ok_or_else(|| HsmError::Refused("test key is not an AES key".into()))?;
        self.with_session(|session| {
            let mut template = secret_key_template(size, false);
            template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
            template.push(Attribute::Value(test_key.to_vec()));
            let created = session.create_object(&template);
            wipe(template);
            let key = created?;
            let result = crate::diversify::derive_admin_key(
                &mut SessionPrf { session, key },
                derivation,
                card,
            );
            session.destroy_object(key)?;
            result
        })
    }
}

impl Hsm {
    /// The handle of `key` in `generation`. After the HSM was re-established, the key is
    /// looked up again by label and version and must have the same KCV: a different key is
    /// never used in its place.
    pub(super) fn handle_in(
        &self,
        key: &MasterKeyRef,
        session: &Session,
        generation: u64,
    ) -> Result<ObjectHandle, HsmError> {
        if generation == key.generation {
            return Ok(key.handle);
        }
        let id = (key.label.clone(), key.version);
        let lock = || {
            self.handles
                .lock()
                .map_err(|_| HsmError::Other("handle cache lock poisoned".into()))
        };
        if let Some((_, _, handle)) = lock()?
            .iter()
            .find(|(k, g, _)| *k == id && *g == generation)
        {
            return Ok(*handle);
        }
        // Looked up on the worker's own session and without the cache lock: a lookup that
        // hangs in the HSM holds its own worker only.
        let versions = self.versions_on(session, generation, &key.label)?;
        let found = pick_version(&versions, &key.label, key.version)?;
        if found.kcv != key.kcv {
            return Err(HsmError::MasterKey {
                label: key.label.clone(),
                problem: format!(
                    "version {} now has KCV {}, not {}; refusing to use it",
                    key.version, found.kcv, key.kcv
                ),
            });
        }
        let mut cache = lock()?;
        cache.retain(|(k, g, _)| *g >= generation && !(*k == id && *g == found.generation));
        cache.push((id, found.generation, found.handle));
        Ok(found.handle)
    }
}

/// `version` out of a label's checked versions.
pub fn pick_version<'a>(
    versions: &'a [MasterKeyRef],
    label: &str,
    version: u32,
) -> Result<&'a MasterKeyRef, HsmError> {
    versions
        .iter()
        .find(|v| v.version == version)
        .ok_or_else(|| HsmError::MasterKey {
            label: label.to_owned(),
            problem: format!("has no version {version}"),
        })
}

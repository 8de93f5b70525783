//! The only module that talks PKCS#11 (through `cryptoki`).
//!
//! One [`Hsm`] per process: it loads the module once, finds the token by label, logs in once
//! with a session kept open for the process lifetime (closing every session would log the
//! application out), and hands out working sessions. Derivations for the service go through
//! [`pool::DerivationPool`], whose threads own the sessions so the async runtime never blocks.

mod error;
mod keys;
mod pool;

use std::path::Path;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use zeroize::Zeroizing;

pub use error::HsmError;
pub use keys::{KeyInfo, MasterKeyRef, MasterKeys, PreparedImport};
pub use pool::DerivationPool;

use crate::config::HsmConfig;

/// Where the user PIN comes from. Never the command line or the config file itself.
pub enum PinSource<'a> {
    File(&'a Path),
    Env(&'a str),
}

impl<'a> PinSource<'a> {
    pub fn from_config(config: &'a HsmConfig) -> Result<Self, HsmError> {
        match (&config.pin_file, &config.pin_env) {
            (Some(f), None) => Ok(Self::File(f)),
            (None, Some(v)) => Ok(Self::Env(v)),
            _ => Err(HsmError::PinSource(
                "configure exactly one of pin_file and pin_env".into(),
            )),
        }
    }

    /// Reads the PIN into a zeroizing buffer. A PIN file readable by group or others is refused.
    pub fn read(&self) -> Result<SecretString, HsmError> {
        let raw = match self {
            Self::File(path) => {
                let meta = std::fs::metadata(path).map_err(|e| {
                    HsmError::PinSource(format!("cannot read {}: {e}", path.display()))
                })?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = meta.permissions().mode();
                    if mode & 0o077 != 0 {
                        return Err(HsmError::PinSource(format!(
                            "{} has mode {:o}; it must deny group and other (chmod 600)",
                            path.display(),
                            mode & 0o777
                        )));
                    }
                }
                #[cfg(not(unix))]
                let _ = meta;
                Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    HsmError::PinSource(format!("cannot read {}: {e}", path.display()))
                })?)
            }
            Self::Env(name) => Zeroizing::new(std::env::var(name).map_err(|_| {
                HsmError::PinSource(format!("environment variable {name} is not set"))
            })?),
        };
        let pin = raw.trim_end_matches(['\r', '\n']);
        if pin.is_empty() {
            return Err(HsmError::PinSource("the PIN is empty".into()));
        }
        Ok(SecretString::from(pin.to_owned()))
    }
}

/// A logged-in PKCS#11 token.
pub struct Hsm {
    ctx: Pkcs11,
    slot: Slot,
    token_label: String,
    /// Holds the login for the process lifetime; also used for one-off management calls.
    login_session: Mutex<Option<Session>>,
}

impl Hsm {
    /// Loads the module, finds the token, logs in once. A wrong PIN is reported, not retried.
    pub fn open(config: &HsmConfig) -> Result<Self, HsmError> {
        let module = config.module.display().to_string();
        let ctx = Pkcs11::new(&config.module).map_err(|e| HsmError::Module {
            path: module.clone(),
            reason: e.to_string(),
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| HsmError::Module {
                path: module,
                reason: format!("C_Initialize: {e}"),
            })?;
        let slot = find_token(&ctx, &config.token_label)?;
        let pin = PinSource::from_config(config)?.read()?;
        let session = ctx.open_rw_session(slot)?;
        error::login_result(session.login(UserType::User, Some(&pin)))?;
        Ok(Self {
            ctx,
            slot,
            token_label: config.token_label.clone(),
            login_session: Mutex::new(Some(session)),
        })
    }

    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// A new read-only working session; it shares the application's login.
    fn open_session(&self) -> Result<Session, HsmError> {
        Ok(self.ctx.open_ro_session(self.slot)?)
    }

    /// Runs `f` on the login session (management calls: key lookup, generation, import).
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let guard = self
            .login_session
            .lock()
            .map_err(|_| HsmError::Other("login session lock poisoned".into()))?;
        let session = guard
            .as_ref()
            .ok_or_else(|| HsmError::Other("HSM is closed".into()))?;
        f(session)
    }

    /// Logs out, closes the login session and finalizes the library.
    pub fn close(self) -> Result<(), HsmError> {
        let session = self.login_session.lock().ok().and_then(|mut s| s.take());
        if let Some(session) = session {
            let _ = session.logout();
            drop(session);
        }
        self.ctx.finalize()?;
        Ok(())
    }
}

fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, HsmError> {
    let mut matches = Vec::new();
    let mut seen = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        let info = ctx.get_token_info(slot)?;
        let this = info.label().trim_end();
        if this == label {
            matches.push(slot);
        }
        if info.token_initialized() {
            seen.push(format!("{this:?}"));
        }
    }
    match matches.len() {
        1 => Ok(matches[0]),
        0 => Err(HsmError::TokenNotFound(
            label.to_owned(),
            if seen.is_empty() {
                "none".into()
            } else {
                seen.join(", ")
            },
        )),
        n => Err(HsmError::TokenAmbiguous(n, label.to_owned())),
    }
}

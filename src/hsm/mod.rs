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
pub use keys::{KeyInfo, MasterKeyRef, MasterKeys, PreparedImport, pick_version};
pub use pool::{DerivationPool, KeySession, NotAnswered, Undelivered};

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

/// One initialisation of the PKCS#11 library with its logged-in session. Replaced as a whole
/// when the HSM comes back after an outage.
pub(super) struct Live {
    ctx: Pkcs11,
    slot: Slot,
    /// Holds the login; also used for one-off management calls.
    login_session: Mutex<Option<Session>>,
    generation: u64,
    /// Held (shared) by every call into this generation. C_Finalize while another thread is
    /// inside a call is undefined behaviour (p11-kit's client aborts), so a generation that
    /// was taken down is finalized only once this can be taken exclusively; nobody ever
    /// waits for it exclusively, so nested shared holds cannot deadlock.
    calls: std::sync::RwLock<()>,
    /// Taken down: no new call may enter.
    down: std::sync::atomic::AtomicBool,
}

impl Live {
    /// Enters a call on this generation: holds off its finalization until the guard drops.
    /// `None` once the generation was taken down.
    pub(super) fn enter(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        let guard = self.calls.read().ok()?;
        (!self.is_down()).then_some(guard)
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A logged-in PKCS#11 token that heals: after a transport-level failure the library is
/// finalized, initialised again and logged in again (with backoff, and never again after a
/// refused PIN), and master key handles are looked up anew and checked against their KCV.
pub struct Hsm {
    module: std::path::PathBuf,
    token_label: String,
    pin: PinSpec,
    live: std::sync::RwLock<Option<std::sync::Arc<Live>>>,
    /// The generation taken down last, until no call is inside it and it is finalized.
    retired: Mutex<Option<Retired>>,
    generation: std::sync::atomic::AtomicU64,
    last_attempt: Mutex<Option<std::time::Instant>>,
    pin_refused: std::sync::atomic::AtomicBool,
    /// Master key handles resolved in later generations.
    handles: Mutex<Vec<ResolvedHandle>>,
}

/// ((label, version), generation, handle): a master key's handle in one generation.
type ResolvedHandle = ((String, u32), u64, cryptoki::object::ObjectHandle);

/// Where the PIN comes from, kept to log in again after an outage.
enum PinSpec {
    File(std::path::PathBuf),
    Env(String),
}

impl PinSpec {
    fn read(&self) -> Result<SecretString, HsmError> {
        match self {
            Self::File(p) => PinSource::File(p).read(),
            Self::Env(v) => PinSource::Env(v).read(),
        }
    }
}

/// Least time between two attempts to re-establish the HSM.
const RECONNECT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);

impl Hsm {
    /// Loads the module, finds the token, logs in once. A wrong PIN is reported, not retried.
    pub fn open(config: &HsmConfig) -> Result<Self, HsmError> {
        let pin = match PinSource::from_config(config)? {
            PinSource::File(p) => PinSpec::File(p.to_owned()),
            PinSource::Env(v) => PinSpec::Env(v.to_owned()),
        };
        let hsm = Self {
            module: config.module.clone(),
            token_label: config.token_label.clone(),
            pin,
            live: std::sync::RwLock::new(None),
            retired: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(1),
            last_attempt: Mutex::new(None),
            pin_refused: std::sync::atomic::AtomicBool::new(false),
            handles: Mutex::new(Vec::new()),
        };
        let live = hsm.connect(1)?;
        if let Ok(mut slot) = hsm.live.write() {
            *slot = Some(std::sync::Arc::new(live));
        }
        Ok(hsm)
    }

    fn connect(&self, generation: u64) -> Result<Live, HsmError> {
        let module = self.module.display().to_string();
        let ctx = Pkcs11::new(&self.module).map_err(|e| HsmError::Module {
            path: module.clone(),
            reason: e.to_string(),
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| HsmError::Module {
                path: module,
                reason: format!("C_Initialize: {e}"),
            })?;
        let result = (|| {
            let slot = find_token(&ctx, &self.token_label)?;
            let pin = self.pin.read()?;
            let session = ctx.open_rw_session(slot)?;
            error::login_result(session.login(UserType::User, Some(&pin)))?;
            Ok((slot, session))
        })();
        match result {
            Ok((slot, session)) => Ok(Live {
                ctx,
                slot,
                login_session: Mutex::new(Some(session)),
                generation,
                calls: std::sync::RwLock::new(()),
                down: std::sync::atomic::AtomicBool::new(false),
            }),
            Err(e) => {
                let _ = ctx.finalize();
                Err(e)
            }
        }
    }

    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// The current generation of the library's initialisation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The live initialisation, re-established first if an outage took it down.
    fn live(&self) -> Result<std::sync::Arc<Live>, HsmError> {
        if let Ok(guard) = self.live.read()
            && let Some(live) = guard.as_ref()
        {
            return Ok(std::sync::Arc::clone(live));
        }
        self.reconnect()
    }

    fn reconnect(&self) -> Result<std::sync::Arc<Live>, HsmError> {
        if self.pin_refused.load(std::sync::atomic::Ordering::Acquire) {
            return Err(HsmError::PinIncorrect);
        }
        let mut last = self
            .last_attempt
            .lock()
            .map_err(|_| HsmError::Other("reconnect lock poisoned".into()))?;
        // Another thread may have reconnected while this one waited for the lock.
        if let Ok(guard) = self.live.read()
            && let Some(live) = guard.as_ref()
        {
            return Ok(std::sync::Arc::clone(live));
        }
        if last.is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF) {
            return Err(HsmError::Reconnecting);
        }
        // The library cannot be initialised again before the old generation is finalized,
        // and that waits for the calls still inside it.
        if !self.finalize_retired() {
            return Err(HsmError::Reconnecting);
        }
        *last = Some(std::time::Instant::now());
        let generation = self.generation() + 1;
        match self.connect(generation) {
            Ok(live) => {
                let live = std::sync::Arc::new(live);
                // The number first: whoever sees the new generation also sees its number.
                self.generation
                    .store(generation, std::sync::atomic::Ordering::Release);
                if let Ok(mut slot) = self.live.write() {
                    *slot = Some(std::sync::Arc::clone(&live));
                }
                tracing::info!(
                    generation,
                    "HSM re-established: library initialised, logged in"
                );
                Ok(live)
            }
            Err(HsmError::PinIncorrect) => {
                self.pin_refused
                    .store(true, std::sync::atomic::Ordering::Release);
                tracing::error!("HSM login refused on reconnect: wrong PIN; not retried");
                Err(HsmError::PinIncorrect)
            }
            Err(e) => {
                tracing::warn!(error = %e, "HSM still unavailable");
                Err(HsmError::Reconnecting)
            }
        }
    }

    /// Takes a generation down after a transport-level failure: no new call enters it, its
    /// sessions are abandoned (not closed: after C_Finalize their handle numbers may belong to
    /// new sessions) and the library is finalized as soon as no call is inside it any more,
    /// so that a later call initialises it again.
    pub(crate) fn mark_down(&self, generation: u64) {
        // Held throughout, so that a reconnect never finds the generation neither live nor
        // retired (and initialises a library that was not finalized).
        let Ok(mut retired) = self.retired.lock() else {
            return;
        };
        let live = {
            let Ok(mut slot) = self.live.write() else {
                return;
            };
            if slot.as_ref().is_none_or(|l| l.generation != generation) {
                return;
            }
            slot.take()
        };
        let Some(live) = live else {
            return;
        };
        live.down.store(true, std::sync::atomic::Ordering::Release);
        *retired = Some(Retired {
            live,
            since: std::time::Instant::now(),
        });
        let finalized = finalize(&mut retired);
        drop(retired);
        tracing::warn!(
            generation,
            finalized,
            "HSM unavailable: sessions abandoned; the library is finalized once no call is inside it"
        );
    }

    /// Finalizes the generation taken down last if no call is inside it. Returns whether no
    /// generation is left waiting to be finalized.
    fn finalize_retired(&self) -> bool {
        let Ok(mut retired) = self.retired.lock() else {
            return false;
        };
        finalize(&mut retired)
    }

    /// How long a call has kept a taken-down generation from being finalized (and so the
    /// library from being initialised again), if one does. Some modules never return from
    /// a call whose connection died (p11-kit's client, when two calls wait on one socket);
    /// no PKCS#11 call can free such a thread, so only a new process can recover.
    pub fn stuck_for(&self) -> Option<std::time::Duration> {
        // Looks only: finalizing is the reconnect's job, and a watchdog must not hang in it.
        let retired = self.retired.try_lock().ok()?;
        let Retired { live, since } = retired.as_ref()?;
        live.calls.try_write().is_err().then(|| since.elapsed())
    }

    /// A new read-only working session of the current generation; it shares the login.
    fn open_session(&self) -> Result<(Session, std::sync::Arc<Live>), HsmError> {
        let live = self.live()?;
        let opened = {
            let _in_call = live.enter().ok_or(HsmError::Reconnecting)?;
            live.ctx.open_ro_session(live.slot)
        };
        match opened {
            Ok(session) => Ok((session, live)),
            Err(e) => {
                let e = HsmError::from(e);
                if e.poisons_session() {
                    self.mark_down(live.generation);
                }
                Err(e)
            }
        }
    }

    /// Runs `f` on the login session (management calls: key lookup, generation, import).
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let live = self.live()?;
        let result = {
            let _in_call = live.enter().ok_or(HsmError::Reconnecting)?;
            let guard = live
                .login_session
                .lock()
                .map_err(|_| HsmError::Other("login session lock poisoned".into()))?;
            let session = guard
                .as_ref()
                .ok_or_else(|| HsmError::Other("HSM is closed".into()))?;
            f(session)
        };
        if result.as_ref().err().is_some_and(HsmError::poisons_session) {
            self.mark_down(live.generation);
        }
        result
    }

    /// Logs out, closes the login session and finalizes the library.
    pub fn close(self) -> Result<(), HsmError> {
        let live = self.live.write().ok().and_then(|mut l| l.take());
        self.finalize_retired();
        let Some(live) = live else {
            return Ok(());
        };
        let session = live.login_session.lock().ok().and_then(|mut s| s.take());
        if let Some(session) = session {
            let _ = session.logout();
            drop(session);
        }
        live.ctx.clone().finalize()?;
        tracing::info!("HSM: logged out, library finalized");
        Ok(())
    }
}

/// A generation taken down and not yet finalized, and since when.
struct Retired {
    live: std::sync::Arc<Live>,
    since: std::time::Instant,
}

/// Finalizes `retired` if no call is inside it; whether none is left to finalize.
fn finalize(retired: &mut Option<Retired>) -> bool {
    let Some(Retired { live, .. }) = retired.as_ref() else {
        return true;
    };
    {
        let Ok(_alone) = live.calls.try_write() else {
            return false;
        };
        if let Ok(mut login) = live.login_session.lock()
            && let Some(session) = login.take()
        {
            std::mem::forget(session);
        }
        let _ = live.ctx.clone().finalize();
    }
    *retired = None;
    true
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

//! The one table from PKCS#11 return values to divkey's HSM errors, matched by value.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    Module { path: String, reason: String },
    #[error("no token labelled {0:?} (tokens present: {1})")]
    TokenNotFound(String, String),
    #[error("{0} tokens are labelled {1:?}; labels must be unique")]
    TokenAmbiguous(usize, String),
    #[error("user PIN: {0}")]
    PinSource(String),
    #[error("HSM login refused: wrong user PIN (not retried, to spare the token's retry counter)")]
    PinIncorrect,
    #[error("HSM login refused: the user PIN is locked")]
    PinLocked,
    #[error("master key {label:?}: {problem}")]
    MasterKey { label: String, problem: String },
    #[error("HSM unavailable: {function} returned {rv}")]
    Unavailable { function: Function, rv: RvError },
    #[error("HSM did not answer within the deadline")]
    Timeout,
    #[error("HSM session queue is full")]
    Busy,
    #[error("HSM unavailable; reconnecting")]
    Reconnecting,
    #[error("HSM call {function} failed: {rv}")]
    Failed { function: Function, rv: RvError },
    #[error("HSM: {0}")]
    Other(String),
    #[error("{0}")]
    Refused(String),
}

impl HsmError {
    /// Transient: the HSM is unreachable, slow or saturated; a retry later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Timeout | Self::Busy | Self::Reconnecting
        )
    }

    /// Whether the session that produced this error must be discarded.
    pub(crate) fn poisons_session(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Timeout)
    }
}

/// What a return value means for the service.
enum Class {
    Unavailable,
    PinIncorrect,
    PinLocked,
    AlreadyLoggedIn,
    Failed,
}

fn classify(rv: RvError) -> Class {
    use RvError::*;
    match rv {
        DeviceError
        | DeviceMemory
        | DeviceRemoved
        | TokenNotPresent
        | TokenNotRecognized
        | SessionClosed
        | SessionHandleInvalid
        | SessionCount
        | CryptokiNotInitialized
        | UserNotLoggedIn
        | GeneralError => Class::Unavailable,
        PinIncorrect | PinInvalid | PinLenRange => Class::PinIncorrect,
        PinLocked => Class::PinLocked,
        UserAlreadyLoggedIn => Class::AlreadyLoggedIn,
        _ => Class::Failed,
    }
}

impl From<CkError> for HsmError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, function) => match classify(rv) {
                Class::Unavailable => Self::Unavailable { function, rv },
                Class::PinIncorrect => Self::PinIncorrect,
                Class::PinLocked => Self::PinLocked,
                Class::AlreadyLoggedIn | Class::Failed => Self::Failed { function, rv },
            },
            CkError::LibraryLoading(e) => Self::Module {
                path: String::new(),
                reason: e.to_string(),
            },
            other => Self::Other(other.to_string()),
        }
    }
}

/// `CKR_USER_ALREADY_LOGGED_IN` counts as success.
pub(crate) fn login_result(r: Result<(), CkError>) -> Result<(), HsmError> {
    match r {
        Ok(()) => Ok(()),
        Err(CkError::Pkcs11(rv, _)) if matches!(classify(rv), Class::AlreadyLoggedIn) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

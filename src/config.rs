//! The TOML configuration: parsed strictly (unknown keys are errors), checked once at
//! start, and turned into the typed settings the rest of the service uses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use uuid::Uuid;

use crate::diversify::{
    AdminKeyType, AesKeySize, CardIdLayout, DEFAULT_LABEL, Derivation, MAX_SYSTEM_ID_LEN,
};
use crate::policy::Permission;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTP worker threads; defaults to the number of cores.
    #[serde(default)]
    pub workers: Option<usize>,
    pub hsm: HsmConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub profile_template: Vec<TemplateConfig>,
    #[serde(default)]
    pub caller: Vec<CallerConfig>,
    /// TLS; without it divkey serves plain HTTP, and only on a loopback address.
    pub tls: Option<TlsConfig>,
    /// Limits on key release per caller; absent means no limit.
    pub rate_limit: Option<RateLimitConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM). Protect it like the PIN file.
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: ClientAuth,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Off,
    Optional,
    Required,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Key releases per second each caller may sustain.
    pub per_second: f64,
    /// Releases a caller may make in a burst.
    pub burst: u32,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    pub token_label: String,
    /// File holding the user PIN (mode must deny group and other).
    pub pin_file: Option<PathBuf>,
    /// Name of the environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// Logged-in sessions kept open for key derivation.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Derivations that may wait for a session before new ones get 503.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Longest wait for one HSM operation before the request gets 503.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
}

fn default_deadline_ms() -> u64 {
    2000
}

fn default_sessions() -> usize {
    2
}
fn default_queue() -> usize {
    1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub sqlite: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// error, warn, info, debug or trace.
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".to_owned()
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    pub uuid: Uuid,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "yes")]
    pub diversify_admin_key: bool,
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    pub key_type: Option<AdminKeyType>,
    pub label: Option<String>,
    pub system_id: Option<String>,
    #[serde(default)]
    pub card_id_bytes: CardIdLayout,
    pub master_key: Option<String>,
    #[serde(default)]
    pub approvals_required: u32,
    pub default_admin_key_hex: String,
    #[serde(default = "default_user_pin_option")]
    pub user_pin_option: String,
    /// The approver of a request may not be its originator.
    #[serde(default)]
    pub separate_duties: bool,
}

fn yes() -> bool {
    true
}
fn default_algorithm() -> String {
    "sp800-108-cmac".to_owned()
}
fn default_user_pin_option() -> String {
    "UserSets".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    pub name: String,
    /// Hex of SHA-256 of the caller's bearer token.
    pub token_sha256: Option<String>,
    /// Hex of SHA-256 of the caller's client certificate (DER).
    pub cert_sha256: Option<String>,
    /// Subject of the caller's client certificate, e.g. "CN=agent, O=Example".
    pub cert_subject: Option<String>,
    /// A subject alternative name (DNS name, e-mail or URI) of the caller's client certificate.
    pub cert_san: Option<String>,
    #[serde(default)]
    pub permissions: BTreeMap<Uuid, Vec<Permission>>,
}

impl std::fmt::Debug for CallerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerConfig")
            .field("name", &self.name)
            .field("token_sha256", &self.token_sha256.as_ref().map(|_| "***"))
            .field("cert_sha256", &self.cert_sha256)
            .field("cert_subject", &self.cert_subject)
            .field("cert_san", &self.cert_san)
            .field("permissions", &self.permissions)
            .finish()
    }
}

/// A profile template, checked.
#[derive(Debug, Clone)]
pub struct Template {
    pub uuid: Uuid,
    pub name: String,
    pub description: String,
    /// `None` when the template does not diversify (clients keep the default key).
    pub derivation: Option<Derivation>,
    pub key_type: AdminKeyType,
    pub algorithm: String,
    pub master_key: Option<String>,
    pub approvals_required: u32,
    pub default_admin_key_hex: String,
    pub user_pin_option: String,
    pub separate_duties: bool,
}

impl Config {
    /// Reads the file, applies `DIVKEY_*` environment overrides, resolves relative paths
    /// against the config file's folder, and checks every template.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned() + &location(&text, e.span()),
        })?;
        config.apply_env(|name| std::env::var(name).ok())?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            Some(&mut config.hsm.module),
            config.hsm.pin_file.as_mut(),
            Some(&mut config.store.sqlite),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(tls) = config.tls.as_mut() {
            for p in [
                Some(&mut tls.cert),
                Some(&mut tls.key),
                tls.client_ca.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        config.templates()?;
        config.check_callers()?;
        config.check_transport()?;
        if config.hsm.pin_file.is_some() == config.hsm.pin_env.is_some() {
            return Err(invalid("[hsm] needs exactly one of pin_file and pin_env"));
        }
        config.check_limits()?;
        Ok(config)
    }

    fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = var("DIVKEY_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|_| invalid(format!("DIVKEY_LISTEN: not an address: {v}")))?;
        }
        if let Some(v) = var("DIVKEY_HSM_MODULE") {
            self.hsm.module = v.into();
        }
        if let Some(v) = var("DIVKEY_HSM_TOKEN_LABEL") {
            self.hsm.token_label = v;
        }
        if let Some(v) = var("DIVKEY_STORE_SQLITE") {
            self.store.sqlite = v.into();
        }
        if let Some(v) = var("DIVKEY_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => return Err(invalid(format!("DIVKEY_LOG_FORMAT: {v}: use text or json"))),
            };
        }
        if let Some(v) = var("DIVKEY_LOG_LEVEL") {
            self.log.level = v;
        }
        Ok(())
    }

    /// Bounds that keep a typo from exhausting threads or memory at start.
    fn check_limits(&self) -> Result<(), ConfigError> {
        let h = &self.hsm;
        if !(1..=64).contains(&h.sessions) {
            return Err(invalid("[hsm] sessions must be 1 to 64"));
        }
        if !(1..=100_000).contains(&h.queue) {
            return Err(invalid("[hsm] queue must be 1 to 100000"));
        }
        if !(10..=60_000).contains(&h.deadline_ms) {
            return Err(invalid("[hsm] deadline_ms must be 10 to 60000"));
        }
        if self.workers.is_some_and(|w| !(1..=256).contains(&w)) {
            return Err(invalid("workers must be 1 to 256"));
        }
        if self
            .log
            .level
            .parse::<tracing::level_filters::LevelFilter>()
            .is_err()
            || self.log.level.is_empty()
        {
            return Err(invalid(format!(
                "[log] level {:?}: use error, warn, info, debug or trace",
                self.log.level
            )));
        }
        Ok(())
    }

    fn check_transport(&self) -> Result<(), ConfigError> {
        match &self.tls {
            None if !self.listen.ip().is_loopback() => Err(invalid(format!(
                "plain HTTP on {} is refused: configure [tls] or listen on a loopback address",
                self.listen
            ))),
            Some(tls) if tls.client_auth != ClientAuth::Off && tls.client_ca.is_none() => Err(
                invalid("[tls] client_auth = optional|required needs client_ca"),
            ),
            _ => Ok(()),
        }?;
        if let Some(r) = &self.rate_limit
            && (!(0.001..=1_000_000.0).contains(&r.per_second) || r.burst == 0)
        {
            return Err(invalid(
                "[rate_limit] per_second must be 0.001 to 1000000 and burst at least 1",
            ));
        }
        Ok(())
    }

    fn check_callers(&self) -> Result<(), ConfigError> {
        let known: Vec<Uuid> = self.profile_template.iter().map(|t| t.uuid).collect();
        for (i, c) in self.caller.iter().enumerate() {
            let earlier = &self.caller[..i];
            if earlier.iter().any(|e| e.name == c.name) {
                return Err(invalid(format!("caller {:?} appears twice", c.name)));
            }
            let same = |a: &Option<String>, b: &Option<String>| {
                a.as_ref()
                    .zip(b.as_ref())
                    .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
            };
            if let Some(e) = earlier.iter().find(|e| {
                same(&e.token_sha256, &c.token_sha256) || same(&e.cert_sha256, &c.cert_sha256)
            }) {
                return Err(invalid(format!(
                    "callers {:?} and {:?} share a credential",
                    e.name, c.name
                )));
            }
            if let Some(h) = &c.token_sha256
                && (h.len() != 64 || hex::decode(h).is_err())
            {
                return Err(invalid(format!(
                    "caller {}: token_sha256 must be 64 hex digits",
                    c.name
                )));
            }
            if let Some(h) = &c.cert_sha256
                && (h.len() != 64 || hex::decode(h).is_err())
            {
                return Err(invalid(format!(
                    "caller {}: cert_sha256 must be 64 hex digits",
                    c.name
                )));
            }
            for t in c.permissions.keys() {
                if !known.contains(t) {
                    return Err(invalid(format!(
                        "caller {}: permission on unknown template {t}",
                        c.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The checked templates.
    pub fn templates(&self) -> Result<Vec<Template>, ConfigError> {
        let mut out: Vec<Template> = Vec::new();
        for t in &self.profile_template {
            if out.iter().any(|o| o.uuid == t.uuid) {
                return Err(invalid(format!("template {} appears twice", t.uuid)));
            }
            out.push(t.check()?);
        }
        Ok(out)
    }
}

impl TemplateConfig {
    fn check(&self) -> Result<Template, ConfigError> {
        let name = &self.name;
        let err = |m: String| invalid(format!("template {name:?}: {m}"));
        let derivation = match self.algorithm.as_str() {
            "sp800-108-cmac" => {
                // A template written from the documented shape carries `system_id = ""`.
                if self.system_id.as_deref().is_some_and(|s| !s.is_empty()) {
                    return Err(err("system_id applies to an10922 only".into()));
                }
                Derivation::Sp800108Cmac {
                    key_type: self.key_type.unwrap_or(AdminKeyType::Des3),
                    label: self
                        .label
                        .clone()
                        .unwrap_or_else(|| DEFAULT_LABEL.to_owned()),
                    card_id_bytes: self.card_id_bytes,
                }
            }
            other => {
                let size = match other {
                    "an10922-aes128" => AesKeySize::Aes128,
                    "an10922-aes192" => AesKeySize::Aes192,
                    "an10922-aes256" => AesKeySize::Aes256,
                    _ => {
                        return Err(err(format!(
                            "unknown algorithm {other:?} (sp800-108-cmac, an10922-aes128, an10922-aes192, an10922-aes256)"
                        )));
                    }
                };
                // key_type and label belong to sp800-108-cmac; where given anyway they must
                // agree with what AN10922 produces, or the template says two things at once.
                if self.key_type.is_some_and(|k| k != size.admin_key_type()) {
                    return Err(err(format!(
                        "{other} produces {} keys; key_type says otherwise",
                        size.admin_key_type().name()
                    )));
                }
                if self.label.as_deref().is_some_and(|l| l != DEFAULT_LABEL) {
                    return Err(err("label applies to sp800-108-cmac only".into()));
                }
                let system_id = hex::decode(self.system_id.as_deref().unwrap_or(""))
                    .map_err(|_| err("system_id must be hex".into()))?;
                if system_id.len() > MAX_SYSTEM_ID_LEN {
                    return Err(err(format!(
                        "system_id is {} bytes, at most {MAX_SYSTEM_ID_LEN}",
                        system_id.len()
                    )));
                }
                Derivation::An10922 {
                    size,
                    system_id,
                    card_id_bytes: self.card_id_bytes,
                }
            }
        };
        let key_type = derivation.key_type();
        let default_key = hex::decode(&self.default_admin_key_hex)
            .map_err(|_| err("default_admin_key_hex must be hex".into()))?;
        if default_key.len() != key_type.byte_len() {
            return Err(err(format!(
                "default_admin_key_hex is {} bytes, a {} key has {}",
                default_key.len(),
                key_type.name(),
                key_type.byte_len()
            )));
        }
        if self.diversify_admin_key && self.master_key.is_none() {
            return Err(err(
                "master_key is required when diversify_admin_key = true".into(),
            ));
        }
        Ok(Template {
            uuid: self.uuid,
            name: self.name.clone(),
            description: self.description.clone(),
            algorithm: derivation.algorithm_name(),
            key_type,
            derivation: self.diversify_admin_key.then_some(derivation),
            master_key: self.master_key.clone(),
            approvals_required: self.approvals_required,
            default_admin_key_hex: self.default_admin_key_hex.to_uppercase(),
            user_pin_option: self.user_pin_option.clone(),
            separate_duties: self.separate_duties,
        })
    }
}

/// " at line L, column C" for a parse error span.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!(" (line {line}, column {col})")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape documented in the issue and the README: every key of a template present.
    const DOCUMENTED: &str = r#"
listen = "127.0.0.1:8080"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "divkey-dev"
pin_file = "softhsm/dev.pin"
[store]
sqlite = "divkey.db"
[[profile_template]]
uuid = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c8d"
name = "Base CSP smart card"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "des3"
label = "divkey admin key"
system_id = ""
card_id_bytes = "windows"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "010203040506070801020304050607080102030405060708"
[[caller]]
name = "enrollment-agent"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
permissions = { "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c8d" = ["request", "approve", "bind", "read_key"] }
"#;

    fn parse(text: &str) -> Result<Vec<Template>, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.check_callers()?;
        config.check_transport()?;
        config.templates()
    }

    #[test]
    fn documented_shape_is_accepted() {
        let t = parse(DOCUMENTED).unwrap();
        assert_eq!(t[0].key_type, AdminKeyType::Des3);
        assert_eq!(t[0].algorithm, "sp800-108-cmac");
    }

    #[test]
    fn contradictions_and_unknown_keys_are_refused() {
        let an = DOCUMENTED.replace(
            r#"algorithm = "sp800-108-cmac""#,
            r#"algorithm = "an10922-aes128""#,
        );
        assert!(parse(&an).unwrap_err().to_string().contains("key_type"));
        let an_ok = an
            .replace(r#"key_type = "des3""#, r#"key_type = "aes128""#)
            .replace("0102030405060708\"", "\"")
            .replace(
                r#"default_admin_key_hex = "010203040506070801020304050607080102030405060708""#,
                r#"default_admin_key_hex = "01020304050607080102030405060708""#,
            );
        assert!(parse(&an_ok).is_ok(), "{:?}", parse(&an_ok).err());
        let sys = DOCUMENTED.replace(r#"system_id = """#, r#"system_id = "0102""#);
        assert!(parse(&sys).unwrap_err().to_string().contains("system_id"));
        let unknown =
            DOCUMENTED.replace("approvals_required = 0", "approvals_required = 0\nfoo = 1");
        assert!(parse(&unknown).unwrap_err().to_string().contains("foo"));
        let open = DOCUMENTED.replace("127.0.0.1:8080", "0.0.0.0:8080");
        assert!(parse(&open).unwrap_err().to_string().contains("plain HTTP"));
    }

    #[test]
    fn debug_masks_token_hashes() {
        let config: Config = toml::from_str(DOCUMENTED).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("9f86d081884c7d"), "{shown}");
    }
}

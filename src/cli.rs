//! The command line: serve, check, and key management.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use clap::{Args, Parser, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use std::io::Write;

use crate::api::{self, AppState};
use crate::audit::{self, AuditEvent};
use crate::ceremony;
use crate::config::{Config, Template};
use crate::diversify::AesKeySize;
use crate::hsm::{DerivationPool, Hsm, HsmError, MasterKeyRef, MasterKeys, pick_version};
use crate::logging;
use crate::metrics::Metrics;
use crate::periodic::Periodic;
use crate::policy::Policy;
use crate::ratelimit::KeyReleaseLimiter;
use crate::selftest;
use crate::service::Service;
use crate::store::{Store, StoreError};
use crate::tls;

#[derive(Parser)]
#[command(
    name = "divkey",
    version,
    about = "HSM-backed diversified smart card admin keys (MIM CM API)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// Path of the TOML configuration.
    #[arg(long, short = 'c')]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CM API.
    Serve(ConfigArg),
    /// Check the configuration, the HSM login and every template's master key, then exit.
    Check(ConfigArg),
    /// Manage master keys in the HSM.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print the SHA-256 (hex) of a bearer token read from standard input, for `token_sha256`.
    TokenHash,
    /// Check or export the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; names the first bad record and exits nonzero.
    Verify(ConfigArg),
    /// Print the records as JSON lines.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// Only records from this UTC time on (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ).
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyTypeArg {
    Aes128,
    Aes192,
    Aes256,
}

impl From<KeyTypeArg> for AesKeySize {
    fn from(k: KeyTypeArg) -> Self {
        match k {
            KeyTypeArg::Aes128 => Self::Aes128,
            KeyTypeArg::Aes192 => Self::Aes192,
            KeyTypeArg::Aes256 => Self::Aes256,
        }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a master key inside the HSM (sensitive, non-extractable, CKA_SIGN only).
    Generate {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        label: String,
        #[arg(long = "type", value_enum)]
        key_type: KeyTypeArg,
    },
    /// Import a master key as the XOR of clear components (key ceremony).
    Import {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        label: String,
        #[arg(long = "type", value_enum)]
        key_type: KeyTypeArg,
        /// A clear component in hex; repeat for each component (2 to 5).
        #[arg(long = "component")]
        components: Vec<String>,
        /// A file holding one component in hex; repeat for each component.
        #[arg(long = "component-file")]
        component_files: Vec<PathBuf>,
        /// Without --component or --component-file: how many components to ask for, without
        /// echo, on the terminal.
        #[arg(long, default_value_t = 2)]
        prompt: usize,
        /// Expected KCV of the combined key (6 hex digits); refused on mismatch.
        #[arg(long)]
        kcv: Option<String>,
        /// Import as the next version of an existing master key (rotation by ceremony).
        #[arg(long)]
        new_version: bool,
    },
    /// Generate the next version of a master key inside the HSM; new cards get it, issued
    /// cards keep theirs.
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        label: String,
    },
    /// Stop issuing new cards under a version; cards issued under it keep working.
    Retire {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        label: String,
        #[arg(long)]
        version: u32,
    },
    /// Destroy a version in the HSM; refused while any card was issued under it.
    Delete {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        label: String,
        #[arg(long)]
        version: u32,
    },
    /// List the secret keys on the token.
    List(ConfigArg),
}

/// Runs the command line; returns the process exit code.
pub fn run() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(c) => serve(&c.config),
        Command::Check(c) => check(&c.config),
        Command::Keys(k) => keys(k),
        Command::TokenHash => token_hash(),
        Command::Audit(a) => audit_command(a),
    };
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("divkey: error: {message}");
            1
        }
    }
}

fn load(path: &Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| e.to_string())
}

fn open_hsm(config: &Config) -> Result<Hsm, String> {
    Hsm::open(&config.hsm).map_err(|e| e.to_string())
}

/// Looks up and checks every version of the master key of every diversifying template.
fn master_keys(hsm: &Hsm, store: &Store, templates: &[Template]) -> Result<MasterKeys, String> {
    let mut masters = MasterKeys::default();
    for t in templates {
        let (Some(derivation), Some(label)) = (&t.derivation, &t.master_key) else {
            continue;
        };
        if !masters.has_label(label) {
            let versions = hsm.master_key_versions(label).map_err(|e| e.to_string())?;
            let retired = store
                .read(|tx| tx.retired_versions(label))
                .map_err(|e| e.to_string())?;
            masters.add(versions, &retired);
        }
        let current = masters.current(label).ok_or_else(|| {
            format!(
                "template {:?}: every version of master key {label:?} is retired",
                t.name
            )
        })?;
        if let Some(need) = derivation.required_master_size()
            && current.size != need
        {
            return Err(format!(
                "template {:?}: {} needs an {} master key, {label:?} is {}",
                t.name,
                t.algorithm,
                need.name(),
                current.size.name()
            ));
        }
    }
    check_issued_cards(store, &masters)?;
    Ok(masters)
}

/// Runs the known-answer self-test of every algorithm the templates use.
fn self_test(hsm: &Hsm, templates: &[Template]) -> Result<usize, String> {
    let mut algorithms: Vec<String> = templates
        .iter()
        .filter_map(|t| t.derivation.as_ref().map(selftest::algorithm_of))
        .collect();
    algorithms.sort();
    algorithms.dedup();
    selftest::run(hsm, algorithms.iter().map(String::as_str)).map_err(|e| e.to_string())
}

/// Refuses a token whose master key under a label and version is not the key that issued
/// cards were derived with (serving would hand those cards wrong keys), or lacks a version
/// that cards were issued under.
fn check_issued_cards(store: &Store, masters: &MasterKeys) -> Result<(), String> {
    let in_use = store
        .read(|tx| tx.master_keys_in_use())
        .map_err(|e| e.to_string())?;
    for (label, version, kcv) in in_use {
        if !masters.has_label(&label) {
            tracing::warn!(
                label,
                version,
                "cards were issued under a master key no template names"
            );
            continue;
        }
        let Some(m) = masters.version(&label, version) else {
            return Err(format!(
                "master key {label:?} version {version} is not on the token, but cards were issued under it"
            ));
        };
        if let Some(kcv) = kcv
            && m.kcv.to_string() != kcv
        {
            return Err(format!(
                "master key {label:?} version {version} on the token has KCV {}, but issued cards were derived under KCV {kcv}; refusing to serve wrong keys",
                m.kcv
            ));
        }
    }
    Ok(())
}

fn check(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    let templates = config.templates().map_err(|e| e.to_string())?;
    let hsm = open_hsm(&config)?;
    let store = Store::open(&config.store.sqlite).map_err(|e| e.to_string())?;
    let masters = master_keys(&hsm, &store, &templates)?;
    let passed = self_test(&hsm, &templates)?;
    println!("self-test: {passed} algorithm(s) reproduce their known answers in the HSM");
    for key in masters.all() {
        println!(
            "master key {:?} version {} {} KCV {}",
            key.label,
            key.version,
            key.size.name(),
            key.kcv
        );
    }
    println!(
        "ok: {} template(s), {} master key(s), token {:?}",
        templates.len(),
        masters.all().count(),
        hsm.token_label()
    );
    let _ = hsm.close();
    Ok(())
}

fn serve(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    logging::init(config.log.format, &config.log.level);
    let templates = config.templates().map_err(|e| e.to_string())?;
    let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
    let hsm = Arc::new(open_hsm(&config)?);
    let store = Arc::new(Store::open(&config.store.sqlite).map_err(|e| e.to_string())?);
    let masters = master_keys(&hsm, &store, &templates)?;
    let passed = self_test(&hsm, &templates)?;
    tracing::info!(algorithms = passed, "self-test passed");
    for key in masters.all() {
        tracing::info!(label = %key.label, version = key.version, size = key.size.name(), kcv = %key.kcv, "master key ready");
    }
    let metrics = Metrics::new();
    let pool = DerivationPool::start(
        Arc::clone(&hsm),
        config.hsm.sessions,
        config.hsm.queue,
        Duration::from_millis(config.hsm.deadline_ms),
        Arc::clone(&metrics.hsm),
    )
    .map_err(|e| e.to_string())?;
    // Passes every 50 ms copy little each; requests wait only for the restart every 2,000
    // frames (1,000 key requests, 8 MB of WAL), half as often as SQLite's default
    // checkpoint (1,000 frames) would hold them.
    let checkpointer = store
        .checkpoint_in_background(Duration::from_millis(50), 2_000)
        .map_err(|e| e.to_string())?;
    let state = Arc::new(AppState {
        service: Service::new(templates, masters, store, pool),
        policy: Policy::new(&config.caller),
        limiter: config.rate_limit.as_ref().map(KeyReleaseLimiter::new),
        metrics,
    });
    let watchdog = stuck_call_watchdog(
        Arc::downgrade(&hsm),
        Duration::from_millis(config.hsm.deadline_ms),
    )?;
    let workers = config
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
    let app_state = Arc::clone(&state);
    let listen = config.listen;
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(Arc::clone(&app_state)))
                .default_service(web::to(api::dispatch))
        })
        .workers(workers)
        .shutdown_timeout(10)
        .on_connect(tls::on_connect);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = match tls {
            Some(tls) => server.bind_rustls_0_23(listen, tls),
            None => server.bind(listen),
        }
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        for addr in server.addrs() {
            tracing::info!("listening on {scheme}://{addr}");
        }
        server.run().await.map_err(|e| e.to_string())
    })?;
    tracing::info!("stopping");
    watchdog.stop();
    checkpointer.stop();
    // The HTTP workers are gone: ours is the last reference.
    let workers_done = match Arc::try_unwrap(state) {
        Ok(state) => state.service.into_pool().shutdown(),
        Err(_) => false,
    };
    match Arc::try_unwrap(hsm) {
        Ok(hsm) if workers_done => hsm.close().map_err(|e| e.to_string())?,
        // A hung call is inside the library: finalizing now is undefined behaviour, and
        // the process exit closes the connection to the HSM anyway.
        _ => tracing::warn!("HSM library not finalized: a call is still inside it"),
    }
    Ok(())
}

/// Exit status when an HSM call is stuck for good (EX_TEMPFAIL): restart divkey.
const EXIT_HSM_STUCK: i32 = 75;

/// Ends the process when a call stuck inside a taken-down HSM library keeps it from being
/// initialised again for ten deadlines (at least 10 s): the service cannot heal in this
/// process, and a supervisor's restart can.
fn stuck_call_watchdog(hsm: std::sync::Weak<Hsm>, deadline: Duration) -> Result<Periodic, String> {
    let limit = (deadline * 10).max(Duration::from_secs(10));
    Periodic::spawn("hsm-watchdog", Duration::from_secs(1), move || {
        let Some(stuck) = hsm.upgrade().and_then(|hsm| hsm.stuck_for()) else {
            return;
        };
        if stuck > limit {
            tracing::error!(
                stuck_s = stuck.as_secs(),
                "an HSM call has not returned since the HSM went away, so the library \
                 cannot be initialised again in this process; exiting for a restart"
            );
            std::process::exit(EXIT_HSM_STUCK);
        }
    })
    .map_err(|e| format!("cannot start the HSM watchdog: {e}"))
}

/// One line per key action: what happened, label, type, version and KCV.
fn print_key(what: &str, key: &MasterKeyRef) {
    println!(
        "{what} label={} type={} version={} kcv={}",
        key.label,
        key.size.name(),
        key.version,
        key.kcv
    );
}

/// Audit records of key-management commands, in the service's store.
struct CliAudit(Store);

impl CliAudit {
    fn open(config: &Config) -> Result<Self, String> {
        Store::open(&config.store.sqlite)
            .map(Self)
            .map_err(|e| format!("audit trail unavailable, nothing done: {e}"))
    }

    /// The record of a key action by the user running the command.
    fn event(
        &self,
        action: &str,
        label: &str,
        size: AesKeySize,
        key: Option<&MasterKeyRef>,
        outcome: &str,
    ) -> AuditEvent {
        let user = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "unknown".into());
        AuditEvent {
            caller: Some(format!("cli:{user}")),
            source: Some("cli".into()),
            action: action.into(),
            algorithm: Some(size.name().into()),
            master_key_label: Some(label.into()),
            master_key_version: key.map(|k| k.version),
            kcv: key.map(|k| k.kcv.to_string()),
            outcome: outcome.into(),
            ..AuditEvent::default()
        }
    }

    /// Records the outcome of a key action and passes it on (as a one-line error on failure).
    /// A key made by an action whose record cannot be written is destroyed again.
    fn outcome<T: AuditedKey>(
        &self,
        action: &str,
        label: &str,
        size: AesKeySize,
        result: Result<T, HsmError>,
        undo: impl FnOnce(&T) -> Result<(), HsmError>,
    ) -> Result<T, String> {
        let outcome = match &result {
            Ok(_) => "done".to_owned(),
            Err(e) => format!("refused: {e}"),
        };
        let mut event = self.event(action, label, size, None, &outcome);
        event.master_key_version = result.as_ref().ok().and_then(AuditedKey::version);
        event.kcv = result.as_ref().ok().and_then(AuditedKey::kcv);
        if let Err(e) = self.0.write(|tx| tx.append_audit(&event)) {
            let undone = match &result {
                Ok(made) => match undo(made) {
                    Ok(()) => "; the key was destroyed again".to_owned(),
                    Err(u) => format!("; destroying the key failed too ({u}): remove it by hand"),
                },
                Err(_) => String::new(),
            };
            return Err(format!("{action}: audit record not written: {e}{undone}"));
        }
        result.map_err(|e| e.to_string())
    }
}

/// What the audit trail records of a key-management result.
trait AuditedKey {
    fn version(&self) -> Option<u32>;
    fn kcv(&self) -> Option<String>;
}

impl AuditedKey for MasterKeyRef {
    fn version(&self) -> Option<u32> {
        Some(self.version)
    }
    fn kcv(&self) -> Option<String> {
        Some(self.kcv.to_string())
    }
}

impl AuditedKey for () {
    fn version(&self) -> Option<u32> {
        None
    }
    fn kcv(&self) -> Option<String> {
        None
    }
}

fn audit_command(command: AuditCommand) -> Result<(), String> {
    match command {
        AuditCommand::Verify(c) => {
            let config = load(&c.config)?;
            let store = Store::open_read_only(&config.store.sqlite).map_err(|e| e.to_string())?;
            let records = store
                .read(|tx| tx.audit_records(None))
                .map_err(|e| e.to_string())?;
            match audit::verify(records) {
                Ok(head) => {
                    println!(
                        "ok: {} audit record(s), chain intact, head {}",
                        head.records, head.last_hash
                    );
                    Ok(())
                }
                Err(b) => Err(format!("audit record {}: {}", b.id, b.reason)),
            }
        }
        AuditCommand::Export { config, since } => {
            let config = load(&config.config)?;
            let store = Store::open_read_only(&config.store.sqlite).map_err(|e| e.to_string())?;
            let since = since.map(|s| normalize_since(&s)).transpose()?;
            let records = store
                .read(|tx| tx.audit_records(since.as_deref()))
                .map_err(|e| e.to_string())?;
            let mut out = std::io::stdout().lock();
            for r in records {
                let line = serde_json::to_string(&r).map_err(|e| e.to_string())?;
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
}

/// `--since` in the stored form (`YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC), so that string order is
/// time order: `YYYY-MM-DD`, or `YYYY-MM-DDTHH:MM[:SS[.f…]]Z`.
fn normalize_since(s: &str) -> Result<String, String> {
    let bad = || format!("--since {s:?}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS[.fff]Z (UTC)");
    let num = |t: &str, max: u32| -> Result<u32, String> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse::<u32>().ok().filter(|v| *v <= max).ok_or_else(bad)
    };
    let (date, time) = s.split_once('T').unwrap_or((s, ""));
    let parts: Vec<&str> = date.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let (y, m, d) = (num(y, 9999)?, num(m, 12)?, num(d, 31)?);
    if m == 0 || d == 0 {
        return Err(bad());
    }
    if time.is_empty() {
        return if s.contains('T') {
            Err(bad())
        } else {
            Ok(format!("{y:04}-{m:02}-{d:02}"))
        };
    }
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let fields: Vec<&str> = hms.split(':').collect();
    let (h, mi, sec) = match fields.as_slice() {
        [h, mi] => (*h, *mi, "00"),
        [h, mi, sec] => (*h, *mi, *sec),
        _ => return Err(bad()),
    };
    if h.len() != 2 || mi.len() != 2 || sec.len() != 2 {
        return Err(bad());
    }
    let (h, mi, sec) = (num(h, 23)?, num(mi, 59)?, num(sec, 60)?);
    if !frac.is_empty() {
        num(frac, u32::MAX)?;
    }
    let millis: String = frac.chars().chain("000".chars()).take(3).collect();
    Ok(format!(
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{sec:02}.{millis}Z"
    ))
}

fn keys(command: KeysCommand) -> Result<(), String> {
    match command {
        KeysCommand::Generate {
            config,
            label,
            key_type,
        } => {
            let config = load(&config.config)?;
            // The audit trail must be writable before the HSM is touched.
            let audit = CliAudit::open(&config)?;
            let hsm = open_hsm(&config)?;
            let size: AesKeySize = key_type.into();
            let key = audit.outcome(
                "master_key.generate",
                &label,
                size,
                hsm.generate_master_key(&label, size),
                |k| hsm.destroy_master_key(k),
            )?;
            print_key("generated", &key);
            let _ = hsm.close();
        }
        KeysCommand::Import {
            config,
            label,
            key_type,
            components,
            component_files,
            prompt,
            kcv,
            new_version,
        } => {
            let config = load(&config.config)?;
            let size: AesKeySize = key_type.into();
            let from_args = !components.is_empty() || !component_files.is_empty();
            let mut parts = Vec::new();
            for (i, c) in components.iter().enumerate() {
                parts.push(ceremony::parse_component(i + 1, c, size)?);
            }
            for f in &component_files {
                parts.push(ceremony::read_component_file(parts.len() + 1, f, size)?);
            }
            if !from_args {
                if !(ceremony::MIN_COMPONENTS..=ceremony::MAX_COMPONENTS).contains(&prompt) {
                    return Err(format!(
                        "--prompt {prompt}: a key ceremony takes {} to {} components",
                        ceremony::MIN_COMPONENTS,
                        ceremony::MAX_COMPONENTS
                    ));
                }
                for n in 1..=prompt {
                    parts.push(ceremony::prompt_component(n, size)?);
                }
            }
            // Count, equal lengths and a strong result, before anything touches the HSM.
            drop(ceremony::combine(&parts)?);
            let expected = kcv
                .map(|k| {
                    let k = k.trim().to_ascii_uppercase();
                    if k.len() == 6 && k.bytes().all(|b| b.is_ascii_hexdigit()) {
                        Ok(k)
                    } else {
                        Err("--kcv must be 6 hex digits".to_owned())
                    }
                })
                .transpose()?;
            let audit = CliAudit::open(&config)?;
            let hsm = open_hsm(&config)?;
            let prepared = hsm.prepare_import(&parts).map_err(|e| e.to_string())?;
            for (i, k) in prepared.component_kcvs.iter().enumerate() {
                println!("component {} kcv={k}", i + 1);
            }
            println!("combined kcv={}", prepared.kcv);
            if let Some(expected) = expected
                && prepared.kcv.to_string() != expected
            {
                let message = format!(
                    "combined key KCV {} does not match --kcv {expected}; nothing imported",
                    prepared.kcv
                );
                audit.outcome::<()>(
                    "master_key.import",
                    &label,
                    size,
                    Err(HsmError::Refused(message)),
                    |_| Ok(()),
                )?;
            }
            let key = audit.outcome(
                "master_key.import",
                &label,
                size,
                hsm.import_master_key_version(&label, prepared, new_version),
                |k| hsm.destroy_master_key(k),
            )?;
            print_key("imported", &key);
            let _ = hsm.close();
        }
        KeysCommand::Rotate { config, label } => {
            let config = load(&config.config)?;
            let audit = CliAudit::open(&config)?;
            let hsm = open_hsm(&config)?;
            let size = hsm.master_key(&label).map_err(|e| e.to_string())?.size;
            let key = audit.outcome(
                "master_key.rotate",
                &label,
                size,
                hsm.rotate_master_key(&label),
                |k| hsm.destroy_master_key(k),
            )?;
            print_key("rotated", &key);
            println!(
                "restart divkey (each replica) to issue version {} to new cards",
                key.version
            );
            let _ = hsm.close();
        }
        KeysCommand::Retire {
            config,
            label,
            version,
        } => {
            let config = load(&config.config)?;
            let audit = CliAudit::open(&config)?;
            let hsm = open_hsm(&config)?;
            let versions = hsm.master_key_versions(&label).map_err(|e| e.to_string())?;
            let key = pick_version(&versions, &label, version)
                .map_err(|e| e.to_string())?
                .clone();
            let retired = audit
                .0
                .read(|tx| tx.retired_versions(&label))
                .map_err(|e| e.to_string())?;
            let in_service = versions
                .iter()
                .filter(|v| v.version != version && !retired.contains(&v.version))
                .count();
            if in_service == 0 {
                audit.outcome::<()>(
                    "master_key.retire",
                    &label,
                    key.size,
                    Err(HsmError::Refused(format!(
                        "version {version} is the last version of {label:?} in service; rotate first"
                    ))),
                    |_| Ok(()),
                )?;
            }
            // The retirement and its record commit together, or neither does.
            let event = audit.event("master_key.retire", &label, key.size, Some(&key), "done");
            audit
                .0
                .write(|tx| {
                    tx.retire_version(&label, version)?;
                    tx.append_audit(&event)
                })
                .map_err(|e| format!("master_key.retire: nothing retired: {e}"))?;
            println!(
                "retired label={label} version={version}: issued cards keep it, new cards do not get it (restart divkey)"
            );
            let _ = hsm.close();
        }
        KeysCommand::Delete {
            config,
            label,
            version,
        } => {
            let config = load(&config.config)?;
            let audit = CliAudit::open(&config)?;
            let hsm = open_hsm(&config)?;
            let versions = hsm.master_key_versions(&label).map_err(|e| e.to_string())?;
            let key = pick_version(&versions, &label, version)
                .map_err(|e| e.to_string())?
                .clone();
            let newest = versions.iter().map(|v| v.version).max().unwrap_or(version);
            let (cards, retired) = audit
                .0
                .read(|tx| {
                    Ok::<_, StoreError>((
                        tx.cards_using(&label, version)?,
                        tx.retired_versions(&label)?,
                    ))
                })
                .map_err(|e| e.to_string())?;
            let size = key.size;
            let refusal = if cards > 0 {
                Some(format!(
                    "{cards} card(s) were issued under {label:?} version {version}; deleting it would lock them out"
                ))
            } else if version == newest {
                Some(format!(
                    "version {version} is the newest of {label:?}; keeping it keeps version numbers from being reused"
                ))
            } else if !retired.contains(&version) {
                Some(format!(
                    "version {version} of {label:?} is in service; retire it and restart divkey first"
                ))
            } else {
                None
            };
            let result = match refusal {
                Some(why) => Err(HsmError::Refused(why)),
                None => hsm.destroy_master_key(&key).map(|()| key),
            };
            audit.outcome("master_key.delete", &label, size, result, |_| Ok(()))?;
            println!("deleted label={label} version={version}");
            let _ = hsm.close();
        }
        KeysCommand::List(config) => {
            let config = load(&config.config)?;
            let hsm = open_hsm(&config)?;
            let keys = hsm.list_keys().map_err(|e| e.to_string())?;
            println!(
                "{:<32} {:>7} {:<8} {:>5} {:<6} {:<9} {:<11}",
                "LABEL", "VERSION", "TYPE", "BITS", "KCV", "SENSITIVE", "EXTRACTABLE"
            );
            for k in keys {
                println!(
                    "{:<32} {:>7} {:<8} {:>5} {:<6} {:<9} {:<11}",
                    k.label,
                    k.version.map_or_else(|| "?".to_owned(), |v| v.to_string()),
                    k.key_type,
                    k.bits,
                    k.kcv.map_or_else(|| "-".to_owned(), |k| k.to_string()),
                    k.sensitive,
                    k.extractable
                );
            }
            let _ = hsm.close();
        }
    }
    Ok(())
}

fn token_hash() -> Result<(), String> {
    let mut line = Zeroizing::new(String::new());
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    let token = line.trim_end_matches(['\r', '\n']);
    if token.is_empty() {
        return Err("no token on standard input".into());
    }
    println!("{}", crate::policy::token_hash_hex(token));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::normalize_since;

    #[test]
    fn since_is_normalized_or_refused() {
        assert_eq!(normalize_since("2026-12-03").unwrap(), "2026-12-03");
        assert_eq!(
            normalize_since("2026-12-03T17:51:28Z").unwrap(),
            "2026-12-03T17:51:28.000Z"
        );
        assert_eq!(
            normalize_since("2026-12-03T17:51:28.6Z").unwrap(),
            "2026-12-03T17:51:28.600Z"
        );
        assert_eq!(
            normalize_since("2026-12-03T17:51:28.64Z").unwrap(),
            "2026-12-03T17:51:28.640Z"
        );
        assert_eq!(
            normalize_since("2026-12-03T17:51Z").unwrap(),
            "2026-12-03T17:51:00.000Z"
        );
        for bad in [
            "2026-99-99",
            "2026-12-03T99:99:99Z",
            "2026-12-03T17:51:28xxxxZ",
            "2026-12-03T",
            "yesterday",
        ] {
            assert!(normalize_since(bad).is_err(), "{bad}");
        }
    }
}

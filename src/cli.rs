//! The command line: serve, check, and key management.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use clap::{Args, Parser, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use crate::api::{self, AppState};
use crate::config::{Config, Template};
use crate::diversify::AesKeySize;
use crate::hsm::{DerivationPool, Hsm, MasterKeyRef};
use crate::logging;
use crate::policy::Policy;
use crate::service::Service;
use crate::store::Store;

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
        /// A clear component in hex; repeat for each component.
        #[arg(long = "component", required = true)]
        components: Vec<String>,
        /// Expected KCV of the combined key (6 hex digits); refused on mismatch.
        #[arg(long)]
        kcv: Option<String>,
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

/// Looks up and checks the master key of every diversifying template.
fn master_keys(hsm: &Hsm, templates: &[Template]) -> Result<HashMap<String, MasterKeyRef>, String> {
    let mut masters: HashMap<String, MasterKeyRef> = HashMap::new();
    for t in templates {
        let (Some(derivation), Some(label)) = (&t.derivation, &t.master_key) else {
            continue;
        };
        if !masters.contains_key(label) {
            let key = hsm.master_key(label).map_err(|e| e.to_string())?;
            masters.insert(label.clone(), key);
        }
        if let (Some(need), Some(key)) = (derivation.required_master_size(), masters.get(label))
            && key.size != need
        {
            return Err(format!(
                "template {:?}: {} needs an {} master key, {label:?} is {}",
                t.name,
                t.algorithm,
                need.name(),
                key.size.name()
            ));
        }
    }
    Ok(masters)
}

fn check(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    let templates = config.templates().map_err(|e| e.to_string())?;
    let hsm = open_hsm(&config)?;
    let masters = master_keys(&hsm, &templates)?;
    Store::open(&config.store.sqlite).map_err(|e| e.to_string())?;
    for key in masters.values() {
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
        masters.len(),
        hsm.token_label()
    );
    let _ = hsm.close();
    Ok(())
}

fn serve(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    logging::init(config.log.format, &config.log.level);
    let templates = config.templates().map_err(|e| e.to_string())?;
    let hsm = Arc::new(open_hsm(&config)?);
    let masters = master_keys(&hsm, &templates)?;
    for key in masters.values() {
        tracing::info!(label = %key.label, version = key.version, size = key.size.name(), kcv = %key.kcv, "master key ready");
    }
    let store = Arc::new(Store::open(&config.store.sqlite).map_err(|e| e.to_string())?);
    let pool = DerivationPool::start(
        Arc::clone(&hsm),
        config.hsm.sessions,
        config.hsm.queue,
        Duration::from_millis(config.hsm.deadline_ms),
    )
    .map_err(|e| e.to_string())?;
    let state = Arc::new(AppState {
        service: Service::new(templates, masters, store, pool),
        policy: Policy::new(&config.caller),
    });
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
        .bind(listen)
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        for addr in server.addrs() {
            tracing::info!("listening on http://{addr}");
        }
        server.run().await.map_err(|e| e.to_string())
    })?;
    tracing::info!("stopping");
    // The HTTP workers are gone: ours is the last reference.
    if let Ok(state) = Arc::try_unwrap(state) {
        state.service.into_pool().shutdown();
    }
    if let Ok(hsm) = Arc::try_unwrap(hsm) {
        hsm.close().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn parse_hex_secret(what: &str, text: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let digits = Zeroizing::new(text.trim().replace([' ', ':'], ""));
    hex::decode(digits.as_bytes())
        .map(Zeroizing::new)
        .map_err(|_| format!("{what} is not hex"))
}

fn keys(command: KeysCommand) -> Result<(), String> {
    match command {
        KeysCommand::Generate {
            config,
            label,
            key_type,
        } => {
            let config = load(&config.config)?;
            let hsm = open_hsm(&config)?;
            let key = hsm
                .generate_master_key(&label, key_type.into())
                .map_err(|e| e.to_string())?;
            println!(
                "generated label={} type={} version={} kcv={}",
                key.label,
                key.size.name(),
                key.version,
                key.kcv
            );
            let _ = hsm.close();
        }
        KeysCommand::Import {
            config,
            label,
            key_type,
            components,
            kcv,
        } => {
            let config = load(&config.config)?;
            let size: AesKeySize = key_type.into();
            let parts = components
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let bytes = parse_hex_secret(&format!("component {}", i + 1), c)?;
                    if bytes.len() != size.byte_len() {
                        return Err(format!(
                            "component {} is {} bytes; {} needs {}",
                            i + 1,
                            bytes.len(),
                            size.name(),
                            size.byte_len()
                        ));
                    }
                    Ok(bytes)
                })
                .collect::<Result<Vec<_>, _>>()?;
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
            let hsm = open_hsm(&config)?;
            let prepared = hsm.prepare_import(&parts).map_err(|e| e.to_string())?;
            for (i, k) in prepared.component_kcvs.iter().enumerate() {
                println!("component {} kcv={k}", i + 1);
            }
            println!("combined kcv={}", prepared.kcv);
            if let Some(expected) = expected
                && prepared.kcv.to_string() != expected
            {
                return Err(format!(
                    "combined key KCV {} does not match --kcv {expected}; nothing imported",
                    prepared.kcv
                ));
            }
            let key = hsm
                .import_master_key(&label, prepared)
                .map_err(|e| e.to_string())?;
            println!(
                "imported label={} type={} version={} kcv={}",
                key.label,
                key.size.name(),
                key.version,
                key.kcv
            );
            let _ = hsm.close();
        }
        KeysCommand::List(config) => {
            let config = load(&config.config)?;
            let hsm = open_hsm(&config)?;
            let keys = hsm.list_keys().map_err(|e| e.to_string())?;
            println!(
                "{:<32} {:<8} {:>5} {:<6} {:<9} {:<11}",
                "LABEL", "TYPE", "BITS", "KCV", "SENSITIVE", "EXTRACTABLE"
            );
            for k in keys {
                println!(
                    "{:<32} {:<8} {:>5} {:<6} {:<9} {:<11}",
                    k.label,
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

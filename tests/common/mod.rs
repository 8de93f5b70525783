//! Shared test harness: throw-away SoftHSM2 tokens, configs, a real server process,
//! and an independent software implementation of SPEC section 3 (RustCrypto).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes::{Aes128, Aes192, Aes256};
use base64::Engine;
use cmac::{Cmac, Mac};

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN_LABEL: &str = "divkey-test";
pub const USER_PIN: &str = "test-user-pin-4711";
pub const SO_PIN: &str = "test-so-pin-0815";
/// The label of SP 800-108 templates that set none.
pub const DEFAULT_LABEL: &str = "divkey admin key";

pub fn divkey_bin() -> &'static str {
    env!("CARGO_BIN_EXE_divkey")
}

/// A temporary SoftHSM2 token directory with one initialised token and a PIN file.
pub struct TestToken {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
    pub label: String,
}

impl TestToken {
    pub fn new() -> Self {
        Self::with_label(TOKEN_LABEL)
    }

    pub fn with_label(label: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                USER_PIN,
                "--so-pin",
                SO_PIN,
            ])
            .output()
            .expect("softhsm2-util (install softhsm2)");
        assert!(
            out.status.success(),
            "init token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.path().join("user.pin");
        write_private(&pin_file, USER_PIN);
        Self {
            dir,
            conf,
            pin_file,
            label: label.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the divkey CLI with this token's SoftHSM2 config.
    pub fn divkey(&self, args: &[&str]) -> std::process::Output {
        Command::new(divkey_bin())
            .env("SOFTHSM2_CONF", &self.conf)
            .args(args)
            .output()
            .expect("run divkey")
    }

    /// Imports `key_hex` as a master key via `divkey keys import` (sensitive, non-extractable).
    pub fn import_key(&self, config: &Path, label: &str, key_hex: &str) {
        let kind = match key_hex.len() / 2 {
            16 => "aes128",
            24 => "aes192",
            32 => "aes256",
            n => panic!("{n} bytes"),
        };
        let (first, second) = split_key(key_hex);
        let out = self.divkey(&[
            "keys",
            "import",
            "--config",
            config.to_str().unwrap(),
            "--label",
            label,
            "--type",
            kind,
            "--component",
            &first,
            "--component",
            &second,
        ]);
        assert!(
            out.status.success(),
            "import: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Two ceremony components whose XOR is `key_hex` (a ceremony takes 2 to 5).
pub fn split_key(key_hex: &str) -> (String, String) {
    use sha2::Digest;
    let key = hex::decode(key_hex).unwrap();
    let mask = sha2::Sha256::digest(b"divkey test component mask");
    let first: Vec<u8> = key
        .iter()
        .zip(mask.iter().cycle())
        .map(|(k, m)| k ^ m)
        .collect();
    (hex::encode(first), hex::encode(&mask[..key.len()]))
}

pub fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `[hsm]` and `[store]` sections for a token, plus whatever follows.
pub fn config_text(token: &TestToken, listen: &str, rest: &str) -> String {
    format!(
        r#"listen = "{listen}"
workers = 2

[hsm]
module = "{SOFTHSM_MODULE}"
token_label = "{label}"
pin_file = "{pin}"

[store]
sqlite = "{db}"

{rest}
"#,
        label = token.label,
        pin = token.pin_file.display(),
        db = token.path().join("divkey.db").display(),
    )
}

/// One des3 template (sp800-108-cmac under `admin-master`) and one bearer-token caller
/// who may request, bind and read keys on it: the config of the process-level tests.
pub fn agent_template_config(template: &str, token: &str) -> String {
    format!(
        r#"[[profile_template]]
uuid = "{template}"
name = "Base CSP"
algorithm = "sp800-108-cmac"
key_type = "des3"
master_key = "admin-master"
default_admin_key_hex = "010203040506070801020304050607080102030405060708"

[[caller]]
name = "agent"
token_sha256 = "{hash}"
permissions = {{ "{template}" = ["request", "bind", "read_key"] }}
"#,
        hash = sha256_hex(token)
    )
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// A running `divkey serve` whose stderr (its log) is captured.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server and waits for its "listening on" line.
    pub fn start(token: &TestToken, config: &Path) -> Self {
        Self::try_start(token, config).unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    pub fn try_start(token: &TestToken, config: &Path) -> Result<Self, String> {
        Self::try_start_with_env(token, config, &[])
    }

    /// Starts the server with extra environment variables (e.g. `P11_KIT_SERVER_ADDRESS`).
    pub fn start_with_env(token: &TestToken, config: &Path, env: &[(&str, &str)]) -> Self {
        Self::try_start_with_env(token, config, env)
            .unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    pub fn try_start_with_env(
        token: &TestToken,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let mut child = Command::new(divkey_bin())
            .env("SOFTHSM2_CONF", &token.conf)
            .envs(env.iter().copied())
            .args(["serve", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn divkey serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let found = ["http", "https"].into_iter().find_map(|scheme| {
                    let marker = format!("listening on {scheme}://");
                    let i = line.find(&marker)?;
                    Some((scheme, line[i + marker.len()..].trim().to_owned()))
                });
                if let Some(found) = found
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(found);
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((scheme, addr)) = rx.recv_timeout(Duration::from_millis(50)) {
                let addr = addr.trim_end_matches('"').to_owned();
                return Ok(Self {
                    child,
                    base: format!("{scheme}://{addr}/CertificateManagement/api/v1.0"),
                    addr,
                    log,
                });
            }
            if let Ok(Some(_)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(log.lock().unwrap().clone());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("timeout\n{}", log.lock().unwrap()));
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Stops the server with SIGTERM and returns its whole log.
    pub fn stop(mut self) -> String {
        unsafe_sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        self.log()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// Runs `divkey <args>` and returns (exit code, stdout, stderr).
pub fn run_divkey(token: &TestToken, args: &[&str]) -> (i32, String, String) {
    let out = token.divkey(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// Independent software implementation of SPEC section 3 (written from the text, not from
// src/diversify.rs), over RustCrypto's AES-CMAC.

pub fn soft_cmac(key: &[u8], msg: &[u8]) -> [u8; 16] {
    fn run<M: Mac + cmac::digest::KeyInit>(key: &[u8], msg: &[u8]) -> [u8; 16] {
        let mut m = <M as cmac::digest::KeyInit>::new_from_slice(key).unwrap();
        m.update(msg);
        m.finalize().into_bytes().as_slice().try_into().unwrap()
    }
    match key.len() {
        16 => run::<Cmac<Aes128>>(key, msg),
        24 => run::<Cmac<Aes192>>(key, msg),
        32 => run::<Cmac<Aes256>>(key, msg),
        n => panic!("AES key of {n} bytes"),
    }
}

/// SP 800-108 counter mode, 8-bit counter before the fixed input, PRF = AES-CMAC.
pub fn soft_kdf_ctr(key: &[u8], fixed: &[u8], l_bits: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 1u8;
    while out.len() * 8 < l_bits {
        let mut msg = vec![i];
        msg.extend_from_slice(fixed);
        out.extend_from_slice(&soft_cmac(key, &msg));
        i += 1;
    }
    out.truncate(l_bits / 8);
    out
}

pub fn card_id_bytes(card: &str, layout: &str) -> [u8; 16] {
    let hexs: String = card.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let b: [u8; 16] = hex::decode(hexs).unwrap().try_into().unwrap();
    match layout {
        "rfc4122" => b,
        "windows" => [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ],
        other => panic!("layout {other}"),
    }
}

pub fn key_type_len(key_type: &str) -> usize {
    match key_type {
        "des3" | "aes192" => 24,
        "aes128" => 16,
        "aes256" => 32,
        other => panic!("key type {other}"),
    }
}

pub fn soft_sp800_108(master: &[u8], label: &str, key_type: &str, cid: &[u8; 16]) -> Vec<u8> {
    let kt = match key_type {
        "des3" => 1u8,
        "aes128" => 2,
        "aes192" => 3,
        "aes256" => 4,
        other => panic!("{other}"),
    };
    let l_bits = key_type_len(key_type) * 8;
    let mut fixed = label.as_bytes().to_vec();
    fixed.push(0);
    fixed.push(kt);
    fixed.extend_from_slice(cid);
    fixed.extend_from_slice(&(l_bits as u32).to_be_bytes());
    let mut out = soft_kdf_ctr(master, &fixed, l_bits);
    if key_type == "des3" {
        for b in &mut out {
            let ones = (*b >> 1).count_ones();
            *b = (*b & 0xFE) | if ones % 2 == 0 { 1 } else { 0 };
        }
    }
    out
}

/// The des3 admin key of `card` under `master_hex`: SP 800-108 with [`DEFAULT_LABEL`] and
/// windows card ID bytes.
pub fn soft_admin_des3(master_hex: &str, card: &str) -> Vec<u8> {
    soft_sp800_108(
        &hex::decode(master_hex).unwrap(),
        DEFAULT_LABEL,
        "des3",
        &card_id_bytes(card, "windows"),
    )
}

/// NXP AN10922 AES-128/192/256 diversification for M of 16 to 31 bytes.
pub fn soft_an10922(master: &[u8], m: &[u8]) -> Vec<u8> {
    let step = |c: u8| {
        let mut d = vec![c];
        d.extend_from_slice(m);
        soft_cmac(master, &d)
    };
    match master.len() {
        16 => step(0x01).to_vec(),
        24 => {
            let (a, b) = (step(0x11), step(0x12));
            let mut k = a[..8].to_vec();
            k.extend((0..8).map(|i| a[8 + i] ^ b[i]));
            k.extend_from_slice(&b[8..]);
            k
        }
        32 => [step(0x41), step(0x42)].concat(),
        n => panic!("{n}"),
    }
}

/// KCV: 3DES key = 3DES-ECB(key, 0^8)[..3]; AES key = AES-CMAC(key, 0^16)[..3]. Upper-case hex.
pub fn soft_kcv(key: &[u8], des3: bool) -> String {
    if des3 {
        use des::TdesEde3;
        use des::cipher::{BlockEncrypt, KeyInit};
        let c = TdesEde3::new_from_slice(key).unwrap();
        let mut block = des::cipher::generic_array::GenericArray::clone_from_slice(&[0u8; 8]);
        c.encrypt_block(&mut block);
        hex::encode_upper(&block[..3])
    } else {
        hex::encode_upper(&soft_cmac(key, &[0u8; 16])[..3])
    }
}

// ---------------------------------------------------------------------------------------
// HTTP helpers (ureq: errors carry the response, so statuses are compared directly).

pub struct Resp {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The trailing GUID of a `"api/v1.0/{kind}/{uuid}"` body.
    pub fn created_id(&self) -> String {
        assert_eq!(self.status, 201, "{}", self.body);
        let s: String = serde_json::from_str(&self.body).unwrap();
        s.rsplit('/').next().unwrap().to_owned()
    }
}

pub fn to_resp(r: ureq::Response) -> Resp {
    let status = r.status();
    let headers = r
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = r.header(&n).unwrap_or("").to_owned();
            (n, v)
        })
        .collect();
    let body = r.into_string().unwrap_or_default();
    Resp {
        status,
        body,
        headers,
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

pub fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Resp {
    try_call(agent, method, url, token, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// As [`call`], but a transport failure (connection refused, TLS handshake rejected, …) is
/// returned instead of panicking; any HTTP status is a response.
pub fn try_call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<Resp, Box<ureq::Transport>> {
    let mut req = agent.request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match result {
        Ok(r) => Ok(to_resp(r)),
        Err(ureq::Error::Status(_, r)) => Ok(to_resp(r)),
        Err(ureq::Error::Transport(t)) => Err(Box::new(t)),
    }
}

/// A 200 response carrying key material (a key or a challenge response): headers, a JSON
/// string of standard base64; returns the bytes.
pub fn key_bytes(r: &Resp) -> Vec<u8> {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "{:?}",
        r.headers
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.header("content-type")
    );
    let s: String = serde_json::from_str(&r.body).expect("the body is a JSON string");
    base64::engine::general_purpose::STANDARD
        .decode(&s)
        .unwrap_or_else(|e| panic!("{s:?} is not standard base64 with padding: {e}"))
}

/// An error response: status, JSON body with the three fields, correlation id echoed.
/// Returns the ErrorCode.
pub fn error_code(r: &Resp, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}: {}",
        r.header("content-type"),
        r.body
    );
    let v = r.json();
    let message = v["Message"].as_str().expect("Message");
    assert!(!message.is_empty(), "{}", r.body);
    let code = v["ErrorCode"].as_str().expect("ErrorCode");
    assert!(!code.is_empty(), "{}", r.body);
    let cid = v["CorrelationId"].as_str().expect("CorrelationId");
    assert!(!cid.is_empty(), "{}", r.body);
    assert_eq!(r.header("x-correlation-id"), Some(cid));
    assert_eq!(v.as_object().unwrap().len(), 3, "{}", r.body);
    code.to_owned()
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// A fresh random card ID.
pub fn new_card() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Standard base64 with padding.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn has_odd_parity(key: &[u8]) -> bool {
    key.iter().all(|b| b.count_ones() % 2 == 1)
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Opens the token with divkey's own HSM layer. One process-wide PKCS#11 context per test
/// binary: call it once, from the binary's only test.
pub fn open_hsm(token: &TestToken) -> divkey::hsm::Hsm {
    // SAFETY: set before any PKCS#11 call of this process, while no other thread reads the
    // environment (the CLI children have finished).
    unsafe { std::env::set_var("SOFTHSM2_CONF", &token.conf) };
    let cfg: divkey::config::HsmConfig = toml::from_str(&format!(
        "module = \"{SOFTHSM_MODULE}\"\ntoken_label = \"{}\"\npin_file = \"{}\"",
        token.label,
        token.pin_file.display()
    ))
    .unwrap();
    divkey::hsm::Hsm::open(&cfg).expect("open HSM")
}

// ---------------------------------------------------------------------------------------
// CLI refusals.

/// Fails if any of `secrets` (as given, upper- or lower-case) appears in `output`.
pub fn assert_no_secret(what: &str, output: &str, secrets: &[&str]) {
    for s in secrets {
        for form in [s.to_string(), s.to_uppercase(), s.to_lowercase()] {
            assert!(
                !output.contains(&form),
                "{what}: a secret ({form}) appears in the output:\n{output}"
            );
        }
    }
}

/// The output holds exactly one non-empty line, `divkey: error: ...`, naming every needle,
/// and no panic.
pub fn assert_one_error_line(what: &str, output: &str, needles: &[&str]) {
    assert!(!output.contains("panicked"), "{what}: panicked:\n{output}");
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line, got:\n{output}");
    let line = lines[0];
    assert!(
        line.starts_with("divkey: error:"),
        "{what}: not a \"divkey: error:\" line: {line}"
    );
    for n in needles {
        assert!(line.contains(n), "{what}: {n:?} not named in: {line}");
    }
}

/// `divkey serve` exits (does not hang, does not listen) with one error line naming
/// `needles`, and none of `secrets` in its log.
pub fn assert_serve_refuses(token: &TestToken, config: &Path, needles: &[&str], secrets: &[&str]) {
    let what = format!("serve {}", config.display());
    let log = match Server::try_start(token, config) {
        Ok(server) => panic!("{what} started:\n{}", server.stop()),
        Err(log) => log,
    };
    assert!(!log.starts_with("timeout"), "{what} hung:\n{log}");
    assert_one_error_line(&what, &log, needles);
    assert_no_secret(&what, &log, secrets);
}

/// `divkey check` succeeds, prints "ok", writes nothing to stderr and no PIN; returns stdout.
pub fn assert_check_ok(token: &TestToken, config: &Path) -> String {
    let (code, out, err) = run_divkey(token, &["check", "--config", p(config)]);
    assert_eq!(code, 0, "check failed:\n{out}{err}");
    assert!(out.contains("ok"), "check did not print ok:\n{out}");
    assert!(err.trim().is_empty(), "check wrote to stderr:\n{err}");
    assert_no_secret("check", &out, &[USER_PIN]);
    out
}

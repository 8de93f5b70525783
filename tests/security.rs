//! Security end to end (issue 3): TLS and mutual TLS with certificates made here (rcgen),
//! caller identity by certificate or bearer token, per-template permissions and separation of
//! duties, the hash-chained audit trail (`divkey audit verify|export`, tampering found at the
//! first bad record), fail-closed key release when the audit record cannot be written, the
//! per-caller rate limit, and secrets hygiene (no key, PIN, token or TLS private key in any
//! log, audit export or database file).
//!
//! Every test drives real `divkey` processes on a throw-away SoftHSM2 token; released keys are
//! compared with the independent software implementation in `common`.

mod common;

/// A ceremony takes 2 to 5 components; this is the second one where a test needs any.
const SECOND_COMPONENT: &str = "2b7e151628aed2a6abf7158809cf4f3c";

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// The master key imported into every token (the AES-256 key of NIST SP 800-38B).
const MASTER_HEX: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
const DES3_DEFAULT: &str = "0102030405060708a1a2a3a4a5a6a7a8b1b2b3b4b5b6b7b8";

const T1: &str = "5c0ffee0-1111-4a8e-9c2d-3f4e5a6b7c01";
const T2: &str = "5c0ffee0-2222-4a8e-9c2d-3f4e5a6b7c02";
const T3: &str = "5c0ffee0-3333-4a8e-9c2d-3f4e5a6b7c03";
const T4: &str = "5c0ffee0-4444-4a8e-9c2d-3f4e5a6b7c04";

const ALL_PERMISSIONS: [&str; 4] = ["request", "approve", "bind", "read_key"];

// ---------------------------------------------------------------------------------------
// Configuration pieces.

/// A des3 SP 800-108 template on the master key "admin-master".
fn template(uuid: &str, name: &str, approvals: u32, separate_duties: bool) -> String {
    format!(
        r#"
[[profile_template]]
uuid = "{uuid}"
name = "{name}"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "des3"
card_id_bytes = "windows"
master_key = "admin-master"
approvals_required = {approvals}
default_admin_key_hex = "{DES3_DEFAULT}"
separate_duties = {separate_duties}
"#
    )
}

/// A `[[caller]]` with credential lines (`token_sha256 = …` etc.) and permissions per template.
fn caller(name: &str, credentials: &[String], permissions: &[(&str, &[&str])]) -> String {
    let perms: Vec<String> = permissions
        .iter()
        .map(|(t, ps)| {
            let list: Vec<String> = ps.iter().map(|p| format!("\"{p}\"")).collect();
            format!("\"{t}\" = [{}]", list.join(", "))
        })
        .collect();
    format!(
        "\n[[caller]]\nname = \"{name}\"\n{}\npermissions = {{ {} }}\n",
        credentials.join("\n"),
        perms.join(", ")
    )
}

fn token_line(token: &str) -> String {
    format!("token_sha256 = \"{}\"", sha256_hex(token))
}

// ---------------------------------------------------------------------------------------
// Expected keys and small helpers.

fn master() -> Vec<u8> {
    hex::decode(MASTER_HEX).unwrap()
}

fn want_des3(card: &str) -> Vec<u8> {
    soft_admin_des3(MASTER_HEX, card)
}

fn template_uuids(r: &Resp) -> Vec<String> {
    assert_eq!(r.status, 200, "{}", r.body);
    let mut v: Vec<String> = r
        .json()
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|t| t["Uuid"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

fn plain_agent() -> ureq::Agent {
    agent()
}

/// Runs `divkey` with extra environment variables; returns (exit code, stdout, stderr).
fn divkey_env(token: &TestToken, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(divkey_bin());
    cmd.env("SOFTHSM2_CONF", &token.conf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().expect("run divkey");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// Secrets that must never appear in logs, CLI output, audit exports or database files.

#[derive(Default)]
struct Secrets(Vec<(String, String)>);

impl Secrets {
    /// The PINs, the master key and these bearer tokens.
    fn base(tokens: &[&str]) -> Self {
        let mut s = Self::default();
        s.add("user PIN", USER_PIN);
        s.add("SO PIN", SO_PIN);
        s.add("master key", MASTER_HEX);
        s.add("master key", &MASTER_HEX.to_uppercase());
        s.add("master key", &b64(&master()));
        for t in tokens {
            s.add("bearer token", t);
        }
        s
    }

    fn add(&mut self, what: &str, secret: &str) {
        self.0.push((what.to_owned(), secret.to_owned()));
    }

    /// A derived key in every likely printed form, and 8-byte runs of it.
    fn key(&mut self, what: &str, key: &[u8]) {
        let e = base64::engine::general_purpose::STANDARD_NO_PAD;
        for form in [
            hex::encode(key),
            hex::encode_upper(key),
            b64(key),
            e.encode(key),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key),
            hex::encode(&key[..8]),
            hex::encode_upper(&key[..8]),
            hex::encode(&key[key.len() - 8..]),
            hex::encode_upper(&key[key.len() - 8..]),
        ] {
            self.add(what, &form);
        }
    }

    /// A private key: every base64 line of its PEM, its DER in hex.
    fn private_key(&mut self, what: &str, pem: &str, der: &[u8]) {
        for line in pem.lines() {
            let line = line.trim();
            if !line.starts_with("-----") && line.len() >= 16 {
                self.add(what, line);
            }
        }
        self.add(what, &hex::encode(der));
        self.add(what, &hex::encode_upper(der));
    }

    fn check(&self, what: &str, text: &str) {
        for (kind, s) in &self.0 {
            assert!(
                !text.contains(s.as_str()),
                "{what} contains a {kind}: {s}\n{text}"
            );
        }
    }

    fn check_bytes(&self, what: &str, bytes: &[u8]) {
        for (kind, s) in &self.0 {
            let needle = s.as_bytes();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{what} contains a {kind}: {s}"
            );
        }
    }

    /// Also the raw bytes of each derived key.
    fn check_raw_keys(what: &str, bytes: &[u8], keys: &[Vec<u8>]) {
        for k in keys {
            assert!(
                !bytes.windows(k.len()).any(|w| w == k.as_slice()),
                "{what} contains the raw bytes of a derived key"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Certificates, made for each test.

struct Identity {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_der: Vec<u8>,
    key_pem: String,
}

impl Identity {
    fn sha256_hex(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.cert_der.as_ref()))
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn new_ca(name: &str) -> (Identity, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Divkey Tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let id = Identity {
        cert_der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_der: key.serialize_der(),
        key_pem: key.serialize_pem(),
    };
    (id, Issuer::new(params, key))
}

enum Validity {
    Current,
    Expired,
}

fn new_leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: &[&str],
    server: bool,
    validity: Validity,
) -> Identity {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Divkey Tests");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.use_authority_key_identifier_extension = true;
    if let Validity::Expired = validity {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    Identity {
        cert_der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_der: key.serialize_der(),
        key_pem: key.serialize_pem(),
    }
}

/// A CA trusted for clients (it also issues the server certificate), and the client
/// certificates of the TLS tests.
struct Pki {
    ca: Identity,
    server: Identity,
    /// Trusted; mapped by `cert_sha256` to "alice".
    alice: Identity,
    /// Trusted; mapped by `cert_subject` to "bob".
    bob: Identity,
    /// Trusted; mapped by `cert_san` to "carol".
    carol: Identity,
    /// Trusted, but mapped to no caller.
    stranger: Identity,
    /// Issued by another CA, with bob's subject and carol's SAN, its fingerprint mapped to
    /// "mallory": the chain must still verify.
    rogue: Identity,
    rogue_ca: Identity,
    /// Issued by the trusted CA, mapped by fingerprint to "eve", valid 2020 to 2021.
    expired: Identity,
}

const BOB_SUBJECT: &str = "CN=bob-agent, O=Divkey Tests";
const CAROL_SAN: &str = "carol.example";

impl Pki {
    fn new() -> Self {
        let (ca, issuer) = new_ca("divkey test client CA");
        let (rogue_ca, rogue_issuer) = new_ca("divkey test rogue CA");
        let server = new_leaf(
            &issuer,
            "divkey server",
            &["localhost", "127.0.0.1"],
            true,
            Validity::Current,
        );
        let alice = new_leaf(
            &issuer,
            "alice-agent",
            &["alice.example"],
            false,
            Validity::Current,
        );
        let bob = new_leaf(&issuer, "bob-agent", &[], false, Validity::Current);
        let carol = new_leaf(
            &issuer,
            "carol-agent",
            &[CAROL_SAN],
            false,
            Validity::Current,
        );
        let stranger = new_leaf(
            &issuer,
            "stranger",
            &["stranger.example"],
            false,
            Validity::Current,
        );
        let rogue = new_leaf(
            &rogue_issuer,
            "bob-agent",
            &[CAROL_SAN],
            false,
            Validity::Current,
        );
        let expired = new_leaf(
            &issuer,
            "eve-agent",
            &["eve.example"],
            false,
            Validity::Expired,
        );
        Self {
            ca,
            server,
            alice,
            bob,
            carol,
            stranger,
            rogue,
            rogue_ca,
            expired,
        }
    }

    /// Writes ca.pem, server.pem and server.key (mode 600) to `dir`; returns the `[tls]`
    /// section.
    fn write(&self, dir: &Path, client_auth: &str) -> String {
        let ca = dir.join("clients-ca.pem");
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        std::fs::write(&ca, &self.ca.cert_pem).unwrap();
        std::fs::write(&cert, &self.server.cert_pem).unwrap();
        write_private(&key, &self.server.key_pem);
        format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nclient_auth = \"{client_auth}\"\n",
            cert.display(),
            key.display(),
            ca.display()
        )
    }

    /// Every private key made here.
    fn secrets(&self, s: &mut Secrets) {
        for (what, id) in [
            ("TLS server private key", &self.server),
            ("client CA private key", &self.ca),
            ("rogue CA private key", &self.rogue_ca),
            ("client private key", &self.alice),
            ("client private key", &self.bob),
            ("client private key", &self.carol),
            ("client private key", &self.stranger),
            ("client private key", &self.rogue),
            ("client private key", &self.expired),
        ] {
            s.private_key(what, &id.key_pem, &id.key_der);
        }
    }

    /// A ureq agent that trusts the test CA for the server and presents `client`, if any.
    fn agent(&self, client: Option<&Identity>) -> ureq::Agent {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert_der.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some(c) => builder
                .with_client_auth_cert(vec![c.cert_der.clone()], c.key())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .tls_config(Arc::new(config))
            .build()
    }
}

// ---------------------------------------------------------------------------------------
// A running server on its own token.

/// Fields drop in order: the server before the token.
struct Env {
    server: Server,
    http: ureq::Agent,
    token: TestToken,
    config: PathBuf,
}

impl Env {
    /// Plain HTTP on loopback.
    fn start(rest: &str) -> Self {
        Self::start_with(TestToken::new(), "127.0.0.1:0", rest)
    }

    fn start_with(token: TestToken, listen: &str, rest: &str) -> Self {
        let config = token.path().join("divkey.toml");
        std::fs::write(&config, config_text(&token, listen, rest)).unwrap();
        token.import_key(&config, "admin-master", MASTER_HEX);
        let server = Server::start(&token, &config);
        Self {
            server,
            http: plain_agent(),
            token,
            config,
        }
    }

    fn stop(self) -> (String, TestToken, PathBuf) {
        let Self {
            server,
            token,
            config,
            ..
        } = self;
        (server.stop(), token, config)
    }

    fn db(&self) -> PathBuf {
        self.token.path().join("divkey.db")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    fn call(&self, tok: Option<&str>, method: &str, path: &str, body: Option<Value>) -> Resp {
        call(&self.http, method, &self.url(path), tok, body)
    }

    fn get(&self, tok: &str, path: &str) -> Resp {
        self.call(Some(tok), "GET", path, None)
    }

    fn create(&self, tok: &str, template: &str) -> Resp {
        self.call(
            Some(tok),
            "POST",
            "/requests",
            Some(json!({"type": "Enroll", "profiletemplateuuid": template})),
        )
    }

    fn set_status(&self, tok: &str, reqid: &str, status: &str) -> Resp {
        self.call(
            Some(tok),
            "PUT",
            &format!("/requests/{reqid}"),
            Some(json!({ "status": status })),
        )
    }

    fn bind(&self, tok: &str, reqid: &str, card: &str) -> Resp {
        self.call(
            Some(tok),
            "POST",
            "/smartcards",
            Some(json!({"requestid": reqid, "cardid": card})),
        )
    }

    fn status_of(&self, tok: &str, reqid: &str) -> i64 {
        let r = self.get(tok, &format!("/requests/{reqid}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["Status"].as_i64().unwrap()
    }

    fn key_path(reqid: &str, scid: &str, card: &str) -> String {
        format!("/requests/{reqid}/smartcards/{scid}/diversifiedkey?cardid={card}")
    }

    fn key(&self, tok: &str, reqid: &str, scid: &str, card: &str) -> Resp {
        self.get(tok, &Self::key_path(reqid, scid, card))
    }

    /// `method path` with exactly these headers (besides ureq's own).
    fn with_headers(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = self.http.request(method, &self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = match req.call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .map(|n| {
                let v = resp.header(&n).unwrap_or("").to_owned();
                (n, v)
            })
            .collect();
        Resp {
            status,
            body: resp.into_string().unwrap_or_default(),
            headers,
        }
    }

    /// An Enroll request on `template` by `tok` (who must be able to create, bind and, for a
    /// template with approvals, approve), with `card` bound: (request id, smart card id).
    fn enroll(
        &self,
        tok: &str,
        approver: Option<&str>,
        template: &str,
        card: &str,
    ) -> (String, String) {
        let reqid = self.create(tok, template).created_id();
        if let Some(a) = approver {
            let r = self.set_status(a, &reqid, "Approved");
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let scid = self.bind(tok, &reqid, card).created_id();
        (reqid, scid)
    }

    /// The audit records, exported by the CLI.
    fn audit(&self, since: Option<&str>) -> Vec<Value> {
        audit_export(&self.token, &self.config, since)
    }
}

fn audit_export(token: &TestToken, config: &Path, since: Option<&str>) -> Vec<Value> {
    let mut args = vec!["audit", "export", "--config", p(config)];
    if let Some(s) = since {
        args.extend(["--since", s]);
    }
    let (code, out, err) = run_divkey(token, &args);
    assert_eq!(code, 0, "audit export: {out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn audit_export_text(token: &TestToken, config: &Path) -> String {
    let (code, out, err) = run_divkey(token, &["audit", "export", "--config", p(config)]);
    assert_eq!(code, 0, "audit export: {out}{err}");
    out
}

/// `divkey audit verify` on `db` (through `DIVKEY_STORE_SQLITE`): (exit code, stdout, stderr).
fn audit_verify(token: &TestToken, config: &Path, db: &Path) -> (i32, String, String) {
    divkey_env(
        token,
        &[("DIVKEY_STORE_SQLITE", p(db))],
        &["audit", "verify", "--config", p(config)],
    )
}

fn records_where<'a>(records: &'a [Value], action: &str, outcome: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["action"] == action && r["outcome"] == outcome)
        .collect()
}

/// The records' correlation ids, sorted.
fn sorted_cids<'a>(records: &[&'a Value]) -> Vec<&'a str> {
    let mut cids: Vec<&str> = records
        .iter()
        .map(|r| r["correlation_id"].as_str().unwrap())
        .collect();
    cids.sort_unstable();
    cids
}

/// Every file of the SQLite database (main file, WAL), concatenated.
fn db_bytes(db: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-journal"] {
        let path = PathBuf::from(format!("{}{suffix}", db.display()));
        if let Ok(bytes) = std::fs::read(&path) {
            all.extend(bytes);
        }
    }
    all
}

fn sqlite(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

// =======================================================================================
// 1. TLS and caller identity.

const ALICE_TOKEN: &str = "alice-bearer-4b8d2f6a0c1e3a5c7e9b1d3f5a7c9e02";
const DAVE_TOKEN: &str = "dave-bearer-7e1c5a9d3b0f2e4a6c8b0d2f4a6c8e13";
const UNKNOWN_TOKEN: &str = "unknown-bearer-2a6e0c4b8d1f3a5c7e9b0d2f4a6c8e24";

/// Callers of the TLS tests: alice (certificate by fingerprint, and a token), bob (subject),
/// carol (SAN), dave (token only), eve (the expired certificate's fingerprint), mallory (the
/// rogue certificate's fingerprint). Each sees its own template, so a template list names
/// the caller.
fn tls_rest(pki: &Pki, tls_section: &str) -> String {
    let mut rest = String::from("\n[log]\nlevel = \"debug\"\n");
    rest.push_str(tls_section);
    rest.push_str(&template(T1, "alice's", 0, false));
    rest.push_str(&template(T2, "bob's", 0, false));
    rest.push_str(&template(T3, "carol's", 0, false));
    rest.push_str(&template(T4, "dave's", 0, false));
    rest.push_str(&caller(
        "alice",
        &[
            format!("cert_sha256 = \"{}\"", pki.alice.sha256_hex()),
            token_line(ALICE_TOKEN),
        ],
        &[(T1, &ALL_PERMISSIONS)],
    ));
    rest.push_str(&caller(
        "bob",
        &[format!("cert_subject = \"{BOB_SUBJECT}\"")],
        &[(T2, &["request"])],
    ));
    rest.push_str(&caller(
        "carol",
        &[format!("cert_san = \"{CAROL_SAN}\"")],
        &[(T3, &["request"])],
    ));
    rest.push_str(&caller(
        "dave",
        &[token_line(DAVE_TOKEN)],
        &[(T4, &["request"])],
    ));
    rest.push_str(&caller(
        "eve",
        &[format!("cert_sha256 = \"{}\"", pki.expired.sha256_hex())],
        &[(T1, &ALL_PERMISSIONS)],
    ));
    rest.push_str(&caller(
        "mallory",
        &[format!("cert_sha256 = \"{}\"", pki.rogue.sha256_hex())],
        &[(T1, &ALL_PERMISSIONS)],
    ));
    rest
}

/// `GET /profiletemplates` over `agent`: the response, or the transport error.
fn templates_over(
    env: &Env,
    agent: &ureq::Agent,
    tok: Option<&str>,
) -> Result<Resp, Box<ureq::Transport>> {
    try_call(agent, "GET", &env.url("/profiletemplates"), tok, None)
}

/// The handshake (or the first read after it) is refused: a transport error, never a status.
/// When the client got to read the server's alert, it is `alert` (else the connection was
/// reset before the alert could be read, which proves the refusal as well).
fn assert_rejected(what: &str, alert: &str, result: Result<Resp, Box<ureq::Transport>>) {
    match result {
        Ok(r) => panic!(
            "{what}: expected the TLS handshake to be rejected, got HTTP {}: {}",
            r.status, r.body
        ),
        Err(t) => {
            let text = t.to_string();
            eprintln!("{what}: rejected as expected: {text}");
            assert!(
                !text.contains("alert") || text.contains(alert),
                "{what}: rejected for another reason than {alert}: {text}"
            );
        }
    }
}

fn tls_secrets(pki: &Pki) -> Secrets {
    let mut s = Secrets::base(&[ALICE_TOKEN, DAVE_TOKEN, UNKNOWN_TOKEN]);
    pki.secrets(&mut s);
    s
}

#[test]
fn mtls_required_maps_certificates_to_callers_and_rejects_bad_ones() {
    let pki = Pki::new();
    let token = TestToken::new();
    let tls = pki.write(token.path(), "required");
    let env = Env::start_with(token, "127.0.0.1:0", &tls_rest(&pki, &tls));
    assert!(
        env.server.base.starts_with("https://127.0.0.1:"),
        "{}",
        env.server.base
    );
    let mut secrets = tls_secrets(&pki);

    // Trusted client certificates, each mapped to its caller (by fingerprint, subject, SAN).
    let alice = pki.agent(Some(&pki.alice));
    for (name, id, want) in [
        ("alice (cert_sha256)", &pki.alice, T1),
        ("bob (cert_subject)", &pki.bob, T2),
        ("carol (cert_san)", &pki.carol, T3),
    ] {
        let r = templates_over(&env, &pki.agent(Some(id)), None)
            .unwrap_or_else(|e| panic!("{name}: handshake failed: {e}"));
        assert_eq!(template_uuids(&r), sorted(&[want]), "{name}");
    }

    // The whole flow with alice's certificate alone: request, bind, key.
    let card = new_card();
    let r = call(
        &alice,
        "POST",
        &env.url("/requests"),
        None,
        Some(json!({"type": "Enroll", "profiletemplateuuid": T1})),
    );
    let reqid = r.created_id();
    let r = call(
        &alice,
        "POST",
        &env.url("/smartcards"),
        None,
        Some(json!({"requestid": reqid, "cardid": card})),
    );
    let scid = r.created_id();
    let key_url = env.url(&Env::key_path(&reqid, &scid, &card));
    let key = key_bytes(&call(&alice, "GET", &key_url, None, None));
    assert_eq!(key, want_des3(&card));
    secrets.key("derived key", &key);

    // A certificate and a token of the same caller: accepted. Of different callers, or an
    // unknown token: 401.
    let r = templates_over(&env, &alice, Some(ALICE_TOKEN)).unwrap();
    assert_eq!(template_uuids(&r), sorted(&[T1]));
    let r = templates_over(&env, &alice, Some(DAVE_TOKEN)).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");
    let r = templates_over(&env, &alice, Some(UNKNOWN_TOKEN)).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));

    // A trusted certificate that names no caller: 401, on the key endpoint too (audited).
    let stranger = pki.agent(Some(&pki.stranger));
    let r = templates_over(&env, &stranger, None).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");
    let r = call(&stranger, "GET", &key_url, None, None);
    assert_eq!(error_code(&r, 401), "Unauthorized");
    assert!(!r.body.contains(&b64(&key)));
    // A known token does not make up for an unknown certificate.
    let r = templates_over(&env, &stranger, Some(DAVE_TOKEN)).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");

    // Rejected in the handshake: another CA (even with a pinned fingerprint, bob's subject
    // and carol's SAN), an expired certificate (even with a pinned fingerprint), and no
    // certificate at all (even with a valid bearer token).
    let rogue = pki.agent(Some(&pki.rogue));
    assert_rejected("rogue CA", "UnknownCA", templates_over(&env, &rogue, None));
    assert_rejected(
        "rogue CA, key endpoint",
        "UnknownCA",
        try_call(&rogue, "GET", &key_url, None, None),
    );
    let expired = pki.agent(Some(&pki.expired));
    assert_rejected(
        "expired",
        "CertificateExpired",
        templates_over(&env, &expired, None),
    );
    assert_rejected(
        "expired, key endpoint",
        "CertificateExpired",
        try_call(&expired, "GET", &key_url, None, None),
    );
    let anonymous = pki.agent(None);
    assert_rejected(
        "no certificate",
        "CertificateRequired",
        templates_over(&env, &anonymous, None),
    );
    assert_rejected(
        "no certificate, with a valid token",
        "CertificateRequired",
        templates_over(&env, &anonymous, Some(DAVE_TOKEN)),
    );
    assert_rejected(
        "no certificate, key endpoint with alice's token",
        "CertificateRequired",
        try_call(&anonymous, "GET", &key_url, Some(ALICE_TOKEN), None),
    );
    // A client that does not trust the server's CA refuses the server.
    let distrustful = {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.rogue_ca.cert_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![pki.alice.cert_der.clone()], pki.alice.key())
            .unwrap();
        ureq::AgentBuilder::new()
            .tls_config(Arc::new(config))
            .build()
    };
    assert_rejected(
        "untrusted server",
        "UnknownIssuer",
        templates_over(&env, &distrustful, None),
    );
    // Plain HTTP to the TLS port gets no answer from the API.
    let plain_url = env
        .url("/profiletemplates")
        .replacen("https://", "http://", 1);
    if let Ok(r) = try_call(&plain_agent(), "GET", &plain_url, Some(DAVE_TOKEN), None) {
        assert!(
            r.status >= 400,
            "plain HTTP answered {}: {}",
            r.status,
            r.body
        );
    }

    // Still serving the good ones after the rejections.
    assert_eq!(key_bytes(&call(&alice, "GET", &key_url, None, None)), key);

    // The audit trail names the certificate's caller; the unknown certificate is a denial.
    let records = env.audit(None);
    let released = records_where(&records, "key.release", "released");
    assert_eq!(released.len(), 2, "{records:#?}");
    for r in &released {
        assert_eq!(r["caller"], "alice");
        assert_eq!(r["source"], "127.0.0.1");
        assert_eq!(r["kcv"], soft_kcv(&key, true));
    }
    let denied = records_where(&records, "key.release", "denied:Unauthorized");
    assert_eq!(denied.len(), 1, "{records:#?}");
    assert_eq!(denied[0]["caller"], Value::Null);
    assert_eq!(denied[0]["request"], reqid.as_str());
    assert_eq!(denied[0]["smartcard"], scid.as_str());
    // Rejected handshakes never reached the API: nothing else was recorded for them.
    assert_eq!(
        records
            .iter()
            .filter(|r| r["action"] == "key.release")
            .count(),
        3,
        "{records:#?}"
    );

    let export = audit_export_text(&env.token, &env.config);
    let (log, token, _) = env.stop();
    assert!(log.contains("listening on https://"), "{log}");
    secrets.check("server log", &log);
    secrets.check("audit export", &export);
    let db = db_bytes(&token.path().join("divkey.db"));
    secrets.check_bytes("database", &db);
    Secrets::check_raw_keys("database", &db, &[key]);
}

#[test]
fn mtls_optional_accepts_bearer_tokens_and_still_checks_certificates() {
    let pki = Pki::new();
    let token = TestToken::new();
    let tls = pki.write(token.path(), "optional");
    let env = Env::start_with(token, "127.0.0.1:0", &tls_rest(&pki, &tls));
    assert!(
        env.server.base.starts_with("https://"),
        "{}",
        env.server.base
    );
    let secrets = tls_secrets(&pki);
    let anonymous = pki.agent(None);

    // Bearer token over TLS, no certificate.
    let r = templates_over(&env, &anonymous, Some(DAVE_TOKEN)).unwrap();
    assert_eq!(template_uuids(&r), sorted(&[T4]));
    let r = templates_over(&env, &anonymous, Some(ALICE_TOKEN)).unwrap();
    assert_eq!(template_uuids(&r), sorted(&[T1]));
    let reqid = call(
        &anonymous,
        "POST",
        &env.url("/requests"),
        Some(DAVE_TOKEN),
        Some(json!({"type": "Enroll", "profiletemplateuuid": T4})),
    )
    .created_id();
    assert!(!reqid.is_empty());
    // No credentials, or an unknown token: 401.
    let r = templates_over(&env, &anonymous, None).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");
    let r = templates_over(&env, &anonymous, Some(UNKNOWN_TOKEN)).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");

    // A trusted certificate identifies its caller.
    let r = templates_over(&env, &pki.agent(Some(&pki.carol)), None).unwrap();
    assert_eq!(template_uuids(&r), sorted(&[T3]));
    let r = templates_over(&env, &pki.agent(Some(&pki.stranger)), None).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");
    // A presented certificate must still verify.
    assert_rejected(
        "rogue CA",
        "UnknownCA",
        templates_over(&env, &pki.agent(Some(&pki.rogue)), Some(DAVE_TOKEN)),
    );
    assert_rejected(
        "expired",
        "CertificateExpired",
        templates_over(&env, &pki.agent(Some(&pki.expired)), Some(DAVE_TOKEN)),
    );

    let (log, _, _) = env.stop();
    secrets.check("server log", &log);
}

#[test]
fn tls_without_client_auth_on_any_address_serves_bearer_tokens() {
    let pki = Pki::new();
    let token = TestToken::new();
    let tls = pki.write(token.path(), "off");
    // With TLS, a non-loopback address is fine.
    let env = Env::start_with(token, "0.0.0.0:0", &tls_rest(&pki, &tls));
    let base = env.server.base.clone();
    assert!(base.starts_with("https://0.0.0.0:"), "{base}");
    let port = env.server.addr.rsplit(':').next().unwrap().to_owned();
    let url = format!("https://127.0.0.1:{port}/CertificateManagement/api/v1.0/profiletemplates");
    let secrets = tls_secrets(&pki);

    let anonymous = pki.agent(None);
    let r = try_call(&anonymous, "GET", &url, Some(DAVE_TOKEN), None).unwrap();
    assert_eq!(template_uuids(&r), sorted(&[T4]));
    // The server asks for no certificate, so none identifies anybody.
    let alice = pki.agent(Some(&pki.alice));
    let r = try_call(&alice, "GET", &url, None, None).unwrap();
    assert_eq!(error_code(&r, 401), "Unauthorized");
    let r = try_call(&alice, "GET", &url, Some(ALICE_TOKEN), None).unwrap();
    assert_eq!(template_uuids(&r), sorted(&[T1]));

    let (log, _, _) = env.stop();
    secrets.check("server log", &log);
}

#[test]
fn plain_http_off_loopback_and_bad_tls_settings_are_refused_at_start() {
    let token = TestToken::new();
    let rest = template(T1, "t", 0, false);
    let write = |name: &str, text: &str| {
        let path = token.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let refuse = |cfg: &Path, needles: &[&str], secrets: &[&str]| {
        let what = format!("check {}", cfg.display());
        let (code, out, err) = run_divkey(&token, &["check", "--config", p(cfg)]);
        assert_ne!(code, 0, "{what} succeeded: {out}{err}");
        assert!(!out.contains("ok"), "{what}: {out}");
        assert_one_error_line(&what, &err, needles);
        let what = format!("serve {}", cfg.display());
        let log = match Server::try_start(&token, cfg) {
            Ok(server) => panic!("{what} started:\n{}", server.stop()),
            Err(log) => log,
        };
        assert!(!log.starts_with("timeout"), "{what} hung:\n{log}");
        assert_one_error_line(&what, &log, needles);
        for s in secrets.iter().chain([&USER_PIN]) {
            assert!(
                !out.contains(s) && !err.contains(s) && !log.contains(s),
                "{s}"
            );
        }
    };

    let loopback = write("loopback.toml", &config_text(&token, "127.0.0.1:0", &rest));
    token.import_key(&loopback, "admin-master", MASTER_HEX);
    let (code, out, err) = run_divkey(&token, &["check", "--config", p(&loopback)]);
    assert_eq!(code, 0, "{out}{err}");

    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.1:8443"] {
        let cfg = write("open.toml", &config_text(&token, listen, &rest));
        refuse(&cfg, &["plain HTTP", listen, "[tls]", "loopback"], &[]);
    }
    // The environment override is checked the same way.
    let (code, out, err) = divkey_env(
        &token,
        &[("DIVKEY_LISTEN", "0.0.0.0:0")],
        &["check", "--config", p(&loopback)],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert_one_error_line("DIVKEY_LISTEN=0.0.0.0:0", &err, &["plain HTTP", "0.0.0.0"]);

    // client_auth without a CA bundle.
    let pki = Pki::new();
    let tls = pki
        .write(token.path(), "required")
        .lines()
        .filter(|l| !l.starts_with("client_ca"))
        .collect::<Vec<_>>()
        .join("\n");
    let cfg = write(
        "noca.toml",
        &config_text(&token, "127.0.0.1:0", &format!("{tls}\n{rest}")),
    );
    refuse(&cfg, &["client_ca"], &[]);

    // Key files that hold no usable key: refused, their content never shown. (`check` does
    // not load TLS material; `serve` does.)
    for (name, content, needles) in [
        (
            "nopem.key",
            "TOPSECRETKEYMATERIAL not a PEM file at all\n",
            &["TLS", "no usable private key", "nopem.key"][..],
        ),
        (
            "badder.key",
            "-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYMATERIALxyzzy0123456789TOPSECRET\n-----END PRIVATE KEY-----\n",
            &["TLS", "key"][..],
        ),
    ] {
        let bad_key = token.path().join(name);
        write_private(&bad_key, content);
        let tls = pki
            .write(token.path(), "required")
            .replace(p(&token.path().join("server.key")), p(&bad_key));
        let cfg = write(
            "badkey.toml",
            &config_text(&token, "127.0.0.1:0", &format!("{tls}\n{rest}")),
        );
        let log = match Server::try_start(&token, &cfg) {
            Ok(server) => panic!("serve with {name} started:\n{}", server.stop()),
            Err(log) => log,
        };
        assert_one_error_line(name, &log, needles);
        assert!(!log.contains("TOPSECRETKEYMATERIAL"), "{log}");
        assert!(!log.contains("xyzzy"), "{log}");
    }

    // A missing certificate file.
    let tls = pki.write(token.path(), "required").replace(
        p(&token.path().join("server.pem")),
        "/nonexistent/server.pem",
    );
    let cfg = write(
        "nocert.toml",
        &config_text(&token, "127.0.0.1:0", &format!("{tls}\n{rest}")),
    );
    let log = match Server::try_start(&token, &cfg) {
        Ok(server) => panic!("serve without a certificate started:\n{}", server.stop()),
        Err(log) => log,
    };
    assert_one_error_line(
        "missing TLS certificate",
        &log,
        &["/nonexistent/server.pem"],
    );
    let mut secrets = Secrets::base(&[]);
    pki.secrets(&mut secrets);
    secrets.check("serve log", &log);

    // A rate limit that allows nothing.
    let cfg = write(
        "ratelimit.toml",
        &config_text(
            &token,
            "127.0.0.1:0",
            &format!("[rate_limit]\nper_second = 0.0\nburst = 1\n{rest}"),
        ),
    );
    refuse(&cfg, &["[rate_limit]"], &[]);
}

// =======================================================================================
// 2. Authorization per template and caller.

const REQUESTER: &str = "requester-bearer-0a1b2c3d4e5f60718293a4b5c6d7e8f9";
const APPROVER: &str = "approver-bearer-1b2c3d4e5f60718293a4b5c6d7e8f90a";
const BINDER: &str = "binder-bearer-2c3d4e5f60718293a4b5c6d7e8f90a1b";
const READER: &str = "reader-bearer-3d4e5f60718293a4b5c6d7e8f90a1b2c";
const AUTHN: &str = "authn-bearer-4e5f60718293a4b5c6d7e8f90a1b2c3d";
const ADMIN: &str = "admin-bearer-5f60718293a4b5c6d7e8f90a1b2c3d4e";
const NOBODY: &str = "nobody-bearer-60718293a4b5c6d7e8f90a1b2c3d4e5f";
const SELF: &str = "self-bearer-718293a4b5c6d7e8f90a1b2c3d4e5f60";

/// (token, caller name) of the callers with one permission each on T1, and the others.
const ONE_EACH: [(&str, &str); 8] = [
    (REQUESTER, "requester"),
    (APPROVER, "approver"),
    (BINDER, "binder"),
    (READER, "reader"),
    (AUTHN, "authn"),
    (ADMIN, "admin"),
    (NOBODY, "nobody"),
    (SELF, "self"),
];

/// T1: one approval, a caller per permission. T2: one approval and separation of duties.
/// T3: one approval, no separation. "self" holds everything on T2 and T3; "approver" also
/// approves on T2.
fn permissions_rest() -> String {
    let mut rest = template(T1, "one permission each", 1, false);
    rest.push_str(&template(T2, "separate duties", 1, true));
    rest.push_str(&template(T3, "self approval allowed", 1, false));
    for (tok, name, perms) in [
        (REQUESTER, "requester", vec![(T1, &["request"][..])]),
        (
            APPROVER,
            "approver",
            vec![(T1, &["approve"][..]), (T2, &["approve"][..])],
        ),
        (BINDER, "binder", vec![(T1, &["bind"][..])]),
        (READER, "reader", vec![(T1, &["read_key"][..])]),
        (AUTHN, "authn", vec![(T1, &["authenticate"][..])]),
        (ADMIN, "admin", vec![(T1, &["admin"][..])]),
        (NOBODY, "nobody", vec![]),
        (
            SELF,
            "self",
            vec![(T2, &ALL_PERMISSIONS[..]), (T3, &ALL_PERMISSIONS[..])],
        ),
    ] {
        rest.push_str(&caller(name, &[token_line(tok)], &perms));
    }
    rest
}

/// Every caller in `ONE_EACH` but `holder` gets 403 PermissionDenied from `attempt`.
fn others_forbidden(holder: &str, what: &str, attempt: impl Fn(&str) -> Resp) {
    for (tok, name) in ONE_EACH {
        if tok == holder {
            continue;
        }
        let r = attempt(tok);
        assert_eq!(
            error_code(&r, 403),
            "PermissionDenied",
            "{what} by {name} (without the permission)"
        );
    }
}

#[test]
fn each_permission_is_needed_and_sufficient() {
    let env = Env::start(&permissions_rest());

    // Template lists: only templates the caller holds some permission on.
    for (tok, name) in ONE_EACH {
        let want: Vec<String> = match name {
            "nobody" => vec![],
            "approver" => sorted(&[T1, T2]),
            "self" => sorted(&[T2, T3]),
            _ => sorted(&[T1]),
        };
        assert_eq!(
            template_uuids(&env.get(tok, "/profiletemplates")),
            want,
            "{name}"
        );
    }
    // The template's configuration: any permission on it will do (authenticate and admin
    // included); none gives 403.
    let config_path = format!("/profiletemplates/{T1}/configuration/smartcards");
    for (tok, name) in ONE_EACH {
        let r = env.get(tok, &config_path);
        if matches!(name, "nobody" | "self") {
            assert_eq!(error_code(&r, 403), "PermissionDenied", "{name}");
        } else {
            assert_eq!(r.status, 200, "{name}: {}", r.body);
        }
    }

    // request: create.
    others_forbidden(REQUESTER, "create", |tok| env.create(tok, T1));
    let reqid = env.create(REQUESTER, T1).created_id();
    assert_eq!(env.status_of(REQUESTER, &reqid), 16, "Pending");
    for (tok, name) in ONE_EACH {
        let r = env.get(tok, &format!("/requests/{reqid}"));
        if matches!(name, "nobody" | "self") {
            assert_eq!(error_code(&r, 403), "PermissionDenied", "{name}");
        } else {
            assert_eq!(r.status, 200, "{name} reads the request: {}", r.body);
        }
    }

    // approve: approve and deny.
    others_forbidden(APPROVER, "approve", |tok| {
        env.set_status(tok, &reqid, "Approved")
    });
    others_forbidden(APPROVER, "deny", |tok| {
        env.set_status(tok, &reqid, "Denied")
    });
    assert_eq!(env.status_of(REQUESTER, &reqid), 16, "still Pending");
    let r = env.set_status(APPROVER, &reqid, "Approved");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 3);

    // bind.
    let card = new_card();
    others_forbidden(BINDER, "bind", |tok| env.bind(tok, &reqid, &card));
    assert_eq!(env.status_of(REQUESTER, &reqid), 3, "still Approved");
    let scid = env.bind(BINDER, &reqid, &card).created_id();
    assert_eq!(env.status_of(REQUESTER, &reqid), 18, "Executing");
    let r = env.get(ADMIN, &format!("/smartcards/{scid}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = env.get(NOBODY, &format!("/smartcards/{scid}"));
    assert_eq!(error_code(&r, 403), "PermissionDenied");

    // read_key.
    let want = want_des3(&card);
    others_forbidden(READER, "diversifiedkey", |tok| {
        let r = env.key(tok, &reqid, &scid, &card);
        assert!(!r.body.contains(&b64(&want)), "{}", r.body);
        r
    });
    assert_eq!(key_bytes(&env.key(READER, &reqid, &scid, &card)), want);

    // request: complete and cancel.
    others_forbidden(REQUESTER, "complete", |tok| {
        env.set_status(tok, &reqid, "Completed")
    });
    let r = env.set_status(REQUESTER, &reqid, "Completed");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 8);
    let second = env.create(REQUESTER, T1).created_id();
    others_forbidden(REQUESTER, "cancel", |tok| {
        env.set_status(tok, &second, "Canceled")
    });
    let r = env.set_status(REQUESTER, &second, "Canceled");
    assert_eq!(r.json()["Status"], 17, "{}", r.body);
    let third = env.create(REQUESTER, T1).created_id();
    let r = env.set_status(APPROVER, &third, "Denied");
    assert_eq!(r.json()["Status"], 4, "{}", r.body);

    // Every 403 on the key endpoint is an audit record naming the caller.
    let records = env.audit(None);
    let denied = records_where(&records, "key.release", "denied:PermissionDenied");
    let mut names: Vec<&str> = denied
        .iter()
        .map(|r| r["caller"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "admin",
            "approver",
            "authn",
            "binder",
            "nobody",
            "requester",
            "self"
        ]
    );
    for r in &denied {
        assert_eq!(r["request"], reqid.as_str());
        assert_eq!(r["kcv"], Value::Null);
    }
    let released = records_where(&records, "key.release", "released");
    assert_eq!(released.len(), 1);
    assert_eq!(released[0]["caller"], "reader");

    let export = audit_export_text(&env.token, &env.config);
    let (log, _, _) = env.stop();
    let mut secrets = Secrets::base(&ONE_EACH.map(|(t, _)| t));
    secrets.key("derived key", &want);
    secrets.check("server log", &log);
    secrets.check("audit export", &export);
}

#[test]
fn separation_of_duties_blocks_self_approval() {
    let env = Env::start(&permissions_rest());

    // T2 separates duties: its originator may not approve.
    let reqid = env.create(SELF, T2).created_id();
    assert_eq!(env.status_of(SELF, &reqid), 16);
    let r = env.set_status(SELF, &reqid, "Approved");
    assert_eq!(error_code(&r, 403), "SeparationOfDuties");
    assert_eq!(env.status_of(SELF, &reqid), 16, "still Pending");
    // Nothing to bind and no key while it waits.
    let card = new_card();
    let r = env.bind(SELF, &reqid, &card);
    assert_eq!(error_code(&r, 403), "RequestNotApproved");
    // Another approver may.
    let r = env.set_status(APPROVER, &reqid, "Approved");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 3);
    let scid = env.bind(SELF, &reqid, &card).created_id();
    assert_eq!(
        key_bytes(&env.key(SELF, &reqid, &scid, &card)),
        want_des3(&card)
    );

    // T3 does not separate duties: the same caller approves its own request.
    let other = env.create(SELF, T3).created_id();
    assert_eq!(env.status_of(SELF, &other), 16);
    let r = env.set_status(SELF, &other, "Approved");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 3);

    // The audit trail has the approval by "approver", and no approval by "self" on T2.
    let records = env.audit(None);
    let approvals: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "request.approve")
        .collect();
    assert_eq!(approvals.len(), 2, "{records:#?}");
    assert!(
        approvals
            .iter()
            .any(|r| r["request"] == reqid.as_str() && r["caller"] == "approver")
    );
    assert!(
        approvals
            .iter()
            .any(|r| r["request"] == other.as_str() && r["caller"] == "self")
    );
    let (log, _, _) = env.stop();
    Secrets::base(&ONE_EACH.map(|(t, _)| t)).check("server log", &log);
}

/// SPEC section 2: `GET /requests/{reqid}/smartcards/{scid}/authenticationresponse` answers a
/// card's admin challenge without releasing the key; the issue gates it by `authenticate`.
#[test]
fn authenticate_permission_gates_admin_challenge_responses() {
    let mut rest = template(T1, "challenge", 0, false);
    rest.push_str(&caller(
        "requester",
        &[token_line(REQUESTER)],
        &[(T1, &["request", "bind"])],
    ));
    rest.push_str(&caller(
        "reader",
        &[token_line(READER)],
        &[(T1, &["read_key"])],
    ));
    rest.push_str(&caller(
        "authn",
        &[token_line(AUTHN)],
        &[(T1, &["authenticate"])],
    ));
    rest.push_str(&caller("nobody", &[token_line(NOBODY)], &[]));
    let env = Env::start(&rest);
    let card = new_card();
    let (reqid, scid) = env.enroll(REQUESTER, None, T1, &card);
    let key = want_des3(&card);
    let challenge = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
    let path = format!(
        "/requests/{reqid}/smartcards/{scid}/authenticationresponse?cardid={card}&challenge={}&diversified=true",
        b64(&challenge)
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    );

    // With authenticate: the response to the challenge (3DES-ECB of it under the card's
    // admin key), never the key.
    let r = env.get(AUTHN, &path);
    assert_eq!(
        r.status, 200,
        "authenticationresponse with the authenticate permission: {}",
        r.body
    );
    assert!(!r.body.contains(&b64(&key)) && !r.body.contains(&hex::encode(&key)));
    let response: String = serde_json::from_str(&r.body).expect("a JSON string");
    let response = base64::engine::general_purpose::STANDARD
        .decode(response)
        .unwrap();
    let want = {
        use des::TdesEde3;
        use des::cipher::{BlockEncrypt, KeyInit};
        let c = TdesEde3::new_from_slice(&key).unwrap();
        let mut block = des::cipher::generic_array::GenericArray::clone_from_slice(&challenge);
        c.encrypt_block(&mut block);
        block.to_vec()
    };
    assert_eq!(response, want);
    // Without it (read_key is another permission): 403.
    for tok in [READER, REQUESTER, NOBODY] {
        let r = env.get(tok, &path);
        assert_eq!(error_code(&r, 403), "PermissionDenied");
    }
    let (log, _, _) = env.stop();
    let mut secrets = Secrets::base(&[REQUESTER, READER, AUTHN, NOBODY]);
    secrets.key("derived key", &key);
    secrets.check("server log", &log);
}

// =======================================================================================
// 3. The audit trail.

const AGENT: &str = "agent-bearer-8c1f0e5b2d7a4c3e9f6b1a0d5e2c7f49";
const AGENT2: &str = "agent2-bearer-93d1b7f5a3c1e9d7b5f3a1c9e7d5b3f1";
const OUTSIDER: &str = "outsider-bearer-0f9e8d7c6b5a49382716f5e4d3c2b1a0";

/// T1: no approval. T2: one approval (by "approver"). "outsider" may only request on T1.
fn audit_rest(extra: &str) -> String {
    let mut rest = String::from(extra);
    rest.push_str(&template(T1, "open", 0, false));
    rest.push_str(&template(T2, "approved", 1, false));
    rest.push_str(&caller(
        "agent",
        &[token_line(AGENT)],
        &[(T1, &ALL_PERMISSIONS), (T2, &ALL_PERMISSIONS)],
    ));
    rest.push_str(&caller(
        "agent2",
        &[token_line(AGENT2)],
        &[(T1, &ALL_PERMISSIONS)],
    ));
    rest.push_str(&caller(
        "approver",
        &[token_line(APPROVER)],
        &[(T2, &["approve"])],
    ));
    rest.push_str(&caller(
        "outsider",
        &[token_line(OUTSIDER)],
        &[(T1, &["request"])],
    ));
    rest
}

const AUDIT_TOKENS: [&str; 5] = [AGENT, AGENT2, APPROVER, OUTSIDER, UNKNOWN_TOKEN];

#[test]
fn audit_trail_records_every_release_denial_state_change_and_key_action() {
    let token = TestToken::new();
    let config = token.path().join("divkey.toml");
    std::fs::write(&config, config_text(&token, "127.0.0.1:0", &audit_rest(""))).unwrap();
    let mut secrets = Secrets::base(&AUDIT_TOKENS);
    let mut keys: Vec<Vec<u8>> = Vec::new();

    // Key-management CLI actions, before the server runs: import, generate, a refused import.
    token.import_key(&config, "admin-master", MASTER_HEX);
    let (code, out, err) = run_divkey(
        &token,
        &[
            "keys",
            "generate",
            "--config",
            p(&config),
            "--label",
            "spare",
            "--type",
            "aes128",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let spare_kcv = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kcv="))
        .unwrap_or_else(|| panic!("no kcv in {out}"))
        .to_owned();
    let component = "000102030405060708090a0b0c0d0e0f";
    secrets.add("key component", component);
    let (code, out, err) = run_divkey(
        &token,
        &[
            "keys",
            "import",
            "--config",
            p(&config),
            "--label",
            "refused",
            "--type",
            "aes128",
            "--component",
            component,
            "--component",
            SECOND_COMPONENT,
            "--kcv",
            "000000",
        ],
    );
    assert_ne!(code, 0, "{out}{err}");
    secrets.check("keys import output", &format!("{out}{err}"));

    let server = Server::start(&token, &config);
    let env = Env {
        server,
        http: plain_agent(),
        token,
        config,
    };

    // A request on T2: create, approve, bind, release (with our correlation ids).
    let r = env.create(AGENT, T2);
    let reqid = r.created_id();
    let r = env.set_status(APPROVER, &reqid, "Approved");
    assert_eq!(r.status, 200, "{}", r.body);
    let card = new_card();
    let scid = env.bind(AGENT, &reqid, &card).created_id();
    let path = Env::key_path(&reqid, &scid, &card);
    let auth = format!("Bearer {AGENT}");
    let r = env.with_headers(
        "GET",
        &path,
        &[
            ("Authorization", &auth),
            ("X-Correlation-Id", "cid-release-1"),
        ],
    );
    let key = key_bytes(&r);
    assert_eq!(key, want_des3(&card));
    keys.push(key.clone());
    secrets.key("derived key", &key);

    // Denials on the key endpoint: no read_key (403), unknown token and none (401), wrong
    // card id (403).
    let r = env.with_headers(
        "GET",
        &path,
        &[
            ("Authorization", &format!("Bearer {OUTSIDER}")),
            ("X-Correlation-Id", "cid-outsider"),
        ],
    );
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    let r = env.with_headers(
        "GET",
        &path,
        &[
            ("Authorization", &format!("Bearer {UNKNOWN_TOKEN}")),
            ("X-Correlation-Id", "cid-unknown"),
        ],
    );
    assert_eq!(error_code(&r, 401), "Unauthorized");
    let r = env.with_headers("GET", &path, &[("X-Correlation-Id", "cid-none")]);
    assert_eq!(error_code(&r, 401), "Unauthorized");
    let r = env.key(AGENT, &reqid, &scid, &new_card());
    assert_eq!(error_code(&r, 403), "CardIdMismatch");
    // Malformed key requests: 400, and audited.
    let base = format!("/requests/{reqid}/smartcards/{scid}/diversifiedkey");
    for (query, cid) in [
        ("cardid=zz", "cid-bad-1"),
        (&format!("cardid={card}&cardid={card}")[..], "cid-bad-2"),
        ("", "cid-bad-3"),
    ] {
        let r = env.with_headers(
            "GET",
            &format!("{base}?{query}"),
            &[
                ("Authorization", &format!("Bearer {AGENT}")),
                ("X-Correlation-Id", cid),
            ],
        );
        assert_eq!(error_code(&r, 400), "BadRequest", "{query}");
    }
    // Complete, then the key is refused.
    let r = env.set_status(AGENT, &reqid, "Completed");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = env.key(AGENT, &reqid, &scid, &card);
    assert_eq!(error_code(&r, 403), "RequestNotActive");

    // More state changes: cancel, deny, abandon.
    let canceled = env.create(AGENT, T1).created_id();
    assert_eq!(env.set_status(AGENT, &canceled, "Canceled").status, 200);
    let denied = env.create(AGENT, T2).created_id();
    assert_eq!(env.set_status(APPROVER, &denied, "Denied").status, 200);
    let card2 = new_card();
    let (abandoned, scid2) = env.enroll(AGENT, None, T1, &card2);
    // No rate limit by default: quick releases all succeed, each one a record.
    let key2 = want_des3(&card2);
    keys.push(key2.clone());
    secrets.key("derived key", &key2);
    for _ in 0..8 {
        assert_eq!(
            key_bytes(&env.key(AGENT2, &abandoned, &scid2, &card2)),
            key2
        );
    }
    assert_eq!(env.set_status(AGENT, &abandoned, "Abandoned").status, 200);

    let records = env.audit(None);
    // A chain: ids 1..N, each linked to the one before.
    let mut prev = "0".repeat(64);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["id"], i as u64 + 1, "{r}");
        assert_eq!(r["prev_hash"], prev.as_str(), "{r}");
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
        prev = r["hash"].as_str().unwrap().to_owned();
    }
    let count = |action: &str, outcome: &str| records_where(&records, action, outcome).len();

    // Key-management commands.
    let imports = records_where(&records, "master_key.import", "done");
    assert_eq!(imports.len(), 1, "{records:#?}");
    assert_eq!(imports[0]["id"], 1);
    assert_eq!(imports[0]["master_key_label"], "admin-master");
    assert_eq!(imports[0]["master_key_version"], 1);
    assert_eq!(imports[0]["algorithm"], "aes256");
    assert_eq!(imports[0]["kcv"], soft_kcv(&master(), false));
    assert!(imports[0]["caller"].as_str().unwrap().starts_with("cli:"));
    let generated = records_where(&records, "master_key.generate", "done");
    assert_eq!(generated.len(), 1, "{records:#?}");
    assert_eq!(generated[0]["master_key_label"], "spare");
    assert_eq!(generated[0]["kcv"], spare_kcv.as_str());
    assert_eq!(generated[0]["master_key_version"], 1);
    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["action"] == "master_key.import"
                && r["outcome"].as_str().unwrap().starts_with("refused")
        })
        .collect();
    assert_eq!(refused.len(), 1, "{records:#?}");
    assert_eq!(refused[0]["master_key_label"], "refused");

    // The release of T2's key.
    let released = records_where(&records, "key.release", "released");
    assert_eq!(released.len(), 1 + 8, "{records:#?}");
    let first = released[0];
    assert_eq!(first["caller"], "agent");
    assert_eq!(first["source"], "127.0.0.1");
    assert_eq!(first["correlation_id"], "cid-release-1");
    assert_eq!(first["request"], reqid.as_str());
    assert_eq!(first["smartcard"], scid.as_str());
    assert_eq!(first["card_id"], card.as_str());
    assert_eq!(first["template"], T2);
    assert_eq!(first["algorithm"], "sp800-108-cmac");
    assert_eq!(first["master_key_label"], "admin-master");
    assert_eq!(first["master_key_version"], 1);
    assert_eq!(first["kcv"], soft_kcv(&key, true));
    for r in &released[1..] {
        assert_eq!(r["caller"], "agent2");
        assert_eq!(r["kcv"], soft_kcv(&key2, true));
        assert_eq!(r["request"], abandoned.as_str());
    }
    // Denials.
    let d = records_where(&records, "key.release", "denied:PermissionDenied");
    assert_eq!(d.len(), 1, "{records:#?}");
    assert_eq!(d[0]["caller"], "outsider");
    assert_eq!(d[0]["correlation_id"], "cid-outsider");
    // (The template of a request whose caller lacks read_key is not recorded: `template` is
    // null here, as `decide_release` sets it only after the permission check.)
    let d = records_where(&records, "key.release", "denied:Unauthorized");
    assert_eq!(d.len(), 2, "{records:#?}");
    assert_eq!(sorted_cids(&d), ["cid-none", "cid-unknown"]);
    for r in &d {
        assert_eq!(r["caller"], Value::Null);
        assert_eq!(r["request"], reqid.as_str());
        assert_eq!(r["smartcard"], scid.as_str());
        assert_eq!(r["kcv"], Value::Null);
    }
    assert_eq!(count("key.release", "denied:CardIdMismatch"), 1);
    assert_eq!(count("key.release", "denied:RequestNotActive"), 1);
    let bad = records_where(&records, "key.release", "bad_request");
    assert_eq!(
        sorted_cids(&bad),
        ["cid-bad-1", "cid-bad-2", "cid-bad-3"],
        "{records:#?}"
    );
    for r in &bad {
        assert_eq!(r["caller"], "agent");
        assert_eq!(r["request"], reqid.as_str());
        assert_eq!(r["smartcard"], scid.as_str());
        assert_eq!(r["kcv"], Value::Null);
    }
    // Request state changes: one record each.
    let of = |action: &str, req: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["action"] == action && r["request"] == req)
            .collect()
    };
    for (action, req, outcome, caller) in [
        ("request.create", &reqid, "Pending", "agent"),
        ("request.approve", &reqid, "Approved", "approver"),
        ("card.bind", &reqid, "Executing", "agent"),
        ("request.complete", &reqid, "Completed", "agent"),
        ("request.create", &canceled, "Approved", "agent"),
        ("request.cancel", &canceled, "Canceled", "agent"),
        ("request.create", &denied, "Pending", "agent"),
        ("request.deny", &denied, "Denied", "approver"),
        ("request.create", &abandoned, "Approved", "agent"),
        ("card.bind", &abandoned, "Executing", "agent"),
        ("request.abandon", &abandoned, "Failed", "agent"),
    ] {
        let found = of(action, req);
        assert_eq!(found.len(), 1, "{action} {req}: {records:#?}");
        assert_eq!(found[0]["outcome"], outcome, "{action}");
        assert_eq!(found[0]["caller"], caller, "{action}");
        assert!(found[0]["correlation_id"].is_string(), "{action}");
    }
    let bind = of("card.bind", &reqid)[0];
    assert_eq!(bind["card_id"], card.as_str());
    assert_eq!(bind["smartcard"], scid.as_str());
    assert_eq!(bind["template"], T2);
    // 3 CLI; on T2: create, approve, bind, 1 release, 4 denials, 3 malformed, complete,
    // 1 more denial; cancel and deny: 2 each; abandoned: create, bind, 8 releases, abandon.
    let total = 3 + 13 + 4 + 11;
    assert_eq!(records.len(), total, "{records:#?}");

    // --since: from a record's time on, at millisecond and second precision; a date.
    let later = &records[records.len() / 2];
    let t = later["time"].as_str().unwrap().to_owned();
    let want: Vec<&Value> = records
        .iter()
        .filter(|r| r["time"].as_str().unwrap() >= t.as_str())
        .collect();
    let got = env.audit(Some(&t));
    assert_eq!(got.iter().collect::<Vec<_>>(), want);
    assert!(got.len() < records.len() && got.contains(later));
    let second = format!("{}Z", &t[..19]);
    let got = env.audit(Some(&second));
    assert!(got.contains(later) && got.len() >= want.len(), "{second}");
    let from = format!("{}.000Z", &t[..19]);
    let want: Vec<&Value> = records
        .iter()
        .filter(|r| r["time"].as_str().unwrap() >= from.as_str())
        .collect();
    assert_eq!(got.iter().collect::<Vec<_>>(), want, "{second}");
    assert_eq!(env.audit(Some("2000-01-01")).len(), records.len());
    assert!(env.audit(Some("2999-01-01")).is_empty());
    let (code, out, err) = run_divkey(
        &env.token,
        &[
            "audit",
            "export",
            "--config",
            p(&env.config),
            "--since",
            "yesterday",
        ],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert_one_error_line("--since yesterday", &err, &["--since"]);

    // Verify: intact.
    let (code, out, err) = audit_verify(&env.token, &env.config, &env.db());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!("ok: {total} audit record(s)")),
        "{out}"
    );
    assert!(out.contains(&prev), "the head is the last hash: {out}");

    // No key material anywhere: export, database files, log.
    let export = audit_export_text(&env.token, &env.config);
    let db = env.db();
    let (log, _token, _) = env.stop();
    secrets.check("audit export", &export);
    secrets.check("server log", &log);
    let bytes = db_bytes(&db);
    secrets.check_bytes("database", &bytes);
    Secrets::check_raw_keys("database", &bytes, &keys);
}

/// Releases keys and makes other records; returns the stopped env's token, config and the
/// number of records.
fn audit_history() -> (TestToken, PathBuf, Vec<Value>, Secrets) {
    let env = Env::start(&audit_rest(""));
    let mut secrets = Secrets::base(&AUDIT_TOKENS);
    for _ in 0..3 {
        let card = new_card();
        let (reqid, scid) = env.enroll(AGENT, None, T1, &card);
        let key = key_bytes(&env.key(AGENT, &reqid, &scid, &card));
        assert_eq!(key, want_des3(&card));
        secrets.key("derived key", &key);
        assert_eq!(env.key(OUTSIDER, &reqid, &scid, &card).status, 403);
        assert_eq!(env.key(AGENT2, &reqid, &scid, &card).status, 200);
    }
    let records = env.audit(None);
    let (log, token, config) = env.stop();
    secrets.check("server log", &log);
    (token, config, records, secrets)
}

/// A copy of the database at `src`, written to `dst` (VACUUM INTO: WAL content included).
fn copy_db(src: &Path, dst: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", dst.display()));
    }
    sqlite(src)
        .execute_batch(&format!("VACUUM INTO '{}'", dst.display()))
        .unwrap();
}

/// Recomputes the hash of record `id` from its (altered) content, as a tamperer would.
fn rehash(conn: &rusqlite::Connection, id: i64) {
    let (prev, time, event) = conn
        .query_row(
            "SELECT prev_hash, time, caller, source, correlation_id, action, request_uuid, \
             smartcard_uuid, card_id, template_uuid, algorithm, master_key_label, \
             master_key_version, kcv, outcome FROM audit WHERE id = ?1",
            [id],
            |r| {
                let uuid = |i: usize| -> rusqlite::Result<Option<uuid::Uuid>> {
                    Ok(r.get::<_, Option<String>>(i)?
                        .map(|s| uuid::Uuid::parse_str(&s).unwrap()))
                };
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    divkey::audit::AuditEvent {
                        caller: r.get(2)?,
                        source: r.get(3)?,
                        correlation_id: r.get(4)?,
                        action: r.get(5)?,
                        request: uuid(6)?,
                        smartcard: uuid(7)?,
                        card_id: r.get(8)?,
                        template: uuid(9)?,
                        algorithm: r.get(10)?,
                        master_key_label: r.get(11)?,
                        master_key_version: r.get(12)?,
                        kcv: r.get(13)?,
                        outcome: r.get(14)?,
                    },
                ))
            },
        )
        .unwrap();
    let hash = divkey::audit::chain_hash(&prev, id, &time, &event);
    conn.execute(
        "UPDATE audit SET hash = ?2 WHERE id = ?1",
        rusqlite::params![id, hash],
    )
    .unwrap();
}

#[test]
fn audit_verify_names_the_first_bad_record() {
    let (token, config, records, secrets) = audit_history();
    let n = records.len() as i64;
    let pristine = token.path().join("divkey.db");

    // Untouched: exit 0.
    let (code, out, err) = audit_verify(&token, &config, &pristine);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!("ok: {n} audit record(s)")),
        "{out}"
    );
    let head = records.last().unwrap()["hash"].as_str().unwrap().to_owned();
    assert!(out.contains(&head), "{out}");
    secrets.check("audit verify", &format!("{out}{err}"));

    // A released key's record in the middle, with at least two records after it.
    let k = records
        .iter()
        .filter(|r| r["action"] == "key.release" && r["outcome"] == "released")
        .map(|r| r["id"].as_i64().unwrap())
        .find(|&id| id > 2 && id + 2 <= n)
        .expect("a key release in the middle");

    // The triggers refuse updates and deletes made through SQL.
    let case = token.path().join("case.db");
    copy_db(&pristine, &case);
    {
        let conn = sqlite(&case);
        let e = conn
            .execute("UPDATE audit SET outcome = 'x' WHERE id = ?1", [k])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        let e = conn
            .execute("DELETE FROM audit WHERE id = ?1", [k])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
    }
    let (code, out, err) = audit_verify(&token, &config, &case);
    assert_eq!(code, 0, "{out}{err}");

    // Tampering, each on a fresh copy with the triggers dropped: (what, SQL, rehash this
    // record afterwards, first bad record, reason).
    let cases: Vec<(&str, String, Option<i64>, i64, &str)> = vec![
        (
            "outcome altered",
            format!("UPDATE audit SET outcome = 'denied:PermissionDenied' WHERE id = {k}"),
            None,
            k,
            "content does not match its hash",
        ),
        (
            "kcv altered",
            format!("UPDATE audit SET kcv = '000000' WHERE id = {k}"),
            None,
            k,
            "content does not match its hash",
        ),
        (
            "caller altered",
            format!("UPDATE audit SET caller = 'agent2' WHERE id = {k}"),
            None,
            k,
            "content does not match its hash",
        ),
        (
            "time altered",
            format!("UPDATE audit SET time = '2001-01-01T00:00:00.000Z' WHERE id = {k}"),
            None,
            k,
            "content does not match its hash",
        ),
        (
            "kcv erased (NULL)",
            format!("UPDATE audit SET kcv = NULL WHERE id = {k}"),
            None,
            k,
            "content does not match its hash",
        ),
        (
            "altered and rehashed",
            format!("UPDATE audit SET caller = 'somebody else' WHERE id = {k}"),
            Some(k),
            k + 1,
            "does not link",
        ),
        (
            "hash replaced",
            format!(
                "UPDATE audit SET hash = '{}' WHERE id = {k}",
                "ab".repeat(32)
            ),
            None,
            k,
            "content does not match its hash",
        ),
        (
            "deleted in the middle",
            format!("DELETE FROM audit WHERE id = {k}"),
            None,
            k + 1,
            "missing or out of order",
        ),
        (
            "first deleted",
            "DELETE FROM audit WHERE id = 1".to_owned(),
            None,
            2,
            "missing or out of order",
        ),
        (
            "two swapped",
            format!(
                "UPDATE audit SET id = -1 WHERE id = {k}; \
                 UPDATE audit SET id = {k} WHERE id = {k1}; \
                 UPDATE audit SET id = {k1} WHERE id = -1;",
                k1 = k + 1
            ),
            None,
            k,
            "does not link",
        ),
        (
            "first and last swapped",
            format!(
                "UPDATE audit SET id = -1 WHERE id = 1; \
                 UPDATE audit SET id = 1 WHERE id = {n}; \
                 UPDATE audit SET id = {n} WHERE id = -1;"
            ),
            None,
            1,
            "does not link",
        ),
        (
            "moved to the end",
            format!("UPDATE audit SET id = {} WHERE id = {k}", n + 1),
            None,
            k + 1,
            "missing or out of order",
        ),
        (
            "forged record appended",
            format!(
                "INSERT INTO audit (id, time, action, outcome, prev_hash, hash) \
                 VALUES ({}, '2999-01-01T00:00:00.000Z', 'key.release', 'released', '{head}', '{}')",
                n + 1,
                "cd".repeat(32)
            ),
            None,
            n + 1,
            "content does not match its hash",
        ),
    ];
    for (what, sql, rehash_id, bad, reason) in cases {
        copy_db(&pristine, &case);
        {
            let conn = sqlite(&case);
            conn.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
                .unwrap();
            conn.execute_batch(&sql)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            if let Some(id) = rehash_id {
                rehash(&conn, id);
            }
        }
        let (code, out, err) = audit_verify(&token, &config, &case);
        assert_eq!(code, 1, "{what}: exit {code}\n{out}{err}");
        assert!(!out.contains("ok"), "{what}: {out}");
        let prefix = format!("divkey: error: audit record {bad}: ");
        assert_one_error_line(what, &err, &[prefix.as_str(), reason]);
    }

    // Deleting the newest record leaves a valid, shorter chain: only the head printed
    // before (to be anchored elsewhere) shows it.
    copy_db(&pristine, &case);
    {
        let conn = sqlite(&case);
        conn.execute_batch("DROP TRIGGER audit_no_delete;").unwrap();
        conn.execute("DELETE FROM audit WHERE id = ?1", [n])
            .unwrap();
    }
    let (code, out, err) = audit_verify(&token, &config, &case);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!("ok: {} audit record(s)", n - 1)),
        "{out}"
    );
    assert!(!out.contains(&head), "{out}");

    // The pristine database still verifies.
    let (code, out, err) = audit_verify(&token, &config, &pristine);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn key_is_withheld_when_its_audit_record_cannot_be_written() {
    let env = Env::start(&audit_rest(""));
    let card = new_card();
    let (reqid, scid) = env.enroll(AGENT, None, T1, &card);
    let key = want_des3(&card);
    assert_eq!(key_bytes(&env.key(AGENT, &reqid, &scid, &card)), key);
    let conn = sqlite(&env.db());
    let audit_rows = |conn: &rusqlite::Connection| -> i64 {
        conn.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
            .unwrap()
    };
    let request_rows = |conn: &rusqlite::Connection| -> i64 {
        conn.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
            .unwrap()
    };
    let before = audit_rows(&conn);

    // The audit table refuses inserts (while the server runs).
    conn.execute_batch(
        "CREATE TRIGGER audit_broken BEFORE INSERT ON audit \
         BEGIN SELECT RAISE(ABORT, 'audit disk full (test)'); END;",
    )
    .unwrap();
    let forms = [
        hex::encode(&key),
        hex::encode_upper(&key),
        b64(&key),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(&key),
    ];
    for _ in 0..3 {
        let r = env.key(AGENT, &reqid, &scid, &card);
        assert_eq!(error_code(&r, 500), "InternalError");
        for f in &forms {
            assert!(
                !r.body.contains(f.as_str()),
                "key in the 500 body: {}",
                r.body
            );
        }
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
        );
    }
    // A request cannot be created without its record either.
    let requests = request_rows(&conn);
    let r = env.create(AGENT, T1);
    assert_eq!(error_code(&r, 500), "InternalError");
    assert_eq!(request_rows(&conn), requests, "the request was not stored");
    assert_eq!(audit_rows(&conn), before, "nothing was recorded");

    // Repaired: keys are released again, and the chain has no gap.
    conn.execute_batch("DROP TRIGGER audit_broken;").unwrap();
    assert_eq!(key_bytes(&env.key(AGENT, &reqid, &scid, &card)), key);
    assert_eq!(audit_rows(&conn), before + 1);
    drop(conn);
    let records = env.audit(None);
    let released = records_where(&records, "key.release", "released");
    assert_eq!(
        released.len(),
        2,
        "only the two released keys: {records:#?}"
    );
    let (code, out, err) = audit_verify(&env.token, &env.config, &env.db());
    assert_eq!(code, 0, "{out}{err}");

    let (log, _, _) = env.stop();
    assert!(log.contains("key withheld"), "{log}");
    let mut secrets = Secrets::base(&AUDIT_TOKENS);
    secrets.key("derived key", &key);
    secrets.check("server log", &log);
}

/// Key-management commands are audited like key releases: no record, no action.
#[test]
fn key_management_is_not_done_without_its_audit_record() {
    let token = TestToken::new();
    let config = token.path().join("divkey.toml");
    std::fs::write(&config, config_text(&token, "127.0.0.1:0", &audit_rest(""))).unwrap();
    token.import_key(&config, "admin-master", MASTER_HEX);
    let db = token.path().join("divkey.db");
    sqlite(&db)
        .execute_batch(
            "CREATE TRIGGER audit_broken BEFORE INSERT ON audit \
             BEGIN SELECT RAISE(ABORT, 'audit disk full (test)'); END;",
        )
        .unwrap();
    let component = "0f0e0d0c0b0a09080706050403020100";

    let (code, out, err) = run_divkey(
        &token,
        &[
            "keys",
            "generate",
            "--config",
            p(&config),
            "--label",
            "unrecorded-gen",
            "--type",
            "aes128",
        ],
    );
    assert_ne!(code, 0, "keys generate without audit succeeded: {out}{err}");
    assert_one_error_line("keys generate", &err, &["audit"]);
    let (code, out, err) = run_divkey(
        &token,
        &[
            "keys",
            "import",
            "--config",
            p(&config),
            "--label",
            "unrecorded-imp",
            "--type",
            "aes128",
            "--component",
            component,
            "--component",
            SECOND_COMPONENT,
        ],
    );
    assert_ne!(code, 0, "keys import without audit succeeded: {out}{err}");
    assert_one_error_line("keys import", &err, &["audit"]);
    assert!(!format!("{out}{err}").contains(component));

    let conn = sqlite(&db);
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "only the first import is recorded");
    drop(conn);
    let (code, out, err) = run_divkey(&token, &["keys", "list", "--config", p(&config)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("admin-master"), "{out}");
    for label in ["unrecorded-gen", "unrecorded-imp"] {
        assert!(
            !out.contains(label),
            "{label} was created in the HSM although its audit record could not be written:\n{out}"
        );
    }
}

// =======================================================================================
// 4. Rate limit.

#[test]
fn key_release_rate_limit_gives_429_with_retry_after() {
    let env = Env::start(&audit_rest("[rate_limit]\nper_second = 0.5\nburst = 2\n"));
    let card = new_card();
    let (reqid, scid) = env.enroll(AGENT, None, T1, &card);
    let key = want_des3(&card);

    for _ in 0..2 {
        assert_eq!(key_bytes(&env.key(AGENT, &reqid, &scid, &card)), key);
    }
    let mut wait = 0;
    for _ in 0..2 {
        let r = env.key(AGENT, &reqid, &scid, &card);
        assert_eq!(error_code(&r, 429), "RateLimited");
        assert!(!r.body.contains(&b64(&key)), "{}", r.body);
        let retry: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
        wait = retry;
    }
    // Per caller: another caller is not limited.
    assert_eq!(key_bytes(&env.key(AGENT2, &reqid, &scid, &card)), key);
    // After the wait, one more release.
    std::thread::sleep(Duration::from_millis(wait * 1000 + 300));
    assert_eq!(key_bytes(&env.key(AGENT, &reqid, &scid, &card)), key);
    assert_eq!(env.key(AGENT, &reqid, &scid, &card).status, 429);

    let records = env.audit(None);
    let limited = records_where(&records, "key.release", "denied:RateLimited");
    assert_eq!(limited.len(), 3, "{records:#?}");
    for r in &limited {
        assert_eq!(r["caller"], "agent");
        assert_eq!(r["request"], reqid.as_str());
        assert_eq!(r["smartcard"], scid.as_str());
        assert_eq!(r["card_id"], card.as_str());
        assert_eq!(r["kcv"], Value::Null);
    }
    assert_eq!(records_where(&records, "key.release", "released").len(), 4);

    let (log, _, _) = env.stop();
    let mut secrets = Secrets::base(&AUDIT_TOKENS);
    secrets.key("derived key", &key);
    secrets.check("server log", &log);
}

// =======================================================================================
// 5. Secrets hygiene in the configuration.

#[test]
fn debug_of_the_config_masks_token_hashes() {
    let token = TestToken::new();
    let config = token.path().join("divkey.toml");
    std::fs::write(&config, config_text(&token, "127.0.0.1:0", &audit_rest(""))).unwrap();
    let loaded = divkey::config::Config::load(&config).unwrap();
    let shown = format!("{loaded:?}");
    assert!(shown.contains("agent"), "{shown}");
    for t in AUDIT_TOKENS {
        assert!(!shown.contains(&sha256_hex(t)), "a token hash in {shown}");
        assert!(!shown.contains(t), "a token in {shown}");
    }
    assert!(!shown.contains(USER_PIN), "{shown}");
    assert!(shown.contains("***"), "{shown}");
}

//! The hardening fixes, each proved with real values against a real `divkey` process on a
//! throw-away SoftHSM2 token: the master key KCV pinned per card (a replaced key under the same
//! label is refused at start and on release), card lifecycle rules, config bounds and duplicate
//! credentials, request bodies read only after authentication within a size and a time limit,
//! one Authorization header only, and the health endpoints.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

/// K1: the AES-256 key of NIST SP 800-38B, the master key cards are issued under.
const K1_HEX: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
/// K2: another AES-256 key, put on a token under the same label in place of K1.
const K2_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const MASTER_LABEL: &str = "admin-master";
const DES3_DEFAULT: &str = "0102030405060708a1a2a3a4a5a6a7a8b1b2b3b4b5b6b7b8";

/// sp800-108-cmac, des3, windows card ID bytes, no approval.
const T_OPEN: &str = "5b2e0c1d-7a3f-4e6b-9d8c-1f2a3b4c5d01";

/// request, approve, bind and read_key on T_OPEN.
const AGENT: &str = "agent-bearer-hardening-6f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// Presented but configured for nobody.
const WRONG: &str = "wrong-bearer-hardening-0a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn rest() -> String {
    format!(
        r#"
[[profile_template]]
uuid = "{T_OPEN}"
name = "Open enrollment"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "des3"
card_id_bytes = "windows"
master_key = "{MASTER_LABEL}"
approvals_required = 0
default_admin_key_hex = "{DES3_DEFAULT}"

[[caller]]
name = "agent"
token_sha256 = "{agent}"
permissions = {{ "{T_OPEN}" = ["request", "approve", "bind", "read_key"] }}
"#,
        agent = sha256_hex(AGENT),
    )
}

fn kcv_of(master_hex: &str) -> String {
    soft_kcv(&hex::decode(master_hex).unwrap(), false)
}

/// Writes the standard config (templates and callers of [`rest`]) for `token`.
fn write_config(token: &TestToken) -> PathBuf {
    let config = token.path().join("divkey.toml");
    std::fs::write(&config, config_text(token, "127.0.0.1:0", &rest())).unwrap();
    config
}

/// An error body with the three fields; returns the ErrorCode.
fn error_body_code(status: u16, want: u16, body: &str) -> String {
    assert_eq!(status, want, "{body}");
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {body}"));
    assert_eq!(obj.len(), 3, "{body}");
    assert!(
        v["Message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        v["CorrelationId"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    v["ErrorCode"]
        .as_str()
        .unwrap_or_else(|| panic!("no ErrorCode: {body}"))
        .to_owned()
}

/// `divkey check` refuses: exit code 1, nothing on stdout that says ok, one error line.
fn assert_check_refuses(token: &TestToken, config: &Path, needles: &[&str]) {
    let (code, out, err) = run_divkey(token, &["check", "--config", p(config)]);
    let what = format!("check {}", config.display());
    assert_eq!(code, 1, "{what}: exit code {code}:\n{out}{err}");
    assert!(!out.contains("ok"), "{what} printed ok:\n{out}");
    assert_one_error_line(&what, &err, needles);
}

/// Copies the SQLite database `src` (with its -wal and -shm files, when present) to `dst`,
/// replacing whatever was there.
fn copy_db_files(src: &Path, dst: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", src.display()));
        let to = PathBuf::from(format!("{}{suffix}", dst.display()));
        let _ = std::fs::remove_file(&to);
        if from.exists() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// A server on its own token, and HTTP helpers.

/// Fields drop in order: the server before the token.
struct Env {
    server: Server,
    http: ureq::Agent,
    token: TestToken,
}

impl Env {
    /// A fresh token with K1 under "admin-master", serving [`rest`].
    fn start() -> Self {
        let token = TestToken::new();
        let config = write_config(&token);
        token.import_key(&config, MASTER_LABEL, K1_HEX);
        Self::serve(token)
    }

    /// Serves `token` with its config (written by [`write_config`]).
    fn serve(token: TestToken) -> Self {
        let config = token.path().join("divkey.toml");
        let server = Server::start(&token, &config);
        Self {
            server,
            http: agent(),
            token,
        }
    }

    /// Stops the server; returns its log and the token.
    fn stop(self) -> (String, TestToken) {
        let Self { server, token, .. } = self;
        (server.stop(), token)
    }

    fn db(&self) -> PathBuf {
        self.token.path().join("divkey.db")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    fn host_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    fn get(&self, path: &str) -> Resp {
        call(&self.http, "GET", &self.url(path), Some(AGENT), None)
    }

    fn post(&self, path: &str, body: Value) -> Resp {
        call(&self.http, "POST", &self.url(path), Some(AGENT), Some(body))
    }

    fn create(&self, request_type: &str, smartcard: Option<&str>) -> Resp {
        let body = match smartcard {
            Some(sc) => json!({"type": request_type, "smartcard": sc}),
            None => json!({"type": request_type, "profiletemplateuuid": T_OPEN}),
        };
        self.post("/requests", body)
    }

    fn set_status(&self, reqid: &str, status: &str) -> Resp {
        call(
            &self.http,
            "PUT",
            &self.url(&format!("/requests/{reqid}")),
            Some(AGENT),
            Some(json!({ "status": status })),
        )
    }

    fn finish(&self, reqid: &str, status: &str, want: i64) {
        let r = self.set_status(reqid, status);
        assert_eq!(r.status, 200, "{status} {reqid}: {}", r.body);
        assert_eq!(r.json()["Status"], want, "{}", r.body);
    }

    fn bind(&self, reqid: &str, card: &str) -> Resp {
        self.post("/smartcards", json!({"requestid": reqid, "cardid": card}))
    }

    /// An Enroll request with `card` bound: (request id, smart card id).
    fn enroll(&self, card: &str) -> (String, String) {
        let reqid = self.create("Enroll", None).created_id();
        let scid = self.bind(&reqid, card).created_id();
        (reqid, scid)
    }

    fn card_status(&self, scid: &str) -> i64 {
        let r = self.get(&format!("/smartcards/{scid}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["Status"].as_i64().unwrap()
    }

    fn request_status(&self, reqid: &str) -> i64 {
        let r = self.get(&format!("/requests/{reqid}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["Status"].as_i64().unwrap()
    }

    fn key(&self, reqid: &str, scid: &str, card: &str) -> Resp {
        self.get(&format!(
            "/requests/{reqid}/smartcards/{scid}/diversifiedkey?cardid={card}"
        ))
    }

    fn key_for(&self, reqid: &str, scid: &str, card: &str) -> Vec<u8> {
        key_bytes(&self.key(reqid, scid, card))
    }
}

/// A response read off a raw socket.
struct RawResp {
    status: u16,
    head: String,
    body: String,
    /// From the moment the request was written to the end of the response.
    elapsed: Duration,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn error_code(&self, status: u16) -> String {
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{}\n\n{}",
            self.head,
            self.body
        );
        error_body_code(self.status, status, &self.body)
    }
}

/// Writes `head` (request line and headers, without the blank line) and then `body_part`
/// on a fresh connection, keeps the connection open, and reads one response, waiting at
/// most `timeout` for it.
fn raw_exchange(addr: &str, head: &str, body_part: &[u8], timeout: Duration) -> RawResp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut out = format!("{head}\r\n\r\n").into_bytes();
    out.extend_from_slice(body_part);
    s.write_all(&out).unwrap();
    s.flush().unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n");
    loop {
        if let Some(end) = head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let length = head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())
                    .flatten()
            });
            if length.is_some_and(|n| buf.len() >= end + 4 + n) {
                break;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "no complete response within {timeout:?} (got {:?})",
                    String::from_utf8_lossy(&buf)
                );
            }
            Err(e) if !buf.is_empty() => {
                eprintln!("read after a partial response: {e}");
                break;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    let elapsed = start.elapsed();
    let end = head_end(&buf)
        .unwrap_or_else(|| panic!("no response head (got {:?})", String::from_utf8_lossy(&buf)));
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let body = String::from_utf8_lossy(&buf[end + 4..]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    RawResp {
        status,
        head,
        body,
        elapsed,
    }
}

const API: &str = "/CertificateManagement/api/v1.0";

// ---------------------------------------------------------------------------------------
// 1. The master key KCV is pinned per card.

/// Cards issued under K1 ("admin-master" on token A) are refused by `check` and `serve` on a
/// token (same token label) where "admin-master" is another key K2; with K1 imported there
/// instead, the server starts and releases the very same key.
#[test]
fn master_key_replaced_under_the_same_label_is_refused() {
    // Issue a card on token A under K1.
    let env = Env::start();
    let card = new_card();
    let (enroll, scid) = env.enroll(&card);
    let key = env.key_for(&enroll, &scid, &card);
    assert_eq!(key, soft_admin_des3(K1_HEX, &card));
    env.finish(&enroll, "Completed", 8);
    assert_eq!(env.card_status(&scid), 3);
    let (_, token_a) = env.stop();
    let db_a = token_a.path().join("divkey.db");
    // Token A itself still passes the check.
    assert_check_ok(&token_a, &token_a.path().join("divkey.toml"));

    // Token B: the same token label, K2 under "admin-master", token A's database.
    let token_b = TestToken::new();
    assert_eq!(token_b.label, token_a.label);
    let config_b = write_config(&token_b);
    token_b.import_key(&config_b, MASTER_LABEL, K2_HEX);
    let (k1, k2) = (kcv_of(K1_HEX), kcv_of(K2_HEX));
    assert_ne!(k1, k2);
    copy_db_files(&db_a, &token_b.path().join("divkey.db"));
    let needles = [MASTER_LABEL, "KCV", k1.as_str(), k2.as_str()];
    assert_check_refuses(&token_b, &config_b, &needles);
    // serve: exits 1 without listening, its last line the one error line naming both KCVs.
    let serve_log = match Server::try_start(&token_b, &config_b) {
        Ok(server) => panic!("serve with K2 started:\n{}", server.stop()),
        Err(log) => log,
    };
    assert!(
        !serve_log.starts_with("timeout"),
        "serve hung:\n{serve_log}"
    );
    assert!(!serve_log.contains("panicked"), "{serve_log}");
    let errors: Vec<&str> = serve_log
        .lines()
        .filter(|l| l.starts_with("divkey: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{serve_log}");
    for n in needles {
        assert!(errors[0].contains(n), "{n:?} not named in: {}", errors[0]);
    }
    assert_eq!(serve_log.lines().last(), Some(errors[0]), "{serve_log}");
    assert!(!serve_log.contains("listening on"), "{serve_log}");
    let (code, _, err) = run_divkey(&token_b, &["serve", "--config", p(&config_b)]);
    assert_eq!(code, 1, "serve exit code:\n{err}");

    // Token C: the same label, K1 imported (same bytes), token A's database: starts, and an
    // Unblock request on the issued card gets the identical key.
    let token_c = TestToken::new();
    let config_c = write_config(&token_c);
    token_c.import_key(&config_c, MASTER_LABEL, K1_HEX);
    copy_db_files(&db_a, &token_c.path().join("divkey.db"));
    let out = assert_check_ok(&token_c, &config_c);
    assert!(out.contains(&k1), "check does not show KCV {k1}:\n{out}");
    let env = Env::serve(token_c);
    assert_eq!(env.card_status(&scid), 3);
    let unblock = env.create("Unblock", Some(&scid)).created_id();
    assert_eq!(env.key_for(&unblock, &scid, &card), key);
    drop(env);
    drop(token_a);

    // Like every other startup refusal, serve says nothing but its one error line. It logs
    // "master key ready" with the replaced key's KCV before it refuses that key.
    assert_one_error_line("serve with K2 under the label", &serve_log, &needles);
}

/// On release, a card whose pinned KCV is not the loaded master key's gets no key (the pin is
/// changed under the running server, as a replaced key would look).
#[test]
fn pinned_kcv_mismatch_is_refused_on_release() {
    let env = Env::start();
    let card = new_card();
    let (enroll, scid) = env.enroll(&card);
    assert_eq!(
        env.key_for(&enroll, &scid, &card),
        soft_admin_des3(K1_HEX, &card)
    );
    let conn = rusqlite::Connection::open(env.db()).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let pinned: String = conn
        .query_row(
            "SELECT master_key_kcv FROM smartcards WHERE uuid = ?1",
            [&scid],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(pinned, kcv_of(K1_HEX), "the card pins K1's KCV");
    let n = conn
        .execute(
            "UPDATE smartcards SET master_key_kcv = ?2 WHERE uuid = ?1",
            [scid.as_str(), kcv_of(K2_HEX).as_str()],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(conn);
    let r = env.key(&enroll, &scid, &card);
    assert_eq!(error_code(&r, 500), "InternalError");
    let b64 = base64::engine::general_purpose::STANDARD.encode(soft_admin_des3(K1_HEX, &card));
    assert!(!r.body.contains(&b64));
}

// ---------------------------------------------------------------------------------------
// 2. Card lifecycle.

/// Retire: the card is Retired (6), its key refused, no Unblock/Reinstate/Retire on it; an
/// Enroll that binds it and is canceled leaves it Retired; a completed new Enroll that binds
/// it again gets the same key and makes it Active.
#[test]
fn retired_card_lifecycle() {
    let env = Env::start();
    let card = new_card();
    let (enroll, scid) = env.enroll(&card);
    let key = env.key_for(&enroll, &scid, &card);
    assert_eq!(key, soft_admin_des3(K1_HEX, &card));
    env.finish(&enroll, "Completed", 8);
    assert_eq!(env.card_status(&scid), 3);

    let retire = env.create("Retire", Some(&scid)).created_id();
    assert_eq!(env.key_for(&retire, &scid, &card), key);
    env.finish(&retire, "Completed", 8);
    assert_eq!(env.card_status(&scid), 6, "Retired");
    for reqid in [&retire, &enroll] {
        let r = env.key(reqid, &scid, &card);
        assert_eq!(error_code(&r, 403), "RequestNotActive");
    }
    for kind in ["Unblock", "Reinstate", "Retire", "Revoke"] {
        let r = env.create(kind, Some(&scid));
        assert_eq!(error_code(&r, 409), "Conflict", "{kind} on a retired card");
    }
    assert_eq!(env.card_status(&scid), 6);

    // An Enroll binding the retired card, canceled: Retired again.
    let (again, scid2) = env.enroll(&card);
    assert_eq!(scid2, scid, "the same card record");
    assert_eq!(env.card_status(&scid), 2, "Assigned");
    env.finish(&again, "Canceled", 17);
    assert_eq!(env.card_status(&scid), 6, "back to Retired");
    let r = env.create("Unblock", Some(&scid));
    assert_eq!(error_code(&r, 409), "Conflict");

    // A new Enroll binding it: the same key (pinned), Active when completed.
    let (renew, scid3) = env.enroll(&card);
    assert_eq!(scid3, scid);
    assert_eq!(env.card_status(&scid), 2);
    assert_eq!(env.key_for(&renew, &scid, &card), key);
    env.finish(&renew, "Completed", 8);
    assert_eq!(env.card_status(&scid), 3);
    let unblock = env.create("Unblock", Some(&scid)).created_id();
    assert_eq!(env.key_for(&unblock, &scid, &card), key);
}

/// Revoke makes the card Disabled (5); only Reinstate acts on it, and completing the
/// Reinstate makes it Active (3) again.
#[test]
fn revoke_disables_and_reinstate_reactivates() {
    let env = Env::start();
    let card = new_card();
    let (enroll, scid) = env.enroll(&card);
    let key = env.key_for(&enroll, &scid, &card);
    env.finish(&enroll, "Completed", 8);

    // Reinstate on an Active card: refused.
    let r = env.create("Reinstate", Some(&scid));
    assert_eq!(error_code(&r, 409), "Conflict");

    let revoke = env.create("Revoke", Some(&scid)).created_id();
    assert_eq!(env.request_status(&revoke), 3);
    env.finish(&revoke, "Completed", 8);
    assert_eq!(env.card_status(&scid), 5, "Disabled");
    for kind in ["Unblock", "Retire", "Revoke"] {
        let r = env.create(kind, Some(&scid));
        assert_eq!(error_code(&r, 409), "Conflict", "{kind} on a disabled card");
    }

    let reinstate = env.create("Reinstate", Some(&scid));
    let reinstate = reinstate.created_id();
    let q = env.get(&format!("/requests/{reinstate}")).json();
    assert_eq!(q["RequestType"], 9);
    assert_eq!(q["Status"], 3);
    assert_eq!(q["OldSmartcardUuid"], scid.as_str());
    assert_eq!(env.card_status(&scid), 5, "still Disabled until completed");
    env.finish(&reinstate, "Completed", 8);
    assert_eq!(env.card_status(&scid), 3, "Active");

    let unblock = env.create("Unblock", Some(&scid)).created_id();
    assert_eq!(env.key_for(&unblock, &scid, &card), key);
}

/// A request that ends without completing gives its card back the status it had: New (1)
/// for a card it bound first, Active (3) for an issued card it re-bound. A card that was only
/// bound never counts as issued.
#[test]
fn ending_a_request_restores_the_card_status() {
    let env = Env::start();

    // A card bound by an Enroll that is canceled: New, and not issued.
    let fresh = new_card();
    let (first, scid) = env.enroll(&fresh);
    assert_eq!(env.card_status(&scid), 2, "Assigned");
    env.finish(&first, "Canceled", 17);
    assert_eq!(env.card_status(&scid), 1, "New");
    let r = env.create("Unblock", Some(&scid));
    assert_eq!(error_code(&r, 409), "Conflict");
    let r = env.create("Retire", Some(&scid));
    assert_eq!(error_code(&r, 409), "Conflict");
    // Bound again and abandoned: New again.
    let (second, scid2) = env.enroll(&fresh);
    assert_eq!(scid2, scid);
    assert_eq!(env.card_status(&scid), 2);
    env.finish(&second, "Abandoned", 9);
    assert_eq!(env.card_status(&scid), 1, "New");
    let r = env.create("Unblock", Some(&scid));
    assert_eq!(error_code(&r, 409), "Conflict");

    // An issued card re-bound by a new Enroll that is canceled: Active again.
    let card = new_card();
    let (enroll, issued) = env.enroll(&card);
    let key = env.key_for(&enroll, &issued, &card);
    env.finish(&enroll, "Completed", 8);
    assert_eq!(env.card_status(&issued), 3);
    let (rebind, issued2) = env.enroll(&card);
    assert_eq!(issued2, issued);
    assert_eq!(env.card_status(&issued), 2, "Assigned");
    env.finish(&rebind, "Canceled", 17);
    assert_eq!(env.card_status(&issued), 3, "back to Active");
    let unblock = env.create("Unblock", Some(&issued)).created_id();
    assert_eq!(env.key_for(&unblock, &issued, &card), key);
}

// ---------------------------------------------------------------------------------------
// 3. Config bounds and duplicate credentials.

#[test]
fn config_bounds_and_duplicate_callers_are_refused() {
    let token = TestToken::new();
    let good = write_config(&token);
    token.import_key(&good, MASTER_LABEL, K1_HEX);
    assert_check_ok(&token, &good);
    let base = config_text(&token, "127.0.0.1:0", &rest());
    assert!(base.contains("workers = 2\n"));
    assert!(base.contains("\n[store]\n"));
    let hsm = |line: &str| base.replace("\n[store]\n", &format!("{line}\n\n[store]\n"));
    let agent_hash = sha256_hex(AGENT);
    let other_hash = sha256_hex(WRONG);
    let caller = |name: &str, hash: &str| {
        format!("{base}\n[[caller]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\n")
    };

    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "workers = 0",
            base.replace("workers = 2\n", "workers = 0\n"),
            vec!["workers"],
        ),
        (
            "workers = 100000",
            base.replace("workers = 2\n", "workers = 100000\n"),
            vec!["workers"],
        ),
        ("sessions = 0", hsm("sessions = 0"), vec!["sessions"]),
        (
            "sessions = 100000",
            hsm("sessions = 100000"),
            vec!["sessions"],
        ),
        ("queue = 0", hsm("queue = 0"), vec!["queue"]),
        (
            "queue = 1000000000000",
            hsm("queue = 1000000000000"),
            vec!["queue"],
        ),
        (
            "deadline_ms = 0",
            hsm("deadline_ms = 0"),
            vec!["deadline_ms"],
        ),
        (
            "log level bogus",
            format!("{base}\n[log]\nlevel = \"bogus\"\n"),
            vec!["level", "bogus"],
        ),
        (
            "log level empty",
            format!("{base}\n[log]\nlevel = \"\"\n"),
            vec!["level"],
        ),
        (
            "workers = -1",
            base.replace("workers = 2\n", "workers = -1\n"),
            vec!["-1", "line 2"],
        ),
        (
            "two callers named agent",
            caller("agent", &other_hash),
            vec!["agent", "twice"],
        ),
        (
            "two callers with one token hash",
            caller("agent2", &agent_hash),
            vec!["agent", "agent2"],
        ),
        (
            "two callers with one token hash (other case)",
            caller("agent3", &agent_hash.to_uppercase()),
            vec!["agent", "agent3"],
        ),
    ];
    for (i, (what, text, needles)) in cases.iter().enumerate() {
        let path = token.path().join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, out, err) = run_divkey(&token, &["check", "--config", p(&path)]);
        assert_eq!(code, 1, "{what}: exit code {code}:\n{out}{err}");
        assert!(!out.contains("ok"), "{what}: check printed ok:\n{out}");
        assert_one_error_line(what, &err, needles);
    }

    // A bad level from the environment is refused the same way.
    let out = std::process::Command::new(divkey_bin())
        .env("SOFTHSM2_CONF", &token.conf)
        .env("DIVKEY_LOG_LEVEL", "bogus")
        .args(["check", "--config", p(&good)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_one_error_line("DIVKEY_LOG_LEVEL=bogus", &err, &["level", "bogus"]);

    // serve refuses the thread and memory bombs before it spawns anything.
    for (what, text) in [
        (
            "workers = 100000",
            base.replace("workers = 2\n", "workers = 100000\n"),
        ),
        ("sessions = 100000", hsm("sessions = 100000")),
        ("queue = 1000000000000", hsm("queue = 1000000000000")),
    ] {
        let path = token.path().join("bad-serve.toml");
        std::fs::write(&path, text).unwrap();
        let start = Instant::now();
        assert_serve_refuses(&token, &path, &[what.split(' ').next().unwrap()], &[]);
        assert!(start.elapsed() < Duration::from_secs(10), "{what}: slow");
    }

    // The bounds themselves are accepted.
    let edge = hsm("sessions = 64\nqueue = 100000\ndeadline_ms = 10")
        .replace("workers = 2\n", "workers = 256\n");
    let path = token.path().join("edge.toml");
    std::fs::write(&path, format!("{edge}\n[log]\nlevel = \"warn\"\n")).unwrap();
    assert_check_ok(&token, &path);
    let edge = hsm("sessions = 1\nqueue = 1\ndeadline_ms = 60000")
        .replace("workers = 2\n", "workers = 1\n");
    std::fs::write(&path, edge).unwrap();
    assert_check_ok(&token, &path);
}

// ---------------------------------------------------------------------------------------
// 4. Bodies: read only after authentication, within a size and a time limit.

fn post_head(addr: &str, auth: Option<&str>, length: u64) -> String {
    let mut head = format!(
        "POST {API}/requests HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {length}"
    );
    if let Some(t) = auth {
        head.push_str(&format!("\r\nAuthorization: Bearer {t}"));
    }
    head
}

#[test]
fn oversized_declared_body_is_refused_before_it_is_read() {
    let env = Env::start();
    let addr = env.server.addr.clone();
    let five = Duration::from_secs(5);
    let tiny = br#"{"type":"#;

    // Authenticated: 413 JSON at once.
    let r = raw_exchange(
        &addr,
        &post_head(&addr, Some(AGENT), 1_000_000_000),
        tiny,
        five,
    );
    assert_eq!(r.error_code(413), "PayloadTooLarge");
    assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
    // Just over the limit of 64 KiB: the same.
    let r = raw_exchange(
        &addr,
        &post_head(&addr, Some(AGENT), 64 * 1024 + 1),
        tiny,
        five,
    );
    assert_eq!(r.error_code(413), "PayloadTooLarge");

    // Unauthenticated, or with a wrong token: 401 at once, the body not waited for.
    for auth in [None, Some(WRONG)] {
        let r = raw_exchange(&addr, &post_head(&addr, auth, 1_000_000_000), tiny, five);
        assert_eq!(r.error_code(401), "Unauthorized", "{auth:?}");
        assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
        let r = raw_exchange(&addr, &post_head(&addr, auth, 100), b"0123456789", five);
        assert_eq!(r.error_code(401), "Unauthorized", "{auth:?}");
        assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
    }

    // The server still works, and a whole body within the limit is read.
    let body = json!({"type": "Enroll", "profiletemplateuuid": T_OPEN}).to_string();
    let r = raw_exchange(
        &addr,
        &post_head(&addr, Some(AGENT), body.len() as u64),
        body.as_bytes(),
        five,
    );
    assert_eq!(r.status, 201, "{}\n\n{}", r.head, r.body);
}

#[test]
fn body_that_never_arrives_gets_408() {
    let env = Env::start();
    let addr = env.server.addr.clone();
    let r = raw_exchange(
        &addr,
        &post_head(&addr, Some(AGENT), 100),
        br#"{"type":"E"#,
        Duration::from_secs(20),
    );
    assert_eq!(r.error_code(408), "RequestTimeout");
    assert!(
        r.elapsed >= Duration::from_secs(8) && r.elapsed <= Duration::from_secs(13),
        "408 after {:?}",
        r.elapsed
    );
    // The server still answers.
    let r = env.get("/profiletemplates");
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---------------------------------------------------------------------------------------
// 5. One Authorization header only.

#[test]
fn two_authorization_headers_are_refused() {
    let env = Env::start();
    let addr = env.server.addr.clone();
    let five = Duration::from_secs(5);
    let get = |headers: &[&str]| {
        let mut head = format!("GET {API}/profiletemplates HTTP/1.1\r\nHost: {addr}");
        for h in headers {
            head.push_str("\r\n");
            head.push_str(h);
        }
        raw_exchange(&addr, &head, b"", five)
    };
    let good = format!("Authorization: Bearer {AGENT}");
    let bad = format!("Authorization: Bearer {WRONG}");

    // One valid header: 200 with the template.
    let r = get(&[&good]);
    assert_eq!(r.status, 200, "{}\n\n{}", r.head, r.body);
    assert!(r.body.contains(T_OPEN), "{}", r.body);
    let r = get(&[&bad]);
    assert_eq!(r.error_code(401), "Unauthorized");
    // Valid and invalid, in either order: 401.
    for (what, headers) in [
        ("valid first", [&good, &bad]),
        ("invalid first", [&bad, &good]),
    ] {
        let r = get(&[headers[0].as_str(), headers[1].as_str(), "Accept: */*"]);
        assert_eq!(r.error_code(401), "Unauthorized", "{what}");
        assert!(!r.body.contains(T_OPEN), "{what}: {}", r.body);
    }
    // Also on the key endpoint.
    let card = new_card();
    let (reqid, scid) = env.enroll(&card);
    let path = format!("{API}/requests/{reqid}/smartcards/{scid}/diversifiedkey?cardid={card}");
    for pair in [[&good, &bad], [&bad, &good]] {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{}\r\n{}",
            pair[0], pair[1]
        );
        let r = raw_exchange(&addr, &head, b"", five);
        assert_eq!(r.error_code(401), "Unauthorized");
    }
    assert_eq!(
        env.key_for(&reqid, &scid, &card),
        soft_admin_des3(K1_HEX, &card)
    );
}

// ---------------------------------------------------------------------------------------
// 6. Health endpoints.

#[test]
fn health_endpoints_answer_get_only() {
    let env = Env::start();
    let http = agent();
    let healthz = env.host_url("/healthz");
    let readyz = env.host_url("/readyz");

    let r = call(&http, "GET", &healthz, None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"Status": "ok"}));
    let r = call(&http, "GET", &readyz, None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"Ready": true}));

    for url in [&healthz, &readyz] {
        for (method, token) in [
            ("POST", None),
            ("POST", Some(AGENT)),
            ("PUT", None),
            ("DELETE", None),
        ] {
            let body = (method != "DELETE").then(|| json!({}));
            let r = call(&http, method, url, token, body);
            assert_eq!(error_code(&r, 405), "MethodNotAllowed", "{method} {url}");
        }
    }
    // Still ready after serving a key (the KCV check on each readiness probe holds).
    let card = new_card();
    let (reqid, scid) = env.enroll(&card);
    assert_eq!(
        env.key_for(&reqid, &scid, &card),
        soft_admin_des3(K1_HEX, &card)
    );
    let r = call(&http, "GET", &readyz, None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"Ready": true}));
}

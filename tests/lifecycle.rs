//! Key lifecycle end to end (issue 4): master key rotation that never breaks issued cards,
//! retirement and deletion of versions, the admin challenge response
//! (`authenticationresponse`), retired cards, the known-answer self-test at start, and the key
//! ceremony CLI. A real `divkey serve` on a throw-away SoftHSM2 token; released keys and
//! challenge responses are checked against RustCrypto.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// The master key "admin-master" version 1 (the AES-256 key of NIST SP 800-38B).
const MASTER_HEX: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
/// The AES-128 master key "an-master" of the AN10922 template.
const AN_MASTER_HEX: &str = "2b7e151628aed2a6abf7158809cf4f3c";
const AES_LABEL: &str = "lifecycle aes label";
const AN_SYSTEM_ID: &str = "a1b2c3d4e5";
const DES3_DEFAULT: &str = "0102030405060708a1a2a3a4a5a6a7a8b1b2b3b4b5b6b7b8";
const AES_DEFAULT: &str = "00112233445566778899aabbccddeeff";

/// sp800-108-cmac des3, windows card ID bytes, master "admin-master".
const T_DES: &str = "9b4e2c1a-5d3f-4e6a-8b7c-1d2e3f4a5b01";
/// sp800-108-cmac aes128, rfc4122 card ID bytes, own label, master "admin-master".
const T_AES: &str = "9b4e2c1a-5d3f-4e6a-8b7c-1d2e3f4a5b02";
/// an10922-aes128 with a system id, master "an-master".
const T_AN: &str = "9b4e2c1a-5d3f-4e6a-8b7c-1d2e3f4a5b03";

/// request, approve, bind, read_key and authenticate on every template.
const AGENT: &str = "agent-bearer-2f7c9e1b4d6a8c0e3b5d7f9a1c3e5b77";
/// authenticate only, on every template.
const AUTH_ONLY: &str = "authonly-bearer-8d1e3c5a7b9f0d2e4a6c8b1d3f5a7c19";
/// read_key only, on every template.
const KEY_ONLY: &str = "keyonly-bearer-4a6c8e0b2d4f6a8c1e3b5d7f9b2d4f63";

fn config_rest() -> String {
    let all = |perms: &str| {
        format!("{{ \"{T_DES}\" = {perms}, \"{T_AES}\" = {perms}, \"{T_AN}\" = {perms} }}")
    };
    format!(
        r#"
[[profile_template]]
uuid = "{T_DES}"
name = "des3"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "des3"
card_id_bytes = "windows"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "{DES3_DEFAULT}"

[[profile_template]]
uuid = "{T_AES}"
name = "aes128"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "aes128"
label = "{AES_LABEL}"
card_id_bytes = "rfc4122"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "{AES_DEFAULT}"

[[profile_template]]
uuid = "{T_AN}"
name = "an10922"
diversify_admin_key = true
algorithm = "an10922-aes128"
system_id = "{AN_SYSTEM_ID}"
card_id_bytes = "windows"
master_key = "an-master"
approvals_required = 0
default_admin_key_hex = "{AES_DEFAULT}"

[[caller]]
name = "agent"
token_sha256 = "{agent}"
permissions = {agent_perms}

[[caller]]
name = "auth-only"
token_sha256 = "{auth_only}"
permissions = {auth_perms}

[[caller]]
name = "key-only"
token_sha256 = "{key_only}"
permissions = {key_perms}
"#,
        agent = sha256_hex(AGENT),
        auth_only = sha256_hex(AUTH_ONLY),
        key_only = sha256_hex(KEY_ONLY),
        agent_perms = all(r#"["request", "approve", "bind", "read_key", "authenticate"]"#),
        auth_perms = all(r#"["authenticate"]"#),
        key_perms = all(r#"["read_key"]"#),
    )
}

// ---------------------------------------------------------------------------------------
// Software crypto: expected keys and challenge responses.

fn master() -> Vec<u8> {
    hex::decode(MASTER_HEX).unwrap()
}

fn want_des3_v1(card: &str) -> Vec<u8> {
    soft_admin_des3(MASTER_HEX, card)
}

fn want_aes_v1(card: &str) -> Vec<u8> {
    soft_sp800_108(
        &master(),
        AES_LABEL,
        "aes128",
        &card_id_bytes(card, "rfc4122"),
    )
}

fn want_an(card: &str) -> Vec<u8> {
    let mut m = card_id_bytes(card, "windows").to_vec();
    m.extend(hex::decode(AN_SYSTEM_ID).unwrap());
    soft_an10922(&hex::decode(AN_MASTER_HEX).unwrap(), &m)
}

/// 3DES-ECB (EDE, three keys) of one 8-byte block.
fn tdes_ecb(key: &[u8], block: &[u8]) -> Vec<u8> {
    use des::TdesEde3;
    use des::cipher::generic_array::GenericArray;
    use des::cipher::{BlockEncrypt, KeyInit};
    let c = TdesEde3::new_from_slice(key).unwrap();
    let mut b = GenericArray::clone_from_slice(block);
    c.encrypt_block(&mut b);
    b.to_vec()
}

/// AES-ECB of one 16-byte block.
fn aes_ecb(key: &[u8], block: &[u8]) -> Vec<u8> {
    use aes::cipher::generic_array::GenericArray;
    use aes::cipher::{BlockEncrypt, KeyInit};
    let mut b = GenericArray::clone_from_slice(block);
    match key.len() {
        16 => aes::Aes128::new_from_slice(key)
            .unwrap()
            .encrypt_block(&mut b),
        24 => aes::Aes192::new_from_slice(key)
            .unwrap()
            .encrypt_block(&mut b),
        32 => aes::Aes256::new_from_slice(key)
            .unwrap()
            .encrypt_block(&mut b),
        n => panic!("{n}-byte AES key"),
    }
    b.to_vec()
}

/// Percent-encodes a query value (base64 has '+', '/' and '=').
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The server, restartable on its token.

struct Env {
    /// First: dropped (killed) before the token directory goes.
    server: Option<Server>,
    http: ureq::Agent,
    config: PathBuf,
    token: TestToken,
}

impl Env {
    fn start() -> Self {
        let token = TestToken::new();
        let config = token.path().join("divkey.toml");
        std::fs::write(&config, config_text(&token, "127.0.0.1:0", &config_rest())).unwrap();
        token.import_key(&config, "admin-master", MASTER_HEX);
        token.import_key(&config, "an-master", AN_MASTER_HEX);
        let server = Server::start(&token, &config);
        Self {
            server: Some(server),
            http: agent(),
            config,
            token,
        }
    }

    fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn stop(&mut self) -> String {
        self.server.take().expect("server running").stop()
    }

    fn restart(&mut self) {
        assert!(self.server.is_none());
        self.server = Some(Server::start(&self.token, &self.config));
    }

    /// `divkey <args>` (key commands run while the server is stopped).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        run_divkey(&self.token, args)
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.server.as_ref().expect("server running").base
        )
    }

    fn get(&self, tok: &str, path: &str) -> Resp {
        call(&self.http, "GET", &self.url(path), Some(tok), None)
    }

    fn post(&self, tok: &str, path: &str, body: Value) -> Resp {
        call(&self.http, "POST", &self.url(path), Some(tok), Some(body))
    }

    fn put(&self, tok: &str, path: &str, body: Value) -> Resp {
        call(&self.http, "PUT", &self.url(path), Some(tok), Some(body))
    }

    /// An Enroll request with `card` bound: (request id, smart card id).
    fn enroll(&self, template: &str, card: &str) -> (String, String) {
        let reqid = self
            .post(
                AGENT,
                "/requests",
                json!({"type": "Enroll", "profiletemplateuuid": template}),
            )
            .created_id();
        let scid = self
            .post(
                AGENT,
                "/smartcards",
                json!({"requestid": reqid, "cardid": card}),
            )
            .created_id();
        (reqid, scid)
    }

    /// A request of `kind` (Unblock, Retire, …) on an issued card.
    fn on_card(&self, kind: &str, scid: &str) -> String {
        self.post(AGENT, "/requests", json!({"type": kind, "smartcard": scid}))
            .created_id()
    }

    fn complete(&self, reqid: &str) {
        let r = self.put(
            AGENT,
            &format!("/requests/{reqid}"),
            json!({"status": "Completed"}),
        );
        assert_eq!(r.status, 200, "complete {reqid}: {}", r.body);
    }

    fn card(&self, scid: &str) -> Value {
        let r = self.get(AGENT, &format!("/smartcards/{scid}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    fn key(&self, tok: &str, reqid: &str, scid: &str, card: &str) -> Resp {
        self.get(
            tok,
            &format!("/requests/{reqid}/smartcards/{scid}/diversifiedkey?cardid={card}"),
        )
    }

    /// `authenticationresponse` with the given query parts (None = left out).
    fn auth_raw(
        &self,
        tok: &str,
        reqid: &str,
        scid: &str,
        card: &str,
        challenge: Option<&str>,
        diversified: Option<&str>,
    ) -> Resp {
        let mut q = format!("cardid={card}");
        if let Some(c) = challenge {
            q.push_str(&format!("&challenge={}", pct(c)));
        }
        if let Some(d) = diversified {
            q.push_str(&format!("&diversified={d}"));
        }
        self.get(
            tok,
            &format!("/requests/{reqid}/smartcards/{scid}/authenticationresponse?{q}"),
        )
    }

    fn auth(
        &self,
        tok: &str,
        reqid: &str,
        scid: &str,
        card: &str,
        challenge: &[u8],
        diversified: bool,
    ) -> Resp {
        let d = if diversified { "true" } else { "false" };
        self.auth_raw(tok, reqid, scid, card, Some(&b64(challenge)), Some(d))
    }

    fn put_card(&self, tok: &str, reqid: &str, scid: &str, status: &str) -> Resp {
        self.put(
            tok,
            &format!("/requests/{reqid}/smartcards/{scid}"),
            json!({ "status": status }),
        )
    }

    fn audit_records(&self) -> Vec<Value> {
        let (code, out, err) = self.cli(&["audit", "export", "--config", self.cfg()]);
        assert_eq!(code, 0, "audit export: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Versions of `label` as `keys list` shows them.
    fn listed_versions(&self, label: &str) -> Vec<u32> {
        let (code, out, err) = self.cli(&["keys", "list", "--config", self.cfg()]);
        assert_eq!(code, 0, "keys list: {err}");
        let mut v: Vec<u32> = out
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(label)).then(|| f.next().unwrap().parse().unwrap())
            })
            .collect();
        v.sort_unstable();
        v
    }
}

/// A card issued under the des3 template, with what it got.
struct Issued {
    card: String,
    scid: String,
    key: Vec<u8>,
    response: Vec<u8>,
}

/// The fixed admin challenge every des3 card of the rotation test answers.
const CHALLENGE8: [u8; 8] = [0x4d, 0x49, 0x4d, 0x20, 0x43, 0x4d, 0x21, 0x07];

/// Enrolls a des3 card, fetches its key twice and its challenge response, completes the
/// request (the card becomes Active) and checks the version the card reports.
fn issue_des3(env: &Env, version: u32) -> Issued {
    let card = new_card();
    let (reqid, scid) = env.enroll(T_DES, &card);
    let key = key_bytes(&env.key(AGENT, &reqid, &scid, &card));
    assert_eq!(key.len(), 24);
    assert!(has_odd_parity(&key));
    assert_eq!(
        key_bytes(&env.key(AGENT, &reqid, &scid, &card)),
        key,
        "repeated calls give the same key"
    );
    if version == 1 {
        assert_eq!(key, want_des3_v1(&card), "version 1 key of {card}");
    } else {
        assert_ne!(key, want_des3_v1(&card), "version {version} key of {card}");
    }
    let response = key_bytes(&env.auth(AGENT, &reqid, &scid, &card, &CHALLENGE8, true));
    assert_eq!(
        response,
        tdes_ecb(&key, &CHALLENGE8),
        "challenge response of {card}"
    );
    env.complete(&reqid);
    let c = env.card(&scid);
    assert_eq!(c["Status"], 3, "{c}");
    assert_eq!(c["AdminKeyVersion"], version, "{c}");
    Issued {
        card,
        scid,
        key,
        response,
    }
}

/// An issued card, unblocked again: the same key and challenge response, the same version.
fn check_reissue(env: &Env, issued: &Issued, version: u32) {
    let reqid = env.on_card("Unblock", &issued.scid);
    let key = key_bytes(&env.key(AGENT, &reqid, &issued.scid, &issued.card));
    assert_eq!(key, issued.key, "card {} changed key", issued.card);
    let response =
        key_bytes(&env.auth(AGENT, &reqid, &issued.scid, &issued.card, &CHALLENGE8, true));
    assert_eq!(
        response, issued.response,
        "card {} changed challenge response",
        issued.card
    );
    assert_eq!(env.card(&issued.scid)["AdminKeyVersion"], version);
    env.complete(&reqid);
}

// ---------------------------------------------------------------------------------------
// 1. Rotation never breaks issued cards.

#[test]
fn rotation_retirement_and_deletion_never_break_issued_cards() {
    let mut env = Env::start();

    let first: Vec<Issued> = (0..20).map(|_| issue_des3(&env, 1)).collect();

    env.stop();
    for want in [2, 3] {
        let (code, out, err) = env.cli(&[
            "keys",
            "rotate",
            "--config",
            env.cfg(),
            "--label",
            "admin-master",
        ]);
        assert_eq!(code, 0, "rotate: {out}{err}");
        assert!(
            out.contains("label=admin-master") && out.contains(&format!("version={want}")),
            "rotate: {out}"
        );
    }
    assert_eq!(env.listed_versions("admin-master"), [1, 2, 3]);
    assert_eq!(env.listed_versions("an-master"), [1]);
    env.restart();

    let second: Vec<Issued> = (0..20).map(|_| issue_des3(&env, 3)).collect();
    let distinct: HashSet<&Vec<u8>> = first.iter().chain(&second).map(|i| &i.key).collect();
    assert_eq!(distinct.len(), 40, "every card has its own key");
    for issued in &first {
        check_reissue(&env, issued, 1);
    }
    for issued in &second {
        check_reissue(&env, issued, 3);
    }

    // Version 3 retired: new cards get version 2, issued cards keep theirs.
    env.stop();
    let (code, out, err) = env.cli(&[
        "keys",
        "retire",
        "--config",
        env.cfg(),
        "--label",
        "admin-master",
        "--version",
        "3",
    ]);
    assert_eq!(code, 0, "retire: {out}{err}");
    env.restart();
    let third = issue_des3(&env, 2);
    assert!(!distinct.contains(&third.key));
    check_reissue(&env, &first[0], 1);
    check_reissue(&env, &second[0], 3);
    check_reissue(&env, &third, 2);

    // Deleting a version that cards use is refused; an unused one goes.
    env.stop();
    for used in ["1", "2", "3"] {
        let (code, out, err) = env.cli(&[
            "keys",
            "delete",
            "--config",
            env.cfg(),
            "--label",
            "admin-master",
            "--version",
            used,
        ]);
        assert_ne!(code, 0, "delete version {used} (in use): {out}{err}");
        assert!(err.starts_with("divkey: error: "), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(env.listed_versions("admin-master"), [1, 2, 3]);
    let (code, out, err) = env.cli(&[
        "keys",
        "rotate",
        "--config",
        env.cfg(),
        "--label",
        "admin-master",
    ]);
    assert_eq!(code, 0, "rotate: {out}{err}");
    assert!(out.contains("version=4"), "{out}");
    assert_eq!(env.listed_versions("admin-master"), [1, 2, 3, 4]);
    let keys = |args: &[&str]| {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", env.cfg(), "--label", "admin-master"]);
        env.cli(&all)
    };
    // The newest version is never deleted (its number would be reused), and a version in
    // service must be retired first.
    let (code, out, err) = keys(&["delete", "--version", "4"]);
    assert_ne!(code, 0, "delete newest version 4: {out}{err}");
    assert!(err.contains("newest"), "{err}");
    let (code, out, err) = keys(&["rotate"]);
    assert_eq!(code, 0, "rotate: {out}{err}");
    assert!(out.contains("version=5"), "{out}");
    let (code, out, err) = keys(&["delete", "--version", "4"]);
    assert_ne!(code, 0, "delete version 4 in service: {out}{err}");
    assert!(err.contains("retire"), "{err}");
    for v in ["4", "5"] {
        let (code, out, err) = keys(&["retire", "--version", v]);
        assert_eq!(code, 0, "retire {v}: {out}{err}");
    }
    let (code, out, err) = keys(&["delete", "--version", "4"]);
    assert_eq!(code, 0, "delete unused retired version 4: {out}{err}");
    assert_eq!(env.listed_versions("admin-master"), [1, 2, 3, 5]);
    let (code, out, err) = env.cli(&["check", "--config", env.cfg()]);
    assert_eq!(code, 0, "check: {out}{err}");

    env.restart();
    let fourth = issue_des3(&env, 2);
    assert!(!distinct.contains(&fourth.key));
    check_reissue(&env, &first[19], 1);
    check_reissue(&env, &second[19], 3);
    check_reissue(&env, &third, 2);
    let log = env.stop();
    for issued in first.iter().chain(&second) {
        assert!(
            !log.to_lowercase().contains(&hex::encode(&issued.key)),
            "a key in the log"
        );
        assert!(!log.contains(&b64(&issued.key)), "a key in the log");
    }
}

// ---------------------------------------------------------------------------------------
// 2. authenticationresponse.

#[test]
fn authentication_response_is_the_challenge_under_the_released_key() {
    let mut env = Env::start();
    let des_default = hex::decode(DES3_DEFAULT).unwrap();
    let aes_default = hex::decode(AES_DEFAULT).unwrap();
    let mut used_kcvs: Vec<(String, &str)> = Vec::new();

    // des3: 8-byte challenges.
    let card = new_card();
    let (reqid, scid) = env.enroll(T_DES, &card);
    let key = key_bytes(&env.key(AGENT, &reqid, &scid, &card));
    assert_eq!(key, want_des3_v1(&card));
    for _ in 0..3 {
        let ch: [u8; 8] = rand::random();
        let got = key_bytes(&env.auth(AGENT, &reqid, &scid, &card, &ch, true));
        assert_eq!(got, tdes_ecb(&key, &ch), "des3 diversified=true");
        let got = key_bytes(&env.auth(AGENT, &reqid, &scid, &card, &ch, false));
        assert_eq!(got, tdes_ecb(&des_default, &ch), "des3 diversified=false");
        assert_ne!(got, ch.to_vec());
    }
    used_kcvs.push((soft_kcv(&key, true), "des3 card key"));
    used_kcvs.push((soft_kcv(&des_default, true), "des3 default key"));
    // A challenge whose base64 has `+`, sent without percent-encoding it (form decoding
    // reads `+` as a space, which base64 never holds): the same answer.
    let ch = [0xfb, 0xef, 0xbe, 0xfb, 0xef, 0xbe, 0x01, 0x02];
    assert_eq!(b64(&ch), "++++++++AQI=");
    let r = env.get(
        AGENT,
        &format!(
            "/requests/{reqid}/smartcards/{scid}/authenticationresponse?cardid={card}\
             &challenge=++++++++AQI%3D&diversified=true"
        ),
    );
    assert_eq!(key_bytes(&r), tdes_ecb(&key, &ch), "raw + in the challenge");

    // Only `authenticate` is needed, and `read_key` is not enough.
    let ch: [u8; 8] = rand::random();
    let got = key_bytes(&env.auth(AUTH_ONLY, &reqid, &scid, &card, &ch, true));
    assert_eq!(got, tdes_ecb(&key, &ch), "caller with only authenticate");
    let r = env.auth(KEY_ONLY, &reqid, &scid, &card, &ch, true);
    error_code(&r, 403);
    assert!(!r.body.contains(&b64(&tdes_ecb(&key, &ch))));
    let r = env.key(AUTH_ONLY, &reqid, &scid, &card);
    error_code(&r, 403);
    assert!(!r.body.contains(&b64(&key)));

    // Bad challenges and diversified flags: 400.
    let cases: Vec<(Option<String>, Option<&str>, &str)> = vec![
        (
            Some(b64(&[7u8; 16])),
            Some("true"),
            "16 bytes for a des3 key",
        ),
        (Some(b64(&[7u8; 7])), Some("true"), "7 bytes"),
        (Some(b64(&[7u8; 9])), Some("false"), "9 bytes"),
        (Some(b64(&[])), Some("true"), "empty"),
        (Some("not base64!".to_owned()), Some("true"), "not base64"),
        (None, Some("true"), "no challenge"),
        (Some(b64(&ch)), None, "no diversified"),
        (Some(b64(&ch)), Some("yes"), "diversified=yes"),
        (Some(b64(&ch)), Some(""), "diversified empty"),
        (Some(b64(&ch)), Some("2"), "diversified=2"),
    ];
    for (challenge, diversified, what) in &cases {
        let r = env.auth_raw(
            AGENT,
            &reqid,
            &scid,
            &card,
            challenge.as_deref(),
            *diversified,
        );
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        error_code(&r, 400);
    }

    // The request and card checks of diversifiedkey.
    let other = new_card();
    error_code(&env.auth(AGENT, &reqid, &scid, &other, &ch, true), 403);
    let (other_req, _) = env.enroll(T_DES, &other);
    error_code(&env.auth(AGENT, &other_req, &scid, &card, &ch, true), 403);
    error_code(
        &env.auth(
            AGENT,
            &reqid,
            &uuid::Uuid::new_v4().to_string(),
            &card,
            &ch,
            true,
        ),
        404,
    );
    let r = env.auth_raw(
        AGENT,
        &reqid,
        &scid,
        "not-a-card",
        Some(&b64(&ch)),
        Some("true"),
    );
    error_code(&r, 400);

    // aes128 (sp800-108-cmac): 16-byte challenges, AES-ECB.
    let card = new_card();
    let (reqid, scid) = env.enroll(T_AES, &card);
    let key = key_bytes(&env.key(AGENT, &reqid, &scid, &card));
    assert_eq!(key, want_aes_v1(&card));
    let ch: [u8; 16] = rand::random();
    let got = key_bytes(&env.auth(AGENT, &reqid, &scid, &card, &ch, true));
    assert_eq!(got, aes_ecb(&key, &ch), "aes128 diversified=true");
    let got = key_bytes(&env.auth(AGENT, &reqid, &scid, &card, &ch, false));
    assert_eq!(got, aes_ecb(&aes_default, &ch), "aes128 diversified=false");
    let got = key_bytes(&env.auth(AUTH_ONLY, &reqid, &scid, &card, &ch, true));
    assert_eq!(got, aes_ecb(&key, &ch));
    error_code(&env.auth(KEY_ONLY, &reqid, &scid, &card, &ch, true), 403);
    for bad in [
        &[1u8; 8][..],
        &[1u8; 15][..],
        &[1u8; 24][..],
        &[1u8; 32][..],
    ] {
        let r = env.auth(AGENT, &reqid, &scid, &card, bad, true);
        assert_eq!(
            r.status,
            400,
            "{} bytes for an AES key: {}",
            bad.len(),
            r.body
        );
    }
    used_kcvs.push((soft_kcv(&key, false), "aes128 card key"));
    used_kcvs.push((soft_kcv(&aes_default, false), "aes128 default key"));

    // an10922-aes128.
    let card = new_card();
    let (reqid, scid) = env.enroll(T_AN, &card);
    let key = key_bytes(&env.key(AGENT, &reqid, &scid, &card));
    assert_eq!(key, want_an(&card));
    let ch: [u8; 16] = rand::random();
    let got = key_bytes(&env.auth(AGENT, &reqid, &scid, &card, &ch, true));
    assert_eq!(got, aes_ecb(&key, &ch), "an10922 diversified=true");
    used_kcvs.push((soft_kcv(&key, false), "an10922 card key"));

    // Audited as key.authenticate with the KCV of the key used; no key in the trail.
    let records = env.audit_records();
    let auth: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "key.authenticate")
        .collect();
    assert!(!auth.is_empty(), "no key.authenticate record");
    for (kcv, what) in &used_kcvs {
        assert!(
            auth.iter().any(|r| r["kcv"] == kcv.as_str()),
            "no key.authenticate record with the KCV {kcv} of the {what}:\n{auth:#?}"
        );
    }
    let trail = records
        .iter()
        .map(Value::to_string)
        .collect::<String>()
        .to_lowercase();
    assert!(!trail.contains(&hex::encode(&key)));
    let log = env.stop();
    assert!(!log.to_lowercase().contains(&hex::encode(&key)));
    assert!(!log.contains(&b64(&key)));
}

// ---------------------------------------------------------------------------------------
// 3. Retired and disabled cards.

#[test]
fn retired_cards_get_no_keys_until_enrolled_again() {
    let env = Env::start();
    let ch = CHALLENGE8;

    let card = new_card();
    let (enroll, scid) = env.enroll(T_DES, &card);
    let key = key_bytes(&env.key(AGENT, &enroll, &scid, &card));
    env.complete(&enroll);

    // Retire it within a Retire request.
    let retire = env.on_card("Retire", &scid);
    error_code(&env.put_card(AUTH_ONLY, &retire, &scid, "Retired"), 403);
    error_code(&env.put_card(AGENT, &retire, &scid, "Bogus"), 400);
    let r = env.put_card(AGENT, &retire, &scid, "Retired");
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(c["Uuid"], scid.as_str(), "{c}");
    assert_eq!(c["Status"], 6, "{c}");
    assert_eq!(c["AdminKeyVersion"], 1, "{c}");
    assert_eq!(env.card(&scid)["Status"], 6);
    let r = env.key(AGENT, &retire, &scid, &card);
    error_code(&r, 403);
    assert!(!r.body.contains(&b64(&key)));
    error_code(&env.auth(AGENT, &retire, &scid, &card, &ch, true), 403);
    error_code(&env.auth(AGENT, &retire, &scid, &card, &ch, false), 403);
    error_code(&env.key(AGENT, &enroll, &scid, &card), 403);
    env.complete(&retire);
    assert_eq!(env.card(&scid)["Status"], 6);
    // No Unblock of a retired card.
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Unblock", "smartcard": scid}),
    );
    assert!(r.status >= 400, "{}", r.body);

    // A new enrollment binds it again: the same key.
    let (again, scid2) = env.enroll(T_DES, &card);
    let key2 = key_bytes(&env.key(AGENT, &again, &scid2, &card));
    assert_eq!(key2, key, "a re-enrolled card keeps its key");
    assert_eq!(key2, want_des3_v1(&card));
    let got = key_bytes(&env.auth(AGENT, &again, &scid2, &card, &ch, true));
    assert_eq!(got, tdes_ecb(&key, &ch));
    assert_eq!(env.card(&scid2)["AdminKeyVersion"], 1);
    env.complete(&again);
    assert_eq!(env.card(&scid2)["Status"], 3);

    // Disabled and back to Active, within an Unblock request.
    let card = new_card();
    let (enroll, scid) = env.enroll(T_AES, &card);
    let key = key_bytes(&env.key(AGENT, &enroll, &scid, &card));
    env.complete(&enroll);
    let unblock = env.on_card("Unblock", &scid);
    let r = env.put_card(AGENT, &unblock, &scid, "Disabled");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 5);
    error_code(&env.key(AGENT, &unblock, &scid, &card), 403);
    error_code(
        &env.auth(AGENT, &unblock, &scid, &card, &[3u8; 16], true),
        403,
    );
    let r = env.put_card(AGENT, &unblock, &scid, "Active");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 3);
    assert_eq!(
        key_bytes(&env.key(AGENT, &unblock, &scid, &card)),
        key,
        "active again: the same key"
    );

    // The request must bind the card.
    let (other_req, _other_sc) = env.enroll(T_AES, &new_card());
    let r = env.put_card(AGENT, &other_req, &scid, "Retired");
    assert!(
        r.status == 403 || r.status == 409,
        "a request that does not bind the card: {} {}",
        r.status,
        r.body
    );
    assert_eq!(env.card(&scid)["Status"], 3, "the card stays Active");
    let r = env.put_card(
        AGENT,
        &unblock,
        &uuid::Uuid::new_v4().to_string(),
        "Retired",
    );
    assert!(
        r.status == 404 || r.status == 403,
        "an unknown smart card: {} {}",
        r.status,
        r.body
    );
}

// ---------------------------------------------------------------------------------------
// 4. Known-answer self-test.

/// Runs `divkey <args>` with `DIVKEY_SELFTEST_BREAK` set, for at most 30 s (a server that
/// starts serving anyway is killed). Returns (exit code, stdout, stderr).
fn run_broken(token: &TestToken, args: &[&str], broken: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(divkey_bin())
        .env("SOFTHSM2_CONF", &token.conf)
        .env("DIVKEY_SELFTEST_BREAK", broken)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn divkey");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, t_out.join().unwrap(), t_err.join().unwrap())
}

#[test]
fn self_test_refuses_a_broken_algorithm_and_names_it() {
    let mut env = Env::start();
    env.stop();
    let before = env.cli(&["keys", "list", "--config", env.cfg()]).1;

    for (broken, names) in [
        ("sp800-108-cmac/des3", &["sp800-108-cmac", "des3"][..]),
        ("sp800-108-cmac/aes128", &["sp800-108-cmac", "aes128"][..]),
        ("an10922-aes128", &["an10922-aes128"][..]),
    ] {
        for command in ["check", "serve"] {
            let (code, out, err) =
                run_broken(&env.token, &[command, "--config", env.cfg()], broken);
            let what = format!("{command} with {broken} broken");
            assert!(code.is_some(), "{what}: still running after 30 s:\n{err}");
            assert_ne!(code, Some(0), "{what}: succeeded:\n{out}{err}");
            assert!(!err.contains("listening on"), "{what}: served:\n{err}");
            assert!(!out.contains("ok:"), "{what}: {out}");
            let errors: Vec<&str> = err
                .lines()
                .filter(|l| l.starts_with("divkey: error:"))
                .collect();
            assert_eq!(errors.len(), 1, "{what}: one error line:\n{err}");
            assert_eq!(
                err.lines().last(),
                Some(errors[0]),
                "{what}: the error is the last line:\n{err}"
            );
            if command == "check" {
                assert_eq!(err.lines().count(), 1, "{what}: stderr:\n{err}");
            }
            for name in names {
                assert!(
                    errors[0].contains(name),
                    "{what}: the error does not name {name}: {}",
                    errors[0]
                );
            }
            assert!(
                !errors[0]
                    .to_lowercase()
                    .contains(&MASTER_HEX.to_lowercase()),
                "{what}"
            );
        }
    }

    // Unbroken: both succeed; the test keys were session objects, none is left.
    let (code, out, err) = env.cli(&["check", "--config", env.cfg()]);
    assert_eq!(code, 0, "check: {out}{err}");
    assert!(out.contains("ok:"), "{out}");
    env.restart();
    let card = new_card();
    let (reqid, scid) = env.enroll(T_AN, &card);
    assert_eq!(
        key_bytes(&env.key(AGENT, &reqid, &scid, &card)),
        want_an(&card)
    );
    env.stop();
    let after = env.cli(&["keys", "list", "--config", env.cfg()]).1;
    assert_eq!(before, after, "self-test keys left on the token");
}

// ---------------------------------------------------------------------------------------
// 5. Key ceremony through the CLI.

/// A strong test component of `len` bytes.
fn component(seed: &str, len: usize) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha512::digest(format!("divkey lifecycle component {seed}"))[..len].to_vec()
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

#[test]
fn key_ceremony_cli() {
    let token = TestToken::new();
    let config = token.path().join("divkey.toml");
    std::fs::write(&config, config_text(&token, "127.0.0.1:0", "")).unwrap();
    let cfg = config.to_str().unwrap();
    let list = || {
        let (code, out, err) = run_divkey(&token, &["keys", "list", "--config", cfg]);
        assert_eq!(code, 0, "{err}");
        out
    };
    // Every secret of this test, to look for in outputs, the audit trail and the store.
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let mut outputs = String::new();

    // Two component files, mode 600.
    let a = component("a", 16);
    let b = component("b", 16);
    let key = xor(&a, &b);
    secrets.extend([a.clone(), b.clone(), key.clone()]);
    let fa = token.path().join("component-1.hex");
    let fb = token.path().join("component-2.hex");
    write_private(&fa, &format!("{}\n", hex::encode(&a)));
    write_private(&fb, &hex::encode_upper(&b));
    let (code, out, err) = run_divkey(
        &token,
        &[
            "keys",
            "import",
            "--config",
            cfg,
            "--label",
            "ceremony-files",
            "--type",
            "aes128",
            "--component-file",
            fa.to_str().unwrap(),
            "--component-file",
            fb.to_str().unwrap(),
        ],
    );
    outputs.push_str(&out);
    outputs.push_str(&err);
    assert_eq!(code, 0, "{out}{err}");
    let kcv = soft_kcv(&key, false);
    assert!(
        out.contains(&format!("component 1 kcv={}", soft_kcv(&a, false))),
        "{out}"
    );
    assert!(
        out.contains(&format!("component 2 kcv={}", soft_kcv(&b, false))),
        "{out}"
    );
    assert!(out.contains(&format!("combined kcv={kcv}")), "{out}");
    assert!(
        out.contains(&format!(
            "label=ceremony-files type=aes128 version=1 kcv={kcv}"
        )),
        "{out}"
    );
    let listed = list();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("ceremony-files") && l.contains(&kcv)),
        "{listed}"
    );

    // --kcv: a mismatch imports nothing, the right one is accepted. 2 to 5 components.
    let c: Vec<Vec<u8>> = (0..6).map(|i| component(&format!("c{i}"), 32)).collect();
    secrets.extend(c.iter().cloned());
    let five = c[..5].iter().fold(vec![0u8; 32], |k, x| xor(&k, x));
    secrets.push(five.clone());
    let five_kcv = soft_kcv(&five, false);
    let wrong_kcv = if five_kcv == "000000" {
        "000001"
    } else {
        "000000"
    };
    let import = |label: &str, parts: &[Vec<u8>], kind: &str, extra: &[&str]| {
        let hexes: Vec<String> = parts.iter().map(hex::encode).collect();
        let mut args = vec![
            "keys", "import", "--config", cfg, "--label", label, "--type", kind,
        ];
        for h in &hexes {
            args.push("--component");
            args.push(h);
        }
        args.extend_from_slice(extra);
        run_divkey(&token, &args)
    };
    let before = list();
    let (code, out, err) = import("ceremony-five", &c[..5], "aes256", &["--kcv", wrong_kcv]);
    outputs.push_str(&out);
    outputs.push_str(&err);
    assert_ne!(code, 0, "KCV mismatch accepted: {out}{err}");
    assert!(err.starts_with("divkey: error: "), "{err}");
    assert_eq!(list(), before, "a refused import left a key");
    let (code, out, err) = import(
        "ceremony-five",
        &c[..5],
        "aes256",
        &["--kcv", &five_kcv.to_lowercase()],
    );
    outputs.push_str(&out);
    outputs.push_str(&err);
    assert_eq!(code, 0, "five components with the right KCV: {out}{err}");
    assert!(out.contains(&format!("combined kcv={five_kcv}")), "{out}");
    for (i, part) in c[..5].iter().enumerate() {
        assert!(
            out.contains(&format!(
                "component {} kcv={}",
                i + 1,
                soft_kcv(part, false)
            )),
            "{out}"
        );
    }

    // Refusals: nothing new on the token, one error line, no component in it.
    let mut weak_des = component("w", 16);
    weak_des[..8].copy_from_slice(&[0x01; 8]);
    let mut semi_weak = component("s", 24);
    semi_weak[8..16].copy_from_slice(&[0x1F, 0xE0, 0x1F, 0xE0, 0x0E, 0xF1, 0x0E, 0xF1]);
    let mut weak_combined_part = a.clone();
    for (x, w) in weak_combined_part.iter_mut().zip([0xFEu8; 8]) {
        *x ^= w;
    }
    let repeated_partner = xor(&a, &[0x5A; 16]);
    let a24 = component("a24", 24);
    secrets.extend([
        weak_des.clone(),
        semi_weak.clone(),
        weak_combined_part.clone(),
        repeated_partner.clone(),
        a24.clone(),
    ]);
    let refusals: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        ("one component", vec![a.clone()], "aes128"),
        ("six components", c.clone(), "aes256"),
        (
            "an all-zero component",
            vec![vec![0; 16], b.clone()],
            "aes128",
        ),
        (
            "a repeated-byte component",
            vec![vec![0x5A; 16], b.clone()],
            "aes128",
        ),
        (
            "a weak DES block in a component",
            vec![weak_des, b.clone()],
            "aes128",
        ),
        (
            "a semi-weak DES block in a component",
            vec![a24.clone(), semi_weak],
            "aes192",
        ),
        ("two equal components", vec![a.clone(), a.clone()], "aes128"),
        (
            "XOR is a repeated byte",
            vec![a.clone(), repeated_partner],
            "aes128",
        ),
        (
            "XOR holds a weak DES key",
            vec![a.clone(), weak_combined_part],
            "aes128",
        ),
        (
            "a component of the wrong length",
            vec![a.clone(), a24.clone()],
            "aes128",
        ),
        (
            "components for another type",
            vec![a.clone(), b.clone()],
            "aes256",
        ),
    ];
    let before = list();
    for (what, parts, kind) in &refusals {
        let (code, out, err) = import("ceremony-refused", parts, kind, &[]);
        outputs.push_str(&out);
        outputs.push_str(&err);
        assert_ne!(code, 0, "{what}: accepted:\n{out}{err}");
        assert!(err.starts_with("divkey: error: "), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(!out.contains("imported"), "{what}: {out}");
        assert_eq!(list(), before, "{what}: a refused import left a key");
    }
    // The same through a file, and a file that is not hex.
    let zero = token.path().join("zero.hex");
    write_private(&zero, &"00".repeat(16));
    let junk = token.path().join("junk.hex");
    write_private(&junk, "this is not hex at all, not even close!!");
    for file in [&zero, &junk] {
        let (code, out, err) = run_divkey(
            &token,
            &[
                "keys",
                "import",
                "--config",
                cfg,
                "--label",
                "ceremony-refused",
                "--type",
                "aes128",
                "--component-file",
                fa.to_str().unwrap(),
                "--component-file",
                file.to_str().unwrap(),
            ],
        );
        outputs.push_str(&out);
        outputs.push_str(&err);
        assert_ne!(code, 0, "{}: {out}{err}", file.display());
        assert_eq!(list(), before);
    }

    // Optional: the no-echo prompt, driven through a pseudo-terminal by script(1).
    if let Some((out, p1, p2)) = prompt_import(&token, cfg) {
        secrets.extend([p1.clone(), p2.clone(), xor(&p1, &p2)]);
        outputs.push_str(&out);
        let kcv = soft_kcv(&xor(&p1, &p2), false);
        assert!(out.contains(&format!("combined kcv={kcv}")), "{out}");
        assert!(out.contains("imported label=ceremony-prompt"), "{out}");
    }

    // No component, nor any combined key, in any output, the audit trail or the store.
    let (code, trail, err) = run_divkey(&token, &["audit", "export", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(trail.contains("master_key.import"), "{trail}");
    let text = format!("{outputs}{trail}").to_lowercase();
    let mut store = Vec::new();
    for entry in std::fs::read_dir(token.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("divkey.db"))
        {
            store.extend(std::fs::read(&p).unwrap());
        }
    }
    assert!(!store.is_empty());
    let store_lower = String::from_utf8_lossy(&store).to_lowercase();
    for s in &secrets {
        let h = hex::encode(s);
        assert!(
            !text.contains(&h),
            "key material in an output or the audit trail"
        );
        assert!(!store_lower.contains(&h), "key material in the store");
        assert!(
            !store.windows(s.len()).any(|w| w == s.as_slice()),
            "raw key material in the store"
        );
        // Half a component is already too much.
        assert!(
            !text.contains(&h[..h.len() / 2]),
            "part of a component in an output"
        );
    }
}

/// Imports two components typed at the no-echo prompt, through `script` (util-linux), if it
/// is installed. Returns the terminal transcript and the components.
fn prompt_import(token: &TestToken, cfg: &str) -> Option<(String, Vec<u8>, Vec<u8>)> {
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        eprintln!("note: script(1) not found; prompt mode not tested");
        return None;
    }
    let p1 = component("prompt 1", 16);
    let p2 = component("prompt 2", 16);
    // Typed slowly, after the prompt has turned echo off.
    let shell = format!(
        "(sleep 2; printf '%s\\n' {h1}; sleep 2; printf '%s\\n' {h2}; sleep 6) | \
         script -qec \"'{bin}' keys import --config '{cfg}' --label ceremony-prompt --type aes128 --prompt 2\" /dev/null",
        h1 = hex::encode(&p1),
        h2 = hex::encode(&p2),
        bin = divkey_bin(),
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&shell)
        .env("SOFTHSM2_CONF", &token.conf)
        .output()
        .expect("sh");
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "prompt import:\n{transcript}");
    assert!(transcript.contains("component 1"), "{transcript}");
    assert!(transcript.contains("not shown"), "{transcript}");
    Some((transcript, p1, p2))
}

/// A retired card comes back only through a new request that binds it: not by setting it
/// Active again through a request that bound it before, nor by completing the enrollment
/// during which it was retired. Every violation is collected, then reported together.
#[test]
fn retired_card_is_not_reactivated_without_a_new_enrollment() {
    let env = Env::start();
    let mut problems: Vec<String> = Vec::new();

    // Retired within a Retire request, then PUT Active through the old requests.
    let card = new_card();
    let (enroll, scid) = env.enroll(T_DES, &card);
    let key = key_bytes(&env.key(AGENT, &enroll, &scid, &card));
    env.complete(&enroll);
    let retire = env.on_card("Retire", &scid);
    let r = env.put_card(AGENT, &retire, &scid, "Retired");
    assert_eq!(r.status, 200, "{}", r.body);
    env.complete(&retire);
    for (what, reqid) in [
        ("the completed Retire request", &retire),
        ("the completed Enroll request", &enroll),
    ] {
        let r = env.put_card(AGENT, reqid, &scid, "Active");
        let status = env.card(&scid)["Status"].clone();
        if r.status < 400 || status != 6 {
            problems.push(format!(
                "PUT {{\"status\":\"Active\"}} on a retired card through {what}: HTTP {}, card status now {status}",
                r.status
            ));
            // Put it back, to look at the next way in.
            let retire = env.on_card("Retire", &scid);
            assert_eq!(env.put_card(AGENT, &retire, &scid, "Retired").status, 200);
            env.complete(&retire);
        }
    }
    // Once made Active that way, an Unblock gets the key.
    let r = env.put_card(AGENT, &retire, &scid, "Active");
    if r.status == 200 {
        let r = env.post(
            AGENT,
            "/requests",
            json!({"type": "Unblock", "smartcard": scid}),
        );
        if r.status == 201 {
            let unblock = r.created_id();
            let r = env.key(AGENT, &unblock, &scid, &card);
            if r.status == 200 && key_bytes(&r) == key {
                problems.push(
                    "after that PUT Active, an Unblock request on the retired card got its key (200)"
                        .to_owned(),
                );
            }
        }
    }

    // Retired during its enrollment: completing that enrollment does not revive it.
    let card = new_card();
    let (enroll, scid) = env.enroll(T_DES, &card);
    let r = env.put_card(AGENT, &enroll, &scid, "Retired");
    assert_eq!(r.status, 200, "{}", r.body);
    error_code(&env.key(AGENT, &enroll, &scid, &card), 403);
    let r = env.put(
        AGENT,
        &format!("/requests/{enroll}"),
        json!({"status": "Completed"}),
    );
    let status = env.card(&scid)["Status"].clone();
    if status != 6 {
        problems.push(format!(
            "a card retired (PUT) during its Enroll request: completing that request (HTTP {}) set the card status to {status}",
            r.status
        ));
    }

    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

//! The CM HTTP API end to end: a real `divkey serve` process on a throw-away SoftHSM2 token,
//! driven over HTTP, with every released key checked against the independent software
//! implementation in `common` (SPEC section 2: wire contract and the diversifiedkey decision).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

/// The master key imported into the token (the AES-256 key of NIST SP 800-38B).
const MASTER_HEX: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
const AES_LABEL: &str = "divkey api test label";
const SYSTEM_ID: &str = "0011223344556677";
const DES3_DEFAULT: &str = "0102030405060708a1a2a3a4a5a6a7a8b1b2b3b4b5b6b7b8";

/// (a) sp800-108-cmac des3 windows, no approval.
const T_OPEN: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c01";
/// (b) the same, one approval.
const T_APPROVE: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c02";
/// (c) diversify_admin_key = false.
const T_PLAIN: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c03";
/// (d) an10922-aes256 with a system id.
const T_AN10922: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c04";
/// (e) sp800-108-cmac aes128, rfc4122 card id bytes, own label.
const T_AES: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c05";
/// (b2) two approvals, by distinct approvers.
const T_TWO: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c07";
/// (f) a template on which no caller holds a permission.
const T_HIDDEN: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c06";

/// request, approve, bind and read_key on a to e and b2.
const AGENT: &str = "agent-bearer-8c1f0e5b2d7a4c3e9f6b1a0d5e2c7f49";
/// request, approve and bind on a and b: no read_key.
const NO_KEY: &str = "nokey-bearer-3e7a1c9d5b0f4e2a8c6d1b3f7e9a0c52";
/// approve on b and b2 only.
const APPROVER: &str = "approver-bearer-1b9e5d3a7c0f2e4d6a8b0c1e3f5a7d93";
/// no permissions at all.
const NOBODY: &str = "nobody-bearer-5a2c8e0b4d6f1a3c5e7b9d0f2a4c6e81";
/// request, bind and read_key on d only.
const READER_D: &str = "readerd-bearer-9f3b7d1e5a0c2f4b6d8e0a1c3e5b7d26";
/// Presented but configured for nobody.
const WRONG: &str = "wrong-bearer-0d4f8b2e6a1c5e9b3d7f0a2c4e6b8d17";

const ALL_TOKENS: [&str; 6] = [AGENT, NO_KEY, APPROVER, NOBODY, READER_D, WRONG];

/// The card ID of MIM's documentation.
const MIM_CARD: &str = "bc88f13f-83ba-4037-8262-46eba1291c6e";

fn config_rest() -> String {
    format!(
        r#"
[[profile_template]]
uuid = "{T_OPEN}"
name = "Open enrollment"
description = "des3, no approval"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "des3"
card_id_bytes = "windows"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "{DES3_DEFAULT}"

[[profile_template]]
uuid = "{T_APPROVE}"
name = "Approved enrollment"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "des3"
card_id_bytes = "windows"
master_key = "admin-master"
approvals_required = 1
default_admin_key_hex = "{DES3_DEFAULT}"

[[profile_template]]
uuid = "{T_PLAIN}"
name = "Default admin key"
diversify_admin_key = false
key_type = "des3"
approvals_required = 0
default_admin_key_hex = "{DES3_DEFAULT}"

[[profile_template]]
uuid = "{T_AN10922}"
name = "DESFire AN10922"
diversify_admin_key = true
algorithm = "an10922-aes256"
system_id = "{SYSTEM_ID}"
card_id_bytes = "windows"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "{aes256_default}"

[[profile_template]]
uuid = "{T_AES}"
name = "AES-128 rfc4122"
diversify_admin_key = true
algorithm = "sp800-108-cmac"
key_type = "aes128"
label = "{AES_LABEL}"
card_id_bytes = "rfc4122"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "00112233445566778899aabbccddeeff"

[[profile_template]]
uuid = "{T_TWO}"
name = "Two approvals"
diversify_admin_key = true
key_type = "des3"
master_key = "admin-master"
approvals_required = 2
default_admin_key_hex = "{DES3_DEFAULT}"

[[profile_template]]
uuid = "{T_HIDDEN}"
name = "Hidden"
diversify_admin_key = true
key_type = "des3"
master_key = "admin-master"
approvals_required = 0
default_admin_key_hex = "{DES3_DEFAULT}"

[[caller]]
name = "agent"
token_sha256 = "{agent}"
permissions = {{ "{T_OPEN}" = ["request", "approve", "bind", "read_key"], "{T_APPROVE}" = ["request", "approve", "bind", "read_key"], "{T_PLAIN}" = ["request", "approve", "bind", "read_key"], "{T_AN10922}" = ["request", "approve", "bind", "read_key"], "{T_AES}" = ["request", "approve", "bind", "read_key"], "{T_TWO}" = ["request", "approve", "bind", "read_key"] }}

[[caller]]
name = "no-key"
token_sha256 = "{no_key}"
permissions = {{ "{T_OPEN}" = ["request", "approve", "bind"], "{T_APPROVE}" = ["request", "approve", "bind"] }}

[[caller]]
name = "approver"
token_sha256 = "{approver}"
permissions = {{ "{T_APPROVE}" = ["approve"], "{T_TWO}" = ["approve"] }}

[[caller]]
name = "nobody"
token_sha256 = "{nobody}"

[[caller]]
name = "reader-d"
token_sha256 = "{reader_d}"
permissions = {{ "{T_AN10922}" = ["request", "bind", "read_key"] }}
"#,
        aes256_default = "00".repeat(32),
        agent = sha256_hex(AGENT),
        no_key = sha256_hex(NO_KEY),
        approver = sha256_hex(APPROVER),
        nobody = sha256_hex(NOBODY),
        reader_d = sha256_hex(READER_D),
    )
}

// ---------------------------------------------------------------------------------------
// Expected keys, from the software implementation.

fn master() -> Vec<u8> {
    hex::decode(MASTER_HEX).unwrap()
}

fn want_des3(card: &str) -> Vec<u8> {
    soft_admin_des3(MASTER_HEX, card)
}

fn want_an10922(card: &str) -> Vec<u8> {
    let mut m = card_id_bytes(card, "windows").to_vec();
    m.extend(hex::decode(SYSTEM_ID).unwrap());
    soft_an10922(&master(), &m)
}

fn want_aes(card: &str) -> Vec<u8> {
    soft_sp800_108(
        &master(),
        AES_LABEL,
        "aes128",
        &card_id_bytes(card, "rfc4122"),
    )
}

// ---------------------------------------------------------------------------------------
// The server and HTTP helpers.

/// A running server on its own token. Fields drop in order: the server before the token.
struct Env {
    server: Server,
    http: ureq::Agent,
    token: TestToken,
}

impl Env {
    fn start() -> Self {
        let token = TestToken::new();
        let config = token.path().join("divkey.toml");
        std::fs::write(&config, config_text(&token, "127.0.0.1:0", &config_rest())).unwrap();
        token.import_key(&config, "admin-master", MASTER_HEX);
        let server = Server::start(&token, &config);
        Self {
            server,
            http: agent(),
            token,
        }
    }

    /// Stops the server and returns its whole log.
    fn stop(self) -> String {
        let Self { server, token, .. } = self;
        let log = server.stop();
        drop(token);
        log
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
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

    /// `GET url` with exactly these headers.
    fn raw(&self, method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
        let mut req = self.http.request(method, url);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match result {
            Ok(r) => to_resp(r),
            Err(ureq::Error::Status(_, r)) => to_resp(r),
            Err(e) => panic!("{method} {url}: {e}"),
        }
    }

    fn create(&self, tok: &str, template: &str) -> Resp {
        self.post(
            tok,
            "/requests",
            json!({"type": "Enroll", "profiletemplateuuid": template}),
        )
    }

    fn set_status(&self, tok: &str, reqid: &str, status: &str) -> Resp {
        self.put(
            tok,
            &format!("/requests/{reqid}"),
            json!({ "status": status }),
        )
    }

    fn bind(&self, tok: &str, reqid: &str, card: &str) -> Resp {
        self.post(
            tok,
            "/smartcards",
            json!({"requestid": reqid, "cardid": card}),
        )
    }

    fn request(&self, reqid: &str) -> Value {
        let r = self.get(AGENT, &format!("/requests/{reqid}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    /// An approved request (approved by APPROVER when the template needs it).
    fn approved_request(&self, template: &str) -> String {
        let id = self.create(AGENT, template).created_id();
        if self.request(&id)["Status"] == 16 {
            let r = self.set_status(APPROVER, &id, "Approved");
            assert_eq!(r.status, 200, "{}", r.body);
        }
        assert_eq!(self.request(&id)["Status"], 3);
        id
    }

    /// A request with `card` bound: (request id, smart card id).
    fn enroll(&self, template: &str, card: &str) -> (String, String) {
        let reqid = self.approved_request(template);
        let scid = self.bind(AGENT, &reqid, card).created_id();
        (reqid, scid)
    }

    fn key_path(reqid: &str, scid: &str, query: &str) -> String {
        format!("/requests/{reqid}/smartcards/{scid}/diversifiedkey?{query}")
    }

    fn key(&self, tok: &str, reqid: &str, scid: &str, query: &str) -> Resp {
        self.get(tok, &Self::key_path(reqid, scid, query))
    }

    /// The released key for the bound card, fetched by AGENT.
    fn key_for(&self, reqid: &str, scid: &str, card: &str) -> Vec<u8> {
        key_bytes(&self.key(AGENT, reqid, scid, &format!("cardid={card}")))
    }
}

fn uuids(v: &Value) -> HashSet<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|t| t["Uuid"].as_str().unwrap().to_owned())
        .collect()
}

fn set(items: &[&str]) -> HashSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------
// 1. The whole enrollment flow.

#[test]
fn full_enrollment_flow() {
    let env = Env::start();

    // Templates: only those the caller holds a permission on.
    let r = env.get(AGENT, "/profiletemplates");
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json();
    assert_eq!(
        uuids(&list),
        set(&[T_OPEN, T_APPROVE, T_PLAIN, T_AN10922, T_AES, T_TWO])
    );
    let open = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["Uuid"] == T_OPEN)
        .unwrap();
    assert_eq!(open["Name"], "Open enrollment");
    assert_eq!(open["Description"], "des3, no approval");
    assert_eq!(open["IsSmartcardProfileTemplate"], true);
    assert_eq!(open["IsVirtualSmartcardProfileTemplate"], false);
    assert_eq!(
        uuids(&env.get(APPROVER, "/profiletemplates").json()),
        set(&[T_APPROVE, T_TWO])
    );
    assert_eq!(
        uuids(&env.get(NO_KEY, "/profiletemplates").json()),
        set(&[T_OPEN, T_APPROVE])
    );
    assert_eq!(
        uuids(&env.get(READER_D, "/profiletemplates").json()),
        set(&[T_AN10922])
    );
    let none = env.get(NOBODY, "/profiletemplates");
    assert_eq!(none.status, 200);
    assert_eq!(none.json(), json!([]));

    // Smart card configuration of template (a).
    let r = env.get(
        AGENT,
        &format!("/profiletemplates/{T_OPEN}/configuration/smartcards"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let c = r.json();
    assert_eq!(c["DiversifyAdminKey"], true);
    assert_eq!(c["DefaultAdminKeyHex"], DES3_DEFAULT.to_uppercase());
    assert_eq!(c["AdminKeyType"], "des3");
    assert_eq!(c["AdminKeyAlgorithm"], "sp800-108-cmac");
    assert_eq!(c["UserPinOption"], "UserSets");

    // A request on (a) is Approved at once.
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Enroll", "profiletemplateuuid": T_OPEN, "comment": "first card", "priority": 5}),
    );
    let reqid = r.created_id();
    assert_eq!(
        serde_json::from_str::<String>(&r.body).unwrap(),
        format!("api/v1.0/requests/{reqid}")
    );
    assert_eq!(
        r.header("location"),
        Some(format!("/CertificateManagement/api/v1.0/requests/{reqid}").as_str())
    );
    let q = env.request(&reqid);
    assert_eq!(q["Uuid"], reqid.as_str());
    assert_eq!(q["RequestType"], 1);
    assert_eq!(q["Status"], 3);
    assert_eq!(q["ProfileTemplateUuid"], T_OPEN);
    assert_eq!(q["NewSmartcardUuid"], Value::Null);
    assert_eq!(q["OldSmartcardUuid"], Value::Null);
    assert_eq!(q["Comment"], "first card");
    assert_eq!(q["Priority"], 5);
    assert!(q["Submitted"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(q["Completed"], Value::Null);
    let originator = q["OriginatorUserUuid"].as_str().expect("originator");
    assert!(uuid::Uuid::parse_str(originator).is_ok());

    // A request on (b) is Pending until approved.
    let reqb = env.create(AGENT, T_APPROVE).created_id();
    let qb = env.request(&reqb);
    assert_eq!(qb["Status"], 16);
    assert_eq!(
        qb["OriginatorUserUuid"], originator,
        "same caller, same uuid"
    );
    let r = env.set_status(APPROVER, &reqb, "Approved");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 3);
    assert_eq!(env.request(&reqb)["Status"], 3);

    // Bind a card to the request on (a): the request becomes Executing.
    let r = env.post(
        AGENT,
        "/smartcards",
        json!({"requestid": reqid, "cardid": MIM_CARD, "atr": "3B 8F 80 01"}),
    );
    let scid = r.created_id();
    assert_eq!(
        serde_json::from_str::<String>(&r.body).unwrap(),
        format!("api/v1.0/smartcards/{scid}")
    );
    let q = env.request(&reqid);
    assert_eq!(q["Status"], 18);
    assert_eq!(q["NewSmartcardUuid"], scid.as_str());

    let r = env.get(AGENT, &format!("/smartcards/{scid}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let card = r.json();
    assert_eq!(card["Uuid"], scid.as_str());
    assert_eq!(card["Status"], 2, "Assigned");
    assert_eq!(card["ProfileTemplateUuid"], T_OPEN);
    let serial = card["SerialNumber"].as_str().unwrap();
    assert_eq!(
        serial.trim_matches(|c| c == '{' || c == '}').to_lowercase(),
        MIM_CARD
    );
    assert_eq!(card["Atr"], "3B8F8001");
    assert_eq!(card["AdminKeyVersion"], 1);

    let r = env.get(
        AGENT,
        &format!("/smartcards?cardid={{{}}}", MIM_CARD.to_uppercase()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(uuids(&r.json()), set(&[&scid]));
    let r = env.get(AGENT, &format!("/smartcards?cardid={}", new_card()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!([]));
    // The card is not visible to a caller without permissions on its template.
    let r = env.get(READER_D, &format!("/smartcards?cardid={MIM_CARD}"));
    assert_eq!(r.json(), json!([]));

    // The key.
    let key = env.key_for(&reqid, &scid, MIM_CARD);
    assert_eq!(key.len(), 24);
    assert!(has_odd_parity(&key), "{}", hex::encode(&key));
    assert_eq!(key, want_des3(MIM_CARD));
    for _ in 0..3 {
        assert_eq!(env.key_for(&reqid, &scid, MIM_CARD), key, "repeated call");
    }

    // Another card on another request gets another key.
    let card2 = new_card();
    let scid2 = env.bind(AGENT, &reqb, &card2).created_id();
    assert_ne!(scid2, scid);
    let key2 = env.key_for(&reqb, &scid2, &card2);
    assert_eq!(key2, want_des3(&card2));
    assert!(has_odd_parity(&key2));
    assert_ne!(key2, key);

    // Completed: the request ends, the card is Active, the key is no longer released.
    let r = env.set_status(AGENT, &reqid, "Completed");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 8);
    let q = env.request(&reqid);
    assert_eq!(q["Status"], 8);
    assert!(q["Completed"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(
        env.get(AGENT, &format!("/smartcards/{scid}")).json()["Status"],
        3,
        "Active"
    );
    let r = env.key(AGENT, &reqid, &scid, &format!("cardid={MIM_CARD}"));
    assert_eq!(error_code(&r, 403), "RequestNotActive");
    // The other request is unaffected.
    assert_eq!(env.key_for(&reqb, &scid2, &card2), key2);
}

// ---------------------------------------------------------------------------------------
// 2. AN10922 and AES / rfc4122 templates.

#[test]
fn an10922_and_aes_rfc4122_keys() {
    let env = Env::start();

    let card_d = new_card();
    let (rd, sd) = env.enroll(T_AN10922, &card_d);
    let r = env.key(AGENT, &rd, &sd, &format!("cardid={card_d}"));
    let kd = key_bytes(&r);
    assert_eq!(kd.len(), 32);
    assert_eq!(kd, want_an10922(&card_d));
    // A caller holding read_key on this template only gets the same key.
    let r = env.key(READER_D, &rd, &sd, &format!("cardid={card_d}"));
    assert_eq!(key_bytes(&r), kd);
    let c = env
        .get(
            AGENT,
            &format!("/profiletemplates/{T_AN10922}/configuration/smartcards"),
        )
        .json();
    assert_eq!(c["AdminKeyType"], "aes256");
    assert_eq!(c["AdminKeyAlgorithm"], "an10922-aes256");
    assert_eq!(c["DiversifyAdminKey"], true);
    assert_eq!(c["DefaultAdminKeyHex"], "00".repeat(32));
    assert_eq!(
        env.get(AGENT, &format!("/smartcards/{sd}")).json()["AdminKeyVersion"],
        1
    );

    // The MIM card under the AES template: rfc4122 bytes, its own label, 16 bytes padded base64.
    let (re, se) = env.enroll(T_AES, MIM_CARD);
    let r = env.key(AGENT, &re, &se, &format!("cardid={MIM_CARD}"));
    let s: String = serde_json::from_str(&r.body).unwrap();
    assert!(s.ends_with("=="), "{s:?}: 16 bytes end in padding");
    let ke = key_bytes(&r);
    assert_eq!(ke.len(), 16);
    assert_eq!(ke, want_aes(MIM_CARD));
    // Guard against a vacuous layout check: the windows layout gives another key.
    assert_ne!(
        ke,
        soft_sp800_108(
            &master(),
            AES_LABEL,
            "aes128",
            &card_id_bytes(MIM_CARD, "windows")
        )
    );
    assert_ne!(
        ke,
        soft_sp800_108(
            &master(),
            DEFAULT_LABEL,
            "aes128",
            &card_id_bytes(MIM_CARD, "rfc4122")
        )
    );
    let c = env
        .get(
            AGENT,
            &format!("/profiletemplates/{T_AES}/configuration/smartcards"),
        )
        .json();
    assert_eq!(c["AdminKeyType"], "aes128");
    assert_eq!(c["AdminKeyAlgorithm"], "sp800-108-cmac");
    assert_eq!(c["DefaultAdminKeyHex"], "00112233445566778899AABBCCDDEEFF");

    // A second AES card differs; the AN10922 key is stable.
    let card_e2 = new_card();
    let (re2, se2) = env.enroll(T_AES, &card_e2);
    let ke2 = env.key_for(&re2, &se2, &card_e2);
    assert_eq!(ke2, want_aes(&card_e2));
    assert_ne!(ke2, ke);
    assert_eq!(env.key_for(&rd, &sd, &card_d), kd);
}

// ---------------------------------------------------------------------------------------
// 3. The diversifiedkey decision, in order.

#[test]
fn diversifiedkey_decision_order() {
    let env = Env::start();
    let mut codes: HashSet<String> = HashSet::new();

    let c1 = new_card();
    let c2 = new_card();
    let (ra1, sa1) = env.enroll(T_OPEN, &c1);
    let (ra2, sa2) = env.enroll(T_OPEN, &c2);
    let q1 = format!("cardid={c1}");
    let good = env.key(AGENT, &ra1, &sa1, &q1);
    assert_eq!(key_bytes(&good), want_des3(&c1));

    // Pending (approvals_required = 1, not yet approved).
    let pending = env.create(AGENT, T_APPROVE).created_id();
    assert_eq!(env.request(&pending)["Status"], 16);
    // Completed.
    let c3 = new_card();
    let (done, sdone) = env.enroll(T_OPEN, &c3);
    assert_eq!(env.set_status(AGENT, &done, "Completed").status, 200);
    // Canceled (after a card was bound).
    let c4 = new_card();
    let (canceled, scan) = env.enroll(T_OPEN, &c4);
    let r = env.set_status(AGENT, &canceled, "Canceled");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 17);
    // Denied.
    let denied = env.create(AGENT, T_APPROVE).created_id();
    let r = env.set_status(APPROVER, &denied, "Denied");
    assert_eq!(r.json()["Status"], 4);
    // Abandoned (Failed).
    let c7 = new_card();
    let (abandoned, sab) = env.enroll(T_OPEN, &c7);
    let r = env.set_status(AGENT, &abandoned, "Abandoned");
    assert_eq!(r.json()["Status"], 9);
    // A template that does not diversify.
    let c5 = new_card();
    let (rplain, splain) = env.enroll(T_PLAIN, &c5);
    // An AN10922 request, for the reader of template (d).
    let c6 = new_card();
    let (rd, sd) = env.enroll(T_AN10922, &c6);

    let unknown = new_card();
    let key_url = env.url(&Env::key_path(&ra1, &sa1, &q1));

    // 1. Credentials: 401, before anything else.
    let r = call(&env.http, "GET", &key_url, None, None);
    codes.insert(error_code(&r, 401));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    for auth in [
        format!("Bearer {WRONG}"),
        format!("Basic {}", b64(format!("agent:{AGENT}").as_bytes())),
        format!("Basic {AGENT}"),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        AGENT.to_owned(),
        format!("Bearer {AGENT}x"),
    ] {
        let r = env.raw("GET", &key_url, &[("Authorization", &auth)], None);
        assert_eq!(error_code(&r, 401), "Unauthorized", "Authorization: {auth}");
    }
    // The scheme is case-insensitive.
    let r = env.raw(
        "GET",
        &key_url,
        &[("Authorization", &format!("bearer {AGENT}"))],
        None,
    );
    assert_eq!(key_bytes(&r), want_des3(&c1));
    // No credentials and malformed input: still 401.
    let r = call(
        &env.http,
        "GET",
        &env.url(&Env::key_path("nope", &sa1, "cardid=zz")),
        None,
        None,
    );
    assert_eq!(error_code(&r, 401), "Unauthorized");

    // 1. Malformed reqid, scid, cardid, atr: 400.
    let bad_ids = [
        "not-a-guid".to_owned(),
        "12345".to_owned(),
        ra1[..35].to_owned(),
        format!("{ra1}0"),
        format!("{{{ra1}"),
        format!("{ra1}}}"),
        format!("urn:uuid:{ra1}"),
        ra1.replace('-', "+"),
    ];
    for bad in &bad_ids {
        let r = env.key(AGENT, bad, &sa1, &q1);
        codes.insert(error_code(&r, 400));
        assert_eq!(error_code(&r, 400), "BadRequest", "reqid {bad}");
        let bad_sc = bad.replace(&ra1, &sa1);
        let r = env.key(AGENT, &ra1, &bad_sc, &q1);
        assert_eq!(error_code(&r, 400), "BadRequest", "scid {bad_sc}");
    }
    let bad_cardids = [
        String::new(),
        "cardid=".to_owned(),
        "atr=3B8F8001".to_owned(),
        format!("cardid=z{}", &c1[1..]),
        format!("cardid={}", &c1[..35]),
        format!("cardid={c1}0"),
        format!("cardid={}", c1.replace('-', "")[..31].to_owned()),
        format!("cardid=%7B{c1}"),
        format!("cardid={c1}%7D"),
        format!("cardid=urn:uuid:{c1}"),
        format!("cardid=%20{c1}"),
        format!("cardid={c1}&cardid={c1}"),
    ];
    for q in &bad_cardids {
        let r = env.key(AGENT, &ra1, &sa1, q);
        assert_eq!(error_code(&r, 400), "BadRequest", "query {q}");
    }
    for atr in [
        "3B8".to_owned(),
        "3B".to_owned(),
        "00".repeat(34),
        "zz11".to_owned(),
        "3B8F80G1".to_owned(),
    ] {
        let r = env.key(AGENT, &ra1, &sa1, &format!("{q1}&atr={atr}"));
        assert_eq!(error_code(&r, 400), "BadRequest", "atr {atr}");
    }
    // A 33-byte ATR is fine.
    let r = env.key(AGENT, &ra1, &sa1, &format!("{q1}&atr={}", "3B".repeat(33)));
    assert_eq!(key_bytes(&r), want_des3(&c1));
    // 400 comes before the permission check and before 404.
    let r = env.key(NO_KEY, &ra1, &sa1, "cardid=nope");
    assert_eq!(error_code(&r, 400), "BadRequest");
    let r = env.key(NOBODY, "nope", &sa1, &q1);
    assert_eq!(error_code(&r, 400), "BadRequest");
    let r = env.key(AGENT, &new_card(), &sa1, "cardid=nope");
    assert_eq!(error_code(&r, 400), "BadRequest");

    // 2. No key-release permission on the request's template: 403.
    for tok in [NO_KEY, NOBODY, APPROVER, READER_D] {
        let r = env.key(tok, &ra1, &sa1, &q1);
        let code = error_code(&r, 403);
        assert_eq!(code, "PermissionDenied", "caller {tok}");
        codes.insert(code);
    }
    // Permission before 404: an unknown card on a request the caller may not read keys of.
    let r = env.key(NO_KEY, &ra1, &unknown, &q1);
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    // ... and callers who may read keys nowhere learn nothing about unknown requests.
    let r = env.key(NO_KEY, &unknown, &sa1, &q1);
    assert_eq!(error_code(&r, 403), "PermissionDenied");

    // 3. Unknown request or smart card: 404.
    let r = env.key(AGENT, &unknown, &sa1, &q1);
    let code = error_code(&r, 404);
    assert_eq!(code, "NotFound");
    codes.insert(code);
    let r = env.key(READER_D, &unknown, &sd, &format!("cardid={c6}"));
    assert_eq!(error_code(&r, 404), "NotFound");
    let r = env.key(AGENT, &ra1, &unknown, &q1);
    assert_eq!(error_code(&r, 404), "NotFound");
    // 404 before the request's state.
    let r = env.key(AGENT, &pending, &unknown, &q1);
    assert_eq!(error_code(&r, 404), "NotFound");
    let r = env.key(AGENT, &done, &unknown, &format!("cardid={c3}"));
    assert_eq!(error_code(&r, 404), "NotFound");

    // 4. Request state, binding, card ID: 403, the code says which.
    let state_cases = [
        (&pending, &sa1, &c1, "pending"),
        (&done, &sdone, &c3, "completed"),
        (&canceled, &scan, &c4, "canceled"),
        (&denied, &sa1, &c1, "denied"),
        (&abandoned, &sab, &c7, "abandoned"),
        // The state comes first: a completed request with a foreign card and card ID.
        (&done, &sa1, &c2, "completed, foreign card"),
    ];
    for (reqid, scid, card, what) in state_cases {
        let r = env.key(AGENT, reqid, scid, &format!("cardid={card}"));
        let code = error_code(&r, 403);
        assert_eq!(code, "RequestNotActive", "{what}: {}", r.body);
        codes.insert(code);
    }
    // The card of request 1 asked for under request 2.
    let r = env.key(AGENT, &ra2, &sa1, &q1);
    let code = error_code(&r, 403);
    assert_eq!(code, "CardNotBound");
    codes.insert(code);
    let r = env.key(AGENT, &ra2, &sa1, &format!("cardid={c2}"));
    assert_eq!(error_code(&r, 403), "CardNotBound");
    // The bound card, but another card ID.
    let r = env.key(AGENT, &ra1, &sa1, &format!("cardid={c2}"));
    let code = error_code(&r, 403);
    assert_eq!(code, "CardIdMismatch");
    codes.insert(code);
    let r = env.key(AGENT, &ra1, &sa1, &format!("cardid={unknown}"));
    assert_eq!(error_code(&r, 403), "CardIdMismatch");
    let r = env.key(AGENT, &ra2, &sa2, &q1);
    assert_eq!(error_code(&r, 403), "CardIdMismatch");

    // 5. A template that does not diversify: 204, no body.
    let r = env.key(AGENT, &rplain, &splain, &format!("cardid={c5}"));
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r.body.is_empty(), "{:?}", r.body);
    let c = env
        .get(
            AGENT,
            &format!("/profiletemplates/{T_PLAIN}/configuration/smartcards"),
        )
        .json();
    assert_eq!(c["DiversifyAdminKey"], false);
    assert_eq!(c["DefaultAdminKeyHex"], DES3_DEFAULT.to_uppercase());
    assert_eq!(
        env.get(AGENT, &format!("/smartcards/{splain}")).json()["AdminKeyVersion"],
        Value::Null
    );
    // Even 204 needs the card ID to match.
    let r = env.key(AGENT, &rplain, &splain, &q1);
    assert_eq!(error_code(&r, 403), "CardIdMismatch");

    // 6. And after all the refusals, the right call still gets the right keys.
    assert_eq!(env.key_for(&ra1, &sa1, &c1), want_des3(&c1));
    assert_eq!(env.key_for(&ra2, &sa2, &c2), want_des3(&c2));
    let r = env.key(READER_D, &rd, &sd, &format!("cardid={c6}"));
    assert_eq!(key_bytes(&r), want_an10922(&c6));

    // The error codes tell the cases apart.
    assert_eq!(
        codes,
        set(&[
            "Unauthorized",
            "BadRequest",
            "PermissionDenied",
            "NotFound",
            "RequestNotActive",
            "CardNotBound",
            "CardIdMismatch",
        ])
    );
}

// ---------------------------------------------------------------------------------------
// 4. Prefix case, card ID forms, ATR forms.

#[test]
fn prefix_case_and_input_forms() {
    let env = Env::start();
    let (reqid, scid) = env.enroll(T_OPEN, MIM_CARD);
    let want = want_des3(MIM_CARD);
    assert_eq!(env.key_for(&reqid, &scid, MIM_CARD), want);

    // The prefix and the fixed segments in any case; IDs in any GUID form.
    let host = format!("http://{}", env.server.addr);
    let paths = [
        format!(
            "/certificatemanagement/api/v1.0/requests/{reqid}/smartcards/{scid}/diversifiedkey"
        ),
        format!(
            "/CERTIFICATEMANAGEMENT/API/V1.0/requests/{reqid}/smartcards/{scid}/diversifiedkey"
        ),
        format!(
            "/CertificateManagement/api/v1.0/Requests/{reqid}/SmartCards/{scid}/DiversifiedKey"
        ),
        format!(
            "/CertificateManagement/api/v1.0/requests/{}/smartcards/{}/diversifiedkey",
            reqid.to_uppercase(),
            scid.replace('-', "")
        ),
        format!(
            "/certificatemanagement/api/v1.0/requests/%7B{reqid}%7D/smartcards/%7b{scid}%7d/diversifiedkey"
        ),
        format!(
            "/CertificateManagement/api/v1.0/requests/{reqid}/smartcards/{scid}/diversifiedkey/"
        ),
    ];
    for path in &paths {
        let r = env.raw(
            "GET",
            &format!("{host}{path}?cardid={MIM_CARD}"),
            &[("Authorization", &format!("Bearer {AGENT}"))],
            None,
        );
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(key_bytes(&r), want, "{path}");
    }

    // The card ID in every GUID form, percent-encoded or not.
    let upper = MIM_CARD.to_uppercase();
    let bare = MIM_CARD.replace('-', "");
    let forms = [
        format!("cardid={{{upper}}}"),
        format!("cardid={upper}"),
        format!("cardid={bare}"),
        format!("cardid={}", bare.to_uppercase()),
        format!("cardid={{{bare}}}"),
        format!("cardid=%7B{upper}%7D"),
        format!("cardid=%7b{MIM_CARD}%7d"),
        format!("cardid=%7B{bare}%7D"),
        "cardid=%62%63%38%38%66%31%33%66-83ba-4037-8262-46eba1291c6e".to_owned(),
        "cardid=BC88f13f-83Ba-4037-8262-46EBA1291c6e".to_owned(),
        format!("CardId={MIM_CARD}"),
        format!("CARDID={MIM_CARD}"),
    ];
    for q in &forms {
        let r = env.key(AGENT, &reqid, &scid, q);
        assert_eq!(r.status, 200, "{q}: {}", r.body);
        assert_eq!(key_bytes(&r), want, "{q}");
    }

    // A valid ATR, with spaces or colons, any case.
    let atr = "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A";
    let atrs = [
        atr.replace(' ', "%20"),
        atr.replace(' ', "+"),
        atr.replace(' ', ":"),
        atr.replace(' ', "%3A"),
        atr.replace(' ', "").to_lowercase(),
        "3b:8f".to_owned(),
    ];
    for a in &atrs {
        let r = env.key(AGENT, &reqid, &scid, &format!("cardid={MIM_CARD}&atr={a}"));
        assert_eq!(r.status, 200, "atr {a}: {}", r.body);
        assert_eq!(key_bytes(&r), want, "atr {a}");
    }

    // Binding with an upper-case braced card ID stores the canonical form; every form reaches it.
    let card = new_card();
    let reqid2 = env.approved_request(T_OPEN);
    let r = env.post(
        AGENT,
        "/SmartCards",
        json!({"RequestId": format!("{{{}}}", reqid2.to_uppercase()), "CardId": format!("{{{}}}", card.to_uppercase()), "Atr": "3b:8f:80:01"}),
    );
    let scid2 = r.created_id();
    let c = env.get(AGENT, &format!("/smartcards/{scid2}")).json();
    assert_eq!(
        c["SerialNumber"]
            .as_str()
            .unwrap()
            .trim_matches(|c| c == '{' || c == '}')
            .to_lowercase(),
        card
    );
    assert_eq!(c["Atr"], "3B8F8001");
    let r = env.get(
        AGENT,
        &format!("/smartcards?cardid={}", card.replace('-', "")),
    );
    assert_eq!(uuids(&r.json()), set(&[&scid2]));
    assert_eq!(env.key_for(&reqid2, &scid2, &card), want_des3(&card));
    assert_eq!(
        key_bytes(&env.key(
            AGENT,
            &reqid2,
            &scid2,
            &format!("cardid=%7B{}%7D", card.to_uppercase())
        )),
        want_des3(&card)
    );

    // Other endpoints under the lower-case prefix.
    let r = env.raw(
        "GET",
        &format!("{host}/certificatemanagement/api/v1.0/profiletemplates"),
        &[("Authorization", &format!("Bearer {AGENT}"))],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(uuids(&r.json()).contains(T_OPEN));
    let r = env.raw(
        "GET",
        &format!("{host}/certificatemanagement/api/v1.0/requests/{reqid}"),
        &[("Authorization", &format!("Bearer {AGENT}"))],
        None,
    );
    assert_eq!(r.json()["Uuid"], reqid.as_str());
}

// ---------------------------------------------------------------------------------------
// 5. Concurrency on a freshly started server.

#[test]
fn concurrent_key_requests_on_fresh_server() {
    let env = Env::start();
    // Requests and bindings touch only the store: no key has been derived yet.
    let cards: Vec<(String, String, String)> = (0..8)
        .map(|_| {
            let card = new_card();
            let (reqid, scid) = env.enroll(T_OPEN, &card);
            (card, reqid, scid)
        })
        .collect();
    let n = 64;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (card, reqid, scid) = cards[i % cards.len()].clone();
            let url = env.url(&Env::key_path(&reqid, &scid, &format!("cardid={card}")));
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let http = agent();
                barrier.wait();
                (card, call(&http, "GET", &url, Some(AGENT), None))
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for h in handles {
        let (card, r) = h.join().expect("thread");
        assert_eq!(r.status, 200, "{}", r.body);
        let key = key_bytes(&r);
        assert_eq!(key, want_des3(&card), "card {card}");
        seen.insert(key);
    }
    assert_eq!(seen.len(), cards.len(), "one key per card");
    let log = env.stop();
    assert_eq!(log.matches("admin key released").count(), n, "{log}");
}

// ---------------------------------------------------------------------------------------
// 6. Secrets never reach the log.

#[test]
fn secrets_never_logged() {
    let env = Env::start();
    let mut keys: Vec<Vec<u8>> = Vec::new();

    for _ in 0..3 {
        let card = new_card();
        let (reqid, scid) = env.enroll(T_OPEN, &card);
        let r = env.key(
            AGENT,
            &reqid,
            &scid,
            &format!("cardid={card}&atr=3B:8F:80:01"),
        );
        keys.push(key_bytes(&r));
        assert_eq!(keys.last().unwrap(), &want_des3(&card));
        // Refusals for every caller, so that every token is presented at least once.
        for tok in [NO_KEY, NOBODY, APPROVER, READER_D] {
            assert_eq!(
                env.key(tok, &reqid, &scid, &format!("cardid={card}"))
                    .status,
                403
            );
        }
        let r = env.key(WRONG, &reqid, &scid, &format!("cardid={card}"));
        assert_eq!(r.status, 401);
        let r = env.key(AGENT, &reqid, &scid, &format!("cardid={}", new_card()));
        assert_eq!(r.status, 403);
        assert_eq!(env.set_status(AGENT, &reqid, "Completed").status, 200);
        assert_eq!(
            env.key(AGENT, &reqid, &scid, &format!("cardid={card}"))
                .status,
            403
        );
    }
    let card = new_card();
    let (rd, sd) = env.enroll(T_AN10922, &card);
    keys.push(env.key_for(&rd, &sd, &card));
    let r = env.key(READER_D, &rd, &sd, &format!("cardid={card}"));
    assert_eq!(key_bytes(&r), want_an10922(&card));
    let card = new_card();
    let (re, se) = env.enroll(T_AES, &card);
    keys.push(env.key_for(&re, &se, &card));
    let released = 3 + 2 + 1;
    // Requests by callers that may not make them.
    assert_eq!(env.create(APPROVER, T_APPROVE).status, 403);
    assert_eq!(env.create(NOBODY, T_OPEN).status, 403);

    let log = env.stop();
    assert!(log.contains("listening on"), "{log}");
    assert_eq!(log.matches("admin key released").count(), released, "{log}");

    let mut secrets: Vec<(String, String)> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let engine = &base64::engine::general_purpose::STANDARD_NO_PAD;
        for form in [
            hex::encode(key),
            hex::encode_upper(key),
            b64(key),
            engine.encode(key),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key),
            // Any 8-byte run of the key, in case it is logged in part or split up.
            hex::encode(&key[..8]),
            hex::encode_upper(&key[key.len() - 8..]),
        ] {
            secrets.push((format!("derived key {i}"), form));
        }
    }
    secrets.push(("master key".into(), MASTER_HEX.to_owned()));
    secrets.push(("master key".into(), MASTER_HEX.to_uppercase()));
    secrets.push(("master key".into(), b64(&master())));
    secrets.push(("user PIN".into(), USER_PIN.to_owned()));
    secrets.push(("SO PIN".into(), SO_PIN.to_owned()));
    for tok in ALL_TOKENS {
        secrets.push(("bearer token".into(), tok.to_owned()));
    }
    for (what, s) in &secrets {
        assert!(!log.contains(s.as_str()), "the log contains a {what}: {s}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Requests, approvals and bindings.

#[test]
fn request_rules() {
    let env = Env::start();

    // Malformed requests: 400.
    let bodies = [
        json!({"type": "Bogus", "profiletemplateuuid": T_OPEN}),
        json!({"profiletemplateuuid": T_OPEN}),
        json!({"type": "None", "profiletemplateuuid": T_OPEN}),
        json!({"type": 99, "profiletemplateuuid": T_OPEN}),
        json!({"type": true, "profiletemplateuuid": T_OPEN}),
        json!({"type": "Enroll"}),
        json!({"type": "Enroll", "profiletemplateuuid": "nope"}),
        json!({"type": "Enroll", "profiletemplateuuid": 5}),
        json!({"type": "Enroll", "profiletemplateuuid": T_OPEN, "priority": "high"}),
        json!({"type": "Unblock", "profiletemplateuuid": T_OPEN}),
        json!([]),
        json!("Enroll"),
    ];
    for body in bodies {
        let r = env.post(AGENT, "/requests", body.clone());
        assert_eq!(error_code(&r, 400), "BadRequest", "{body}");
    }
    // A name given twice, exactly or in another case, is ambiguous: refused, never the last.
    let twice = [
        format!(r#"{{"type":"Enroll","type":"Retire","profiletemplateuuid":"{T_OPEN}"}}"#),
        format!(r#"{{"type":"Enroll","TYPE":"Enroll","profiletemplateuuid":"{T_OPEN}"}}"#),
        format!(
            r#"{{"type":"Enroll","profiletemplateuuid":"{T_OPEN}","profiletemplateuuid":"{T_OPEN}"}}"#
        ),
    ];
    for raw in &twice {
        let r = env.raw(
            "POST",
            &env.url("/requests"),
            &[
                ("Authorization", &format!("Bearer {AGENT}")),
                ("Content-Type", "application/json"),
            ],
            Some(raw),
        );
        assert_eq!(error_code(&r, 400), "BadRequest", "body {raw}");
        assert!(r.body.contains("appears twice"), "{raw}: {}", r.body);
    }
    for raw in ["{", "", "not json"] {
        let r = env.raw(
            "POST",
            &env.url("/requests"),
            &[("Authorization", &format!("Bearer {AGENT}"))],
            Some(raw),
        );
        assert_eq!(error_code(&r, 400), "BadRequest", "body {raw:?}");
    }
    // Unknown template: 404.
    let r = env.create(AGENT, &new_card());
    assert_eq!(error_code(&r, 404), "NotFound");
    // Type by number, any case, property names in any case.
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": 1, "profiletemplateuuid": T_OPEN}),
    );
    assert_eq!(env.request(&r.created_id())["RequestType"], 1);
    let r = env.post(
        AGENT,
        "/requests",
        json!({"Type": "enroll", "ProfileTemplateUuid": T_OPEN}),
    );
    assert_eq!(env.request(&r.created_id())["RequestType"], 1);

    // Without the request permission: 403.
    for (tok, template) in [
        (APPROVER, T_APPROVE),
        (NOBODY, T_OPEN),
        (READER_D, T_OPEN),
        (AGENT, T_HIDDEN),
    ] {
        let r = env.create(tok, template);
        assert_eq!(error_code(&r, 403), "PermissionDenied", "{template}");
    }
    // A caller without read_key may still run the rest of the flow.
    let r = env.create(NO_KEY, T_OPEN);
    assert_eq!(r.status, 201, "{}", r.body);

    // Binding to a Pending request: 403; by a caller without bind: 403.
    let pending = env.create(AGENT, T_APPROVE).created_id();
    let card = new_card();
    let r = env.bind(AGENT, &pending, &card);
    assert_eq!(error_code(&r, 403), "RequestNotApproved");
    let r = env.bind(APPROVER, &pending, &card);
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    // Approval: only by a caller with approve on the template.
    for tok in [NOBODY, READER_D] {
        let r = env.set_status(tok, &pending, "Approved");
        assert_eq!(error_code(&r, 403), "PermissionDenied");
    }
    let r = env.set_status(APPROVER, &pending, "Completed");
    assert_eq!(
        error_code(&r, 403),
        "PermissionDenied",
        "approver may not complete"
    );
    assert_eq!(env.request(&pending)["Status"], 16);
    let r = env.set_status(APPROVER, &pending, "Approved");
    assert_eq!(r.json()["Status"], 3);
    let r = env.set_status(APPROVER, &pending, "Approved");
    assert_eq!(error_code(&r, 409), "Conflict", "decided already");
    let r = env.set_status(APPROVER, &pending, "Denied");
    assert_eq!(error_code(&r, 409), "Conflict", "decided already");
    // Completing a request without a card: 409.
    let r = env.set_status(AGENT, &pending, "Completed");
    assert_eq!(error_code(&r, 409), "Conflict");
    // Bad status values: 400.
    for status in ["Bogus", "Pending", "Executing", ""] {
        let r = env.set_status(AGENT, &pending, status);
        assert_eq!(error_code(&r, 400), "BadRequest", "{status:?}");
    }
    let r = env.put(AGENT, &format!("/requests/{pending}"), json!({}));
    assert_eq!(error_code(&r, 400), "BadRequest");
    let r = env.set_status(AGENT, &new_card(), "Completed");
    assert_eq!(error_code(&r, 404), "NotFound");

    // Now the bind works; the request is Executing.
    let r = env.post(
        NO_KEY,
        "/smartcards",
        json!({"requestid": pending, "cardid": card, "atr": "3B8F"}),
    );
    let scid = r.created_id();
    assert_eq!(env.request(&pending)["Status"], 18);
    // Binding the same card to the same request again is idempotent.
    let r = env.post(
        AGENT,
        "/smartcards",
        json!({"requestid": pending, "cardid": card.to_uppercase(), "atr": "3B8F80"}),
    );
    assert_eq!(r.created_id(), scid);
    assert_eq!(
        env.get(AGENT, &format!("/smartcards/{scid}")).json()["Atr"],
        "3B8F80"
    );
    // A second card on the same request: 409.
    let r = env.bind(AGENT, &pending, &new_card());
    assert_eq!(error_code(&r, 409), "Conflict");
    // The card on another open request: 409.
    let other = env.approved_request(T_OPEN);
    let r = env.bind(AGENT, &other, &card);
    assert_eq!(error_code(&r, 409), "Conflict");
    assert_eq!(env.request(&other)["Status"], 3, "unchanged");
    // Malformed binds: 400; unknown request: 404.
    for body in [
        json!({"cardid": card}),
        json!({"requestid": other}),
        json!({"requestid": "nope", "cardid": card}),
        json!({"requestid": other, "cardid": "urn:uuid:".to_owned() + &card}),
        json!({"requestid": other, "cardid": new_card(), "atr": "3B8"}),
        json!({"requestid": other, "cardid": new_card(), "atr": "00".repeat(34)}),
        json!({"requestid": other, "cardid": 42}),
    ] {
        let r = env.post(AGENT, "/smartcards", body.clone());
        assert_eq!(error_code(&r, 400), "BadRequest", "{body}");
    }
    let r = env.bind(AGENT, &new_card(), &new_card());
    assert_eq!(error_code(&r, 404), "NotFound");
    assert_eq!(env.request(&other)["NewSmartcardUuid"], Value::Null);

    // Complete, and re-enroll the same card under the same template: same card, same key.
    let key = env.key_for(&pending, &scid, &card);
    assert_eq!(key, want_des3(&card));
    assert_eq!(
        env.set_status(NO_KEY, &pending, "Completed").json()["Status"],
        8
    );
    let r = env.set_status(AGENT, &pending, "Canceled");
    assert_eq!(
        error_code(&r, 409),
        "Conflict",
        "a completed request cannot be canceled"
    );
    // Another template may not take the card over (its key is pinned to this one).
    let r = env.bind(AGENT, &other, &card);
    assert_eq!(error_code(&r, 409), "Conflict");
    let again = env.approved_request(T_APPROVE);
    let r = env.bind(AGENT, &again, &card);
    assert_eq!(r.created_id(), scid, "the card keeps its identity");
    assert_eq!(env.key_for(&again, &scid, &card), key);
    let r = env.key(AGENT, &pending, &scid, &format!("cardid={card}"));
    assert_eq!(error_code(&r, 403), "RequestNotActive");

    // Two approvals: by two distinct approvers; the same approver twice counts once.
    let two = env.create(AGENT, T_TWO).created_id();
    let r = env.set_status(APPROVER, &two, "Approved");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["Status"], 16, "one approval of two");
    assert_eq!(
        env.set_status(APPROVER, &two, "approved").json()["Status"],
        16
    );
    let r = env.bind(AGENT, &two, &new_card());
    assert_eq!(error_code(&r, 403), "RequestNotApproved");
    assert_eq!(env.set_status(AGENT, &two, "Approved").json()["Status"], 3);
    let card2 = new_card();
    let scid2 = env.bind(AGENT, &two, &card2).created_id();
    assert_eq!(env.key_for(&two, &scid2, &card2), want_des3(&card2));

    // Cancel, deny and abandon end requests for good.
    let r1 = env.approved_request(T_OPEN);
    assert_eq!(env.set_status(AGENT, &r1, "Cancelled").json()["Status"], 17);
    let r = env.bind(AGENT, &r1, &new_card());
    assert_eq!(error_code(&r, 403), "RequestNotApproved");
    let r = env.set_status(AGENT, &r1, "Abandoned");
    assert_eq!(error_code(&r, 409), "Conflict");
    let r2 = env.create(AGENT, T_APPROVE).created_id();
    assert_eq!(env.set_status(AGENT, &r2, "denied").json()["Status"], 4);
    let r = env.set_status(APPROVER, &r2, "Approved");
    assert_eq!(error_code(&r, 409), "Conflict");
    let r3 = env.create(AGENT, T_APPROVE).created_id();
    assert_eq!(env.set_status(AGENT, &r3, "Abandoned").json()["Status"], 9);

    // Reading requests and cards needs a permission on their template.
    let r = env.get(NOBODY, &format!("/requests/{pending}"));
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    let r = env.get(READER_D, &format!("/requests/{pending}"));
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    let r = env.get(APPROVER, &format!("/requests/{pending}"));
    assert_eq!(r.status, 200, "the approver sees template (b)");
    let r = env.get(NOBODY, &format!("/smartcards/{scid}"));
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    let r = env.get(AGENT, &format!("/requests/{}", new_card()));
    assert_eq!(error_code(&r, 404), "NotFound");
    let r = env.get(AGENT, &format!("/smartcards/{}", new_card()));
    assert_eq!(error_code(&r, 404), "NotFound");
    let r = env.get(AGENT, "/smartcards/nope");
    assert_eq!(error_code(&r, 400), "BadRequest");
    let r = env.get(AGENT, "/requests/nope");
    assert_eq!(error_code(&r, 400), "BadRequest");
    let r = env.get(AGENT, "/smartcards");
    assert_eq!(error_code(&r, 400), "BadRequest", "cardid is required");
    let r = env.get(AGENT, "/smartcards?cardid=nope");
    assert_eq!(error_code(&r, 400), "BadRequest");
    // Template configuration.
    let r = env.get(
        AGENT,
        &format!("/profiletemplates/{T_HIDDEN}/configuration/smartcards"),
    );
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    let r = env.get(
        AGENT,
        &format!("/profiletemplates/{}/configuration/smartcards", new_card()),
    );
    assert_eq!(error_code(&r, 404), "NotFound");
    let r = env.get(AGENT, "/profiletemplates/nope/configuration/smartcards");
    assert_eq!(error_code(&r, 400), "BadRequest");
}

/// Unblock and Retire name the issued card in "smartcard"; its key comes from the version the
/// card was issued with.
#[test]
fn requests_on_issued_cards() {
    let env = Env::start();
    let card = new_card();
    let (enroll, scid) = env.enroll(T_OPEN, &card);
    let key = env.key_for(&enroll, &scid, &card);

    // While the enrollment is open, no other request may take the card.
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Unblock", "smartcard": scid}),
    );
    assert_eq!(error_code(&r, 409), "Conflict");
    assert_eq!(env.set_status(AGENT, &enroll, "Completed").status, 200);

    // Unblock of the issued card: the same key.
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Unblock", "smartcard": scid}),
    );
    let unblock = r.created_id();
    let q = env.request(&unblock);
    assert_eq!(q["RequestType"], 5);
    assert_eq!(q["Status"], 3);
    assert_eq!(q["ProfileTemplateUuid"], T_OPEN);
    assert_eq!(q["OldSmartcardUuid"], scid.as_str());
    assert_eq!(q["NewSmartcardUuid"], Value::Null);
    assert_eq!(env.key_for(&unblock, &scid, &card), key);
    let r = env.key(NO_KEY, &unblock, &scid, &format!("cardid={card}"));
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    // A second open request on the card: 409.
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Retire", "smartcard": scid}),
    );
    assert_eq!(error_code(&r, 409), "Conflict");
    // Mismatched or missing references: 400 / 403 / 404.
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Unblock", "smartcard": scid, "profiletemplateuuid": T_APPROVE}),
    );
    assert_eq!(error_code(&r, 400), "BadRequest");
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Enroll", "profiletemplateuuid": T_OPEN, "smartcard": scid}),
    );
    assert_eq!(error_code(&r, 400), "BadRequest");
    let r = env.post(
        AGENT,
        "/requests",
        json!({"type": "Unblock", "smartcard": new_card()}),
    );
    assert_eq!(error_code(&r, 404), "NotFound");
    let r = env.post(
        READER_D,
        "/requests",
        json!({"type": "Unblock", "smartcard": scid}),
    );
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    // Cancel the unblock; the key is refused for it afterwards.
    assert_eq!(
        env.set_status(AGENT, &unblock, "Canceled").json()["Status"],
        17
    );
    let r = env.key(AGENT, &unblock, &scid, &format!("cardid={card}"));
    assert_eq!(error_code(&r, 403), "RequestNotActive");
}

/// A Retire request for an issued card must be completable, and completing it retires the card
/// (SPEC: PUT /requests/{id} Completed; smart card status 6 Retired).
#[test]
fn retire_request_completes_and_retires_the_card() {
    let env = Env::start();
    let card = new_card();
    let (enroll, scid) = env.enroll(T_OPEN, &card);
    let key = env.key_for(&enroll, &scid, &card);
    assert_eq!(env.set_status(AGENT, &enroll, "Completed").status, 200);

    let retire = env
        .post(
            AGENT,
            "/requests",
            json!({"type": "Retire", "smartcard": scid}),
        )
        .created_id();
    assert_eq!(env.request(&retire)["RequestType"], 10);
    assert_eq!(env.key_for(&retire, &scid, &card), key);
    // A client may (re)bind the card before completing; that is idempotent either way.
    let r = env.bind(AGENT, &retire, &card);
    assert_eq!(r.created_id(), scid);

    let r = env.set_status(AGENT, &retire, "Completed");
    assert_eq!(
        r.status, 200,
        "a Retire request cannot be completed: {}",
        r.body
    );
    assert_eq!(r.json()["Status"], 8);
    assert_eq!(
        env.get(AGENT, &format!("/smartcards/{scid}")).json()["Status"],
        6,
        "Retired"
    );
}

/// A caller must not obtain the admin key of a card issued under a template it holds no
/// permission on by enrolling that card again under a template it does hold permissions on.
#[test]
fn no_key_of_a_card_from_another_template() {
    let env = Env::start();
    let card = new_card();
    let (enroll, scid) = env.enroll(T_OPEN, &card);
    let key = env.key_for(&enroll, &scid, &card);
    assert_eq!(env.set_status(AGENT, &enroll, "Completed").status, 200);
    // READER_D holds nothing on template (a).
    let r = env.key(READER_D, &enroll, &scid, &format!("cardid={card}"));
    assert_eq!(error_code(&r, 403), "PermissionDenied");
    assert_eq!(
        env.get(READER_D, &format!("/smartcards/{scid}")).status,
        403
    );

    let other = env.create(READER_D, T_AN10922).created_id();
    let bind = env.bind(READER_D, &other, &card);
    if bind.status == 201 {
        let scid2 = bind.created_id();
        let r = env.key(READER_D, &other, &scid2, &format!("cardid={card}"));
        let leaked = r.status == 200 && key_bytes(&r) == key;
        assert!(
            r.status != 200,
            "card {card} of template (a) was bound to a template (d) request and its key \
             released to a caller without permissions on (a) (status {}, the (a) key: {leaked})",
            r.status
        );
    }
}

// ---------------------------------------------------------------------------------------
// 8. Routing, error bodies and correlation ids.

#[test]
fn routing_and_correlation_ids() {
    let env = Env::start();
    let host = format!("http://{}", env.server.addr);
    let auth = format!("Bearer {AGENT}");
    let h: &[(&str, &str)] = &[("Authorization", &auth)];

    // Unknown endpoints: 404 JSON, with or without the prefix, with or without credentials.
    for url in [
        env.url("/nothing"),
        env.url("/requests/x/y"),
        env.url(""),
        format!("{host}/"),
        format!("{host}/foo"),
        format!("{host}/CertificateManagement/api/v2.0/profiletemplates"),
        format!("{host}/CertificateManagement/api/v1.0profiletemplates"),
    ] {
        let r = env.raw("GET", &url, h, None);
        assert_eq!(error_code(&r, 404), "NotFound", "{url}");
        let r = env.raw("GET", &url, &[], None);
        assert_eq!(error_code(&r, 404), "NotFound", "{url}");
    }
    // A known path with the wrong method: 405.
    let r = env.raw("DELETE", &env.url("/requests"), h, None);
    assert_eq!(error_code(&r, 405), "MethodNotAllowed");
    // Every API endpoint needs credentials.
    for path in [
        "/profiletemplates".to_owned(),
        format!("/profiletemplates/{T_OPEN}/configuration/smartcards"),
        format!("/requests/{}", new_card()),
        format!("/smartcards?cardid={MIM_CARD}"),
    ] {
        let r = call(&env.http, "GET", &env.url(&path), None, None);
        assert_eq!(error_code(&r, 401), "Unauthorized", "{path}");
    }
    let r = call(
        &env.http,
        "POST",
        &env.url("/requests"),
        None,
        Some(json!({"type": "Enroll", "profiletemplateuuid": T_OPEN})),
    );
    assert_eq!(error_code(&r, 401), "Unauthorized");
    // Health needs none.
    let r = env.raw("GET", &format!("{host}/healthz"), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = env.raw("GET", &format!("{host}/readyz"), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);

    // The client's X-Correlation-Id is echoed, in the header and in error bodies.
    let r = env.raw(
        "GET",
        &env.url("/profiletemplates"),
        &[
            ("Authorization", &auth),
            ("X-Correlation-Id", "test-corr-42"),
        ],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-correlation-id"), Some("test-corr-42"));
    let r = env.raw(
        "GET",
        &env.url(&format!("/requests/{}", new_card())),
        &[
            ("Authorization", &auth),
            ("X-Correlation-Id", "abc.DEF_123"),
        ],
        None,
    );
    assert_eq!(error_code(&r, 404), "NotFound");
    assert_eq!(r.json()["CorrelationId"], "abc.DEF_123");
    let r = env.raw(
        "GET",
        &env.url("/profiletemplates"),
        &[("X-Correlation-Id", "unauth-1")],
        None,
    );
    assert_eq!(error_code(&r, 401), "Unauthorized");
    assert_eq!(r.json()["CorrelationId"], "unauth-1");
    // The key response carries it too.
    let card = new_card();
    let (reqid, scid) = env.enroll(T_OPEN, &card);
    let r = env.raw(
        "GET",
        &env.url(&Env::key_path(&reqid, &scid, &format!("cardid={card}"))),
        &[("Authorization", &auth), ("X-Correlation-Id", "key-corr-7")],
        None,
    );
    assert_eq!(key_bytes(&r), want_des3(&card));
    assert_eq!(r.header("x-correlation-id"), Some("key-corr-7"));
    // Without one, or with one that is not short and plain, the server makes its own.
    let long = "a".repeat(65);
    let mut ids = HashSet::new();
    for given in [
        None,
        Some("has space"),
        Some("semi;colon"),
        Some(long.as_str()),
    ] {
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(g) = given {
            headers.push(("X-Correlation-Id", g));
        }
        let r = env.raw("GET", &env.url("/nothing"), &headers, None);
        error_code(&r, 404);
        let cid = r.header("x-correlation-id").unwrap().to_owned();
        assert_ne!(Some(cid.as_str()), given);
        assert!(!cid.is_empty());
        ids.insert(cid);
    }
    assert_eq!(ids.len(), 4, "a fresh id each time");
    let log = env.stop();
    assert!(log.contains("test-corr-42"), "the log carries the id");
}

/// SPEC section 2: every response is application/json and every error body is
/// `{"Message", "ErrorCode", "CorrelationId"}`, also for a body over the size limit.
#[test]
fn oversized_body_is_a_json_error() {
    let env = Env::start();
    let auth = format!("Bearer {AGENT}");
    let ok = format!(
        "{{\"type\":\"Enroll\",\"profiletemplateuuid\":\"{T_OPEN}\",\"comment\":\"{}\"}}",
        "x".repeat(60 * 1024)
    );
    let r = env.raw(
        "POST",
        &env.url("/requests"),
        &[("Authorization", &auth)],
        Some(&ok),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let big = ok.replace(&"x".repeat(60 * 1024), &"x".repeat(70 * 1024));
    let r = env.raw(
        "POST",
        &env.url("/requests"),
        &[("Authorization", &auth), ("X-Correlation-Id", "big-body-1")],
        Some(&big),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "body {:?}",
        r.body
    );
    error_code(&r, 413);
    assert_eq!(r.json()["CorrelationId"], "big-body-1");
}

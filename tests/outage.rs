//! HSM outages with bounded latency and self-healing, against a test-only PKCS#11 shim
//! (tests/shim/pkcs11_shim.c) that forwards to SoftHSM2 and can be told to fail every call
//! ("down") or to hang ("hang"). The server is never restarted.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TEMPLATE: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c8d";
const TOKEN: &str = "outage-agent-token";
const MASTER: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
const DEADLINE_MS: u64 = 1000;
const SESSIONS: usize = 2;

fn build_shim(dir: &Path) -> PathBuf {
    let out = dir.join("pkcs11_shim.so");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/shim/pkcs11_shim.c");
    let status = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(src)
        .arg("-ldl")
        .status()
        .expect("gcc");
    assert!(status.success(), "building the PKCS#11 shim");
    out
}

fn set_mode(control: &Path, mode: &str) {
    std::fs::write(control, mode).unwrap();
}

struct Card {
    url: String,
    key: String,
}

fn enroll(base: &str) -> Card {
    let agent = agent();
    let card = new_card();
    let reqid = call(
        &agent,
        "POST",
        &format!("{base}/requests"),
        Some(TOKEN),
        Some(json!({"type": "Enroll", "profiletemplateuuid": TEMPLATE})),
    )
    .created_id();
    let scid = call(
        &agent,
        "POST",
        &format!("{base}/smartcards"),
        Some(TOKEN),
        Some(json!({"requestid": reqid, "cardid": card})),
    )
    .created_id();
    Card {
        url: format!("{base}/requests/{reqid}/smartcards/{scid}/diversifiedkey?cardid={card}"),
        key: b64(&soft_admin_des3(MASTER, &card)),
    }
}

/// One key request: (status, body, seconds).
fn fetch(agent: &ureq::Agent, card: &Card) -> (u16, String, f64) {
    let started = Instant::now();
    let r = match agent
        .get(&card.url)
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = r.status();
    (
        status,
        r.into_string().unwrap_or_default(),
        started.elapsed().as_secs_f64(),
    )
}

/// Polls until a key request succeeds; returns how long it took.
fn until_served(card: &Card, limit: Duration) -> Duration {
    let agent = agent();
    let started = Instant::now();
    loop {
        let (status, body, _) = fetch(&agent, card);
        if status == 200 {
            assert_eq!(
                body,
                format!("\"{}\"", card.key),
                "a wrong key after recovery"
            );
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not served again within {limit:?}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(base_addr: &str, name: &str) -> f64 {
    let r = call(
        &agent(),
        "GET",
        &format!("http://{base_addr}/metrics"),
        None,
        None,
    );
    r.body
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn outages_give_fast_503s_never_a_wrong_key_and_heal_without_restart() {
    let token = TestToken::new();
    let shim = build_shim(token.path());
    let control = token.path().join("hsm-mode");
    set_mode(&control, "up");
    // SAFETY: the only test of this binary; set before any thread or child process starts.
    unsafe {
        std::env::set_var("DIVKEY_SHIM_REAL", SOFTHSM_MODULE);
        std::env::set_var("DIVKEY_SHIM_CONTROL", &control);
    }
    let config = token.path().join("divkey.toml");
    let rest = format!(
        r#"[[profile_template]]
uuid = "{TEMPLATE}"
name = "Base CSP"
algorithm = "sp800-108-cmac"
key_type = "des3"
master_key = "admin-master"
default_admin_key_hex = "010203040506070801020304050607080102030405060708"

[[caller]]
name = "agent"
token_sha256 = "{hash}"
permissions = {{ "{TEMPLATE}" = ["request", "bind", "read_key"] }}
"#,
        hash = sha256_hex(TOKEN)
    );
    let text = config_text(&token, "127.0.0.1:0", &rest)
        .replace(SOFTHSM_MODULE, shim.to_str().unwrap())
        .replace(
            "[store]",
            &format!("sessions = {SESSIONS}\ndeadline_ms = {DEADLINE_MS}\n\n[store]"),
        );
    std::fs::write(&config, text).unwrap();
    token.import_key(&config, "admin-master", MASTER);
    let server = Server::start(&token, &config);
    let cards: Vec<Card> = (0..4).map(|_| enroll(&server.base)).collect();
    let limit = DEADLINE_MS as f64 / 1000.0 + 1.0;

    // 1. The HSM goes down under load and comes back: every answer is the right key, a 503
    //    or a 500, none waits past the deadline plus 1 s, and service resumes within 5 s.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let cards = Arc::new(cards);
    let load: Vec<_> = (0..8)
        .map(|i| {
            let (stop, seen, cards) = (Arc::clone(&stop), Arc::clone(&seen), Arc::clone(&cards));
            std::thread::spawn(move || {
                let agent = agent();
                while !stop.load(Ordering::Relaxed) {
                    let card = &cards[i % cards.len()];
                    let (status, body, secs) = fetch(&agent, card);
                    match status {
                        200 => assert_eq!(body, format!("\"{}\"", card.key), "a wrong key"),
                        503 | 500 => {}
                        other => panic!("status {other}: {body}"),
                    }
                    assert!(secs <= limit, "a request waited {secs:.2} s");
                    seen.lock().unwrap().push(status);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    set_mode(&control, "down");
    std::thread::sleep(Duration::from_millis(1500));
    let ready = call(
        &agent(),
        "GET",
        &format!("http://{}/readyz", server.addr),
        None,
        None,
    );
    assert_eq!(
        ready.status, 503,
        "readyz during the outage: {}",
        ready.body
    );
    set_mode(&control, "up");
    let healed = until_served(&cards[0], Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let statuses = seen.lock().unwrap().clone();
    assert!(
        statuses.contains(&200) && statuses.contains(&503),
        "{statuses:?}"
    );
    eprintln!(
        "served again {healed:?} after the HSM returned; {} requests",
        statuses.len()
    );
    let ready = call(
        &agent(),
        "GET",
        &format!("http://{}/readyz", server.addr),
        None,
        None,
    );
    assert_eq!(ready.status, 200, "{}", ready.body);

    // 2. A hung HSM call: requests get 503 within the deadline instead of hanging, and the
    //    service recovers when the HSM answers again.
    set_mode(&control, "hang");
    let agent = agent();
    for _ in 0..3 {
        let (status, body, secs) = fetch(&agent, &cards[1]);
        assert_eq!(status, 503, "{body}");
        assert!(secs <= limit, "waited {secs:.2} s on a hung HSM");
    }
    set_mode(&control, "up");
    until_served(&cards[1], Duration::from_secs(5));

    // 3. Ten outage cycles leave the open sessions bounded.
    for _ in 0..10 {
        set_mode(&control, "down");
        let (status, _, _) = fetch(&agent, &cards[2]);
        assert_eq!(status, 503);
        set_mode(&control, "up");
        until_served(&cards[2], Duration::from_secs(5));
    }
    let sessions = metric(&server.addr, "divkey_hsm_sessions");
    assert!(sessions <= SESSIONS as f64, "{sessions} sessions open");
    for card in cards.iter() {
        until_served(card, Duration::from_secs(5));
    }
    let log = server.stop();
    assert!(log.contains("HSM re-established"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains(USER_PIN));
}

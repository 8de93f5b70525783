//! SIGTERM under load: the server stops accepting, answers what it has accepted, closes its
//! HSM sessions, logs out, finalizes the library and exits 0 without a crash.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use serde_json::json;

const TEMPLATE: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c8d";
const TOKEN: &str = "shutdown-agent-token";
const MASTER: &str = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";

#[test]
fn sigterm_under_load_finishes_in_flight_requests_and_exits_cleanly() {
    let token = TestToken::new();
    let config = token.path().join("divkey.toml");
    let rest = agent_template_config(TEMPLATE, TOKEN);
    std::fs::write(&config, config_text(&token, "127.0.0.1:0", &rest)).unwrap();
    token.import_key(&config, "admin-master", MASTER);
    let mut server = Server::start(&token, &config);
    let agent = agent();
    let card = "bc88f13f-83ba-4037-8262-46eba1291c6e";
    let reqid = call(
        &agent,
        "POST",
        &format!("{}/requests", server.base),
        Some(TOKEN),
        Some(json!({"type": "Enroll", "profiletemplateuuid": TEMPLATE})),
    )
    .created_id();
    let scid = call(
        &agent,
        "POST",
        &format!("{}/smartcards", server.base),
        Some(TOKEN),
        Some(json!({"requestid": reqid, "cardid": card})),
    )
    .created_id();
    let url = format!(
        "{}/requests/{reqid}/smartcards/{scid}/diversifiedkey?cardid={card}",
        server.base
    );
    let want = b64(&soft_admin_des3(MASTER, card));

    // 16 clients loop on keep-alive connections; SIGTERM arrives in the middle.
    let start = Arc::new(Barrier::new(17));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (url, want, start) = (url.clone(), want.clone(), Arc::clone(&start));
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(20))
                    .build();
                start.wait();
                let (mut ok, mut refused) = (0, 0);
                for _ in 0..400 {
                    match agent
                        .get(&url)
                        .set("Authorization", &format!("Bearer {TOKEN}"))
                        .call()
                    {
                        Ok(r) => {
                            assert_eq!(r.status(), 200);
                            let body: String = r.into_json().unwrap();
                            assert_eq!(body, want, "a wrong key during shutdown");
                            ok += 1;
                        }
                        // Connection refused or closed once the server stops accepting.
                        Err(ureq::Error::Transport(_)) => refused += 1,
                        Err(ureq::Error::Status(code, r)) => {
                            panic!(
                                "status {code} during shutdown: {}",
                                r.into_string().unwrap_or_default()
                            )
                        }
                    }
                    if refused > 0 {
                        break;
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    start.wait();
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let status = {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let results: Vec<(u32, u32)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let served: u32 = results.iter().map(|r| r.0).sum();
    assert!(served > 0, "no request was served before SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    std::thread::sleep(Duration::from_millis(200));
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("stopping"), "{log}");
    assert!(log.contains("working sessions closed"), "{log}");
    assert!(log.contains("logged out, library finalized"), "{log}");
    assert!(!log.contains(&want), "a key in the log");
}

//! The HSM's own ceiling: admin key derivations per second with cryptoki directly on the
//! token, no divkey code in the loop. One derivation = the two AES-CMACs of the default
//! profile (sp800-108-cmac, des3: L = 192 bits).
//!
//! `cargo bench --bench hsm_ceiling -- CONFIG [SECONDS] [THREADS]`; the config gives the
//! module, token and PIN file; the master key label is `admin-master` unless
//! DIVKEY_BENCH_LABEL says otherwise. softhsm/bench.sh runs it beside the HTTP load.

use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use divkey::config::Config;
use secrecy::SecretString;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(config_path) = args.first() else {
        eprintln!("usage: hsm_ceiling CONFIG [SECONDS] [THREADS]");
        return;
    };
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let label = std::env::var("DIVKEY_BENCH_LABEL").unwrap_or_else(|_| "admin-master".into());
    let config = Config::load(std::path::Path::new(config_path)).expect("config");
    let pin =
        std::fs::read_to_string(config.hsm.pin_file.as_ref().expect("pin_file")).expect("pin");
    let pin = SecretString::from(pin.trim().to_owned());

    let ctx = Pkcs11::new(&config.hsm.module).expect("module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("init");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim_end() == config.hsm.token_label)
                .unwrap_or(false)
        })
        .expect("token");
    let login = ctx.open_rw_session(slot).expect("session");
    login.login(UserType::User, Some(&pin)).expect("login");
    let key = login
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.clone().into_bytes()),
        ])
        .expect("find")
        .into_iter()
        .next()
        .expect("master key");

    // The default profile's fixed input: label || 0 || KT || CID || [192]_32, counter in front.
    let mut msg = vec![1u8];
    msg.extend_from_slice(b"divkey admin key\x00\x01");
    msg.extend_from_slice(&[0x5a; 16]);
    msg.extend_from_slice(&192u32.to_be_bytes());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (ctx, mut msg) = (ctx.clone(), msg.clone());
                s.spawn(move || {
                    let session = ctx.open_ro_session(slot).expect("session");
                    let mut n = 0u64;
                    msg[2] = t as u8;
                    while Instant::now() < deadline {
                        for counter in [1u8, 2] {
                            msg[0] = counter;
                            let mac = session.sign(&Mechanism::AesCMac, key, &msg).expect("cmac");
                            assert_eq!(mac.len(), 16);
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "cryptoki direct: {threads} thread(s), {secs:.1} s: {total} derivations, {:.0} derivations/s ({:.0} CMAC/s), {:.1} us/derivation",
        total as f64 / secs,
        2.0 * total as f64 / secs,
        secs * 1e6 * threads as f64 / total as f64
    );
    drop(login);
    let _ = ctx.finalize();
}

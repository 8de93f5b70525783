//! The derivation pool's contract with its callers, on a real SoftHSM2 session: a job that
//! outlives the deadline still hands its value to the undelivered path (so the service can
//! audit it), a job whose caller left before it started never runs (and if the caller's
//! request was dropped, the worker says so), and a job that panics neither kills its worker
//! nor passes as run.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestToken, config_text};
use divkey::config::Config;
use divkey::hsm::{DerivationPool, Hsm, HsmError, NotAnswered, Undelivered};
use divkey::metrics::Metrics;

#[test]
fn deadlines_skips_and_panics_are_accounted_for() {
    let token = TestToken::new();
    // The only test in this binary: nothing else reads the environment concurrently.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &token.conf) };
    let path = token.path().join("divkey.toml");
    std::fs::write(&path, config_text(&token, "127.0.0.1:0", "")).unwrap();
    let config = Config::load(&path).unwrap();
    let hsm = Arc::new(Hsm::open(&config.hsm).unwrap());
    let metrics = Metrics::new();
    // One worker, so that jobs queue behind each other and the same worker runs them all.
    let pool = DerivationPool::start(
        Arc::clone(&hsm),
        1,
        4,
        Duration::from_millis(200),
        Arc::clone(&metrics.hsm),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    // Outlives the deadline: the caller gets a timeout, the value goes to `undelivered`.
    let (tx, rx) = std::sync::mpsc::channel();
    let late = rt.block_on(pool.run_or(
        |_| {
            std::thread::sleep(Duration::from_millis(400));
            7u32
        },
        move |v| tx.send(v).unwrap(),
    ));
    assert!(matches!(
        late,
        Err(NotAnswered {
            error: HsmError::Timeout,
            started: true
        })
    ));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(2)).unwrap(),
        Undelivered::Value(7)
    );

    // A job queued behind a slow one, whose caller leaves first, is skipped.
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    let (slow, skipped) = rt.block_on(async {
        let slow = pool.run(|_| std::thread::sleep(Duration::from_millis(400)));
        let skipped = pool.run(move |_| flag.store(true, Ordering::SeqCst));
        tokio::join!(slow, skipped)
    });
    assert!(matches!(slow, Err(NotAnswered { started: true, .. })));
    assert!(matches!(
        skipped,
        Err(NotAnswered {
            error: HsmError::Timeout,
            started: false
        })
    ));
    std::thread::sleep(Duration::from_millis(400));
    assert!(!ran.load(Ordering::SeqCst), "a skipped job ran");

    // A job whose caller's request was dropped while it queued is not run; the worker
    // says so to `undelivered`.
    let (tx, rx) = std::sync::mpsc::channel();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    rt.block_on(async {
        let slow = pool.run(|_| std::thread::sleep(Duration::from_millis(300)));
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            pool.run_or(
                move |_| flag.store(true, Ordering::SeqCst),
                move |v: Undelivered<()>| tx.send(v).unwrap(),
            ),
        );
        let (slow, dropped) = tokio::join!(slow, dropped);
        assert!(slow.is_err(), "the slow job outlived the deadline");
        assert!(dropped.is_err(), "the request was dropped");
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(2)).unwrap(),
        Undelivered::NotRun
    );
    assert!(!ran.load(Ordering::SeqCst), "a dropped request's job ran");

    // A panicking job is accounted for once: by its caller (reported as not run) if the
    // caller still waited, else by the worker (`undelivered(None)`). The worker goes on
    // with a fresh session.
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = rt.block_on(pool.run_or(
        |_| -> u32 { panic!("job fails") },
        move |v| tx.send(v).unwrap(),
    ));
    let by_worker = rx.recv_timeout(Duration::from_secs(2)).ok();
    match panicked {
        Err(NotAnswered { started: false, .. }) => assert_eq!(by_worker, None),
        Err(NotAnswered { started: true, .. }) => {
            assert_eq!(by_worker, Some(Undelivered::Panicked))
        }
        Ok(v) => panic!("a panicked job answered {v}"),
    }
    let after = rt.block_on(pool.run(|ks| ks.ping()));
    assert!(matches!(after, Ok(Ok(()))), "{after:?}");

    assert!(pool.shutdown());
    Arc::try_unwrap(hsm).ok().unwrap().close().unwrap();
}

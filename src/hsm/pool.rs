//! A fixed set of threads, each owning one working session, fed by a bounded queue.
//!
//! HSM calls block; running them here keeps the async runtime's threads free. The queue is
//! bounded so that a slow HSM turns into fast 503s rather than an unbounded backlog. A session
//! on which a call fails is never reused: a transport-level failure takes the whole
//! initialisation down (see [`Hsm::mark_down`]), any other failed call closes the session and
//! the worker opens a fresh one.
//!
//! A job is a whole unit of work that needs the HSM (the service runs a key request's store
//! reads, derivation and audit write in one job): one hand-off to a worker and one back,
//! instead of one per step, is most of what a key request costs besides the HSM itself.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cryptoki::session::Session;
use tokio::sync::oneshot;

use crate::metrics::{HsmLabels, HsmMetrics};

use super::keys::SessionPrf;
use super::{Hsm, HsmError, Live, MasterKeyRef};
use crate::diversify::{AdminKey, Derivation, Kcv, aes_kcv, derive_admin_key};
use crate::domain::CardId;

/// What a job runs on: a worker's session, the generation it belongs to, and the HSM (to
/// resolve master key handles in that generation).
pub(super) struct WorkerSession<'a> {
    pub session: &'a Session,
    pub generation: u64,
    pub hsm: &'a Hsm,
    live: &'a Live,
}

/// What becomes of a worker's session after a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SessionFate {
    Keep,
    /// A call on it failed: close it, open another for the next job.
    Close,
    /// The HSM is unreachable: take the whole initialisation down.
    TakeDown,
}

/// Runs on a worker's session; says what becomes of the session.
type Job = Box<dyn FnOnce(Result<WorkerSession<'_>, HsmError>) -> SessionFate + Send>;

/// Who accounts for a job (audits it): the worker once it starts the job; the caller if it
/// stops waiting before the job started (the job is then skipped), or if the job panicked
/// while it waited; the worker again if the caller left a started job that then panicked.
const PENDING: u8 = 0;
const STARTED: u8 = 1;
/// The caller left before the job started.
const ABANDONED: u8 = 2;
/// The caller left after the job started.
const LEFT: u8 = 3;
/// The job panicked while its caller waited.
const PANICKED: u8 = 4;

/// What a job left for nobody: the caller stopped waiting (deadline passed, request
/// dropped) and the worker accounts for it.
#[derive(Debug, PartialEq, Eq)]
pub enum Undelivered<T> {
    /// The job ran; its value reached nobody.
    Value(T),
    /// The job panicked.
    Panicked,
    /// The caller was gone when the job came up, so it was not run.
    NotRun,
}

/// A job that gave no answer.
#[derive(Debug)]
pub struct NotAnswered {
    pub error: HsmError,
    /// Whether a worker ran the job to its end (so it did what it says, answered or not);
    /// `false` means it did not and never will: the caller accounts for it.
    pub started: bool,
}

impl From<NotAnswered> for HsmError {
    fn from(n: NotAnswered) -> Self {
        n.error
    }
}

/// A pooled session as a job sees it. Each HSM call is timed and counted; a call that fails
/// at the transport level marks the session for discarding once the job ends.
pub struct KeySession<'a> {
    session: Option<WorkerSession<'a>>,
    /// Why there is no session (the HSM is down or reconnecting).
    unavailable: Option<HsmError>,
    fate: SessionFate,
    metrics: &'a HsmMetrics,
    answer: &'a oneshot::Sender<()>,
}

impl KeySession<'_> {
    fn call<T>(
        &mut self,
        f: impl FnOnce(&WorkerSession<'_>) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let Some(ws) = self.session.as_ref() else {
            return Err(self.unavailable.take().unwrap_or(HsmError::Reconnecting));
        };
        let m = self.metrics;
        // Holds off the generation's C_Finalize during the call (only the call: a job's
        // store work must not look like a call stuck in the HSM).
        let Some(_in_call) = ws.live.enter() else {
            return Err(HsmError::Reconnecting);
        };
        m.sessions_busy.inc();
        let started = Instant::now();
        let result = f(ws);
        m.latency.observe(started.elapsed().as_secs_f64());
        m.sessions_busy.dec();
        let label = result.as_ref().err().map_or("ok", outcome);
        m.calls.get_or_create(&HsmLabels { outcome: label }).inc();
        if let Err(e) = &result {
            let fate = if e.poisons_session() {
                SessionFate::TakeDown
            } else if matches!(e, HsmError::Failed { .. }) {
                SessionFate::Close
            } else {
                SessionFate::Keep
            };
            self.fate = self.fate.max(fate);
        }
        result
    }

    /// Derives `card`'s admin key under `master` inside the HSM.
    pub fn derive_admin_key(
        &mut self,
        master: &MasterKeyRef,
        derivation: &Derivation,
        card: &CardId,
    ) -> Result<AdminKey, HsmError> {
        self.call(|ws| {
            let key = ws.hsm.handle_in(master, ws.session, ws.generation)?;
            derive_admin_key(
                &mut SessionPrf {
                    session: ws.session,
                    key,
                },
                derivation,
                card,
            )
        })
    }

    /// The check value of a master key, computed now: proves that the key is there, usable,
    /// and still the same key.
    pub fn master_key_kcv(&mut self, master: &MasterKeyRef) -> Result<Kcv, HsmError> {
        self.call(|ws| {
            let key = ws.hsm.handle_in(master, ws.session, ws.generation)?;
            aes_kcv(&mut SessionPrf {
                session: ws.session,
                key,
            })
        })
    }

    /// Whether the session answers.
    pub fn ping(&mut self) -> Result<(), HsmError> {
        self.call(|ws| {
            ws.session
                .get_session_info()
                .map(|_| ())
                .map_err(HsmError::from)
        })
    }

    /// Whether the caller still waits for the answer (it gives up at the deadline).
    pub fn caller_waiting(&self) -> bool {
        !self.answer.is_closed()
    }
}

pub struct DerivationPool {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    /// Each worker thread drops its sender when it ends (panic included).
    ended: Mutex<Receiver<()>>,
    deadline: Duration,
    metrics: Arc<HsmMetrics>,
}

fn outcome(e: &HsmError) -> &'static str {
    match e {
        HsmError::Unavailable { .. } => "unavailable",
        HsmError::Timeout => "timeout",
        HsmError::Busy => "busy",
        _ => "error",
    }
}

impl DerivationPool {
    /// Opens `sessions` working sessions up front, so a start-up problem shows at once.
    pub fn start(
        hsm: Arc<Hsm>,
        sessions: usize,
        queue: usize,
        deadline: Duration,
        metrics: Arc<HsmMetrics>,
    ) -> Result<Self, HsmError> {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(sessions);
        let (ends, ended) = sync_channel::<()>(0);
        for i in 0..sessions {
            let session = hsm.open_session()?;
            metrics.sessions.inc();
            let (hsm, rx, m) = (Arc::clone(&hsm), Arc::clone(&rx), Arc::clone(&metrics));
            let end = ends.clone();
            let handle = std::thread::Builder::new()
                .name(format!("hsm-{i}"))
                .spawn(move || {
                    let _end = end;
                    worker(&hsm, &rx, Some(session), &m)
                })
                .map_err(|e| HsmError::Other(format!("cannot start HSM worker: {e}")))?;
            workers.push(handle);
        }
        drop(ends);
        Ok(Self {
            jobs: Some(tx),
            workers,
            ended: Mutex::new(ended),
            deadline,
            metrics,
        })
    }

    /// Runs `f` on a pooled session and waits for its answer until the deadline. A full
    /// queue refuses at once; a job whose caller stopped waiting before it started is
    /// skipped.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KeySession<'_>) -> T + Send + 'static,
    ) -> Result<T, NotAnswered> {
        self.run_or(f, drop).await
    }

    /// [`Self::run`], and whatever the job leaves for nobody once its caller is gone
    /// (deadline passed, request dropped) goes to `undelivered`, on the worker.
    pub async fn run_or<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KeySession<'_>) -> T + Send + 'static,
        undelivered: impl FnOnce(Undelivered<T>) + Send + 'static,
    ) -> Result<T, NotAnswered> {
        let (tx, rx) = oneshot::channel();
        let (answer, answered) = oneshot::channel::<()>();
        let claim = Arc::new(AtomicU8::new(PENDING));
        let m = Arc::clone(&self.metrics);
        let job_claim = Arc::clone(&claim);
        let job: Job = Box::new(move |session| {
            m.queue_depth.dec();
            if job_claim
                .compare_exchange(PENDING, STARTED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return SessionFate::Keep;
            }
            // Its caller was dropped while the job queued: nobody will take a value.
            if answer.is_closed() {
                undelivered(Undelivered::NotRun);
                return SessionFate::Keep;
            }
            let (session, unavailable) = match session {
                Ok(ws) => (Some(ws), None),
                Err(e) => (None, Some(e)),
            };
            let mut ks = KeySession {
                session,
                unavailable,
                fate: SessionFate::Keep,
                metrics: &m,
                answer: &answer,
            };
            // A panic in a job must not take the worker thread with it; the session it was
            // using is not trusted again.
            let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut ks)));
            let fate = ks.fate;
            match value {
                Ok(value) => {
                    if let Err(value) = tx.send(value) {
                        undelivered(Undelivered::Value(value));
                    }
                    fate
                }
                Err(_) => {
                    tracing::error!("HSM job panicked; its session is closed");
                    // The caller accounts for it if it still waits; else (it left, or its
                    // request was dropped) the worker does.
                    let caller_waits = job_claim
                        .compare_exchange(STARTED, PANICKED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                        && !tx.is_closed();
                    if !caller_waits {
                        undelivered(Undelivered::Panicked);
                    }
                    fate.max(SessionFate::Close)
                }
            }
        });
        let not_run = |error: HsmError| {
            self.metrics
                .calls
                .get_or_create(&HsmLabels {
                    outcome: outcome(&error),
                })
                .inc();
            NotAnswered {
                error,
                started: false,
            }
        };
        let Some(jobs) = self.jobs.as_ref() else {
            return Err(not_run(HsmError::Busy));
        };
        self.metrics.queue_depth.inc();
        if let Err(e) = jobs.try_send(job) {
            self.metrics.queue_depth.dec();
            return Err(not_run(match e {
                TrySendError::Full(_) => HsmError::Busy,
                TrySendError::Disconnected(_) => HsmError::Other("HSM workers stopped".into()),
            }));
        }
        let mut rx = rx;
        let result = tokio::time::timeout(self.deadline, &mut rx).await;
        // Tells a running job that nobody waits any more (it checks before it commits).
        drop(answered);
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            // Dropped unanswered: never run (workers gone) or panicked.
            Ok(Err(_)) => HsmError::Other("HSM worker ended without answer".into()),
            Err(_) => {
                // A value sent just as the deadline passed is taken, not lost unaccounted.
                rx.close();
                if let Ok(value) = rx.try_recv() {
                    return Ok(value);
                }
                HsmError::Timeout
            }
        };
        let worker_accounts =
            match claim.compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => false,
                Err(STARTED) => claim
                    .compare_exchange(STARTED, LEFT, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok(),
                Err(_) => false,
            };
        if worker_accounts {
            Err(NotAnswered {
                error,
                started: true,
            })
        } else {
            Err(not_run(error))
        }
    }

    /// Derives `card`'s admin key under `master` inside the HSM.
    pub async fn derive_admin_key(
        &self,
        master: &MasterKeyRef,
        derivation: &Derivation,
        card: CardId,
    ) -> Result<AdminKey, HsmError> {
        let (key, derivation) = (master.clone(), derivation.clone());
        self.run(move |ks| ks.derive_admin_key(&key, &derivation, &card))
            .await?
    }

    /// The check value of a master key, computed now on a pooled session.
    pub async fn master_key_kcv(&self, master: &MasterKeyRef) -> Result<Kcv, HsmError> {
        let key = master.clone();
        self.run(move |ks| ks.master_key_kcv(&key)).await?
    }

    /// Whether a pooled session answers (for readiness).
    pub async fn ping(&self) -> Result<(), HsmError> {
        self.run(|ks| ks.ping()).await?
    }

    /// Stops taking work, lets the workers finish what is queued and closes their sessions.
    /// Waits at most the deadline and one second more: a worker still inside an HSM call
    /// then (a hung HSM) is left behind, and this returns `false`; the library must then
    /// not be finalized, since a call is inside it.
    pub fn shutdown(mut self) -> bool {
        self.jobs.take();
        let until = Instant::now() + self.deadline + Duration::from_secs(1);
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Disconnected once every worker has ended.
        let all_ended = loop {
            match ended.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(()) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break true,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break false,
            }
        };
        drop(ended);
        if !all_ended {
            tracing::error!("an HSM call is still inside after the grace period; leaving it");
            return false;
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        tracing::info!("HSM workers stopped, working sessions closed");
        true
    }
}

fn worker(
    hsm: &Hsm,
    jobs: &Mutex<Receiver<Job>>,
    mut session: Option<(Session, Arc<Live>)>,
    metrics: &HsmMetrics,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
            Err(_) => break,
        };
        if session.as_ref().is_some_and(|(_, live)| live.is_down()) {
            close(&mut session, metrics);
        }
        if session.is_none() {
            match hsm.open_session() {
                Ok(s) => {
                    metrics.sessions.inc();
                    session = Some(s);
                }
                Err(e) => {
                    job(Err(e));
                    continue;
                }
            }
        }
        let Some((current, live)) = session.as_ref() else {
            job(Err(HsmError::Busy));
            continue;
        };
        let generation = live.generation();
        let fate = job(Ok(WorkerSession {
            session: current,
            generation,
            hsm,
            live,
        }));
        match fate {
            SessionFate::Keep => {}
            SessionFate::Close => close(&mut session, metrics),
            SessionFate::TakeDown => {
                // The failure says the HSM (not just this session) is gone: take the whole
                // generation down so that the next call re-establishes it.
                hsm.mark_down(generation);
                close(&mut session, metrics);
            }
        }
    }
    close(&mut session, metrics);
}

/// Closes a session while its generation is up (and kept up by the call guard). One of a
/// generation taken down is abandoned, never closed: after C_Finalize its handle number may
/// belong to a new session.
fn close(session: &mut Option<(Session, Arc<Live>)>, metrics: &HsmMetrics) {
    let Some((old, live)) = session.take() else {
        return;
    };
    metrics.sessions.dec();
    match live.enter() {
        Some(_in_call) => drop(old),
        None => std::mem::forget(old),
    }
}

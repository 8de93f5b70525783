//! A fixed set of threads, each owning one working session, fed by a bounded queue.
//!
//! HSM calls block; running them here keeps the async runtime's threads free. The queue is
//! bounded so that a slow HSM turns into fast 503s rather than an unbounded backlog, and a
//! session that fails with a transport-level error is discarded, never reused.
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
}

/// Runs on a worker's session; returns whether the session must be discarded.
type Job = Box<dyn FnOnce(Result<WorkerSession<'_>, HsmError>) -> bool + Send>;

/// Who owns a job's outcome: the worker once it starts the job, the caller once it stops
/// waiting for a job that had not started (the job is then skipped).
const PENDING: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

/// A job that gave no answer.
#[derive(Debug)]
pub struct NotAnswered {
    pub error: HsmError,
    /// Whether a worker started the job (and so did, or will do, what it says, answered or
    /// not); `false` means it never ran and never will.
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
    poisoned: bool,
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
        m.sessions_busy.inc();
        let started = Instant::now();
        let result = f(ws);
        m.latency.observe(started.elapsed().as_secs_f64());
        m.sessions_busy.dec();
        let label = result.as_ref().err().map_or("ok", outcome);
        m.calls.get_or_create(&HsmLabels { outcome: label }).inc();
        if result.as_ref().err().is_some_and(HsmError::poisons_session) {
            self.poisoned = true;
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
            let key = ws.hsm.handle_in(master, ws.generation)?;
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
            let key = ws.hsm.handle_in(master, ws.generation)?;
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
        for i in 0..sessions {
            let session = hsm.open_session()?;
            metrics.sessions.inc();
            let (hsm, rx, m) = (Arc::clone(&hsm), Arc::clone(&rx), Arc::clone(&metrics));
            let handle = std::thread::Builder::new()
                .name(format!("hsm-{i}"))
                .spawn(move || worker(&hsm, &rx, Some(session), &m))
                .map_err(|e| HsmError::Other(format!("cannot start HSM worker: {e}")))?;
            workers.push(handle);
        }
        Ok(Self {
            jobs: Some(tx),
            workers,
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
                return false;
            }
            let (session, unavailable) = match session {
                Ok(ws) => (Some(ws), None),
                Err(e) => (None, Some(e)),
            };
            let mut ks = KeySession {
                session,
                unavailable,
                poisoned: false,
                metrics: &m,
                answer: &answer,
            };
            let value = f(&mut ks);
            let discard = ks.poisoned;
            let _ = tx.send(value);
            discard
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
        let result = tokio::time::timeout(self.deadline, rx).await;
        // Tells a running job that nobody waits any more (it checks before it commits).
        drop(answered);
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(NotAnswered {
                error: HsmError::Other("HSM worker ended without answer".into()),
                started: true,
            }),
            Err(_) => {
                let started = claim
                    .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err();
                if !started {
                    return Err(not_run(HsmError::Timeout));
                }
                Err(NotAnswered {
                    error: HsmError::Timeout,
                    started,
                })
            }
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
    pub fn shutdown(mut self) {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(
    hsm: &Hsm,
    jobs: &Mutex<Receiver<Job>>,
    mut session: Option<(Session, Arc<Live>)>,
    metrics: &HsmMetrics,
) {
    // A session of a generation that was taken down is abandoned, never closed: after
    // C_Finalize its handle number may belong to a new session.
    let abandon = |session: &mut Option<(Session, Arc<Live>)>| {
        if let Some((old, _)) = session.take() {
            std::mem::forget(old);
            metrics.sessions.dec();
        }
    };
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
            Err(_) => break,
        };
        if session
            .as_ref()
            .is_some_and(|(_, live)| live.is_down() || live.generation() != hsm.generation())
        {
            abandon(&mut session);
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
        // Holds off the generation's C_Finalize while the job runs in it.
        let discard = {
            let Some(_in_call) = live.enter() else {
                job(Err(HsmError::Reconnecting));
                abandon(&mut session);
                continue;
            };
            job(Ok(WorkerSession {
                session: current,
                generation,
                hsm,
            }))
        };
        if discard {
            // The failure says the HSM (not just this session) is gone: take the whole
            // generation down so that the next call re-establishes it.
            hsm.mark_down(generation);
            abandon(&mut session);
        }
    }
    if session.as_ref().is_some_and(|(_, live)| live.is_down()) {
        abandon(&mut session);
    }
}

//! A fixed set of threads, each owning one working session, fed by a bounded queue.
//!
//! HSM calls block; running them here keeps the async runtime's threads free. The queue is
//! bounded so that a slow HSM turns into fast 503s rather than an unbounded backlog, and a
//! session that fails with a transport-level error is discarded, never reused.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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

    /// Runs `f` on a pooled session within the deadline.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WorkerSession<'_>) -> Result<T, HsmError> + Send + 'static,
    ) -> Result<T, HsmError> {
        let (tx, rx) = oneshot::channel();
        let m = Arc::clone(&self.metrics);
        let job: Job = Box::new(move |session| {
            m.queue_depth.dec();
            m.sessions_busy.inc();
            let started = std::time::Instant::now();
            let result = session.and_then(|ws| f(&ws));
            m.latency.observe(started.elapsed().as_secs_f64());
            m.sessions_busy.dec();
            let discard = result.as_ref().err().is_some_and(HsmError::poisons_session);
            let label = result.as_ref().err().map_or("ok", outcome);
            m.calls.get_or_create(&HsmLabels { outcome: label }).inc();
            let _ = tx.send(result);
            discard
        });
        let refused = |e: HsmError| {
            self.metrics
                .calls
                .get_or_create(&HsmLabels {
                    outcome: outcome(&e),
                })
                .inc();
            e
        };
        let jobs = self.jobs.as_ref().ok_or(HsmError::Busy).map_err(refused)?;
        self.metrics.queue_depth.inc();
        if let Err(e) = jobs.try_send(job) {
            self.metrics.queue_depth.dec();
            return Err(refused(match e {
                TrySendError::Full(_) => HsmError::Busy,
                TrySendError::Disconnected(_) => HsmError::Other("HSM workers stopped".into()),
            }));
        }
        match tokio::time::timeout(self.deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HsmError::Other("HSM worker ended without answer".into())),
            Err(_) => Err(refused(HsmError::Timeout)),
        }
    }

    /// Derives `card`'s admin key under `master` inside the HSM.
    pub async fn derive_admin_key(
        &self,
        master: &MasterKeyRef,
        derivation: &Derivation,
        card: CardId,
    ) -> Result<AdminKey, HsmError> {
        let key = master.clone();
        let derivation = derivation.clone();
        self.run(move |ws| {
            let key = ws.hsm.handle_in(&key, ws.generation)?;
            let session = ws.session;
            derive_admin_key(&mut SessionPrf { session, key }, &derivation, &card)
        })
        .await
    }

    /// The check value of a master key, computed now on a pooled session: proves that the
    /// key is there, usable, and still the same key.
    pub async fn master_key_kcv(&self, master: &MasterKeyRef) -> Result<Kcv, HsmError> {
        let key = master.clone();
        self.run(move |ws| {
            let key = ws.hsm.handle_in(&key, ws.generation)?;
            aes_kcv(&mut SessionPrf {
                session: ws.session,
                key,
            })
        })
        .await
    }

    /// Whether a pooled session answers (for readiness).
    pub async fn ping(&self) -> Result<(), HsmError> {
        self.run(|ws| {
            ws.session
                .get_session_info()
                .map(|_| ())
                .map_err(HsmError::from)
        })
        .await
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

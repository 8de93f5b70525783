//! A named background thread that runs a task again and again, an interval apart, until it
//! is stopped or dropped (so an early return cannot leave it running detached).

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Periodic {
    stop: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Periodic {
    /// Runs `task` `every` after it last ended (the first time `every` after the start). A
    /// task that panics is logged and not run again.
    pub fn spawn(
        name: &str,
        every: Duration,
        mut task: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = sync_channel::<()>(1);
        let thread_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    if std::panic::catch_unwind(AssertUnwindSafe(&mut task)).is_err() {
                        tracing::error!(thread = %thread_name, "background task panicked; stopped");
                        return;
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for the task under way, if any, to finish.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

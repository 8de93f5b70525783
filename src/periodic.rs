//! A named background thread that runs a task at a fixed interval until it is stopped or
//! dropped (so an early return cannot leave it running detached).

use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Periodic {
    stop: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Periodic {
    /// Runs `task` every `every`, the first time after one interval.
    pub fn spawn(
        name: &str,
        every: Duration,
        mut task: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    task();
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

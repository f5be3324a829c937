//! Long calls off the Python thread: the work runs on its own thread (inside the model's rayon
//! pool) with the GIL released, while the calling thread waits in short slices and lets Python
//! handle signals between them. Ctrl-C raises `KeyboardInterrupt` at once and sets the work's
//! cancel flag, which the work checks between prompt chunks and tokens.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    time::Duration,
};

use pyo3::{exceptions::PyRuntimeError, prelude::*};

use crate::engine::Engine;

/// How often a waiting call looks at Python's signals.
const POLL: Duration = Duration::from_millis(50);

/// Starts `job` on a new thread with a cancel flag and a sender for whatever it reports.
fn spawn_thread<T: Send + 'static>(
    job: impl FnOnce(&AtomicBool, &mpsc::Sender<T>) + Send + 'static,
) -> PyResult<(Receiver<T>, Arc<AtomicBool>)> {
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flag = Arc::clone(&cancel);
    std::thread::Builder::new()
        .name("xgen-worker".into())
        .spawn(move || job(&flag, &tx))
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a worker thread: {e}")))?;
    Ok((rx, cancel))
}

/// Starts `job` on a new thread, inside `engine`'s thread pool; it gets the engine, a cancel flag
/// and a sender for whatever it reports.
pub fn spawn<T: Send + 'static>(
    engine: &Arc<Engine>,
    job: impl FnOnce(&Engine, &AtomicBool, &mpsc::Sender<T>) + Send + 'static,
) -> PyResult<(Receiver<T>, Arc<AtomicBool>)> {
    let engine = Arc::clone(engine);
    spawn_thread(move |flag, tx| engine.pool.install(|| job(&engine, flag, tx)))
}

/// Runs `job` (which cannot be cancelled: loading a model) on its own thread; Ctrl-C returns
/// `KeyboardInterrupt` at once and the job's result is dropped when it ends.
pub fn run_uncancellable<R: Send + 'static>(
    py: Python<'_>,
    job: impl FnOnce() -> R + Send + 'static,
) -> PyResult<R> {
    let (rx, cancel) = spawn_thread(move |_, tx| {
        let _ = tx.send(job());
    })?;
    receive(py, &Mutex::new(rx), &cancel)?
        .ok_or_else(|| PyRuntimeError::new_err("the xgen worker thread failed (panicked)"))
}

/// The next message from a worker, waiting with the GIL released; `None` when the worker ended
/// without sending one (it panicked). A pending signal's exception (`KeyboardInterrupt` for
/// Ctrl-C) sets `cancel` and is returned.
pub fn receive<T: Send>(py: Python<'_>, rx: &Mutex<Receiver<T>>, cancel: &AtomicBool) -> PyResult<Option<T>> {
    loop {
        // `try_lock`: a second reader would wait for the lock holding the GIL the first needs.
        let got = py.detach(|| rx.try_lock().map(|rx| rx.recv_timeout(POLL)).map_err(|_| ()));
        match got {
            Err(()) => return Err(PyRuntimeError::new_err("the stream is being read by another thread")),
            Ok(Ok(message)) => return Ok(Some(message)),
            Ok(Err(RecvTimeoutError::Disconnected)) => return Ok(None),
            Ok(Err(RecvTimeoutError::Timeout)) => {
                if let Err(e) = py.check_signals() {
                    cancel.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }
}

/// Runs `job` on a worker and returns its result (see the module comment for Ctrl-C).
pub fn run<R: Send + 'static>(
    py: Python<'_>,
    engine: &Arc<Engine>,
    job: impl FnOnce(&Engine, &AtomicBool) -> R + Send + 'static,
) -> PyResult<R> {
    let (rx, cancel) = spawn(engine, move |e, flag, tx| {
        let _ = tx.send(job(e, flag));
    })?;
    receive(py, &Mutex::new(rx), &cancel)?
        .ok_or_else(|| PyRuntimeError::new_err("the xgen worker thread failed (panicked)"))
}

/// A receiver a Python object can hold (`Sync` through a lock) and the flag that stops its worker.
pub struct Channel<T> {
    rx: Mutex<Receiver<T>>,
    cancel: Arc<AtomicBool>,
}

impl<T: Send> Channel<T> {
    pub fn new(rx: Receiver<T>, cancel: Arc<AtomicBool>) -> Self {
        Self { rx: Mutex::new(rx), cancel }
    }

    /// The next message (see [`receive`]).
    pub fn next(&self, py: Python<'_>) -> PyResult<Option<T>> {
        receive(py, &self.rx, &self.cancel)
    }

    /// Asks the worker to stop at its next check.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl<T> Drop for Channel<T> {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

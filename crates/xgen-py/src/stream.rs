//! `xgen.TextStream`: the text of a generation as it becomes final, produced on a worker
//! thread; iterating waits with the GIL released, Ctrl-C or dropping the stream stops the worker.

use pyo3::{exceptions::PyRuntimeError, prelude::*};
use xgen_generate::GenerateError;

use crate::{errors::generate_error, worker::Channel};

/// What a generation worker reports.
pub enum Event {
    /// The next piece of text.
    Text(String),
    /// The end: why it stopped, or the error.
    Done(Result<&'static str, GenerateError>),
}

/// An iterator over the pieces of generated text (`str`), in order. After the last one,
/// `finish_reason` says why generation ended (`"stop"` or `"length"`).
#[pyclass(module = "xgen")]
pub struct TextStream {
    channel: Channel<Event>,
    /// `None` until the generation ends.
    #[pyo3(get)]
    finish_reason: Option<&'static str>,
}

impl TextStream {
    pub fn new(channel: Channel<Event>) -> Self {
        Self { channel, finish_reason: None }
    }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        if self.finish_reason.is_some() {
            return Ok(None);
        }
        loop {
            match self.channel.next(py)? {
                Some(Event::Text(text)) if text.is_empty() => continue,
                Some(Event::Text(text)) => return Ok(Some(text)),
                Some(Event::Done(Ok(reason))) => {
                    self.finish_reason = Some(reason);
                    return Ok(None);
                }
                Some(Event::Done(Err(e))) => return Err(generate_error(e)),
                None => return Err(PyRuntimeError::new_err("the xgen worker thread failed (panicked)")),
            }
        }
    }

    /// Stops the generation (its worker ends at the next token); further iteration ends.
    fn close(&mut self) {
        self.channel.cancel();
        self.finish_reason.get_or_insert("cancelled");
    }
}

//! Library errors as Python exceptions, with the command line's messages: bad settings and
//! inputs are `ValueError`, a model that is nowhere to be found `FileNotFoundError`, a
//! cancelled call `KeyboardInterrupt`, anything else `RuntimeError`.

use pyo3::{
    exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyValueError},
    PyErr,
};
use xgen_generate::GenerateError;
use xgen_model::ModelError;

/// The Python exception for a generation-library error.
pub fn generate_error(e: GenerateError) -> PyErr {
    let e = match e {
        GenerateError::Model(m) => return model_error(m),
        e => e,
    };
    match &e {
        GenerateError::NotFound(_) => PyFileNotFoundError::new_err(e.to_string()),
        GenerateError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(e.to_string())
        }
        GenerateError::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
        GenerateError::EmptyPrompt
        | GenerateError::NoRoom { .. }
        | GenerateError::ContextOverflow { .. }
        | GenerateError::Setting { .. }
        | GenerateError::Template(_)
        | GenerateError::Tokenizer(xgen_tokenizer::TokenizerError::Invalid { .. })
        | GenerateError::Json { .. } => PyValueError::new_err(e.to_string()),
        GenerateError::Model(_) | GenerateError::Tokenizer(_) | GenerateError::Io { .. } => {
            PyRuntimeError::new_err(e.to_string())
        }
    }
}

/// The Python exception for a model-library error.
pub fn model_error(e: ModelError) -> PyErr {
    match &e {
        ModelError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(e.to_string())
        }
        ModelError::NoWeights { .. } => PyFileNotFoundError::new_err(e.to_string()),
        ModelError::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
        ModelError::Json { .. }
        | ModelError::ConfigField { .. }
        | ModelError::UnknownPreset(..)
        | ModelError::TokenOutOfRange { .. }
        | ModelError::CacheFull { .. } => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

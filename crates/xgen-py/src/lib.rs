//! The `xgen` Python package's native module (`xgen._xgen`): `Tokenizer`, `Model` and
//! `TextStream` over the Rust libraries. Built by maturin into an abi3 wheel (CPython 3.9+);
//! `python/xgen` holds the package around it and its type stubs.

mod engine;
mod errors;
mod gen_args;
mod model;
mod prompts;
mod scoring;
mod stream;
mod tensors;
mod tokenizer;
mod worker;

use pyo3::prelude::*;

#[pymodule]
fn _xgen(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<tokenizer::Tokenizer>()?;
    m.add_class::<model::Model>()?;
    m.add_class::<stream::TextStream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

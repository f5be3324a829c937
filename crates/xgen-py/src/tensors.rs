//! Rows of token ids in and out of Python: lists, numpy arrays (`"np"`) or torch tensors
//! (`"pt"`), padding to the longest row, and reading ids back from any of those shapes.

use pyo3::{
    exceptions::{PyTypeError, PyValueError},
    prelude::*,
    types::{PyBool, PyByteArray, PyList, PyString},
};

/// What a call returns rows of ids as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    List,
    Numpy,
    Torch,
}

impl TensorKind {
    /// `return_tensors`: `None`, `"np"` or `"pt"`.
    pub fn parse(value: Option<&str>) -> PyResult<Self> {
        match value {
            None => Ok(TensorKind::List),
            Some("np") => Ok(TensorKind::Numpy),
            Some("pt") => Ok(TensorKind::Torch),
            Some(other) => Err(PyValueError::new_err(format!(
                "return_tensors: expected None, \"np\" or \"pt\", got {other:?}"
            ))),
        }
    }

    /// The kind of an input: numpy array, torch tensor or plain lists.
    pub fn of(value: &Bound<'_, PyAny>) -> Self {
        let module = value.get_type().module().map(|m| m.to_string()).unwrap_or_default();
        if module.starts_with("numpy") {
            TensorKind::Numpy
        } else if module.starts_with("torch") {
            TensorKind::Torch
        } else {
            TensorKind::List
        }
    }
}

/// Which end of a row padding goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    pub fn parse(value: &str) -> PyResult<Self> {
        match value {
            "left" => Ok(Side::Left),
            "right" => Ok(Side::Right),
            other => Err(PyValueError::new_err(format!(
                "padding_side: expected \"left\" or \"right\", got {other:?}"
            ))),
        }
    }
}

/// transformers' `padding`: `False`/`"do_not_pad"` or `True`/`"longest"`.
pub fn padding_arg(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(b.is_true());
    }
    match value.cast::<PyString>().ok().map(|s| s.to_cow().map(|c| c.into_owned())).transpose()?.as_deref() {
        Some("longest") => Ok(true),
        Some("do_not_pad") => Ok(false),
        _ => Err(PyValueError::new_err("padding: expected True, False, \"longest\" or \"do_not_pad\"")),
    }
}

/// Rows of ids and their attention masks, padded to the longest row when a pad id is given.
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
}

impl Batch {
    pub fn new(rows: Vec<Vec<u32>>, pad: Option<u32>, side: Side) -> Self {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len());
        let mut mask = Vec::with_capacity(rows.len());
        for row in rows {
            let n = match pad {
                Some(_) => longest - row.len(),
                None => 0,
            };
            let pad_id = pad.unwrap_or_default();
            let (mut r, mut m) = (Vec::with_capacity(row.len() + n), Vec::with_capacity(row.len() + n));
            if side == Side::Left {
                r.extend(std::iter::repeat_n(pad_id, n));
                m.extend(std::iter::repeat_n(0, n));
            }
            m.extend(std::iter::repeat_n(1, row.len()));
            r.extend(row);
            if side == Side::Right {
                r.extend(std::iter::repeat_n(pad_id, n));
                m.extend(std::iter::repeat_n(0, n));
            }
            ids.push(r);
            mask.push(m);
        }
        Batch { ids, mask }
    }
}

/// `rows` as `kind`: a list of lists, or an int64 `[rows, width]` array / tensor (rows of equal
/// length only; `name` is reported otherwise).
pub fn matrix<'py>(
    py: Python<'py>,
    rows: &[Vec<u32>],
    kind: TensorKind,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    if kind == TensorKind::List {
        return Ok(PyList::new(py, rows)?.into_any());
    }
    let width = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != width) {
        return Err(PyValueError::new_err(format!(
            "Unable to create tensor of {name}: its rows have different lengths; pass padding=True \
             to pad them to the longest"
        )));
    }
    let bytes: Vec<u8> = rows.iter().flatten().flat_map(|&v| i64::from(v).to_le_bytes()).collect();
    array(py, &bytes, "int64", &[rows.len(), width], kind)
}

/// A numpy array (or torch tensor) of `dtype` and `shape` over a copy of little-endian `bytes`.
pub fn array<'py>(
    py: Python<'py>,
    bytes: &[u8],
    dtype: &str,
    shape: &[usize],
    kind: TensorKind,
) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let buffer = PyByteArray::new(py, bytes); // writable, so the array is too
    let a = np.call_method1("frombuffer", (buffer, dtype))?.call_method1("reshape", (shape.to_vec(),))?;
    match kind {
        TensorKind::Torch => py.import("torch")?.call_method1("from_numpy", (a,)),
        TensorKind::List | TensorKind::Numpy => Ok(a),
    }
}

/// Token ids as given to a model: one sequence (`[ids]`) or a batch (`[[ids], ...]`), from
/// lists, tuples, numpy arrays or torch tensors. Returns the rows and whether it was a batch.
pub fn rows_arg(value: &Bound<'_, PyAny>, param: &str) -> PyResult<(Vec<Vec<i64>>, bool)> {
    let value = if value.hasattr("tolist")? { value.call_method0("tolist")? } else { value.clone() };
    if let Ok(row) = value.extract::<Vec<i64>>() {
        return Ok((vec![row], false));
    }
    match value.extract::<Vec<Vec<i64>>>() {
        Ok(rows) => Ok((rows, true)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{param}: expected token ids: a list of ints, a list of lists of ints, or a 1-D/2-D array"
        ))),
    }
}

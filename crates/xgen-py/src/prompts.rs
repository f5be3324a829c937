//! What `generate` is given and what it gives back, in transformers' shapes: a text or a list
//! of texts (text back), or ids as a list, a list of lists, a numpy array or a torch tensor, with
//! an optional `attention_mask` for left-padded rows (ids back: each row as given, its new
//! tokens, then `pad_token_id` up to the longest row, in the input's own kind).

use pyo3::{
    exceptions::{PyTypeError, PyValueError},
    prelude::*,
    types::{PyList, PyString},
};

use crate::tensors::{self, TensorKind};

/// The prompts of one call.
pub enum Prompts {
    Text { texts: Vec<String>, batch: bool },
    Ids(IdRows),
}

/// Prompts given as ids.
pub struct IdRows {
    /// The rows as given (padding included), for the output.
    pub given: Vec<Vec<u32>>,
    /// Each row's tokens without its left padding (per `attention_mask`).
    pub prompts: Vec<Vec<u32>>,
    pub batch: bool,
    pub kind: TensorKind,
}

impl Prompts {
    /// Reads `inputs` (positional) or `input_ids=`, and `attention_mask=`.
    pub fn parse(
        inputs: Option<&Bound<'_, PyAny>>,
        input_ids: Option<&Bound<'_, PyAny>>,
        attention_mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let value = match (inputs, input_ids) {
            (Some(v), None) | (None, Some(v)) => v,
            (Some(_), Some(_)) => {
                return Err(PyTypeError::new_err("give the prompt once: inputs or input_ids"))
            }
            (None, None) => return Err(PyTypeError::new_err("missing the prompt: a text or token ids")),
        };
        if value.is_instance_of::<PyString>() {
            return Ok(Prompts::Text { texts: vec![value.extract()?], batch: false });
        }
        if let Ok(list) = value.cast::<PyList>() {
            if list.len() > 0 && list.iter().all(|v| v.is_instance_of::<PyString>()) {
                return Ok(Prompts::Text { texts: value.extract()?, batch: true });
            }
        }
        let kind = TensorKind::of(value);
        let (rows, batch) = tensors::rows_arg(value, "input_ids")?;
        let given = rows.iter().map(|r| to_ids(r, "input_ids")).collect::<PyResult<Vec<_>>>()?;
        let prompts = match attention_mask {
            None => given.clone(),
            Some(mask) => unpad(&given, &tensors::rows_arg(mask, "attention_mask")?.0)?,
        };
        if given.is_empty() {
            return Err(PyValueError::new_err("input_ids: no rows"));
        }
        Ok(Prompts::Ids(IdRows { given, prompts, batch, kind }))
    }
}

/// Ids as u32, each checked to be at least 0.
fn to_ids(row: &[i64], param: &str) -> PyResult<Vec<u32>> {
    row.iter()
        .map(|&id| {
            u32::try_from(id).map_err(|_| PyValueError::new_err(format!("{param}: {id} is not a token id")))
        })
        .collect()
}

/// Each row without the positions its mask zeroes, which must all be on the left.
fn unpad(rows: &[Vec<u32>], mask: &[Vec<i64>]) -> PyResult<Vec<Vec<u32>>> {
    if mask.len() != rows.len() || mask.iter().zip(rows).any(|(m, r)| m.len() != r.len()) {
        return Err(PyValueError::new_err("attention_mask: its shape differs from input_ids'"));
    }
    rows.iter()
        .zip(mask)
        .enumerate()
        .map(|(i, (row, m))| {
            let start = m.iter().position(|&v| v != 0).unwrap_or(m.len());
            if m[start..].contains(&0) {
                return Err(PyValueError::new_err(format!(
                    "attention_mask: row {i} has padding on the right or inside; generation needs \
                     left padding (padding_side=\"left\")"
                )));
            }
            Ok(row[start..].to_vec())
        })
        .collect()
}

impl IdRows {
    /// The output rows: each given row (ragged rows left-padded to the widest), its new ids, and
    /// `pad` up to the longest output, as the input's kind (1-D in, 1-D out).
    pub fn output<'py>(&self, py: Python<'py>, new: &[Vec<u32>], pad: u32) -> PyResult<Bound<'py, PyAny>> {
        let width = self.given.iter().map(Vec::len).max().unwrap_or(0);
        let longest = new.iter().map(Vec::len).max().unwrap_or(0);
        let rows: Vec<Vec<u32>> = self
            .given
            .iter()
            .zip(new)
            .map(|(given, new)| {
                let mut row = vec![pad; width - given.len()];
                row.extend(given);
                row.extend(new);
                row.resize(width + longest, pad);
                row
            })
            .collect();
        let out = tensors::matrix(py, &rows, self.kind, "sequences")?;
        if self.batch {
            return Ok(out);
        }
        out.get_item(0)
    }
}

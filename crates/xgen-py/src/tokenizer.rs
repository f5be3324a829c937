//! `xgen.Tokenizer`: the exact XGen tokenizer (or a model's own, `Tokenizer.from_model`) with
//! tiktoken's `encode`/`decode` meaning and the call shape of a transformers tokenizer
//! (`tokenizer(text, return_tensors="np")`).

use std::{collections::HashSet, sync::Arc};

use pyo3::{
    exceptions::{PyKeyError, PyTypeError, PyValueError},
    prelude::*,
    types::{PyBytes, PyDict, PyList, PyString},
};
use xgen_tokenizer::{TokenId, Tokenizer as Core, TokenizerKind, EOS_TOKEN_ID};

use crate::tensors::{self, TensorKind};

/// `allowed_special` / `disallowed_special` as given: `"all"`, `"none"` or a collection of
/// special-token strings (a set, list or tuple).
#[derive(FromPyObject)]
enum SpecialsArg<'py> {
    Name(String),
    Tokens(Bound<'py, PyAny>),
}

/// `"all"`: the default of both arguments (the reference tokenizer's call).
fn all_specials<'py>() -> SpecialsArg<'py> {
    SpecialsArg::Name("all".to_string())
}

/// Which special strings a call treats as special tokens: tiktoken's `"all"`, a set of them, or
/// none (`"none"`, `()`, an empty set).
enum SpecialSet {
    All,
    Some(HashSet<TokenId>),
}

impl SpecialSet {
    fn contains(&self, id: TokenId) -> bool {
        match self {
            SpecialSet::All => true,
            SpecialSet::Some(ids) => ids.contains(&id),
        }
    }

    /// The set `value` names; `param` names the argument in errors.
    fn parse(core: &Core, value: &SpecialsArg<'_>, param: &str) -> PyResult<Self> {
        let tokens = match value {
            SpecialsArg::Name(name) => {
                return match name.as_str() {
                    "all" => Ok(SpecialSet::All),
                    "none" => Ok(SpecialSet::Some(HashSet::new())),
                    other => Err(PyValueError::new_err(format!(
                        "{param}: expected \"all\", \"none\" or a set of special tokens, got {other:?}"
                    ))),
                }
            }
            SpecialsArg::Tokens(tokens) => tokens,
        };
        let mut ids = HashSet::new();
        for item in tokens.try_iter().map_err(|_| {
            PyTypeError::new_err(format!("{param}: expected \"all\", \"none\" or a set of special tokens"))
        })? {
            let text: String = item?.extract()?;
            let id = core.special_token_id(&text).ok_or_else(|| {
                PyValueError::new_err(format!("{param}: {text:?} is not a special token of this vocabulary"))
            })?;
            ids.insert(id);
        }
        Ok(SpecialSet::Some(ids))
    }
}

/// The XGen-7B tokenizer (tiktoken's `gpt2` ranks, 38 whitespace-run tokens and 906 special
/// tokens; 51200 ids), embedded: no files are read.
#[pyclass(module = "xgen")]
pub struct Tokenizer {
    pub(crate) core: Arc<Core>,
    /// The id used to pad batches; `None` as in the reference (set it, e.g. to `eos_token_id`).
    #[pyo3(get, set)]
    pad_token_id: Option<u32>,
}

impl Tokenizer {
    pub fn with_core(core: Arc<Core>) -> Self {
        Self { core, pad_token_id: None }
    }

    /// What `skip_special_tokens` drops: XGen's reference drops `<|endoftext|>`; other
    /// tokenizers drop every special token, as transformers does.
    fn skipped(&self, id: TokenId) -> bool {
        match self.core.kind() {
            TokenizerKind::Xgen => id == EOS_TOKEN_ID,
            _ => self.core.is_special(id),
        }
    }

    /// tiktoken's `encode`: refuses disallowed special strings, then encodes recognising the
    /// allowed ones.
    fn encode_checked(
        &self,
        text: &str,
        allowed: &SpecialSet,
        disallowed: &SpecialSet,
    ) -> PyResult<Vec<TokenId>> {
        let refused = |id: TokenId| disallowed.contains(id) && !allowed.contains(id);
        if let Some((token, _)) = self.core.find_special_where(text, &refused) {
            return Err(PyValueError::new_err(format!(
                "Encountered text corresponding to disallowed special token {token:?}.\n\
                 If you want this text to be encoded as a special token, pass it to `allowed_special`, e.g. `allowed_special={{{token:?}, ...}}`.\n\
                 If you want this text to be encoded as normal text, disable the check for this token by passing `disallowed_special=(enc.special_tokens_set - {{{token:?}}})`.\n\
                 To disable this check for all special tokens, pass `disallowed_special=()`."
            )));
        }
        Ok(self.core.encode_allowing(text, &|id| allowed.contains(id)))
    }

    /// The special sets of a call.
    fn specials(
        &self,
        allowed: &SpecialsArg<'_>,
        disallowed: &SpecialsArg<'_>,
    ) -> PyResult<(SpecialSet, SpecialSet)> {
        Ok((
            SpecialSet::parse(&self.core, allowed, "allowed_special")?,
            SpecialSet::parse(&self.core, disallowed, "disallowed_special")?,
        ))
    }
}

/// Token ids from a Python int, sequence of ints or 1-D array; ids outside the vocabulary are a
/// `KeyError` as in tiktoken.
pub fn ids_arg(ids: &Bound<'_, PyAny>, n_vocab: u32) -> PyResult<Vec<TokenId>> {
    let raw: Vec<i64> = match ids.extract::<i64>() {
        Ok(one) => vec![one],
        Err(_) => {
            let kind = ids.get_type().name()?;
            ids.extract()
                .map_err(|_| PyTypeError::new_err(format!("expected token ids (ints), got {kind}")))?
        }
    };
    raw.into_iter()
        .map(|id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| id < n_vocab)
                .ok_or_else(|| PyKeyError::new_err(format!("Invalid token for decoding: {id}")))
        })
        .collect()
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Self::with_core(Arc::new(Core::xgen()))
    }

    /// The tokenizer of a model (a GGUF file, a directory with `tokenizer.json`, or a Hub id)
    /// without loading its weights; XGen's for XGen models.
    #[staticmethod]
    #[pyo3(signature = (model, *, revision = "main".to_string()), text_signature = "(model, *, revision='main')")]
    fn from_model(py: Python<'_>, model: String, revision: String) -> PyResult<Self> {
        let text = py
            .detach(|| {
                let source = xgen_generate::Source::resolve(&model, &revision)?;
                xgen_generate::ModelText::of(&source, &source.config()?)
            })
            .map_err(crate::errors::generate_error)?;
        Ok(Self::with_core(text.tokenizer))
    }

    /// Number of ids (51200 for XGen).
    #[getter]
    fn vocab_size(&self) -> u32 {
        self.core.n_vocab()
    }

    fn __len__(&self) -> usize {
        self.core.n_vocab() as usize
    }

    /// XGen: `<|endoftext|>` (50256), the end of a text and also its beginning (no BOS is added).
    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.core.special_ids().eos
    }

    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.core.special_ids().bos
    }

    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.core.special_ids().eos.and_then(|id| self.core.decode(&[id]).ok())
    }

    #[getter]
    fn bos_token(&self) -> Option<String> {
        self.core.special_ids().bos.and_then(|id| self.core.decode(&[id]).ok())
    }

    /// All 906 special tokens, text to id.
    #[getter]
    fn special_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (text, id) in self.core.special_tokens() {
            d.set_item(text, id)?;
        }
        Ok(d)
    }

    /// Text to ids. `allowed_special="all"` (the default, as the reference tokenizer calls it)
    /// turns every special-token string into its id; a set allows only those; `"none"` allows
    /// none. As in tiktoken, a special string that is not allowed raises `ValueError` unless
    /// `disallowed_special=()` (then it is encoded as ordinary text).
    #[pyo3(signature = (text, *, allowed_special = all_specials(), disallowed_special = all_specials()),
           text_signature = "(self, text, *, allowed_special='all', disallowed_special='all')")]
    fn encode(
        &self,
        py: Python<'_>,
        text: String,
        allowed_special: SpecialsArg<'_>,
        disallowed_special: SpecialsArg<'_>,
    ) -> PyResult<Vec<TokenId>> {
        let (allowed, disallowed) = self.specials(&allowed_special, &disallowed_special)?;
        py.detach(|| self.encode_checked(&text, &allowed, &disallowed))
    }

    /// Text to ids with every special string treated as ordinary text (for untrusted input).
    fn encode_ordinary(&self, py: Python<'_>, text: String) -> Vec<TokenId> {
        py.detach(|| self.core.encode_ordinary(&text))
    }

    /// `encode` of many texts, in parallel on all cores; results in input order.
    #[pyo3(signature = (texts, *, allowed_special = all_specials(), disallowed_special = all_specials()),
           text_signature = "(self, texts, *, allowed_special='all', disallowed_special='all')")]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        allowed_special: SpecialsArg<'_>,
        disallowed_special: SpecialsArg<'_>,
    ) -> PyResult<Vec<Vec<TokenId>>> {
        use rayon::prelude::*;
        let (allowed, disallowed) = self.specials(&allowed_special, &disallowed_special)?;
        py.detach(|| texts.par_iter().map(|t| self.encode_checked(t, &allowed, &disallowed)).collect())
    }

    /// Ids to text: the tokens' bytes as UTF-8 with invalid sequences replaced by U+FFFD
    /// (Python's `errors="replace"`). `skip_special_tokens` drops `<|endoftext|>`, as the
    /// reference does. Ids outside the vocabulary raise `KeyError`.
    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, py: Python<'_>, ids: &Bound<'_, PyAny>, skip_special_tokens: bool) -> PyResult<String> {
        let mut ids = ids_arg(ids, self.core.n_vocab())?;
        if skip_special_tokens {
            ids.retain(|&id| !self.skipped(id));
        }
        py.detach(|| self.core.decode(&ids)).map_err(|e| PyKeyError::new_err(e.to_string()))
    }

    /// `decode` of many id lists, in parallel.
    #[pyo3(signature = (batch, skip_special_tokens = false))]
    fn decode_batch(
        &self,
        py: Python<'_>,
        batch: &Bound<'_, PyAny>,
        skip_special_tokens: bool,
    ) -> PyResult<Vec<String>> {
        use rayon::prelude::*;
        let lists =
            batch.try_iter()?.map(|row| ids_arg(&row?, self.core.n_vocab())).collect::<PyResult<Vec<_>>>()?;
        py.detach(|| {
            lists
                .par_iter()
                .map(|ids| {
                    let kept: Vec<TokenId> = ids
                        .iter()
                        .copied()
                        .filter(|&id| !(skip_special_tokens && self.skipped(id)))
                        .collect();
                    self.core.decode(&kept)
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| PyKeyError::new_err(e.to_string()))
    }

    /// `{"input_ids", "attention_mask"}` for a text or a list of texts, as transformers
    /// tokenizers return them: lists, or arrays with `return_tensors="np"` (`"pt"` for torch).
    /// `padding=True` pads to the longest on `padding_side` with `pad_token_id`.
    #[pyo3(signature = (text, *, return_tensors = None, padding = None, padding_side = "right".to_string()))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        return_tensors: Option<String>,
        padding: Option<&Bound<'py, PyAny>>,
        padding_side: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let kind = TensorKind::parse(return_tensors.as_deref())?;
        let side = tensors::Side::parse(&padding_side)?;
        let pad = padding.map(tensors::padding_arg).transpose()?.unwrap_or(false);
        let single = text.is_instance_of::<PyString>();
        let texts: Vec<String> = if single {
            vec![text.extract()?]
        } else {
            text.extract().map_err(|_| PyTypeError::new_err("text: expected a str or a list of str"))?
        };
        let rows = py.detach(|| self.core.encode_batch(&texts, xgen_tokenizer::Specials::Recognize));
        let pad_id = match (pad, self.pad_token_id) {
            (false, _) => None,
            (true, Some(id)) => Some(id),
            (true, None) => {
                return Err(PyValueError::new_err(
                    "Asking to pad but the tokenizer does not have a padding token: set \
                     `tokenizer.pad_token_id` (e.g. to `tokenizer.eos_token_id`)",
                ))
            }
        };
        let batch = tensors::Batch::new(rows, pad_id, side);
        let out = PyDict::new(py);
        if single && kind == TensorKind::List {
            out.set_item("input_ids", &batch.ids[0])?;
            out.set_item("attention_mask", &batch.mask[0])?;
        } else {
            out.set_item("input_ids", tensors::matrix(py, &batch.ids, kind, "input_ids")?)?;
            out.set_item("attention_mask", tensors::matrix(py, &batch.mask, kind, "attention_mask")?)?;
        }
        Ok(out)
    }

    /// The token of each id: a special token's text as `str`, an ordinary token's bytes as
    /// `bytes` (tiktoken's `decode_single_token_bytes`).
    fn convert_ids_to_tokens<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let one = ids.extract::<i64>().is_ok();
        let tokens = ids_arg(ids, self.core.n_vocab())?
            .into_iter()
            .map(|id| match self.core.special_token(id) {
                Some(text) => Ok(PyString::new(py, text).into_any()),
                None => Ok(PyBytes::new(
                    py,
                    self.core.token_bytes(id).map_err(|e| PyKeyError::new_err(e.to_string()))?,
                )
                .into_any()),
            })
            .collect::<PyResult<Vec<_>>>()?;
        if one {
            return Ok(tokens.into_iter().next().expect("one id"));
        }
        Ok(PyList::new(py, tokens)?.into_any())
    }

    /// The id of each token, given as a special token's text or a token's bytes (or text);
    /// `KeyError` for anything that is not one whole token.
    fn convert_tokens_to_ids<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let lookup = |t: &Bound<'py, PyAny>| -> PyResult<TokenId> {
            let bytes: Vec<u8> = if let Ok(s) = t.cast::<PyString>() {
                s.to_cow()?.as_bytes().to_vec()
            } else if let Ok(b) = t.cast::<PyBytes>() {
                b.as_bytes().to_vec()
            } else {
                return Err(PyTypeError::new_err("expected tokens as str or bytes"));
            };
            self.core
                .token_id(&bytes)
                .ok_or_else(|| PyKeyError::new_err(format!("{t}: not a token of this vocabulary")))
        };
        if tokens.is_instance_of::<PyString>() || tokens.is_instance_of::<PyBytes>() {
            return Ok(lookup(tokens)?.into_pyobject(py)?.into_any());
        }
        let ids = tokens.try_iter()?.map(|t| lookup(&t?)).collect::<PyResult<Vec<_>>>()?;
        Ok(PyList::new(py, ids)?.into_any())
    }

    fn __repr__(&self) -> String {
        let eos = self.core.special_ids().eos.map_or("None".to_string(), |id| id.to_string());
        format!("xgen.Tokenizer(vocab_size={}, eos_token_id={eos})", self.core.n_vocab())
    }
}

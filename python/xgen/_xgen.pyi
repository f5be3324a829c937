"""Type stubs of the native module `xgen._xgen` (re-exported by `xgen`)."""

import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Literal, Optional, Union, final, overload

import numpy as np
import numpy.typing as npt

__all__ = ["Tokenizer", "Model", "TextStream", "__version__"]

__version__: str

_Ids = Union[Sequence[int], npt.NDArray[np.integer[Any]], Any]
_Rows = Union[Sequence[Sequence[int]], npt.NDArray[np.integer[Any]], Any]
_Specials = Union[Literal["all", "none"], Collection[str]]

@final
class Tokenizer:
    """The XGen-7B tokenizer: tiktoken's ``gpt2`` ranks, 38 whitespace-run tokens and 906
    special tokens (51200 ids), embedded; no files are read. ``Tokenizer.from_model`` gives
    another model's own tokenizer behind the same methods."""

    pad_token_id: Optional[int]
    """The id batches are padded with; ``None`` as in the reference (set it, e.g. to
    ``eos_token_id``, before ``padding=True``)."""

    def __init__(self) -> None: ...
    @staticmethod
    def from_model(model: str, *, revision: str = "main") -> Tokenizer:
        """The tokenizer of a model (a GGUF file's ``tokenizer.ggml.*``, a directory's
        ``tokenizer.json``, or a Hub id) without loading its weights; XGen's for XGen models."""
    @property
    def vocab_size(self) -> int:
        """51200 for XGen."""
    @property
    def eos_token_id(self) -> Optional[int]:
        """XGen: ``<|endoftext|>`` = 50256."""
    @property
    def bos_token_id(self) -> Optional[int]:
        """XGen: 50256 (the same token; no BOS is added by ``encode``)."""
    @property
    def eos_token(self) -> Optional[str]: ...
    @property
    def bos_token(self) -> Optional[str]: ...
    @property
    def special_tokens(self) -> dict[str, int]:
        """All 906 special tokens, text to id."""
    def __len__(self) -> int: ...
    def encode(
        self,
        text: str,
        *,
        allowed_special: _Specials = "all",
        disallowed_special: _Specials = "all",
    ) -> list[int]:
        """Text to ids, as tiktoken's ``encode``. With the defaults (the reference tokenizer's
        call) every special-token string becomes its id. A set allows only those; ``"none"``
        allows none. A special string that is not allowed raises ``ValueError`` unless
        ``disallowed_special=()``, which encodes it as ordinary text. No BOS/EOS is added."""
    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids with special-token strings as ordinary text (for untrusted input)."""
    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: _Specials = "all",
        disallowed_special: _Specials = "all",
    ) -> list[list[int]]:
        """``encode`` of every text, in parallel on all cores, in input order."""
    def decode(self, ids: Union[int, _Ids], skip_special_tokens: bool = False) -> str:
        """Ids to text; invalid UTF-8 becomes U+FFFD (``errors="replace"``).
        ``skip_special_tokens`` drops ``<|endoftext|>`` as the reference does. Ids outside the
        vocabulary raise ``KeyError``."""
    def decode_batch(self, batch: Sequence[_Ids], skip_special_tokens: bool = False) -> list[str]:
        """``decode`` of every row, in parallel."""
    @overload
    def __call__(
        self,
        text: str,
        *,
        return_tensors: None = None,
        padding: Union[bool, str] = False,
        padding_side: Literal["left", "right"] = "right",
    ) -> dict[str, list[int]]:
        """``{"input_ids", "attention_mask"}`` as transformers tokenizers return them: lists, or
        int64 ``[batch, length]`` arrays with ``return_tensors="np"`` (torch tensors with
        ``"pt"``). ``padding=True`` pads to the longest text with ``pad_token_id`` on
        ``padding_side`` (use ``"left"`` for ``Model.generate``)."""
    @overload
    def __call__(
        self,
        text: list[str],
        *,
        return_tensors: None = None,
        padding: Union[bool, str] = False,
        padding_side: Literal["left", "right"] = "right",
    ) -> dict[str, list[list[int]]]: ...
    @overload
    def __call__(
        self,
        text: Union[str, Sequence[str]],
        *,
        return_tensors: Literal["np", "pt"],
        padding: Union[bool, str] = False,
        padding_side: Literal["left", "right"] = "right",
    ) -> dict[str, Any]: ...
    @overload
    def convert_ids_to_tokens(self, ids: int) -> Union[str, bytes]:
        """A special token's text (``str``), or an ordinary token's bytes (``bytes``)."""
    @overload
    def convert_ids_to_tokens(self, ids: _Ids) -> list[Union[str, bytes]]: ...
    @overload
    def convert_tokens_to_ids(self, tokens: Union[str, bytes]) -> int:
        """The id of each whole token (a special token's text, or a token's bytes or text);
        ``KeyError`` otherwise."""
    @overload
    def convert_tokens_to_ids(self, tokens: list[Union[str, bytes]]) -> list[int]: ...

@final
class TextStream(Iterator[str]):
    """The new text of a generation, piece by piece as it becomes final."""

    finish_reason: Optional[str]
    """After the last piece: ``"eos"``, ``"stop"`` (a stop string) or ``"length"``;
    ``"cancelled"`` after ``close()``."""

    def __iter__(self) -> TextStream: ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stops the generation."""

@final
class Model:
    """A loaded XGen model (or another LLaMA-architecture model)."""

    def __new__(
        cls,
        model: str = "Salesforce/xgen-7b-8k-base",
        *,
        dtype: Literal["f32", "bf16", "f16", "q8_0", "q4_0", "q4_k"] = "bf16",
        threads: Optional[int] = None,
        revision: str = "main",
        random_weights: Optional[str] = None,
        cache_dir: Union[str, os.PathLike[str], None] = None,
        cache_disk_budget: Optional[int] = None,
    ) -> Model:
        """Loads ``model``: a directory (config.json + weights), a ``.gguf`` file, or a Hugging
        Face Hub id resolved through the HF cache (``HF_HOME``/``HF_HUB_CACHE``; downloaded when
        missing unless ``HF_HUB_OFFLINE=1``). ``dtype`` is how float checkpoints are held
        (q8_0/q4_0/q4_k quantize on load; a GGUF file keeps its stored types). ``threads``:
        compute threads (default all cores). ``random_weights``: a preset shape (``"xgen-7b"``,
        ``"small"``, ``"tiny"``) instead of ``model``, for benchmarks. ``cache_dir``: the disk
        prompt cache: each prompt's KV blocks are saved there and restored by any later call or
        process whose prompt starts with the same tokens (a document asked about again), its
        files kept within ``cache_disk_budget`` bytes when given. Missing files raise
        ``FileNotFoundError``. Ctrl-C while loading raises ``KeyboardInterrupt`` at once (the
        load already under way finishes in the background and is freed)."""
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def generation_config(self) -> dict[str, Any]:
        """The model's generation_config.json (what ``generate`` keywords override)."""
    @property
    def context_length(self) -> int: ...
    @property
    def dtype(self) -> str:
        """The weight format that runs (``"bf16"``, ``"q8_0"``, ...; a GGUF file's stored types,
        ``"q4_k+q6_k"`` when mixed)."""
    @property
    def threads(self) -> int: ...
    @property
    def cache_stats(self) -> Optional[dict[str, int]]:
        """The disk prompt cache's counts since loading (``None`` without ``cache_dir``):
        ``restored_tokens``, ``read_bytes``, ``written_bytes``, ``bad_files``, ``stored_bytes``.
        Waits for the saves in progress first."""
    @property
    def kv_cache(self) -> dict[str, int]:
        """The in-memory KV cache kept from the last one-prompt call: ``tokens`` (positions it
        holds: that call's prompt and answer, or what it had read when Ctrl-C stopped it) and
        ``reused`` (prompt tokens the last call took from it instead of computing)."""
    def reset(self) -> None:
        """Frees the in-memory KV cache kept from the last call (see ``kv_cache``)."""
    def generate(
        self,
        inputs: Any = None,
        *,
        input_ids: Any = None,
        attention_mask: Any = None,
        max_length: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        do_sample: Optional[bool] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        pad_token_id: Optional[int] = None,
        stop: Optional[Union[str, list[str]]] = None,
        seed: Optional[int] = None,
        truncate: Optional[Literal["left"]] = None,
        json_schema: Optional[Union[str, Mapping[str, Any]]] = None,
        regex: Optional[str] = None,
        grammar: Optional[str] = None,
        choice: Optional[list[str]] = None,
        prompt_lookup_num_tokens: Optional[int] = None,
        max_matching_ngram_size: Optional[int] = None,
    ) -> Any:
        """Continues prompts with transformers' ``generate`` semantics: the model's
        generation_config.json updated by the keywords given (XGen's: greedy, ``max_length``
        20 with the prompt included; ``max_new_tokens`` counts new tokens only; ``do_sample=True``
        samples with ``temperature``/``top_k`` (default 50)/``top_p``/``min_p``). Generation ends
        at an eos id, a ``stop`` string (not part of the text) or the budget.

        A text (or list of texts) gives back the new text (a list for a list). Ids give back full
        sequences (prompt + new tokens) in the input's kind: a list for a list, a list of rows,
        numpy array or torch tensor for a batch; rows of a batch are left-padded (with
        ``attention_mask`` marking the padding, as ``tokenizer(texts, padding=True,
        padding_side="left", return_tensors="np")`` gives) and finished rows are padded after
        their end with ``pad_token_id`` (default: the eos id). ``seed`` makes sampling
        repeatable. ``json_schema``/``regex``/``grammar`` (Lark)/``choice`` constrain the output.
        ``prompt_lookup_num_tokens=N`` (1-14) drafts up to N tokens copied from the prompt and
        output (n-grams up to ``max_matching_ngram_size``, default 3) and verifies them in one
        pass, as transformers' prompt lookup: same output, faster when the answer copies its
        input (a single prompt; batches decode plainly). Bad settings raise ``ValueError`` or ``TypeError``; Ctrl-C raises ``KeyboardInterrupt``."""
    def stream(self, inputs: Any = None, *, input_ids: Any = None, **kwargs: Any) -> TextStream:
        """Like ``generate`` for one prompt, yielding the new text as it becomes final."""
    @overload
    def chat(self, messages: Sequence[Mapping[str, str]], *, stream: Literal[False] = False, **kwargs: Any) -> str:
        """Answers the last user message of ``messages`` (``{"role": "system" | "user" |
        "assistant", "content": str}``) in the model's own chat template, or the XGen-Inst format
        for XGen models (system messages replace the header). Defaults: the model card's sampling (``do_sample=True, top_k=100``) and up to
        2048 new tokens; ``generate``'s keywords override them."""
    @overload
    def chat(self, messages: Sequence[Mapping[str, str]], *, stream: Literal[True], **kwargs: Any) -> TextStream: ...
    def logits(self, ids: Union[str, _Ids]) -> npt.NDArray[np.float32]:
        """The logits of every position, ``[len(ids), vocab_size]`` float32 (a text is encoded
        first)."""
    def nll(self, ids: Union[str, _Ids], *, window: Optional[int] = None, stride: Optional[int] = None) -> float:
        """Mean next-token negative log-likelihood (transformers' causal-LM loss with labels =
        ids). Sequences longer than ``window`` (default: the context) are scored in windows
        starting every ``stride`` tokens (default: half the window)."""
    def perplexity(self, ids: Union[str, _Ids], *, window: Optional[int] = None, stride: Optional[int] = None) -> float:
        """``exp(nll(ids))``."""

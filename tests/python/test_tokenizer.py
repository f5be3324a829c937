"""xgen.Tokenizer against the reference fixtures (tiktoken + tokenization_xgen.py) and tiktoken's
documented meaning of allowed_special / disallowed_special."""
import json
import os

import numpy as np
import pytest
import xgen

from conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizer")


def cases(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok():
    return xgen.Tokenizer()


def test_encode_equals_the_reference_on_every_case(tok):
    encode = cases("encode.jsonl")
    assert len(encode) == 1578
    for case in encode:
        assert tok.encode(case["text"]) == case["ids"], case["kind"]
    # The batch path (all cores, GIL released) gives the same ids in the same order.
    assert tok.encode_batch([c["text"] for c in encode]) == [c["ids"] for c in encode]


def test_decode_equals_the_reference_on_every_case(tok):
    decode = cases("decode.jsonl")
    for case in decode:
        assert tok.decode(case["ids"]) == case["text"], case["kind"]
    assert tok.decode_batch([c["ids"] for c in decode]) == [c["text"] for c in decode]
    # numpy rows and single ids are accepted as transformers users pass them
    assert tok.decode(np.array([464, 995, 318])) == "The world is"
    assert tok.decode(50256) == "<|endoftext|>"


def test_vocabulary_facts(tok):
    with open(os.path.join(FIXTURES, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    assert tok.vocab_size == len(tok) == vocab["n_vocab"] == 51200
    assert tok.eos_token_id == tok.bos_token_id == vocab["eos_token_id"]
    assert tok.eos_token == vocab["eos_token"]
    assert tok.special_tokens == vocab["special_tokens"]
    assert tok.pad_token_id is None  # pad_token=None in the reference
    for text, ident in vocab["special_tokens"].items():
        assert tok.convert_tokens_to_ids(text) == ident
        assert tok.convert_ids_to_tokens(ident) == text
    for added in vocab["added_mergeable_tokens"]:
        assert tok.convert_tokens_to_ids(added["text"]) == added["id"]
        assert tok.convert_ids_to_tokens(added["id"]) == added["text"].encode()
    assert tok.convert_ids_to_tokens([464, 50256]) == [b"The", "<|endoftext|>"]
    assert tok.convert_tokens_to_ids([b" world", "<sep>"]) == [995, 50317]
    with pytest.raises(KeyError):
        tok.convert_tokens_to_ids("<mask_0>")  # a look-alike, not a token


def special_cases():
    specials = set(xgen.Tokenizer().special_tokens.values())
    return [c for c in cases("encode.jsonl") if specials.intersection(c["ids"])]


def test_allowed_and_disallowed_special_follow_tiktoken(tok):
    specials = {v: k for k, v in tok.special_tokens.items()}
    checked = 0
    for case in special_cases():
        text, ids = case["text"], case["ids"]
        present = {specials[i] for i in ids if i in specials}
        # Allowing exactly the specials present gives the reference's ids.
        assert tok.encode(text, allowed_special=present) == ids
        # Allowing none: tiktoken refuses the text, naming the token.
        with pytest.raises(ValueError, match="disallowed special token"):
            tok.encode(text, allowed_special="none")
        with pytest.raises(ValueError, match="disallowed special token"):
            tok.encode(text, allowed_special=set())
        # Disabling the check encodes them as ordinary text: no special id, and it round-trips.
        plain = tok.encode(text, allowed_special="none", disallowed_special=())
        assert plain == tok.encode_ordinary(text)
        assert not set(plain) & set(specials) and tok.decode(plain) == text
        checked += 1
    assert checked > 20
    # A special not allowed but not disallowed either stays text; the allowed one is recognised.
    assert tok.encode("<sep>a<eom>", allowed_special={"<eom>"}, disallowed_special=()) == (
        tok.encode_ordinary("<sep>a") + [tok.special_tokens["<eom>"]]
    )
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", allowed_special={"<nope>"})


def test_call_returns_transformers_shapes(tok):
    one = tok("The world is")
    assert one == {"input_ids": [464, 995, 318], "attention_mask": [1, 1, 1]}
    arrays = tok("The world is", return_tensors="np")
    assert arrays["input_ids"].dtype == np.int64 and arrays["input_ids"].tolist() == [[464, 995, 318]]
    texts = ["The world is", "a<|endoftext|>b c d e"]
    lists = tok(texts)
    assert lists["input_ids"] == [tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="padding"):
        tok(texts, return_tensors="np")
    with pytest.raises(ValueError, match="padding token"):
        tok(texts, padding=True)
    tok.pad_token_id = tok.eos_token_id
    try:
        left = tok(texts, padding=True, padding_side="left", return_tensors="np")
    finally:
        tok.pad_token_id = None
    rows, mask = left["input_ids"].tolist(), left["attention_mask"].tolist()
    longest = max(len(tok.encode(t)) for t in texts)
    for t, row, m in zip(texts, rows, mask):
        n = len(tok.encode(t))
        assert len(row) == longest and row[longest - n:] == tok.encode(t)
        assert m == [0] * (longest - n) + [1] * n and row[: longest - n] == [50256] * (longest - n)


def test_bad_input_raises_python_errors(tok):
    with pytest.raises(KeyError):
        tok.decode([51200])
    with pytest.raises(KeyError):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode("abc")
    with pytest.raises(TypeError):
        tok.encode(123)
    with pytest.raises(ValueError, match="return_tensors"):
        tok("x", return_tensors="tf")

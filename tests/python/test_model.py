"""xgen.Model on the fixture models against transformers' outputs (expected.json,
last_logits.f32): greedy ids, batched left-padded generation, NLL, logits; transformers'
keyword semantics; errors; streaming, chat, Ctrl-C and the GIL."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import xgen

from conftest import ROOT

MODELS = os.path.join(ROOT, "tests", "fixtures", "models")


def expected(name):
    with open(os.path.join(MODELS, name, "expected.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module", params=["tiny-xgen-8k-bin", "tiny-xgen-8k-st"])
def fixture(request):
    name = request.param
    return name, xgen.Model(os.path.join(MODELS, name), dtype="f32"), expected(name)["float32"]


@pytest.fixture(scope="module")
def model():
    return xgen.Model(os.path.join(MODELS, "tiny-xgen-8k-bin"), dtype="f32")


def test_greedy_ids_equal_transformers(fixture):
    name, model, run = fixture
    for p in run["prompts"]:
        g = p["greedy"]
        assert model.generate(p["ids"], max_length=g["max_length"]) == g["sequence"], (name, p["name"])
        # max_new_tokens counts only new tokens; numpy in, numpy out with transformers' [1, n] shape
        out = model.generate(input_ids=np.array([p["ids"]]), max_new_tokens=len(g["new_ids"]))
        assert isinstance(out, np.ndarray) and out.tolist() == [g["sequence"]]


def test_nll_and_perplexity_equal_transformers(fixture):
    name, model, run = fixture
    for p in run["prompts"]:
        if p["mean_nll"] is None:
            with pytest.raises(ValueError, match="at least 2 tokens"):
                model.nll(p["ids"])
            continue
        nll = model.nll(p["ids"])
        assert abs(nll - p["mean_nll"]) / p["mean_nll"] < 1e-4, (name, p["name"], nll)
        assert abs(model.perplexity(p["ids"]) / np.exp(nll) - 1) < 1e-9


def test_logits_equal_transformers(fixture):
    name, model, run = fixture
    vocab = model.config["vocab_size"]
    path = os.path.join(MODELS, name, run["last_logits_file"])
    want = np.fromfile(path, dtype="<f4").reshape(len(run["prompts"]), vocab)
    for p, row in zip(run["prompts"], want):
        if p["n_tokens"] > 300:
            continue  # the 8000-token prompt: covered by greedy ids and NLL above
        logits = model.logits(p["ids"])
        assert logits.shape == (p["n_tokens"], vocab) and logits.dtype == np.float32
        err = np.abs(logits[-1] - row).max() / np.abs(row).max()
        assert err < 1e-4, (name, p["name"], err)
        # every position's log-softmax at the next token: the reference's next-token log-probs
        lp = logits[:-1] - np.log(np.exp(logits[:-1] - logits[:-1].max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits[:-1].max(1, keepdims=True)
        got = lp[np.arange(p["n_tokens"] - 1), p["ids"][1:]]
        assert np.allclose(got, p["next_token_logprobs"], rtol=1e-4, atol=1e-3), (name, p["name"])


def test_prompt_lookup_keeps_the_output(fixture):
    # transformers' prompt_lookup_num_tokens / max_matching_ngram_size: same greedy ids.
    name, model, run = fixture
    for p in run["prompts"]:
        g = p["greedy"]
        out = model.generate(p["ids"], max_length=g["max_length"], prompt_lookup_num_tokens=4, max_matching_ngram_size=2)
        assert out == g["sequence"], (name, p["name"])
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate([1, 2, 3], prompt_lookup_num_tokens=99)


def test_a_disk_prompt_cache_restores_a_prompt_with_the_same_output(fixture, tmp_path):
    name, _, run = fixture
    p = run["prompts"][-1]
    ids = (p["ids"] * 200)[:300]  # a few KV blocks of 64 positions
    plain = xgen.Model(os.path.join(MODELS, name), dtype="f32").generate(ids, max_new_tokens=5)
    first = xgen.Model(os.path.join(MODELS, name), dtype="f32", cache_dir=tmp_path)
    assert first.generate(ids, max_new_tokens=5) == plain
    stats = first.cache_stats
    assert stats["restored_tokens"] == 0 and stats["written_bytes"] > 0
    # Another process-like load restores the stored blocks: same ids, 256 positions not computed.
    second = xgen.Model(os.path.join(MODELS, name), dtype="f32", cache_dir=str(tmp_path))
    assert second.generate(ids, max_new_tokens=5) == plain
    assert second.cache_stats["restored_tokens"] == 256
    assert second.cache_stats["read_bytes"] == stats["written_bytes"]
    assert xgen.Model(os.path.join(MODELS, name), dtype="f32").cache_stats is None
    with pytest.raises(ValueError, match="cache_disk_budget"):
        xgen.Model(os.path.join(MODELS, name), dtype="f32", cache_disk_budget=1 << 20)


def test_left_padded_batch_equals_transformers(model):
    b = expected("tiny-xgen-8k-bin")["float32"]["batch"]
    assert b["padding_side"] == "left"
    out = model.generate(input_ids=np.array(b["input_ids"]), attention_mask=np.array(b["attention_mask"]),
                         max_new_tokens=b["max_new_tokens"])
    assert isinstance(out, np.ndarray) and out.tolist() == b["sequences"]
    # Ragged lists: each row its own prompt, left-padded in the output.
    rows = model.generate(b["prompts"], max_new_tokens=b["max_new_tokens"])
    assert [r[len(r) - len(n):] for r, n in zip(rows, b["new_ids"])] == b["new_ids"]


def test_text_in_text_out(model):
    tok = model.tokenizer
    p = next(p for p in expected("tiny-xgen-8k-bin")["float32"]["prompts"] if p["name"] == "code-line")
    text = tok.decode(p["ids"])
    assert tok.encode(text) == p["ids"]
    new = p["greedy"]["new_ids"]
    assert model.generate(text, max_length=p["greedy"]["max_length"]) == tok.decode(new)
    assert model.generate([text, text], max_new_tokens=len(new)) == [tok.decode(new)] * 2
    # the tokenizer's output goes straight in, as with transformers
    inputs = tok(text, return_tensors="np")
    assert model.generate(**inputs, max_new_tokens=len(new)).tolist() == [p["greedy"]["sequence"]]
    # streaming gives the same text, in pieces
    s = model.stream(text, max_new_tokens=len(new))
    pieces = list(s)
    assert "".join(pieces) == tok.decode(new) and len(pieces) > 1 and s.finish_reason == "length"


def test_transformers_keyword_semantics(model):
    ids = [464, 995, 318]
    greedy = model.generate(ids, max_new_tokens=12)
    # do_sample=False (XGen's default): greedy whatever the sampling keywords say
    assert model.generate(ids, max_new_tokens=12, temperature=0.7, top_k=3) == greedy
    # the default budget is generation_config's max_length 20, prompt included
    assert len(model.generate(ids)) == 20
    sampled = [model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert model.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, seed=5) == greedy
    # a stop string ends the text before it
    text = model.generate("The world is", max_new_tokens=12)
    cut = text[: len(text) // 2 + 1].split()[-1]
    assert model.generate("The world is", max_new_tokens=12, stop=cut) == text[: text.index(cut)]
    # an eos id ends generation after it; finished rows are padded with pad_token_id
    first_new = greedy[3]
    assert model.generate(ids, max_new_tokens=12, eos_token_id=first_new) == ids + [first_new]
    out = model.generate([ids, [464]], max_new_tokens=12, eos_token_id=first_new, pad_token_id=7)
    assert len(out[0]) == len(out[1]) and out[0] == ids + [first_new] + [7] * (len(out[0]) - 4)
    assert out[1][:3] == [7, 7, 464]  # the shorter prompt, left-padded


def test_constrained_output(model):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}
    text = model.generate("The world is", max_new_tokens=40, json_schema=schema)
    assert 0 <= json.loads(text)["n"] <= 99
    assert model.generate("The world is", max_new_tokens=10, choice=["yes", "no"]) in ("yes", "no")


def test_chat(model):
    answer = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=16, seed=3)
    assert isinstance(answer, str) and "###" not in answer and not answer.startswith("Assistant:")
    s = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=16, seed=3, stream=True)
    assert "".join(s).strip() == answer
    with pytest.raises(ValueError, match="last message"):
        model.chat([{"role": "assistant", "content": "Hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        model.chat([{"role": "robot", "content": "Hi"}])


def test_errors_name_the_problem(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        xgen.Model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError):
        xgen.Model(str(tmp_path))  # a directory without config.json
    with pytest.raises(ValueError, match="unknown dtype"):
        xgen.Model(os.path.join(MODELS, "tiny-xgen-8k-bin"), dtype="q3")
    with pytest.raises(ValueError, match="temperature"):
        model.generate([464], do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([464], do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model.generate([51200])
    with pytest.raises(ValueError, match="not a token id"):
        model.generate([-3])
    with pytest.raises(ValueError, match="max_length"):
        model.generate(list(range(30)))  # 30 prompt tokens > max_length 20
    with pytest.raises(ValueError, match="context"):
        model.generate([464], max_new_tokens=9000)
    with pytest.raises(ValueError, match="empty"):
        model.generate("")
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        model.generate([464], temprature=0.5)
    with pytest.raises(TypeError, match="max_new_tokens"):
        model.generate([464], max_new_tokens="ten")
    with pytest.raises(ValueError, match="json_schema"):
        model.generate([464], json_schema="{not json")
    with pytest.raises(ValueError, match="right"):
        model.generate(input_ids=[[464, 995]], attention_mask=[[1, 0]])


CALLS = {
    # a generation of 8000 tokens on the tiny model (tens of seconds)
    "generate": f"m = xgen.Model({os.path.join(MODELS, 'tiny-xgen-8k-bin')!r}, dtype='f32')\n"
                "go = lambda: m.generate([464], max_new_tokens=8000, eos_token_id=[])",
    # loading random weights of the 8-layer 7B shape (about 10 s)
    "load": "go = lambda: xgen.Model(random_weights='xgen-7b-8l', dtype='q4_0')",
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_ctrl_c_interrupts_a_long_call(call):
    """SIGINT during a long call raises KeyboardInterrupt at once (the call runs off the Python
    thread and polls for signals)."""
    script = (
        "import os, signal, threading, time, xgen\n"
        # Python leaves SIGINT ignored when it starts ignored (a background job of a shell without
        # job control, as some CI runners start tests): install the default handler explicitly.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"{CALLS[call]}\n"
        "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "t = time.time()\n"
        "try:\n"
        "    go()\n"
        "    print('finished', time.time() - t)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', time.time() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    word, seconds = out.stdout.split()
    assert word == "interrupted" and float(seconds) < 3, out


def test_ctrl_c_keeps_what_the_call_read():
    """A call stopped by Ctrl-C leaves the positions it computed in the model's KV cache: the next
    call with that prompt reuses them and returns what a cold model returns."""
    model = os.path.join(MODELS, "tiny-xgen-8k-st")
    script = (
        "import json, os, signal, threading, xgen\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"m = xgen.Model({model!r}, dtype='f32')\n"
        "prompt = ' '.join('word%d' % (i % 97) for i in range(1500))\n"
        "n = len(m.tokenizer.encode(prompt))\n"
        f"cold = xgen.Model({model!r}, dtype='f32').generate(prompt, max_new_tokens=8, do_sample=False)\n"
        "threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "try:\n"
        "    m.generate(prompt, max_new_tokens=4000, eos_token_id=[], do_sample=False)\n"
        "    print(json.dumps({'finished': True}))\n"
        "except KeyboardInterrupt:\n"
        "    kept = m.kv_cache['tokens']\n"
        "    again = m.generate(prompt, max_new_tokens=8, do_sample=False)\n"
        "    print(json.dumps({'n': n, 'kept': kept, 'reused': m.kv_cache['reused'], 'same': again == cold}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    r = json.loads(out.stdout)
    assert "finished" not in r, out
    assert r["kept"] > 0 and r["reused"] == min(r["kept"], r["n"] - 1), r
    assert r["same"], r
    m = xgen.Model(model, dtype="f32")
    m.generate("Hello there", max_new_tokens=3, do_sample=False)
    assert m.kv_cache["tokens"] > 0
    m.reset()
    assert m.kv_cache == {"tokens": 0, "reused": 0}


def test_the_gil_is_released_while_the_model_runs(model):
    done = threading.Event()

    def work():
        model.generate([464], max_new_tokens=400, eos_token_id=[])
        done.set()

    thread = threading.Thread(target=work)
    start = time.perf_counter()
    thread.start()
    ticks = 0
    while not done.is_set():
        ticks += 1  # Python keeps running beside the generation
    thread.join()
    assert time.perf_counter() - start > 0.05 and ticks > 10_000


def test_a_gguf_file_runs_as_in_the_cli(tmp_path):
    """`xgen quantize` output loads by path and generates the ids `xgen generate` prints."""
    from conftest import XGEN
    gguf = str(tmp_path / "tiny-q8_0.gguf")
    subprocess.run([XGEN, "quantize", "--model", os.path.join(MODELS, "tiny-xgen-8k-bin"), "--type", "q8_0",
                    "--out", gguf], check=True, capture_output=True)
    ids = [464, 995, 318]
    cli = subprocess.run([XGEN, "generate", "--model", gguf, "--prompt-ids", ",".join(map(str, ids)),
                          "--max-new-tokens", "16", "--json"], check=True, capture_output=True, text=True)
    model = xgen.Model(gguf, threads=1)
    assert model.threads == 1 and model.dtype.startswith("q8_0")  # the file's stored format runs
    assert model.generate(ids, max_new_tokens=16) == ids + json.loads(cli.stdout)["ids"]


TOKENIZERS = os.path.join(ROOT, "tests", "fixtures", "tokenizers")


def tokenizer_cases(fixture):
    with open(os.path.join(TOKENIZERS, "expected.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [(r["text"], r["ids"]) for r in rows if r["fixture"] == fixture]


@pytest.mark.parametrize("fixture", ["gpt2-slice.gguf", "gpt2-slice-hf", "spm.gguf"])
def test_a_models_own_tokenizer_equals_its_reference(fixture):
    # llama.cpp's ids for the GGUF files, HF tokenizers' for tokenizer.json (make.py there).
    tok = xgen.Tokenizer.from_model(os.path.join(TOKENIZERS, fixture))
    for text, ids in tokenizer_cases(fixture):
        assert tok.encode(text) == ids, text
    assert tok.vocab_size == 3260 or fixture == "spm.gguf"


def test_a_gguf_model_chats_in_its_template():
    path = os.path.join(TOKENIZERS, "gpt2-slice.gguf")
    model = xgen.Model(path)
    tok = model.tokenizer
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 3256
    text, ids = tokenizer_cases("gpt2-slice.gguf")[0]
    assert model.generate(ids, max_new_tokens=3)[: len(ids)] == ids
    answer = model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4, seed=1)
    assert isinstance(answer, str)
    assert tok.decode([3257, 3256], skip_special_tokens=True) == ""
    with pytest.raises(KeyError):
        tok.decode([3260])

"""lm-evaluation-harness (`lm_eval`, from PyPI, no torch) scores through `xgen serve`'s
`/v1/completions` (echo + logprobs, OpenAI's legacy semantics) with its remote tokenizer
(`/tokenizer_info`, `/tokenize`), offline, on tasks this test writes: a multiple-choice task
(batched prompts, 4 per request) and a loglikelihood_rolling (perplexity) task over several
windows. The loglikelihoods it records must equal the model's own (`Model.logits` normalised here,
tied to `Model.nll`) for the multiple choice, and `xgen perplexity` / `Model.nll` for the rolling
windows, within 1e-4."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xgen

from conftest import FIXTURE, XGEN, start_xgen

CHOICES = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "a small town in Texas"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "twenty-two"], "answer": 0},
    {"question": "Water boils at", "choices": ["100 degrees Celsius", "the weekend", "night"], "answer": 0},
]
WORDS = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
         "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
         "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
         "of despair.").split()


@pytest.fixture(scope="module")
def server():
    proc, base = start_xgen()
    yield base
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def model():
    return xgen.Model(FIXTURE, dtype="f32")


def rolling_text(tok, windows):
    """A text whose token count is a multiple of `windows` (so lm_eval's rolling windows are
    xgen perplexity's strided ones): (text, its ids)."""
    for k in range(20, len(WORDS) + 1):
        text = " ".join(WORDS[:k])
        ids = tok.encode(text)
        if len(ids) % windows == 0:
            return text, ids
    raise AssertionError("no prefix of WORDS has a token count divisible by the window count")


def write_task(tmp, name, output_type, docs, extra):
    data = tmp / f"{name}.json"
    data.write_text(json.dumps(docs))
    (tmp / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\noutput_type: {output_type}\n{extra}")


def run_lm_eval(base, tmp, tasks, max_length, batch_size):
    out = tmp / f"out-{tasks}-{max_length}"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"model=tiny,base_url={base}/v1/completions,tokenizer_backend=remote,max_length={max_length}",
            "--batch_size", str(batch_size), "--include_path", str(tmp), "--tasks", tasks,
            "--output_path", str(out), "--log_samples"]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    samples = {}
    for path in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        with open(path, encoding="utf-8") as f:
            samples[task] = [json.loads(line) for line in f]
    return samples


def loglikelihood(model, tok, context, continuation):
    """log p(continuation | context) as lm_eval asks it (its `_encode_pair`): the continuation's
    next-token log-probabilities from `Model.logits` of the whole sequence, normalised here in
    f64, checked against `Model.nll` of the same sequence. (Subtracting `nll(context)` instead
    would mix two runs whose rows round differently: ~1e-5 noise on this model's 50-nat tokens.)"""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    ids = ctx + whole[len(ctx):]
    logits = model.logits(ids).astype(np.float64)  # [n, vocab]
    top = logits.max(axis=1, keepdims=True)
    logprobs = logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
    per_token = logprobs[np.arange(len(ids) - 1), ids[1:]]  # log p(ids[i + 1] | ids[:i + 1])
    assert abs(-per_token.mean() / model.nll(ids) - 1) < 1e-6  # f32 rounding: nll runs n - 1 rows
    return per_token[len(ctx) - 1:].sum()


def test_multiple_choice_loglikelihoods_equal_model_nll(server, model, tmp_path):
    write_task(tmp_path, "xgen_choice", "multiple_choice", CHOICES,
               'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\n'
               "metric_list:\n  - metric: acc\n")
    samples = run_lm_eval(server, tmp_path, "xgen_choice", 2048, 4)["xgen_choice"]
    tok = model.tokenizer
    checked = 0
    for s in samples:
        for arg, resp in zip(s["arguments"].values(), s["resps"]):
            got = float(resp[0][0])
            want = loglikelihood(model, tok, arg["arg_0"], arg["arg_1"])
            assert abs(got - want) < 1e-4, (arg, got, want)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in CHOICES)


def test_rolling_loglikelihood_equals_xgen_perplexity(server, model, tmp_path):
    tok = model.tokenizer
    windows = 3
    text, ids = rolling_text(tok, windows)
    per_window = len(ids) // windows
    write_task(tmp_path, "xgen_rolling", "loglikelihood_rolling", [{"text": text}],
               'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    # lm_eval's windows predict max_length - 2 tokens each, after one token of context (the eos
    # first): xgen perplexity's windows of per_window + 1 tokens every per_window tokens.
    samples = run_lm_eval(server, tmp_path, "xgen_rolling", per_window + 2, 1)["xgen_rolling"]
    got = float(samples[0]["resps"][0][0])
    prefixed = [tok.eos_token_id] + ids
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(prefixed))
    r = subprocess.run([XGEN, "perplexity", "--model", FIXTURE, "--dtype", "f32", "--ids-file", str(ids_file),
                        "--window", str(per_window + 1), "--stride", str(per_window), "--json"],
                       capture_output=True, text=True, check=True)
    ppl = json.loads(r.stdout)
    assert ppl["windows"] == windows and ppl["scored_tokens"] == len(ids)
    want = -ppl["mean_nll"] * ppl["scored_tokens"]
    assert abs(got - want) < 1e-4, (got, want)
    # One window (the whole text): Model.nll too.
    one = run_lm_eval(server, tmp_path, "xgen_rolling", len(ids) + 2, 1)["xgen_rolling"]
    assert abs(float(one[0]["resps"][0][0]) + model.nll(prefixed) * len(ids)) < 1e-4

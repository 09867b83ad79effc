"""Typed, frozen run configuration.

Every config is a frozen dataclass with embedded defaults. YAML files under `configs/` set
some of the fields; dotted command-line overrides (`model.n_layers=2`) set others. A key that
is not a field is an error naming the key and the file. A nested dataclass may be given in
YAML as a string: the path of another YAML file (relative to the file naming it, or to the
repository's `configs/` folder), e.g. `model: model/tiny.yaml`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxttt.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A configuration file or override is wrong; the message names the key and the source."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MHCConfig:
    mode: str = "mhc"  # mhc (Sinkhorn H_res) | hc (unconstrained H_res) | none (plain residual, n=1)
    n_streams: int = 4  # expansion rate n
    alpha_init: float = 0.01  # initial gate for the dynamic part of every mapping
    sinkhorn_iters: int = 20  # t_max
    clamp: float = 15.0  # |H~_res| clamp before exp
    eps: float = 1e-6  # Sinkhorn denominator epsilon

    def validate(self) -> None:
        _check(self.mode in ("mhc", "hc", "none"), "mhc.mode", f"one of mhc|hc|none, got {self.mode!r}")
        _check(self.n_streams >= 1, "mhc.n_streams", "a positive integer")
        _check(self.sinkhorn_iters >= 1, "mhc.sinkhorn_iters", "a positive integer")
        _check(math.isfinite(self.alpha_init), "mhc.alpha_init", "a finite number")
        _check(self.clamp > 0, "mhc.clamp", "a positive number")
        _check(0 < self.eps < 1, "mhc.eps", "a value in (0, 1)")

    @property
    def streams(self) -> int:
        """Number of residual streams actually carried (1 for the plain residual baseline)."""
        return 1 if self.mode == "none" else self.n_streams


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192  # V: embedding rows (>= the tokenizer's pieces)
    n_layers: int = 4  # L: decoder blocks
    d_model: int = 256  # D: residual width (of each mHC stream)
    n_heads: int = 4  # H: query heads
    n_kv_heads: int | None = None  # G: key/value heads (GQA); None = n_heads
    d_head: int = 64  # K: width of one head
    d_ff: int = 704  # F: SwiGLU hidden width
    max_seq_len: int = 2048  # longest context (positions) the model is used with
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_fraction: float = 1.0  # fraction of d_head that is rotated (partial rotary)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # unembedding = embedding transposed
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat: bool = False  # rematerialise each block in the backward pass
    attention: str = "xla"  # xla | cudnn (fused kernel where available)
    mhc: MHCConfig = MHCConfig()  # the mHC residual stream (mode none = plain residual)
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2/2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    rope_scaling: str = "none"  # none | linear (positions / factor) | llama3 (Llama 3.1 bands)
    rope_factor: float = 1.0  # rope_scaling factor (linear, llama3)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_len/low are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_len/high are kept
    rope_original_max_len: int = 8192  # llama3: the context length the model was trained at

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rope_dim(self) -> int:
        return 2 * int(self.d_head * self.rope_fraction // 2)

    def validate(self) -> None:
        self.mhc.validate()
        _check(self.n_heads % self.kv_heads == 0, "model.n_kv_heads",
               f"a divisor of n_heads={self.n_heads}, got {self.kv_heads}")
        _check(0.0 <= self.rope_fraction <= 1.0, "model.rope_fraction", "a value in [0, 1]")
        for key in ("vocab_size", "n_layers", "d_model", "n_heads", "d_head", "d_ff", "max_seq_len"):
            _check(getattr(self, key) > 0, f"model.{key}", "a positive integer")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "float32|bfloat16|float16")
        _check(self.attention in ("xla", "cudnn"), "model.attention", "xla|cudnn")
        _check(self.param_dtype in ("float32", "bfloat16", "float16"), "model.param_dtype",
               "float32|bfloat16|float16")
        _check(math.isfinite(self.rope_theta) and self.rope_theta > 0, "model.rope_theta",
               "a finite number > 0")
        _check(0 < self.norm_eps < 1, "model.norm_eps", "a value in (0, 1)")
        _check(self.rope_scaling in ("none", "linear", "llama3"), "model.rope_scaling",
               f"none|linear|llama3, got {self.rope_scaling!r}")
        _check(self.rope_factor > 0, "model.rope_factor", "a positive number")
        _check(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
               "model.rope_high_freq_factor", "> model.rope_low_freq_factor > 0")
        _check(self.rope_original_max_len > 0, "model.rope_original_max_len", "a positive integer")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16  # r: inner width of every adapter A [in, r] B [r, out]
    alpha: float = 32.0  # the update A B is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input (training only)
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # projections adapted

    def validate(self) -> None:
        allowed = {"q", "k", "v", "o", "gate", "up", "down"}
        bad = [t for t in self.targets if t not in allowed]
        _check(not bad, "lora.targets", f"a subset of {sorted(allowed)}, got {bad}")
        _check(self.rank > 0, "lora.rank", "a positive integer")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "a value in [0, 1)")
        _check(math.isfinite(self.alpha) and self.alpha > 0, "lora.alpha", "a finite number > 0")


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel ways; -1: whatever devices remain after fsdp and tensor
    fsdp: int = 1  # ways parameters and optimizer state are sharded (ZeRO-3 style)
    tensor: int = 1  # tensor-parallel ways (heads, ffn)

    def validate(self, prefix: str = "mesh") -> None:
        _check(self.data >= 1 or self.data == -1, f"{prefix}.data", "a positive integer or -1")
        for key in ("fsdp", "tensor"):
            _check(getattr(self, key) >= 1, f"{prefix}.{key}", "a positive integer")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW after global-norm clipping; one for every loop (jaxttt.train.trainer)."""
    lr: float = 3e-4  # peak learning rate
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    weight_decay: float = 0.1  # decoupled, on matrices only (not norms, mHC gates, biases)
    grad_clip: float = 1.0  # max global L2 norm of the gradient; <= 0 = no clipping
    warmup_steps: int = 2000  # linear warm-up updates, capped at warmup_frac of the run; -1 = no cap
    warmup_frac: float = 0.1  # warm-up is at most this fraction of the run's updates
    schedule: str = "cosine"  # after warm-up: cosine | linear (decay to min_lr_ratio·lr) | constant
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and linear

    def validate(self, prefix: str = "optim") -> None:
        _check(math.isfinite(self.lr) and self.lr > 0, f"{prefix}.lr", "a finite number > 0")
        for key in ("b1", "b2"):
            _check(0.0 <= getattr(self, key) < 1.0, f"{prefix}.{key}", "a value in [0, 1)")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               f"{prefix}.weight_decay", "a finite number >= 0")
        _check(not math.isnan(self.grad_clip), f"{prefix}.grad_clip", "a number (<= 0 = off)")
        _check(self.warmup_steps >= -1, f"{prefix}.warmup_steps", "an integer >= -1")
        _check(0.0 <= self.warmup_frac <= 1.0, f"{prefix}.warmup_frac", "a value in [0, 1]")
        _check(self.schedule in ("cosine", "linear", "constant"), f"{prefix}.schedule",
               f"cosine|linear|constant, got {self.schedule!r}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", "a value in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""  # packed .bin; empty = build from the embedded default corpus
    val: str = ""  # packed .bin for validation; empty = held-out tail of the default corpus
    tokenizer: str = ""  # SentencePiece .model; empty = train one on the default corpus
    seq_len: int = 256  # T: tokens per training sequence
    batch_size: int = 8  # B: global batch (sequences per optimiser step, before accumulation)
    vocab_size: int = 2048  # for a tokenizer trained on the default corpus
    max_bytes: int = 4_000_000  # size cap of the embedded default corpus (train + val)

    def validate(self) -> None:
        for key in ("seq_len", "batch_size", "max_bytes"):
            _check(getattr(self, key) >= 1, f"data.{key}", "a positive integer")
        _check(self.vocab_size >= 16, "data.vocab_size", "an integer >= 16")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64  # M: tokens generated per completion (EOS stops a row earlier)
    temperature: float = 1.0  # logits / temperature; 0 = greedy
    top_p: float = 0.95  # nucleus: smallest set of tokens with this much probability; 1 = off
    top_k: int = 0  # keep the k likeliest tokens; 0 = off
    greedy: bool = False  # argmax decoding (ignores temperature, top_p, top_k)

    def validate(self, prefix: str = "sampling") -> None:
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", "a positive integer")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"{prefix}.temperature", "a finite number >= 0")
        _check(0.0 < self.top_p <= 1.0, f"{prefix}.top_p", "a value in (0, 1]")
        _check(self.top_k >= 0, f"{prefix}.top_k", "an integer >= 0 (0 = off)")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = ModelConfig()  # the decoder (a YAML path like model/tiny.yaml works)
    mesh: MeshConfig = MeshConfig()  # device mesh
    optim: OptimConfig = OptimConfig()  # optimizer and learning-rate schedule
    data: DataConfig = DataConfig()  # packed token data and batch shape
    steps: int = 200  # optimizer updates in the whole run
    grad_accum: int = 1  # micro-batches of data.batch_size sequences per update
    max_skipped: int = 10  # consecutive skipped updates (non-finite loss/gradient) that stop the run
    eval_every: int = 50  # updates between validation losses; 0 = no validation
    eval_batches: int = 4  # validation batches (of data.batch_size windows) per evaluation
    save_every: int = 100  # updates between checkpoints; 0 = only at the end (and on SIGTERM)
    keep: int = 3  # newest checkpoints kept (>= 1)
    log_every: int = 10  # updates between printed metric lines (metrics.jsonl gets every one)
    seed: int = 0  # the run's one seed: initialisation and data order
    run_dir: str = ""  # empty = runs/pretrain-<time>; never written into the run's config.yaml
    ckpt_dir: str = ""  # where checkpoints go (e.g. gs://BUCKET/x on TPU); empty = RUN/checkpoints

    def validate(self) -> None:
        self.model.validate()
        self.optim.validate()
        self.mesh.validate()
        self.data.validate()
        for key in ("steps", "grad_accum", "eval_batches", "keep", "log_every", "max_skipped"):
            _check(getattr(self, key) >= 1, key, "a positive integer")
        for key in ("eval_every", "save_every"):
            _check(getattr(self, key) >= 0, key, "an integer >= 0 (0 = off)")
        _check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
               f"<= model.max_seq_len={self.model.max_seq_len}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `jaxttt eval` and every SDFT gate measure: held-out perplexity + capability probes."""
    heldout: str = ""  # packed .bin; empty = the default corpus's val split, run's tokenizer
    probes: str = "probes/default.yaml"  # YAML list of capability probes; empty = none
    seq_len: int = 128  # T: tokens per held-out window
    windows: int = 32  # held-out windows scored (the same ones at every evaluation)
    batch_size: int = 8  # B: held-out windows per forward pass
    max_new_tokens: int = 24  # greedy tokens generated per capability probe

    def validate(self, prefix: str = "eval") -> None:
        for key in ("seq_len", "windows", "batch_size", "max_new_tokens"):
            _check(getattr(self, key) >= 1, f"{prefix}.{key}", "a positive integer")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    max_ppl_increase: float = 0.05  # relative; perplexity may rise at most 5%
    max_probe_drop: float = 0.0  # absolute drop in probe score allowed
    enabled: bool = True  # false: every block is accepted (evaluations still logged)
    reference: str = "block"  # compare after-eval with: block (its before-eval) | session (the
    #                           eval at session start: bounds drift accumulated over blocks)

    def validate(self, prefix: str = "gate") -> None:
        _check(self.reference in ("block", "session"), f"{prefix}.reference", "block|session")
        _check(math.isfinite(self.max_ppl_increase) and self.max_ppl_increase >= -1,
               f"{prefix}.max_ppl_increase", "a finite number >= -1 (a relative change)")
        _check(math.isfinite(self.max_probe_drop), f"{prefix}.max_probe_drop", "a finite number")


CHAT_MODES = ("auto", "on", "off")


def chat_mode(value: bool | str) -> str:
    """A `chat` setting as auto|on|off (YAML reads a bare on/off as true/false)."""
    return ("on" if value else "off") if isinstance(value, bool) else value


@dataclasses.dataclass(frozen=True)
class SDFTConfig:
    mesh: MeshConfig = MeshConfig()  # device mesh
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=256)  # student on-policy samples
    lora: LoRAConfig | None = None  # None = full-parameter student
    optim: OptimConfig = OptimConfig(lr=1e-5, b2=0.999, weight_decay=0.0, warmup_steps=0,
                                     schedule="constant")  # handoff E4: AdamW 1e-5, clip 1
    ema_decay: float = 0.999  # teacher τ, applied once per optimiser step
    kl_coef: float = 1.0  # weight of the distillation KL in the loss
    kl_direction: str = "reverse"  # reverse = KL(student||teacher) | forward = KL(teacher||student)
    kl_chunk: int = 64  # tokens per chunk of the full-vocabulary KL
    skip_loss_tokens: int = 0  # the first N generated tokens of each row carry no loss (paper code: 3)
    batch_size: int = 4  # B: examples per update (new + replayed)
    grad_accum: int = 1  # micro-batches per update
    steps_per_block: int = 20  # SDFT updates between evaluation gates
    blocks: int = 1  # gated blocks in the session
    replay_ratio: float = 0.2  # fraction of each batch drawn from the replay buffer
    replay_size: int = 50_000  # replay buffer capacity (examples)
    max_prompt_len: int = 256  # prompts are left-truncated to this many tokens
    gate: GateConfig = GateConfig()  # when a block is accepted (else reverted exactly)
    eval: EvalConfig = EvalConfig(probes="")  # what the gates compare before/after each block
    seed: int = 0  # the run's one seed: data order, replay, sampling, adapters
    objective: str = "sdft"  # sdft (on-policy self-distillation) | sft (cross-entropy on demos: baseline)
    keep: int = 3  # accepted checkpoints kept (orbax)
    chat: bool | str = "auto"  # prompts as a chat-template user turn: auto (if any) | on | off

    def validate(self) -> None:
        _check(self.objective in ("sdft", "sft"), "objective", "sdft|sft")
        _check(chat_mode(self.chat) in CHAT_MODES, "chat", "auto|on|off")
        self.optim.validate()
        _check(self.skip_loss_tokens >= 0, "skip_loss_tokens", "an integer >= 0")
        self.gate.validate()
        self.eval.validate()
        self.mesh.validate()
        self.sampling.validate()
        _check(math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", "a finite number >= 0")
        _check(self.kl_direction in ("reverse", "forward"), "kl_direction", "reverse|forward")
        for key in ("batch_size", "grad_accum", "steps_per_block", "blocks", "replay_size",
                    "kl_chunk", "max_prompt_len", "keep"):
            _check(getattr(self, key) >= 1, key, "a positive integer")
        _check(0.0 <= self.ema_decay <= 1.0, "ema_decay", "a value in [0, 1]")
        _check(0.0 <= self.replay_ratio <= 1.0, "replay_ratio", "a value in [0, 1]")
        if self.lora is not None:
            self.lora.validate()


@dataclasses.dataclass(frozen=True)
class DiscoverConfig:
    mesh: MeshConfig = MeshConfig()  # device mesh
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=256)  # rollout sampling
    lora: LoRAConfig = LoRAConfig()  # the adapters trained (the base model stays frozen)
    env: str = "toy"  # built-in name, package.module:ClassName or path/file.py:ClassName
    env_options: dict = dataclasses.field(default_factory=dict)  # env constructor keywords
    steps: int = 50  # ttt_steps
    rollouts: int = 64  # rollouts per step
    optim: OptimConfig = OptimConfig(lr=4e-5, b2=0.999, weight_decay=0.0, warmup_steps=0,
                                     schedule="constant")  # AdamW on the adapters
    adaptive_beta: bool = True  # solve beta per group so KL(q_beta || uniform) = gamma
    beta: float = 1.0  # used when adaptive_beta is off
    gamma: float = math.log(2.0)  # target KL(q_beta || uniform)
    beta_max: float = 1e6  # upper end of the beta search (bracket doubling from 1)
    kl_lambda: float = 0.1  # KL-to-θ0 shaping weight on the advantages (0 = off)
    kl_shaping: str = "sequence"  # sequence (A − λ·log-ratio of the whole action) | per_token_centered
    #                               (official code: each token's A − λ·(its log-ratio − batch mean))
    rollout_policy: str = "untruncated"  # untruncated: TTT rollouts at temperature 1, top_p 1, top_k 0
    #   (the policy the REINFORCE gradient is of) | truncated: sampling.* as set (biased if top_p
    #   < 1) | importance: sampling.* as set, each action weighted by min(1, π_θ/q) (truncated IS)
    puct_c: float = 2.0  # PUCT exploration constant c
    puct_variant: str = "handoff"  # handoff (handoff A.2 score) | official (TTT-Discover code)
    reuse: bool = True  # start from archive states chosen by PUCT (false: always the seed)
    archive_size: int = 1000  # states kept in the archive (seeds are never evicted)
    children_per_step: int = 2  # top new states added to the archive each step
    reward_timeout_s: float = 10.0  # wall-clock limit of one reward evaluation
    save_every: int = 10  # steps between adapter snapshots; 0 = only at the end
    hot_swap_eval: bool = False  # benchmark the adapter after every update
    seed: int = 0  # the run's one seed: sampling, adapters, baseline
    drop_equal_groups: bool = True  # a group whose rewards are all equal gives no gradient at all
    baseline: bool = True  # same-budget best-of-N from θ0 (steps × rollouts samples) beside TTT
    reward_workers: int = 4  # rewards evaluated concurrently (threads); envs must allow it
    chat: bool | str = "auto"  # prompts as a chat-template user turn: auto (if any) | on | off
    remat: bool = True  # the update recomputes θ's forward block by block in the backward pass
    #                     (keeps only block inputs; false: ~20% faster, more memory)

    def validate(self) -> None:
        self.lora.validate()
        _check(chat_mode(self.chat) in CHAT_MODES, "chat", "auto|on|off")
        _check(self.rollouts >= 2, "rollouts", "at least 2 (leave-one-out needs a group)")
        self.mesh.validate()
        self.sampling.validate()
        _check(math.isfinite(self.gamma) and self.gamma > 0, "gamma", "a finite number > 0")
        _check(math.isfinite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0")
        _check(math.isfinite(self.beta_max) and self.beta_max > 0, "beta_max", "a finite number > 0")
        _check(math.isfinite(self.kl_lambda) and self.kl_lambda >= 0, "kl_lambda",
               "a finite number >= 0")
        _check(math.isfinite(self.puct_c) and self.puct_c >= 0, "puct_c", "a finite number >= 0")
        self.optim.validate()
        _check(self.kl_shaping in ("sequence", "per_token_centered"), "kl_shaping",
               f"sequence|per_token_centered, got {self.kl_shaping!r}")
        _check(self.rollout_policy in ("untruncated", "truncated", "importance"), "rollout_policy",
               f"untruncated|truncated|importance, got {self.rollout_policy!r}")
        _check(self.puct_variant in ("handoff", "official"), "puct_variant",
               f"handoff|official, got {self.puct_variant!r}")
        _check(self.archive_size >= 1, "archive_size", "a positive integer")
        _check(self.steps >= 1, "steps", "a positive integer")
        _check(self.children_per_step >= 0, "children_per_step", "a non-negative integer")
        _check(self.save_every >= 0, "save_every", "a non-negative integer (0 = only at the end)")
        _check(self.reward_timeout_s > 0, "reward_timeout_s", "a positive number")
        _check(self.reward_workers >= 1, "reward_workers", "a positive integer")
        _check(self.lora.dropout == 0.0, "lora.dropout", "0 (log π_θ must be deterministic)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _check(ok: bool, key: str, expected: str) -> None:
    """The one range check: a ConfigError naming the key (`load` adds the file)."""
    if not ok:
        err = ConfigError(f"config key {key!r}: expected {expected}")
        err.key = key
        raise err


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp) -> type | None:
    """The dataclass inside `tp` (also `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field type `tp`, or raise naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if tp is type(None) or type(None) in args:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or _is_intlike(value)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _is_intlike(value: Any) -> bool:
    try:
        return float(value) == int(float(value))
    except (TypeError, ValueError):
        return False


def _resolve_path(ref: str, base: Path | None) -> Path:
    candidates = [Path(ref)]
    if base is not None:
        candidates.insert(0, base.parent / ref)
    candidates.append(CONFIGS_DIR / ref)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{base or '<cli>'}: config file {ref!r} not found (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)})")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: not valid YAML ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls, data: dict, source: str = "<dict>", prefix: str = "", base: Path | None = None):
    """Build dataclass `cls` from a nested dict; unknown keys are errors naming `source`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{source}: key {prefix + key!r}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown config key {prefix + key!r} (known keys: {known})")
        sub = _dataclass_of(hints[key])
        if sub is not None and isinstance(value, str):
            path = _resolve_path(value, base)
            value = from_dict(sub, _read_yaml(path), str(path), prefix + key + ".", path)
        elif sub is not None and isinstance(value, dict):
            default = getattr(cls(), key) if _has_default(fields[key]) else None
            value = _merge(default, value, sub, source, prefix + key + ".", base)
        elif sub is not None and value is not None and not dataclasses.is_dataclass(value):
            raise ConfigError(f"{where}: expected a mapping or a YAML path, got {value!r}")
        elif sub is None:
            value = _coerce(value, hints[key], where)
        kwargs[key] = value
    return cls(**kwargs)


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def _merge(default, patch: dict, sub, source: str, prefix: str, base: Path | None):
    """Apply a partial mapping `patch` on top of dataclass instance `default`."""
    built = from_dict(sub, patch, source, prefix, base)
    if default is None:
        return built
    changes = {k: getattr(built, k) for k in patch}
    return dataclasses.replace(default, **changes)


def apply_overrides(cfg, overrides: list[str]):
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a frozen dataclass."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. model.n_layers=2)")
        key, raw = item.split("=", 1)
        cfg = _set_path(cfg, key.strip().split("."), yaml.safe_load(raw), key.strip())
    return cfg


def _set_path(obj, parts: list[str], value: Any, full_key: str):
    cls = type(obj)
    names = {f.name for f in dataclasses.fields(cls)}
    head = parts[0]
    if head not in names:
        raise ConfigError(f"override {full_key!r}: unknown config key {head!r} in {cls.__name__} "
                          f"(known keys: {', '.join(sorted(names))})")
    if len(parts) == 1:
        new = from_dict(cls, {head: value}, "<command line>", "", None)
        return dataclasses.replace(obj, **{head: getattr(new, head)})
    child = getattr(obj, head)
    if child is None:
        child = _dataclass_of(_hints(cls)[head])()
    return dataclasses.replace(obj, **{head: _set_path(child, parts[1:], value, full_key)})


def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Load `cls` from YAML `path` (optional) plus dotted overrides, then validate."""
    cfg = cls()
    if path:
        p = _resolve_path(str(path), None)
        cfg = _merge(cfg, _read_yaml(p), cls, str(p), "", p)
    cfg = apply_overrides(cfg, list(overrides))
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{_source_of(getattr(e, 'key', None), path, overrides)}: {e}") from None
    return cfg


def _source_of(key: str | None, path, overrides) -> str:
    """Where a bad value came from: the override setting `key`, else the file, else defaults."""
    for item in overrides:
        name = item.split("=", 1)[0].strip()
        if key is not None and (name == key or key.endswith("." + name) or name.endswith("." + key)):
            return f"command-line override {item!r}"
    return str(path) if path else "<defaults>"


def to_dict(cfg) -> dict:
    """Plain nested dict (for saving next to checkpoints and reports)."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg, path: str | Path) -> None:
    write_yaml(to_dict(cfg), path)


def write_yaml(data: dict, path: str | Path) -> None:
    """A plain nested dict as YAML (keys in field order)."""
    Path(path).write_text(yaml.safe_dump(_plain(data), sort_keys=False))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x

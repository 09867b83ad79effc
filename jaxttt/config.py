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

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
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

    @property
    def streams(self) -> int:
        """Number of residual streams actually carried (1 for the plain residual baseline)."""
        return 1 if self.mode == "none" else self.n_streams


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # GQA: None = n_heads
    d_head: int = 64
    d_ff: int = 704
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # fraction of d_head that is rotated (partial rotary)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass
    attention: str = "xla"  # xla | cudnn (fused kernel where available)
    mhc: MHCConfig = MHCConfig()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rope_dim(self) -> int:
        return 2 * int(self.d_head * self.rope_fraction // 2)

    def validate(self) -> None:
        self.mhc.validate()
        _check(self.d_model == self.n_heads * self.d_head, "model.d_model",
               f"d_model == n_heads * d_head ({self.n_heads} * {self.d_head} = "
               f"{self.n_heads * self.d_head}), got {self.d_model}")
        _check(self.n_heads % self.kv_heads == 0, "model.n_kv_heads",
               f"a divisor of n_heads={self.n_heads}, got {self.kv_heads}")
        _check(0.0 <= self.rope_fraction <= 1.0, "model.rope_fraction", "a value in [0, 1]")
        for key in ("vocab_size", "n_layers", "d_model", "n_heads", "d_head", "d_ff", "max_seq_len"):
            _check(getattr(self, key) > 0, f"model.{key}", "a positive integer")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "float32|bfloat16|float16")
        _check(self.attention in ("xla", "cudnn"), "model.attention", "xla|cudnn")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def validate(self) -> None:
        allowed = {"q", "k", "v", "o", "gate", "up", "down"}
        bad = [t for t in self.targets if t not in allowed]
        _check(not bad, "lora.targets", f"a subset of {sorted(allowed)}, got {bad}")
        _check(self.rank > 0, "lora.rank", "a positive integer")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "a value in [0, 1)")


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: whatever devices remain after fsdp and tensor
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 2000  # clipped to 10% of total steps when the run is short
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""  # packed .bin; empty = build from the embedded default corpus
    val: str = ""  # packed .bin for validation; empty = held-out tail of the default corpus
    tokenizer: str = ""  # SentencePiece .model; empty = train one on the default corpus
    seq_len: int = 256
    batch_size: int = 8  # global batch (sequences per optimiser step, before accumulation)
    seed: int = 0
    vocab_size: int = 2048  # for a tokenizer trained on the default corpus
    max_bytes: int = 4_000_000  # size cap of the embedded default corpus (train + val)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    greedy: bool = False


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    steps: int = 200
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    keep: int = 3  # checkpoints kept
    log_every: int = 10
    seed: int = 0
    run_dir: str = ""  # empty = runs/pretrain-<time>
    ckpt_dir: str = ""  # where checkpoints go (e.g. gs://BUCKET/x on TPU); empty = RUN/checkpoints

    def validate(self) -> None:
        self.model.validate()
        _check(self.steps > 0, "steps", "a positive integer")
        _check(self.grad_accum >= 1, "grad_accum", "a positive integer")
        _check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
               f"<= model.max_seq_len={self.model.max_seq_len}")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    max_ppl_increase: float = 0.05  # relative; perplexity may rise at most 5%
    max_probe_drop: float = 0.0  # absolute drop in probe score allowed
    enabled: bool = True
    reference: str = "block"  # compare after-eval with: block (its before-eval) | session (the
    #                           eval at session start: bounds drift accumulated over blocks)


@dataclasses.dataclass(frozen=True)
class SDFTConfig:
    mesh: MeshConfig = MeshConfig()
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=256)
    lora: LoRAConfig | None = None  # None = full-parameter student
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # teacher τ
    kl_coef: float = 1.0
    kl_direction: str = "reverse"  # reverse = KL(student||teacher) | forward = KL(teacher||student)
    kl_chunk: int = 64  # tokens per chunk of the full-vocabulary KL
    batch_size: int = 4
    grad_accum: int = 1
    steps_per_block: int = 20  # SDFT updates between evaluation gates
    blocks: int = 1
    replay_ratio: float = 0.2
    replay_size: int = 50_000
    max_prompt_len: int = 256
    gate: GateConfig = GateConfig()
    probes: str = ""  # YAML list of capability probes; empty = none
    seed: int = 0
    objective: str = "sdft"  # sdft (on-policy self-distillation) | sft (cross-entropy on demos: baseline)
    heldout: str = ""  # packed .bin for the perplexity gate; empty = default corpus val, run's tokenizer
    eval_seq_len: int = 128  # tokens per held-out window
    eval_windows: int = 32  # held-out windows scored (the same ones at every evaluation)
    eval_batch_size: int = 8  # held-out windows per forward pass
    probe_max_new_tokens: int = 24  # greedy tokens generated per capability probe
    keep: int = 3  # accepted checkpoints kept (orbax)

    def validate(self) -> None:
        _check(self.objective in ("sdft", "sft"), "objective", "sdft|sft")
        _check(self.gate.reference in ("block", "session"), "gate.reference", "block|session")
        _check(self.kl_direction in ("reverse", "forward"), "kl_direction", "reverse|forward")
        for key in ("batch_size", "grad_accum", "steps_per_block", "blocks", "replay_size",
                    "kl_chunk", "max_prompt_len", "eval_seq_len", "eval_windows",
                    "eval_batch_size", "probe_max_new_tokens", "keep"):
            _check(getattr(self, key) >= 1, key, "a positive integer")
        _check(self.sampling.max_new_tokens >= 1, "sampling.max_new_tokens", "a positive integer")
        _check(0.0 <= self.ema_decay <= 1.0, "ema_decay", "a value in [0, 1]")
        _check(0.0 <= self.replay_ratio <= 1.0, "replay_ratio", "a value in [0, 1]")
        if self.lora is not None:
            self.lora.validate()


@dataclasses.dataclass(frozen=True)
class DiscoverConfig:
    mesh: MeshConfig = MeshConfig()
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=256)
    lora: LoRAConfig = LoRAConfig()
    env: str = "toy"  # built-in name or package.module:ClassName
    env_options: dict = dataclasses.field(default_factory=dict)
    steps: int = 50  # ttt_steps
    rollouts: int = 64  # rollouts per step
    lr: float = 4e-5
    adaptive_beta: bool = True
    beta: float = 1.0  # used when adaptive_beta is off
    gamma: float = math.log(2.0)  # target KL(q_beta || uniform)
    beta_max: float = 1000.0
    kl_lambda: float = 0.1
    puct_c: float = 2.0
    reuse: bool = True
    archive_size: int = 1000
    children_per_step: int = 2  # top new states added to the archive each step
    reward_timeout_s: float = 10.0
    save_every: int = 10
    hot_swap_eval: bool = False  # benchmark the adapter after every update
    seed: int = 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the adapters
    grad_clip: float = 1.0  # global-norm clip of the adapter gradient; <= 0 = off
    drop_equal_groups: bool = True  # a group whose rewards are all equal gives no gradient at all
    baseline: bool = True  # same-budget best-of-N from θ0 (steps × rollouts samples) beside TTT
    reward_workers: int = 4  # rewards evaluated concurrently (threads); envs must allow it

    def validate(self) -> None:
        self.lora.validate()
        _check(self.rollouts >= 2, "rollouts", "at least 2 (leave-one-out needs a group)")
        _check(self.gamma > 0, "gamma", "a positive number")
        _check(self.steps >= 1, "steps", "a positive integer")
        _check(self.sampling.max_new_tokens >= 1, "sampling.max_new_tokens", "a positive integer")
        _check(self.children_per_step >= 0, "children_per_step", "a non-negative integer")
        _check(self.save_every >= 0, "save_every", "a non-negative integer (0 = only at the end)")
        _check(self.reward_timeout_s > 0, "reward_timeout_s", "a positive number")
        _check(self.reward_workers >= 1, "reward_workers", "a positive integer")
        _check(self.lora.dropout == 0.0, "lora.dropout", "0 (log π_θ must be deterministic)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _check(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: expected {expected}")


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
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    """Plain nested dict (for saving next to checkpoints and reports)."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg, path: str | Path) -> None:
    d = to_dict(cfg)
    Path(path).write_text(yaml.safe_dump(_plain(d), sort_keys=False))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x

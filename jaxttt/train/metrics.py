"""Training metrics: FLOPs per token, MFU, and the run's JSONL / TensorBoard / progress bar.

`RUN/metrics.jsonl` gets one row per step (handoff I1):
    {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu" (when the device's peak
     is known), "wall_time"}
and one row per evaluation {"step", "val_loss", "val_ppl", "wall_time"}. TensorBoard events go
to `RUN/tb/`. Only process 0 writes anything.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import jax
from tqdm import tqdm

from jaxttt.config import ModelConfig
from jaxttt.runs import JsonlWriter, read_jsonl, rewind_jsonl  # noqa: F401 (re-exported)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# Peak dense bf16 FLOP/s per device (chip for TPUs); substrings of `device.device_kind`,
# most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: blocks, mHC projections, unembedding."""
    D, K, F, N = cfg.d_model, cfg.d_head, cfg.d_ff, cfg.mhc.streams
    attn = D * cfg.n_heads * K * 2 + D * cfg.kv_heads * K * 2  # q, o + k, v
    mlp = 3 * D * F
    mhc = 0 if cfg.mhc.mode == "none" else 2 * (N * D) * (2 * N + N * N)  # two phi per block
    return cfg.n_layers * (attn + mlp + mhc) + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, counted the MaxText way (forward + backward = 3x forward).

    6 * matmul params (incl. unembedding and the mHC phi projections)
    + 6 * L * T * H * K causal attention (QK^T and PV, halved for the causal mask)
    + 6 * 2L * (N*N*D + 2*N*D) mHC stream mixing (H_res X, H_pre X, H_post^T y).
    """
    attention = 6.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.d_head
    N, D = cfg.mhc.streams, cfg.d_model
    mixing = 0.0 if cfg.mhc.mode == "none" else 6.0 * 2 * cfg.n_layers * (N * N * D + 2 * N * D)
    return 6.0 * matmul_params(cfg) + attention + mixing


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU, other GPUs)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((peak for key, peak in PEAK_FLOPS if key in kind), None)


def mfu(tokens_per_s: float, flops_token: float, n_devices: int | None = None,
        peak: float | None = None) -> float | None:
    """Model FLOPs utilisation across all devices, or None when the peak is unknown."""
    peak = peak if peak is not None else peak_flops()
    if peak is None:
        return None
    return tokens_per_s * flops_token / (peak * (n_devices or jax.device_count()))


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
class MetricsLog:
    """JSONL + TensorBoard + tqdm for one run (no-ops on processes other than 0)."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, log_every: int,
                 enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.log_every = max(1, log_every)
        self.t0 = time.time()
        self._file = self._tb = None
        if self.enabled:  # a resumed run drops rows after start_step and a torn last line
            self._file = JsonlWriter(Path(run_dir) / METRICS_FILE, resume_step=start_step)
            self._tb = _tensorboard(Path(run_dir) / TB_DIR, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.enabled,
                        desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)  # log files: sparse

    def train(self, step: int, row: dict) -> None:
        """Record one training step's metrics; print a line every `log_every` steps."""
        row = self._write({"step": step, **row}, "train")
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                             refresh=False)
        if step % self.log_every == 0:
            self.print(format_row(row))

    def val(self, step: int, loss: float, ppl: float) -> None:
        row = self._write({"step": step, "val_loss": loss, "val_ppl": ppl}, "val")
        self.print(f"step {step}: val_loss {row['val_loss']:.4f} val_ppl {row['val_ppl']:.2f}")

    def print(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._tb.close()

    def _write(self, row: dict, prefix: str) -> dict:
        row = {**{k: v for k, v in row.items() if v is not None},
               "wall_time": round(time.time() - self.t0, 3)}
        if self.enabled:
            self._file.write(row)
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, row["step"])
        return row


def format_row(row: dict) -> str:
    mfu_txt = f" mfu {row['mfu']:.1%}" if "mfu" in row else ""
    skip_txt = " (update skipped)" if row.get("skipped") else ""
    return (f"step {row['step']}: loss {row.get('loss', math.nan):.4f} lr {row['lr']:.2e} "
            f"grad_norm {row.get('grad_norm', math.nan):.3f} tok/s {row['tokens_per_s']:.0f}"
            f"{mfu_txt}{skip_txt}")


def _tensorboard(log_dir: Path, start_step: int):
    from tensorboardX import SummaryWriter

    # purge_step hides events after the resumed step that a previous attempt wrote
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

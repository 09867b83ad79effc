"""One SEAL round on an in-memory base model: baseline eval -> LoRA fine-tune -> adapted eval.

The base model is split once into (graphdef, state); every request works on
`nnx.merge(graphdef, state, copy=True)`: fresh Variables over the (immutable) base arrays, so
the request's tree attaches its own adapters (`nnx.LoRAParam`) and trains only those through
the one trainer core (which donates only what it trains). Nothing is written into the base
arrays: when the request's tree and trainer are dropped the server holds the pristine base
again, bitwise (adapters gone, optimizer state gone).

Fine-tuning follows SEAL's `transformers.Trainer` call: AdamW (b2 0.999, no weight decay,
gradient clip 1.0), learning rate decaying linearly from `finetune_lr` to 0 without warmup,
`batch_size` sequences per micro-batch, `gradient_accumulation_steps` micro-batches per update,
sequences reshuffled every epoch. Evaluation is greedy, at most `max_new_tokens` new tokens.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxttt import sharding
from jaxttt.config import LoRAConfig, OptimConfig
from jaxttt.model import lora
from jaxttt.model.transformer import token_logprobs
from jaxttt.sampling import bucket, generate
from jaxttt.seal import grading, prompts
from jaxttt.seal.protocol import Limits, RequestError, TTTRequest, build_reply


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # greedy answers stop at the stop token or after this many new tokens (SEAL: 64)
    max_new_tokens: int = 64
    # answer prompt: auto (chat template when the tokenizer has one) | base | chat
    prompt_style: str = "auto"
    # projections that get adapters when a request names none (SEAL/peft for Qwen: q, v)
    lora_targets: tuple[str, ...] = ("q", "v")
    # training sequences are cut to this many tokens (SEAL: 2048), never past the model window
    max_seq_len: int = 2048
    # questions per compiled sampler call
    eval_batch: int = 64
    # AdamW as transformers.TrainingArguments defaults
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclasses.dataclass
class RoundResult:
    reply: dict
    timings: dict[str, float]  # baseline_eval_s, finetune_s, adapted_eval_s, total_s
    train: dict[str, Any]  # steps, tokens, epoch_loss, lr_first/lr_last, skipped, adapter dirs


class TTTEngine:
    def __init__(self, model: nnx.Module, tokenizer: Any, *, mesh=None,
                 grader: grading.Grader = grading.substring_grader,
                 cfg: EngineConfig = EngineConfig(), limits: Limits = Limits(),
                 keep_adapter_dir: str | Path | None = None):
        if lora.has_lora(model):
            raise ValueError("the base model already carries LoRA adapters; merge them first")
        self.mesh = mesh or sharding.single_device_mesh()
        self.tok = tokenizer
        self.grader = grader
        self.cfg = cfg
        self.limits = limits
        self.style = prompts.resolve_style(tokenizer, cfg.prompt_style)
        self.stop_id = prompts.stop_id(tokenizer)
        self.pad_id = int(tokenizer.pad_id)  # the sampler never bans a pad that is the EOS
        self.graphdef, self.base_state = nnx.split(model)
        self.model_cfg = model.cfg
        self.window = min(cfg.max_seq_len, model.cfg.max_seq_len)
        self.keep_adapter_dir = Path(keep_adapter_dir).absolute() if keep_adapter_dir else None
        self.rounds = 0

    # ------------------------------------------------------------------ one request
    def fresh_model(self) -> nnx.Module:
        """A new module tree over the pristine base arrays (no adapters)."""
        return nnx.merge(self.graphdef, self.base_state, copy=True)

    def run(self, req: TTTRequest) -> RoundResult:
        t0 = time.perf_counter()
        model = self.fresh_model()
        prompt_ids = self.prompt_ids(req)
        base_texts, base_ok = self.evaluate(model, req, prompt_ids, use_lora=False)
        t1 = time.perf_counter()
        timings = {"baseline_eval_s": t1 - t0, "finetune_s": 0.0, "adapted_eval_s": 0.0}
        if req.base_only:
            reply = build_reply(base_texts, base_ok, base_texts, base_ok)
            return RoundResult(reply, {**timings, "total_s": t1 - t0}, {"steps": 0})
        train = self.finetune(model, req)
        t2 = time.perf_counter()
        ad_texts, ad_ok = self.evaluate(model, req, prompt_ids, use_lora=True)
        t3 = time.perf_counter()
        if self.keep_adapter_dir is not None:
            train.update(self.save_adapter(model))
        self.rounds += 1
        timings.update(finetune_s=t2 - t1, adapted_eval_s=t3 - t2, total_s=t3 - t0)
        return RoundResult(build_reply(base_texts, base_ok, ad_texts, ad_ok), timings, train)

    def save_adapter(self, model: nnx.Module) -> dict[str, str]:
        """keep_adapter_dir/request_N: orbax adapters + lora.json, and final_adapter/ in peft
        format (SEAL's layout) when the model has a Hugging Face equivalent."""
        from jaxttt.model.convert import ConvertError
        from jaxttt.model.export import export_peft

        out = lora.save_adapters(model, self.keep_adapter_dir / f"request_{self.rounds:06d}")
        saved = {"adapter_dir": str(out)}
        try:
            saved["peft_dir"] = str(export_peft(model, out / "final_adapter"))
        except ConvertError as e:  # e.g. an mHC model: no peft names for its modules
            saved["peft_dir"] = f"not written: {e}"
        return saved

    # ------------------------------------------------------------------ evaluation
    def prompt_ids(self, req: TTTRequest) -> list[list[int]]:
        out = []
        room = self.model_cfg.max_seq_len - self.cfg.max_new_tokens
        for i, q in enumerate(req.eval_questions):
            ids = prompts.answer_prompt_ids(self.tok, q.question, self.style)
            if not 0 < len(ids) <= room:
                raise RequestError(f"eval_questions[{i}].question: its prompt is {len(ids)} "
                                   f"tokens; at most {room} fit before {self.cfg.max_new_tokens} "
                                   "new tokens in the model window")
            out.append(ids)
        return out

    def evaluate(self, model: nnx.Module, req: TTTRequest, prompt_ids: list[list[int]], *,
                 use_lora: bool) -> tuple[list[str], list[bool]]:
        """Greedy answers to every question, and the grader's verdicts."""
        texts: list[str] = []
        n = self.cfg.eval_batch
        if use_lora:
            model.eval()  # LoRA dropout off while answering
        for s in range(0, len(prompt_ids), n):
            chunk = prompt_ids[s:s + n]
            out = generate(model, chunk, jax.random.key(0), max_new_tokens=self.cfg.max_new_tokens,
                           greedy=True, eos_id=self.stop_id, pad_id=self.pad_id,
                           use_lora=use_lora)
            for ids in out.completions():
                if ids and ids[-1] == self.stop_id:
                    ids = ids[:-1]
                texts.append(self.tok.decode(ids))
        verdicts = grading.run_grader(self.grader, req.eval_questions, texts) if texts else []
        return texts, verdicts

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, model: nnx.Module, req: TTTRequest) -> dict[str, Any]:
        """Attach fresh adapters to `model` and train them on the request's sequences."""
        from jaxttt.train.trainer import Trainer

        rows = prompts.train_rows(self.tok, req.train_sequences, self.window,
                                  req.end_mask_substring)
        n_tokens = sum(len(ids) for ids, _ in rows)
        if n_tokens > self.limits.max_train_tokens:
            raise RequestError(f"train_sequences: {n_tokens} tokens exceeds the server's limit "
                               f"of {self.limits.max_train_tokens}")
        lora.add_lora(model, LoRAConfig(rank=req.lora_rank, alpha=req.lora_alpha,
                                        dropout=req.lora_dropout, targets=req.lora_targets),
                      seed=req.seed, mesh=self.mesh)
        model.train()
        trainer = Trainer(model, _loss_fn, self.optim_config(req), mesh=self.mesh,
                          total_steps=req.steps(), wrt=nnx.LoRAParam,
                          grad_accum=req.gradient_accumulation_steps, reduction="sum")
        width = min(bucket(max(len(ids) for ids, _ in rows)), self.window)
        metrics = [trainer.step(batch) for batch in self.batches(rows, req, width)]
        per_epoch = len(metrics) // req.finetune_epochs
        epoch_loss = [_token_mean(metrics[e * per_epoch:(e + 1) * per_epoch])
                      for e in range(req.finetune_epochs)]
        return {"steps": len(metrics), "tokens": n_tokens, "epoch_loss": epoch_loss,
                "lr_first": metrics[0]["lr"], "lr_last": metrics[-1]["lr"],
                "skipped": trainer.skipped}

    def optim_config(self, req: TTTRequest) -> OptimConfig:
        c = self.cfg
        return OptimConfig(lr=req.finetune_lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
                           grad_clip=c.grad_clip, warmup_steps=0, warmup_frac=0.0,
                           schedule="linear", min_lr_ratio=0.0)

    def batches(self, rows, req: TTTRequest, width: int):
        """One batch per update: batch_size x accumulation rows, reshuffled every epoch; a
        short last batch (and a micro-batch that does not split over the mesh's batch shards)
        is filled with rows without labels, which the summed loss ignores."""
        rng = np.random.default_rng(req.seed)
        per_step = req.rows_per_step
        micro = _round_up(req.batch_size, sharding.batch_shards(self.mesh))
        n_rows = micro * req.gradient_accumulation_steps
        empty = ([self.pad_id], 0)  # one token: nothing to predict
        for _ in range(req.finetune_epochs):
            order = rng.permutation(len(rows))
            for s in range(0, len(order), per_step):
                picked = [rows[i] for i in order[s:s + per_step]]
                batch = prompts.pack_rows(picked + [empty] * (n_rows - len(picked)), width,
                                          self.pad_id)
                if req.lora_dropout > 0:  # one key per row; a micro-batch uses its first
                    batch["dropout_key"] = rng.integers(0, 2**32, (n_rows, 2), np.uint32)
                yield batch


def _loss_fn(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
    """Summed next-token NLL over the trained labels (the trainer divides by `n_tokens` of the
    whole step, so accumulation weighs every label equally, as transformers does)."""
    if "dropout_key" in batch:
        _seed_dropout(model, batch["dropout_key"][0])
    logp_BT = token_logprobs(model(batch["tokens"]), batch["targets"])
    mask_BT = batch["mask"]
    return -jnp.sum(logp_BT * mask_BT), {"n_tokens": jnp.sum(mask_BT)}


def _seed_dropout(model: nnx.Module, key_data: jax.Array) -> None:
    """Give every Dropout of the (traced) model a stream from this micro-batch's key: the
    trainer carries no RNG state between updates, so the batch brings a fresh key each step."""
    key = jax.random.wrap_key_data(key_data)
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, nnx.Dropout) and m.rngs is not None:
            m.rngs = nnx.Rngs(dropout=jax.random.fold_in(key, i))["dropout"]


def _token_mean(metrics: list[dict]) -> float:
    """Mean loss per trained label over some steps (each step's loss is already per label)."""
    n = sum(m["n_tokens"] for m in metrics)
    return sum(m["loss"] * m["n_tokens"] for m in metrics) / max(n, 1.0)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k

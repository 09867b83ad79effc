"""Compare a converted run with `transformers` (evidence, outside the test suite).

    python -m jaxttt.model.compare_commands --run RUN [--gguf FILE] [--hf DIR] [--chat] [--speed]

Needs torch and transformers (+ accelerate for --gguf), which are NOT jaxttt dependencies:
install them in a separate environment. Prints max |Δlogit| and top-1 agreement against
transformers' model loaded from the GGUF file (its own loader) or from a Hugging Face
directory (e.g. the output of `jaxttt export`), five greedy chat answers with whether
transformers' greedy decode is token-identical, and sampler tokens/s at 16 rows × 64-token
prompt × 64 new tokens against `generate`, interleaved so both see the same machine load
(set OMP_WAIT_POLICY=PASSIVE on a shared machine: torch's spinning OpenMP threads collapse
under oversubscription).
"""
from __future__ import annotations

import argparse
import os
import time

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Once upon a time, in a land far away, there lived",
           "Photosynthesis is the process by which plants", "1, 2, 3, 5, 8, 13,"]
QUESTIONS = ["What is the capital of France?",
             "Write a Python function sum_list(xs) that returns the sum of a list.",
             "What is 12 + 7?", "Give me one tip for staying healthy.",
             "Translate 'good morning' into French."]


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxttt.runs import load_run
    from jaxttt.sampling import generate

    ap = argparse.ArgumentParser(prog="python -m jaxttt.model.compare_commands")
    ap.add_argument("--run", required=True)
    ap.add_argument("--gguf", default=None, help="compare with transformers' GGUF loader")
    ap.add_argument("--hf", default=None, help="compare with a Hugging Face directory")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count() or 1)))
    if args.gguf:
        where, kw = os.path.dirname(os.path.abspath(args.gguf)), {"gguf_file": os.path.basename(args.gguf)}
    else:
        where, kw = args.hf, {}
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
    htok = AutoTokenizer.from_pretrained(where, **kw)
    model, tok, _ = load_run(args.run)
    fwd = jax.jit(lambda m, x: m(x))

    worst, agree, n = 0.0, 0, 0
    texts = PROMPTS + ([tok.render_chat([{"role": "user", "content": "Name three primary colours."}])]
                       if tok.chat_template else [])
    for p in texts:
        ids = tok.encode(p)
        same_ids = htok(p, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        got = np.asarray(fwd(model, jnp.asarray([ids])))[0]
        worst = max(worst, float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        n += len(ids)
        print(f"  T={len(ids):3d} ids identical: {same_ids}  max|dlogit| {np.abs(got - ref).max():.2e}")
    print(f"PARITY: max|dlogit| = {worst:.2e}; top-1 agreement {agree}/{n}", flush=True)

    if args.chat:
        prompts = [tok.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
        out = generate(model, prompts, jax.random.key(0), max_new_tokens=96, greedy=True,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        for q, p, ids in zip(QUESTIONS, prompts, out.completions()):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([p]), max_new_tokens=96, do_sample=False,
                                  eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(p):]
            print(f"Q: {q}\nA: {tok.decode(ids)!r}\n   (transformers greedy identical: "
                  f"{ref.tolist()[:len(ids)] == ids})", flush=True)

    if args.speed:
        _speed(model, tok, hf, generate, args.rounds)
    return 0


def _speed(model, tok, hf, generate, rounds: int) -> None:
    import jax
    import numpy as np
    import torch

    B, P, M = 16, 64, 64
    base = tok.encode(" ".join(PROMPTS + QUESTIONS) * 8)
    prompts = [base[i * 7:i * 7 + P] for i in range(B)]

    def ours():
        t = time.time()
        o = generate(model, prompts, jax.random.key(1), max_new_tokens=M, temperature=1.0,
                     top_p=0.95, eos_id=None, pad_id=tok.pad_id)
        assert o.tokens.shape == (B, M)
        return time.time() - t

    def theirs():
        t = time.time()
        with torch.no_grad():
            o = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(B, P, dtype=torch.long),
                            max_new_tokens=M, min_new_tokens=M, do_sample=True, top_p=0.95,
                            temperature=1.0, pad_token_id=tok.pad_id)
        assert o.shape == (B, P + M)
        return time.time() - t

    first = ours()
    a, b = [], []
    for _ in range(rounds):
        b.append(theirs())
        a.append(ours())
    a, b = np.array(a), np.array(b)
    print(f"SPEED ({B} rows x {P}-token prompt x {M} new tokens, top_p 0.95, {rounds} interleaved "
          f"rounds; jaxttt first call incl. compile {first:.1f}s; load avg "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  jaxttt generate:       {B * M / a.mean():6.1f} tok/s (runs {', '.join(f'{x:.2f}' for x in a)} s)")
    print(f"  transformers generate: {B * M / b.mean():6.1f} tok/s (runs {', '.join(f'{x:.2f}' for x in b)} s)")
    print(f"  ratio {b.mean() / a.mean():.2f}x (per round {', '.join(f'{y / x:.2f}' for x, y in zip(a, b))})",
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

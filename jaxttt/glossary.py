"""The one glossary of dimension letters: a tensor's name ends in the letters of its axes.

`x_BTD` is [batch, time, model width]; `h_LNN` is one N x N matrix per layer. Each capital
letter means ONE thing everywhere in jaxttt; a lower-case letter is a part of the capital one
(`x_bAT`: this process's rows b of the global batch B). Other files refer here instead of
repeating the list.

Model and data
    B  batch rows (sequences, windows, prompts, or the rows of a packed batch)
    T  time: positions of a sequence (queries in attention)
    S  key / KV-cache slots attended over
    D  model width (of one mHC stream)
    F  feed-forward (SwiGLU) hidden width
    H  query heads
    G  key/value heads (GQA groups of query heads)
    Q  query heads per key/value head (H = G Q)
    K  width of one head
    V  vocabulary
    L  layers (blocks)
    N  mHC residual streams
    X  flattened positions B T (mHC mapping in a [N, N, X] layout)
    R  LoRA rank (A [in, R], B [R, out])
Sampling and training
    P  prompt tokens (left-padded)
    U  distinct prompts of one sampler call (each prefilled once, its cache shared)
    M  generated tokens per row (max_new_tokens)
    W  width of a packed prompt + completion row
    A  gradient-accumulation micro-batches of one update
    C  chunks (of the KL's positions; PonderTTT's chunks)
    J  TTT inner steps (PonderTTT)
TTT-Discover
    E  groups: start states expanded in one step, one group of rollouts each
    O  rollouts (outcomes) per group; the leave-one-out baseline is over O

"""

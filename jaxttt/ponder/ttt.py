"""TTT-Linear fast weights (the ttt-lm-jax layer, mini-batch dual form) with k inner updates.

Per head h the fast weight is a linear map f(x) = x W + b (W [K,K], b [K]) trained online on
the reconstruction loss  l_j(W) = 1/2 || LN(k_j W + b) - (v_j - k_j) ||^2  of each token j.
Tokens are processed in mini-batches of M. Inside a mini-batch every gradient is taken at the
weights the mini-batch started from (W0), and token i reads the weights
    W_i = W0 - sum_{j<=i} eta_ij grad l_j(W0),   eta_ij = base_lr * tok(i) * sigmoid(x_j w_h + c_h) / K
with tok(i) = max(1/(i+1) + learned offset_i, 0) (the reference `token_idx` schedule: token i
takes the mean gradient of the mini-batch prefix). Its output is z_i = q_i + LN(q_i W_i + b_i).
The dual form computes all W_i q_i at once with a causal [M,M] matrix instead of materialising
M weight matrices. The weights carried to the next mini-batch are W_M (row i = M-1 of eta).

`steps` (the PonderTTT action): 0 = SKIP (read-only: z = q + LN(q W0 + b0), no gradient is
computed at all), 1 = the reference layer, k > 1 = after the causal step, k-1 further gradient
steps on the same (already seen) mini-batch refine the weights handed to the NEXT mini-batch,
so outputs stay causal. Fast weights start from the learned (W0, b0) at every call (a chunk).
No RoPE and no causal conv on q/k (the reference's TTT-Linear variants add them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxttt.model.layers import param

ZEROS = jax.nn.initializers.zeros
ONES = jax.nn.initializers.ones
LN_EPS = 1e-6


def layer_norm(z, scale, bias):
    """LayerNorm over the last axis (float32)."""
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True)
    return (z - mu) * jax.lax.rsqrt(var + LN_EPS) * scale + bias


def recon_loss(W_KK, b_K, k_MK, v_MK, scale_K, bias_K):
    """Per-token l_j = 1/2||LN(k_j W + b) - (v_j - k_j)||^2 [M] (forward only)."""
    err_MK = layer_norm(k_MK @ W_KK + b_K, scale_K, bias_K) - (v_MK - k_MK)
    return 0.5 * jnp.sum(jnp.square(err_MK), axis=-1)


def recon_grad(W_KK, b_K, k_MK, v_MK, scale_K, bias_K):
    """(dl/dz [M,K], per-token loss l [M]) of the reconstruction loss above."""
    z_MK = k_MK @ W_KK + b_K
    out_MK, vjp = jax.vjp(lambda z: layer_norm(z, scale_K, bias_K), z_MK)
    err_MK = out_MK - (v_MK - k_MK)
    return vjp(err_MK)[0], 0.5 * jnp.sum(jnp.square(err_MK), axis=-1)


def mini_batch_step(state, inputs, *, steps: int, scale_K, bias_K):
    """One mini-batch of one head in dual form: (new (W, b), (z [M,K], loss at W0 [M]))."""
    W_KK, b_K = state
    q_MK, k_MK, v_MK, eta_MM = inputs
    g_MK, loss_M = recon_grad(W_KK, b_K, k_MK, v_MK, scale_K, bias_K)
    M = q_MK.shape[0]
    causal_MM = jnp.tril(jnp.ones((M, M), q_MK.dtype))
    attn_MM = causal_MM * (q_MK @ k_MK.T)
    b_bar_MK = b_K - (eta_MM * causal_MM) @ g_MK
    z_MK = q_MK @ W_KK - (eta_MM * attn_MM) @ g_MK + b_bar_MK
    out_MK = q_MK + layer_norm(z_MK, scale_K, bias_K)
    eta_last_M1 = eta_MM[-1][:, None]  # tok(M-1) * gate_j: the end-of-mini-batch step
    W_KK = W_KK - (eta_last_M1 * k_MK).T @ g_MK
    b_K = b_K - jnp.sum(eta_last_M1 * g_MK, axis=0)
    for _ in range(steps - 1):  # extra steps on the seen mini-batch: only later tokens see them
        g_MK, _ = recon_grad(W_KK, b_K, k_MK, v_MK, scale_K, bias_K)
        W_KK = W_KK - (eta_last_M1 * k_MK).T @ g_MK
        b_K = b_K - jnp.sum(eta_last_M1 * g_MK, axis=0)
    return (W_KK, b_K), (out_MK, loss_M)


def head_sequence(q_JMK, k_JMK, v_JMK, eta_JMM, W_KK, b_K, scale_K, bias_K, *, steps: int,
                  unroll: bool = False):
    """All mini-batches of one head of one sequence: (z [J,M,K], recon loss at W_j [J,M])."""
    if steps == 0:
        z_JMK = q_JMK @ W_KK + b_K
        return q_JMK + layer_norm(z_JMK, scale_K, bias_K), None
    step = lambda s, x: mini_batch_step(s, x, steps=steps, scale_K=scale_K, bias_K=bias_K)  # noqa: E731
    _, (z_JMK, loss_JM) = jax.lax.scan(step, (W_KK, b_K), (q_JMK, k_JMK, v_JMK, eta_JMM),
                                       unroll=unroll)
    return z_JMK, loss_JM


class TTTLinear(nnx.Module):
    """Multi-head TTT-Linear on [B,T,D] inputs; `self(x, steps)` -> (y [B,T,D], recon [B,T] | None)."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, mini_batch: int,
                 base_lr: float = 1.0, zero_out: bool = False, rngs: nnx.Rngs):
        D, H, K, M = d_model, n_heads, d_head, mini_batch
        self.n_heads, self.d_head, self.mini_batch, self.base_lr = H, K, M, base_lr
        self.wq = param(rngs, (D, H, K), ("embed", "heads", "head_dim"))
        self.wk = param(rngs, (D, H, K), ("embed", "heads", "head_dim"))
        self.wv = param(rngs, (D, H, K), ("embed", "heads", "head_dim"))
        self.wo = param(rngs, (H, K, D), ("heads", "head_dim", "embed"),
                        **({"init": ZEROS} if zero_out else {}))
        self.lr_w = param(rngs, (D, H), ("embed", "heads"))  # learnable per-token lr gate
        self.lr_b = param(rngs, (H,), ("heads",), init=ZEROS)
        self.token_idx_offset = param(rngs, (M,), (None,), init=ZEROS)
        self.w0 = param(rngs, (H, K, K), ("heads", "head_dim", None))  # fast-weight init
        self.b0 = param(rngs, (H, K), ("heads", "head_dim"), init=ZEROS)
        self.ttt_scale = param(rngs, (H, K), ("heads", "head_dim"), init=ONES)
        self.ttt_bias = param(rngs, (H, K), ("heads", "head_dim"), init=ZEROS)
        self.post_scale = param(rngs, (H * K,), ("norm",), init=ONES)
        self.post_bias = param(rngs, (H * K,), ("norm",), init=ZEROS)

    # ------------------------------------------------------------------ inputs
    def projections(self, x_BTD):
        """q, k, v as [B,H,J,M,K] and eta [B,H,J,M,M] (rows: reading token i, cols: token j)."""
        B, T, _ = x_BTD.shape
        M = self.mini_batch
        if T % M:
            raise ValueError(f"TTT: sequence length {T} is not a multiple of the mini-batch {M}")
        x_BTD = x_BTD.astype(jnp.float32)

        def heads(w_DHK):
            y_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, w_DHK[...])
            return y_BTHK.reshape(B, T // M, M, self.n_heads, self.d_head).transpose(0, 3, 1, 2, 4)

        gate_BTH = jax.nn.sigmoid(x_BTD @ self.lr_w[...] + self.lr_b[...])
        gate_BHJM = gate_BTH.reshape(B, T // M, M, self.n_heads).transpose(0, 3, 1, 2)
        tok_M = jnp.maximum(1.0 / jnp.arange(1, M + 1, dtype=jnp.float32)
                            + self.token_idx_offset[...], 0.0)
        eta_BHJMM = (self.base_lr / self.d_head) * tok_M[:, None] * gate_BHJM[..., None, :]
        return heads(self.wq), heads(self.wk), heads(self.wv), eta_BHJMM

    # ------------------------------------------------------------------ forward
    def fast(self, x_BTD, steps: int, *, unroll: bool = False):
        """The fast-weight outputs z [B,T,H*K] and the per-token recon loss [B,T] (None if SKIP).

        `unroll` unrolls the scan over mini-batches (same maths; XLA's cost analysis counts a
        loop body once, so FLOP counts are read from the unrolled program)."""
        q, k, v, eta = self.projections(x_BTD)
        B, H, J, M, K = q.shape
        per_head = jax.vmap(lambda *a: head_sequence(*a, steps=steps, unroll=unroll))  # heads
        per_seq = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None, None, None, None))  # over batch
        z_BHJMK, loss_BHJM = per_seq(q, k, v, eta, self.w0[...], self.b0[...],
                                     self.ttt_scale[...], self.ttt_bias[...])
        z_BTF = z_BHJMK.transpose(0, 2, 3, 1, 4).reshape(B, J * M, H * K)
        recon_BT = None if loss_BHJM is None else loss_BHJM.mean(axis=1).reshape(B, J * M)
        return z_BTF, recon_BT

    def __call__(self, x_BTD, steps: int, *, unroll: bool = False):
        z_BTF, recon_BT = self.fast(x_BTD, steps, unroll=unroll)
        z_BTF = layer_norm(z_BTF, self.post_scale[...], self.post_bias[...])
        H, K = self.n_heads, self.d_head
        y_BTD = jnp.einsum("btf,fd->btd", z_BTF, self.wo[...].reshape(H * K, -1))
        return y_BTD, recon_BT

    def recon_signal(self, x_BTD):
        """Per-token reconstruction loss at the initial weights [B,T] (the gating signal; no update)."""
        _, k, v, _ = self.projections(x_BTD)
        fn = lambda k_, v_, W, b, s, c: recon_loss(W, b, k_.reshape(-1, k_.shape[-1]),  # noqa: E731
                                                   v_.reshape(-1, v_.shape[-1]), s, c)
        loss_BHT = jax.vmap(jax.vmap(fn), in_axes=(0, 0, None, None, None, None))(
            k, v, self.w0[...], self.b0[...], self.ttt_scale[...], self.ttt_bias[...])
        return loss_BHT.mean(axis=1)

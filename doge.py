"""
Doge: a small language model with Dynamic Mask Attention and Cross-Domain Mixture of Experts.

The whole model in one file, read top to bottom: part 1 what it computes, part 2 the same
faster, part 3 checkpoints and the plumbing of generation. Doge is a decoder-only transformer that
differs from a GPT in three places:

1. Learnable residuals. Each block scales its residual stream by a learned vector before adding
   the sublayer output: h = input_residual * h + attn(norm(h)), and the same around the MLP.
2. Dynamic Mask Attention (DMAttn). Every key gets an additive bias computed from its *value*
   vector, dt = exp(A * softplus(dt_proj(v))), the same for every query (a zero-order-hold step
   of a state space model, read as an attention bias). A query that sees more than
   keep_window_size (W) keys keeps only the W with the largest bias. The bias does not depend on
   the query, so the kept sets are nested as the sequence grows, and generation needs at most W
   cached keys per layer: constant memory and time per token, with the quality of attention.
3. Cross-Domain Mixture of Experts (CDMoE, optional). A dense SwiGLU "shared expert" plus many
   tiny experts (one down vector and one up vector each), chosen per token by product-key
   routing. A dense checkpoint upcycles into a CDMoE one without changing its function.

Papers: "Wonderful Matrices" (Shi et al., 2024, the Doge architecture), "Trainable Dynamic Mask
Sparse Attention" (DMAttn), Mixture of a Million Experts / product keys (He 2024, Lample et al.
2019), Switch Transformers (the load-balancing loss), WSD schedules (Hu et al., MiniCPM).

The reference is transformers' `DogeForCausalLM`; our names follow its checkpoints (loading and
saving are a rename plus shape checks). On purpose, top-W ties break deterministically (larger
bias, then the later key), and CDMoE routes each token by its own router scores.
"""

import difflib
import functools
import hashlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_write, atomic_write_text  # files written whole or not at all

# ==============================================================================================
# PART 1 - THE MODEL: what it computes. Config, RMSNorm, RoPE, Dynamic Mask Attention (its
# definition as plain code first), the MLP and CDMoE, the block, the language model and the
# sequence classifier: a reader who stops at the end of this part has the whole architecture.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class DogeConfig:
    vocab_size: int = 32768
    hidden_size: int = 256  # D, the width of the residual stream
    intermediate_size: int = 512  # width of the SwiGLU MLP (the shared expert in CDMoE)
    num_hidden_layers: int = 8
    num_attention_heads: int = 2  # H query heads
    num_key_value_heads: int = 1  # Hkv key/value heads (grouped-query attention when < H)
    head_dim: int | None = None  # d; None means hidden_size // num_attention_heads
    hidden_dropout: float = 0.0  # dropout on each sublayer's output before the residual add
    hidden_act: str = "silu"
    initializer_range: float = 0.02  # std of the normal init of every matrix and embedding
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight
    max_position_embeddings: int = 2048  # dynamic RoPE starts stretching past this length
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(  # None, or dynamic NTK
        default_factory=lambda: {"rope_type": "dynamic", "factor": 4.0})
    keep_window_size: int = 2048  # W: each query attends to at most this many keys
    attention_bias: bool = False
    mlp_bias: bool = False
    # checkpoint layout: transformers' Doge normalises q and k per head and shares one dynamic
    # bias per key/value head; the older SmallDoges layout has no q/k norms and one bias per
    # query head. from_pretrained detects which from the weights.
    qk_norm: bool = True
    dt_per_query_head: bool = False
    # Cross-Domain Mixture of Experts
    is_moe: bool = False
    num_experts: int = 16384  # a perfect square: product-key routing picks (row, column) pairs
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss while training
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = 2

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads {self.num_key_value_heads} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.keep_window_size < 1:
            raise ValueError(f"keep_window_size must be at least 1, got {self.keep_window_size}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "dynamic"):
            raise ValueError(f"rope_type {rope_type!r} is not supported "
                             f"(use 'default' or 'dynamic')")
        if self.is_moe:
            if math.isqrt(self.num_experts) ** 2 != self.num_experts:
                raise ValueError(f"num_experts {self.num_experts} must be a perfect square")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be between "
                                 f"1 and num_experts {self.num_experts}")

    @property
    def bias_heads(self):
        """Hb, the heads with a dynamic bias of their own: one per key/value head (transformers
        layout) or one per query head (the older layout, dt_per_query_head)."""
        return self.num_attention_heads if self.dt_per_query_head else self.num_key_value_heads

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, raw):
        """Read a Hugging Face config.json dict (see config_from_json, part 3)."""
        return config_from_json(raw)

    def to_dict(self):
        """The config.json that transformers' DogeForCausalLM reads (see config_json, part 3)."""
        return config_json(self)


# Published shapes (SmallDoges). All use tied embeddings, 2048 positions, dynamic RoPE x4.
PRESETS = {
    "doge-20m": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                     num_attention_heads=2, num_key_value_heads=1),
    "doge-60m": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=4, num_key_value_heads=2),
    "doge-160m": dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=24,
                      num_attention_heads=6, num_key_value_heads=3),
    "doge-320m": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=32,
                      num_attention_heads=8, num_key_value_heads=4),
    "doge-40m-moe": dict(vocab_size=128256, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=1,
                         is_moe=True, num_experts=1024, num_experts_per_tok=8),
}


# ----------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x, weight, eps):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim, in float32 and cast back first.
    weight None leaves the scaling out (decoding folds it into the next matrix)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


class RMSNorm(nn.Module):

    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (rotate-half convention, dynamic NTK scaling)


def rope_cos_sin(config, positions, total_length, dtype):
    """cos and sin, each (T, head_dim), for the given positions, in the form apply_rope takes.
    A decoding step of rows at different positions gives total_length per row, positions + 1.

    Dynamic NTK: once the sequence (total_length) is longer than max_position_embeddings, the
    base grows so the lowest frequencies stretch over the longer context. The base depends on the
    current length only (transformers remembers the largest length seen; we do not)."""
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "dynamic":
        factor = scaling["factor"]
        stretch = factor * total_length / config.max_position_embeddings - (factor - 1)
        if isinstance(total_length, torch.Tensor):  # a decoding step's, on the device: (1,) or
            # one per row (B,), each row's base its own, (1 or B, 1)
            base = (base * stretch.clamp(min=1) ** (dim / (dim - 2))).unsqueeze(-1)
        elif total_length > config.max_position_embeddings:
            base = base * stretch ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, device=positions.device).float() / dim
    inv_freq = 1.0 / base ** exponents  # (d/2,)
    angles = positions.float()[:, None] * inv_freq  # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + d/2) of x (..., T, d) by the position's angles:
    (a, b) -> (a cos - b sin, b cos + a sin), computed as x * cos + (b, a) * (-sin, sin)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((second, first), dim=-1) * sin


# ----------------------------------------------------------------------------------------------
# Dynamic Mask Attention
#
# Query row i attends to the keys j <= i with logit q.k / sqrt(d) + dt[j], restricted to the
# keep_window_size (W) "best" visible keys, where best means larger dt, and among equal dt the
# later key.
#
# Key lifetimes. dt does not depend on the query, and the number of keys better than key j among
# keys 0..i only grows with i, so key j is kept exactly by the queries j <= i < death[j], where
# death[j] is the first query that sees W keys better than j. The whole dynamic mask is then
# kv <= q < death[kv], and death depends on dt alone (no gradient: the choice is discrete, dt's
# gradient flows through the bias).
#
# The three functions below are that definition as plain code, with dense (T, T) masks.


def better_than(dt):
    """The rule that ranks keys, for every pair: (B, Hb, T, T) bool, [..., j, kv] true when key j
    is better than key kv: a larger dt, or an equal dt and a later position."""
    position = torch.arange(dt.shape[-1], device=dt.device)
    dt_j, dt_kv = dt[..., :, None], dt[..., None, :]  # (B, Hb, T, 1), (B, Hb, 1, T)
    return (dt_j > dt_kv) | ((dt_j == dt_kv) & (position[:, None] > position))


def key_deaths_by_definition(dt, keep_window_size):
    """death (B, Hb, T) of the keys 0..T-1 with biases dt (B, Hb, T), by its definition:
    death[kv] is the first query q >= kv that sees keep_window_size keys better than kv, or T
    when none does. Dense and brute force (memory O(T^2) a head): key_lifetimes is fast."""
    length = dt.shape[-1]
    position = torch.arange(length, device=dt.device)
    better_seen = better_than(dt).cumsum(dim=-2)  # [..., q, kv]: keys j <= q better than kv
    sees_window = (better_seen >= keep_window_size) & (position[:, None] >= position)  # q >= kv
    first = sees_window.int().argmax(dim=-2)  # argmax returns the first of equal maxima
    return torch.where(sees_window.any(dim=-2), first, length)  # (B, Hb, T)


def attention_by_definition(q, k, v, dt, keep_window_size, scale):
    """DMAttn by its definition, with dense (T, T) masks: query q sees key kv when
    kv <= q < death[kv], with the score q.k * scale + dt[kv], then a softmax over what it sees.
    q (B, H, T, d); k, v (B, Hb, T, d), one head per bias head; dt (B, Hb, T). The H / Hb query
    heads h of a group share the bias head h // (H / Hb). Returns (B, H, T, d). Every path of
    part 2 computes exactly this, faster: it is their oracle in the tests."""
    groups = q.shape[1] // k.shape[1]
    death = key_deaths_by_definition(dt, keep_window_size)  # (B, Hb, T)
    position = torch.arange(dt.shape[-1], device=dt.device)
    sees = (position <= position[:, None]) & (position[:, None] < death.unsqueeze(-2))  # [q, kv]
    k, v, dt, sees = (t.repeat_interleave(groups, dim=1) for t in (k, v, dt, sees))  # H heads
    scores = q @ k.transpose(-1, -2) * scale + dt.unsqueeze(-2)  # (B, H, T, T)
    return scores.masked_fill(~sees, float("-inf")).softmax(dim=-1) @ v  # (B, H, T, d)


class DynamicMaskAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        heads, kv_heads, head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                     config.head_dim)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.bias_heads = config.bias_heads
        self.keep_window_size = config.keep_window_size
        self.scale = head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        self.A = nn.Parameter(torch.zeros(self.bias_heads))
        self.dt_proj = nn.Linear(kv_heads * head_dim, self.bias_heads, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, start=0):
        """x (B, T, D) at positions start.. -> (B, T, D). With a cache, the tokens continue the
        cached sequence, and the cache is updated."""
        batch, length, _ = x.shape
        # queries and keys take the same per-head norm and rotation: one stack of heads
        qk = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1)
        qk = qk.view(batch, length, self.heads + self.kv_heads, self.head_dim)
        norm_weight = self.qk_norm_weight()  # (H + Hkv, d)
        if norm_weight is not None:
            qk = rms_norm(qk, norm_weight, self.q_norm.eps)
        qk = apply_rope(qk.transpose(1, 2), cos, sin)  # (B, H + Hkv, T, d)
        q, k = qk.split((self.heads, self.kv_heads), dim=1)
        values = self.v_proj(x)
        v = values.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        dt = self.dynamic_bias(self.dt_proj(values)).transpose(1, 2)  # (B, Hb, T)
        k, v = self.to_bias_heads(k), self.to_bias_heads(v)
        # exactly attention_by_definition(q, k, v, dt, ...), by the fastest path (part 2)
        out = attend(q, k, v, dt, self.keep_window_size, self.scale, cache, start)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def qk_norm_weight(self):
        """The stacked heads' per-head RMSNorm weights (H + Hkv, d), or None (older layout)."""
        if not hasattr(self, "q_norm"):
            return None
        return torch.cat((self.q_norm.weight.expand(self.heads, -1),
                          self.k_norm.weight.expand(self.kv_heads, -1)))

    def dynamic_bias(self, dt_logits):
        """Each key's bias dt (..., Hb) from dt_proj's output: a zero-order-hold step size."""
        return torch.exp(self.A * F.softplus(dt_logits))

    def to_bias_heads(self, keys):
        """Keys or values (B, Hkv, ...) as one head per bias head (B, Hb, ...): in the older
        layout every query head has its own dt, so its own copy of the keys."""
        if self.bias_heads == self.kv_heads:
            return keys
        return keys.repeat_interleave(self.bias_heads // self.kv_heads, dim=1)


# ----------------------------------------------------------------------------------------------
# MLP and Cross-Domain Mixture of Experts


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CDMoE(MLP):
    """The MLP as a shared expert, plus num_experts tiny experts e, each computing
    silu(down_embed[e] . x) * up_embed[e], of which each token uses num_experts_per_tok.

    Product-key routing: the experts form a num_keys x num_keys grid; router_gate scores the rows
    (sx) and the columns (sy) and expert (i, j) scores sx[i] + sy[j]. The best k pairs only ever
    use the best k rows and the best k columns, so only k x k sums are formed."""

    def __init__(self, config):
        super().__init__(config)
        self.num_keys = math.isqrt(config.num_experts)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router_gate = nn.Linear(config.hidden_size, 2 * self.num_keys, bias=False)
        self.down_embed = nn.Embedding(config.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(config.num_experts, config.hidden_size)

    def forward(self, x, router_stats=None):
        return super().forward(x) + self.routed_experts(x, router_stats)

    def routed_experts(self, x, router_stats=None):
        """The routed experts' sum for each token of x (..., D)."""
        tokens = x.reshape(-1, x.shape[-1])  # (N, D)
        # each token's own scores: the first num_keys score rows, the next num_keys columns
        scores = self.router_gate(tokens).view(-1, 2, self.num_keys)  # (N, 2, K)
        per_axis = min(self.top_k, self.num_keys)
        row_scores, rows = scores[:, 0].topk(per_axis, dim=-1)  # (N, k)
        col_scores, cols = scores[:, 1].topk(per_axis, dim=-1)
        pair_scores = (row_scores.unsqueeze(-1) + col_scores.unsqueeze(-2)).flatten(1)  # (N, k*k)
        top_scores, pairs = pair_scores.topk(self.top_k, dim=-1)  # (N, top_k)
        experts = (rows.gather(1, pairs // per_axis) * self.num_keys
                   + cols.gather(1, pairs % per_axis))  # (N, top_k)
        weights = top_scores.softmax(dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        down = self.down_embed(experts)  # (N, top_k, D)
        gates = F.silu(torch.bmm(down, tokens.unsqueeze(-1)).squeeze(-1)) * weights  # (N, top_k)
        routed = torch.bmm(gates.unsqueeze(1), self.up_embed(experts)).squeeze(1)  # (N, D)
        if router_stats is not None:
            router_stats.append(self.routing_stats(scores, experts))
        return routed.view_as(x)

    def routing_stats(self, scores, experts):
        """What the load-balancing loss needs from this layer: how often each expert was chosen,
        and the summed router probability of each expert. The probability of expert (i, j) under
        a softmax over all K*K pair scores factorises into softmax(sx)[i] * softmax(sy)[j]."""
        # a scatter, not bincount: on CUDA bincount reads the largest index back to the host
        experts = experts.flatten()
        counts = scores.new_zeros(self.num_keys ** 2, dtype=torch.float32).index_add_(
            0, experts, torch.ones_like(experts, dtype=torch.float32))  # (K*K,)
        row_probs, col_probs = scores.float().softmax(dim=-1).unbind(dim=1)  # (N, K) each
        prob_sums = (row_probs.t() @ col_probs).flatten()  # (K*K,) summed over tokens
        return counts, prob_sums, scores.shape[0]


def load_balancing_loss(router_stats, num_experts, top_k):
    """Switch Transformer loss pooled over all layers, as the reference does:
    num_experts * sum_e (fraction of routing slots given to e) * (mean router probability of e).
    It is 1 when routing is uniform and grows as it concentrates."""
    counts = sum(stats[0] for stats in router_stats)
    prob_sums = sum(stats[1] for stats in router_stats)
    tokens = sum(stats[2] for stats in router_stats)
    return num_experts * torch.sum(counts / (tokens * top_k) * prob_sums / tokens)


# ----------------------------------------------------------------------------------------------
# Block


class Block(nn.Module):
    """Pre-norm decoder layer whose residual stream is rescaled by learned vectors."""

    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DynamicMaskAttention(config)
        self.input_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CDMoE(config) if config.is_moe else MLP(config)
        self.post_attention_residual = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x, cos, sin, cache=None, start=0, router_stats=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        x = self.input_residual * x + F.dropout(attn, self.dropout, self.training)
        mlp_in = self.post_attention_layernorm(x)
        mlp = self.mlp(mlp_in, router_stats) if isinstance(self.mlp, CDMoE) else self.mlp(mlp_in)
        return self.post_attention_residual * x + F.dropout(mlp, self.dropout, self.training)


# ----------------------------------------------------------------------------------------------
# The model


class Doge(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """
        | tensor                                              | init                            |
        |-----------------------------------------------------|---------------------------------|
        | every nn.Linear weight, embed_tokens, down/up_embed | normal(0, initializer_range)    |
        | every bias, A                                       | zeros (A = 0: all keys' dt = 1) |
        | RMSNorm weights, input/post_attention_residual      | ones                            |
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, DynamicMaskAttention):
                nn.init.zeros_(module.A)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, Block):
                nn.init.ones_(module.input_residual)
                nn.init.ones_(module.post_attention_residual)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward and backward, 3x forward) as nanoGPT and PaLM count
        them: 6 per weight the token is multiplied by, plus 12 * layers * heads * head_dim * the
        keys each query attends to (at most keep_window_size). A CDMoE token uses only
        num_experts_per_tok of its experts' vectors; embedding lookups are free unless tied."""
        config = self.config
        weights = self.num_params()
        if not config.tie_word_embeddings:
            weights -= self.embed_tokens.weight.numel()
        if config.is_moe:  # only the chosen experts' down and up vectors
            weights -= 2 * config.num_hidden_layers * config.hidden_size * (
                config.num_experts - config.num_experts_per_tok)
        keys = min(seq_len, config.keep_window_size)
        return 6 * weights + 12 * config.num_hidden_layers * config.num_attention_heads * \
            config.head_dim * keys

    def hidden_states(self, idx, cache=None, router_stats=None):
        """The final normalised hidden states (B, T, D) of tokens idx (B, T), which continue the
        cached sequence when a cache is given."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) int64 tensor, got {tuple(idx.shape)} "
                             f"{idx.dtype}")
        start = cache.length if cache is not None else 0
        x = self.embed_tokens(idx)  # (B, T, D)
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        cos, sin = rope_cos_sin(self.config, positions, start + idx.shape[1], x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, start,
                      router_stats)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.norm(x)

    def forward(self, idx, targets=None, cache=None, keep_logits=True):
        """logits (B, T, V) and loss. targets[b, t] is the token after idx[b, t], -1 ignored; the
        loss is their mean cross-entropy plus, for MoE in training, the weighted load-balancing
        loss. With targets, logits carry no gradient (the loss does), and keep_logits=False skips
        them altogether (training needs only the loss)."""
        moe_training = self.config.is_moe and self.training
        router_stats = [] if moe_training and targets is not None else None
        hidden = self.hidden_states(idx, cache, router_stats)
        if targets is None:
            return self.lm_head(hidden), None
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape "
                             f"{tuple(idx.shape)}")
        loss, logits = linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight,
                                            targets.flatten(), keep_logits)
        if router_stats:
            loss = loss + self.config.router_aux_loss_coef * load_balancing_loss(
                router_stats, self.config.num_experts, self.config.num_experts_per_tok)
        return (logits.view(*idx.shape, -1) if logits is not None else None), loss

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None):
        """Load a Hugging Face format Doge directory (either layout) or hub name (owner/name, or
        owner/name@revision, fetched with the optional huggingface_hub package when no such local
        path exists), a train.py checkpoint file, or a train.py out_dir (its newest checkpoint)."""
        return load_pretrained(path, device, dtype)

    def save_pretrained(self, path, tokenizer_dir=None):
        """Write a Hugging Face format directory that transformers loads and the hub takes (see
        the module function save_pretrained)."""
        save_pretrained(self, path, tokenizer_dir)

    # ------------------------------------------------------------------------------------------
    # Scoring and generation: the work is done in parts 2 and 3

    def loglikelihoods(self, requests, batch_size=32):
        """Each (context_ids, continuation_ids) request's summed log-probability of its
        continuation after its context, floats in request order (see loglikelihoods, part 3)."""
        return loglikelihoods(self, requests, batch_size)

    def new_cache(self, batch_size=1):
        """An empty state for generate to continue, on the model's device and in its dtype:
        static (fixed shapes, for a CUDA graph) where decoding is (uses_static_decoding)."""
        weight = self.lm_head.weight
        return DogeCache(self.config, batch_size, weight.device, weight.dtype,
                         static=uses_static_decoding(weight.device))

    def load_cache(self, source):
        """A cache holding the state that DogeCache.save wrote to the file source (or the dict
        that DogeCache.state_dict made). A state of another model shape is a ValueError."""
        state = source if isinstance(source, dict) else read_cache_state(source)
        cache = self.new_cache(state["keys"].shape[1])
        cache.load_state_dict(state, "the state" if state is source else str(source))
        return cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, eos_token_id=None, cache=None):
        """idx (B, T) -> (B, T + new) token ids. temperature 0 is greedy. A row that emits an eos id
        is finished and is padded with that id; generation stops when all are. With a cache
        (new_cache), idx holds only the tokens after what the cache holds (see generate_stream)."""
        new_tokens = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                               repetition_penalty, eos_token_id, cache))
        return torch.cat([idx, *new_tokens], dim=1)

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, eos_token_id=None, cache=None):
        """Yield the next tokens (B, 1) one step at a time, at a constant cost per token (see
        generate_stream, part 3, and generate)."""
        return generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p,
                               repetition_penalty, eos_token_id, cache)


# ----------------------------------------------------------------------------------------------
# Sequence classification: the same body, a score per label instead of a token distribution


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class DogeForSequenceClassification(nn.Module):
    """Doge's body (every layer of the causal LM but its output layer) and a linear score head
    without bias on the final hidden state of each row's last token that is not padding. Names
    follow transformers' checkpoints of this class: model.* for the body, score.weight."""

    def __init__(self, config, num_labels=2, id2label=None, problem_type=None):
        super().__init__()
        id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        if len(id2label) != num_labels or sorted(id2label) != list(range(num_labels)):
            raise ValueError(f"id2label must name the labels 0..{num_labels - 1}, got {id2label}")
        if problem_type not in (None, *PROBLEM_TYPES) or (
                problem_type == "single_label_classification" and num_labels == 1):
            raise ValueError(f"problem_type {problem_type!r} with {num_labels} labels: choose "
                             f"None, {', '.join(PROBLEM_TYPES)} (single-label needs 2 or more)")
        self.config = config
        self.id2label = id2label
        self.problem_type = problem_type  # None: the labels' dtype decides, in loss()
        self.model = Doge(config)
        del self.model.lm_head  # a classifier has no use for it
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)

    @property
    def num_labels(self):
        return len(self.id2label)

    def forward(self, idx, labels=None):
        """logits (B, num_labels) of each row of idx (B, T), and their loss against labels (or
        None). Padding may be on either side: there is no attention mask, so right padding is
        invisible to the pooled token (causality) while left padding is attended to, as in
        transformers called without an attention mask."""
        hidden = self.model.hidden_states(idx)  # (B, T, D)
        rows = torch.arange(len(idx), device=idx.device)
        logits = self.score(hidden[rows, self.last_tokens(idx)])  # (B, num_labels)
        return logits, None if labels is None else self.loss(logits, labels)

    def last_tokens(self, idx):
        """(B,) the position of each row's rightmost token that is not pad_token_id (0 for a row
        of padding only); the last position when there is no pad token, for one row only."""
        pad = self.config.pad_token_id
        if pad is None:
            if len(idx) > 1:
                raise ValueError("config.pad_token_id is None, so padding cannot be told apart: "
                                 "set it, or classify one row at a time")
            return torch.full((1,), idx.shape[1] - 1, device=idx.device)
        positions = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        return (positions * (idx != pad)).argmax(dim=-1)  # argmax takes the first of equals

    def loss(self, logits, labels):
        """transformers' rules: problem_type when set, else regression (mean squared error) for
        one label, single-label classification (cross-entropy, label -100 ignored) for int64 or
        int32 labels (B,), multi-label (binary cross-entropy per label) for float labels (B, N)."""
        problem = self.problem_type or (
            "regression" if self.num_labels == 1 else "single_label_classification"
            if labels.dtype in (torch.int64, torch.int32) else "multi_label_classification")
        labels = labels.to(logits.device)
        if problem == "regression":
            return F.mse_loss(logits, labels.view_as(logits).to(logits.dtype))
        if problem == "single_label_classification":
            return F.cross_entropy(logits, labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    @classmethod
    def from_pretrained(cls, path, num_labels=2, id2label=None, device="cpu", dtype=None):
        """A transformers DogeForSequenceClassification directory (either layout, its labels from
        config.json), or anything Doge.from_pretrained reads: then the causal LM's body with a
        fresh score head of num_labels outputs (id2label naming them), and one line saying so."""
        return load_classifier(path, num_labels, id2label, device, dtype)

    def save_pretrained(self, path, tokenizer_dir=None):
        """A transformers DogeForSequenceClassification directory, as Doge.save_pretrained."""
        save_pretrained(self, path, tokenizer_dir)


# ==============================================================================================
# PART 2 - MAKING IT FAST: each section computes exactly what part 1 defines, and where it wins.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Attention paths, and attend, the one place that picks among them by device and cache
#
# Every attention path below computes attention_by_definition (part 1). They differ only in cost:
#   short    T <= W, no cache: one fused causal SDPA, the bias folded into q and k.
#   blocked  longer on CPU, or appending to a cache: blocks of queries, each over the best W keys
#            before it (the "state") and its own. Memory O(T * W).
#   lifetime T > W on CUDA, no cache: one FlexAttention call masked by each key's lifetime, the
#            bias a score_mod. Memory O(T) a head.
#   decode   generate's one-token step (decode_step): the new key takes a free slot or the worst
#            key's, in place; on CUDA the cache is static and the step replays as a CUDA graph.


def attend(q, k, v, dt, keep_window_size, scale, cache=None, start=0):
    """attention_by_definition's output (B, H, T, d) for T new queries at positions start.., by
    the fastest path for the device; with a cache (a LayerCache), over the cached keys too, and
    the cache takes the new state. q (B, H, T, d); k, v (B, Hb, T, d); dt (B, Hb, T)."""
    if cache is None and dt.shape[-1] > keep_window_size and uses_lifetime_path(q.device):
        return attend_lifetimes(q, k, v, dt, keep_window_size, scale)
    # the blocked path, which also hands a cache its new state
    state = cache.state() if cache is not None else None
    out, state = dynamic_mask_attention(q, k, v, dt, start, state, keep_window_size, scale)
    if cache is not None:
        cache.store(state)
    return out


def product_dtype(tensor):
    """The dtype tensor's products run in: autocast's when it is on for its device, else its own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def in_product_dtype(*tensors):
    """The tensors in product_dtype of the first: under autocast SDPA would cast them anyway, and
    first is exact with fewer bytes to fold (and FlexAttention, not autocast's, needs one dtype)."""
    dtype = product_dtype(tensors[0])
    return tuple(t.to(dtype) for t in tensors)


# ----------------------------------------------------------------------------------------------
# Key lifetimes, O(T * W) and no (T, T) tensor: win past the window (bench.py --cases=gpu)


def rank_keys(dt, positions):
    """The permutation (B, Hb, C) that puts keys best first (better_than), of dt, positions."""
    latest_first = positions.argsort(dim=-1, descending=True)
    by_dt = dt.gather(-1, latest_first).argsort(dim=-1, descending=True, stable=True)
    return latest_first.gather(-1, by_dt)


LIFETIME_CHUNK = (256, 2048)  # keys per step of key_lifetimes: W, within these bounds


@torch.no_grad()
def key_lifetimes(dt, keep_window_size):
    """death (B, Hb, T): key j is kept by the queries j <= i < death[j] (death[j] == j: by none,
    death[j] == T: to the end). dt (B, Hb, T), the biases of keys 0..T-1.
    death[j] is the W-th smallest position among the keys better than j (but at least j). Walking
    the keys best first, only the W smallest positions met so far can be that W-th smallest, so
    each chunk of C keys (in rank order) merges its positions into a sorted list of W: work
    O(T * (W + C)), a Python step per chunk, no (T, T) tensor."""
    batch, heads, length = dt.shape
    window = keep_window_size
    device = dt.device
    ranked = rank_keys(dt, torch.arange(length, device=device).expand(batch, heads, length))
    chunk = min(max(window, LIFETIME_CHUNK[0]), LIFETIME_CHUNK[1])
    # the W smallest positions among the keys ranked so far; `length` stands for "no key yet"
    smallest = torch.full((batch, heads, window), length, device=device)
    earlier = torch.full((window,), -1, device=device)  # an entry of `smallest` beats the chunk
    death = torch.empty_like(ranked)
    for begin in range(0, length, chunk):
        keys = ranked[..., begin:begin + chunk]  # (B, Hb, c), positions best first
        count = keys.shape[-1]
        in_chunk = torch.arange(count, device=device)
        merged, order = torch.cat((smallest, keys), dim=-1).sort(dim=-1)  # (B, Hb, W + c)
        source = torch.cat((earlier, in_chunk)).expand_as(order).gather(-1, order)
        # key c of the chunk is beaten by every earlier key and the chunk's keys before it
        beats = source.unsqueeze(-2) < in_chunk[:, None]  # (B, Hb, c, W + c)
        beaten_up_to = beats.cumsum(dim=-1, dtype=torch.int32)
        # (B, Hb, c): where in merged each key's W-th better key sits, whose position is its death
        death_index = (beaten_up_to < window).sum(dim=-1)
        death.scatter_(-1, keys, merged.gather(-1, death_index))
        smallest = merged[..., :window]
    return torch.maximum(death, torch.arange(length, device=device))


# ----------------------------------------------------------------------------------------------
# Short path: wins at T <= W, no cache (bench.py --cases=train; gpu_attn_t2048 in --cases=gpu)


def fold_bias(q, k, v, dt, scale):
    """Append a channel so that SDPA's q.k picks up the per-key bias: q gets 1, k gets dt / scale.
    Channels are padded to a multiple of 8, the fused kernels' favourite widths."""
    head_dim = q.shape[-1]
    pad = (-(head_dim + 1)) % 8
    q = F.pad(torch.cat((q, torch.ones_like(q[..., :1])), dim=-1), (0, pad))
    k = F.pad(torch.cat((k, (dt / scale).unsqueeze(-1).to(k.dtype)), dim=-1), (0, pad))
    return q, k, F.pad(v, (0, pad + 1))


def attend_short(q, k, v, dt, scale):
    """T <= W with nothing cached: every visible key is kept, so the mask is causal + bias, and
    one fused causal SDPA call computes it, the bias folded into q and k (fold_bias).
    q (B, H, T, d); k, v (B, Hb, T, d); dt (B, Hb, T)."""
    q, k, v = in_product_dtype(q, k, v)
    groups = q.shape[1] // k.shape[1]  # query heads per bias head
    k, v, dt = (t.repeat_interleave(groups, dim=1) for t in (k, v, dt))  # (B, H, T, ...)
    head_dim = q.shape[-1]
    q, k, v = fold_bias(q, k, v, dt, scale)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[..., :head_dim]


# ----------------------------------------------------------------------------------------------
# Blocked path: wins past the window on CPU, and appends to a cache (bench.py --cases=long)


QUERY_BLOCK = 512  # queries per block on the blocked path: memory O(block * (W + block)) a head


def dynamic_mask_attention(q, k, v, dt, start, state, keep_window_size, scale):
    """Attention of T new queries at positions start.. over the cached state and their own keys.
    q (B, H, T, d); k, v (B, Hb, T, d); dt (B, Hb, T); state as in attend_block, or None.
    Returns out (B, H, T, d) and the new state (the best <= W keys seen so far)."""
    batch, bias_heads, length = dt.shape
    positions = torch.arange(start, start + length, device=q.device)
    outs = []
    if state is None:  # the first W queries see at most W keys: everything visible is kept
        first = min(keep_window_size, length)
        outs.append(attend_short(q[:, :, :first], k[:, :, :first], v[:, :, :first],
                                 dt[:, :, :first], scale))
        state = (k[:, :, :first], v[:, :, :first], dt[:, :, :first],
                 positions[:first].expand(batch, bias_heads, first))
    else:
        first = 0
    for begin in range(first, length, QUERY_BLOCK):
        end = min(begin + QUERY_BLOCK, length)
        out, state = attend_block(q[:, :, begin:end], k[:, :, begin:end], v[:, :, begin:end],
                                  dt[:, :, begin:end], positions[begin:end], state,
                                  keep_window_size, scale)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def attend_block(q, k, v, dt, positions, state, keep_window_size, scale):
    """Queries at `positions` (T,) attend to the cached state, (k, v, dt, pos) of the best <= W
    earlier keys (B, Hb, n, ...), plus their own keys: q (B, H, T, d); k, v (B, Hb, T, d); dt
    (B, Hb, T). Returns out (B, H, T, d) and the new state: the best W of state and block."""
    batch, heads, length, head_dim = q.shape
    bias_heads = k.shape[1]
    groups = heads // bias_heads
    state_k, state_v, state_dt, state_pos = state
    block_pos = positions.expand(batch, bias_heads, length)
    cand_pos = torch.cat((state_pos, block_pos), dim=-1)  # (B, Hb, C)
    order = rank_keys(torch.cat((state_dt, dt), dim=-1), cand_pos)  # (B, Hb, C), best first
    cand_pos = cand_pos.gather(-1, order)
    cand_dt = torch.cat((state_dt, dt), dim=-1).gather(-1, order)
    take = order.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    cand_k = torch.cat((state_k, k), dim=2).gather(2, take)  # (B, Hb, C, d)
    cand_v = torch.cat((state_v, v), dim=2).gather(2, take)
    # row i keeps the first W candidates (in best-first order) that it can see
    visible = cand_pos.unsqueeze(-2) <= positions[:, None]  # (B, Hb, T, C)
    keep = visible & (visible.cumsum(dim=-1) <= keep_window_size)
    # the query heads sharing a bias head become extra rows: (B, Hb, G*T, d)
    q_rows = q.reshape(batch, bias_heads, groups * length, head_dim)
    keep = keep.repeat(1, 1, groups, 1)  # (B, Hb, G*T, C)
    q_rows, cand_k, cand_v = fold_bias(q_rows, cand_k, cand_v, cand_dt, scale)
    out = F.scaled_dot_product_attention(q_rows, cand_k, cand_v, attn_mask=keep, scale=scale)
    out = out[..., :head_dim].reshape(batch, heads, length, head_dim)
    new_state = tuple(t[:, :, :keep_window_size] for t in
                      (cand_k[..., :head_dim], cand_v[..., :head_dim], cand_dt, cand_pos))
    return out, new_state


# ----------------------------------------------------------------------------------------------
# Lifetime path: wins past the window on CUDA, no cache (gpu_train_t8192 in bench.py --cases=gpu)


def uses_lifetime_path(device):
    """Whether uncached attention past the window takes the lifetime path (on CPU blocks win)."""
    return torch.device(device).type == "cuda"


FLEX_BLOCK = 128  # FlexAttention's tile: the block mask says which (query, key) tiles are live


def lifetime_block_mask(death, groups, mask_mod, length):
    """FlexAttention's BlockMask for the mask kv <= q < death[kv] over `length` queries and keys,
    from death (B, Hb, T') padded to a multiple of FLEX_BLOCK (padded keys: death 0), without
    evaluating the mask per element: the keys of key block kb are kept by queries from block kb
    to the block of their last keeping query; a tile is full (no mask needed) when it lies below
    the diagonal and before every key's death. `groups` query heads share a bias head."""
    batch, heads, padded = death.shape
    blocks = padded // FLEX_BLOCK
    device = death.device
    key_pos = torch.arange(padded, device=device)
    kept = death > key_pos  # kept by at least one query
    last_query = torch.where(kept, death - 1, -1).view(batch, heads, blocks, FLEX_BLOCK)
    last_block = last_query.amax(dim=-1).div(FLEX_BLOCK, rounding_mode="floor")  # (B, Hb, nk)
    first_death = death.view(batch, heads, blocks, FLEX_BLOCK).amin(dim=-1)  # (B, Hb, nk)
    query_block = torch.arange(blocks, device=device)[:, None]  # (nq, 1)
    key_block = torch.arange(blocks, device=device)  # (nk,)
    live = (query_block >= key_block) & (query_block <= last_block.unsqueeze(-2))  # (B, Hb, nq, nk)
    full = (query_block > key_block) & ((query_block + 1) * FLEX_BLOCK <= first_death.unsqueeze(-2))
    partial = live & ~full

    def block_lists(tiles):  # per query block: how many key blocks, and which (live ones first)
        tiles = tiles.repeat_interleave(groups, dim=1)  # (B, H, nq, nk)
        indices = tiles.to(torch.int32).argsort(dim=-1, descending=True, stable=True)
        return tiles.sum(dim=-1, dtype=torch.int32), indices.to(torch.int32)

    from torch.nn.attention.flex_attention import BlockMask
    return BlockMask.from_kv_blocks(*block_lists(partial), *block_lists(full),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled (uncompiled it materialises every score: slow, and memory O(T^2))."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def attend_lifetimes(q, k, v, dt, keep_window_size, scale, flex_attention=None):
    """All T queries at once with the mask kv <= q < death[kv] and the bias as a score_mod.
    q (B, H, T, d); k, v (B, Hb, T, d); dt (B, Hb, T). flex_attention: the compiled one unless
    given (tests pass the eager one, which runs the forward pass on CPU); inside a compiled model
    the plain one, which the model's own compilation fuses."""
    heads, bias_heads, length = q.shape[1], dt.shape[1], dt.shape[-1]
    groups = heads // bias_heads
    q, k, v = in_product_dtype(q, k, v)  # under autocast q, k come out float32, v bfloat16
    pad = -length % FLEX_BLOCK  # padded keys die at once (death 0), so every index is in range
    death = F.pad(key_lifetimes(dt, keep_window_size), (0, pad))  # (B, Hb, T')
    bias = F.pad(dt, (0, pad))

    def keep(b, h, q_index, kv_index):
        return (kv_index <= q_index) & (q_index < death[b, h // groups, kv_index])

    def add_bias(score, b, h, q_index, kv_index):
        return score + bias[b, h // groups, kv_index]

    block_mask = lifetime_block_mask(death, groups, keep, length)
    if flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as plain_flex_attention
        flex_attention = plain_flex_attention if torch.compiler.is_compiling() else \
            compiled_flex_attention()
    return flex_attention(q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scale,
                          enable_gqa=groups > 1)


# ----------------------------------------------------------------------------------------------
# Chunked loss: wins at a large vocabulary (bench.py --cases=train; gpu_train_b16 in --cases=gpu)
#
# The output projection and cross-entropy, a chunk of rows at a time: at vocabulary 32768 the
# logits, their log-softmax and their gradient, (B*T, V) floats each, dominate a small model's
# activations. Each chunk goes logits -> loss -> d(loss)/d(logits) -> gradients of hidden and
# weight before the next, so no full-size logits gradient exists (full logits only if asked).


LOSS_CHUNK_ELEMENTS = 2 ** 24  # logits per chunk: 64 MB of float32 (smaller: slower products)


def cross_entropy_chunks(hidden, weight, targets, keep_logits, compute_grads):
    """hidden (N, D), weight (V, D), targets (N,) with -1 ignored -> mean loss, logits (N, V) or
    None, and the gradients of the mean loss wrt hidden and weight (None unless compute_grads)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    kept = targets != -1
    count = kept.sum().clamp(min=1)
    safe_targets = targets.clamp(min=0)
    chunk = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    # The products write into tensors kept across chunks (out=, addmm_): on CPU a fresh 64 MB
    # tensor per chunk costs page faults. Autocast skips such calls: product_dtype says theirs.
    dtype = product_dtype(hidden)
    product_weight = weight.to(dtype)  # (V, D)
    logits_buffer = hidden.new_empty(min(chunk, rows), vocab, dtype=dtype)
    loss = torch.zeros((), device=hidden.device)
    logits_out = grad_hidden = grad_weight = None
    if keep_logits:
        logits_out = hidden.new_empty(rows, vocab, dtype=dtype)
    if compute_grads:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, device=weight.device)
    for begin in range(0, rows, chunk):
        end = min(begin + chunk, rows)
        h, target, weight_rows = hidden[begin:end].to(dtype), safe_targets[begin:end], \
            kept[begin:end]
        logits = torch.mm(h, product_weight.t(), out=logits_buffer[:end - begin])  # (n, V)
        if keep_logits:
            logits_out[begin:end] = logits
        logits = logits.float()
        target_logits = logits.gather(1, target.unsqueeze(1)).squeeze(1)  # (n,)
        # log-sum-exp by hand, in place, keeping exp(logits - max): divided by its row sums it is
        # the softmax the gradient needs, so each logit goes through exp once
        max_logits = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        exps = logits.sub_(max_logits).exp_()  # (n, V)
        sums = exps.sum(dim=-1)  # (n,)
        log_norm = max_logits.squeeze(1) + sums.log()
        loss += ((log_norm - target_logits) * weight_rows).sum()
        if compute_grads:  # d loss / d logits = (softmax - onehot) * kept / count, in place
            row_scale = weight_rows / count  # (n,)
            grad = exps.mul_((row_scale / sums).unsqueeze(1))
            grad[torch.arange(end - begin, device=grad.device), target] -= row_scale
            grad = grad.to(dtype)
            grad_hidden[begin:end] = grad @ product_weight
            if dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.t(), h)
            else:  # low-precision products, summed in float32
                grad_weight += (grad.t() @ h).float()
    if compute_grads:
        grad_weight = grad_weight.to(weight.dtype)
    return loss / count, logits_out, grad_hidden, grad_weight


# On CUDA the loss runs chunks of about this many logits (8192 rows at V=32768) through one
# compiled loss_chunk: a loop of small kernels is launch-bound on a GPU, while inductor fuses the
# log-sum-exp and the gradient into a few kernels on logits in the products' dtype (no float32).
COMPILED_LOSS_CHUNK_ELEMENTS = 2 ** 28


def loss_chunk(h, weight, targets, row_scale, keep_logits, compute_grads):
    """One chunk of cross_entropy_chunks, written for torch.compile: the same results, the
    gradient wrt h in the products' dtype, wrt weight in float32. h (n, D) and weight (V, D) in
    the products' dtype; targets (n,), none -1; row_scale (n,): 1 / count, or 0 (ignored row)."""
    logits = h @ weight.t()  # (n, V)
    logits32 = logits.float()
    log_norm = logits32.logsumexp(dim=-1)  # (n,)
    target_logits = logits32.gather(1, targets.unsqueeze(1)).squeeze(1)  # (n,)
    loss = ((log_norm - target_logits) * row_scale).sum()
    kept_logits = logits if keep_logits else None
    if not compute_grads:
        return loss, kept_logits, None, None
    # d loss / d logits = (softmax - onehot) * row_scale
    onehot = torch.arange(weight.shape[0], device=h.device) == targets.unsqueeze(1)  # (n, V)
    grad = ((logits32 - log_norm.unsqueeze(1)).exp() - onehot.float()) * row_scale.unsqueeze(1)
    grad = grad.to(h.dtype)
    return loss, kept_logits, grad @ weight, (grad.t() @ h).float()


@functools.cache
def compiled_loss_chunk():
    """loss_chunk compiled, once per process, at the first CUDA loss, whatever train.py's compile
    setting; TORCHDYNAMO_DISABLE=1 runs it uncompiled (a GPU that triton does not support)."""
    return torch.compile(loss_chunk)


def compiled_cross_entropy_chunks(hidden, weight, targets, keep_logits, compute_grads):
    """cross_entropy_chunks as a loop over compiled_loss_chunk, on chunks of equal rows (the last
    padded with ignored rows): one compiled graph serves every input of a chunk's rows or more
    (SFT's micro-batches vary in length); a smaller input is one chunk of its own size."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = min(rows, max(1, COMPILED_LOSS_CHUNK_ELEMENTS // vocab))
    kept = targets != -1
    row_scale = kept / kept.sum().clamp(min=1)  # (N,) float32
    safe_targets = targets.clamp(min=0)
    dtype = product_dtype(hidden)
    product_weight = weight.to(dtype)  # (V, D)
    run_chunk = compiled_loss_chunk()
    loss = torch.zeros((), device=hidden.device)
    logits_out = hidden.new_empty(rows, vocab, dtype=dtype) if keep_logits else None
    grad_hidden = torch.empty_like(hidden) if compute_grads else None
    grad_weight = torch.zeros(weight.shape, device=weight.device) if compute_grads else None
    for begin in range(0, rows, chunk):
        end = min(begin + chunk, rows)
        h, target, scale = (hidden[begin:end].to(dtype), safe_targets[begin:end],
                            row_scale[begin:end])
        pad = chunk - (end - begin)
        if pad:  # the last chunk's missing rows: zeros with row_scale 0, no loss, no gradient
            h, target, scale = F.pad(h, (0, 0, 0, pad)), F.pad(target, (0, pad)), \
                F.pad(scale, (0, pad))
        chunk_loss, logits, chunk_grad_hidden, chunk_grad_weight = run_chunk(
            h, product_weight, target, scale, keep_logits, compute_grads)
        loss += chunk_loss
        if keep_logits:
            logits_out[begin:end] = logits[:end - begin]
        if compute_grads:
            grad_hidden[begin:end] = chunk_grad_hidden[:end - begin]
            grad_weight += chunk_grad_weight
    if compute_grads:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, logits_out, grad_hidden, grad_weight


def pick_cross_entropy(hidden):
    """The chunked cross-entropy function for hidden's device (the one place that picks): the
    compiled chunks on CUDA, the CPU-tuned loop (cross_entropy_chunks, faster there) elsewhere."""
    return compiled_cross_entropy_chunks if hidden.is_cuda else cross_entropy_chunks


class LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: the gradients are computed during the forward pass, chunk by chunk, and
    the backward pass only scales them by the incoming gradient of the loss."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, keep_logits):
        loss, logits, grad_hidden, grad_weight = pick_cross_entropy(hidden)(
            hidden, weight, targets, keep_logits, compute_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        if logits is not None:
            ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


@torch.compiler.disable  # a Python loop over chunks; compiling it would unroll every chunk
def linear_cross_entropy(hidden, weight, targets, keep_logits=True):
    """Mean cross-entropy of hidden @ weight.T against targets (-1 ignored), and the logits."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, keep_logits)
    loss, logits, _, _ = pick_cross_entropy(hidden)(hidden, weight, targets, keep_logits, False)
    return loss, logits


# ----------------------------------------------------------------------------------------------
# Decoding caches: win once a text outgrows the window (bench.py --cases=window, --cases=chat)


def attend_cached(q, k, values_t, dt, scale):
    """One new query per head against cached keys that are all visible and all kept.
    q (B, H, d); k (R, n, d), values_t (R, d, n) (transposed) and dt (R, n), one row per
    (sequence, bias head): R = B * Hb. Returns (B, H*d). Both products multiply the contiguous
    cache by a few columns, each column contiguous: the layout the BLAS kernels read fastest. Past
    the window, reading W keys and values per layer is the only cost a step adds, so this read
    sets how flat time per token stays."""
    batch, heads, head_dim = q.shape
    rows = dt.shape[0]
    q_columns = q.reshape(rows, -1, head_dim).transpose(1, 2)  # (R, d, G): G heads share a row
    logits = torch.baddbmm(dt.unsqueeze(-1), k, q_columns, alpha=scale)  # (R, n, G)
    probs = logits.transpose(1, 2).float().softmax(dim=-1).to(values_t.dtype)  # (R, G, n)
    out = torch.bmm(values_t, probs.transpose(1, 2))  # (R, d, G)
    return out.transpose(1, 2).reshape(batch, heads * head_dim)


FIRST_CACHE_SLOTS = 64  # a cache's slots at first; it doubles them as it fills, up to W


class LayerCache:
    """The best <= W keys (with values, dt and positions) one attention layer has seen, one row
    per (sequence, bias head); values transposed, one row per channel, for attend_cached.

    Buffers hold S + 1 slots; slot S is a discard slot, so a decode step writes unconditionally:
    into the next free slot, into the slot of the key it evicts, or (when the new key is itself
    the worst) into the discard slot, which attention never reads. S starts small and doubles
    as keys come, up to W: a short text's state costs what it holds, not the window.

    A static cache (for a CUDA graph) gives a decode step the same shapes every time: attention
    reads all W slots, the empty ones holding dt = -inf (weight 0) and position -1, so the
    eviction rule alone finds the next free slot (the worst, the oldest among equals), and the
    kept keys always fill the first slots. Its decode steps leave `size` behind (catch_up).

    A ragged cache (join_caches) decodes sequences of different lengths together, one per row:
    empty slots marked as in a static cache, so each row fills its own next free slot, and `size`
    the most any row holds, the slots attention reads (a shorter row's empty ones weigh 0)."""

    def __init__(self, batch, bias_heads, window, head_dim, device, dtype, static=False,
                 ragged=False):
        self.window, self.size = window, 0
        self.static, self.ragged = static, ragged
        self.heads_shape = (batch, bias_heads)
        slots = window if static else min(window, FIRST_CACHE_SLOTS)
        self.k, self.values_t, self.dt, self.pos = self.empty_slots(
            batch * bias_heads, slots, head_dim, device, dtype)

    @torch.inference_mode(False)  # see DogeCache: a cache's tensors are never inference tensors
    def empty_slots(self, rows, slots, head_dim, device, dtype):
        """Buffers k (R, S + 1, d), values_t (R, d, S + 1), dt and pos (R, S + 1), empty: in a
        static or ragged cache marked so (dt = -inf, weight 0; position -1)."""
        marked = self.static or self.ragged
        return (torch.zeros(rows, slots + 1, head_dim, device=device, dtype=dtype),
                torch.zeros(rows, head_dim, slots + 1, device=device, dtype=dtype),
                torch.full((rows, slots + 1), float("-inf") if marked else 0.0, device=device,
                           dtype=dtype),
                torch.full((rows, slots + 1), -1 if marked else 0, device=device,
                           dtype=torch.long))

    def make_room(self, size):
        """Grow the buffers, doubling the slots (up to W), until size keys fit."""
        slots = self.k.shape[1] - 1
        if size <= slots:
            return
        old = (self.k, self.values_t, self.dt, self.pos)
        self.k, self.values_t, self.dt, self.pos = self.empty_slots(
            self.k.shape[0], min(self.window, max(size, 2 * slots)), self.k.shape[2],
            self.k.device, self.k.dtype)
        self.k[:, :slots], self.values_t[..., :slots] = old[0][:, :slots], old[1][..., :slots]
        self.dt[:, :slots], self.pos[:, :slots] = old[2][:, :slots], old[3][:, :slots]

    def kept(self):
        """The cached keys (R, n, d), values transposed (R, d, n) and dt (R, n) for attend_cached:
        views (a static cache: all W slots; a ragged one: the slots of its longest row)."""
        size = self.window if self.static else self.size
        return self.k[:, :size], self.values_t[..., :size], self.dt[:, :size]

    def state(self):
        """The cache as dynamic_mask_attention's state (None while empty): see contents."""
        return self.contents() if self.size else None

    def contents(self):
        """The kept keys as k, v (B, Hb, n, d), dt and pos (B, Hb, n): views, n = size."""
        size = self.size
        return tuple(t.unflatten(0, self.heads_shape) for t in
                     (self.k[:, :size], self.values_t[..., :size].transpose(1, 2),
                      self.dt[:, :size], self.pos[:, :size]))

    def store(self, state, rows=slice(None)):
        """Write kept keys k, v (B, Hb, n, d), dt and pos (B, Hb, n) into the first n slots of
        the cache's rows (some of them, in a ragged cache: rows of R)."""
        k, v, dt, pos = (t.detach().flatten(0, 1) for t in state)  # a state, not a graph
        size = k.shape[1]
        self.make_room(size)
        self.size = max(self.size, size) if self.ragged else size
        self.k[rows, :size], self.values_t[rows, :, :size] = k, v.transpose(1, 2)
        self.dt[rows, :size], self.pos[rows, :size] = dt, pos

    def insert(self, k, v, dt, position):
        """Add one key per row: k, v (R, d), dt (R,), at position (an int, or on the device (1,)
        for a static cache, (R, 1) for a ragged one). Once full, it replaces the worst key (lowest
        dt, the oldest among equals) if it is at least as good (being later, it wins ties)."""
        if self.size < self.window:
            self.make_room(self.size + 1)
        if self.size < self.window and not (self.static or self.ragged):
            slot = torch.full((dt.shape[0], 1), self.size, device=dt.device)  # (R, 1)
            self.size += 1
        else:
            slots = self.k.shape[1] - 1  # W, or in a ragged cache at least its longest row + 1
            cached_dt, cached_pos = self.dt[:, :slots], self.pos[:, :slots]
            worst_dt = cached_dt.min(dim=-1, keepdim=True).values  # (R, 1)
            oldest_worst = torch.where(cached_dt == worst_dt, cached_pos,
                                       torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)
            slot = torch.where(dt.unsqueeze(-1) >= worst_dt, oldest_worst, slots)
            if self.ragged:  # every row took a key: the longest holds one more, up to W
                self.size = min(self.window, self.size + 1)
        self.k.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, k.shape[-1]), k.unsqueeze(1))
        self.values_t.scatter_(2, slot.unsqueeze(1).expand(-1, v.shape[-1], -1), v.unsqueeze(-1))
        self.dt.scatter_(1, slot, dt.unsqueeze(-1))
        if isinstance(position, torch.Tensor):
            position = position.expand_as(slot)
        self.pos.scatter_(1, slot, position)


class DogeCache:
    """Everything generation keeps between steps: one LayerCache per layer and the length so far
    (the position the next token takes): the whole state of a sequence, at most W keys a layer.
    Model.new_cache makes one, generate continues it, save writes it, Model.load_cache reads it.

    A static cache also counts the length on the device, in `position`, which its decode steps
    read and advance (`length` falls behind until catch_up). A ragged one (join_caches) counts
    each row's length, in `row_lengths` (B,) on the device; `length` is the longest row's.

    A cache outlives the call that grew it, and callers use it in any grad mode (generation in
    inference mode, a chat's end of turn under no_grad, a user's code either). So its tensors are
    ordinary ones (inference_mode(False)), never inference tensors, which nothing outside
    inference mode may write; and it keeps what it is given detached (a state, not a graph)."""

    @torch.inference_mode(False)
    def __init__(self, config, batch, device, dtype, static=False, ragged=False):
        # what the tensors depend on: two models that agree on these can share a state
        self.shape = {"num_hidden_layers": config.num_hidden_layers,
                      "bias_heads": config.bias_heads, "head_dim": config.head_dim,
                      "keep_window_size": config.keep_window_size}
        self.batch, self.length, self.static = batch, 0, static
        self.position = torch.zeros(1, dtype=torch.long, device=device) if static else None
        self.row_lengths = torch.zeros(batch, dtype=torch.long, device=device) if ragged else None
        self.layers = [LayerCache(batch, config.bias_heads, config.keep_window_size,
                                  config.head_dim, device, dtype, static, ragged)
                       for _ in range(config.num_hidden_layers)]

    def advance(self, count):
        self.length += count
        if self.static:
            self.position += count
        if self.row_lengths is not None:
            self.row_lengths += count

    def row_length(self, row):
        """The tokens that sequence `row` holds (a ragged cache's rows differ; else `length`)."""
        return self.length if self.row_lengths is None else int(self.row_lengths[row])

    def catch_up(self):
        """Bring a static cache's host-side counts up to its decode steps, which a replayed CUDA
        graph runs without Python: each layer holds min(W, length) (one host sync)."""
        if self.static:
            self.length = int(self.position.item())
            for layer in self.layers:
                layer.size = min(layer.window, self.length)

    @torch.inference_mode(False)  # ordinary tensors, whatever the caller's mode
    def state_dict(self, row=None):
        """The state as plain CPU tensors (copies): the kept keys, values, dt and positions of
        every layer, each (layers, B, Hb, n, ...) with n = min(W, length), the length and the
        model shape. row: that sequence alone, as a cache of it alone would give."""
        self.catch_up()
        rows = slice(None) if row is None else slice(row, row + 1)
        length = self.length if row is None else self.row_length(row)
        size = min(self.shape["keep_window_size"], length)
        keys, values, dt, positions = (
            torch.stack(parts).cpu() for parts in
            zip(*((t[rows, :, :size] for t in layer.contents()) for layer in self.layers)))
        return {"shape": dict(self.shape), "length": torch.tensor(length), "keys": keys,
                "values": values, "dt": dt, "positions": positions}

    def load_state_dict(self, state, source="the state"):
        """Take a state_dict made by a model of the same shape and as many sequences (else a
        one-line ValueError naming source and the difference)."""
        theirs = state["shape"]
        differ = [key for key in self.shape if theirs.get(key) != self.shape[key]]
        if differ:
            raise ValueError(f"{source} was made by a model of another shape: "
                             + ", ".join(f"{key} {theirs.get(key)} there, {self.shape[key]} here"
                                         for key in differ))
        if state["keys"].shape[1] != self.batch:
            raise ValueError(f"{source} holds {state['keys'].shape[1]} sequences, this cache "
                             f"{self.batch}")
        self.length = int(state["length"])
        if self.static:
            self.position.fill_(self.length)
        if self.length == 0:
            return
        device, dtype = self.layers[0].k.device, self.layers[0].k.dtype
        for i, layer in enumerate(self.layers):
            layer.store(tuple(state[name][i].to(device=device, dtype=dtype)
                              for name in ("keys", "values", "dt")) +
                        (state["positions"][i].to(device),))

    def state_bytes(self):
        """The bytes of the kept keys, values, dt and positions: what save writes, less framing."""
        self.catch_up()
        return sum(t.nelement() * t.element_size() for layer in self.layers
                   for t in layer.contents())

    def save(self, path):
        """Write state_dict to path (torch.save), atomically."""
        state = self.state_dict()
        atomic_write(path, lambda temp_path: torch.save(state, temp_path))


def join_caches(model, sequences):
    """A ragged cache continuing sequences, each at its own length, for decode_step to decode
    together (serve.py's batch): (cache, row) pairs, a cache of one sequence (row 0) or a ragged
    cache's row, each copied once. state_dict(row) takes a row back out."""
    weight = model.lm_head.weight
    joined = DogeCache(model.config, len(sequences), weight.device, weight.dtype, ragged=True)
    lengths = []
    for cache, row in sequences:
        cache.catch_up()
        lengths.append(cache.row_length(row))
    joined.row_lengths.copy_(torch.tensor(lengths))
    joined.length = max(lengths, default=0)
    bias_heads = model.config.bias_heads
    for i, layer in enumerate(joined.layers):
        for new_row, ((cache, row), length) in enumerate(zip(sequences, lengths)):
            size = min(layer.window, length)
            contents = tuple(t[row:row + 1, :, :size] for t in cache.layers[i].contents())
            layer.store(contents, slice(new_row * bias_heads, (new_row + 1) * bias_heads))
    return joined


# ----------------------------------------------------------------------------------------------
# Fused one-token step: wins in decoding, which reads each weight a token (bench.py --cases=decode)


@torch.no_grad()
def decoding_weights(model):
    """The weights of a one-token step, rearranged once per generate call. Decoding one token
    reads every weight once, so the layout decides its speed:
    - transposed to (in, out): x @ W streams through a contiguous matrix several times faster
      than F.linear through the (out, in) weight;
    - fused: q, k, v and dt side by side, gate and up side by side: fewer, larger products;
    - dt_proj folded into v_proj: dt_proj(v_proj(x)) = x @ (W_dt W_v)^T + (W_dt b_v + b_dt);
    - the input and post-attention RMSNorm weights folded into the rows of the matrix after
      them: (w * x) @ M = x @ (w[:, None] * M).
    Returns one dict of (matrix, bias) pairs per layer, and the output matrix in blocks."""
    layers = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o, gate, up, down = ((linear.weight, linear.bias) for linear in (
            attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
            mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        dt = composed_linear(attn.dt_proj, attn.v_proj)
        layers.append({
            "qkv_dt": fuse_linears([q, k, v, dt], layer.input_layernorm.weight),
            "qk_norm": attn.qk_norm_weight(),
            "o": fuse_linears([o]),
            "gate_up": fuse_linears([gate, up], layer.post_attention_layernorm.weight),
            "down": fuse_linears([down])})
    # The output matrix, the largest by far, as column blocks (n, D, V/n), one per CPU thread:
    # a batched product gives each thread its own block, while one matrix-vector product
    # reads the whole matrix at about the speed of one thread.
    output = model.lm_head.weight.t()  # (D, V)
    blocks = torch.get_num_threads() if output.device.type == "cpu" else 1
    output = F.pad(output, (0, -output.shape[1] % blocks))  # V padded to a multiple of n
    return layers, output.view(output.shape[0], blocks, -1).transpose(0, 1).contiguous()


def decode_step(model, token, cache, step_weights):
    """Logits (B, V) after one more token (B,) of the cached sequence, as forward computes them,
    with decoding_weights' matrices and the fewest small operations (each has a fixed cost)."""
    config, (layer_weights, output_blocks) = model.config, step_weights
    heads, kv_heads, head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                 config.head_dim)
    eps = config.rms_norm_eps
    x = model.embed_tokens(token)  # (B, D)
    batch = x.shape[0]
    if cache.static:  # the position stays on the device: a captured step replays right
        start = positions = cache.position  # (1,)
    elif cache.row_lengths is not None:  # a ragged cache: each row at its own position
        positions = cache.row_lengths  # (B,)
        start = positions.repeat_interleave(config.bias_heads).unsqueeze(1)  # (R, 1), the keys'
    else:
        start, positions = cache.length, torch.tensor([cache.length], device=x.device)
    cos, sin = rope_cos_sin(config, positions, positions + 1 if cache.row_lengths is not None
                            else start + 1, x.dtype)  # (1 or B, d)
    rotation = rope_matrix(cos, sin)  # (d, d) the same for every layer, or (B, d, d) per row
    for layer, layer_cache, weights in zip(model.layers, cache.layers, layer_weights):
        attn, mlp = layer.self_attn, layer.mlp
        qk, values, dt_logits = fused_linear(rms_norm(x, None, eps), *weights["qkv_dt"]).split(
            ((heads + kv_heads) * head_dim, kv_heads * head_dim, attn.bias_heads), dim=-1)
        qk = qk.view(batch, heads + kv_heads, head_dim)
        if weights["qk_norm"] is not None:
            qk = rms_norm(qk, weights["qk_norm"], eps)
        q, k = (qk @ rotation).split((heads, kv_heads), dim=1)
        k = attn.to_bias_heads(k).flatten(0, 1)  # (B*Hb, d), the cache's rows
        v = attn.to_bias_heads(values.view(batch, kv_heads, head_dim)).flatten(0, 1)
        layer_cache.insert(k, v, attn.dynamic_bias(dt_logits).flatten(), start)
        out = attend_cached(q, *layer_cache.kept(), attn.scale)  # (B, H*d)
        x = torch.addcmul(fused_linear(out, *weights["o"]), layer.input_residual, x)
        h = rms_norm(x, None, eps)
        gate, up = fused_linear(h, *weights["gate_up"]).chunk(2, dim=-1)
        mlp_out = fused_linear(F.silu(gate) * up, *weights["down"])
        if isinstance(mlp, CDMoE):
            mlp_out = mlp_out + mlp.routed_experts(layer.post_attention_layernorm.weight * h)
        x = torch.addcmul(mlp_out, layer.post_attention_residual, x)
    cache.advance(1)
    h = model.norm(x)
    if 1 < batch <= 8:  # a few rows (serve.py's batch): the (V, D) matrix times the rows'
        return (model.lm_head.weight @ h.t()).t()  # columns wins on CPU, (B, V) (--cases=serve)
    return output_logits(h, output_blocks, model.lm_head.out_features)


def rope_matrix(cos, sin):
    """apply_rope at one position as a (d, d) matrix R, x @ R == apply_rope(x, cos, sin), from
    its cos and sin (1, d): R[j, j] = cos[j] and R[(j + d/2) % d, j] = sin[j]; from (B, d), rows
    at different positions, one R per row. Built once per step for every layer's q and k."""
    rotation = torch.diag_embed(cos) + torch.diag_embed(sin).roll(cos.shape[-1] // 2, dims=-2)
    return rotation[0] if rotation.shape[0] == 1 else rotation  # (d, d) or (B, d, d)


def composed_linear(outer, inner):
    """outer(inner(x)) as one (weight, bias) pair: (W_o W_i, W_o b_i + b_o), made in float32."""
    weight = outer.weight.float() @ inner.weight.float()
    bias = None if inner.bias is None else outer.weight.float() @ inner.bias.float() + outer.bias
    dtype = inner.weight.dtype
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def fuse_linears(linears, norm_weight=None):
    """One (in, out) matrix and bias for linear maps given as (weight (out, in), bias) pairs that
    read the same input, optionally after an RMSNorm whose weight is folded into the rows."""
    matrix = torch.cat([weight for weight, _ in linears]).t()
    if norm_weight is not None:
        matrix = norm_weight[:, None] * matrix
    biases = [bias for _, bias in linears]
    return matrix.contiguous(), None if biases[0] is None else torch.cat(biases)


def fused_linear(x, matrix, bias):  # x (B, in) @ matrix (in, out) + bias, one operation
    return x @ matrix if bias is None else torch.addmm(bias, x, matrix)


def output_logits(h, output_blocks, vocab_size):
    """Logits (B, V) from final hidden states h (B, D) and the output matrix as column blocks
    (n, D, V'/n) from decoding_weights, V' >= V the padded vocabulary."""
    blocks = output_blocks.shape[0]
    logits = torch.bmm(h.expand(blocks, *h.shape), output_blocks)  # (n, B, V'/n)
    return logits.transpose(0, 1).reshape(h.shape[0], -1)[:, :vocab_size]


# ----------------------------------------------------------------------------------------------
# CUDA graph capture: wins where decoding is launch-bound (gpu_decode_b1 in bench.py --cases=gpu)


def uses_static_decoding(device):
    """Whether decoding takes a static cache and a CUDA graph: on CUDA (on CPU, a step that reads
    only the filled slots wins)."""
    return torch.device(device).type == "cuda"


def capture_step(step):
    """step (token (B,) -> next token (B,), static shapes, no host sync) as a CUDA graph on CUDA:
    the first call runs eagerly (warming up what capture cannot) and records it; later calls
    replay it (one launch for the whole step). Elsewhere: step."""
    graph, token_in, token_out = None, None, None

    def replay(token):
        nonlocal graph, token_in, token_out
        if token.device.type != "cuda":
            return step(token)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                following = step(token)
            torch.cuda.current_stream().wait_stream(side)
            graph, token_in = torch.cuda.CUDAGraph(), token.clone()
            try:
                with torch.cuda.graph(graph):  # records the kernels without running them
                    token_out = step(token_in)
            except RuntimeError as error:  # the same step, uncaptured: slower, same tokens
                warnings.warn(f"decoding without a CUDA graph: its capture failed ({error})")
                graph = False
            return following
        if graph is False:
            return step(token)
        token_in.copy_(token)
        graph.replay()
        return token_out.clone()  # the graph's output is overwritten by the next replay

    return replay


# ==============================================================================================
# PART 3 - CHECKPOINTS AND THE PLUMBING OF GENERATION: sampling, the generation loop, cache files,
# scoring, Hugging Face import and export, hub names, model cards, upcycling, vocabulary growth.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Generation: sampling, the loop of generate_stream, cache files


def sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, generator=None):
    """The next token (B,) from logits (B, V); seen (B, V): the tokens so far, for the repetition
    penalty (or None); generator: else torch's global one. No host sync: a CUDA graph holds it."""
    logits = logits.float()
    if repetition_penalty != 1.0:  # make seen tokens less likely, whatever the logit's sign
        penalised = torch.where(logits < 0, logits * repetition_penalty,
                                logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:  # keep the smallest set of tokens with mass >= top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    # a draw from the softmax as argmax(p / Exponential(1)): what torch.multinomial does for one
    # sample (the same draws under a seed), without its check of p that reads it on the host
    probs = logits.softmax(dim=-1)
    return probs.div_(torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    repetition_penalty=1.0, eos_token_id=None, cache=None):
    """Doge.generate_stream: at most keep_window_size keys per layer, so each step costs the same
    however long the text. cache: a DogeCache (new_cache, load_cache) that this call continues:
    idx (B, T >= 1) follows the tokens it holds, and once the call ends (max_new_tokens, eos, or
    the caller stopping or closing the iteration) it holds idx and every token yielded, so the
    next call continues right after them. The repetition penalty sees only this call's tokens.
    None: a cache of this call's own."""
    eos_ids = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id,
                           dtype=torch.long, device=idx.device)
    batch, vocab = idx.shape[0], model.lm_head.out_features
    continued = cache is not None
    if continued and (cache.batch != batch or idx.shape[1] == 0):
        raise ValueError(f"idx {tuple(idx.shape)} must continue the cache's {cache.batch} "
                         f"sequences with at least one token each")
    if not continued:
        cache = model.new_cache(batch)
    finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)
    seen = None  # (B, V): which tokens the repetition penalty applies to
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=idx.device)
        seen.scatter_(1, idx, True)
    # The model runs in inference mode, which skips no_grad's bookkeeping (version counters, view
    # tracking); tokens are sampled outside it, so callers get ordinary tensors, fit for training.
    with torch.inference_mode():
        step_weights = decoding_weights(model)
        logits = output_logits(model.hidden_states(idx, cache)[:, -1], step_weights[-1],
                               vocab)  # (B, V)

    def next_token(token):  # (B,) -> (B,): static shapes with a static cache, no host sync
        if seen is not None:
            seen.scatter_(1, token.unsqueeze(1), True)
        with torch.inference_mode():
            logits = decode_step(model, token, cache, step_weights)
        return sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty)

    if cache.static:
        next_token = capture_step(next_token)  # on CUDA, replayed as a CUDA graph
    token = None  # the last token yielded; the next step feeds it to the cache
    try:
        for step in range(max_new_tokens):
            token = next_token(token) if step else sample_next(
                logits, seen, temperature, top_k, top_p, repetition_penalty)
            if len(eos_ids):
                token = torch.where(finished, eos_ids[0], token)
                finished |= torch.isin(token, eos_ids)
            yield token.unsqueeze(1)
            if len(eos_ids) and finished.all():
                return
    finally:
        if continued:  # the last token joins the cache too (its logits are not needed)
            if token is not None:
                with torch.inference_mode():
                    decode_step(model, token, cache, step_weights)
            cache.catch_up()


def read_cache_state(path):
    """The state_dict that DogeCache.save wrote to path; anything else is a one-line ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file it cannot read
        raise ValueError(f"{path}: not a Doge cache state (torch.load: {type(e).__name__})") \
            from None
    if not isinstance(state, dict) or not {"shape", "length", "keys"} <= state.keys():
        raise ValueError(f"{path}: not a Doge cache state")
    return state


@torch.no_grad()
def model_fingerprint(model):
    """16 hex digits, a hash of the config and the weights rounded to bfloat16 (one model, one
    fingerprint in any dtype, on any device): a saved conversation's state fits only its model."""
    digest = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Scoring: log-likelihoods of continuations, for benchmarks and bits per byte


@torch.inference_mode()
def loglikelihoods(model, requests, batch_size=32):
    """Doge.loglikelihoods. requests: (context_ids, continuation_ids) pairs of token id lists,
    the context not empty, the continuation at most max_position_embeddings tokens (a longer pair
    loses the start of its context). The pairs are sorted by length and padded on the right into
    batches of batch_size rows: causal attention makes padding invisible to the tokens before it,
    and neighbours in length waste little on it."""
    limit = model.config.max_position_embeddings
    for i, (context, continuation) in enumerate(requests):
        if not context or len(continuation) > limit:
            raise ValueError(f"request {i}: {len(context)} context tokens (1 or more needed), "
                             f"{len(continuation)} continuation tokens (at most {limit})")
    sequences = [(list(context) + list(continuation))[-(limit + 1):]
                 for context, continuation in requests]
    order = sorted((i for i in range(len(requests)) if requests[i][1]),  # empty: 0.0
                   key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        idx = torch.zeros(len(batch), len(sequences[batch[0]]) - 1, dtype=torch.long)
        targets = torch.full_like(idx, -1)  # (B, T): the continuation's tokens, else -1
        for row, i in enumerate(batch):
            tokens, scored = torch.tensor(sequences[i]), len(requests[i][1])
            end = len(tokens) - 1  # the inputs are every token but the last
            idx[row, :end] = tokens[:-1]
            targets[row, end - scored:end] = tokens[-scored:]
        for i, score in zip(batch, target_log_probs(model, idx, targets)):
            scores[i] = score
    return scores


def target_log_probs(model, idx, targets):
    """The summed log-probability of targets (B, T) after idx (B, T), -1 left out, one float
    per row. Logits only for the target positions, a chunk of rows at a time."""
    device = model.lm_head.weight.device
    hidden = model.hidden_states(idx.to(device))  # (B, T, D)
    targets = targets.to(device)
    scored = targets != -1
    hidden, wanted = hidden[scored], targets[scored]  # (N, D), (N,)
    chunk = max(1, LOSS_CHUNK_ELEMENTS // model.config.vocab_size)
    token_scores = torch.cat([
        model.lm_head(hidden[i:i + chunk]).float().log_softmax(-1)
        .gather(1, wanted[i:i + chunk, None]).squeeze(1)
        for i in range(0, len(wanted), chunk)])  # (N,)
    rows = scored.nonzero()[:, 0]  # (N,) the row of each scored token
    return torch.zeros(len(idx), device=device).index_add_(0, rows, token_scores).tolist()


# ----------------------------------------------------------------------------------------------
# Checkpoints: Hugging Face format import and export; dense -> MoE upcycling, vocabulary growth


def config_from_json(raw):
    """Read a Hugging Face config.json dict: either RoPE spelling, unknown keys ignored."""
    known = {f.name for f in fields(DogeConfig)}
    values = {key: value for key, value in raw.items() if key in known}
    if values.get("num_key_value_heads") is None:  # transformers: absent means plain MHA
        values["num_key_value_heads"] = values.get("num_attention_heads",
                                                   DogeConfig.num_attention_heads)
    rope = raw.get("rope_parameters")  # transformers 5.x spelling
    if isinstance(rope, dict):
        values["rope_theta"] = rope.get("rope_theta", values.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        values["rope_scaling"] = None if rope_type == "default" else {
            key: value for key, value in rope.items() if key != "rope_theta"}
    elif values.get("rope_scaling") and "type" in values["rope_scaling"]:
        values["rope_scaling"] = {"rope_type": values["rope_scaling"]["type"],
                                  **values["rope_scaling"]}
    return DogeConfig(**values)


def config_json(config):
    """The config.json that transformers' DogeForCausalLM reads, RoPE in both spellings:
    transformers 5.x reads rope_parameters, 4.x rope_theta and rope_scaling."""
    values = asdict(config)
    values["rope_parameters"] = {"rope_theta": values["rope_theta"],
                                 **(values["rope_scaling"] or {"rope_type": "default"})}
    return {"architectures": ["DogeForCausalLM"], "model_type": "doge", **values}


def hf_name(name):
    """Our parameter name -> the checkpoint's: the body's tensors sit under "model."."""
    return name if name.startswith(("lm_head.", "score.")) else "model." + name


def read_weights(path):
    """All tensors of a model directory: model.safetensors (maybe sharded) or pytorch_model.bin."""
    safetensors_path = os.path.join(path, "model.safetensors")
    index_path = os.path.join(path, "model.safetensors.index.json")
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(safetensors_path) or os.path.exists(index_path):
        from safetensors.torch import load_file
        if os.path.exists(safetensors_path):
            return load_file(safetensors_path)
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {name: tensor for shard in shards
                for name, tensor in load_file(os.path.join(path, shard)).items()}
    if os.path.exists(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin")


def list_checkpoints(out_dir):
    """{step: path} of the train.py checkpoints ckpt_STEP.pt in out_dir ({} if it is missing)."""
    if not os.path.isdir(out_dir):
        return {}
    return {int(match.group(1)): os.path.join(out_dir, name) for name in os.listdir(out_dir)
            if (match := re.fullmatch(r"ckpt_(\d+)\.pt", name))}


def latest_checkpoint(out_dir):
    """The train.py checkpoint in out_dir with the largest step, or None."""
    steps = list_checkpoints(out_dir)
    return steps[max(steps)] if steps else None


def read_checkpoint(path):
    """A train.py checkpoint as saved; a one-line ValueError if it is damaged or not one."""
    checkpoint, problem = checkpoint_or_problem(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return checkpoint


def checkpoint_or_problem(path):
    """(the train.py checkpoint at path, None), or (None, what is wrong with it, in one line)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file raises many kinds; its message may span lines
        return None, f"cannot be read: {type(e).__name__}: {' '.join(str(e).split())}"
    if not isinstance(checkpoint, dict) or not {"model", "model_config"} <= checkpoint.keys():
        return None, "not a train.py checkpoint (no 'model' and 'model_config')"
    return checkpoint, None


def newest_checkpoint(out_dir, say=None, set_aside=False):
    """(path, checkpoint) of the newest readable checkpoint in out_dir, or (None, None) when it
    holds none. A damaged one costs a warning line and the one before it is tried; only the writer
    (train.py's resume) passes set_aside, which renames it to <name>.damaged so that nothing picks
    it again. When every one is damaged, a one-line ValueError says so."""
    say = say or (lambda message: print(message, file=sys.stderr))
    found = sorted(list_checkpoints(out_dir).items(), reverse=True)
    for index, (_, path) in enumerate(found):
        checkpoint, problem = checkpoint_or_problem(path)
        if checkpoint is not None:
            return path, checkpoint
        kept = ""
        if set_aside:
            try:
                os.replace(path, path + ".damaged")
                kept = f", kept as {os.path.basename(path)}.damaged"
            except OSError:  # a read-only directory, or another process renamed it first
                kept = ", left in place"
        if index + 1 < len(found):
            say(f"warning: skipping {path}{kept}: {problem}; trying the one before")
    if not found:
        return None, None
    name = os.path.basename(found[-1][1])
    damaged = (f"its only checkpoint, {name}, is damaged ({problem})" if len(found) == 1 else
               f"all {len(found)} of its checkpoints are damaged (the oldest, {name}: {problem})")
    raise ValueError(f"{out_dir}: {damaged}{kept}")


def load_checkpoint(checkpoint, device="cpu", dtype=None):
    """The model of a train.py checkpoint (model_config plus the uncompiled state dict)."""
    model = Doge(DogeConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device=device, dtype=dtype)


# Hub names: owner/name, or owner/name@revision (a branch, tag or commit)
HUB_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                      r"(?:@(?P<revision>[\w./-]+))?")


# what a Doge needs of a hub repository: safetensors weights (one file, or shards and their index)
# or else pytorch_model.bin, never both; not its remote code, training state or other formats; and
# the tokenizer's files (tokenizer.py's TOKENIZER_FILES: doge.py imports nothing of ours)
HUB_FILES = ("config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "model-*-of-*.safetensors", "tokenizer.json",
             "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")


def local_model_path(path):
    """path itself when it exists; else a hub name, whose files a Doge needs are fetched with the
    optional huggingface_hub package into its usual cache (or found there, offline): the local
    directory of that snapshot. Anything else is a FileNotFoundError of one line."""
    path = os.fspath(path)
    if os.path.exists(os.path.expanduser(path)):
        return os.path.expanduser(path)
    # a name that can only be local (./, /, ~, out/...) never goes to the hub; a typo gets hints
    if path.startswith((".", "/", "~")) or os.path.isdir(path.split("/")[0]):
        raise FileNotFoundError(f"{path}: no such file or directory{nearest_names(path)}")
    hub = HUB_NAME.fullmatch(path)
    if hub is None or re.search(r"\.\.|--|[.-]$", hub["repo"]):
        raise FileNotFoundError(f"{path}: no such file or directory, nor a hub name "
                                f"(owner/name or owner/name@revision)")
    directory = hub_snapshot(hub["repo"], hub["revision"], HUB_FILES)
    if not any(name.endswith(".safetensors") for name in os.listdir(directory)):
        directory = hub_snapshot(hub["repo"], hub["revision"], ("pytorch_model.bin",))
    return directory


def nearest_names(path):
    """'; the nearest in DIR: a, b' for the names in the deepest existing directory of path
    that are closest to the first missing part, or '' when none is close."""
    parts = os.path.expanduser(path).rstrip("/").split("/")

    def first(count):  # the directory of the first count parts ("/" of an absolute path)
        return "/".join(parts[:count]) or ("/" if count and not parts[0] else ".")
    existing = next(i for i in range(len(parts), -1, -1) if os.path.isdir(first(i)))
    if existing == len(parts):  # every part exists: nothing to suggest
        return ""
    directory = first(existing)
    matches = difflib.get_close_matches(parts[existing], sorted(os.listdir(directory)), n=3)
    return f"; the nearest in {directory}: {', '.join(matches)}" if matches else ""


def hub_snapshot(repo_id, revision, patterns):
    """The hub cache's directory of repo_id's files matching patterns (huggingface_hub). No
    package, offline and uncached, or refused: a one-line FileNotFoundError on fetching by hand."""
    at_revision = f" --revision {revision}" if revision else ""
    by_hand = (f"download it yourself (hf download {repo_id}{at_revision} --local-dir DIR) and "
               f"give DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id} is no local path, and fetching it from the hub needs "
                                f"the optional huggingface_hub package (pip install "
                                f"huggingface_hub); or {by_hand}") from None
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))
    except Exception as e:  # offline, no network, no such repository or revision, ...
        reason = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{repo_id} is no local path, and fetching it from the hub failed "
                                f"({type(e).__name__}: {reason}); {by_hand}") from None


def train_checkpoint(path):
    """(path, checkpoint) of the train.py checkpoint that path names: the file, or an out_dir's
    (a directory without config.json) newest readable one; else (None, None). Read once."""
    if os.path.isfile(path):
        return path, read_checkpoint(path)
    if os.path.exists(os.path.join(path, "config.json")):
        return None, None
    return newest_checkpoint(path)


def read_hf_directory(path):
    """A Hugging Face Doge directory: its config.json (a dict), the DogeConfig of the layout its
    weights hold, and the weights, named without the "model." prefix."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a model directory: no config.json there "
                                f"(nor a train.py checkpoint)")
    with open(config_path) as f:
        raw = json.load(f)
    weights = {name.removeprefix("model."): tensor for name, tensor in read_weights(path).items()}
    # which of the two published layouts: q/k norms present, and one A per query or per kv head
    heads = raw.get("num_attention_heads", DogeConfig.num_attention_heads)
    kv_heads = raw.get("num_key_value_heads") or heads
    first_A = weights.get("layers.0.self_attn.A")
    layout = {"num_key_value_heads": kv_heads,
              "qk_norm": "layers.0.self_attn.q_norm.weight" in weights,
              "dt_per_query_head": first_A is not None and first_A.numel() == heads != kv_heads,
              "tie_word_embeddings": raw.get("tie_word_embeddings",
                                             "lm_head.weight" not in weights)}
    return raw, DogeConfig.from_dict({**raw, **layout}), weights


def load_weights(model, weights, path, fresh=()):
    """Copy weights (named without "model.") into model. Each of its tensors, but a tied lm_head
    and those named in fresh, must be there with its shape: else a ValueError naming it."""
    state = {}
    for name, expected in model.state_dict().items():
        key = name.removeprefix("model.")
        if key in fresh or key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if key not in weights:
            raise ValueError(f"{path}: missing tensor {hf_name(key)}")
        if weights[key].shape != expected.shape:
            raise ValueError(f"{path}: tensor {hf_name(key)} has shape {tuple(weights[key].shape)},"
                             f" expected {tuple(expected.shape)} from config.json")
        state[name] = weights[key]
    model.load_state_dict(state, strict=False)


def load_pretrained(path, device="cpu", dtype=None):
    """Doge.from_pretrained."""
    path = local_model_path(path)
    checkpoint_path, checkpoint = train_checkpoint(path)
    if checkpoint_path:
        return load_checkpoint(checkpoint, device, dtype)
    _, config, weights = read_hf_directory(path)
    if "score.weight" in weights:
        raise ValueError(f"{path} holds a sequence classifier (score.weight, no lm_head): load it "
                         f"with DogeForSequenceClassification.from_pretrained")
    model = Doge(config)
    load_weights(model, weights, path)
    return model.to(device=device, dtype=dtype)


def load_classifier(path, num_labels=2, id2label=None, device="cpu", dtype=None):
    """DogeForSequenceClassification.from_pretrained."""
    path = local_model_path(path)
    checkpoint_path, checkpoint = train_checkpoint(path)
    if checkpoint_path:
        causal_lm = load_checkpoint(checkpoint)
        raw, config, weights = {}, causal_lm.config, causal_lm.state_dict()
    else:
        raw, config, weights = read_hf_directory(path)
    if "score.weight" in weights:  # config.json omits id2label when it is the default pair
        id2label = {int(i): name for i, name in raw.get("id2label", {}).items()} or None
        model = DogeForSequenceClassification(
            config, len(id2label) if id2label else raw.get("num_labels", 2), id2label,
            raw.get("problem_type"))
        load_weights(model, weights, path)
    else:
        model = DogeForSequenceClassification(config, num_labels, id2label)
        load_weights(model, weights, path, fresh=("score.weight",))
        print(f"{path} holds a causal LM: its body is loaded, the score head ({num_labels} "
              f"labels) starts fresh", file=sys.stderr)
    return model.to(device=device, dtype=dtype)


def save_pretrained(model, path, tokenizer_dir=None):
    """The one export, of a Doge or a DogeForSequenceClassification, with what `hf upload` needs:
    model.safetensors, config.json (a classifier's with its labels), a Doge's generation_config.json
    (bos, and the eos ids that end generation), the tokenizer of tokenizer_dir (e.g. a train.py
    out_dir) and a model card README.md naming the base model and data of the run recorded there."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tied = model.config.tie_word_embeddings
    tensors = {hf_name(name.removeprefix("model.")): tensor.detach().cpu().contiguous()
               for name, tensor in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    atomic_write(os.path.join(path, "model.safetensors"),
                 lambda temp: save_file(tensors, temp, metadata={"format": "pt"}))
    config = model.config.to_dict()
    if isinstance(model, DogeForSequenceClassification):
        config.update(architectures=["DogeForSequenceClassification"], num_labels=model.num_labels,
                      id2label=model.id2label, problem_type=model.problem_type,
                      label2id={name: i for i, name in model.id2label.items()})
    else:
        generation = {"bos_token_id": model.config.bos_token_id,
                      "eos_token_id": model.config.eos_token_id}
        atomic_write_text(os.path.join(path, "generation_config.json"),
                          json.dumps(generation, indent=2))
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(config, indent=2))
    if tokenizer_dir is not None:  # the tokenizer's business: tokenizer.py, the one import of ours
        from tokenizer import write_tokenizer_files
        write_tokenizer_files(tokenizer_dir, path)
    atomic_write_text(os.path.join(path, "README.md"), model_card(model, path, tokenizer_dir))


def run_records(run_dir):
    """The train.py launch records of run_dir/runs (a train.py out_dir), oldest first."""
    runs = os.path.join(run_dir or "", "runs")
    names = sorted(os.listdir(runs)) if run_dir and os.path.isdir(runs) else []
    records = []
    for name in names:  # named by the time the launch started
        if name.endswith(".json"):
            with open(os.path.join(runs, name)) as f:
                records.append(json.load(f))
    return records


def provenance(run_dir):
    """The model card's metadata lines and bullets from run_dir's records: the base model is the
    newest non-resuming launch's init_from (or what the first resumed), the data the last's."""
    records = run_records(run_dir)
    if not records:
        return [], ["- Base model and training data: not recorded (the export was given no "
                    "train.py out_dir with run records)"]
    launches = [record["train_config"] for record in records]
    start = next((c for c in reversed(launches) if c["init_from"] != "resume"), None)
    base = start["init_from"] if start else f"resumed {launches[0]['resume_ckpt'] or 'a run'}"
    data = records[-1].get("data", {}).get("source") or launches[-1]["data_dir"]
    data_set = re.match(r"--source ([^\s:]+)", data)  # a hub data set, by name
    metadata = [f"base_model: {base}"] if HUB_NAME.fullmatch(base) and \
        not os.path.exists(base) else []
    metadata += ["datasets:", f"- {data_set[1]}"] if data_set else []
    last = launches[-1]
    return metadata, [
        f"- Base model: {'none, trained from scratch' if base == 'scratch' else base}",
        f"- Training data: {data}",
        f"- Training: {last['max_iters']} steps of {last['total_batch_size']} tokens, learning "
        f"rate {last['learning_rate']:g}, with doge's train.py (last launch "
        f"{records[-1].get('started', '?')})"]


def model_card(model, path, run_dir):
    """A short README.md for the hub: what the model is, and its provenance(run_dir). Its title
    is the run's name (the out_dir's) or else the export directory's."""
    config = model.config
    name = run_dir if run_records(run_dir) else path
    classifier = isinstance(model, DogeForSequenceClassification)
    metadata, bullets = provenance(run_dir)
    what = (f"A Doge sequence classifier, {model.num_labels} labels "
            f"({', '.join(model.id2label.values())})" if classifier else "A Doge language model")
    moe = "CDMoE, " if config.is_moe else ""
    loader = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: " + (
            "text-classification" if classifier else "text-generation"),
        "tags:", "- doge", *metadata, "---", "", f"# {os.path.basename(os.path.abspath(name))}",
        "", f"{what}: Dynamic Mask Attention, {moe}learnable residuals; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"{config.num_attention_heads} heads ({config.num_key_value_heads} key/value), "
        f"vocabulary {config.vocab_size}, keep_window_size {config.keep_window_size}.", "",
        *bullets, "", f"Loads with transformers (`{loader}.from_pretrained`) and with doge.py.",
        ""])


def hold_mask_bias_at_zero(model):
    """DMAttn as a sliding window: every A frozen at 0 (dt = 1: all keys tie, the latest W kept)."""
    for layer in model.layers:
        with torch.no_grad():
            layer.self_attn.A.zero_()
        layer.self_attn.A.requires_grad_(False)


def upcycle_to_moe(model, num_experts, num_experts_per_tok, **config_overrides):
    """A CDMoE Doge computing exactly the dense model's function: the MLPs become the shared
    experts, the router and down vectors random, the up vectors zero (nothing added, at first)."""
    config = DogeConfig(**{**asdict(model.config), "is_moe": True, "num_experts": num_experts,
                           "num_experts_per_tok": num_experts_per_tok, **config_overrides})
    weight = model.lm_head.weight
    moe = Doge(config).to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = moe.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".mlp.router_gate." in name or "_embed." in name
                                  for name in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in moe.layers:
            layer.mlp.up_embed.weight.zero_()
    return moe


def grow_vocabulary(model, vocab_size, new_ids):
    """The model with an embedding (and lm_head) of at least vocab_size rows, the rows of the new
    token ids (e.g. a chat template's special tokens) the mean of the others: an unknown token
    starts as an average one (tied: an average logit), not as noise. Other logits are unchanged."""
    config = DogeConfig(**{**asdict(model.config),
                           "vocab_size": max(vocab_size, model.config.vocab_size)})
    state = model.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        old = state[name]
        known = torch.ones(len(old), dtype=torch.bool)
        known[[i for i in new_ids if i < len(old)]] = False
        mean = old[known].float().mean(dim=0).to(old.dtype)
        rows = torch.cat([old, mean.expand(config.vocab_size - len(old), -1)])  # (V', D)
        rows[new_ids] = mean
        state[name] = rows
    grown = Doge(config).to(device=old.device, dtype=old.dtype)
    grown.load_state_dict(state)
    return grown

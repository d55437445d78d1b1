"""Test oracles: the transformers reference with its tie-breaking pinned, and a naive Doge.

The reference picks the keep_window_size keys of a row with torch.topk, which leaves ties to the
device and version. Ties are common (every repeated token in layer 0, every key when A = 0), so
the tests compare against the reference with the rule of docs/reference.md, The tie rule,
installed: larger dt first, the later key among equals. The rule is counted pairwise
(doge.better_than, part 1's definition), independently of doge.py's sort.
"""

import math

import torch
import torch.nn.functional as F

import doge


def keep_mask(dt, visible, keep_window_size):
    """dt (B, Hb, Tk); visible (B or 1, 1 or Hb, Tq, Tk) bool. A key is kept by a row while fewer
    than keep_window_size of the row's visible keys beat it. The reference's rows are not always
    the queries 0..Tk-1 that doge.key_deaths_by_definition assumes (a cached step's rows are the
    new queries only), so its mask is counted row by row from what each row sees."""
    rank = visible.double() @ doge.better_than(dt).double()  # (B, Hb, Tq, Tk)
    return visible & (rank < keep_window_size)


def tie_rule_prepare_dynamic_mask(self, hidden_states, dt_states, keep_window_size=2048,
                                  attention_mask=None):
    """Drop-in for DogeAttention.prepare_dynamic_mask with the tie rule pinned."""
    num_queries, num_keys = hidden_states.shape[1], dt_states.shape[-1]
    if attention_mask is None:
        visible = torch.ones(1, 1, num_queries, num_keys, dtype=torch.bool)
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[:, :, :, :num_keys]
    else:
        visible = attention_mask[:, :, :, :num_keys] == 0
    keep = keep_mask(dt_states, visible, keep_window_size)
    bias = dt_states[:, :, None, :].expand(-1, -1, num_queries, -1)
    return bias.masked_fill(~keep, torch.finfo(hidden_states.dtype).min)


def assert_close_to_scale(actual, expected, tol=1e-5):
    """Every |actual - expected| at most tol times the largest |expected|: a tolerance that
    scales with the values, so it holds for every BLAS build and thread count (each sums in its
    own order; float32 rounding is about 1e-7 of the sums' size, and grows with depth)."""
    scale = expected.detach().abs().max().item()
    error = (actual.detach() - expected.detach()).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3g} > {tol:g} x max |expected| {scale:.3g}"


def reference_class():
    """transformers' DogeForCausalLM with the tie rule installed."""
    from transformers.models.doge import modeling_doge
    modeling_doge.DogeAttention.prepare_dynamic_mask = tie_rule_prepare_dynamic_mask
    return modeling_doge.DogeForCausalLM


def randomize(model, seed=0):
    """Give every parameter a random value, A, norms and residual scales included, so that the
    dynamic mask is far from constant and every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(".A"):
                param.copy_(noise)
            elif "norm" in name or "residual" in name:
                param.copy_(1 + 0.3 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def naive_forward(model, idx):
    """Doge's equations written out with explicit (T x T) masks, for both checkpoint layouts."""
    config = model.config
    heads, kv_heads, head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                 config.head_dim)
    batch, length = idx.shape

    def rms(x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(length).float()[:, None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def rope(x):
        half = head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    x = model.embed_tokens.weight[idx]
    for layer in model.layers:
        attn = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        q = (h @ attn.q_proj.weight.t()).view(batch, length, heads, head_dim)
        k = (h @ attn.k_proj.weight.t()).view(batch, length, kv_heads, head_dim)
        values = h @ attn.v_proj.weight.t()
        v = values.view(batch, length, kv_heads, head_dim)
        if config.qk_norm:
            q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
        q, k, v = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)), v.transpose(1, 2)
        dt = torch.exp(attn.A * F.softplus(values @ attn.dt_proj.weight.t())).transpose(1, 2)
        # one copy of the kv heads per bias head: query head h uses kv head h // (H / Hkv)
        k, v = (t.repeat_interleave(dt.shape[1] // kv_heads, 1) for t in (k, v))
        out = doge.attention_by_definition(q, k, v, dt, config.keep_window_size,
                                           1 / math.sqrt(head_dim))
        out = out.transpose(1, 2).reshape(batch, length, -1)
        x = layer.input_residual * x + out @ attn.o_proj.weight.t()
        h = rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        h = (F.silu(h @ mlp.gate_proj.weight.t()) * (h @ mlp.up_proj.weight.t())) @ \
            mlp.down_proj.weight.t()
        x = layer.post_attention_residual * x + h
    return rms(x, model.norm.weight) @ model.lm_head.weight.t()


def tiny_config(**overrides):
    values = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, keep_window_size=8,
                  max_position_embeddings=64)
    return doge.DogeConfig(**{**values, **overrides})

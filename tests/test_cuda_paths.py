"""The paths doge.py takes on CUDA, run on CPU: the compiled chunked loss, the alternative
T <= keep_window_size attention paths, the lifetime path past the window (FlexAttention with
each key's lifetime as the mask) and decoding with a static cache, each against the CPU path it
replaces (values and gradients, or tokens). At the end, tests that need the GPU itself. Their
speed is bench.py --cases=gpu's business."""

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import doge
import oracle
from oracle import assert_close_to_scale as close
from oracle import naive_forward, randomize, tiny_config
from test_model import continue_turns, distinct_prompts, random_model, tie_free_model

# the chunk shapes of every test here are the same (40 rows of 32 channels, 97 logits, chunks of
# 16 rows: the last one ragged), so the compiled chunk compiles once per variant
ROWS, WIDTH, VOCAB, CHUNK_ROWS = 40, 32, 97, 16


@pytest.fixture
def compiled_loss(monkeypatch):
    """Chunks of CHUNK_ROWS rows, compiled as on CUDA. torch.compile on CPU needs a C++ compiler;
    without one, the same chunk function runs eagerly."""
    monkeypatch.setattr(doge, "COMPILED_LOSS_CHUNK_ELEMENTS", CHUNK_ROWS * VOCAB)
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        monkeypatch.setattr(doge, "compiled_loss_chunk", lambda: doge.loss_chunk)


def loss_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, WIDTH, generator=generator)
    weight = 0.3 * torch.randn(VOCAB, WIDTH, generator=generator)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    targets[:5] = -1  # ignored
    targets[-3:] = -1  # some of the padded last chunk's real rows too
    return hidden, weight, targets


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_loss_chunks_equal_the_cpu_loss(compiled_loss, dtype, rtol):
    hidden, weight, targets = loss_inputs()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    keep_logits = dtype == torch.float32
    with autocast:
        expected = doge.cross_entropy_chunks(hidden, weight, targets, keep_logits, True)
        actual = doge.compiled_cross_entropy_chunks(hidden, weight, targets, keep_logits, True)
    names = ("loss", "logits", "grad_hidden", "grad_weight")
    for name, a, b in zip(names, actual, expected):
        if name == "logits" and not keep_logits:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        close(a, b, rtol)


def test_compiled_loss_trains_the_model_like_the_cpu_loss(compiled_loss, monkeypatch):
    """Through Doge.forward and autograd: the same loss, logits and parameter gradients, and the
    same no-grad (evaluation) loss."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(randomize(doge.Doge(tiny_config(rope_scaling=None)), 0).train())
    idx = torch.randint(0, VOCAB, (2, ROWS // 2))
    targets = torch.randint(0, VOCAB, (2, ROWS // 2))
    targets[0, :4] = -1
    expected_logits, expected = models[0](idx, targets)
    expected.backward()
    monkeypatch.setattr(doge, "pick_cross_entropy",
                        lambda hidden: doge.compiled_cross_entropy_chunks)
    logits, loss = models[1](idx, targets)
    loss.backward()
    close(loss, expected, 1e-5)
    close(logits, expected_logits, 1e-5)
    for a, b in zip(models[1].parameters(), models[0].parameters()):
        close(a.grad, b.grad, 1e-5)
    with torch.no_grad():
        close(models[1](idx, targets, keep_logits=False)[1], expected, 1e-5)


def test_every_compiled_chunk_has_the_same_rows(monkeypatch):
    """Bounded memory, and one compiled graph for every length: the chunks are CHUNK_ROWS rows,
    the last one padded; an input smaller than a chunk is one chunk of its own size."""
    monkeypatch.setattr(doge, "COMPILED_LOSS_CHUNK_ELEMENTS", CHUNK_ROWS * VOCAB)
    shapes = []

    def recording_chunk(h, *args):
        shapes.append(tuple(h.shape))
        return doge.loss_chunk(h, *args)

    monkeypatch.setattr(doge, "compiled_loss_chunk", lambda: recording_chunk)
    hidden, weight, targets = loss_inputs()
    doge.compiled_cross_entropy_chunks(hidden, weight, targets, False, True)
    assert shapes == [(CHUNK_ROWS, WIDTH)] * 3  # 40 rows: 16, 16, and 8 padded to 16
    shapes.clear()
    doge.compiled_cross_entropy_chunks(hidden[:5], weight, targets[:5], False, True)
    assert shapes == [(5, WIDTH)]


def test_cpu_takes_the_cpu_loss_and_cuda_the_compiled_one():
    assert doge.pick_cross_entropy(torch.zeros(1)) is doge.cross_entropy_chunks
    meta = torch.zeros(1, device="meta")  # not CUDA either
    assert doge.pick_cross_entropy(meta) is doge.cross_entropy_chunks


# --- attention for T <= keep_window_size


def attention_inputs(heads, bias_heads, length=24, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, head_dim, generator=generator)
    k, v = (torch.randn(2, bias_heads, length, head_dim, generator=generator) for _ in range(2))
    dt = torch.rand(2, bias_heads, length, generator=generator) * 3  # a bias that matters
    return [t.requires_grad_() for t in (q, k, v, dt)]


def outputs_and_grads(attend, inputs, scale):
    out = attend(*inputs, scale)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    return [out.detach(), *grads]


LAYOUTS = [(4, 2), (4, 4), (2, 1)]  # (H, Hb): GQA groups, a bias per query head, Doge-20M's 2/1


@pytest.mark.parametrize("heads, bias_heads", LAYOUTS)
def test_the_short_path_equals_the_definition_with_its_gradients(heads, bias_heads):
    """T <= W: one fused causal SDPA with the bias folded into q and k (the path on every
    device) gives attention_by_definition's outputs and gradients."""
    inputs = attention_inputs(heads, bias_heads)
    expected = outputs_and_grads(
        lambda q, k, v, dt, scale: doge.attention_by_definition(q, k, v, dt, 24, scale), inputs,
        0.25)
    for actual, wanted in zip(outputs_and_grads(doge.attend_short, inputs, 0.25), expected):
        close(actual, wanted, 1e-5)


# --- key lifetimes (the lifetime path: FlexAttention on CUDA)


def tied_dt(batch, heads, length, seed=0):
    """Biases with many exact ties: a handful of distinct values."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (batch, heads, length), generator=generator).float() / 4


@pytest.mark.parametrize("length, window", [(7, 8), (40, 8), (40, 1), (300, 3), (600, 300)])
def test_key_lifetimes_equal_brute_force_top_w(length, window):
    dt = tied_dt(2, 3, length)
    death = doge.key_lifetimes(dt, window)
    assert torch.equal(death, doge.key_deaths_by_definition(dt, window))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keep = oracle.keep_mask(dt, causal[None, None], window)  # (B, Hb, T, T), top W per row
    position = torch.arange(length)
    # each key is kept by one unbroken run of queries starting at itself, and no longer
    assert torch.equal(death, position + keep.sum(dim=-2))
    assert torch.equal((position <= position[:, None]) & (position[:, None] < death.unsqueeze(-2)),
                       keep)


@pytest.mark.parametrize("length", [500, 512, 600])
def test_lifetime_block_mask_marks_exactly_the_live_tiles(length):
    block = doge.FLEX_BLOCK
    dt = tied_dt(1, 2, length)
    death = F.pad(doge.key_lifetimes(dt, 300), (0, -length % block))  # as attend_lifetimes pads
    padded = death.shape[-1]
    position = torch.arange(padded)
    keep = (position <= position[:, None]) & (position[:, None] < death.unsqueeze(-2))
    tiles = keep.view(1, 2, padded // block, block, padded // block, block)
    any_kept, all_kept = tiles.any(dim=(3, 5)), tiles.all(dim=(3, 5))  # (B, Hb, nq, nk)
    mask = doge.lifetime_block_mask(death, 2, lambda b, h, q, kv: kv <= q, length)

    def tiles_of(counts, indices):
        dense = torch.zeros(1, 4, padded // block, padded // block, dtype=torch.bool)
        for row in range(dense.shape[2]):
            for head in range(4):
                dense[0, head, row, indices[0, head, row, :counts[0, head, row]].long()] = True
        return dense

    partial = tiles_of(mask.kv_num_blocks, mask.kv_indices)
    full = tiles_of(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not (partial & full).any()
    # two query heads share each bias head; a tile is visited iff a query in it keeps a key
    assert torch.equal(partial | full, any_kept.repeat_interleave(2, dim=1))
    assert not (full & ~all_kept.repeat_interleave(2, dim=1)).any()
    assert full.any()


def lifetime_inputs(heads, bias_heads, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, 16, generator=generator)
    k, v = torch.randn(2, 2, bias_heads, length, 16, generator=generator)
    return q, k, v, tied_dt(2, bias_heads, length, seed) * 3


@pytest.mark.parametrize("heads, bias_heads", [(4, 2), (4, 4)])  # GQA; the older layout
@pytest.mark.parametrize("length, window", [(150, 40), (150, 1), (30, 40)])
def test_dense_lifetime_mask_equals_blocked_path_with_gradients(monkeypatch, heads, bias_heads,
                                                                 length, window):
    """The dense lifetime mask (attention_by_definition) gives the blocked path's values and
    gradients (q, k, v and dt) on CPU: the backward the CUDA path relies on, checked through a
    dense mask."""
    monkeypatch.setattr(doge, "QUERY_BLOCK", 32)
    inputs = lifetime_inputs(heads, bias_heads, length)
    ours = [t.clone().requires_grad_() for t in inputs]
    dense = [t.clone().requires_grad_() for t in inputs]
    scale = 16 ** -0.5
    out, _ = doge.dynamic_mask_attention(*ours, 0, None, window, scale)
    expected = doge.attention_by_definition(*dense, window, scale)
    close(out, expected)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    # q, k, v and dt in one vector: at W = 1 the gradients of q and dt are exactly 0
    close(torch.cat([t.grad.flatten() for t in ours]),
                          torch.cat([t.grad.flatten() for t in dense]))


@pytest.mark.parametrize("heads, bias_heads", [(4, 2), (4, 4)])
@pytest.mark.parametrize("length, window", [(300, 40), (150, 1)])
def test_flex_attention_lifetime_path_equals_blocked_path(monkeypatch, heads, bias_heads,
                                                          length, window):
    """The CUDA path's FlexAttention call, run forward on CPU (eager: it has no CPU backward). The
    eager call evaluates mask_mod everywhere; the block mask is checked by the test above."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(doge, "QUERY_BLOCK", 64)
    q, k, v, dt = lifetime_inputs(heads, bias_heads, length, seed=1)
    scale = 16 ** -0.5
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": meant for CPU tests
        out = doge.attend_lifetimes(q, k, v, dt, window, scale, flex.flex_attention)
        expected, _ = doge.dynamic_mask_attention(q, k, v, dt, 0, None, window, scale)
    close(out, expected)


@pytest.mark.parametrize("layout", [dict(), dict(qk_norm=False, dt_per_query_head=True)])
def test_model_on_the_lifetime_path_matches_naive_oracle(monkeypatch, layout):
    """The whole model as it runs on CUDA past the window (eager FlexAttention, forward only)."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(doge, "uses_lifetime_path", lambda device: True)
    monkeypatch.setattr(doge, "compiled_flex_attention", lambda: flex.flex_attention)
    model = random_model(**layout)
    idx = torch.randint(0, 97, (2, 43))
    idx[:, 20:30] = idx[:, 0:10]  # repeated tokens tie in layer 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(model(idx)[0], naive_forward(model, idx))


# --- generation on CUDA: a static cache and a captured step


@pytest.mark.parametrize("overrides, prompt_length, new_tokens", [
    (dict(), 5, 20),  # past the window (8) during decoding
    (dict(), 12, 10),  # a prompt longer than the window
    (dict(is_moe=True, num_experts=16, num_experts_per_tok=4), 5, 12),
    (dict(qk_norm=False, dt_per_query_head=True), 5, 12),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), 60, 8),  # past 64 positions
])
def test_static_decoding_gives_the_same_tokens(monkeypatch, overrides, prompt_length,
                                               new_tokens):
    """The CUDA path's step (static cache, position on the device), run on CPU without the graph
    capture, against the CPU path: greedy and seeded sampling, batch 3."""
    model = random_model(**overrides)
    prompt = torch.randint(0, 97, (3, prompt_length))
    settings = [dict(temperature=0),
                dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)]
    expected = []
    for sampling in settings:
        torch.manual_seed(3)
        expected.append(model.generate(prompt, new_tokens, **sampling))
    shapes = set()
    original_insert = doge.LayerCache.insert

    def insert(self, *args):  # record the shapes attention reads
        original_insert(self, *args)
        shapes.add(tuple(t.shape for t in self.kept()))

    monkeypatch.setattr(doge.LayerCache, "insert", insert)
    monkeypatch.setattr(doge, "uses_static_decoding", lambda device: True)
    for sampling, tokens in zip(settings, expected):
        torch.manual_seed(3)
        assert torch.equal(model.generate(prompt, new_tokens, **sampling), tokens), sampling
    assert len(shapes) == 1  # every step the same shapes


@pytest.mark.parametrize("overrides", [dict(), dict(qk_norm=False, dt_per_query_head=True)])
def test_a_continued_static_cache_computes_one_forward_pass(monkeypatch, tmp_path, overrides):
    """Turns on one static cache (the CUDA graph's step, uncaptured; see
    test_model.test_turns_on_one_cache_compute_one_forward_pass): the logits of one forward pass
    at every generated position; its saved state continues in a dynamic cache as it does itself."""
    model = tie_free_model(**overrides)
    monkeypatch.setattr(doge, "uses_static_decoding", lambda device: True)
    cache = model.new_cache(batch_size=2)
    assert cache.static
    prompts = distinct_prompts(2)
    tokens, logits, positions = continue_turns(model, cache, prompts)
    with torch.no_grad():
        close(logits, model(tokens)[0][:, positions])
    cache.save(tmp_path / "static.pt")
    monkeypatch.setattr(doge, "uses_static_decoding", lambda device: False)
    dynamic = model.load_cache(tmp_path / "static.pt")
    assert not dynamic.static
    more = distinct_prompts(2, seed=1)[:1]  # one more turn
    assert torch.equal(continue_turns(model, dynamic, more)[0],
                       continue_turns(model, cache, more)[0])


# --- the CUDA paths themselves (skipped without a GPU; the CPU tests above check their logic)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_lifetime_path_equals_blocked_path_with_gradients(monkeypatch):
    """Compiled FlexAttention (forward and backward) against the blocked path, on the GPU."""
    # head_dim 16: FlexAttention's GPU kernels take no narrower heads
    model = random_model(hidden_size=64, keep_window_size=40, max_position_embeddings=512)
    model = model.cuda().train()
    idx = torch.randint(0, 97, (2, 300), device="cuda")
    idx[:, 100:150] = idx[:, :50]  # ties in layer 0

    def loss_and_grads():
        model.zero_grad()
        loss = model(idx, idx)[1]
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    monkeypatch.setattr(doge, "uses_lifetime_path", lambda device: False)
    expected_loss, expected_grads = loss_and_grads()
    close(loss, expected_loss)
    for a, b in zip(grads, expected_grads):
        close(a, b, tol=1e-3)  # the GPU kernels sum in their own orders


@needs_cuda
@pytest.mark.filterwarnings("error:decoding without a CUDA graph")  # the capture must work
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_decoding_gives_the_same_tokens(monkeypatch, batch):
    model = random_model(is_moe=True, num_experts=16, num_experts_per_tok=4).cuda()
    prompt = torch.randint(0, 97, (batch, 5), device="cuda")
    captured = model.generate(prompt, 30, temperature=0)
    sampled = model.generate(prompt, 30, temperature=0.8, top_k=20, top_p=0.9,
                             repetition_penalty=1.3)
    monkeypatch.setattr(doge, "uses_static_decoding", lambda device: False)
    assert torch.equal(captured, model.generate(prompt, 30, temperature=0))
    assert sampled.shape == captured.shape and sampled.min() >= 0 and sampled.max() < 97


@needs_cuda
@pytest.mark.filterwarnings("error:decoding without a CUDA graph")  # the capture must work
def test_cuda_graph_turns_on_one_cache_compute_one_forward_pass(tmp_path):
    """Turns on one captured static cache on the GPU (float32): the logits of one forward pass,
    and a saved state continues with the tokens of the uninterrupted cache."""
    model = tie_free_model(is_moe=True, num_experts=16, num_experts_per_tok=4).cuda()
    cache = model.new_cache(batch_size=2)
    assert cache.static
    prompts = distinct_prompts(2)
    tokens, logits, positions = continue_turns(model, cache, prompts[:3])
    with torch.no_grad():
        close(logits, model(tokens)[0][:, positions], tol=1e-4)
    cache.save(tmp_path / "state.pt")
    expected = continue_turns(model, cache, prompts[3:])
    resumed = continue_turns(model, model.load_cache(tmp_path / "state.pt"), prompts[3:])
    assert torch.equal(resumed[0], expected[0])

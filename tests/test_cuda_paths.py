"""The paths doge.py takes on CUDA, run on CPU: the compiled chunked loss and the alternative
T <= keep_window_size attention paths, each against the CPU path it replaces (values and
gradients). Their speed is bench.py --cases=gpu's business."""

import shutil

import pytest
import torch

import doge
from oracle import assert_close_to_scale as close
from oracle import randomize, tiny_config

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
    monkeypatch.setattr(doge, "chunked_loss", lambda hidden: doge.compiled_cross_entropy_chunks)
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
    assert doge.chunked_loss(torch.zeros(1)) is doge.cross_entropy_chunks
    meta = torch.zeros(1, device="meta")  # not CUDA either
    assert doge.chunked_loss(meta) is doge.cross_entropy_chunks


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
def test_additive_mask_attention_equals_the_folded_bias(heads, bias_heads):
    inputs = attention_inputs(heads, bias_heads)
    expected = outputs_and_grads(doge.attend_short_folded, inputs, 0.25)
    actual = outputs_and_grads(doge.attend_short_additive, inputs, 0.25)
    for a, b in zip(actual, expected):  # the output, then the gradients of q, k, v and dt
        close(a, b, 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the inputs as the model gives them
        expected = doge.attend_short_folded(*inputs, 0.25)
        actual = doge.attend_short_additive(*inputs, 0.25)
    assert actual.dtype == expected.dtype == torch.bfloat16
    close(actual.float(), expected.float(), 1e-2)


NO_COMPILE_WARNING = "ignore:.*flex_attention called without torch.compile"


@pytest.mark.filterwarnings(NO_COMPILE_WARNING)
@pytest.mark.parametrize("heads, bias_heads", LAYOUTS)
def test_flex_attention_forward_equals_the_folded_bias(heads, bias_heads):
    pytest.importorskip("torch.nn.attention.flex_attention")
    inputs = [t.detach() for t in attention_inputs(heads, bias_heads)]  # forward only on CPU
    with torch.no_grad():
        expected = doge.attend_short_folded(*inputs, 0.25)
        close(doge.attend_short_flex(*inputs, 0.25), expected, 1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 q, k and bfloat16 v
            values = inputs[2].to(torch.bfloat16)
            actual = doge.attend_short_flex(inputs[0], inputs[1], values, inputs[3], 0.25)
        close(actual.float(), expected, 1e-2)


@pytest.mark.filterwarnings(NO_COMPILE_WARNING)
def test_flex_attention_gradients_equal_the_folded_bias():
    pytest.importorskip("torch.nn.attention.flex_attention")
    inputs = attention_inputs(4, 2)
    expected = outputs_and_grads(doge.attend_short_folded, inputs, 0.25)
    try:
        actual = outputs_and_grads(doge.attend_short_flex, inputs, 0.25)
    except NotImplementedError as e:  # torch 2.14: "FlexAttention does not support backward on CPU"
        pytest.skip(f"FlexAttention backward does not run on CPU here: {e}")
    for a, b in zip(actual, expected):
        close(a, b, 1e-5)


def test_cpu_attention_is_the_folded_bias(monkeypatch):
    """Whatever CUDA_SHORT_ATTENTION says, the CPU keeps its path."""
    inputs = attention_inputs(4, 2)
    monkeypatch.setattr(doge, "CUDA_SHORT_ATTENTION", "additive")
    calls = []
    monkeypatch.setattr(doge, "attend_short_additive", lambda *args: calls.append(args))
    with torch.no_grad():
        close(doge.attend_short(*inputs, 0.25), doge.attend_short_folded(*inputs, 0.25), 0)
    assert not calls

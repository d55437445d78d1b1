"""The model on its own: configs, invariants, the attention paths, the cache, the loss, sampling."""

import itertools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import doge
from oracle import assert_close_to_scale, naive_forward, randomize, tiny_config


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(doge.Doge(tiny_config(**{"rope_scaling": None, **overrides})), seed).eval()


# --- config


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=30, num_attention_heads=4), "not divisible by num_attention_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "does not divide"),
    (dict(is_moe=True, num_experts=16, num_experts_per_tok=17), "num_experts_per_tok 17"),
    (dict(is_moe=True, num_experts=15, num_experts_per_tok=2), "perfect square"),
    (dict(keep_window_size=0), "keep_window_size"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
])
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        doge.DogeConfig(**overrides)


@pytest.mark.parametrize("name, millions", [
    ("doge-20m", 13.1), ("doge-60m", 54.6), ("doge-160m", 152.7), ("doge-320m", 335.8),
    ("doge-40m-moe", 43.5)])
def test_presets_have_the_published_sizes(name, millions):
    with torch.device("meta"):
        model = doge.Doge(doge.DogeConfig.from_preset(name))
    assert round(model.num_params() / 1e6, 1) == pytest.approx(millions, abs=0.1)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'doge-1b'"):
        doge.DogeConfig.from_preset("doge-1b")


# --- the forward pass


def test_shapes_and_bad_input():
    model = random_model()
    logits, loss = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97) and loss is None
    with pytest.raises(ValueError, match=r"\(B, T\) int64"):
        model(torch.randint(0, 97, (11,)))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 4)))


@pytest.mark.parametrize("layout", [dict(), dict(qk_norm=False, dt_per_query_head=True)])
def test_blocked_attention_matches_naive_oracle_across_blocks(monkeypatch, layout):
    monkeypatch.setattr(doge, "QUERY_BLOCK", 5)  # many blocks, including a ragged last one
    model = random_model(**layout)
    idx = torch.randint(0, 97, (2, 43))
    idx[:, 20:30] = idx[:, 0:10]  # repeated tokens tie in layer 0
    with torch.no_grad():
        assert_close_to_scale(model(idx)[0], naive_forward(model, idx))


def test_dense_model_is_causal():
    model = random_model()
    idx = torch.randint(0, 97, (1, 30))
    edited = idx.clone()
    edited[0, 20:] = (idx[0, 20:] + 1) % 97
    with torch.no_grad():
        assert_close_to_scale(model(idx)[0][:, :20], model(edited)[0][:, :20])
        assert (model(idx)[0][:, 20:] - model(edited)[0][:, 20:]).abs().max() > 1e-3


def test_zero_A_is_a_sliding_window_of_the_last_keys(monkeypatch):
    """At initialisation every dt is 1: the tie rule makes DMAttn a sliding window."""
    model = random_model()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.A.zero_()
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        ours = model(idx)[0]
    window = model.config.keep_window_size
    monkeypatch.setattr(doge, "key_deaths_by_definition", lambda dt, size: (
        torch.arange(dt.shape[-1]) + window).clamp(max=dt.shape[-1]).expand_as(dt))
    assert_close_to_scale(ours, naive_forward(model, idx))


# --- the bounded cache


def decode_one_by_one(model, idx, prompt_length):
    """Logits at every position the way generate makes them: the prompt through forward with a
    cache, then one decode_step (fused weights, in-place eviction) per token."""
    cache = doge.DogeCache(model.config, idx.shape[0], "cpu", torch.float32)
    weights = doge.decoding_weights(model)
    with torch.no_grad():
        steps = [model(idx[:, :prompt_length], cache=cache)[0]]
        for t in range(prompt_length, idx.shape[1]):
            steps.append(doge.decode_step(model, idx[:, t], cache, weights).unsqueeze(1))
            assert all(layer.size <= model.config.keep_window_size for layer in cache.layers)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("layout", [dict(), dict(qk_norm=False, dt_per_query_head=True)])
@pytest.mark.parametrize("prompt_length", [3, 20])
def test_cached_decoding_equals_full_recompute(layout, prompt_length):
    model = random_model(**layout)
    # distinct tokens: an exact dt tie between a key computed in a batch and one computed alone
    # is not bit-stable (the two matmuls round differently); exact ties are tested with A = 0
    idx = torch.stack([torch.randperm(97)[:40] for _ in range(2)])
    with torch.no_grad():
        full = model(idx)[0]
    assert_close_to_scale(decode_one_by_one(model, idx, prompt_length), full)


@pytest.mark.parametrize("prompt_length", [3, 20])
def test_cached_decoding_with_every_dt_tied(prompt_length):
    model = random_model()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.A.zero_()  # dt = 1 for every key, in any rounding
        idx = torch.randint(0, 97, (2, 40))
        full = model(idx)[0]
    assert_close_to_scale(decode_one_by_one(model, idx, prompt_length), full)


def test_cache_takes_multi_token_chunks():
    model = random_model()
    idx = torch.randperm(97)[:30].unsqueeze(0)  # distinct tokens, see above
    cache = doge.DogeCache(model.config, 1, "cpu", torch.float32)
    with torch.no_grad():
        chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 19), (19, 30))]
        assert_close_to_scale(torch.cat(chunks, dim=1), model(idx)[0])


@pytest.mark.parametrize("static", [False, True])
def test_cache_evicts_lowest_dt_then_oldest(static):
    """The static cache (fixed shapes, for a CUDA graph) finds free slots by the same rule."""
    layer = doge.LayerCache(1, 1, 3, 2, "cpu", torch.float32, static)

    def insert(position, dt):  # key channels hold the position, value channels position + 10
        layer.insert(torch.full((1, 2), float(position)), torch.full((1, 2), position + 10.0),
                     torch.tensor([dt]), position)

    for position, dt in enumerate([5.0, 1.0, 1.0]):
        insert(position, dt)
    insert(3, 1.0)
    assert sorted(layer.pos[0, :3].tolist()) == [0, 2, 3]  # the older of the two 1.0s left
    insert(4, 0.5)
    assert sorted(layer.pos[0, :3].tolist()) == [0, 2, 3]  # worse than all: not kept
    if static:
        layer.size = 3  # a static cache leaves size alone; state() reads the first `size` slots
    assert layer.size == 3
    k, v, dt, pos = layer.state()  # each key's value and dt moved with it
    assert k[0, 0].tolist() == [[p, p] for p in pos[0, 0].tolist()]
    assert v[0, 0].tolist() == [[p + 10, p + 10] for p in pos[0, 0].tolist()]
    assert dt[0, 0].tolist() == [{0: 5.0, 2: 1.0, 3: 1.0}[p] for p in pos[0, 0].tolist()]


# --- a continued cache: generation turn by turn, the state as a file


def tie_free_model(**overrides):
    """random_model with A = 0 in layer 0. There dt depends on the token alone, so a repeated
    token ties exactly in exact arithmetic, and which copy a path keeps hangs on the last bit of
    its products (docs/differences.md: the tie rule across paths). Greedy replies repeat tokens; with A = 0
    every dt of layer 0 is exactly 1 on every path, so the tie rule decides the same way
    everywhere. Later layers see context: their keys do not tie."""
    model = random_model(**overrides)
    with torch.no_grad():
        model.layers[0].self_attn.A.zero_()
    return model


# each turn: (prompt tokens, max_new_tokens, the caller stops after this many, eos ids). The
# third turn's eos ids are every token: it ends at its first token.
TURNS = ((5, 6, None, None), (4, 50, 3, None), (3, 5, None, list(range(97))), (6, 5, None, None))


def distinct_prompts(batch, turns=TURNS, seed=0):
    """One prompt per turn, (B, length) each, the tokens of a row distinct across all of them."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.stack([torch.randperm(97, generator=generator) for _ in range(batch)])
    return tokens[:, :sum(turn[0] for turn in turns)].split([turn[0] for turn in turns], dim=1)


def continue_turns(model, cache, prompts, turns=TURNS):
    """Greedy turns on one cache. Returns the conversation's tokens (B, T) from the cache's
    position on, and the logits generate picked each token from (B, n, V) with their positions."""
    recorded = []
    sample_next = doge.sample_next

    def recording(logits, *rest):
        recorded.append(logits)
        return sample_next(logits, *rest)

    tokens, positions = [], []
    with mock.patch.object(doge, "sample_next", recording):
        for prompt, (_, max_new_tokens, stop_after, eos) in zip(prompts, turns):
            reply = []
            for token in model.generate_stream(prompt.to(cache.layers[0].k.device),
                                               max_new_tokens, temperature=0, eos_token_id=eos,
                                               cache=cache):
                reply.append(token)
                if len(reply) == stop_after:
                    break  # the caller stops iterating
            last_prompt_position = cache.length - len(reply) - 1  # the cache holds both now
            positions += range(last_prompt_position, last_prompt_position + len(reply))
            tokens += [prompt.to(token.device), *reply]
    return torch.cat(tokens, dim=1), torch.stack(recorded, dim=1), positions


@pytest.mark.parametrize("overrides", [dict(), dict(qk_norm=False, dt_per_query_head=True),
                                       dict(is_moe=True, num_experts=16, num_experts_per_tok=4)])
def test_turns_on_one_cache_compute_one_forward_pass(overrides):
    """Four turns at batch 2 (33 tokens, past the window of 8), ended by max_new_tokens, by the
    caller, by eos: at every generated position the logits of one forward pass."""
    model = tie_free_model(**overrides)
    cache = model.new_cache(batch_size=2)
    tokens, logits, positions = continue_turns(model, cache, distinct_prompts(2))
    assert tokens.shape == (2, 33) and cache.length == 33 and len(positions) == 15
    with torch.no_grad():
        assert_close_to_scale(logits, model(tokens)[0][:, positions])


def test_a_cache_refuses_a_batch_it_does_not_hold():
    model = random_model()
    with pytest.raises(ValueError, match=r"continue the cache's 2 sequences"):
        model.generate(torch.tensor([[1, 2]]), 3, cache=model.new_cache(batch_size=2))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3, cache=model.new_cache())


def test_saved_state_continues_as_if_never_stopped(tmp_path):
    """Two turns, save, load; the last two turns from the loaded state and from the original
    cache: the same tokens from the same logits. The file stops growing once the window is full."""
    model = tie_free_model()
    prompts = distinct_prompts(2)
    cache = model.new_cache(batch_size=2)
    continue_turns(model, cache, prompts[:2], TURNS[:2])
    cache.save(tmp_path / "state.pt")
    loaded = model.load_cache(tmp_path / "state.pt")
    assert loaded.length == cache.length == 18
    expected = continue_turns(model, cache, prompts[2:], TURNS[2:])
    resumed = continue_turns(model, loaded, prompts[2:], TURNS[2:])
    assert torch.equal(resumed[0], expected[0]) and torch.equal(resumed[1], expected[1])
    loaded.save(tmp_path / "later.pt")  # 33 tokens, 8 kept per layer as at 18
    assert (tmp_path / "later.pt").stat().st_size == (tmp_path / "state.pt").stat().st_size
    assert sorted(path.name for path in tmp_path.iterdir()) == ["later.pt", "state.pt"]


def test_a_state_of_another_shape_is_refused_in_one_line(tmp_path):
    random_model().new_cache().save(tmp_path / "state.pt")
    wider = random_model(keep_window_size=16)
    with pytest.raises(ValueError, match=r"^\S*state.pt was made by a model of another shape: "
                                         r"keep_window_size 8 there, 16 here$"):
        wider.load_cache(tmp_path / "state.pt")
    (tmp_path / "text.pt").write_text("not a state")
    with pytest.raises(ValueError, match=r"text.pt: not a Doge cache state \(.*\)$"):
        wider.load_cache(tmp_path / "text.pt")


# --- the loss


@pytest.mark.parametrize("chunk_elements", [2 ** 23, 97 * 7])
def test_chunked_loss_matches_plain_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(doge, "LOSS_CHUNK_ELEMENTS", chunk_elements)  # one chunk, or many
    model = random_model().train()
    plain = random_model().train()
    idx = torch.randint(0, 97, (2, 20))
    targets = torch.randint(0, 97, (2, 20))
    targets[0, :4] = -1
    logits, loss = model(idx, targets)
    loss.backward()
    expected = F.cross_entropy(plain(idx)[0].flatten(0, 1), targets.flatten(), ignore_index=-1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, plain(idx)[0].detach())
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        assert_close_to_scale(a.grad, b.grad)
    assert model(idx, targets, keep_logits=False)[0] is None
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets)[1], expected)


# --- mixture of experts


def test_upcycled_moe_computes_the_dense_function():
    dense = random_model()
    moe = doge.upcycle_to_moe(dense, num_experts=16, num_experts_per_tok=4)
    assert moe.config.is_moe and moe.layers[0].mlp.down_embed.weight.shape == (16, 32)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert_close_to_scale(moe(idx)[0], dense(idx)[0])
        moe.layers[0].mlp.up_embed.weight.normal_()  # the experts do matter once trained
        assert (moe(idx)[0] - dense(idx)[0]).abs().max() > 1e-3


def test_moe_rows_are_independent():
    model = random_model(is_moe=True, num_experts=16, num_experts_per_tok=4)
    idx = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        assert_close_to_scale(model(idx)[0][1:2], model(idx[1:2])[0])


def test_product_key_routing_picks_the_best_pairs():
    model = random_model(is_moe=True, num_experts=16, num_experts_per_tok=3)
    moe = model.layers[0].mlp
    x = torch.randn(5, 32)
    scores = moe.router_gate(x).view(5, 2, 4)
    all_pairs = (scores[:, 0, :, None] + scores[:, 1, None, :]).flatten(1)  # every expert
    expected = all_pairs.topk(3).indices.sort().values
    chosen = []
    moe.down_embed.register_forward_hook(lambda m, i, o: chosen.append(i[0]))
    moe(x.view(5, 1, 32))
    assert torch.equal(chosen[0].sort().values, expected)


# --- generation


def test_greedy_equals_top_k_1_and_tiny_top_p():
    model = random_model()
    prompt = torch.randint(0, 97, (2, 4))
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 12, top_p=1e-6), greedy)


def test_sampling_is_reproducible_under_a_seed():
    model = random_model()
    prompt = torch.randint(0, 97, (1, 4))
    torch.manual_seed(7)
    first = model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    assert torch.equal(model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9), first)


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    # penalised: 2.0 / 2 = 1.0 and -2.0 * 2 = -4.0, so token 2 (1.5) wins
    assert doge.sample_next(logits, seen, 0, None, None, 2.0).tolist() == [2]
    assert doge.sample_next(logits, seen, 0, None, None, 1.0).tolist() == [0]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = torch.cat([doge.sample_next(logits, None, 1.0, None, 0.7, 1.0) for _ in range(300)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_finished_rows_pad_with_eos_and_generation_stops():
    model = random_model()
    prompt = torch.randint(0, 97, (2, 4))
    greedy = model.generate(prompt, 10, temperature=0)
    eos = greedy[0, 6].item()  # row 0 emits this token at its third step
    out = model.generate(prompt, 10, temperature=0, eos_token_id=[eos, 1000])
    first_eos = (out[0, 4:] == eos).nonzero()[0].item()
    assert (out[0, 4 + first_eos:] == eos).all()
    if not (out[1, 4:] == eos).any():  # row 1 keeps going until max_new_tokens
        assert out.shape[1] == 14 and torch.equal(out[1], greedy[1])
    single = model.generate(prompt[:1], 10, temperature=0, eos_token_id=eos)
    assert single.shape[1] == 4 + first_eos + 1  # alone, it stops at eos


def test_stream_yields_the_same_tokens_as_generate():
    model = random_model()
    prompt = torch.randint(0, 97, (1, 4))
    streamed = list(model.generate_stream(prompt, 9, temperature=0))
    assert len(streamed) == 9 and all(t.shape == (1, 1) for t in streamed)
    assert torch.equal(torch.cat([prompt, *streamed], 1), model.generate(prompt, 9, temperature=0))


def test_bfloat16_weights_generate():
    model = random_model().to(torch.bfloat16)
    out = model.generate(torch.randint(0, 97, (1, 4)), 20, temperature=0)
    assert out.shape == (1, 24) and out.dtype == torch.long
    with torch.no_grad():
        logits = model(out)[0]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_from_pretrained_reads_train_checkpoints(tmp_path):
    import dataclasses
    model = random_model()
    for step in (100, 200):
        torch.save({"model": model.state_dict(), "step": step,
                    "model_config": dataclasses.asdict(model.config)},
                   tmp_path / f"ckpt_{step:06d}.pt")
        with torch.no_grad():
            model.layers[0].input_residual.add_(1.0)  # the newer checkpoint differs
    newest = doge.Doge.from_pretrained(tmp_path)
    older = doge.Doge.from_pretrained(tmp_path / "ckpt_000100.pt")
    assert torch.equal(newest.layers[0].input_residual, older.layers[0].input_residual + 1)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        doge.Doge.from_pretrained(tmp_path / "other.pt")


@pytest.mark.parametrize("threads", [1, 3])
def test_output_layer_blocks_equal_the_plain_product(threads):
    """decoding_weights splits the output matrix into one column block per thread (3 blocks do
    not divide the 97-token vocabulary: padded); the logits are those of h @ W^T."""
    model = random_model()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, output_blocks = doge.decoding_weights(model)
    finally:
        torch.set_num_threads(previous)
    assert output_blocks.shape == (threads, model.config.hidden_size, -(-97 // threads))
    h = torch.randn(2, model.config.hidden_size)
    assert_close_to_scale(doge.output_logits(h, output_blocks, 97),
                               h @ model.lm_head.weight.t())


@pytest.mark.parametrize("overrides", [dict(attention_bias=True, mlp_bias=True),
                                       dict(is_moe=True, num_experts=16, num_experts_per_tok=4),
                                       dict(qk_norm=False, dt_per_query_head=True)])
def test_fused_decode_step_equals_forward(overrides):
    """generate's one-token step (fused, transposed weights, biases and the dt projection folded
    in) against the plain forward pass, for biases, MoE and the older layout."""
    model = random_model(**overrides)
    idx = torch.randperm(97)[:30].view(2, 15)
    with torch.no_grad():
        full = model(idx)[0]
    assert_close_to_scale(decode_one_by_one(model, idx, 4), full)


def test_rope_matrix_is_apply_rope():
    config = tiny_config()
    cos, sin = doge.rope_cos_sin(config, torch.tensor([5]), 6, torch.float32)
    x = torch.randn(3, config.head_dim)
    torch.testing.assert_close(x @ doge.rope_matrix(cos[0], sin[0]), doge.apply_rope(x, cos, sin))


def test_generated_tokens_can_feed_training():
    """generate runs the model in inference mode; the tokens it returns must still be ordinary
    tensors (an inference tensor cannot be saved for backward, e.g. by the embedding)."""
    model = random_model()
    out = model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert not out.is_inference()
    model.train()
    model(out[:, :-1], out[:, 1:])[1].backward()
    assert model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("overrides", [
    dict(), dict(qk_norm=False, dt_per_query_head=True),
    dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=24)])
def test_a_ragged_cache_decodes_each_row_at_its_own_position(overrides):
    """Sequences of 5, 20 and 40 tokens (the window is 8, dynamic RoPE stretches past 24)
    joined in one ragged cache (serve.py's batch): each step gives every row the logits that
    row gets decoded alone, and (without dynamic RoPE, whose base changes with the length) one
    forward pass over it. Rows regrouped (two of them, in another order) go on, and a row taken
    out with state_dict(row) continues as a cache of its own."""
    model = random_model(**overrides)
    lengths = [5, 20, 40]
    rows = [torch.randperm(97)[:length + 6] for length in lengths]  # distinct tokens
    caches = [model.new_cache() for _ in rows]
    weights = doge.decoding_weights(model)
    with torch.no_grad():
        for row, length, cache in zip(rows, lengths, caches):
            model(row[None, :length], cache=cache)
        joined = doge.join_caches(model, [(cache, 0) for cache in caches])
        order = [0, 1, 2]
        for step in range(6):
            if step == 3:
                order = [2, 0]
                joined = doge.join_caches(model, [(joined, 2), (joined, 0)])
            tokens = torch.stack([rows[i][lengths[i] + step] for i in order])
            logits = doge.decode_step(model, tokens, joined, weights)  # (B, V)
            alone = torch.cat([doge.decode_step(model, tokens[j:j + 1], caches[i], weights)
                               for j, i in enumerate(order)])
            assert_close_to_scale(logits, alone)
            if "rope_scaling" not in overrides:
                assert_close_to_scale(logits, torch.stack([
                    model(rows[i][None, :lengths[i] + step + 1])[0][0, -1] for i in order]))
        assert joined.row_lengths.tolist() == [46, 11] and joined.length == 46
        taken_out = model.load_cache(joined.state_dict(1))  # row 0's 11 tokens
        assert taken_out.length == 11 and taken_out.layers[0].size == 8
        more = torch.randperm(97)[:3].unsqueeze(0)
        assert_close_to_scale(model(more, cache=taken_out)[0], model(more, cache=caches[0])[0])


@pytest.mark.parametrize("prompt_length", [3, 20])
def test_a_cache_grows_its_slots_as_keys_come(monkeypatch, prompt_length):
    """With 2 slots at first (doubled as keys come, up to the window of 8), decoding after a
    prompt fed in one piece gives one forward pass's logits, a ragged cache too, and the buffers
    end at W + 1 slots."""
    monkeypatch.setattr(doge, "FIRST_CACHE_SLOTS", 2)
    model = random_model()
    idx = torch.stack([torch.randperm(97)[:40] for _ in range(2)])
    with torch.no_grad():
        full = model(idx)[0]
    assert_close_to_scale(decode_one_by_one(model, idx, prompt_length), full)
    cache = model.new_cache()
    assert cache.layers[0].k.shape[1] == 3
    with torch.no_grad():
        model(idx[:1, :prompt_length], cache=cache)
    assert cache.layers[0].k.shape[1] == min(8, max(prompt_length, 4)) + 1
    test_a_ragged_cache_decodes_each_row_at_its_own_position({})


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
              "grad": torch.enable_grad}


@pytest.mark.parametrize("order", list(itertools.permutations(GRAD_MODES)), ids="-".join)
def test_a_cache_works_in_every_grad_mode_whichever_grew_it(monkeypatch, order):
    """Three rounds of one conversation, each in its own grad mode, in every order: generate
    continues the cache (it decodes in inference mode), the forward pass feeds more tokens with
    it, and the state goes through join_caches, state_dict(row) and load_cache into a new cache,
    which the next round writes. The cache starts with 2 slots and grows as keys come (the
    window is 16). Every logit is one forward pass's over the whole conversation; what the cache
    holds and hands out is never an inference tensor and never part of a graph."""
    monkeypatch.setattr(doge, "FIRST_CACHE_SLOTS", 2)
    model = tie_free_model(keep_window_size=16)
    fresh = iter(torch.randperm(97).tolist())  # the tokens fed, distinct
    conversation, picked_from, fed_logits, positions = [], [], [], []
    sample_next = doge.sample_next
    monkeypatch.setattr(doge, "sample_next", lambda logits, *rest: picked_from.append(logits) or
                        sample_next(logits, *rest))
    for mode in order:
        with GRAD_MODES[mode]():
            if not conversation:
                cache = model.new_cache()
            prompt = [next(fresh) for _ in range(2)]
            reply = [t.item() for t in model.generate_stream(torch.tensor([prompt]), 3,
                                                             temperature=0, cache=cache)]
            positions += range(len(conversation) + 1, len(conversation) + 4)
            conversation += prompt + reply
            fed = [next(fresh) for _ in range(3)]
            fed_logits.append(model(torch.tensor([fed]), cache=cache)[0][0].detach())
            positions += range(len(conversation), len(conversation) + 3)
            conversation += fed
            state = doge.join_caches(model, [(cache, 0)]).state_dict(0)
            assert not state["keys"].is_inference()
            cache = model.load_cache(state)
            assert cache.length == len(conversation)
            assert cache.layers[0].k.shape[1] - 1 == min(16, len(conversation))
            buffers = [t for layer in cache.layers for t in (layer.k, layer.values_t, layer.dt)]
            assert not any(t.is_inference() or t.requires_grad for t in buffers)
    with torch.no_grad():
        full = model(torch.tensor([conversation]))[0][0]
    found = torch.cat([torch.cat([*picked_from[3 * i:3 * i + 3], fed_logits[i]])
                       for i in range(3)])  # (18, V), in the conversation's order
    assert_close_to_scale(found, full[positions])

"""Parity with transformers' DogeForCausalLM (ties pinned, see oracle.py) on tiny random models."""

import inspect
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import doge
from oracle import assert_close_to_scale, naive_forward, randomize, reference_class, tiny_config
from test_model import continue_turns, distinct_prompts, tie_free_model

transformers = pytest.importorskip("transformers")


def pair(tmp_path, model=None, **overrides):
    """Our model (every parameter random unless given), and the reference loaded from what we
    saved."""
    if model is None:
        torch.manual_seed(0)
        model = randomize(doge.Doge(tiny_config(**overrides))).eval()
    model.save_pretrained(tmp_path)
    reference = reference_class().from_pretrained(tmp_path, attn_implementation="eager").eval()
    return model, reference


def shifted(idx):
    """Our targets for the reference's labels=idx: the next token, -1 past the end."""
    return torch.cat((idx[:, 1:], torch.full_like(idx[:, :1], -1)), dim=1)


CASES = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "untied": dict(tie_word_embeddings=False),
    "dynamic_rope": dict(max_position_embeddings=16),  # 40 tokens stretch the RoPE base
    "no_rope_scaling": dict(rope_scaling=None, rope_theta=500.0),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(tmp_path, case):
    model, reference = pair(tmp_path, **CASES[case])
    torch.manual_seed(1)
    # within keep_window_size (8), then past it; in this order because some transformers
    # releases (5.0) keep a dynamic RoPE base grown by a longer call for later, shorter ones
    for length in (6, 40):
        idx = torch.randint(0, 97, (2, length))
        idx[:, 3:6] = idx[:, 0:3]  # repeated tokens tie in layer 0's dt
        with torch.no_grad():
            ours, _ = model(idx)
            theirs = reference(idx).logits
        assert_close_to_scale(ours, theirs)


def test_old_rope_spelling_is_read(tmp_path):
    model, _ = pair(tmp_path, max_position_embeddings=16)
    config_path = tmp_path / "config.json"
    raw = json.loads(config_path.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope["rope_theta"]
    raw["rope_scaling"] = {"type": "dynamic", "factor": rope["factor"]}
    config_path.write_text(json.dumps(raw))
    reloaded = doge.Doge.from_pretrained(tmp_path)
    assert reloaded.config.rope_scaling["rope_type"] == "dynamic"
    reference = reference_class().from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert_close_to_scale(reloaded(idx)[0], reference(idx).logits)
        torch.testing.assert_close(reloaded(idx)[0], model(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_loss_and_gradients_match_reference(tmp_path, tied):
    model, reference = pair(tmp_path, tie_word_embeddings=tied)
    model.train()
    reference.train()
    idx = torch.randint(0, 97, (2, 30))
    _, ours = model(idx, shifted(idx))
    theirs = reference(idx, labels=idx).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    theirs.backward()
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = reference_params[doge.hf_name(name)].grad
        relative = (param.grad - expected).norm() / expected.norm()
        assert relative < 1e-3, (name, relative.item())


def test_ignored_targets_match_reference_ignore_index(tmp_path):
    model, reference = pair(tmp_path)
    idx = torch.randint(0, 97, (2, 12))
    labels = idx.clone()
    labels[:, :5] = -100  # the reference's ignore index; ours is -1
    targets = shifted(labels).masked_fill(shifted(labels) == -100, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets)[1], reference(idx, labels=labels).loss)


MOE = dict(is_moe=True, num_experts=16, num_experts_per_tok=3, intermediate_size=24)


def moe_pair(tmp_path):
    """As pair, for a CDMoE model; skipped where the reference cannot run one at all."""
    model, reference = pair(tmp_path, **MOE)
    try:
        with torch.no_grad():
            reference(torch.zeros(1, 2, dtype=torch.long))
    except TypeError as e:
        if "tuple" not in str(e):
            raise
        pytest.skip(f"transformers {transformers.__version__}: DogeCDMoE.forward returns "
                    f"(hidden_states, router_logits) and DogeDecoderLayer passes the tuple on, so "
                    f"every MoE forward fails ({e}): a reference defect")
    return model, reference


def reference_cached_logits(reference, idx, ends):
    """The reference fed idx (B, T) in pieces through one cache of its own, a piece ending before
    each index of ends; logits (B, T, V). The cache argument is `cache` in newer transformers,
    `past_key_values` (deprecated there) in older ones."""
    parameters = inspect.signature(reference.forward).parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"
    cache = transformers.DynamicCache(config=reference.config)
    pieces = []
    with torch.no_grad():
        for start, end in zip([0, *ends], [*ends, idx.shape[1]]):
            out = reference(idx[:, start:end], use_cache=True, **{cache_argument: cache})
            pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


def reference_decode_logits(reference, idx):
    """The reference fed one token at a time through its cache: the one mode in which its CDMoE
    routes each token by its own scores (batch 1)."""
    return reference_cached_logits(reference, idx, range(1, idx.shape[1]))


def test_moe_logits_match_reference_token_by_token(tmp_path):
    model, reference = moe_pair(tmp_path)
    idx = torch.randint(0, 97, (2, 20))  # 20 > keep_window_size 8
    with torch.no_grad():
        ours, _ = model(idx)
    for row in range(2):
        expected = reference_decode_logits(reference, idx[row:row + 1])
        assert_close_to_scale(ours[row:row + 1], expected)


def test_moe_is_causal_unlike_reference_full_forward(tmp_path):
    model, reference = moe_pair(tmp_path)
    idx = torch.randint(0, 97, (1, 16))
    edited = idx.clone()
    edited[0, 12] = (idx[0, 12] + 1) % 97
    with torch.no_grad():
        # (not bit-exact: the edit reorders the candidate keys, and so the float sums)
        assert_close_to_scale(model(idx)[0][:, :12], model(edited)[0][:, :12])
        # the reference's router mixes tokens: an earlier position sees the edit (the defect)
        changed = reference(idx).logits[:, :12] - reference(edited).logits[:, :12]
    assert changed.abs().max() > 1e-4


def test_moe_aux_loss_matches_reference_formula(tmp_path):
    from transformers.models.doge.modeling_doge import load_balancing_loss_func
    if "scatter(" not in inspect.getsource(load_balancing_loss_func):
        pytest.skip(f"transformers {transformers.__version__}: load_balancing_loss_func averages "
                    f"the routing softmax by candidate position, not by expert id (a reference "
                    f"defect, fixed in later releases by scattering it to the experts' ids)")
    model, _ = pair(tmp_path, **MOE)
    model.train()
    scores = []
    hooks = [layer.mlp.router_gate.register_forward_hook(lambda m, i, out: scores.append(out))
             for layer in model.layers]
    idx = torch.randint(0, 97, (2, 10))
    targets = shifted(idx)
    _, loss = model(idx, targets)
    for hook in hooks:
        hook.remove()
    model.eval()
    _, lm_loss = model(idx, targets)
    # the reference's formula fed with each token's own (sx, sy): (2, N, K) per layer
    per_layer = tuple(s.view(-1, 2, 4).transpose(0, 1) for s in scores)
    aux = load_balancing_loss_func(per_layer, 16, 4, 3)
    torch.testing.assert_close(loss, lm_loss + model.config.router_aux_loss_coef * aux)


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_generate_matches_reference(tmp_path, moe):
    model, reference = moe_pair(tmp_path) if moe else pair(tmp_path)
    prompt = torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        theirs = reference.generate(prompt, max_new_tokens=30, do_sample=False)
    ours = model.generate(prompt, max_new_tokens=30, temperature=0,
                          eos_token_id=model.config.eos_token_id)
    assert ours.tolist() == theirs.tolist()  # 35 tokens pass keep_window_size 8


def test_turns_past_dynamic_rope_match_the_reference_with_its_cache_carried(tmp_path):
    """Past max_position_embeddings (16) dynamic RoPE rotates each key by the base of the length
    at which it was fed, so a cache depends on how the tokens came. transformers' cache does the
    same: fed the same turns (each prompt in one piece, then the replies token by token), its
    logits are ours at every generated position (33 tokens at batch 2, window 8)."""
    model, reference = pair(tmp_path, tie_free_model(max_position_embeddings=16,
                                                     rope_scaling={"rope_type": "dynamic",
                                                                   "factor": 4.0}))
    tokens, logits, positions = continue_turns(model, model.new_cache(2), distinct_prompts(2))
    replies = {position + 1 for position in positions}  # each reply token is a piece
    prompts = {position + 1 for position in replies if position + 1 < tokens.shape[1]}
    expected = reference_cached_logits(reference, tokens, sorted(replies | prompts))
    assert_close_to_scale(logits, expected[:, positions])


def test_round_trip_through_transformers_is_exact(tmp_path):
    model, reference = pair(tmp_path / "ours", tie_word_embeddings=False)
    reference.save_pretrained(tmp_path / "theirs")
    reloaded = doge.Doge.from_pretrained(tmp_path / "theirs")
    assert reloaded.config.tie_word_embeddings is False
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    ours_again = doge.Doge.from_pretrained(tmp_path / "ours")
    for (name, a), (_, b) in zip(model.state_dict().items(), ours_again.state_dict().items()):
        assert torch.equal(a, b), name


def test_older_layout_matches_hand_written_oracle_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = randomize(doge.Doge(tiny_config(qk_norm=False, dt_per_query_head=True)))
    assert model.layers[0].self_attn.A.shape == (4,)  # one bias per query head
    assert model.layers[0].self_attn.dt_proj.weight.shape == (4, 16)
    idx = torch.randint(0, 97, (2, 40))
    idx[:, 10:20] = idx[:, 0:10]
    with torch.no_grad():
        assert_close_to_scale(model(idx)[0], naive_forward(model, idx))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert not any("q_norm" in name for name in weights)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("qk_norm", "dt_per_query_head"):  # detection must come from the weights alone
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    reloaded = doge.Doge.from_pretrained(tmp_path)
    assert not reloaded.config.qk_norm and reloaded.config.dt_per_query_head
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_missing_or_misshaped_tensor_is_named(tmp_path):
    model, _ = pair(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.dt_proj.weight"
    save_file({k: v for k, v in weights.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"missing tensor {name}"):
        doge.Doge.from_pretrained(tmp_path)
    weights[name] = torch.zeros(3, 16)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 16\)"):
        doge.Doge.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        doge.Doge.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        doge.Doge.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory$"):
        doge.Doge.from_pretrained(tmp_path / "nowhere")


def test_pytorch_model_bin_loads(tmp_path):
    model, _ = pair(tmp_path)
    torch.save({doge.hf_name(name): tensor for name, tensor in model.state_dict().items()
                if name != "lm_head.weight"}, tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    reloaded = doge.Doge.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx)[0], model(idx)[0], atol=0, rtol=0)

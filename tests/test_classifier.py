"""DogeForSequenceClassification: parity with transformers' class of that name (ties pinned, see
oracle.py), its labels and losses, and loading from causal LM checkpoints."""

import inspect
import json
import types

import pytest
import torch

import doge
from helpers import one_thread  # noqa: F401  (a fixture: tiny models run on one thread)
from oracle import assert_close_to_scale, naive_forward, randomize, reference_class, tiny_config

transformers = pytest.importorskip("transformers")

PAD = 0


def reference_classifier(directory):
    reference_class()  # installs the tie rule in DogeAttention, which both classes use
    from transformers.models.doge import modeling_doge
    return modeling_doge.DogeForSequenceClassification.from_pretrained(
        directory, attn_implementation="eager").eval()


def classifier_pair(tmp_path, num_labels=3, **overrides):
    """Our classifier with every parameter random, and the reference loaded from what we saved."""
    torch.manual_seed(0)
    model = randomize(doge.DogeForSequenceClassification(
        tiny_config(pad_token_id=PAD, **overrides), num_labels)).eval()
    model.save_pretrained(tmp_path)
    return model, reference_classifier(tmp_path)


def padded_batch():
    """Four rows of distinct tokens (none the pad id): right-padded, left-padded, both, and none;
    all but the third pooled past keep_window_size 8. Returns the batch and each row's last real
    position. Repeated pads tie in dt, and an exact tie is not bit-stable (docs/differences.md, the tie rule
    across paths), so a row
    holds several left pads only where its pooled token sees at most 8 keys."""
    idx = (torch.randperm(96)[:4 * 20] + 1).view(4, 20)
    idx[0, 15:] = PAD
    idx[1, :1] = PAD
    idx[2, :3], idx[2, 7:] = PAD, PAD
    return idx, torch.tensor([14, 19, 6, 19])


CASES = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference_with_left_and_right_padding(tmp_path, case):
    model, reference = classifier_pair(tmp_path, **CASES[case])
    idx, _ = padded_batch()
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = reference(idx).logits  # no attention mask: the pads are tokens, as in ours
    assert ours.shape == (4, 3)
    assert_close_to_scale(ours, theirs, tol=1e-4)


def test_older_layout_matches_hand_written_oracle_and_round_trips(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(pad_token_id=PAD, qk_norm=False, dt_per_query_head=True)
    model = randomize(doge.DogeForSequenceClassification(config, num_labels=3)).eval()
    idx, last = padded_batch()
    body = model.model  # the naive oracle scores every position with "lm_head": here the score
    scored = naive_forward(types.SimpleNamespace(**dict(body.named_children()), config=config,
                                                 lm_head=model.score), idx)  # (B, T, 3)
    with torch.no_grad():
        ours, _ = model(idx)
        assert_close_to_scale(ours, scored[torch.arange(4), last], tol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = doge.DogeForSequenceClassification.from_pretrained(tmp_path)
    assert not reloaded.config.qk_norm and reloaded.config.dt_per_query_head
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx)[0], ours, atol=0, rtol=0)


def reference_decode_hidden(reference, row):
    """The reference's body fed one token at a time through its cache (batch 1: the one mode in
    which its CDMoE routes each token by its own scores); the last token's hidden state."""
    body = reference.model
    parameters = inspect.signature(body.forward).parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"
    cache = transformers.DynamicCache(config=reference.config)
    with torch.no_grad():
        for t in range(row.shape[1]):
            out = body(row[:, t:t + 1], use_cache=True, **{cache_argument: cache})
    return out.last_hidden_state[:, -1]


def test_moe_logits_match_reference_token_by_token(tmp_path):
    model, reference = classifier_pair(tmp_path, is_moe=True, num_experts=16,
                                       num_experts_per_tok=3, intermediate_size=24)
    idx, last = padded_batch()
    try:
        expected = torch.cat([reference.score(reference_decode_hidden(reference, idx[r:r + 1, :p + 1]))
                              for r, p in enumerate(last.tolist())])
    except TypeError as e:
        if "tuple" not in str(e):
            raise
        pytest.skip(f"transformers {transformers.__version__}: every CDMoE forward fails ({e}), "
                    f"a reference defect")
    with torch.no_grad():
        assert_close_to_scale(model(idx)[0], expected, tol=1e-4)


PROBLEMS = {  # num_labels, labels, the problem_type written to config.json
    "regression": (1, torch.tensor([0.5, -1.0, 2.0, 0.0]), None),
    "single_label": (3, torch.tensor([2, 0, 1, 2]), None),
    "multi_label": (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]), None),
    "regression_of_three": (3, torch.tensor([[0.5, 1, -2]] * 4), "regression"),
}


@pytest.mark.parametrize("problem", PROBLEMS)
def test_loss_matches_reference_for_each_problem_type(tmp_path, problem):
    num_labels, labels, problem_type = PROBLEMS[problem]
    model, reference = classifier_pair(tmp_path, num_labels=num_labels)
    model.problem_type = reference.config.problem_type = problem_type
    idx, _ = padded_batch()
    with torch.no_grad():
        ours = model(idx, labels)[1]
        theirs = reference(idx, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


def test_transformers_checkpoint_loads_with_its_labels(tmp_path):
    model, reference = classifier_pair(tmp_path / "ours", num_labels=3)
    reference.config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    reference.config.label2id = {name: i for i, name in reference.config.id2label.items()}
    reference.config.problem_type = "multi_label_classification"
    reference.save_pretrained(tmp_path / "theirs")
    reloaded = doge.DogeForSequenceClassification.from_pretrained(tmp_path / "theirs")
    assert reloaded.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert reloaded.problem_type == "multi_label_classification"
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    reloaded.save_pretrained(tmp_path / "again")
    raw = json.loads((tmp_path / "again" / "config.json").read_text())
    assert raw["architectures"] == ["DogeForSequenceClassification"] and raw["num_labels"] == 3
    assert raw["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert not (tmp_path / "again" / "generation_config.json").exists()


def test_causal_lm_checkpoint_gives_a_fresh_score_head(tmp_path, capsys):
    torch.manual_seed(0)
    causal_lm = randomize(doge.Doge(tiny_config(pad_token_id=PAD)))
    causal_lm.save_pretrained(tmp_path)
    model = doge.DogeForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "score head (5 labels) starts fresh" in message
    assert model.score.weight.shape == (5, 32)
    idx, last = padded_batch()
    with torch.no_grad():  # the body is the causal LM's: its hidden states, scored
        hidden = causal_lm.hidden_states(idx)[torch.arange(4), last]
        torch.testing.assert_close(model(idx)[0], model.score(hidden), atol=0, rtol=0)
    model.save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="load it with DogeForSequenceClassification"):
        doge.Doge.from_pretrained(tmp_path / "classifier")


def test_padding_needs_a_pad_token_and_labels_must_fit():
    model = doge.DogeForSequenceClassification(tiny_config(pad_token_id=None))
    with pytest.raises(ValueError, match="pad_token_id is None"):
        model(torch.arange(1, 9).view(2, 4))
    assert model(torch.arange(1, 5).view(1, 4))[0].shape == (1, 2)
    with pytest.raises(ValueError, match="id2label must name the labels 0..2"):
        doge.DogeForSequenceClassification(tiny_config(), 3, {0: "a", 1: "b"})
    with pytest.raises(ValueError, match="single-label needs 2 or more"):
        doge.DogeForSequenceClassification(tiny_config(), 1, problem_type="single_label_classification")

"""The recall lab (recall.py): the MQAR generator's sequences and meta.json, train.py on them
(val_acc, the sliding window of dynamic_mask=False), the recall scores and the mask's picture and
statistics."""

import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import doge
import engine
import prepare_data
import recall
import train
from helpers import one_thread  # noqa: F401 (one_thread: a fixture)

SMALL = dict(num_kv_pairs=3, seq_len=16, vocab_size=32, train_examples=600, val_examples=64)


def prepare(directory, **settings):
    return recall.prepare_mqar(str(directory), **{**SMALL, **settings})


@pytest.fixture(scope="module")
def mqar_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mqar")
    prepare(directory)
    return directory


def all_sequences(directory, split):
    meta, tokens, supervised = recall.read_mqar(str(directory), split)
    return meta, tokens, supervised


def test_every_sequence_is_pairs_then_each_key_once_as_a_query_followed_by_its_value(mqar_dir):
    meta, tokens, supervised = all_sequences(mqar_dir, "train")
    pairs, layout = SMALL["num_kv_pairs"], meta["layout"]
    assert tokens.shape == (SMALL["train_examples"], SMALL["seq_len"])
    for row, marks in zip(tokens, supervised):
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs  # distinct within a sequence
        assert all(layout["keys"][0] <= k < layout["keys"][1] for k in keys)
        assert all(layout["values"][0] <= v < layout["values"][1] for v in values)
        value_of = dict(zip(keys.tolist(), values.tolist()))
        answers = np.flatnonzero(marks)
        assert len(answers) == pairs and answers.min() > 2 * pairs  # only answers are trained
        queries = row[answers - 1]
        assert sorted(queries.tolist()) == sorted(keys.tolist())  # every key asked once
        assert [value_of[q] for q in queries.tolist()] == row[answers].tolist()
        rest = np.ones(len(row), dtype=bool)
        rest[:2 * pairs], rest[answers], rest[answers - 1] = False, False, False
        assert all(layout["filler"][0] <= t < layout["filler"][1] for t in row[rest])
    # the pairing is drawn afresh: the same key takes many values across sequences
    first_key_values = {}
    for row in tokens:
        first_key_values.setdefault(int(row[0]), set()).add(int(row[1]))
    assert max(len(values) for values in first_key_values.values()) > 3


def test_meta_json_records_the_settings_and_the_layout(mqar_dir):
    meta = prepare_data.read_meta(str(mqar_dir))
    assert meta["kind"] == "conversations" and meta["task"] == "mqar" and meta["complete"]
    assert {k: meta["settings"][k] for k in SMALL} == SMALL
    layout = meta["layout"]
    ranges = [layout[kind] for kind in ("keys", "values", "filler")]
    assert ranges[0][0] == 0 and ranges[-1][1] == SMALL["vocab_size"]  # the vocabulary, whole
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))  # in order
    assert meta["supervised"] == {"val": 64 * 3, "train": 600 * 3}
    assert meta["tokenizer"] is None


def test_train_and_val_are_disjoint_and_drawn_from_separate_seeds(mqar_dir, tmp_path):
    _, train_tokens, _ = all_sequences(mqar_dir, "train")
    _, val_tokens, _ = all_sequences(mqar_dir, "val")
    assert not {r.tobytes() for r in val_tokens} & {r.tobytes() for r in train_tokens}
    # settings with only 9 distinct sequences (1 pair, no filler): a clash is drawn again
    prepare(tmp_path / "few", num_kv_pairs=1, seq_len=4, vocab_size=8, train_examples=50,
            val_examples=3)
    _, few_train, _ = all_sequences(tmp_path / "few", "train")
    _, few_val, _ = all_sequences(tmp_path / "few", "val")
    assert not {r.tobytes() for r in few_val} & {r.tobytes() for r in few_train}
    assert len(few_train) == 50
    with pytest.raises(ValueError, match="too few distinct sequences"):
        prepare(tmp_path / "none", num_kv_pairs=1, seq_len=4, vocab_size=8, train_examples=50,
                val_examples=400)
    # the same seed gives the same data; another seed other data
    prepare(tmp_path / "again")
    assert np.array_equal(all_sequences(tmp_path / "again", "train")[1], train_tokens)
    prepare(tmp_path / "other", seed=7)
    assert not np.array_equal(all_sequences(tmp_path / "other", "train")[1], train_tokens)


@pytest.mark.parametrize("args, message", [
    (["--num_kv_pairs=8", "--seq_len=30"], "cannot hold --num_kv_pairs 8"),
    (["--num_kv_pairs=20", "--seq_len=100", "--vocab_size=40"], "give --vocab_size >= 53"),
    (["--num_kv_pairs=0"], "--num_kv_pairs must be a positive integer"),
    (["--val_examples=-1"], "--val_examples must be a positive integer"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit) as excinfo:
        recall.main(["--task=data", f"--out_dir={tmp_path / 'm'}", *args])
    text = str(excinfo.value.code)
    assert message in text and "\n" not in text
    assert not (tmp_path / "m" / "meta.json").exists()


def test_the_smallest_vocabulary_named_in_the_error_is_enough(tmp_path):
    prepare(tmp_path / "m", num_kv_pairs=20, seq_len=100, vocab_size=53)  # the message's figure
    with pytest.raises(ValueError, match=">= 53"):
        prepare(tmp_path / "n", num_kv_pairs=20, seq_len=100, vocab_size=52)


# ----------------------------------------------------------------------------------------------
# recall.py on models whose answers are known


class Recaller(torch.nn.Module):
    """A model that answers each query with the value its key had, except where the pair lies more
    than `reach` positions back: then it answers the first value id (wrong, as values are distinct
    ... unless that is the right one)."""

    def __init__(self, meta, reach):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, 1)
        self.pairs, self.vocab, self.reach = (meta["settings"]["num_kv_pairs"],
                                              meta["vocab_size"], reach)
        self.wrong = meta["layout"]["values"][0]
        self.config, self.layers = SimpleNamespace(keep_window_size=reach), []  # what scoring reads

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            value_at = {row[2 * i]: (2 * i, row[2 * i + 1]) for i in range(self.pairs)}
            for t, token in enumerate(row):
                if t >= 2 * self.pairs and token in value_at:
                    key_at, value = value_at[token]
                    logits[b, t, value if t - key_at <= self.reach else self.wrong] = 1.0
        return logits, None


def test_recall_accuracy_and_distances_match_a_hand_count(mqar_dir):
    meta, tokens, supervised = all_sequences(mqar_dir, "val")
    reach = 8
    right, distance = recall.mqar_recall(Recaller(meta, reach), tokens, supervised,
                                               meta["settings"]["num_kv_pairs"], 16,
                                               torch.autocast("cpu", enabled=False))
    expected, distances = [], []
    for row, marks in zip(tokens, supervised):
        for answer in np.flatnonzero(marks):
            key_at = 2 * row[0:6:2].tolist().index(row[answer - 1])
            distances.append(answer - 1 - key_at)
            expected.append(distances[-1] <= reach or row[answer] == meta["layout"]["values"][0])
    assert distance.tolist() == distances
    assert right.tolist() == expected
    assert 0 < right.mean() < 1  # the hand-made model is right near and wrong far


def test_the_in_window_ceiling_and_accuracy_match_a_hand_count(mqar_dir):
    """The ceiling is the share of queries whose pair lies at most W tokens back; a model that
    recalls exactly those pairs scores 1 within the window."""
    meta, tokens, supervised = all_sequences(mqar_dir, "val")
    window = 5
    result = recall.score_mqar(Recaller(meta, reach=window), "hand", tokens, supervised, meta,
                               recall.RecallConfig(batch_size=16),
                               torch.autocast("cpu", enabled=False),
                               {"seq_len": 16, "keep_window_size": window})
    within = queries = 0
    for row, marks in zip(tokens.tolist(), supervised):
        for answer in np.flatnonzero(marks):
            key_at = row.index(row[answer - 1])  # the key's first place: its pair
            within += answer - 1 - key_at <= window
            queries += 1
    assert result["n"] == queries and result["in_window"] == within / queries
    assert 0 < result["in_window"] < 1
    assert result["acc_in_window"] == 1.0 and result["acc"] < 1.0
    assert (result["seq_len"], result["keep_window_size"], result["mask"]) == (16, 5, "sliding")


def tiny_model(meta, keep_window_size, seed=0):
    torch.manual_seed(seed)
    config = doge.DogeConfig(vocab_size=meta["vocab_size"], hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             keep_window_size=keep_window_size, max_position_embeddings=64)
    return doge.Doge(config).eval()


def test_kept_keys_at_a_held_a_is_the_sliding_window(mqar_dir):
    meta, tokens, _ = all_sequences(mqar_dir, "val")
    model = tiny_model(meta, keep_window_size=5)  # A = 0 at initialisation: every key ties
    kept = recall.kept_keys(model, torch.from_numpy(tokens[:4]))
    q, kv = np.indices((16, 16))
    window = (kv <= q) & (kv > q - 5)
    assert len(kept) == 2 and kept[0].shape == (4, 2, 16, 16)
    assert all((layer == window).all() for layer in kept)
    assert recall.mask_kind(model, 16) == "sliding"
    with torch.no_grad():
        model.layers[1].self_attn.A.fill_(-1.0)
    assert recall.mask_kind(model, 16) == "dynamic"
    assert recall.mask_kind(tiny_model(meta, keep_window_size=16), 16) == "full"


def model_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens))[0]


def test_a_window_set_at_load_time_scores_as_a_checkpoint_saved_with_it(mqar_dir, tmp_path,
                                                                          capsys):
    meta, tokens, _ = all_sequences(mqar_dir, "val")
    model = tiny_model(meta, keep_window_size=8)
    with torch.no_grad():  # a mask of its own: A and dt_proj away from their initialisation
        for layer in model.layers:
            layer.self_attn.A.normal_(0, 2)
            layer.self_attn.dt_proj.weight.normal_(0, 1)
    model.save_pretrained(str(tmp_path / "w8"))
    resaved = doge.Doge(dataclasses.replace(model.config, keep_window_size=5))
    resaved.load_state_dict(model.state_dict())
    resaved.save_pretrained(str(tmp_path / "w5"))
    with torch.no_grad():
        for layer in resaved.layers:
            layer.self_attn.A.zero_()
    resaved.save_pretrained(str(tmp_path / "w5-sliding"))
    for dynamic, saved in ((True, "w5"), (False, "w5-sliding")):
        cfg = recall.RecallConfig(keep_window_size=5, dynamic_mask=dynamic)
        overridden, _, trained = recall.load_masked(str(tmp_path / "w8"), cfg, "cpu")
        reference, _ = engine.load_model(str(tmp_path / saved))
        assert trained["keep_window_size"] == 8
        assert torch.equal(model_logits(overridden, tokens), model_logits(reference, tokens))
    assert not torch.allclose(model_logits(model, tokens), model_logits(overridden, tokens))
    results = []
    for run, args in (("w8", ["--keep_window_size=5", "--dynamic_mask=False"]),
                      ("w5-sliding", [])):
        capsys.readouterr()
        recall.main(["--task=score", f"--init_from={tmp_path / run}", f"--data_dir={mqar_dir}",
                     *args])
        results.append(json.loads(capsys.readouterr().out.splitlines()[0]))
    for result in results:
        assert (result["keep_window_size"], result["mask"], result["seq_len"]) == (5, "sliding", 16)
        del result["init_from"], result["trained_keep_window_size"]
    assert results[0] == results[1]


def test_a_length_past_max_position_embeddings_scores(tmp_path, capsys):
    """Positions past max_position_embeddings (64) take dynamic RoPE, as the model defines them."""
    prepare(tmp_path / "long", seq_len=80, train_examples=4, val_examples=8)
    meta = prepare_data.read_meta(str(tmp_path / "long"))
    tiny_model(meta, keep_window_size=6).save_pretrained(str(tmp_path / "model"))
    recall.main(["--task=score", f"--init_from={tmp_path / 'model'}",
                 f"--data_dir={tmp_path / 'long'}", "--keep_window_size=12"])
    out, err = capsys.readouterr()
    result = json.loads(out.splitlines()[0])
    assert (result["seq_len"], result["keep_window_size"], result["n"]) == (80, 12, 8 * 3)
    assert result["trained_seq_len"] is None and result["trained_keep_window_size"] == 6
    assert list(result["acc_by_distance"])[-1] == "73-80"
    assert "/6" in err  # the table names the window trained at


def test_mask_shares_on_a_hand_made_dt():
    # 8 positions: key value key value | query answer filler filler; W = 3 keeps the values
    kinds = np.array([[0, 1, 0, 1, 2, 3, 4, 4]])
    dt = torch.tensor([[[0.1, 5.0, 0.2, 6.0, 0.3, 0.4, 0.05, 0.06]]])  # (B=1, Hb=1, T=8)
    death = doge.key_deaths_by_definition(dt, 3)[0, 0]
    position = torch.arange(8)
    kept = ((position <= position[:, None]) & (position[:, None] < death)).numpy()[None, None]
    # query at 6 asks for the first pair (value at 1), the one at 4 for the second (value at 3)
    shares, value_kept = recall.mask_shares(kept, kinds, np.array([0, 0]), np.array([4, 6]),
                                                  np.array([1, 3]))
    # at 4: keys 0..4 seen, the 3 best are the two values and the query (dt 0.3)
    # at 6: the two values and the answer (dt 0.4): 3 + 3 kept keys
    assert shares["value"][0] == pytest.approx(4 / 6)
    assert shares["query"][0] == pytest.approx(1 / 6)
    assert shares["answer"][0] == pytest.approx(1 / 6)
    assert shares["key"][0] == shares["filler"][0] == 0
    assert value_kept.tolist() == [1.0]


# ----------------------------------------------------------------------------------------------
# End to end: the data, a few steps of train.py, the score


def train_run(mqar_dir, out_dir, *args):
    train.main([f"--data_dir={mqar_dir}", f"--out_dir={out_dir}", "--model=None",
                "--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2",
                "--num_attention_heads=2", "--num_key_value_heads=2",
                "--max_position_embeddings=64", "--batch_size=16", "--block_size=16",
                "--total_batch_size=256", "--max_iters=6", "--warmup_iters=1", "--decay_iters=2",
                "--learning_rate=1e-2", "--eval_interval=3", "--eval_iters=4", "--log_interval=3",
                "--save_interval=0", "--device=cpu", *args])
    return read_log(out_dir)


def test_train_eval_end_to_end(mqar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    records = train_run(mqar_dir, out, "--keep_window_size=8")
    evaluations = [r for r in records if "val_acc" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    assert not (out / "tokenizer.json").exists() and not (out / "hf").exists()
    capsys.readouterr()
    recall.main(["--task=score", f"--init_from={out}", f"--data_dir={mqar_dir}"])
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["n"] == 64 * 3 and result["keep_window_size"] == 8
    assert result["mask"] == "dynamic"  # A trained away from 0
    # recall.py counts what train.py's val_acc counts: the same 64 sequences, the same model
    assert result["acc"] == pytest.approx(evaluations[-1]["val_acc"], abs=1e-9)


def test_dynamic_mask_false_holds_a_at_zero_a_sliding_window(mqar_dir, tmp_path, capsys):
    out = tmp_path / "sliding"
    train_run(mqar_dir, out, "--keep_window_size=8", "--dynamic_mask=False")
    checkpoint = torch.load(out / "ckpt_000006.pt", weights_only=True)
    a_values = [v for k, v in checkpoint["model"].items() if k.endswith("self_attn.A")]
    assert len(a_values) == 2 and all((a == 0).all() for a in a_values)
    trained = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
    model = doge.Doge.from_pretrained(str(out))
    assert trained == sum(1 for p in model.parameters()) - 2  # A is no optimizer's
    capsys.readouterr()
    recall.main(["--task=score", f"--init_from={out}", f"--data_dir={mqar_dir}",
                       f"--plot={tmp_path / 'recall.png'}"])
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["mask"] == "sliding"
    if has_matplotlib():
        assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_the_mask_picture_of_an_mqar_sequence_and_its_statistics(mqar_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    meta = prepare_data.read_meta(str(mqar_dir))
    directory = tmp_path / "model"
    tiny_model(meta, keep_window_size=6).save_pretrained(str(directory))
    recall.main(["--task=mask", f"--init_from={directory}", f"--data_dir={mqar_dir}",
                       "--example=5", f"--out={tmp_path / 'mask.png'}", "--limit=16"])
    assert (tmp_path / "mask.png").read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err
    rows = [line.split() for line in err.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in rows] == [["0", "0"], ["0", "1"], ["0", "any"],
                                         ["1", "0"], ["1", "1"], ["1", "any"]]
    for row in rows:  # a sliding window of 6 at A = 0: shares add up to all kept keys
        shares = [float(cell.rstrip("%")) for cell in row[2:7]]
        assert sum(shares) == pytest.approx(100, abs=0.5)
    assert len({tuple(row[2:]) for row in rows}) == 1  # every head keeps the same window


def test_mask_and_plot_without_matplotlib_say_so_in_one_line(mqar_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    meta = prepare_data.read_meta(str(mqar_dir))
    directory = tmp_path / "model"
    tiny_model(meta, keep_window_size=6).save_pretrained(str(directory))
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        recall.main(["--task=mask", f"--init_from={directory}", f"--data_dir={mqar_dir}",
                           f"--out={tmp_path / 'mask.png'}", "--limit=4"])
    assert not (tmp_path / "mask.png").exists()


def test_scoring_refuses_data_that_is_not_mqar(tmp_path, mqar_dir):
    with pytest.raises(SystemExit, match="holds no MQAR data"):
        recall.main(["--task=score", f"--init_from={tmp_path}", f"--data_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="matches nothing"):
        recall.main(["--task=score", f"--init_from={tmp_path}/nothing-*",
                           f"--data_dir={mqar_dir}"])


def test_the_window_recipe_starts_at_the_source_models_loss(mqar_dir, tmp_path):
    """config/mqar_window.py starts from a trained run: its loss at step 0 is the source's, with
    the recipe's window set at load time (recall.load_masked, scored by hand)."""
    train_run(mqar_dir, tmp_path / "source", "--keep_window_size=8")
    train.main(["config/mqar_window.py", f"--data_dir={mqar_dir}",
                f"--out_dir={tmp_path / 'window'}", f"--init_from={tmp_path / 'source'}",
                "--keep_window_size=5", "--batch_size=16", "--block_size=16",
                "--total_batch_size=256", "--max_iters=1", "--eval_iters=4", "--device=cpu"])
    records = read_log(tmp_path / "window")
    meta, tokens, supervised = all_sequences(mqar_dir, "val")
    losses = {}
    for window in (5, 8):
        model, _, _ = recall.load_masked(str(tmp_path / "source"),
                                         recall.RecallConfig(keep_window_size=window), "cpu")
        logits = model_logits(model, tokens)[:, :-1][supervised[:, 1:]]  # (Q, V)
        answers = torch.from_numpy(tokens[:, 1:][supervised[:, 1:]])  # (Q,)
        losses[window] = F.cross_entropy(logits, answers)
    assert records[0]["step"] == 0
    assert records[0]["val_loss"] == pytest.approx(losses[5].item(), rel=1e-5)
    assert abs(losses[5] - losses[8]) > 10 * 1e-5 * losses[5]  # the window counts


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resuming_with_the_other_mask_is_refused_in_one_line(mqar_dir, tmp_path):
    out = tmp_path / "sliding"
    train_run(mqar_dir, out, "--keep_window_size=8", "--dynamic_mask=False")
    with pytest.raises(SystemExit) as excinfo:
        train_run(mqar_dir, out, "--keep_window_size=8", "--init_from=resume", "--max_iters=8")
    message = str(excinfo.value.code)
    assert "dynamic_mask=False: resume with the same" in message and "\n" not in message
    records = train_run(mqar_dir, out, "--keep_window_size=8", "--dynamic_mask=False",
                        "--init_from=resume", "--max_iters=9")
    assert records[-1]["step"] == 9
    checkpoint = torch.load(out / "ckpt_000009.pt", weights_only=True)
    assert all((v == 0).all() for k, v in checkpoint["model"].items() if k.endswith(".A"))


def test_a_model_of_another_vocabulary_is_refused_in_one_line(mqar_dir, tmp_path):
    """A text model scored on MQAR data would print an accuracy of 0 for tokens that mean
    nothing to it: recall.py refuses, naming both vocabularies."""
    directory = tmp_path / "text-model"
    tiny_model({"vocab_size": 300}, keep_window_size=6).save_pretrained(str(directory))
    for task in (["--task=score"], ["--task=mask", "--example=0", f"--out={tmp_path / 'm.png'}"]):
        with pytest.raises(SystemExit) as excinfo:
            recall.main([*task, f"--init_from={directory}", f"--data_dir={mqar_dir}"])
        message = str(excinfo.value.code)
        assert "vocabulary of 300 tokens" in message and "one of 32" in message, message
        assert "\n" not in message
    assert not (tmp_path / "m.png").exists()


def test_a_text_mask_picture_names_every_token_and_keeps_its_title_clear(tmp_path, monkeypatch):
    """The text picture: one legend entry "kept" (no kind), a special token that decodes to
    nothing labelled by its role, and the legend clear of the title and of the grid."""
    pytest.importorskip("matplotlib")
    tokenizer = SimpleNamespace(eot_id=2, bos_id=1,
                                decode=lambda ids: {2: "", 1: "", 5: "\n", 7: " ab"}.get(ids[0], ""))
    assert [recall.token_label(tokenizer, t) for t in (2, 1, 5, 7, 9)] == \
        ["<eot>", "<bos>", "\\n", "\u2423ab", "#9"]
    figures = []
    monkeypatch.setattr(recall, "save_figure", lambda fig, path: figures.append(fig))
    kept = [np.tril(np.ones((2, 6, 6), dtype=bool)) for _ in range(2)]  # 2 layers, 2 heads
    labels = ["<eot>", "a", "b", "c", "d", "e"]
    recall.draw_mask(kept, labels, None, "mask.png", "a long title " * 6)
    fig, = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)  # drawn again, as savefig drew it
    canvas.draw()
    legend, = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == ["kept", "seen, not kept"]
    renderer = canvas.get_renderer()
    title, box = fig._suptitle.get_window_extent(renderer), legend.get_window_extent(renderer)
    assert title.y0 >= box.y1  # the legend stands below the title
    assert all(ax.get_tightbbox(renderer).y1 <= box.y0 for ax in fig.axes)  # and above the grid
    assert [tick.get_text() for tick in fig.axes[0].get_xticklabels()] == labels

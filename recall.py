"""
The recall lab: what Dynamic Mask Attention keeps, tested on multi-query associative recall (MQAR,
from "Zoology", Arora et al. 2023). A sequence opens with key-value pairs; later each key comes
back once as a query, and the token after it must be its value. Only recall from the context can
answer, so a model that keeps too few keys, or the wrong ones, fails where its memory fails: the
lab compares the dynamic mask with a sliding window of the same size and with plain attention,
by the distance between a query and its pair, and draws which keys each query keeps.

    python recall.py --task=data --out_dir=data/mqar          # seconds: the sequences
    python train.py config/mqar.py                            # a 2-layer Doge learns the task
    python recall.py --task=score --init_from=out/mqar        # accuracy, by distance (several runs:
                                                              # comma-separated or a glob)
    python recall.py --task=mask --init_from=out/mqar-w20 --data_dir=data/mqar --example=0 \
        --out=mask.png                                        # what each query keeps
    python recall.py --task=mask --init_from=out/doge-tiny --text="def f(x):" --out=mask.png

The sequences are conversation shards (prepare_data.py's format) whose per-token mask marks the
value after each query as the one thing trained on, so train.py learns the task as it fine-tunes
on conversations and knows nothing of MQAR. See docs/recall.md.
"""

import glob
import json
import math
import platform
import sys
from dataclasses import dataclass

import numpy as np
import torch

import common
from common import autocast, device_and_dtype, log, pyplot
from configurator import apply_config
from doge import hold_mask_bias_at_zero, key_deaths_by_definition, train_checkpoint
from engine import load_model
from prepare_data import (list_shards, read_conversation_shard, read_meta,
                          remove_interrupted_writes, shard_lists, start_rebuild,
                          write_conversation_shards, write_meta)
from tokenizer import load_text_tokenizer, tokenizer_directory


@dataclass
class RecallConfig:
    task: str = "score"  # data: write the sequences; score: runs' recall; mask: what the mask keeps
    # --task=data: the sequences, in out_dir
    out_dir: str = "data/mqar"
    num_kv_pairs: int = 8  # P, the key-value pairs of a sequence
    seq_len: int = 40  # T, tokens a sequence
    vocab_size: int = 128  # ids: 3/8 keys, 3/8 values, 1/4 filler
    train_examples: int = 100_000
    val_examples: int = 1024
    seed: int = 1337  # draws the sequences: train from (seed, 0), val from (seed, 1)
    # --task=score and --task=mask
    init_from: str = "out/mqar"  # a run (out_dir or checkpoint); score: several, a,b or a glob
    data_dir: str = "data/mqar"  # the sequences scored; score: several, a,b (each run on each)
    keep_window_size: int = 0  # the keys each query keeps, set at load time; 0: the checkpoint's
    dynamic_mask: bool = True  # False: every A held at 0 at load time, a sliding window
    plot: str = ""  # score: a .png of accuracy by distance, a line per mask kind, window, length
    text: str = ""  # mask: draw this text's mask instead of an MQAR sequence (at most 96 tokens)
    example: int = 0  # mask: the validation sequence drawn
    out: str = "mask.png"  # mask: the picture
    limit: int = 0  # score: the first limit sequences only; mask: the sequences counted (256)
    batch_size: int = 32  # sequences per forward pass
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 elsewhere; or either one


# ----------------------------------------------------------------------------------------------
# The sequences
#
#     position   0  1  2  3 ...  2P-2 2P-1 | 2P ...                                  seq_len-1
#     token      k1 v1 k2 v2 ...  kP   vP  | filler, and each key k once more, then its value v
#                                          |              ^ query        ^ trained on
#
# The pairing is drawn afresh for every sequence, so only recall from the context can answer.


def mqar_layout(vocab_size):
    """The ids of each kind as [start, end): 1/4 of the vocabulary filler, 3/8 keys, 3/8 values."""
    filler = vocab_size // 4
    kinds = (vocab_size - filler) // 2
    return {"keys": [0, kinds], "values": [kinds, 2 * kinds], "filler": [2 * kinds, vocab_size]}


def check_mqar_settings(num_kv_pairs, seq_len, vocab_size, train_examples, val_examples):
    """Refuse, in one line each, settings that cannot make an MQAR sequence."""
    settings = dict(num_kv_pairs=num_kv_pairs, seq_len=seq_len, vocab_size=vocab_size,
                    train_examples=train_examples, val_examples=val_examples)
    for key, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{key} must be a positive integer, not {value!r}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"--seq_len {seq_len} cannot hold --num_kv_pairs {num_kv_pairs}: the "
                         f"pairs and then each key again with its value take 4 x {num_kv_pairs} "
                         f"= {4 * num_kv_pairs} tokens")
    if vocab_size > 65536:
        raise ValueError(f"--vocab_size {vocab_size} is more than MQAR needs (at most 65536, "
                         f"uint16 tokens)")
    layout = mqar_layout(vocab_size)
    start, end = layout["keys"]
    if end - start < num_kv_pairs or layout["filler"][0] == layout["filler"][1]:
        smallest = next(size for size in range(4, 65537)
                        if mqar_layout(size)["keys"][1] >= num_kv_pairs)
        raise ValueError(f"--vocab_size {vocab_size} holds {end - start} keys and as many values "
                         f"(3/8 of it each), fewer than the {num_kv_pairs} distinct ones a "
                         f"sequence needs, or no filler: give --vocab_size >= {smallest}")


def mqar_sequences(count, num_kv_pairs, seq_len, layout, rng):
    """count MQAR sequences: tokens (count, seq_len) uint16 and supervised (count, seq_len) uint8,
    1 at the value after each query. Keys are distinct within a sequence, and so are values; the
    queries come in a random order at random places after the pairs, random filler elsewhere."""
    pairs = num_kv_pairs
    (key_start, key_end), (value_start, value_end), (filler_start, filler_end) = (
        layout["keys"], layout["values"], layout["filler"])
    rows = np.arange(count)[:, None]
    keys = key_start + rng.random((count, key_end - key_start)).argsort(axis=1)[:, :pairs]  # (N, P)
    values = value_start + rng.random((count, value_end - value_start)).argsort(axis=1)[:, :pairs]
    tokens = np.zeros((count, seq_len), dtype=np.int64)
    tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2] = keys, values
    # after the pairs: P query units of 2 tokens and F filler units of 1, in a random order
    fillers = seq_len - 4 * pairs
    units = pairs + fillers
    is_query = np.zeros((count, units), dtype=np.int64)
    is_query[rows, rng.random((count, units)).argsort(axis=1)[:, :pairs]] = 1
    sizes = 1 + is_query
    starts = 2 * pairs + np.cumsum(sizes, axis=1) - sizes  # (N, units) where each unit begins
    query_at = starts[is_query.astype(bool)].reshape(count, pairs)  # in position order
    asked = rng.random((count, pairs)).argsort(axis=1)  # which pair each query asks for
    tokens[rows, query_at] = np.take_along_axis(keys, asked, axis=1)
    tokens[rows, query_at + 1] = np.take_along_axis(values, asked, axis=1)
    if fillers:
        filler_at = starts[~is_query.astype(bool)].reshape(count, fillers)
        tokens[rows, filler_at] = rng.integers(filler_start, filler_end, size=(count, fillers))
    supervised = np.zeros((count, seq_len), dtype=np.uint8)
    supervised[rows, query_at + 1] = 1
    return tokens.astype(np.uint16), supervised


def mqar_split(count, settings, layout, seed, avoid=frozenset(), max_rounds=100):
    """count sequences drawn with the generator seeded by seed, none of them in avoid (a set of
    row bytes): a clash is drawn again. Returns tokens and supervised."""
    rng = np.random.default_rng(seed)
    tokens, supervised, have = [], [], 0
    for _ in range(max_rounds):
        new_tokens, new_supervised = mqar_sequences(count - have, settings["num_kv_pairs"],
                                                    settings["seq_len"], layout, rng)
        keep = np.array([row.tobytes() not in avoid for row in new_tokens], dtype=bool)
        tokens.append(new_tokens[keep])
        supervised.append(new_supervised[keep])
        have += int(keep.sum())
        if have == count:
            return np.concatenate(tokens), np.concatenate(supervised)
    raise ValueError(f"these settings allow too few distinct sequences to keep {count:,} training "
                     f"ones apart from the validation ones: give a larger --seq_len or "
                     f"--vocab_size, or fewer examples")


def prepare_mqar(out_dir, num_kv_pairs=8, seq_len=40, vocab_size=128, train_examples=100_000,
                 val_examples=1024, seed=1337, shard_tokens=100_000_000):
    """MQAR sequences -> out_dir: conversation shards (val first) and meta.json with every setting
    and the token layout. Validation sequences are drawn from (seed, 1), training ones from
    (seed, 0) leaving out any validation sequence. No tokenizer: the ids are the tokens."""
    check_mqar_settings(num_kv_pairs, seq_len, vocab_size, train_examples, val_examples)
    if not isinstance(shard_tokens, int) or not 1 <= shard_tokens <= np.iinfo(np.int32).max:
        raise ValueError(f"--shard_tokens must be a positive integer that fits int32, not "
                         f"{shard_tokens!r}")
    settings = dict(task="mqar", num_kv_pairs=num_kv_pairs, seq_len=seq_len, vocab_size=vocab_size,
                    train_examples=train_examples, val_examples=val_examples, seed=seed,
                    shard_tokens=shard_tokens)
    layout = mqar_layout(vocab_size)
    remove_interrupted_writes(out_dir)
    start_rebuild(out_dir, settings)
    val_tokens, val_supervised = mqar_split(val_examples, settings, layout, [seed, 1])
    train_tokens, train_supervised = mqar_split(train_examples, settings, layout, [seed, 0],
                                                avoid={row.tobytes() for row in val_tokens})
    shards = {}
    for split, tokens, supervised in (("val", val_tokens, val_supervised),
                                      ("train", train_tokens, train_supervised)):
        shards[split] = write_conversation_shards(list(zip(tokens, supervised)), out_dir, "mqar",
                                                  split, len(shards.get("val", [])), shard_tokens)
    description = (f"MQAR: {num_kv_pairs} key-value pairs in {seq_len} tokens, vocabulary "
                   f"{vocab_size}")
    meta = dict(
        complete=True, kind="conversations", task="mqar", source=description, settings=settings,
        layout=dict(**layout,
                    pairs=f"positions 0..{2 * num_kv_pairs - 1}: key, value, key, value, ...",
                    queries="after the pairs: each key once more, followed by its value (trained "
                            "on), filler elsewhere"),
        tokenizer=None, vocab_size=vocab_size, bos_id=None, eos_id=None,
        conversations={"val": val_examples, "train": train_examples},
        tokens={"val": val_tokens.size, "train": train_tokens.size},
        supervised={"val": int(val_supervised.sum()), "train": int(train_supervised.sum())},
        **shard_lists(shards), python=platform.python_version())
    write_meta(out_dir, meta)
    log(f"wrote {train_examples:,} training and {val_examples:,} validation MQAR sequences to "
        f"{out_dir} ({description})")
    return meta


def read_mqar(data_dir, split="val"):
    """The MQAR sequences of a data directory: (meta, tokens (N, seq_len) int64, supervised
    (N, seq_len) bool). A directory that does not hold MQAR data is a ValueError."""
    meta = read_meta(data_dir)
    if not meta or meta.get("task") != "mqar":
        raise ValueError(f"{data_dir} holds no MQAR data (make it with `python recall.py "
                         f"--task=data --out_dir={data_dir}`)")
    tokens, supervised = zip(*(read_conversation_shard(path)[:2]
                               for path in list_shards(data_dir, split)))
    seq_len = meta["settings"]["seq_len"]
    return (meta, np.concatenate(tokens).astype(np.int64).reshape(-1, seq_len),
            np.concatenate(supervised).astype(bool).reshape(-1, seq_len))


# ----------------------------------------------------------------------------------------------
# Scoring: whether the model answers each query, by how far back its pair lies


def mqar_queries(tokens, supervised, num_kv_pairs):
    """Every query of MQAR sequences (N, T) as (row, query position, the position of the key it
    asks for), three (Q,) arrays in row-major order: the token after a query is its value, the one
    trained on (supervised), and its pair stands at 2i, 2i + 1 for the key's index i."""
    rows, answer_at = np.nonzero(supervised)
    query_at = answer_at - 1
    keys = tokens[rows, 0:2 * num_kv_pairs:2]  # (Q, P) every row's keys
    key_at = 2 * (keys == tokens[rows, query_at][:, None]).argmax(axis=1)
    return rows, query_at, key_at


@torch.no_grad()
def mqar_recall(model, tokens, supervised, num_kv_pairs, batch_size, autocast):
    """Per query (mqar_queries' order): whether the model's most likely next token after it is
    its value, and how far back its pair lies (query position - key position)."""
    predictions = np.zeros(tokens.shape, dtype=np.int64)
    device = model.lm_head.weight.device
    for start in range(0, len(tokens), batch_size):
        idx = torch.from_numpy(tokens[start:start + batch_size]).to(device)
        with autocast:
            logits, _ = model(idx)
        predictions[start:start + batch_size] = logits.argmax(dim=-1).cpu().numpy()
    rows, query_at, key_at = mqar_queries(tokens, supervised, num_kv_pairs)
    return predictions[rows, query_at] == tokens[rows, query_at + 1], query_at - key_at


def mask_kind(model, seq_len):
    """'full' when every query keeps every key it sees (keep_window_size >= seq_len), 'sliding'
    when every A is 0 (every key ties: the latest keep_window_size keys), else 'dynamic'."""
    if model.config.keep_window_size >= seq_len:
        return "full"
    return "sliding" if all((layer.self_attn.A == 0).all() for layer in model.layers) else "dynamic"


def score_mqar(model, path, tokens, supervised, meta, cfg, autocast, trained):
    """One run's result: accuracy over every query, by distance and within the window, with the
    mask kind, the window and length scored at and those trained at. The in-window ceiling: the
    share of queries whose pair lies at most W tokens back, all that a sliding window reaches."""
    seq_len, window = meta["settings"]["seq_len"], model.config.keep_window_size
    right, distance = mqar_recall(model, tokens, supervised, meta["settings"]["num_kv_pairs"],
                                  cfg.batch_size, autocast)
    by_distance = {}
    for low in range(1, seq_len, 8):  # bins of 8 distances: 1-8, 9-16, ..., up to seq_len - 1
        in_bin = (distance >= low) & (distance <= low + 7)
        if in_bin.any():
            by_distance[f"{low}-{low + 7}"] = float(right[in_bin].mean())
    in_window = distance <= window
    return {"task": "mqar", "init_from": path, "n": len(right), "acc": float(right.mean()),
            "keep_window_size": window, "mask": mask_kind(model, seq_len),
            "acc_by_distance": by_distance, "seq_len": seq_len,
            "trained_seq_len": trained["seq_len"],
            "trained_keep_window_size": trained["keep_window_size"],
            "in_window": float(in_window.mean()),
            "acc_in_window": float(right[in_window].mean()) if in_window.any() else None}


def recall_groups(results):
    """The results grouped by the (mask, keep_window_size, seq_len) scored at, in table order."""
    groups = {}
    for r in results:
        groups.setdefault((r["mask"], r["keep_window_size"], r["seq_len"]), []).append(r)
    order = {"full": 0, "dynamic": 1, "sliding": 2}
    return sorted(groups.items(), key=lambda item: (-item[0][1], order[item[0][0]], item[0][2]))


def print_recall_table(results):
    """Each run's accuracy by distance, then the runs grouped by mask, window and length: mean
    and range, overall and on the pairs within the window (beside the in-window ceiling)."""
    bins = max((list(r["acc_by_distance"]) for r in results), key=len)
    log(f"{'run':<28} {'mask':<8} {'W':>5} {'queries':>8} {'acc':>7}  {'T':>4} {'trained':>7} "
        f"{'ceiling':>7} {'in-W acc':>8}  by distance " + " ".join(f"{b:>7}" for b in bins))
    for r in results:
        by_distance = " ".join(f"{r['acc_by_distance'].get(b, math.nan):>7.3f}" for b in bins)
        trained = f"{r['trained_seq_len'] or '?'}/{r['trained_keep_window_size']}"
        log(f"{r['init_from'][-28:]:<28} {r['mask']:<8} {r['keep_window_size']:>5} {r['n']:>8} "
            f"{r['acc']:>7.4f}  {r['seq_len']:>4} {trained:>7} {r['in_window']:>7.3f} "
            f"{nan_if_none(r['acc_in_window']):>8.4f}  {'':11} {by_distance}")
    log(f"\n{'mask':<8} {'W':>5} {'T':>4} {'runs':>5} {'mean acc':>9} {'min':>7} {'max':>7} "
        f"{'ceiling':>8} {'in-W mean':>9} {'min':>7} {'max':>7}")
    for (kind, window, seq_len), group in recall_groups(results):
        accs = [r["acc"] for r in group]
        in_window = [nan_if_none(r["acc_in_window"]) for r in group]
        log(f"{kind:<8} {window:>5} {seq_len:>4} {len(accs):>5} {np.mean(accs):>9.4f} "
            f"{min(accs):>7.4f} {max(accs):>7.4f} {group[0]['in_window']:>8.3f} "
            f"{np.mean(in_window):>9.4f} {min(in_window):>7.4f} {max(in_window):>7.4f}")


def nan_if_none(value):
    return math.nan if value is None else value


def plot_recall(results, path):
    """Accuracy by distance, a line per mask kind, window and length scored at (the mean over its
    runs, their range shaded), and the edge of each window with its in-window ceiling."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    edges = {}
    for (kind, window, seq_len), group in recall_groups(results):
        bins = list(group[0]["acc_by_distance"])  # the runs of a group share their data
        centres = [np.mean([int(end) for end in b.split("-")]) for b in bins]
        accs = np.array([[r["acc_by_distance"][b] for b in bins] for r in group])  # (runs, bins)
        line, = ax.plot(centres, accs.mean(axis=0), marker="o", markersize=3,
                        label=f"{kind}, W={window}, T={seq_len} ({len(group)} runs)")
        ax.fill_between(centres, accs.min(axis=0), accs.max(axis=0), color=line.get_color(),
                        alpha=0.15)
        if window < seq_len:
            edges[window, seq_len] = group[0]["in_window"]
    for (window, seq_len), ceiling in edges.items():
        ax.axvline(window, color="gray", linestyle=":",
                   label=f"W={window}: {ceiling:.1%} of the queries at T={seq_len} lie within "
                         f"(the in-window ceiling)")
    ax.set(xlabel="distance: query position - key position", ylabel="recall accuracy",
           ylim=(-0.02, 1.02), title="MQAR: accuracy by distance (mean and range over runs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# What the mask keeps: from the dt the model computes and the mask's definition

MQAR_KINDS = ("key", "value", "query", "answer", "filler")  # what a position of a sequence holds
MQAR_COLOURS = {"key": "tab:blue", "value": "tab:red", "query": "tab:cyan", "answer": "tab:orange",
                "filler": "tab:gray", "kept": "tab:blue"}


def mqar_kinds(tokens, meta):
    """What each position of MQAR sequences tokens (N, T) holds, as indices into MQAR_KINDS (N, T):
    the pairs (key, value), then queries, answers and filler by meta.json's token layout."""
    pairs = meta["settings"]["num_kv_pairs"]
    layout = meta["layout"]
    kinds = np.full(tokens.shape, MQAR_KINDS.index("filler"))
    for kind, name in (("keys", "query"), ("values", "answer")):
        start, end = layout[kind]
        kinds[(tokens >= start) & (tokens < end)] = MQAR_KINDS.index(name)
    kinds[:, 0:2 * pairs:2] = MQAR_KINDS.index("key")
    kinds[:, 1:2 * pairs:2] = MQAR_KINDS.index("value")
    return kinds


@torch.no_grad()
def kept_keys(model, idx):
    """What DMAttn keeps for tokens idx (B, T): per layer, kept (B, Hb, T, T) bool, [.., q, kv]
    true when query q keeps key kv, from the dt the model computes and the mask's definition,
    kv <= q < death[kv] (doge.key_deaths_by_definition)."""
    dt_logits = []  # each layer's dt_proj output (B, T, Hb), caught as the model computes it
    hooks = [layer.self_attn.dt_proj.register_forward_hook(
        lambda _, args, output: dt_logits.append(output)) for layer in model.layers]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    position = torch.arange(idx.shape[1], device=idx.device)
    kept = []
    for layer, logits in zip(model.layers, dt_logits):
        attention = layer.self_attn
        dt = attention.dynamic_bias(logits).transpose(1, 2)  # (B, Hb, T)
        death = key_deaths_by_definition(dt, attention.keep_window_size)  # (B, Hb, T)
        kept.append(((position <= position[:, None]) & (position[:, None] < death[..., None, :]))
                    .cpu().numpy())  # (B, Hb, T, T)
    return kept


def mask_shares(kept, kinds, rows, query_at, value_at):
    """At the query positions (rows, query_at), per bias head: the share of the kept keys of each
    kind (kinds (N, T) indices into MQAR_KINDS), and how often the queried pair's value (at
    value_at) is kept. kept (N, Hb, T, T) bool. Returns ({kind: (Hb,)}, (Hb,))."""
    at_queries = kept[rows, :, query_at, :]  # (Q, Hb, T): the keys each query keeps
    kinds = kinds[rows][:, None, :]  # (Q, 1, T)
    total = at_queries.sum(axis=(0, 2))  # (Hb,)
    shares = {kind: (at_queries & (kinds == i)).sum(axis=(0, 2)) / np.maximum(total, 1)
              for i, kind in enumerate(MQAR_KINDS)}
    return shares, at_queries[np.arange(len(rows)), :, value_at].mean(axis=0)


def print_mask_shares(model, tokens, supervised, meta, device):
    """mask_shares as a table: a row per layer and bias head, and one for any head's kept keys."""
    rows, query_at, key_at = mqar_queries(tokens, supervised, meta["settings"]["num_kv_pairs"])
    kept = kept_keys(model, torch.from_numpy(tokens).to(device))
    kinds = mqar_kinds(tokens, meta)
    log(f"at the {len(rows):,} queries of {len(tokens):,} validation sequences: the kept keys by "
        f"kind, and how often the queried pair's value is kept")
    log(f"{'layer':>5} {'head':>4} " + " ".join(f"{kind:>7}" for kind in MQAR_KINDS) +
        f" {'value kept':>10}")
    for layer, kept_in_layer in enumerate(kept):  # each bias head, then the keys any head keeps
        for heads, names in ((kept_in_layer, range(kept_in_layer.shape[1])),
                             (kept_in_layer.any(axis=1, keepdims=True), ["any"])):
            shares, value_kept = mask_shares(heads, kinds, rows, query_at, key_at + 1)
            for head, name in enumerate(names):
                log(f"{layer:>5} {name:>4} " + " ".join(f"{shares[k][head]:>7.1%}"
                                                        for k in MQAR_KINDS)
                    + f" {value_kept[head]:>10.1%}")


def draw_mask(kept, labels, kinds, path, title):
    """A grid of pictures, a row per layer and a column per bias head: query x key, the kept
    cells filled (in the colour of the key's kind for MQAR), the ones dropped light grey."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    names = list(MQAR_KINDS) if kinds is not None else ["kept"]
    colours = ["white", "#e6e6e6"] + [MQAR_COLOURS[name] for name in names]
    layers, heads, length = len(kept), kept[0].shape[0], len(labels)
    size = min(max(4.0, 0.16 * length), 12.0)  # inches a picture; 128 tokens at 9 pixels a cell
    fig, axes = plt.subplots(layers, heads, figsize=(size * heads, size * layers), squeeze=False)
    key_colour = 2 + (kinds if kinds is not None else np.zeros(length, dtype=np.int64))
    visible = np.tril(np.ones((length, length), dtype=bool))
    for layer in range(layers):
        for head in range(heads):
            cells = np.where(kept[layer][head], key_colour[None, :], visible.astype(np.int64))
            ax = axes[layer][head]
            ax.imshow(cells, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1,
                      interpolation="nearest")
            ax.set_xticks(range(length), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(length), labels, fontsize=7)
            ax.set(title=f"layer {layer}, bias head {head}", xlabel="key", ylabel="query")
    kept_labels = [f"kept: {name}" for name in names] if kinds is not None else ["kept"]
    handles = [Patch(color=MQAR_COLOURS[name], label=label)
               for name, label in zip(names, kept_labels)]
    handles.append(Patch(color="#e6e6e6", label="seen, not kept"))
    # the title, then the legend in rows of 3 under it, above the grid (sizes in inches)
    height, legend_rows = size * layers, math.ceil(len(handles) / 3)
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1 - 0.45 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.55 + 0.3 * legend_rows) / height))
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path):
    common.save_figure(fig, path)
    log(f"wrote {path}")


def mqar_labels(tokens, meta):
    """Axis labels of an MQAR sequence: k3 for key id 3, v5 for the fifth value id, . for filler."""
    start = meta["layout"]["values"][0]
    filler = meta["layout"]["filler"][0]
    return [f"k{t}" if t < start else f"v{t - start}" if t < filler else "."
            for t in tokens.tolist()]


def token_label(tokenizer, token):
    """A token on the mask's axes: its text as Python writes it in quotes (a newline reads \n),
    spaces as ␣, or for a special token that decodes to nothing, its role or id."""
    special = {tokenizer.eot_id: "<eot>", tokenizer.bos_id: "<bos>"}
    text = repr(tokenizer.decode([token]))[1:-1].replace(" ", "\u2423")
    return text or special.get(token, f"#{token}")


# ----------------------------------------------------------------------------------------------
# The commands


def mqar_data(data_dir):
    """meta, tokens and supervised of the MQAR validation sequences in data_dir, or one line."""
    try:
        return read_mqar(data_dir, "val")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def check_mqar_vocabulary(model, init_from, meta, data_dir):
    """A model scores MQAR data only if it was trained on such data: its vocabulary is the
    data's (a text model's tokens mean something else); else one line naming both."""
    data_vocab = meta["settings"]["vocab_size"]
    if model.config.vocab_size != data_vocab:
        raise SystemExit(f"error: {init_from} has a vocabulary of {model.config.vocab_size} "
                         f"tokens, the MQAR data in {data_dir} one of {data_vocab}: score a model "
                         f"trained on this data (python train.py config/mqar.py)")


def run_paths(init_from):
    """--init_from as a list: comma-separated, each a path, a glob ('out/mqar-*') or a hub name."""
    paths = []
    for part in filter(None, init_from.split(",")):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise SystemExit(f"error: --init_from={part} matches nothing")
        paths += matches
    return paths


def load_masked(init_from, cfg, device):
    """(model, path, trained) of a run, with --keep_window_size and --dynamic_mask applied to the
    loaded model (the checkpoint is left as it is), and what it was trained at: {"seq_len": the
    train.py run's block_size (None for other formats), "keep_window_size"}."""
    model, path = load_model(init_from, device)
    _, checkpoint = train_checkpoint(path)
    trained = {"seq_len": checkpoint and checkpoint.get("train_config", {}).get("block_size"),
               "keep_window_size": model.config.keep_window_size}
    window = cfg.keep_window_size or model.config.keep_window_size
    model.config.keep_window_size = window
    for layer in model.layers:
        layer.self_attn.keep_window_size = window
    if not cfg.dynamic_mask:
        hold_mask_bias_at_zero(model)
    return model, path, trained


def run_score(cfg, device, autocast):
    """--task=score: each --init_from run scored on the MQAR validation sequences of each
    --data_dir, a JSON line each, then the table (and --plot)."""
    results = []
    for data_dir in filter(None, cfg.data_dir.split(",")):
        meta, tokens, supervised = mqar_data(data_dir)
        if cfg.limit:
            tokens, supervised = tokens[:cfg.limit], supervised[:cfg.limit]
        for init_from in run_paths(cfg.init_from):
            model, _, trained = load_masked(init_from, cfg, device)
            check_mqar_vocabulary(model, init_from, meta, data_dir)
            result = score_mqar(model, init_from, tokens, supervised, meta, cfg, autocast, trained)
            print(json.dumps(result), flush=True)
            results.append(result)
    print_recall_table(results)
    if cfg.plot:
        plot_recall(results, cfg.plot)
    return results


MASK_TOKENS = 96  # text drawn at most: wider pictures are unreadable


def run_mask(cfg, device):
    """--task=mask: the picture of what the mask keeps (at --keep_window_size, --dynamic_mask),
    for --text or an MQAR sequence (--data_dir, --example); for MQAR also the shares of kept keys
    at the query positions over the first --limit validation sequences (256 by default)."""
    model, path, trained = load_masked(cfg.init_from, cfg, device)
    if not cfg.text:
        meta, tokens, supervised = mqar_data(cfg.data_dir)
        if not 0 <= cfg.example < len(tokens):
            raise SystemExit(f"error: --example={cfg.example}: {cfg.data_dir} holds validation "
                             f"sequences 0 .. {len(tokens) - 1}")
        check_mqar_vocabulary(model, cfg.init_from, meta, cfg.data_dir)
        ids, kinds = tokens[cfg.example], mqar_kinds(tokens[cfg.example:cfg.example + 1], meta)[0]
        labels, title = mqar_labels(ids, meta), f"{path}: MQAR validation sequence {cfg.example}"
        print_mask_shares(model, tokens[:cfg.limit or 256], supervised[:cfg.limit or 256], meta,
                          device)
    else:
        try:
            tokenizer = load_text_tokenizer(tokenizer_directory(path), model.config.vocab_size)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        ids = np.array(tokenizer.encode_prompt(cfg.text)[:MASK_TOKENS])
        kinds, labels = None, [token_label(tokenizer, t) for t in ids.tolist()]
        title = f"{path}: {len(ids)} tokens of --text"
    kept = kept_keys(model, torch.from_numpy(ids[None]).to(device))
    draw_mask([layer[0] for layer in kept], labels, kinds, cfg.out,
              f"{title} (keep_window_size {model.config.keep_window_size}, trained at "
              f"{trained['keep_window_size']} on {trained['seq_len'] or '?'} tokens)")


def main(argv=None):
    cfg = apply_config(RecallConfig(), sys.argv[1:] if argv is None else argv)
    if cfg.task == "data":
        settings = {key: getattr(cfg, key) for key in ("num_kv_pairs", "seq_len", "vocab_size",
                                                       "train_examples", "val_examples", "seed")}
        try:
            return prepare_mqar(cfg.out_dir, **settings)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if cfg.task not in ("score", "mask"):
        raise SystemExit(f"error: unknown task {cfg.task!r}; choose data, score or mask")
    if cfg.keep_window_size < 0:
        raise SystemExit(f"error: --keep_window_size={cfg.keep_window_size}: give the keys each "
                         f"query keeps, or 0 for the checkpoint's")
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    if cfg.task == "score":
        return run_score(cfg, device, autocast(device, dtype))
    return run_mask(cfg, device)


if __name__ == "__main__":
    main()

"""
Benchmarks for a Doge: the zero-shot tasks its model cards report, scored as lm-evaluation-harness
scores them, and bits per byte of a text or of our shards.

    python eval.py --init_from=models/Doge-20M --data_dir=data/eval        # all six tasks
    python eval.py --init_from=out/doge-20m --tasks=hellaswag,piqa --limit=500
    python eval.py --init_from=out/doge-tiny --task=bpb --data=data/default/stdlib_val_000000.bin

Tasks: hellaswag, arc_easy, arc_challenge, piqa, openbookqa, winogrande. Each task's rows come
from --data_dir/<task>.jsonl (or .jsonl.gz, .parquet) in the public data set's own layout (the
Hugging Face data set's fields), or else from the hub with the optional `datasets` package and a
network. Each choice is scored by the summed log-probability of its tokens after the prompt;
acc takes the best sum, acc_norm the best sum per character of the choice.

The benchmarks live here, in the order a reader needs them: each task's row format and prompt,
how its rows are read, the context/continuation split into tokens and the grading (exactly how
prompts are made and split), then the documents that bits per byte is measured on. train.py's
eval_tasks imports them to score the same tasks while training. The program follows: its
settings, loading the model, scoring, the table.

A progress bar per task goes to stderr as it goes, then a table: task, n, acc, acc_norm for the
benchmarks, and under a header of its own task, bytes, tokens, bpb for bits per byte. stdout gets
one JSON line per task, {"task", "n", "acc", "acc_norm"} ({"task": "bpb", "bpb", ...} for bits
per byte), and --output=FILE.json also keeps every question's per-choice log-likelihoods.
"""

import contextlib
import glob
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from configurator import apply_config
from doge import Doge, key_deaths_by_definition, local_model_path
from prepare_data import (LOSSLESS_PROBE, atomic_write, atomic_write_text, document_start,
                          found_keys, hub_offline_setting, hub_unreachable, jsonl_rows,
                          load_text_tokenizer, load_tokenizer, one_line, open_parquet,
                          read_documents, read_meta, read_mqar, read_shard, tokenizer_directory)


# ----------------------------------------------------------------------------------------------
# Benchmarks: the zero-shot multiple-choice tasks of the Doge model cards, read, prompted and
# scored as lm-evaluation-harness does it, so that eval.py's and train.py's numbers stand beside
# the cards'. First each task's row format and prompt.


@dataclass
class Question:
    contexts: list  # the text before each choice: one prompt for all, or (Winogrande) one per
    # choice
    choices: list  # each choice's text, scored as the continuation of its context after a space
    gold: int  # the index of the right choice


def hellaswag_text(text):
    """HellaSwag's WikiHow rows carry markers in brackets: " [title]" ends a sentence, the
    others go."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def hellaswag_question(row):
    # str.capitalize also lowers the rest of ctx_b; the harness's prompts do the same
    prompt = hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    endings = [hellaswag_text(ending) for ending in row["endings"]]
    return Question([prompt] * len(endings), endings, int(row["label"]))


def arc_question(row):
    texts, labels = row["choices"]["text"], row["choices"]["label"]
    return Question([f"Question: {row['question']}\nAnswer:"] * len(texts), list(texts),
                    list(labels).index(row["answerKey"]))


def piqa_question(row):
    return Question([f"Question: {row['goal']}\nAnswer:"] * 2, [row["sol1"], row["sol2"]],
                    int(row["label"]))


def openbookqa_question(row):
    texts, labels = row["choices"]["text"], row["choices"]["label"]
    return Question([row["question_stem"]] * len(texts), list(texts),
                    list(labels).index(row["answerKey"].lstrip()))


def winogrande_question(row):
    """Partial scoring: each option fills the blank and ends its context; what follows the blank is
    the continuation, the same text for both, so the options compete on how well the rest of the
    sentence fits."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = sentence[blank + 1:].strip()
    return Question([sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
                    [rest, rest], ["1", "2"].index(str(row["answer"])))


@dataclass(frozen=True)
class Benchmark:
    question: Callable  # a row in the data set's own layout -> Question
    hub: tuple  # (data set, config, split) on the Hugging Face hub: the split the harness evaluates
    acc_norm: bool = True  # whether the harness reports acc_norm (Winogrande's choices are all
    # the same text)


BENCHMARKS = {
    "hellaswag": Benchmark(hellaswag_question, ("Rowan/hellaswag", None, "validation")),
    "arc_easy": Benchmark(arc_question, ("allenai/ai2_arc", "ARC-Easy", "test")),
    "arc_challenge": Benchmark(arc_question, ("allenai/ai2_arc", "ARC-Challenge", "test")),
    "piqa": Benchmark(piqa_question, ("baber/piqa", None, "validation")),
    "openbookqa": Benchmark(openbookqa_question, ("allenai/openbookqa", "main", "test")),
    "winogrande": Benchmark(winogrande_question,
                            ("allenai/winogrande", "winogrande_xl", "validation"), acc_norm=False),
}


# ----------------------------------------------------------------------------------------------
# Reading a task's rows: a local file in the data set's own layout, else the hub

BENCHMARK_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def read_benchmark(task, data_dir, limit=0):
    """The questions of a task (the first `limit` when limit > 0), from data_dir/<task>.jsonl,
    .jsonl.gz or .parquet in the data set's own layout, else from the hub with the optional
    `datasets` package."""
    if task not in BENCHMARKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(BENCHMARKS)}")
    questions = []
    try:
        for where, row in benchmark_rows(task, data_dir):
            if limit and len(questions) == limit:
                break
            questions.append(parse_question(task, where, row))
    except UnicodeDecodeError as e:
        raise ValueError(f"{task}: a file in {data_dir} is not valid UTF-8 ({e.reason})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{task}: cannot read its rows in {data_dir} ({one_line(e)})") from None
    if not questions:
        raise ValueError(f"{task}: no rows in its file in {data_dir}")
    return questions


def benchmark_rows(task, data_dir):
    """(where, row) for each row of a task; where names the file and line, or the row."""
    for suffix in BENCHMARK_SUFFIXES:
        path = os.path.join(data_dir, task + suffix)
        if os.path.isfile(path):
            return parquet_rows(path) if suffix == ".parquet" else jsonl_rows(path)
    return hub_rows(task, f"no {os.path.join(data_dir, task)}.jsonl (nor .jsonl.gz, .parquet)")


def parquet_rows(path):
    rows = (row for batch in open_parquet(path).iter_batches(batch_size=1024)
            for row in batch.to_pylist())
    return ((f"{path}: row {number}", row) for number, row in enumerate(rows, 1))


def hub_rows(task, missing):
    """A task's rows from the hub. Without the package or the network, the error says which file
    was looked for. With HF_HUB_OFFLINE set, datasets reads its cache only."""
    name, config, split = BENCHMARKS[task].hub
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{task}: {missing}, and reading {name} from the hub needs the optional "
                         f"`datasets` package (pip install datasets)") from None
    offline = hub_offline_setting()
    reason = None if offline else hub_unreachable()
    if reason:
        raise ValueError(f"{task}: {missing}, and the hub for {name} is out of reach: {reason}")
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many kinds: offline without a cache, bad name, network
        raise ValueError(f"{task}: {missing}, and {name} did not load from the hub"
                         f"{f' ({offline} is set: only its cache is read)' if offline else ''}: "
                         f"{one_line(e)}") from None
    return ((f"{name} {split} row {number}", row) for number, row in enumerate(rows, 1))


def parse_question(task, where, row):
    try:
        return BENCHMARKS[task].question(row)
    except KeyError as e:
        raise ValueError(f"{where}: no field {e.args[0]!r} in this {task} row "
                         f"(found {found_keys(row)})") from None
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise ValueError(f"{where}: not a {task} row ({one_line(e)})") from None


# ----------------------------------------------------------------------------------------------
# The context/continuation split into tokens, and grading


def benchmark_requests(tokenizer, questions):
    """(context ids, continuation ids) of every choice of every question, in order."""
    pairs = [(context, " " + choice) for question in questions
             for context, choice in zip(question.contexts, question.choices)]
    return encode_pairs(tokenizer, pairs)


def encode_pairs(tokenizer, pairs):
    """Token ids of (context, continuation) text pairs, split as lm-evaluation-harness splits them:
    the context's trailing whitespace moves to the start of the continuation (where BPE tokens carry
    their spaces); the continuation's ids are those of context + continuation past as many ids as
    the context alone has, so a token merged across the boundary counts for the continuation. No
    special tokens are added; an empty context becomes the document-start token, so every
    continuation token is predicted."""
    moved = [(context.rstrip(), context[len(context.rstrip()):] + continuation)
             for context, continuation in pairs]
    contexts = tokenizer.encode([context for context, _ in moved])
    wholes = tokenizer.encode([context + continuation for context, continuation in moved])
    return [(context or [document_start(tokenizer)], whole[len(context):])
            for context, whole in zip(contexts, wholes)]


def grade(questions, loglikelihoods):
    """(acc, acc_norm) of each question: whether the largest summed log-likelihood is the right
    choice's, and whether the largest per character of the choice's text is (the first wins ties).
    loglikelihoods: one per choice, question after question."""
    def best(scores):
        return max(range(len(scores)), key=scores.__getitem__)

    grades, position = [], 0
    for question in questions:
        scores = loglikelihoods[position:position + len(question.choices)]
        position += len(question.choices)
        per_char = [score / max(len(choice), 1) for score, choice in zip(scores, question.choices)]
        grades.append((best(scores) == question.gold, best(per_char) == question.gold))
    return grades


# ----------------------------------------------------------------------------------------------
# The documents that bits per byte are measured on


def bpb_documents(path, tokenizer, limit=0):
    """(token ids, UTF-8 bytes) of each document of a file, for bits per byte: one of our .bin
    shards (split at the end-of-text token, which counts no bytes; a document cut by the shard's
    end counts as it is), or text read as prepare_data.py reads its --input (.txt, .jsonl,
    .parquet, .gz)."""
    if path.endswith(".bin"):
        tokens = np.asarray(read_shard(path))
        check_shard_tokenizer(path, tokens, tokenizer)
        ends = np.flatnonzero(tokens == tokenizer.eot_id)
        starts, ends = np.concatenate(([0], ends + 1)), np.concatenate((ends, [len(tokens)]))
        pieces = [tokens[start:end].tolist() for start, end in zip(starts, ends) if end > start]
        documents = [(ids, len(tokenizer.decode(ids).encode("utf-8")))
                     for ids in pieces[:limit or None]]
    elif not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    else:
        texts = list(read_documents(path))[:limit or None]
        documents = [(ids, len(text.encode("utf-8")))
                     for ids, text in zip(tokenizer.encode(texts), texts)]
    if not any(size for _, size in documents):
        raise ValueError(f"{path}: no text to score")
    return documents


def check_shard_tokenizer(path, tokens, tokenizer):
    """A shard's ids mean the model's tokens only if the model's tokenizer made them: an id
    past its vocabulary, or a tokenizer recorded beside the shard (meta.json) that encodes
    text otherwise, is a ValueError naming both."""
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= tokenizer.vocab_size:
        raise ValueError(f"{path} holds token id {largest}, past the model's tokenizer of "
                         f"{tokenizer.vocab_size} tokens: it was tokenized with another one")
    directory = os.path.dirname(os.path.abspath(path))
    recorded = ((read_meta(directory) or {}).get("tokenizer") or {}).get("path")
    if recorded and os.path.isfile(os.path.join(directory, recorded)):
        theirs = load_tokenizer(os.path.join(directory, recorded))
        if theirs.encode([LOSSLESS_PROBE]) != tokenizer.encode([LOSSLESS_PROBE]):
            raise ValueError(f"{path} was tokenized with {os.path.join(directory, recorded)}, "
                             f"which is not the model's tokenizer: score text (.txt, .jsonl) "
                             f"or a shard of the model's own data")


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class EvalConfig:
    init_from: str = "out/doge-tiny"  # an out_dir (its newest checkpoint), a ckpt_*.pt file, or
    # a Hugging Face Doge directory (either layout) or hub name; its tokenizer beside the weights
    tasks: str = ",".join(BENCHMARKS)  # comma-separated benchmark names, and/or bpb
    task: str = ""  # one task, instead of tasks (--task=bpb --data=FILE)
    data_dir: str = ""  # benchmarks: <task>.jsonl, .jsonl.gz or .parquet (default data/eval;
    # missing: from the hub); mqar: the MQAR data (default data/mqar); mask: MQAR data to draw
    data: str = ""  # bpb: a text file (.txt, .jsonl, .parquet, .gz) or one of our .bin shards
    limit: int = 0  # > 0: only the first limit questions of each task (bpb: documents)
    output: str = ""  # a .json file for every question's per-choice log-likelihoods
    plot: str = ""  # mqar: a .png of accuracy against keep_window_size, a point per run
    text: str = ""  # mask: the text whose mask is drawn (at most 96 tokens)
    example: int = 0  # mask with MQAR data (data_dir): the validation sequence drawn
    out: str = "mask.png"  # mask: the picture
    batch_size: int = 32  # sequences per forward pass
    block_size: int = 0  # bpb: tokens scored per window; 0: the model's max_position_embeddings
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 elsewhere; or either one


def log(message):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Loading


def load_model(init_from, device):
    """The model and the local path it came from (a hub name is fetched: see
    doge.local_model_path)."""
    try:
        path = local_model_path(init_from)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --init_from={e}") from None
    try:
        return Doge.from_pretrained(path, device=device).eval(), path
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def device_and_autocast(cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"error: dtype {cfg.dtype!r}: choose auto, float32 or bfloat16")
    if dtype == "float32":
        return device, contextlib.nullcontext()
    return device, torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Scoring a model: benchmarks and bits per byte

QUESTIONS_PER_CALL = 256  # sorted and batched together; the progress bar moves after each call


def score_benchmark(model, tokenizer, task, questions, cfg, autocast):
    """The task's result line, and per question its gold index and each choice's log-likelihood."""
    requests = benchmark_requests(tokenizer, questions)
    loglikelihoods, grades, position = [], [], 0
    with tqdm(total=len(questions), desc=task, unit="q", file=sys.stderr,
              dynamic_ncols=True) as progress:
        for start in range(0, len(questions), QUESTIONS_PER_CALL):
            part = questions[start:start + QUESTIONS_PER_CALL]
            count = sum(len(question.choices) for question in part)
            with autocast:
                scores = model.loglikelihoods(requests[position:position + count], cfg.batch_size)
            position += count
            loglikelihoods += scores
            grades += grade(part, scores)
            progress.update(len(part))
            progress.set_postfix(acc=f"{mean(g[0] for g in grades):.4f}",
                                 acc_norm=f"{mean(g[1] for g in grades):.4f}", refresh=False)
    result = {"task": task, "n": len(questions), "acc": mean(g[0] for g in grades),
              "acc_norm": mean(g[1] for g in grades) if BENCHMARKS[task].acc_norm else None}
    items, position = [], 0
    for question, (right, right_norm) in zip(questions, grades):
        items.append({"gold": question.gold, "acc": right, "acc_norm": right_norm,
                      "loglikelihoods": loglikelihoods[position:position + len(question.choices)]})
        position += len(question.choices)
    return result, items


def score_bpb(model, tokenizer, documents, cfg, autocast):
    """Bits per UTF-8 byte: every token of every document scored once, in windows of block_size
    tokens, each window after the token before it (the document-start token for the first)."""
    block = cfg.block_size or model.config.max_position_embeddings
    requests = []
    for ids, _ in documents:
        tokens = [document_start(tokenizer)] + ids
        requests += [(tokens[i:i + 1], tokens[i + 1:i + 1 + block])
                     for i in range(0, len(ids), block)]
    with tqdm(total=len(requests), desc="bpb", unit="window", file=sys.stderr,
              dynamic_ncols=True) as progress:
        nats = 0.0
        for start in range(0, len(requests), cfg.batch_size):
            part = requests[start:start + cfg.batch_size]
            with autocast:
                nats -= sum(model.loglikelihoods(part, cfg.batch_size))
            progress.update(len(part))
    tokens, size = sum(len(ids) for ids, _ in documents), sum(size for _, size in documents)
    result = {"task": "bpb", "data": cfg.data, "bpb": nats / math.log(2) / size,
              "tokens": tokens, "bytes": size, "loss": nats / tokens}
    return result, None


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def print_table(results):
    """The benchmarks under task, n (questions), acc and acc_norm; bits per byte under a header of
    its own: task, bytes, tokens and bpb."""
    benchmarks = [result for result in results if result["task"] != "bpb"]
    bpbs = [result for result in results if result["task"] == "bpb"]
    if benchmarks:
        log(f"{'task':<16} {'n':>7} {'acc':>8} {'acc_norm':>9}")
    for result in benchmarks:
        norm = f"{result['acc_norm']:.4f}" if result["acc_norm"] is not None else "-"
        log(f"{result['task']:<16} {result['n']:>7} {result['acc']:>8.4f} {norm:>9}")
    if bpbs:
        log(f"{'task':<16} {'bytes':>10} {'tokens':>10} {'bpb':>8}")
    for result in bpbs:
        log(f"{'bpb':<16} {result['bytes']:>10} {result['tokens']:>10} {result['bpb']:>8.4f}")


# ----------------------------------------------------------------------------------------------
# Recall (MQAR) and what the mask keeps: prepare_data.py --mqar writes the sequences (key-value
# pairs, then each key again as a query followed by its value); here a model is scored on them,
# and DMAttn's mask is drawn, from its definition in doge.py (key_deaths_by_definition).

MQAR_KINDS = ("key", "value", "query", "answer", "filler")  # what a position of a sequence holds
MQAR_COLOURS = {"key": "tab:blue", "value": "tab:red", "query": "tab:cyan", "answer": "tab:orange",
                "filler": "tab:gray", "kept": "tab:blue"}


def mqar_kinds(tokens, meta):
    """What each position of MQAR sequences tokens (N, T) holds, as indices into MQAR_KINDS
    (N, T): the pairs (key, value, ...) first, then queries (a key again), answers (the value
    after a query) and filler, read from the token layout in meta.json."""
    pairs = meta["settings"]["num_kv_pairs"]
    layout = meta["layout"]
    kinds = np.full(tokens.shape, MQAR_KINDS.index("filler"))
    for kind, name in (("keys", "query"), ("values", "answer")):
        start, end = layout[kind]
        kinds[(tokens >= start) & (tokens < end)] = MQAR_KINDS.index(name)
    kinds[:, 0:2 * pairs:2] = MQAR_KINDS.index("key")
    kinds[:, 1:2 * pairs:2] = MQAR_KINDS.index("value")
    return kinds


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


def distance_bins(seq_len, count=5):
    """count ranges of equal width [low, high] covering distances 1 .. seq_len - 1."""
    width = -(-(seq_len - 1) // count)
    return [(low, low + width - 1) for low in range(1, seq_len, width)]


def mask_kind(model, seq_len):
    """'full' when every query keeps every key it sees (keep_window_size >= seq_len), 'sliding'
    when every A is 0 (every key ties: the latest keep_window_size keys), else 'dynamic'."""
    if model.config.keep_window_size >= seq_len:
        return "full"
    return "sliding" if all((layer.self_attn.A == 0).all() for layer in model.layers) else "dynamic"


def score_mqar(model, path, tokens, supervised, meta, cfg, autocast):
    """One run's result: accuracy over every query, by distance, with its window and mask kind."""
    settings = meta["settings"]
    right, distance = mqar_recall(model, tokens, supervised, settings["num_kv_pairs"],
                                  cfg.batch_size, autocast)
    by_distance = {f"{low}-{high}": mean(right[(distance >= low) & (distance <= high)])
                   for low, high in distance_bins(settings["seq_len"])
                   if ((distance >= low) & (distance <= high)).any()}
    return {"task": "mqar", "init_from": path, "n": len(right), "acc": float(right.mean()),
            "keep_window_size": model.config.keep_window_size,
            "mask": mask_kind(model, settings["seq_len"]), "acc_by_distance": by_distance}


def recall_groups(results):
    """Runs grouped by (mask, keep_window_size), each group's accuracies, in table order."""
    groups = {}
    for result in results:
        groups.setdefault((result["mask"], result["keep_window_size"]), []).append(result["acc"])
    order = {"full": 0, "dynamic": 1, "sliding": 2}
    return sorted(groups.items(), key=lambda item: (-item[0][1], order[item[0][0]]))


def print_recall_table(results):
    """Each run's accuracy by distance, then the runs grouped by window and mask: mean and range."""
    bins = list(results[0]["acc_by_distance"])
    log(f"{'run':<28} {'mask':<8} {'W':>5} {'queries':>8} {'acc':>7}  by distance " +
        " ".join(f"{b:>7}" for b in bins))
    for r in results:
        by_distance = " ".join(f"{r['acc_by_distance'].get(b, math.nan):>7.3f}" for b in bins)
        log(f"{r['init_from'][-28:]:<28} {r['mask']:<8} {r['keep_window_size']:>5} {r['n']:>8} "
            f"{r['acc']:>7.4f}  {'':11} {by_distance}")
    log(f"\n{'mask':<8} {'W':>5} {'runs':>5} {'mean acc':>9} {'min':>7} {'max':>7}")
    for (kind, window), accs in recall_groups(results):
        log(f"{kind:<8} {window:>5} {len(accs):>5} {mean(accs):>9.4f} {min(accs):>7.4f} "
            f"{max(accs):>7.4f}")


def pyplot():
    """matplotlib's pyplot (an optional package), drawing to files."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: pictures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=100))
    log(f"wrote {path}")


def plot_recall(results, path, seq_len):
    """Accuracy against keep_window_size, one point per run, a colour per mask kind (plain
    attention drawn at the sequence length)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, colour in (("full", "black"), ("dynamic", "tab:blue"), ("sliding", "tab:orange")):
        points = [(min(r["keep_window_size"], seq_len), r["acc"]) for r in results
                  if r["mask"] == kind]
        if points:
            ax.scatter(*zip(*points), label=kind, color=colour, alpha=0.7)
    ax.set(xlabel="keep_window_size", ylabel="recall accuracy", ylim=(-0.02, 1.02),
           title="MQAR: accuracy against the window (one point per run)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


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


def draw_mask(kept, labels, kinds, path, title):
    """A grid of pictures, a row per layer and a column per bias head: query x key, the kept
    cells filled (in the colour of the key's kind for MQAR), the ones dropped light grey."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    names = list(MQAR_KINDS) if kinds is not None else ["kept"]
    colours = ["white", "#e6e6e6"] + [MQAR_COLOURS[name] for name in names]
    layers, heads, length = len(kept), kept[0].shape[0], len(labels)
    size = max(4.0, 0.16 * length)
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
    fig.legend(handles=handles, loc="upper center", ncol=3,
               bbox_to_anchor=(0.5, 1 - 0.45 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.55 + 0.3 * legend_rows) / height))
    save_figure(fig, path)
    plt.close(fig)


def mqar_labels(tokens, meta):
    """Axis labels of an MQAR sequence: k3 for key id 3, v5 for the fifth value id, . for filler."""
    start = meta["layout"]["values"][0]
    filler = meta["layout"]["filler"][0]
    return [f"k{t}" if t < start else f"v{t - start}" if t < filler else "."
            for t in tokens.tolist()]


MASK_TOKENS = 96  # text drawn at most: wider pictures are unreadable


def run_mask(cfg, model, path, device):
    """--task=mask: the picture of what the mask keeps, for --text or an MQAR sequence
    (--data_dir, --example); for MQAR also the shares of kept keys at the query positions over the
    first --limit validation sequences (256 by default)."""
    if cfg.data_dir:
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
        if not cfg.text:
            raise SystemExit("error: --task=mask needs --text=\"...\" or MQAR data (--data_dir, "
                             "--example)")
        try:
            tokenizer = load_text_tokenizer(tokenizer_directory(path), model.config.vocab_size)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        ids = np.array(tokenizer.encode_prompt(cfg.text)[:MASK_TOKENS])
        kinds, labels = None, [token_label(tokenizer, t) for t in ids.tolist()]
        title = f"{path}: {len(ids)} tokens of --text"
    kept = kept_keys(model, torch.from_numpy(ids[None]).to(device))
    draw_mask([layer[0] for layer in kept], labels, kinds, cfg.out,
              f"{title} (keep_window_size {model.config.keep_window_size})")


def token_label(tokenizer, token):
    """A token on the mask's axes: its text as Python writes it in quotes (a newline reads \n),
    spaces as ␣, or for a special token that decodes to nothing, its role or id."""
    special = {tokenizer.eot_id: "<eot>", tokenizer.bos_id: "<bos>"}
    text = repr(tokenizer.decode([token]))[1:-1].replace(" ", "\u2423")
    return text or special.get(token, f"#{token}")


def print_mask_shares(model, tokens, supervised, meta, device):
    """The shares of kept keys of each kind at the query positions, per layer and bias head, and
    how often the queried value is kept."""
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


def run_recall(cfg, device, autocast):
    """--task=mqar: each --init_from run scored on the MQAR validation sequences, a JSON line
    each, then the table (and --plot)."""
    meta, tokens, supervised = mqar_data(cfg.data_dir or "data/mqar")
    if cfg.limit:
        tokens, supervised = tokens[:cfg.limit], supervised[:cfg.limit]
    results = []
    for init_from in run_paths(cfg.init_from):
        model, path = load_model(init_from, device)
        check_mqar_vocabulary(model, init_from, meta, cfg.data_dir or "data/mqar")
        result = score_mqar(model, init_from, tokens, supervised, meta, cfg, autocast)
        print(json.dumps(result), flush=True)
        results.append(result)
    print_recall_table(results)
    if cfg.plot:
        plot_recall(results, cfg.plot, meta["settings"]["seq_len"])
    return results


def run_paths(init_from):
    """--init_from as a list: comma-separated, each a path, a glob ('out/mqar-*') or a hub name."""
    paths = []
    for part in filter(None, init_from.split(",")):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise SystemExit(f"error: --init_from={part} matches nothing")
        paths += matches
    return paths


def main(argv=None):
    cfg = apply_config(EvalConfig(), sys.argv[1:] if argv is None else argv)
    if cfg.task in ("mqar", "mask"):
        device, autocast = device_and_autocast(cfg)
        if cfg.task == "mqar":
            return run_recall(cfg, device, autocast)
        model, path = load_model(cfg.init_from, device)
        return run_mask(cfg, model, path, device)
    tasks = [task for task in (cfg.task or cfg.tasks).split(",") if task]
    unknown = [task for task in tasks if task not in BENCHMARKS and task != "bpb"]
    if unknown or not tasks:
        raise SystemExit(f"error: unknown task {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(BENCHMARKS)}, bpb, mqar, mask")
    if "bpb" in tasks and not cfg.data:
        raise SystemExit("error: bpb needs --data=FILE: a text file or one of our .bin shards")
    device, autocast = device_and_autocast(cfg)
    model, path = load_model(cfg.init_from, device)
    log(f"loaded {cfg.init_from}: {model.num_params() / 1e6:.1f}M parameters on {device}")
    try:  # the tokenizer and every task's data first: a missing file stops it before any scoring
        tokenizer = load_text_tokenizer(tokenizer_directory(path), model.config.vocab_size)
        inputs = {task: bpb_documents(cfg.data, tokenizer, cfg.limit) if task == "bpb" else
                  read_benchmark(task, cfg.data_dir or "data/eval", cfg.limit) for task in tasks}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    results, items = [], {}
    for task in tasks:
        if task == "bpb":
            result, items[task] = score_bpb(model, tokenizer, inputs[task], cfg, autocast)
        else:
            result, items[task] = score_benchmark(model, tokenizer, task, inputs[task], cfg,
                                                  autocast)
        print(json.dumps(result), flush=True)
        results.append(result)
    print_table(results)
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps({"config": asdict(cfg), "results": results,
                                                  "items": items}))
        log(f"wrote {cfg.output}")


if __name__ == "__main__":
    main()

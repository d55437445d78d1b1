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
acc takes the best sum, acc_norm the best sum per character of the choice. train.py imports the
benchmarks to score the same tasks while training.

A progress bar per task goes to stderr, then a table; stdout gets one JSON line per task, and
--output=FILE.json also keeps every question's per-choice log-likelihoods.
"""

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

from common import atomic_write_text, autocast, device_and_dtype, log, one_line
from configurator import apply_config
from engine import load_model
from prepare_data import (found_keys, hub_offline_setting, hub_unreachable, jsonl_rows,
                          open_parquet, read_documents, read_meta, read_shard)
from tokenizer import (LOSSLESS_PROBE, document_start, load_text_tokenizer, load_tokenizer,
                       tokenizer_directory)


# ----------------------------------------------------------------------------------------------
# Benchmarks: the zero-shot multiple-choice tasks of the Doge model cards, read, prompted and
# scored as lm-evaluation-harness does it, so that eval.py's and train.py's numbers stand beside
# the cards'. First each task's row format and prompt.


@dataclass
class Question:
    contexts: list  # the text before each choice: one for all, or one per choice (Winogrande)
    choices: list  # each choice's text, scored as the continuation of its context after a space
    gold: int  # the index of the right choice


def hellaswag_text(text):
    """HellaSwag's WikiHow markers in brackets: " [title]" ends a sentence, the others go."""
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
    acc_norm: bool = True  # whether the harness reports it (Winogrande's choices are all one text)


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
    the context alone has, so a token merged across the boundary counts for the continuation. An
    empty context becomes the document-start token, so every continuation token is predicted."""
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
    end counts as it is), or text read as prepare_data.py reads its --input."""
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
    """A shard's ids mean the model's tokens only if the model's tokenizer made them: an id past
    its vocabulary, or another tokenizer recorded beside the shard (meta.json), is a ValueError."""
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
    data_dir: str = "data/eval"  # benchmarks: <task>.jsonl, .jsonl.gz or .parquet, else the hub
    data: str = ""  # bpb: a text file (.txt, .jsonl, .parquet, .gz) or one of our .bin shards
    limit: int = 0  # > 0: only the first limit questions of each task (bpb: documents)
    output: str = ""  # a .json file for every question's per-choice log-likelihoods
    batch_size: int = 32  # sequences per forward pass
    block_size: int = 0  # bpb: tokens scored per window; 0: the model's max_position_embeddings
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 elsewhere; or either one


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


def main(argv=None):
    cfg = apply_config(EvalConfig(), sys.argv[1:] if argv is None else argv)
    tasks = [task for task in (cfg.task or cfg.tasks).split(",") if task]
    unknown = [task for task in tasks if task not in BENCHMARKS and task != "bpb"]
    if unknown or not tasks:
        raise SystemExit(f"error: unknown task {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(BENCHMARKS)}, bpb (recall: recall.py)")
    if "bpb" in tasks and not cfg.data:
        raise SystemExit("error: bpb needs --data=FILE: a text file or one of our .bin shards")
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    model, path = load_model(cfg.init_from, device)  # float32 weights, products in dtype
    products = autocast(device, dtype)
    log(f"loaded {cfg.init_from}: {model.num_params() / 1e6:.1f}M parameters on {device}")
    try:  # the tokenizer and every task's data first: a missing file stops it before any scoring
        tokenizer = load_text_tokenizer(tokenizer_directory(path), model.config.vocab_size)
        inputs = {task: bpb_documents(cfg.data, tokenizer, cfg.limit) if task == "bpb" else
                  read_benchmark(task, cfg.data_dir, cfg.limit) for task in tasks}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    results, items = [], {}
    for task in tasks:
        if task == "bpb":
            result, items[task] = score_bpb(model, tokenizer, inputs[task], cfg, products)
        else:
            result, items[task] = score_benchmark(model, tokenizer, task, inputs[task], cfg,
                                                  products)
        print(json.dumps(result), flush=True)
        results.append(result)
    print_table(results)
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps({"config": asdict(cfg), "results": results,
                                                  "items": items}))
        log(f"wrote {cfg.output}")


if __name__ == "__main__":
    main()

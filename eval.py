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
acc takes the best sum, acc_norm the best sum per character of the choice (prepare_data.py's
Benchmarks section says exactly how prompts are made and split into tokens).

A table goes to stderr as it goes; stdout gets one JSON line per task, {"task", "n", "acc",
"acc_norm"} ({"task": "bpb", "bpb", ...} for bits per byte), and --output=FILE.json also keeps
every question's per-choice log-likelihoods.
"""

import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from configurator import apply_config
from doge import Doge, atomic_write_text, local_model_path
from prepare_data import (BENCHMARKS, benchmark_requests, bpb_documents, document_start, grade,
                          load_text_tokenizer, read_benchmark, tokenizer_directory)


@dataclass
class EvalConfig:
    init_from: str = "out/doge-tiny"  # an out_dir (its newest checkpoint), a ckpt_*.pt file, or
    # a Hugging Face Doge directory (either layout) or hub name; its tokenizer beside the weights
    tasks: str = ",".join(BENCHMARKS)  # comma-separated benchmark names, and/or bpb
    task: str = ""  # one task, instead of tasks (--task=bpb --data=FILE)
    data_dir: str = "data/eval"  # <task>.jsonl, .jsonl.gz or .parquet; missing: from the hub
    data: str = ""  # bpb: a text file (.txt, .jsonl, .parquet, .gz) or one of our .bin shards
    limit: int = 0  # > 0: only the first limit questions of each task (bpb: documents)
    output: str = ""  # a .json file for every question's per-choice log-likelihoods
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
# Benchmarks and bits per byte

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
    log(f"{'task':<16} {'n':>7} {'acc':>8} {'acc_norm':>9}")
    for result in results:
        if result["task"] == "bpb":
            log(f"{'bpb':<16} {result['bytes']:>7} {result['bpb']:>8.4f}   (bits per byte; bytes)")
        else:
            norm = f"{result['acc_norm']:.4f}" if result["acc_norm"] is not None else "-"
            log(f"{result['task']:<16} {result['n']:>7} {result['acc']:>8.4f} {norm:>9}")


def main(argv=None):
    cfg = apply_config(EvalConfig(), sys.argv[1:] if argv is None else argv)
    tasks = [task for task in (cfg.task or cfg.tasks).split(",") if task]
    unknown = [task for task in tasks if task not in BENCHMARKS and task != "bpb"]
    if unknown or not tasks:
        raise SystemExit(f"error: unknown task {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(BENCHMARKS)}, bpb")
    if "bpb" in tasks and not cfg.data:
        raise SystemExit("error: bpb needs --data=FILE: a text file or one of our .bin shards")
    device, autocast = device_and_autocast(cfg)
    model, path = load_model(cfg.init_from, device)
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

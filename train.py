"""
Train a Doge: on a CPU, on one GPU, or on several with DDP; pretraining or instruction tuning.

    python train.py config/doge_tiny.py                  # a few minutes on a laptop CPU
    python train.py config/doge_20m.py                   # the Doge-20M recipe on one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/doge_20m.py
    python train.py config/doge_20m.py --init_from=resume          # continue the newest
    python train.py config/doge_20m.py --init_from=resume \\
        --resume_ckpt=out/doge-20m/ckpt_004000.pt --max_iters=4800 --out_dir=out/doge-20m-d4k
                                                                # branch a WSD decay at step 4000
    python train.py config/sft_doge_tiny.py              # SFT: conversation shards in data_dir

Settings: TrainConfig's fields and every DogeConfig field, flat (--hidden_size=128), from a config
file, then --key=value overrides (configurator.py). The data arrives prepared by prepare_data.py: a
token stream (pretraining) or conversations (its --chat, for fine-tuning). train() reads in phases:
set-up, the model, the data, what the run writes (README.md lists out_dir's files), loop, end.
"""

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import engine
from common import (atomic_write, atomic_write_text, autocast, busy_machine_note,
                    device_and_dtype, one_line, pyplot, remove_temporary_files, save_figure)
from configurator import apply_config
from doge import (PRESETS, Doge, DogeConfig, grow_vocabulary, hold_mask_bias_at_zero,
                  latest_checkpoint, list_checkpoints, newest_checkpoint, read_checkpoint,
                  upcycle_to_moe)
from eval import BENCHMARKS, benchmark_requests, grade, read_benchmark
from prepare_data import (DEFAULT_DATA_DIR, ConversationLoader, ShardLoader, ensure_prepared,
                          padded_length, read_meta)
from tokenizer import TOKENIZER_FILES, copy_tokenizer_files, load_text_tokenizer

# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoints, log.jsonl, loss.png and the record of each launch
    data_dir: str = DEFAULT_DATA_DIR  # shards (text, or conversations: SFT) and meta.json
    init_from: str = "scratch"  # 'scratch', 'resume', a ckpt_*.pt, a Hugging Face dir or hub name
    resume_ckpt: str | None = None  # with init_from='resume': this checkpoint, not out_dir's newest
    overwrite: bool = False  # a new run (not 'resume') may delete the checkpoints in out_dir
    # model: a preset, then any DogeConfig field given flat (--hidden_size=128) overrides it
    model: str | None = "doge-20m"  # a name from doge.PRESETS; None: DogeConfig's own defaults
    upcycle_experts: int = 0  # > 0: make the loaded dense model a CDMoE with this many experts
    upcycle_experts_per_tok: int = 8  # experts each token uses in the upcycled CDMoE
    dynamic_mask: bool = True  # False: every A held at 0, out of the optimizer: every key's bias
    # is 1, all tie, and the tie rule keeps the latest W: a sliding window (DMAttn's baseline)
    # batch: gradient accumulation = total_batch_size / (batch_size * block_size * processes)
    batch_size: int = 16  # micro-batch: sequences per forward pass on each process
    block_size: int = 2048  # tokens per sequence
    total_batch_size: int = 524288  # tokens per optimizer step, all micro-steps and processes
    # AdamW and the warmup-stable-decay (WSD) schedule
    max_iters: int = 8000  # optimizer steps in the whole run
    learning_rate: float = 8e-3  # the stable-phase (peak) learning rate
    warmup_iters: int = 800  # linear warmup over the first warmup_iters steps
    decay_iters: int = 800  # linear decay over the last decay_iters steps before max_iters
    min_lr_ratio: float = 0.0  # the decay ends at min_lr_ratio * learning_rate
    weight_decay: float = 0.01  # on matrices and embeddings; never on norms, residuals, A, biases
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # evaluate every this many steps (and at 0 and the end); 0: end only
    eval_iters: int = 20  # validation micro-batches per process in each evaluation
    eval_tasks: str = ""  # benchmarks (eval.BENCHMARKS) scored at each evaluation too,
    # comma-separated (hellaswag,piqa,...; the data's tokenizer), logged as hellaswag_acc, ...
    eval_data_dir: str = "data/eval"  # rows: <task>.jsonl, .jsonl.gz or .parquet, else the hub
    eval_tasks_limit: int = 500  # the first this many questions of each task; 0: all of them
    log_interval: int = 10  # a log line every this many steps (and at the end)
    save_interval: int = 1000  # a checkpoint every this many steps (and at the end); 0: end only
    sft_epochs: float = 0.0  # conversation data: > 0 makes max_iters this many passes over it
    wandb_log: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "doge"
    wandb_run_name: str = "doge"
    # system
    device: str = "auto"  # 'auto': cuda if there is one, else cpu; or 'cpu', 'cuda', 'cuda:1'
    dtype: str = "auto"  # 'auto': bfloat16 autocast where supported, else float32; or either one
    compile: bool | str = "auto"  # torch.compile the model; 'auto': on for CUDA, off elsewhere
    seed: int = 1337
    peak_flops: float = 0.0  # one device's peak FLOP/s for MFU; 0: a table of GPUs, a CPU estimate


# Every DogeConfig field as a setting too, whose default None means "the preset's value"
ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides", [(f.name, f.type | None, None) for f in dataclasses.fields(DogeConfig)])


def need(ok, message):
    """Settings or data that cannot work end the run with one line naming the problem."""
    if not ok:
        raise SystemExit(f"error: {message}")


@contextlib.contextmanager
def refused(prefix=""):
    """The data side's ValueErrors (a damaged shard, data unfit for the model) in one line."""
    try:
        yield
    except ValueError as e:
        raise SystemExit(f"error: {prefix}{e}") from None


def check_config(cfg):
    """Refuse settings that cannot work, with one line each."""
    need(cfg.init_from != "", "init_from is empty: give 'scratch', 'resume' or a path")
    need(cfg.dtype in ("auto", "bfloat16", "float32"),
         f"dtype {cfg.dtype!r} is not 'auto', 'bfloat16' or 'float32'")
    need(cfg.compile in (True, False, "auto"),
         f"compile {cfg.compile!r} is not True, False or 'auto'")
    for key in ("batch_size", "block_size", "total_batch_size", "eval_iters", "log_interval"):
        need(getattr(cfg, key) >= 1, f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_iters", "warmup_iters", "decay_iters", "eval_interval", "save_interval",
                "upcycle_experts", "eval_tasks_limit", "sft_epochs"):
        need(getattr(cfg, key) >= 0, f"{key} must not be negative, got {getattr(cfg, key)}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(cfg.resume_ckpt is None or cfg.init_from == "resume",
         "resume_ckpt needs init_from='resume' (to start from a checkpoint's weights alone, give "
         "it as init_from=PATH)")
    if cfg.wandb_log:  # on every process, before any of them waits for the others
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("error: wandb_log=True needs wandb: pip install wandb") from None


# ----------------------------------------------------------------------------------------------
# Learning rate and optimizer


def wsd_lr(step, cfg):
    """Learning rate of optimizer step `step` (0-based), warmup-stable-decay: linear warmup to
    learning_rate over the first warmup_iters steps (step 0 takes learning_rate / warmup_iters),
    constant, then linear decay over the last decay_iters steps before max_iters: learning_rate at
    step max_iters - decay_iters, min_lr_ratio * learning_rate at max_iters (a decay longer than the
    run starts at step 0; where warmup and decay overlap, the lower rate wins). A pure function of
    the step and the settings: a resumed run follows the same schedule, one resumed with new
    max_iters/decay_iters branches a decay."""
    multiplier = 1.0
    if step < cfg.warmup_iters:
        multiplier = (step + 1) / cfg.warmup_iters
    decay_iters = min(cfg.decay_iters, cfg.max_iters)
    if decay_iters > 0 and step >= cfg.max_iters - decay_iters:
        left = max(cfg.max_iters - step, 0) / decay_iters  # 1 where the decay starts, 0 at the end
        multiplier = min(multiplier, cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * left)
    return cfg.learning_rate * multiplier


def configure_optimizer(model, cfg, device_type):
    """AdamW, fused on CUDA, with weight decay on the matrices and embeddings (2 or more dims)
    and none on vectors: RMSNorm weights, residual scales, A, biases (a tied weight counts once)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps, fused=device_type == "cuda")


# ----------------------------------------------------------------------------------------------
# Data and evaluation: prepared shards in, batches on the device; val loss and benchmarks


def open_loaders(cfg, chat, vocab_size, run):
    """The training and validation loaders of data_dir: conversations (chat), or a token stream.
    Conversations come in compile-friendly lengths when the model is compiled."""
    loader = ConversationLoader if chat else ShardLoader
    options = {"bucket": run.compile} if chat else {}
    with refused():
        loaders = [loader(cfg.data_dir, split, cfg.batch_size, cfg.block_size, run.rank,
                          run.world_size, vocab_size, cfg.seed, **options)
                   for split in ("train", "val")]
    if chat:
        for name, data in zip(("train", "val"), loaders):
            run.say(f"{name}: {len(data):,} conversations, {data.cut:,} cut at block_size "
                    f"{cfg.block_size}, {data.dropped:,} dropped (no answer within it)")
    return loaders


def read_batch(loader, micro_steps, device):
    """loader.next_batch(micro_steps) as lists of tensors on their way to the device: on CUDA
    through pinned memory, without waiting for the copy (the host reads on meanwhile)."""
    with refused():
        x, y = loader.next_batch(micro_steps)
    tensors = [[torch.from_numpy(np.ascontiguousarray(t)) for t in batch] for batch in (x, y)]
    if device.type == "cuda":
        return [[t.pin_memory().to(device, non_blocking=True) for t in ts] for ts in tensors]
    return [[t.to(device) for t in ts] for ts in tensors]


def fetch(loader, run):
    """The next step: x and y (its micro-batches, on their way to the device), the weights, and the
    tokens read (all processes, padding left out). A micro-step's mean loss is multiplied by its
    weight before backward: its supervised targets (not -1) over those of the whole step, all
    micro-steps and processes, times world_size (DDP averages gradients over processes). The step's
    gradient is then that of the mean loss over every supervised target of the step, however they
    fall into micro-batches (1 / grad_accum each in pretraining, where every target counts)."""
    x, y = read_batch(loader, run.grad_accum, run.device)
    counts = torch.stack([(targets != -1).sum() for targets in y]).float()  # (micro_steps,)
    total = counts.sum()
    if run.ddp:  # every process's targets count (a scalar, on the device)
        dist.all_reduce(total)
    return x, y, counts * run.world_size / total.clamp(min=1), loader.step_tokens


SUPERVISED_CHUNK = 4096  # targets whose logits are made at once in supervised_scores


def supervised_scores(model, x, y):
    """One micro-batch's summed cross-entropy, right guesses (top token = target) and count of its
    supervised targets (not -1), from those targets' logits alone, a few thousand at a time."""
    hidden, targets = model.hidden_states(x)[y != -1], y[y != -1]  # (N, D), (N,)
    nats, right = torch.zeros((), device=y.device), torch.zeros((), device=y.device)
    for h, t in zip(hidden.split(SUPERVISED_CHUNK), targets.split(SUPERVISED_CHUNK)):
        logits = model.lm_head(h).float()  # (n, V)
        nats += F.cross_entropy(logits, t, reduction="sum")
        right += (logits.argmax(dim=-1) == t).sum()
    return torch.stack([nats, right.float(), torch.tensor(float(len(targets)), device=y.device)])


def evaluator(cfg, model, eval_model, val_loader, run, chat):
    """A function that evaluates: {"val_loss", "val_acc" (conversations), "hellaswag_acc",
    "hellaswag_acc_norm", ...}. val_loss is the mean per supervised target over eval_iters
    micro-batches on every process, read from the start of the split each time so that evaluations
    compare; val_acc the share of those targets that the most likely token gets right. eval_tasks
    are made ready once, here; each process scores every world_size-th question, and the counts
    are all-reduced: the numbers one process would get."""
    names = [task for task in cfg.eval_tasks.split(",") if task]
    tasks = {}
    with refused("eval_tasks: "):
        tokenizer = load_text_tokenizer(cfg.data_dir, model.config.vocab_size) if names else None
        for task in names:
            questions = read_benchmark(task, cfg.eval_data_dir, cfg.eval_tasks_limit)
            questions = questions[run.rank::run.world_size]
            tasks[task] = questions, benchmark_requests(tokenizer, questions)

    @torch.no_grad()
    def evaluation():
        model.eval()
        val_loader.reset()
        sums = torch.zeros(3, device=run.device)  # summed loss, right guesses (chat), targets
        for _ in range(cfg.eval_iters):
            (x,), (y,) = read_batch(val_loader, 1, run.device)
            with run.autocast:
                if chat:
                    sums += supervised_scores(model, x, y)
                else:
                    _, loss = eval_model(x, y, keep_logits=False)
                    targets = (y != -1).sum().float()
                    sums += torch.stack([loss.float() * targets, torch.zeros_like(targets),
                                         targets])
        if run.ddp:
            dist.all_reduce(sums)
        nats, right, targets = sums.tolist()
        scores = {"val_loss": nats / max(targets, 1)}
        if chat:
            scores["val_acc"] = right / max(targets, 1)
        for task, (questions, requests) in tasks.items():
            with run.autocast:
                grades = grade(questions, model.loglikelihoods(requests, cfg.batch_size))
            counts = torch.tensor([len(grades), sum(a for a, _ in grades),
                                   sum(a for _, a in grades)], dtype=torch.float64,
                                  device=run.device)
            if run.ddp:
                dist.all_reduce(counts)
            total, right, right_norm = counts.tolist()
            scores[f"{task}_acc"] = right / total
            if BENCHMARKS[task].acc_norm:
                scores[f"{task}_acc_norm"] = right_norm / total
        model.train()
        return scores
    return evaluation


# ----------------------------------------------------------------------------------------------
# Checkpoints, and stopping: a diverged run, Ctrl-C


def rng_state():
    """Every RNG state as plain Python values (lists of ints), which gather between processes and
    load with torch.load(weights_only=True)."""
    name, keys, *rest = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() \
        else None
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), *rest),
            "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(path, model, optimizer, step, cfg, data_position, run, **extra):
    """Write ckpt (on the master process), atomically. Called by every process: the RNG states
    of all of them are gathered so that a resume restores each one."""
    rng = [rng_state()]
    if run.ddp:
        rng = [None] * run.world_size
        dist.all_gather_object(rng, rng_state())
    if not run.master:
        return
    checkpoint = {"model": model.state_dict(),  # the plain module: no DDP, no torch.compile
                  "model_config": asdict(model.config), "optimizer": optimizer.state_dict(),
                  "step": step, "train_config": asdict(cfg), "data_position": data_position,
                  "rng": rng, **extra}
    try:
        atomic_write(path, lambda temp: torch.save(checkpoint, temp))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
        raise SystemExit(f"error: saving step {step} to {path} failed: {reason}; {free / 1e6:,.0f} "
                         f"MB free there; the earlier checkpoints are intact") from None


def stop_if_diverged(step, cfg, **values):
    """A run whose loss, gradient norm or weights became nan or inf stops with one line naming the
    step, the value, the newest checkpoint (all have finite weights) and what to try."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if not bad:
        return
    newest = latest_checkpoint(cfg.out_dir)
    where = (f"the newest checkpoint, {newest}, has finite weights (resume from it with "
             f"init_from=resume and a new schedule)") if newest else "no checkpoint was saved yet"
    what = ", ".join(f"{name.replace('_', ' ')} is {value}" for name, value in bad.items())
    raise SystemExit(
        f"error: the run diverged at step {step}: {what}; {where}; try a lower learning_rate "
        f"(now {cfg.learning_rate:g}), or grad_clip (now {cfg.grad_clip:g}), or a longer "
        f"warmup_iters (now {cfg.warmup_iters})")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and save a
    checkpoint; a second one interrupts at once. Under DDP every process learns of it at the same
    step (a tiny all-reduce on a CPU group), so they all save and stop together."""

    def __init__(self, run):
        self.run, self.requested, self.group, self.previous = run, False, None, {}
        if run.ddp:  # NCCL would need a GPU tensor and a sync; a gloo group keeps it on the host
            self.group = dist.group.WORLD if run.backend == "gloo" else dist.new_group(
                backend="gloo")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.run.say("\nstopping after this step with a checkpoint (again to quit at once)")

    def __call__(self):
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# Reporting: MFU, the log, loss.png, the record of each launch


# Dense bfloat16 tensor-core peaks (FLOP/s, FP32 accumulate) from the vendors' data sheets; the
# most specific name first. float32 runs (TF32) count half of it. Other GPUs: give peak_flops.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                  "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165.2e12,
                  "RTX 4080": 97.5e12, "RTX 3090": 71e12, "RTX 6000 Ada": 364e12,
                  "RTX A6000": 155e12}


def peak_flops(device_type, dtype):
    """One device's peak FLOP/s for MFU: GPU_PEAK_FLOPS (0 for a GPU not in it: no MFU), or for a
    CPU a rough float32 peak, threads x clock x FLOPs per cycle (two FMA pipes of 8 floats with
    AVX2, and of 16 with AVX-512 on Intel; AMD Zen 4 runs AVX-512 at AVX2 width)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        flops = next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), 0.0)
        return flops if dtype == torch.bfloat16 else flops / 2
    threads = torch.get_num_threads()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        clock = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", info).group(1)) * 1e6
        flags = re.search(r"flags\s*:(.*)", info).group(1).split()
    except (OSError, AttributeError, ValueError):
        return threads * 3.0e9 * 32
    wide = "GenuineIntel" in info and "avx512f" in flags
    return threads * clock * (64 if wide else 32 if "fma" in flags else 16)


def warn_if_slow(cfg, run, seconds_at_peak):
    """A recipe meant for a GPU, started on a CPU, says how long it will take (at half the
    CPU's rough peak, about what small models reach there) and where a CPU run starts."""
    seconds = 2 * seconds_at_peak
    if run.device.type == "cpu" and seconds > 60:
        run.say(f"warning: a recipe for a GPU: on this CPU a step ({cfg.total_batch_size:,} tokens)"
                f" takes about {tqdm.format_interval(seconds)}, the run's {cfg.max_iters:,} steps "
                f"{seconds * cfg.max_iters / 86400:,.0f} days; config/doge_tiny.py is made for a "
                f"CPU (going on)")


LINE_FORMATS = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "norm {:.2f}"),
                ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"), ("eta", "ETA {}"),
                ("val_loss", "val loss {:.4f}"))  # a log line's parts, in order


class RunLog:
    """Where a run reports: stdout lines (through the tqdm bar when stderr is a terminal), and on
    the master log.jsonl, loss.png and Weights & Biases (wandb_log)."""

    def __init__(self, cfg, run, start_step, wandb_config):
        self.cfg, self.master, self.say = cfg, run.master, run.say
        self.wandb = self.progress = None
        self.best_tokens_per_sec, self.said_slow = 0.0, False  # see watch_throughput
        if not self.master:
            return
        self.file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")
        if cfg.wandb_log:
            import wandb
            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=wandb_config)
        if sys.stderr.isatty():
            self.progress = tqdm(total=cfg.max_iters, initial=start_step, unit="step",
                                 dynamic_ncols=True)

    def write(self, record, eta=None):
        """The record in the log, and as one line on stdout: step | loss | lr | norm | tok/s |
        MFU | ETA | val loss | benchmark scores, whichever it holds."""
        if not self.master:
            return
        values = {**record, "eta": eta}
        parts = [f"step {record['step']:6d}/{self.cfg.max_iters}"]
        parts += [form.format(values[key]) for key, form in LINE_FORMATS
                  if values.get(key) is not None]
        parts += [f"{key} {value:.3f}" for key, value in record.items() if "_acc" in key]
        (self.progress.write if self.progress is not None else print)(" | ".join(parts))
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])
        if "val_loss" in record and record["step"] > 0:  # a curve once training has begun
            plot_losses(os.path.join(self.cfg.out_dir, "loss.png"), self.file.name)
        if record.get("tokens_per_sec"):
            self.watch_throughput(record["tokens_per_sec"])

    def watch_throughput(self, tokens_per_sec):
        """One line when throughput falls under half of this run's best so far on this machine,
        with the load when the CPU is busy; said once until throughput recovers."""
        slow = tokens_per_sec < self.best_tokens_per_sec / 2
        if slow and not self.said_slow:
            busy = busy_machine_note()
            self.say(f"note: {tokens_per_sec:,.0f} tokens/s, under half of this run's best "
                     f"({self.best_tokens_per_sec:,.0f})" + (f"; {busy.removeprefix('note: ')}"
                                                              if busy else ""))
        self.said_slow = slow
        self.best_tokens_per_sec = max(self.best_tokens_per_sec, tokens_per_sec)

    def step_done(self, loss=None):
        if self.progress is not None:
            self.progress.update(1)
            if loss is not None:
                self.progress.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self):
        if self.progress is not None:
            self.progress.close()
        if self.master:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def plot_losses(path, log_path):
    """loss.png: train and val loss against tokens from log.jsonl, if matplotlib is installed."""
    plt = pyplot(required=False)
    if plt is None:
        return
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "val")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set(xlabel="tokens", ylabel="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# the code a run imports, kept in its record
SOURCE_FILES = ("train.py", "doge.py", "common.py", "configurator.py", "prepare_data.py",
                "tokenizer.py", "eval.py", "engine.py")


def write_run_record(cfg, model_config, argv, world_size, device, meta):
    """out_dir/runs/<time>.json: settings, the data's source (meta.json's, for the export's model
    card), versions and this code, so a result can be redone."""
    here = Path(__file__).resolve().parent
    source = {name: (here / name).read_text() for name in SOURCE_FILES}
    record = {"argv": argv, "train_config": asdict(cfg), "model_config": asdict(model_config),
              "data": {"source": meta.get("source"), "kind": meta.get("kind", "tokens")},
              "world_size": world_size, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "numpy": np.__version__, "cuda": torch.version.cuda,
                           "platform": platform.platform()},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "source": source}
    os.makedirs(os.path.join(cfg.out_dir, "runs"), exist_ok=True)
    name = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}.json"
    atomic_write_text(os.path.join(cfg.out_dir, "runs", name), json.dumps(record, indent=1))


# ----------------------------------------------------------------------------------------------
# The run, in phases: set-up, the model, the data, what it writes, the loop (train), the end


@dataclass
class Run:
    """What the set-up decided: processes, device, precision, compilation, accumulation."""
    ddp: bool
    rank: int
    world_size: int
    device: torch.device
    backend: str
    dtype: torch.dtype
    compile: bool
    grad_accum: int

    @property
    def master(self):
        return self.rank == 0

    @property
    def autocast(self):
        return autocast(self.device, self.dtype)

    def say(self, message):
        """Progress and diagnostics (stderr), from the master process."""
        if self.master:
            print(message, file=sys.stderr, flush=True)


def set_up(cfg):
    """DDP when launched by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE; NCCL on GPUs, gloo on
    CPUs), the device, the precision, and the gradient accumulation the batch sizes give."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    if ddp and device.type == "cuda" and device.index is None:  # each process its own GPU
        device = torch.device("cuda", local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if ddp:
        dist.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    tokens_per_micro_step = cfg.batch_size * cfg.block_size * world_size
    need(cfg.total_batch_size % tokens_per_micro_step == 0,
         f"total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * block_size "
         f"* processes = {cfg.batch_size} * {cfg.block_size} * {world_size} = "
         f"{tokens_per_micro_step}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_compile = device.type == "cuda" if cfg.compile == "auto" else cfg.compile
    return Run(ddp, rank, world_size, device, backend, dtype, use_compile,
               cfg.total_batch_size // tokens_per_micro_step)


def earlier_run(out_dir):
    """The files of an earlier run in out_dir: its checkpoints, and its log.jsonl if that holds a
    trained step (a log of step 0 alone is a run that stopped before it began: out_dir is empty)."""
    log_path = os.path.join(out_dir, "log.jsonl")
    return list(list_checkpoints(out_dir).values()) + ([log_path] if logged_steps(log_path) else [])


def logged_steps(log_path):
    """How many trained steps log.jsonl records (0 without the file)."""
    if not os.path.isfile(log_path):
        return 0
    with open(log_path) as f:
        return sum('"loss"' in line for line in f)


def clear_out_dir(cfg, run, start_step):
    """out_dir made ready, everything checked: a new run deletes an earlier one (overwrite) or a
    log that holds no step; a resumed run forgets what was logged after its checkpoint."""
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if run.ddp:
        dist.barrier()  # every process has looked before the master deletes
    if not run.master:
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.init_from == "resume" and os.path.isfile(log_path):
        with open(log_path) as f:
            kept = [line for line in f if line.endswith("\n")  # not one cut short by a crash
                    and json.loads(line)["step"] <= start_step]
        atomic_write_text(log_path, "".join(kept))
    elif cfg.init_from != "resume":
        earlier = earlier_run(cfg.out_dir)
        stale = [log_path] if os.path.isfile(log_path) and log_path not in earlier else []
        for path in earlier + stale:
            os.remove(path)
        if earlier:
            run.say(f"overwrite: deleted the earlier run in {cfg.out_dir} ({len(earlier)} files)")


def clean_temporary_files(cfg, run):
    """What a crash in mid-write left in out_dir (checkpoints, the log, the export): deleted."""
    directories = [cfg.out_dir] + [os.path.join(cfg.out_dir, name) for name in ("runs", "hf")]
    count, size = map(sum, zip(*(remove_temporary_files(path) for path in directories)))
    if count:
        run.say(f"removed {count} temporary file(s) ({size / 1e6:,.1f} MB) that an interrupted "
                f"write left in {cfg.out_dir}")


def build_model(config_dict, overrides, state=None, source=""):
    """A Doge from a config dict plus overrides, with the given weights if any."""
    try:
        model = Doge(DogeConfig(**{**config_dict, **overrides}))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: model settings: {e}") from None
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise SystemExit(f"error: the weights of {source} do not fit the model settings: "
                             f"{lines[1] if len(lines) > 1 else lines[0]}") from None
    return model


def load_model(cfg, overrides, meta, run):
    """(model, checkpoint or None): from scratch, resumed or from saved weights, made to fit the
    data (upcycled to a CDMoE if asked, its vocabulary grown by the chat data's added tokens)."""
    chat = meta.get("kind") == "conversations"
    torch.manual_seed(cfg.seed)
    checkpoint = None
    if cfg.init_from == "scratch":  # conversations in a model's tokenizer are there to tune it
        need(not (chat and meta.get("tokenizer")), f"{cfg.data_dir} holds conversations, to "
             f"fine-tune a trained model: give init_from=PATH (one of our checkpoints or "
             f"out_dirs, or a Hugging Face Doge directory), or 'resume'")
        need(cfg.model is None or cfg.model in PRESETS, f"unknown model preset {cfg.model!r}; "
             f"choose one of {', '.join(sorted(PRESETS))}, or model=None")
        config = dict(PRESETS[cfg.model]) if cfg.model else {}
        of_data = {"vocab_size": meta.get("vocab_size"), "bos_token_id": meta.get("bos_id"),
                   "eos_token_id": meta.get("eos_id")}
        config.update({k: v for k, v in of_data.items() if v is not None and k not in overrides})
        model = build_model(config, overrides)  # the data's tokenizer decides, unless overridden
    elif cfg.init_from == "resume":
        path = cfg.resume_ckpt
        with refused("resume_ckpt: "):
            checkpoint = path and read_checkpoint(path)
        if not path:  # the newest that can be read: damaged ones are set aside
            with refused():
                path, checkpoint = newest_checkpoint(cfg.out_dir, run.say, set_aside=True)
        need(path is not None, f"no checkpoint to resume in {cfg.out_dir}; " + (
            "its log.jsonl is of a run that saved none: start again with overwrite=True"
            if logged_steps(os.path.join(cfg.out_dir, "log.jsonl")) else
            "start with init_from='scratch' or give resume_ckpt=PATH"))
        model = build_model(checkpoint["model_config"], overrides, checkpoint["model"], path)
        run.say(f"resuming from {path} at step {checkpoint['step']}")
    else:  # weights only: a Hugging Face Doge directory or hub name, an out_dir, a checkpoint
        loaded, path = engine.load_model(cfg.init_from, setting="init_from is not 'scratch' or "
                                                         "'resume', and ")
        model = build_model(asdict(loaded.config), overrides, loaded.state_dict(), path) \
            if overrides else loaded
        run.say(f"initialised from the weights of {path}")
    if cfg.upcycle_experts and not model.config.is_moe:
        need(checkpoint is None, "upcycling makes new parameters, so it cannot resume an "
             "optimizer: give the dense checkpoint as init_from=PATH instead")
        model = upcycle_to_moe(model, cfg.upcycle_experts, cfg.upcycle_experts_per_tok)
        run.say(f"upcycled to a CDMoE with {cfg.upcycle_experts} experts, "
                f"{cfg.upcycle_experts_per_tok} per token")
    if chat and checkpoint is None and meta.get("added_tokens"):  # a resumed one has them already
        model = grow_vocabulary(model, meta["vocab_size"], list(meta["added_tokens"].values()))
        run.say(f"added {', '.join(meta['added_tokens'])} to the vocabulary: vocab_size "
                f"{model.config.vocab_size}")
    if chat and "eos_ids" in meta:  # what the chat tokenizer begins and ends with (the export)
        model.config.bos_token_id, model.config.eos_token_id = meta["bos_id"], meta["eos_ids"]
    if not cfg.dynamic_mask:  # configure_optimizer leaves the frozen A out
        hold_mask_bias_at_zero(model)
    need(meta.get("vocab_size", 0) <= model.config.vocab_size, f"the data's vocabulary "
         f"({meta.get('vocab_size')} tokens, {cfg.data_dir}/meta.json) does not fit the model's "
         f"vocab_size {model.config.vocab_size}")
    return model, checkpoint


def compiled(model, cfg):
    """torch.compile'd, one graph per input shape: conversations come in the few padded lengths
    of padded_length(bucket=True), each compiled once in training and once in evaluation."""
    lengths = {padded_length(n, cfg.block_size, bucket=True) for n in range(1, cfg.block_size + 1)}
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 2 * len(lengths) + 2))
    return torch.compile(model, dynamic=False)


def restore(cfg, run, checkpoint, optimizer, train_loader):
    """Resuming: the optimizer and the data position as they were (the log is cut back in
    clear_out_dir, the RNG states come back in seed_processes); refused where the checkpoint and
    these settings do not belong together. Returns the step and the tokens trained on."""
    start_step, before = checkpoint["step"], checkpoint["train_config"]
    need(start_step <= cfg.max_iters,
         f"the checkpoint is at step {start_step}, past max_iters {cfg.max_iters}")
    need(before.get("dynamic_mask", True) == cfg.dynamic_mask, f"the checkpoint was trained "
         f"with dynamic_mask={before.get('dynamic_mask', True)}: resume with the same (the "
         f"optimizer holds A or not)")
    need(set(checkpoint["data_position"]) == set(train_loader.state_dict()),
         f"the checkpoint was made reading other data than {cfg.data_dir} (conversations and a "
         f"token stream do not mix; to fine-tune a pretrained model, give its checkpoint as "
         f"init_from=PATH)")
    optimizer.load_state_dict(checkpoint["optimizer"])
    with refused():
        train_loader.load_state_dict(checkpoint["data_position"])
    schedule = ("max_iters", "decay_iters", "min_lr_ratio", "learning_rate", "warmup_iters")
    changed = {k: (before.get(k), getattr(cfg, k)) for k in schedule
               if before.get(k) != getattr(cfg, k)}
    if changed:
        run.say("branching: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        need(max(list_checkpoints(cfg.out_dir), default=0) <= start_step, f"{cfg.out_dir} holds "
             f"checkpoints after step {start_step} from the other schedule; branch into a new "
             f"out_dir")
    return start_step, checkpoint.get("tokens", start_step * cfg.total_batch_size)


def seed_processes(cfg, run, checkpoint):
    """Every RNG as the checkpoint left it on this process, or freshly seeded: dropout differs
    between processes."""
    if checkpoint is None:
        torch.manual_seed(cfg.seed + run.rank)
    elif len(checkpoint["rng"]) == run.world_size:
        set_rng_state(checkpoint["rng"][run.rank])
    else:
        run.say(f"note: the checkpoint has the RNG states of {len(checkpoint['rng'])} processes, "
                f"this run {run.world_size}: reseeding instead")
        torch.manual_seed(cfg.seed + checkpoint["step"] + run.rank)


def main(argv=None):
    """The settings, then the run. Ctrl-C before the loop (or twice within it) ends with one line
    saying what out_dir holds: nothing of this run before its first step."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, model_settings = apply_config([TrainConfig(), ModelOverrides()], argv)
    check_config(cfg)
    try:
        train(cfg, {k: v for k, v in asdict(model_settings).items() if v is not None}, argv)
    except KeyboardInterrupt:
        newest = latest_checkpoint(cfg.out_dir)
        if int(os.environ.get("RANK", 0)) == 0:
            print("\ninterrupted: " + (f"the newest checkpoint is {newest} (init_from=resume "
                  f"continues from it)" if newest else f"no checkpoint in {cfg.out_dir}, nothing "
                  f"to resume"), file=sys.stderr)
        raise SystemExit(130) from None


def train(cfg, overrides, argv):
    # ---- set-up: processes and devices, out_dir checked, the data's description
    run = set_up(cfg)
    if busy := busy_machine_note():
        run.say(busy)
    # a new run never mixes with an earlier one; overwrite deletes it once ready (clear_out_dir)
    need(cfg.init_from == "resume" or cfg.overwrite or not earlier_run(cfg.out_dir),
         f"{cfg.out_dir} already holds a run (checkpoints or log.jsonl): continue it with "
         f"init_from='resume', choose another out_dir, or give overwrite=True to delete it")
    if run.master:
        clean_temporary_files(cfg, run)
    with refused():  # the default corpus is made if it is missing (by the master; others wait)
        ensure_prepared(cfg.data_dir, prepare_default=run.master)
        if run.ddp:
            dist.barrier()
        meta = read_meta(cfg.data_dir) or {}
    chat = meta.get("kind") == "conversations"  # conversation shards: supervised fine-tuning

    # ---- the model and its optimizer; compiled, and wrapped for DDP
    raw_model, checkpoint = load_model(cfg, overrides, meta, run)  # raw: what is saved
    raw_model.to(run.device)
    optimizer = configure_optimizer(raw_model, cfg, run.device.type)
    model = eval_model = compiled(raw_model, cfg) if run.compile else raw_model
    if run.ddp:
        model = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    flops = raw_model.flops_per_token(cfg.block_size)
    peak = (cfg.peak_flops or peak_flops(run.device.type, run.dtype)) * run.world_size
    run.say(f"{raw_model.num_params() / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs per token "
            f"| {run.world_size} process(es) on {run.device.type}, "
            f"{str(run.dtype).removeprefix('torch.')}, compile {run.compile} | {run.grad_accum} "
            f"micro-steps of {cfg.batch_size} x {cfg.block_size} per step "
            f"({cfg.total_batch_size} tokens)")
    warn_if_slow(cfg, run, flops * cfg.total_batch_size / peak if peak else 0.0)

    # ---- the data: loaders, the step count in epochs, resuming (optimizer, data), evaluation;
    # the first batch and the loss before any training
    train_loader, val_loader = open_loaders(cfg, chat, raw_model.config.vocab_size, run)
    need(not cfg.sft_epochs or chat, f"sft_epochs is for conversation data; {cfg.data_dir} holds a "
         f"token stream (give max_iters)")
    if cfg.sft_epochs:
        steps = math.ceil(cfg.sft_epochs * len(train_loader) /
                          (run.grad_accum * cfg.batch_size * run.world_size))
        run.say(f"{cfg.sft_epochs:g} epochs of {len(train_loader):,} conversations are {steps:,} "
                f"steps (max_iters)")
        cfg = dataclasses.replace(cfg, max_iters=steps)
    step, tokens = 0, 0
    if checkpoint is not None:
        step, tokens = restore(cfg, run, checkpoint, optimizer, train_loader)
    evaluation = evaluator(cfg, raw_model, eval_model, val_loader, run, chat)
    resumed = checkpoint is not None
    seed_processes(cfg, run, checkpoint)
    del checkpoint  # its weights and optimizer state are in use: no second copy on the host
    data_position = train_loader.state_dict()  # where the next step's data begins
    x, y, weights, step_tokens = fetch(train_loader, run)
    first_scores = evaluation() if not resumed and step < cfg.max_iters else None

    # ---- what the run writes, now that everything is checked: out_dir cleared (overwrite) or
    # its log cut back (resume), the run's record, the tokenizer, the log
    clear_out_dir(cfg, run, step)
    if run.master:
        write_run_record(cfg, raw_model.config, argv, run.world_size, run.device, meta)
        tokenizer_files = {(meta.get("tokenizer") or {}).get("path"), *TOKENIZER_FILES}
        copy_tokenizer_files(cfg.data_dir, cfg.out_dir, sorted(filter(None, tokenizer_files)))
    log = RunLog(cfg, run, step, {**asdict(cfg), **asdict(raw_model.config)})
    if first_scores is not None:
        log.write({"step": step, "tokens": 0, **first_scores})

    # ---- the loop: one optimizer step of grad_accum micro-steps; log, evaluate, save
    window_time, window_step, window_tokens = time.perf_counter(), step, tokens  # log window
    stopped = False
    raw_model.train()
    with StopRequest(run) as stop:  # Ctrl-C: finish the step, save, stop
        while step < cfg.max_iters and not stopped:
            lr = wsd_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=run.device)  # summed on the device: no sync here
            for micro_step in range(run.grad_accum):
                if run.ddp:  # average gradients across processes once, after the last micro-step
                    model.require_backward_grad_sync = micro_step == run.grad_accum - 1
                with run.autocast:
                    _, loss = model(x[micro_step], y[micro_step], keep_logits=False)
                step_loss += loss.detach() * weights[micro_step]
                (loss * weights[micro_step]).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       cfg.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += step_tokens
            step += 1
            stopped, last = stop(), step == cfg.max_iters
            data_position = train_loader.state_dict()
            if not (last or stopped):  # the next step's data: the host reads on meanwhile
                x, y, weights, step_tokens = fetch(train_loader, run)

            record, eta = {}, None
            if step % cfg.log_interval == 0 or last or stopped:
                if run.ddp:  # the mean over every supervised target of every process
                    dist.all_reduce(step_loss)
                    step_loss /= run.world_size
                train_loss, norm = step_loss.item(), grad_norm.item()  # the host waits: here only
                elapsed = time.perf_counter() - window_time
                tokens_per_sec = (tokens - window_tokens) / elapsed
                record = {"step": step, "tokens": tokens, "loss": train_loss, "lr": lr,
                          "grad_norm": norm, "tokens_per_sec": tokens_per_sec,
                          "mfu": flops * tokens_per_sec / peak if peak else None,
                          "time": time.time()}
                eta = tqdm.format_interval((cfg.max_iters - step) * elapsed / (step - window_step))
            log.step_done(record.get("loss"))
            if (cfg.eval_interval and step % cfg.eval_interval == 0 or last) and not stopped:
                record = {"step": step, "tokens": tokens, **record, **evaluation()}
            if record:
                log.write(record, eta)
            if "loss" in record:  # a logged step, in the log even when it diverged
                stop_if_diverged(step, cfg, loss=record["loss"], grad_norm=record["grad_norm"])
            saved = cfg.save_interval and step % cfg.save_interval == 0 or last or stopped
            if saved:  # never a checkpoint of non-finite weights, logged step or not
                finite = torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all()
                stop_if_diverged(step, cfg, grad_norm=grad_norm.item(),
                                 a_weight=1.0 if finite.item() else math.nan)
                path = os.path.join(cfg.out_dir, f"ckpt_{step:06d}.pt")
                save_checkpoint(path, raw_model, optimizer, step, cfg, data_position, run,
                                tokens=tokens, val_loss=record.get("val_loss"))
                if stopped:
                    run.say(f"saved {path}")
            if record or saved:  # time the next window from here
                window_time, window_step, window_tokens = time.perf_counter(), step, tokens

    # ---- the end: the Hugging Face export of a chat model, where to sample it
    log.close()
    if run.master and not stopped and meta.get("chat_template"):
        directory = os.path.join(cfg.out_dir, "hf")
        raw_model.save_pretrained(directory, tokenizer_dir=cfg.out_dir)
        run.say(f"exported {directory} (transformers loads it); chat with it: python sample.py "
                f"--init_from={directory} --chat")
    elif run.master and not stopped and not chat:
        run.say(f"sample it: python sample.py --out_dir={cfg.out_dir}")
    if run.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

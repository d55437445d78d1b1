"""
Train a Doge: on a CPU, on one GPU, or on several with DDP.

    python train.py config/doge_tiny.py                  # a few minutes on a laptop CPU
    python train.py config/doge_20m.py                   # the Doge-20M recipe on one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/doge_20m.py
    python train.py config/doge_20m.py --init_from=resume          # continue the newest
    python train.py config/doge_20m.py --init_from=resume \\
        --resume_ckpt=out/doge-20m/ckpt_004000.pt --max_iters=4800 --out_dir=out/doge-20m-d4k
                                                                # branch a WSD decay at step 4000

Settings are the fields of TrainConfig below plus every DogeConfig field, given flat
(--hidden_size=128), from a config file and then --key=value overrides (configurator.py).

What a run does, top to bottom in main(): read the settings; set up DDP when launched by torchrun
(NCCL on GPUs, gloo on CPUs); build or load the model (scratch, resume, a Hugging Face Doge
directory or one of our checkpoints; optionally upcycled to a CDMoE); then loop: one optimizer
step of gradient accumulation over memory-mapped shards, the WSD learning rate, a log line, an
evaluation, a checkpoint. The loop ends at max_iters with a final evaluation and checkpoint.

Files in out_dir: ckpt_{step:06d}.pt (model, optimizer, step, configs, data position, every RNG
state; written to a temporary file and renamed), log.jsonl (one object per logged step),
loss.png (if matplotlib is installed), runs/*.json (settings, versions and the source of
train.py and doge.py for each launch) and a copy of the data's tokenizer (for sample.py).

Instruction tuning (SFT) is the same loop with other batches: sft_data (jsonl files of
{"messages": [{"role", "content"}, ...]}, or a Hugging Face data set) replaces the shards.

    python train.py config/sft_doge_tiny.py                    # the tiny demo, made a chat model
    python train.py config/sft_doge_20m.py                     # Doge-20M -> Doge-20M-Instruct
    python sample.py --init_from=out/doge-tiny-sft/hf --chat

Conversations are rendered with the chat template (the model's own, or Doge's Llama-3 style
one), one conversation per row, right-padded: our attention has no document mask, so packing
would let conversations see each other. Only the assistant's tokens carry a loss. A tokenizer
without the template's special tokens gets them as new ids (the embedding grows, new rows start
at the mean embedding). Besides the checkpoints, out_dir then holds the chat tokenizer
(tokenizer.json, tokenizer_config.json) and, at the end, hf/: the model as a Hugging Face
directory that transformers and sample.py --chat both load.
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

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import apply_config
from doge import (PRESETS, Doge, DogeConfig, atomic_write, atomic_write_text, latest_checkpoint,
                  list_checkpoints, upcycle_to_moe)
from prepare_data import (DEFAULT_DATA_DIR, find_input_files, found_keys, hub_offline_setting,
                          hub_unreachable, jsonl_rows, list_shards, load_tokenizer, one_line,
                          prepare, read_meta, read_shard)
from sample import (load_chat_template, load_text_tokenizer, read_json, render_chat,
                    tokenizer_directory)
from sample import main as sample_main

# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoints, log.jsonl, loss.png and the record of each launch
    data_dir: str = DEFAULT_DATA_DIR  # *_train_*.bin and *_val_*.bin shards and meta.json
    init_from: str = "scratch"  # 'scratch', 'resume', a Hugging Face Doge dir, or a ckpt_*.pt file
    resume_ckpt: str | None = None  # with init_from='resume': this checkpoint, not out_dir's newest
    overwrite: bool = False  # a new run (not 'resume') may delete the checkpoints in out_dir
    # model: a preset, then any DogeConfig field given flat (--hidden_size=128) overrides it
    model: str | None = "doge-20m"  # a name from doge.PRESETS; None: DogeConfig's own defaults
    upcycle_experts: int = 0  # > 0: make the loaded dense model a CDMoE with this many experts
    upcycle_experts_per_tok: int = 8  # experts each token uses in the upcycled CDMoE
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
    log_interval: int = 10  # a log line every this many steps (and at the end)
    save_interval: int = 1000  # a checkpoint every this many steps (and at the end); 0: end only
    sample_tokens: int = 0  # > 0: print a sample this many tokens long at the end
    sample_prompt: str = ""  # the sample's prompt (SFT: the user's message); empty: a new document
    # instruction tuning (SFT): conversations instead of shards, from init_from's weights
    sft_data: str = ""  # '': pretraining. Else jsonl files (comma-separated paths or globs) of
    # {"messages": [{"role": ..., "content": ...}, ...]} lines, or a Hugging Face data set
    # NAME[:CONFIG] (its 'train' split; needs the `datasets` package and the network)
    sft_val_data: str = ""  # the same forms; '': the data set's 'test' split, or 1 in 20 of
    # sft_data's conversations held out (at most 1000; with fewer than 20, sft_data itself)
    sft_epochs: float = 0.0  # > 0: max_iters becomes this many passes over the conversations
    wandb_log: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "doge"
    wandb_run_name: str = "doge"
    # system
    device: str = "auto"  # 'auto': cuda if there is one, else cpu; or 'cpu', 'cuda', 'cuda:1'
    dtype: str = "auto"  # 'auto': bfloat16 autocast where supported, else float32; or either one
    compile: bool | str = "auto"  # torch.compile the model; 'auto': on for CUDA, off elsewhere
    seed: int = 1337
    peak_flops: float = 0.0  # one device's peak FLOP/s for MFU; 0: a table of GPUs, a CPU estimate


def model_overrides_dataclass():
    """Every DogeConfig field as a setting whose default None means "the preset's value"."""
    return dataclasses.make_dataclass(
        "ModelOverrides", [(f.name, f.type | None, None) for f in dataclasses.fields(DogeConfig)])


ModelOverrides = model_overrides_dataclass()


def check_config(cfg):
    """Refuse settings that cannot work, with one line each."""
    def need(ok, message):
        if not ok:
            raise SystemExit(f"error: {message}")
    need(cfg.init_from != "", "init_from is empty: give 'scratch', 'resume' or a path")
    need(cfg.dtype in ("auto", "bfloat16", "float32"),
         f"dtype {cfg.dtype!r} is not 'auto', 'bfloat16' or 'float32'")
    need(cfg.compile in (True, False, "auto"),
         f"compile {cfg.compile!r} is not True, False or 'auto'")
    for key in ("batch_size", "block_size", "total_batch_size", "eval_iters", "log_interval"):
        need(getattr(cfg, key) >= 1, f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_iters", "warmup_iters", "decay_iters", "eval_interval", "save_interval",
                "upcycle_experts", "sample_tokens"):
        need(getattr(cfg, key) >= 0, f"{key} must not be negative, got {getattr(cfg, key)}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(cfg.sft_epochs >= 0, f"sft_epochs must not be negative, got {cfg.sft_epochs}")
    need(not (cfg.sft_data and cfg.init_from == "scratch"),
         "sft_data fine-tunes a trained model: give init_from=PATH (one of our checkpoints or "
         "out_dirs, or a Hugging Face Doge directory), or 'resume'")
    need(cfg.resume_ckpt is None or cfg.init_from == "resume",
         "resume_ckpt needs init_from='resume' (to start from a checkpoint's weights alone, give "
         "it as init_from=PATH)")


# ----------------------------------------------------------------------------------------------
# Learning rate and optimizer


def wsd_lr(step, cfg):
    """Learning rate of optimizer step `step` (0-based), warmup-stable-decay:
    linear warmup to learning_rate over the first warmup_iters steps (step 0 takes
    learning_rate / warmup_iters), constant, then linear decay over the last decay_iters steps
    before max_iters: learning_rate at step max_iters - decay_iters, min_lr_ratio * learning_rate
    at max_iters (a decay longer than the run starts at step 0; where warmup and decay overlap,
    the lower rate wins). A pure function of the step and the settings, so a resumed run follows
    the same schedule, and a run resumed with new max_iters/decay_iters branches a decay."""
    multiplier = 1.0
    if step < cfg.warmup_iters:
        multiplier = (step + 1) / cfg.warmup_iters
    decay_iters = min(cfg.decay_iters, cfg.max_iters)
    if decay_iters > 0 and step >= cfg.max_iters - decay_iters:
        left = max(cfg.max_iters - step, 0) / decay_iters  # 1 where the decay starts, 0 at the end
        multiplier = min(multiplier, cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * left)
    return cfg.learning_rate * multiplier


def configure_optimizer(model, cfg, device_type):
    """AdamW with weight decay on the matrices and embeddings (every tensor of 2 or more dims)
    and none on vectors: RMSNorm weights, the residual scales, A and biases. model.parameters()
    lists the tied lm_head / embed_tokens weight once. Fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps, fused=device_type == "cuda")


# ----------------------------------------------------------------------------------------------
# Data


class ShardLoader:
    """Batches of sequences from memory-mapped shards, in a shuffled order fixed by the seed and
    the same whatever the number of processes.

    A shard is read as sequences of block_size + 1 tokens (inputs, and targets shifted by one)
    starting at multiples of block_size, in a random order fixed by (seed, epoch, shard), so a
    batch mixes many documents even in a small corpus. Each call takes the next micro_steps *
    world_size rows of batch_size sequences of that order; process `rank` gets rows rank,
    rank + world_size, ..., one per micro-step. Shards are read in turn: when the current one has
    too few sequences left, the next one starts (after the last, the first again, in a new
    order: the next epoch). The position is three ints, saved in checkpoints. step_tokens: the
    tokens the last next_batch read, all processes together."""

    def __init__(self, data_dir, split, batch_size, block_size, rank, world_size, vocab_size,
                 seed=0):
        try:
            paths = list_shards(data_dir, split)
            self.shards = [read_shard(path) for path in paths]
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        self.paths = paths
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.vocab_size, self.seed = vocab_size, seed
        self.reset()

    def reset(self):
        self.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})

    def state_dict(self):
        return {"shard": self.shard, "offset": self.offset, "epoch": self.epoch}

    def load_state_dict(self, state):
        if not 0 <= state["shard"] < len(self.shards):
            raise SystemExit(f"error: the checkpoint's data position is in shard {state['shard']}"
                             f" but there are {len(self.shards)} shards")
        self.shard, self.offset, self.epoch = state["shard"], state["offset"], state["epoch"]
        self.order = None  # the current shard's order of sequences, made when first needed

    def sequence_order(self):
        if self.order is None:
            count = (len(self.shards[self.shard]) - 1) // self.block_size
            rng = np.random.default_rng([self.seed, self.epoch, self.shard])
            self.order = rng.permutation(count)
        return self.order

    def next_batch(self, micro_steps):
        """x, y: int64 (micro_steps, batch_size, block_size), this process's rows."""
        batch, length = self.batch_size, self.block_size
        need = micro_steps * self.world_size * batch  # sequences, all processes together
        if self.offset + need > len(self.sequence_order()):
            self.load_state_dict({"shard": (self.shard + 1) % len(self.shards), "offset": 0,
                                  "epoch": self.epoch + (self.shard + 1 == len(self.shards))})
            if need > len(self.sequence_order()):
                raise SystemExit(f"error: shard {self.paths[self.shard]} holds "
                                 f"{len(self.shards[self.shard])} tokens, fewer than the "
                                 f"{need * length + 1} one step reads; use a smaller "
                                 f"total_batch_size or batch_size")
        rows = [self.offset + (m * self.world_size + self.rank) * batch for m in range(micro_steps)]
        starts = np.concatenate([self.order[row:row + batch] for row in rows]) * length
        tokens = self.shards[self.shard][starts[:, None] + np.arange(length + 1)]  # (M*B, T+1)
        self.offset += need
        self.step_tokens = need * length
        if tokens.max() >= self.vocab_size:
            raise SystemExit(f"error: {self.paths[self.shard]} holds token id {tokens.max()}, "
                             f"outside the model's vocabulary of {self.vocab_size}")
        tokens = torch.from_numpy(tokens.astype(np.int64)).view(micro_steps, batch, length + 1)
        return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()


def to_device(tensor, device):
    """On CUDA: through pinned memory, without waiting for the copy (the host reads on)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def micro_step_weights(y, world_size):
    """What each micro-step's mean loss is multiplied by before backward: its supervised targets
    (not -1) over those of the whole step, all micro-steps and processes, times world_size (DDP
    averages gradients over processes). The step's gradient is then that of the mean loss over
    every supervised target of the step, however they fall into micro-batches: 1 / grad_accum
    each in pretraining, where every target counts. y: the step's micro-batches of targets."""
    counts = torch.stack([(targets != -1).sum() for targets in y]).float()  # (micro_steps,)
    total = counts.sum()
    if dist.is_initialized():  # every process's targets count (a scalar, on the device)
        dist.all_reduce(total)
    return counts * world_size / total.clamp(min=1)


def ensure_data(data_dir, master, ddp):
    """The data directory's meta.json (a dict, maybe empty). The default corpus is made if it is
    missing; any other missing data directory is refused with a hint."""
    try:
        list_shards(data_dir, "train")
        missing = None
    except ValueError as e:
        missing = e
    if missing and os.path.abspath(data_dir) != os.path.abspath(DEFAULT_DATA_DIR):
        raise SystemExit(f"error: {missing} (make it with `python prepare_data.py "
                         f"--input=YOUR_TEXT --out_dir={data_dir}`, or use the default corpus: "
                         f"data_dir={DEFAULT_DATA_DIR})")
    if missing and master:
        print(f"no data in {data_dir}: preparing the default corpus there", file=sys.stderr)
        try:
            prepare(data_dir)  # no inputs: the default corpus
        except ValueError as e:
            raise SystemExit(f"error: preparing the default corpus: {e}") from None
    if ddp:  # the others wait for the master's preparation
        dist.barrier()
    try:
        return read_meta(data_dir) or {}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------
# Instruction tuning (SFT): conversations, the chat tokenizer, the export
#
# Packing several conversations into one row would let them attend to each other (our attention
# has no document mask), so each conversation is a row of its own: right-padded, which changes
# nothing before the padding (attention is causal), and cut after block_size tokens (counted and
# reported). The rows of a step are sorted by length before they are dealt into micro-batches,
# so little of a micro-batch is padding.

# Doge's chat format (Llama-3 style), for models whose tokenizer brings no template of its own
DOGE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] "
    "+ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PAD_MULTIPLE = 16  # micro-batches are padded to a multiple of this many tokens


def sentencepiece_as_tokenizers(path):
    """Our SentencePiece BPE model (prepare_data.py: byte fallback, identity normalisation, no
    dummy prefix) as a `tokenizers` BPE giving the same ids, so that transformers can load it: the
    vocabulary in id order, and a merge for every split of a piece into two pieces, ranked by the
    piece's score (SentencePiece BPE merges the adjacent pair whose union scores best). Spaces
    become "▁" as in SentencePiece. One difference: text holding "▁" itself, which
    prepare_data.py spells with byte pieces, reads here as a space."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, normalizers

    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    plain = {piece for i, piece in enumerate(pieces)  # never made from text by merging
             if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
                     or processor.is_unused(i))}
    merges = sorted((-processor.get_score(vocab[piece]), vocab[piece], k, piece[:k], piece[k:])
                    for piece in plain for k in range(1, len(piece))
                    if piece[:k] in plain and piece[k:] in plain)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                                     unk_token=pieces[processor.unk_id()], byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                           decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def chat_tokenizer(source_dir):
    """The chat tokenizer of an SFT run, made from the starting model's (in source_dir): its
    tokenizer.json, or our SentencePiece tokenizer.model converted, and its tokenizer_config.json.
    A tokenizer with a chat template keeps it; one without gets the Doge template, with
    <|begin_of_text|> as bos, <|eot_id|> as eos, and the template's special tokens that its
    vocabulary lacks (new ids after the last). Returns the `tokenizers.Tokenizer`, the
    tokenizer_config dict and the ids of the added tokens."""
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError:
        raise SystemExit("error: sft_data needs the `tokenizers` package (pip install "
                         "tokenizers)") from None
    json_path, model_path = (os.path.join(source_dir, name)
                             for name in ("tokenizer.json", "tokenizer.model"))
    if os.path.isfile(json_path):
        tokenizer = Tokenizer.from_file(json_path)
    elif os.path.isfile(model_path):
        tokenizer = sentencepiece_as_tokenizers(model_path)
    else:
        raise SystemExit(f"error: no tokenizer.json or tokenizer.model in {source_dir}, beside "
                         f"the weights to fine-tune")
    config = read_json(os.path.join(source_dir, "tokenizer_config.json"))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    own_template = load_chat_template(source_dir)
    if own_template is not None:  # chat_template.jinja, if that is where it was, goes inline
        return tokenizer, {**config, "chat_template": own_template["template"]}, []
    missing = [token for token in CHAT_TOKENS if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in missing])
    config = {**config, "chat_template": DOGE_CHAT_TEMPLATE, "bos_token": CHAT_TOKENS[0],
              "eos_token": "<|eot_id|>"}
    return tokenizer, config, [tokenizer.token_to_id(token) for token in missing]


def add_token_rows(model, vocab_size, new_ids):
    """The model with an embedding (and lm_head) of at least vocab_size rows, where the rows of
    the new token ids hold the mean of the other rows: a token the model knows nothing of starts
    as an average token (and, tied, with an average logit), not as noise unlike anything."""
    config = DogeConfig(**{**asdict(model.config),
                           "vocab_size": max(vocab_size, model.config.vocab_size)})
    state = model.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        old = state[name]
        known = torch.ones(len(old), dtype=torch.bool)
        known[[i for i in new_ids if i < len(old)]] = False
        mean = old[known].float().mean(dim=0).to(old.dtype)
        rows = torch.cat([old, mean.expand(config.vocab_size - len(old), -1)])  # (V', D)
        rows[new_ids] = mean
        state[name] = rows
    grown = Doge(config)
    grown.load_state_dict(state)
    return grown


RENDER_SEPARATOR = "\x00<|next rendering|>\x00"


def render_many(chat_template, items):
    """render_chat (sample.py) of many (messages, add_generation_prompt) pairs in one call: the
    template runs in a loop that binds both names for each pair. (render_chat on its own always
    adds the generation prompt, and compiles the template anew at each call: 1.5 ms, hours for
    smoltalk.)"""
    loop = ("{% for messages, add_generation_prompt in messages %}" + chat_template["template"]
            + RENDER_SEPARATOR + "{% endfor %}")
    texts = render_chat({**chat_template, "template": loop}, items).split(RENDER_SEPARATOR)
    if len(texts) != len(items) + 1:
        raise SystemExit(f"error: a conversation holds the text {RENDER_SEPARATOR!r}")
    return texts[:-1]


def assistant_spans(chat_template, conversations):
    """Each conversation as text, with the character spans of the assistant's turns in it. Found
    by rendering prefix by prefix: a turn starts where its prompt ends (the conversation before it
    plus the generation prompt: what sample.py --chat gives the model) and ends where the
    conversation up to and including it ends. So what is supervised is exactly what the model has
    to write: the content and the template's end of turn (<|eot_id|>)."""
    items = []
    for messages in conversations:
        items.append((messages, False))
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                items += [(messages[:i], True), (messages[:i + 1], False)]
    texts, rendered = iter(render_many(chat_template, items)), []
    for messages in conversations:
        text, spans = next(texts), []
        for message in messages:
            if message["role"] == "assistant":
                prompt, through = next(texts), next(texts)
                if not (text.startswith(through) and through.startswith(prompt)):
                    raise SystemExit("error: the chat template does not render a conversation as "
                                     "its prompts followed by the answers, so the assistant's "
                                     "turns cannot be found in it")
                spans.append((len(prompt), len(through)))
        rendered.append((text, spans))
    return rendered


def tokenize_conversations(conversations, tokenizer, chat_template, block_size):
    """Examples (ids int32, supervised bool) of at most block_size + 1 tokens, and counts. Each
    piece of text between span boundaries is encoded on its own, as sample.py encodes a prompt
    that ends where the answer begins; the text after the last answer is left out. Conversations
    with nothing supervised within block_size + 1 tokens are dropped."""
    examples, counts = [], {"conversations": len(conversations), "truncated": 0, "dropped": 0,
                            "tokens": 0, "supervised": 0}
    for begin in range(0, len(conversations), 1024):
        pieces, layout = [], []  # layout: per conversation, (its first piece, pieces)
        for text, spans in assistant_spans(chat_template, conversations[begin:begin + 1024]):
            cuts = [0, *(i for span in spans for i in span)]
            layout.append((len(pieces), len(cuts) - 1))
            pieces += [text[a:b] for a, b in zip(cuts, cuts[1:])]
        encoded = tokenizer.encode(pieces)
        for first, count in layout:
            ids = [i for piece in encoded[first:first + count] for i in piece]
            supervised = [k % 2 == 1 for k in range(count) for _ in encoded[first + k]]
            if len(ids) > block_size + 1:
                counts["truncated"] += 1
                ids, supervised = ids[:block_size + 1], supervised[:block_size + 1]
            if not any(supervised[1:]):
                counts["dropped"] += 1
                continue
            examples.append((np.array(ids, dtype=np.int32), np.array(supervised)))
            counts["tokens"] += len(ids) - 1
            counts["supervised"] += sum(supervised[1:])
    return examples, counts


def check_messages(messages, where):
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise SystemExit(f"error: {where}: 'messages' must be a non-empty list of "
                         f"{{\"role\": str, \"content\": str}} objects")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl_conversations(path):
    conversations = []
    try:
        for where, row in jsonl_rows(path):
            if not isinstance(row, dict) or "messages" not in row:
                raise SystemExit(f"error: {where}: no 'messages' (found {found_keys(row)}); each "
                                 f"line must be {{\"messages\": [{{\"role\": \"user\", \"content\": "
                                 f"\"...\"}}, {{\"role\": \"assistant\", ...}}]}}")
            conversations.append(check_messages(row["messages"], where))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read ({one_line(e)})") from None
    except ValueError as e:  # a line that is not JSON
        raise SystemExit(f"error: {e}") from None
    return conversations


def read_conversations(source, setting):
    """{split: conversations} from jsonl files ('train' only) or a Hugging Face data set (all of
    its splits). source: comma-separated paths or globs, or NAME[:CONFIG]."""
    patterns = [pattern.strip() for pattern in source.split(",") if pattern.strip()]
    local = any(os.path.exists(p) or re.search(r"[*?[]", p) or ".json" in p for p in patterns)
    if local:
        try:
            files = find_input_files(patterns)
        except ValueError as e:
            raise SystemExit(f"error: {setting}: {e}".replace("--input ", "")) from None
        return {"train": [c for path in files for c in read_jsonl_conversations(path)]}
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"error: {setting}={source!r} is not a local file, and reading it as a "
                         f"Hugging Face data set needs the `datasets` package (pip install "
                         f"datasets); or give jsonl files") from None
    name, _, config = source.partition(":")
    # offline, datasets reads its cache at once: nothing to check
    local = os.path.exists(name) or hub_offline_setting()
    reason = None if local else hub_unreachable()
    if reason:
        raise SystemExit(f"error: {setting}={source!r} is not a local file, and as a Hugging Face "
                         f"data set it needs the network: {reason}; give jsonl files, or set "
                         f"HF_DATASETS_OFFLINE=1 to read the data set from the local cache")
    try:
        splits = datasets.load_dataset(name, config or None)
    except Exception as e:  # datasets raises many kinds: bad name, bad config, network
        raise SystemExit(f"error: {setting}={source!r}: cannot load it ({one_line(e)})") from None
    return {split: [check_messages(row.get("messages"), f"{source}[{split}][{i}]")
                    for i, row in enumerate(rows)] for split, rows in splits.items()}


def sft_conversations(cfg):
    """(training conversations, validation conversations) as the settings ask."""
    data = read_conversations(cfg.sft_data, "sft_data")
    if "train" not in data or not data["train"]:
        raise SystemExit(f"error: sft_data={cfg.sft_data!r} holds no training conversations")
    train_set = data["train"]
    if cfg.sft_val_data:
        val_set = read_conversations(cfg.sft_val_data, "sft_val_data")
        val_set = val_set.get("test") or val_set.get("train") or []
    elif data.get("test"):
        val_set = data["test"]
    elif len(train_set) >= 20:  # hold out 1 in 20, chosen by the seed
        order = np.random.default_rng([cfg.seed, 20]).permutation(len(train_set))
        held_out = set(order[:min(1000, len(train_set) // 20)].tolist())
        val_set = [c for i, c in enumerate(train_set) if i in held_out]
        train_set = [c for i, c in enumerate(train_set) if i not in held_out]
    else:
        val_set = train_set
    if not val_set:
        raise SystemExit(f"error: sft_val_data={cfg.sft_val_data!r} holds no conversations")
    return train_set, val_set


class ConversationLoader:
    """Batches of conversations, one per row, in a shuffled order fixed by the seed and the same
    whatever the number of processes (the interface of ShardLoader).

    The conversations are an endless stream of epochs, each in its own order fixed by (seed,
    epoch). A step takes the next micro_steps * world_size * batch_size of them, sorts them by
    length and deals them out: micro-step m of process r gets rows (m * world_size + r) *
    batch_size onwards. Sorting keeps the step's conversations, and so its loss (the mean over
    every supervised token of the step), and makes each micro-batch's rows alike in length. A
    micro-batch is padded to its longest row, rounded up to a multiple of PAD_MULTIPLE (at most
    block_size), so x and y are lists of micro_steps tensors (batch_size, length). The position
    is one int, saved in checkpoints with the number of conversations."""

    def __init__(self, examples, batch_size, block_size, rank, world_size, seed=0):
        self.examples, self.lengths = examples, np.array([len(ids) - 1 for ids, _ in examples])
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.reset()

    def __len__(self):
        return len(self.examples)

    def reset(self):
        self.position, self.order_epoch = 0, None

    def state_dict(self):
        return {"position": self.position, "conversations": len(self.examples)}

    def load_state_dict(self, state):
        if state.get("conversations") != len(self.examples):
            raise SystemExit(f"error: the checkpoint was made reading {state.get('conversations')}"
                             f" conversations, these settings give {len(self.examples)}: resume "
                             f"with the same sft_data, block_size and seed")
        self.position = state["position"]

    def take(self, count):
        """The indices of the next `count` conversations of the stream."""
        taken = []
        while len(taken) < count:
            epoch, offset = divmod(self.position, len(self.examples))
            if self.order_epoch != epoch:
                self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
                self.order_epoch = epoch
            part = self.order[offset:offset + count - len(taken)]
            taken += part.tolist()
            self.position += len(part)
        return taken

    def next_batch(self, micro_steps):
        rows = self.batch_size
        chosen = sorted(self.take(micro_steps * self.world_size * rows),
                        key=lambda i: self.lengths[i])
        self.step_tokens = int(self.lengths[chosen].sum())
        xs, ys = [], []
        for m in range(micro_steps):
            start = (m * self.world_size + self.rank) * rows
            x, y = collate([self.examples[i] for i in chosen[start:start + rows]], self.block_size)
            xs.append(x)
            ys.append(y)
        return xs, ys


def collate(examples, block_size, length=None):
    """x, y (rows, length) int64 of conversations: inputs right-padded with 0, targets the next
    token where it is supervised and -1 elsewhere (padding included)."""
    if length is None:
        longest = max(len(ids) - 1 for ids, _ in examples)
        length = min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    x = torch.zeros(len(examples), length, dtype=torch.long)
    y = torch.full((len(examples), length), -1, dtype=torch.long)
    for row, (ids, supervised) in enumerate(examples):
        ids, supervised = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(supervised)
        n = len(ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = torch.where(supervised[1:], ids[1:], -1)
    return x, y


def prepare_sft(cfg, model, source_path, resuming, master, ddp, say):
    """Make the chat tokenizer in out_dir and the model's vocabulary fit it (a new run; resuming,
    the tokenizer lies beside the checkpoint already), then read and tokenize the conversations.
    source_path: the weights the run starts from. Returns the model, the training and validation
    examples."""
    source_dir = tokenizer_directory(source_path)
    if resuming and master and os.path.abspath(source_dir) != os.path.abspath(cfg.out_dir):
        # branching into a new out_dir
        copy_files(source_dir, cfg.out_dir, ("tokenizer.json", "tokenizer_config.json"))
    if not resuming:
        tokenizer, tokenizer_config, added = chat_tokenizer(source_dir)
        if master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            atomic_write(os.path.join(cfg.out_dir, "tokenizer.json"), tokenizer.save)
            text = json.dumps(tokenizer_config, indent=2, ensure_ascii=False)
            atomic_write_text(os.path.join(cfg.out_dir, "tokenizer_config.json"), text)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if added or size > model.config.vocab_size:
            model = add_token_rows(model, size, added)
            say(f"sft: added {', '.join(tokenizer.id_to_token(i) for i in added) or 'no tokens'}"
                f" (ids {min(added, default=size)}+), vocab_size {model.config.vocab_size}")
    if ddp:
        dist.barrier()  # the master has written the tokenizer
    tokenizer = load_text_tokenizer(cfg.out_dir, model.config.vocab_size)
    chat_template = load_chat_template(cfg.out_dir)
    eos = [tokenizer.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    eos = list(dict.fromkeys(i for i in (*eos, tokenizer.eot_id) if i is not None))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_id, eos
    if ddp and not master:
        dist.barrier()  # a data set from the hub: the master downloads it, the others then read
    train_set, val_set = sft_conversations(cfg)
    if ddp and master:
        dist.barrier()
    start = time.perf_counter()
    splits = []
    for name, conversations in (("train", train_set), ("val", val_set)):
        examples, counts = tokenize_conversations(conversations, tokenizer, chat_template,
                                                  cfg.block_size)
        say(f"sft {name}: {counts['conversations']:,} conversations, {counts['truncated']:,} cut "
            f"at block_size {cfg.block_size}, {counts['dropped']:,} dropped (no answer within "
            f"it); {counts['tokens']:,} tokens, {counts['supervised']:,} supervised")
        if not examples:
            raise SystemExit(f"error: no {name} conversation has an assistant turn within "
                             f"block_size {cfg.block_size} tokens")
        splits.append(examples)
    say(f"sft: tokenized in {time.perf_counter() - start:.1f}s")
    return model, *splits


def export_hf(model, out_dir):
    """out_dir/hf: the model as a Hugging Face directory (config.json, model.safetensors) with the
    chat tokenizer and a generation_config.json whose eos ids end an answer."""
    directory = os.path.join(out_dir, "hf")
    model.save_pretrained(directory)
    copy_files(out_dir, directory, ("tokenizer.json", "tokenizer_config.json"))
    generation = {"bos_token_id": model.config.bos_token_id,
                  "eos_token_id": model.config.eos_token_id}
    atomic_write_text(os.path.join(directory, "generation_config.json"),
                      json.dumps(generation, indent=2))
    return directory


# ----------------------------------------------------------------------------------------------
# Evaluation, checkpoints, logging


@torch.no_grad()
def evaluate(model, loader, eval_iters, device, autocast, ddp):
    """Mean validation loss per supervised target over eval_iters micro-batches on every process,
    all of them together. The loader starts from the beginning of the split each time, so
    evaluations compare."""
    model.eval()
    loader.reset()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for _ in range(eval_iters):
        x, y = loader.next_batch(1)
        x, y = to_device(x[0], device), to_device(y[0], device)
        with autocast:
            _, loss = model(x, y, keep_logits=False)
        targets = (y != -1).sum()
        total += loss.float() * targets
        count += targets
    if ddp:
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train()
    return (total / count.clamp(min=1)).item()


def finite_weights(model):
    """1.0 when every parameter is finite, else nan (one host sync)."""
    finite = torch.stack([p.isfinite().all() for p in model.parameters()]).all()
    return 1.0 if finite.item() else math.nan


def stop_if_diverged(step, cfg, **values):
    """A run whose loss, gradient norm or weights became nan or inf stops with one line naming the
    step, the value, the newest checkpoint (checkpoints are only written with finite weights) and
    what to try, instead of training on and saving nan weights."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if not bad:
        return
    newest = latest_checkpoint(cfg.out_dir)
    where = (f"the newest checkpoint, {newest}, has finite weights (resume from it with "
             f"init_from=resume and a new schedule)") if newest else "no checkpoint was saved yet"
    what = ", ".join(f"{name.replace('_', ' ')} is {value}" for name, value in bad.items())
    raise SystemExit(
        f"error: the run diverged at step {step}: {what}; {where}; try a lower learning_rate (now {cfg.learning_rate:g}), or grad_clip "
        f"(now {cfg.grad_clip:g}), or a longer warmup_iters (now {cfg.warmup_iters})")


def rng_state():
    """Every RNG state as plain Python values (lists of ints), which gather between processes and
    load with torch.load(weights_only=True)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, keys.tolist(), position, has_gauss, gauss),
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_initialized() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(path, model, optimizer, step, cfg, data_position, master, **extra):
    """Write ckpt (on the master process), atomically. Called by every process: the RNG states
    of all of them are gathered so that a resume restores each one."""
    rng = rng_state()
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng)
        rng = states
    else:
        rng = [rng]
    if not master:
        return
    checkpoint = {"model": model.state_dict(),  # the plain module: no DDP, no torch.compile
                  "model_config": asdict(model.config),
                  "optimizer": optimizer.state_dict(),
                  "step": step,
                  "train_config": asdict(cfg),
                  "data_position": data_position,
                  "rng": rng,
                  **extra}
    atomic_write(path, lambda temp: torch.save(checkpoint, temp))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


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


def flops_per_token(model, block_size):
    """Training FLOPs per token (forward and backward, 3x forward) as nanoGPT and PaLM count
    them: 6 per weight the token is multiplied by, plus 12 * layers * heads * head_dim * the
    keys each query attends to (here at most keep_window_size). A CDMoE token uses only
    num_experts_per_tok of its experts' vectors; embedding lookups are free unless tied."""
    config = model.config
    weights = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        weights -= model.embed_tokens.weight.numel()
    if config.is_moe:  # only the chosen experts' down and up vectors
        weights -= 2 * config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok
                                                   ) * config.hidden_size
    keys = min(block_size, config.keep_window_size)
    return 6 * weights + 12 * config.num_hidden_layers * config.num_attention_heads * \
        config.head_dim * keys


# Dense bfloat16 tensor-core peaks (FLOP/s, FP32 accumulate) from the vendors' data sheets; the
# most specific name first. float32 runs (TF32) count half of it. Other GPUs: give peak_flops.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                  "L40S": 362e12, "L4": 121e12, "RTX 4090": 165.2e12, "RTX 4080": 97.5e12,
                  "RTX 3090": 71e12, "RTX 6000 Ada": 364e12, "RTX A6000": 155e12}


def cpu_peak_flops(threads):
    """A rough float32 peak for a CPU: threads x clock x FLOPs per cycle (two FMA pipes of 8 floats
    with AVX2, and of 16 with AVX-512 on Intel; AMD Zen 4 runs AVX-512 at AVX2 width)."""
    clock, flops_per_cycle = 3.0e9, 32
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        clock = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", info).group(1)) * 1e6
        flags = re.search(r"flags\s*:(.*)", info).group(1).split()
        intel = "GenuineIntel" in info
        flops_per_cycle = 64 if intel and "avx512f" in flags else 32 if "fma" in flags else 16
    except (OSError, AttributeError, ValueError):
        pass
    return threads * clock * flops_per_cycle


def peak_flops(device_type, dtype):
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype == torch.bfloat16 else flops / 2
        return 0.0  # unknown GPU: MFU not reported (give peak_flops=...)
    return cpu_peak_flops(torch.get_num_threads())


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def plot_losses(path, records):
    """loss.png: train and val loss against tokens, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "val")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=100))
    plt.close(fig)


def write_run_record(cfg, model_config, argv, world_size, device):
    """out_dir/runs/<time>.json: settings, versions and this code, so a result can be redone."""
    here = os.path.dirname(os.path.abspath(__file__))
    source = {}
    for name in ("train.py", "doge.py", "configurator.py"):
        with open(os.path.join(here, name)) as f:
            source[name] = f.read()
    record = {"argv": argv, "train_config": asdict(cfg), "model_config": asdict(model_config),
              "world_size": world_size, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "numpy": np.__version__, "cuda": torch.version.cuda,
                           "platform": platform.platform()},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "source": source}
    os.makedirs(os.path.join(cfg.out_dir, "runs"), exist_ok=True)
    name = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}.json"
    path = os.path.join(cfg.out_dir, "runs", name)
    atomic_write_text(path, json.dumps(record, indent=1))


def copy_tokenizer(data_dir, out_dir, meta):
    """The data's tokenizer files beside the checkpoints, where sample.py and an exported model
    look for them."""
    names = {meta.get("tokenizer", {}).get("path"), "tokenizer.model", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja"}
    copy_files(data_dir, out_dir, [name for name in sorted(filter(None, names))
                                   if os.path.isfile(os.path.join(data_dir, name))])


def copy_files(source_dir, target_dir, names):
    """Copy the named files of source_dir into target_dir, each written atomically."""
    os.makedirs(target_dir, exist_ok=True)
    for name in names:
        atomic_write(os.path.join(target_dir, name),
                     lambda temp: shutil.copyfile(os.path.join(source_dir, name), temp))


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and save a
    checkpoint; a second one interrupts at once. Under DDP every process learns of it at the same
    step (a tiny all-reduce on a CPU group), so they all save and stop together."""

    def __init__(self, ddp, backend):
        self.requested = False
        self.group = None
        if ddp:  # NCCL would need a GPU tensor and a sync; a gloo group keeps it on the host
            self.group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step with a checkpoint (again to quit at once)",
              file=sys.stderr, flush=True)

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
# The training run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, model_settings = apply_config([TrainConfig(), ModelOverrides()], argv)
    check_config(cfg)
    overrides = {k: v for k, v in asdict(model_settings).items() if v is not None}

    # processes and devices: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    master = rank == 0
    device_name = cfg.device
    if device_name == "auto":
        device_name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device_name == "cuda" and ddp:
        device_name = f"cuda:{local_rank}"
    device = torch.device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if ddp:
        dist.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if master else (lambda *a: None)
    tokens_per_micro_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % tokens_per_micro_step:
        raise SystemExit(f"error: total_batch_size {cfg.total_batch_size} is not a multiple of "
                         f"batch_size * block_size * processes = {cfg.batch_size} * "
                         f"{cfg.block_size} * {world_size} = {tokens_per_micro_step}")
    grad_accum = cfg.total_batch_size // tokens_per_micro_step
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() \
            else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 \
        else contextlib.nullcontext()
    use_compile = device.type == "cuda" if cfg.compile == "auto" else cfg.compile

    earlier = list(list_checkpoints(cfg.out_dir).values())
    if cfg.init_from != "resume" and earlier:  # a new run: never mix two runs in one out_dir
        if not cfg.overwrite:
            raise SystemExit(f"error: {cfg.out_dir} already holds a run's checkpoints: continue it "
                             f"with init_from='resume', choose another out_dir, or give "
                             f"overwrite=True to delete them")
        if ddp:
            dist.barrier()  # every process has looked before the master deletes
        if master:
            log_path = os.path.join(cfg.out_dir, "log.jsonl")
            for path in earlier + ([log_path] if os.path.exists(log_path) else []):
                os.remove(path)
            say(f"overwrite: deleted the {len(earlier)} checkpoints in {cfg.out_dir}")
    meta = {} if cfg.sft_data else ensure_data(cfg.data_dir, master, ddp)
    tokens_of_data = {"vocab_size": meta.get("vocab_size"), "bos_token_id": meta.get("bos_id"),
                      "eos_token_id": meta.get("eos_id")}

    # the model: from scratch, resumed, or initialised from saved weights
    torch.manual_seed(cfg.seed)
    checkpoint, start_step = None, 0
    if cfg.init_from == "scratch":
        if cfg.model is not None and cfg.model not in PRESETS:
            raise SystemExit(f"error: unknown model preset {cfg.model!r}; choose one of "
                             f"{', '.join(sorted(PRESETS))}, or model=None")
        config = dict(PRESETS[cfg.model]) if cfg.model else {}
        for key, value in tokens_of_data.items():
            if value is not None and key not in overrides:  # the data's tokenizer decides
                config[key] = value
        model = build_model(config, overrides)
    elif cfg.init_from == "resume":
        path = cfg.resume_ckpt or latest_checkpoint(cfg.out_dir)
        if path is None:
            raise SystemExit(f"error: no checkpoint to resume in {cfg.out_dir}; start with "
                             f"init_from='scratch' or give resume_ckpt=PATH")
        checkpoint = load_checkpoint(path)
        model = build_model(checkpoint["model_config"], overrides, checkpoint["model"], path)
        start_step = checkpoint["step"]
        say(f"resuming from {path} at step {start_step}")
    else:  # weights only: a Hugging Face Doge directory, an out_dir, or one of our checkpoints
        path = cfg.init_from
        if not os.path.exists(path):
            raise SystemExit(f"error: init_from {path!r} is not 'scratch', 'resume' or an "
                             f"existing path")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            path = latest_checkpoint(path) or path  # an out_dir: name the checkpoint it gives
        try:
            loaded = Doge.from_pretrained(path)  # a checkpoint file or a Hugging Face directory
        except Exception as e:  # torch.load of a damaged file raises many kinds
            raise SystemExit(f"error: init_from {path}: {one_line(e)}") from None
        model = build_model(asdict(loaded.config), overrides, loaded.state_dict(), path) \
            if overrides else loaded
        say(f"initialised from the weights of {path}")
    if cfg.upcycle_experts and not model.config.is_moe:
        if checkpoint is not None:
            raise SystemExit("error: upcycling makes new parameters, so it cannot resume an "
                             "optimizer: give the dense checkpoint as init_from=PATH instead")
        model = upcycle_to_moe(model, cfg.upcycle_experts, cfg.upcycle_experts_per_tok)
        say(f"upcycled to a CDMoE with {cfg.upcycle_experts} experts, "
            f"{cfg.upcycle_experts_per_tok} per token")
    if cfg.sft_data:  # the chat tokenizer, the vocabulary to fit it, the conversations
        model, train_examples, val_examples = prepare_sft(cfg, model, path, checkpoint is not None,
                                                          master, ddp, say)
    if "vocab_size" in meta and meta["vocab_size"] > model.config.vocab_size:
        raise SystemExit(f"error: the data's vocabulary ({meta['vocab_size']} tokens, "
                         f"{cfg.data_dir}/meta.json) does not fit the model's vocab_size "
                         f"{model.config.vocab_size}")
    model.to(device)
    optimizer = configure_optimizer(model, cfg, device.type)

    if cfg.sft_data:
        train_loader, val_loader = (
            ConversationLoader(examples, cfg.batch_size, cfg.block_size, rank, world_size, cfg.seed)
            for examples in (train_examples, val_examples))
        if cfg.sft_epochs:  # each step reads grad_accum * batch_size rows on every process
            steps = math.ceil(cfg.sft_epochs * len(train_loader) /
                              (grad_accum * cfg.batch_size * world_size))
            say(f"sft: {cfg.sft_epochs:g} epochs of {len(train_loader):,} conversations are "
                f"{steps:,} steps (max_iters)")
            cfg = dataclasses.replace(cfg, max_iters=steps)
    else:
        train_loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, cfg.block_size, rank,
                                   world_size, model.config.vocab_size, cfg.seed)
        val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, cfg.block_size, rank,
                                 world_size, model.config.vocab_size, cfg.seed)
    records = []  # everything logged, for loss.png
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if checkpoint is not None:
        if start_step > cfg.max_iters:
            raise SystemExit(f"error: the checkpoint is at step {start_step}, past max_iters "
                             f"{cfg.max_iters}")
        before = checkpoint["train_config"]
        if bool(before.get("sft_data")) != bool(cfg.sft_data):
            raise SystemExit(f"error: {'an SFT' if before.get('sft_data') else 'a pretraining'} "
                             f"checkpoint resumes only as one (to fine-tune a pretrained model, "
                             f"give its checkpoint as init_from=PATH)")
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_loader.load_state_dict(checkpoint["data_position"])
        schedule = ("max_iters", "decay_iters", "min_lr_ratio", "learning_rate", "warmup_iters")
        changed = {k: (before.get(k), getattr(cfg, k)) for k in schedule
                   if before.get(k) != getattr(cfg, k)}
        if changed:
            say("branching: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
            if max(list_checkpoints(cfg.out_dir), default=0) > start_step:
                raise SystemExit(f"error: {cfg.out_dir} holds checkpoints after step {start_step} "
                                 f"from the other schedule; branch into a new out_dir")
        if master and os.path.isfile(log_path):  # forget what was logged after the checkpoint
            with open(log_path) as f:
                records = [r for r in map(json.loads, f) if r["step"] <= start_step]
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))

    raw_model = model  # what is saved and sampled from
    if use_compile:
        model = torch.compile(model)
    eval_model = model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # bookkeeping
    flops = flops_per_token(raw_model, cfg.block_size)
    peak = (cfg.peak_flops or peak_flops(device.type, dtype)) * world_size
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_run_record(cfg, raw_model.config, argv, world_size, device)
        if not cfg.sft_data:  # an SFT run wrote its chat tokenizer there already
            copy_tokenizer(cfg.data_dir, cfg.out_dir, meta)
        log_file = open(log_path, "a")
    say(f"{raw_model.num_params() / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs per token | "
        f"{world_size} process(es) on {device.type}, {str(dtype).removeprefix('torch.')}, "
        f"compile {use_compile} | {grad_accum} micro-steps of {cfg.batch_size} x {cfg.block_size}"
        f" per step ({cfg.total_batch_size} tokens)")
    wandb = None
    if cfg.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: wandb_log=True needs wandb: pip install wandb") from None
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                   config={**asdict(cfg), **asdict(raw_model.config)})
    progress = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=cfg.max_iters, initial=start_step, unit="step", dynamic_ncols=True)
    write_line = progress.write if progress is not None else print if master else lambda line: None

    def fetch():
        """The next step's micro-batches, on their way to the device, each micro-step's weight
        in the step's loss, and the tokens read (all processes, padding left out)."""
        x, y = train_loader.next_batch(grad_accum)
        x, y = [to_device(t, device) for t in x], [to_device(t, device) for t in y]
        return x, y, micro_step_weights(y, world_size), train_loader.step_tokens

    def log(record):
        records.append(record)
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if wandb is not None:
                wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    if checkpoint is not None:
        rng = checkpoint["rng"]
        if len(rng) == world_size:
            set_rng_state(rng[rank])
        else:
            say(f"note: the checkpoint has the RNG states of {len(rng)} processes, this run "
                f"{world_size}: reseeding instead")
            torch.manual_seed(cfg.seed + start_step + rank)
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs between processes
    step = start_step
    tokens = checkpoint.get("tokens", step * cfg.total_batch_size) if checkpoint else 0
    data_position = train_loader.state_dict()  # where the next step's data begins
    x, y, weights, step_tokens = fetch()
    if checkpoint is None and step < cfg.max_iters:  # the loss before any training
        val_loss = evaluate(eval_model, val_loader, cfg.eval_iters, device, autocast, ddp)
        write_line(f"step {step:6d}/{cfg.max_iters} | val loss {val_loss:.4f}")
        log({"step": step, "tokens": 0, "val_loss": val_loss})
    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    stopped = False
    raw_model.train()
    with StopRequest(ddp, backend) as stop:  # Ctrl-C: finish the step, save, stop
        while step < cfg.max_iters and not stopped:
            lr = wsd_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)  # summed on the device: no sync here
            for micro_step in range(grad_accum):
                if ddp:  # average gradients across processes once, after the last micro-step
                    model.require_backward_grad_sync = micro_step == grad_accum - 1
                with autocast:
                    _, loss = model(x[micro_step], y[micro_step], keep_logits=False)
                step_loss += loss.detach() * weights[micro_step]
                (loss * weights[micro_step]).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       cfg.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += step_tokens
            window_tokens += step_tokens
            data_position = train_loader.state_dict()
            x, y, weights, step_tokens = fetch()  # the host reads on while the device works
            step += 1
            window_steps += 1
            if progress is not None:
                progress.update(1)
            stopped = stop()
            last = step == cfg.max_iters

            # log, evaluate, save
            record, parts = {}, [f"step {step:6d}/{cfg.max_iters}"]
            if step % cfg.log_interval == 0 or last or stopped:
                if ddp:  # the mean over every supervised target of every process
                    dist.all_reduce(step_loss)
                    step_loss /= world_size
                train_loss = step_loss.item()  # the one host-device sync of a logged step
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = window_tokens / elapsed
                mfu = flops * tokens_per_sec / peak if peak else None
                record = {"step": step, "tokens": tokens,
                          "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                          "tokens_per_sec": tokens_per_sec, "mfu": mfu, "time": time.time()}
                parts += [f"loss {train_loss:.4f}", f"lr {lr:.2e}",
                          f"norm {record['grad_norm']:.2f}", f"{tokens_per_sec:,.0f} tok/s"]
                parts += [f"MFU {mfu:.1%}"] if mfu is not None else []
                parts += [f"ETA {format_duration((cfg.max_iters - step) * elapsed / window_steps)}"]
                if progress is not None:
                    progress.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
                stop_if_diverged(step, cfg, loss=train_loss, grad_norm=record["grad_norm"])
            if (cfg.eval_interval and step % cfg.eval_interval == 0 or last) and not stopped:
                record.setdefault("step", step)
                record.setdefault("tokens", tokens)
                record["val_loss"] = evaluate(eval_model, val_loader, cfg.eval_iters, device,
                                              autocast, ddp)
                parts.append(f"val loss {record['val_loss']:.4f}")
            if record:
                write_line(" | ".join(parts))
                log(record)
            saved = cfg.save_interval and step % cfg.save_interval == 0 or last or stopped
            if saved:  # never a checkpoint of non-finite weights, logged step or not
                stop_if_diverged(step, cfg, grad_norm=grad_norm.item(),
                                 a_weight=finite_weights(raw_model))
                path = os.path.join(cfg.out_dir, f"ckpt_{step:06d}.pt")
                save_checkpoint(path, raw_model, optimizer, step, cfg, data_position, master,
                                tokens=tokens,
                                val_loss=record.get("val_loss"))
                if stopped:
                    say(f"saved {path}")
            if "val_loss" in record and master:
                plot_losses(os.path.join(cfg.out_dir, "loss.png"), records)
            if record or saved:  # time the next window from here
                window_start, window_steps, window_tokens = time.perf_counter(), 0, 0

    if progress is not None:
        progress.close()
    if master:
        log_file.close()
        if wandb is not None:
            wandb.finish()
    if cfg.sft_data and master and not stopped:
        directory = export_hf(raw_model, cfg.out_dir)
        say(f"exported {directory}: transformers and sample.py --chat load it")
        if cfg.sample_tokens:
            print_chat_sample(directory, cfg, device)
    elif cfg.sample_tokens and master and not stopped:
        print_sample(raw_model, cfg, meta, device)
    if ddp:
        dist.destroy_process_group()


def print_sample(model, cfg, meta, device):
    """Generate from the trained model and print the text (stdout)."""
    path = os.path.join(cfg.data_dir, meta.get("tokenizer", {}).get("path", "tokenizer.model"))
    if not os.path.isfile(path):
        print(f"no tokenizer at {path}: no sample", file=sys.stderr)
        return
    tokenizer = load_tokenizer(path)
    # in the shards every document follows the end-of-text token of the one before
    start = [tokenizer.eot_id] + (tokenizer.encode([cfg.sample_prompt])[0] if cfg.sample_prompt
                                  else [])
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([start], device=device), cfg.sample_tokens,
                             temperature=0.8, top_k=50, eos_token_id=tokenizer.eot_id)
    print("-" * 36 + " sample " + "-" * 36)
    print(tokenizer.decode(out[0, 1:].tolist()))
    print("-" * 80, flush=True)


def print_chat_sample(directory, cfg, device):
    """Ask the exported chat model sample_prompt through sample.py, greedily (stdout)."""
    print("-" * 36 + " sample " + "-" * 36)
    print(f"user: {cfg.sample_prompt or 'Hello!'}", flush=True)
    sample_main([f"--init_from={directory}", "--chat", f"--start={cfg.sample_prompt or 'Hello!'}",
                 f"--max_new_tokens={cfg.sample_tokens}", "--temperature=0",
                 f"--device={device}"])
    print("-" * 80, flush=True)


if __name__ == "__main__":
    main()

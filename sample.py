"""
Talk to a Doge: text continuation or chat, from a train.py run or a Hugging Face Doge directory.

    python sample.py                                     # the newest checkpoint of the tiny demo
    python sample.py --out_dir=out/doge-20m --start="def fib(n):" --num_samples=3
    python sample.py --init_from=models/Doge-20M --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=models/Doge-20M-Instruct --chat          # interactive
    python sample.py --init_from=SmallDoge/Doge-20M-Instruct --chat       # fetched from the hub
    python sample.py --init_from=models/Doge-20M-Instruct --chat --start="Hi, who are you?"

Generated text goes to stdout as it is produced; everything else (loading, tokens/s) to stderr.
A Hugging Face directory needs config.json, the weights and tokenizer.json (read with the optional
`tokenizers` package); a hub name (owner/name[@revision]) that is no local path is fetched into
the hub's cache with the optional `huggingface_hub` package. Chat needs the model's chat template
(tokenizer_config.json or chat_template.jinja, rendered with the optional `jinja2` package).
transformers is not needed.
"""

import os
import sys
import time
from dataclasses import dataclass

import torch

from configurator import apply_config
from doge import Doge, local_model_path
from prepare_data import (END_OF_TURN_TOKENS, document_start, load_chat_template,
                          load_text_tokenizer, read_json, render_chat, token_text,
                          tokenizer_directory)


@dataclass
class SampleConfig:
    out_dir: str = "out/doge-tiny"  # a train.py run: its newest checkpoint is used
    init_from: str = ""  # instead: a Hugging Face Doge directory or hub name, or a checkpoint file
    start: str = ""  # the prompt, or FILE:path to read it from a file
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 200
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 1337
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    chat: bool = False  # chat with an Instruct model using its chat template


def log(message):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Loading


def model_location(cfg):
    """The local path of the model: --init_from (a hub name is fetched, see
    doge.local_model_path), or else out_dir."""
    if cfg.init_from:
        try:
            return local_model_path(cfg.init_from)
        except FileNotFoundError as e:
            raise SystemExit(f"error: --init_from={e}") from None
    if not os.path.exists(cfg.out_dir):
        hint = ("train one with `python train.py config/doge_tiny.py`, or give "
                "--init_from=DIR with a Hugging Face Doge directory or hub name")
        raise SystemExit(f"error: no checkpoint found: {cfg.out_dir} does not exist; {hint}")
    return cfg.out_dir


def load_model(path, device, dtype):
    try:
        return Doge.from_pretrained(path, device=device, dtype=dtype).eval()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def stop_ids(model, tokenizer, directory):
    """Every id that ends generation: config.json's and generation_config.json's eos ids, and the
    tokenizer's own end-of-text and end-of-turn tokens."""
    ids = {tokenizer.eot_id}
    for value in (model.config.eos_token_id,
                  read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id")):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    tokenizer_config = read_json(os.path.join(directory, "tokenizer_config.json"))
    for text in (token_text(tokenizer_config.get("eos_token")), *END_OF_TURN_TOKENS):
        if text is not None and tokenizer.token_to_id(text) is not None:
            ids.add(tokenizer.token_to_id(text))
    return sorted(ids)


# ----------------------------------------------------------------------------------------------
# Generation with streaming


def stream_reply(model, tokenizer, prompt_ids, cfg, stop, device):
    """Generate after prompt_ids, printing text as it comes; returns the new text."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new_ids, printed = [], ""
    start_time = time.perf_counter()
    for token in model.generate_stream(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                       cfg.top_p, cfg.repetition_penalty, stop):
        token = token.item()
        if token in stop:
            break
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    seconds = time.perf_counter() - start_time
    text = tokenizer.decode(new_ids)
    sys.stdout.write(text[len(printed):] + "\n")
    sys.stdout.flush()
    log(f"[{len(new_ids)} tokens, {len(new_ids) / max(seconds, 1e-9):.1f} tokens/s]")
    return text


def chat_loop(model, tokenizer, chat_template, cfg, stop, device):
    """One answer to --start, or a conversation typed at the prompt."""
    if not cfg.start:
        log("chat: type a message; /reset starts over, /exit (or Ctrl-D) quits")
    messages = []
    while True:
        if cfg.start:
            if messages:  # --start gets its one answer
                return
            question = cfg.start
        else:
            try:
                question = input("> ")
            except EOFError:
                return
            if question.strip() == "/exit":
                return
            if question.strip() == "/reset":
                messages = []
                log("(conversation cleared)")
                continue
        messages.append({"role": "user", "content": question})
        prompt_ids = tokenizer.encode([render_chat(chat_template, messages)])[0]
        answer = stream_reply(model, tokenizer, prompt_ids, cfg, stop, device)
        messages.append({"role": "assistant", "content": answer})


def prompt_ids(tokenizer, text):
    """The prompt as the model is given it (see Tokenizer.encode_prompt). An empty prompt of a
    tokenizer.json that adds nothing starts from document_start (begin-of-text, or end-of-text)."""
    return tokenizer.encode_prompt(text) or [document_start(tokenizer)]


def resolve_device_dtype(cfg):
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    if cfg.dtype not in names:
        raise SystemExit(f"error: dtype {cfg.dtype!r}: choose auto, {', '.join(names)}")
    return device, names[cfg.dtype]


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[len("FILE:"):], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"error: --start={start}: {e.strerror}") from None


def main(argv=None):
    cfg = apply_config(SampleConfig(), sys.argv[1:] if argv is None else argv)
    try:
        sample(cfg)
    except ValueError as e:  # the data side's errors: unreadable files, a failing chat template
        raise SystemExit(f"error: {e}") from None


def sample(cfg):
    cfg.start = read_prompt(cfg.start)
    device, dtype = resolve_device_dtype(cfg)
    torch.manual_seed(cfg.seed)
    path = model_location(cfg)
    model = load_model(path, device, dtype)
    directory = tokenizer_directory(path)
    tokenizer = load_text_tokenizer(directory, model.config.vocab_size)
    stop = stop_ids(model, tokenizer, directory)
    log(f"loaded {path}: {model.num_params() / 1e6:.1f}M parameters on {device} ({dtype})")
    if cfg.chat:
        chat_template = load_chat_template(directory)
        if chat_template is None:
            raise SystemExit(f"error: {directory} has no chat template (tokenizer_config.json "
                             f"'chat_template' or chat_template.jinja): --chat needs an Instruct model")
        chat_loop(model, tokenizer, chat_template, cfg, stop, device)
        return
    start_ids = prompt_ids(tokenizer, cfg.start)
    for _ in range(cfg.num_samples):
        sys.stdout.write(cfg.start)
        stream_reply(model, tokenizer, start_ids, cfg, stop, device)
        if cfg.num_samples > 1:
            print("---------------")


if __name__ == "__main__":
    main()

"""
Talk to a Doge: text continuation or chat, from a train.py run or a Hugging Face Doge directory.

    python sample.py                                     # the newest checkpoint of the tiny demo
    python sample.py --out_dir=out/doge-20m --start="def fib(n):" --num_samples=3
    python sample.py --init_from=models/Doge-20M --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=models/Doge-20M-Instruct --chat          # interactive
    python sample.py --init_from=SmallDoge/Doge-20M-Instruct --chat       # fetched from the hub
    python sample.py --init_from=models/Doge-20M-Instruct --chat --start="Hi, who are you?"
    python sample.py --init_from=models/Doge-20M-Instruct --chat < questions.txt   # piped
    python sample.py --chat_state=talk.pt      # after /save: goes on with the model that made it

Generated text goes to stdout as it is produced; everything else (loading, tokens/s) to stderr.
The chat keeps the model's state between turns (at most keep_window_size keys per layer), so a
turn costs the same however long the conversation.
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

from common import atomic_write, busy_machine_note, size_text
from configurator import apply_config
from doge import Doge, local_model_path, model_fingerprint
from tokenizer import (document_start, end_of_turn_text, load_chat_template, load_text_tokenizer,
                       render_chat, stop_ids, tokenizer_directory)


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
    chat_state: str = ""  # continue the conversation that /save wrote to this file (implies chat;
    # without init_from or out_dir, with the model that made it)


def log(message):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Loading


def model_location(cfg):
    """The local path of the model: --init_from (a hub name is fetched, see
    doge.local_model_path), or else out_dir; with --chat_state alone, the model that made it."""
    if cfg.chat_state and not cfg.init_from and cfg.out_dir == SampleConfig.out_dir:
        cfg.init_from = read_chat_state(cfg.chat_state).get("model", {}).get("path", "")
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


# ----------------------------------------------------------------------------------------------
# Generation with streaming


def stream_reply(model, tokenizer, prompt_ids, cfg, stop, device, cache=None):
    """Generate after prompt_ids (continuing cache when given), printing text as it comes.
    Returns the new text, the tokens generated (a stop token included: the cache holds it) and
    "N tokens, R tokens/s"."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new_ids, printed = [], ""
    start_time = time.perf_counter()
    for token in model.generate_stream(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                       cfg.top_p, cfg.repetition_penalty, stop, cache):
        new_ids.append(token.item())
        if new_ids[-1] in stop:
            break
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    seconds = time.perf_counter() - start_time
    text = tokenizer.decode([token for token in new_ids if token not in stop])
    sys.stdout.write(text[len(printed):] + "\n")
    sys.stdout.flush()
    return text, new_ids, f"{len(new_ids)} tokens, {len(new_ids) / max(seconds, 1e-9):.1f} tokens/s"


# ----------------------------------------------------------------------------------------------
# Chat


class Chat:
    """A conversation and the model's state after it. Each turn feeds the model only its new
    tokens (the template's text for the new user message and the assistant header) after the
    state, so a turn costs the same however long the conversation. The reply stays in the state
    as the tokens generated, then the template's end-of-turn tokens. For a template whose
    rendering of a longer conversation does not extend the shorter one's, every turn re-encodes
    the whole conversation instead."""

    def __init__(self, model, tokenizer, chat_template, cfg, stop, device):
        self.model, self.tokenizer, self.template = model, tokenizer, chat_template
        self.cfg, self.stop, self.device = cfg, stop, device
        self.end_of_turn = end_of_turn_text(chat_template)
        self.fingerprint = None  # of the model, once a save or load needs it
        if self.end_of_turn is None:
            log("chat template: a longer conversation's text does not extend a shorter one's, "
                "so each turn re-encodes the whole conversation")
        self.reset()

    def reset(self):
        self.messages, self.cache = [], self.model.new_cache()

    def held_text(self):
        """The conversation so far as the template renders it: what the state holds."""
        if not self.messages:
            return ""
        return render_chat(self.template, self.messages, add_generation_prompt=False)

    def answer(self, question):
        """Stream the reply to question, and keep both in the conversation and the state."""
        held = self.held_text()
        self.messages.append({"role": "user", "content": question})
        text = render_chat(self.template, self.messages)
        if self.end_of_turn is None or not text.startswith(held):  # start the state over
            self.cache, held = self.model.new_cache(), ""
        prompt_ids = self.tokenizer.encode([text[len(held):]])[0]
        answer, new_ids, speed = stream_reply(self.model, self.tokenizer, prompt_ids, self.cfg,
                                              self.stop, self.device, self.cache)
        self.messages.append({"role": "assistant", "content": answer})
        if self.end_of_turn:
            end_ids = self.tokenizer.encode([self.end_of_turn])[0]
            if new_ids and end_ids[:1] == new_ids[-1:]:  # the model ended its turn itself
                end_ids = end_ids[1:]
            if end_ids:
                with torch.no_grad():
                    self.model(torch.tensor([end_ids], device=self.device), cache=self.cache)
        log(f"[{speed}; conversation {self.cache.length} tokens, state "
            f"{size_text(self.cache.state_bytes())}]")

    def model_record(self):
        """What made the conversation: the model as given (--init_from, else out_dir) and its
        fingerprint (doge.model_fingerprint), computed once."""
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(self.model)
        return {"path": self.cfg.init_from or self.cfg.out_dir, "fingerprint": self.fingerprint}

    def save(self, path):
        """The conversation (messages and state) and the model that made it, as one file,
        written atomically."""
        saved = {"messages": self.messages, "state": self.cache.state_dict(),
                 "model": self.model_record()}
        atomic_write(path, lambda temp_path: torch.save(saved, temp_path))

    def load(self, path):
        """Continue the conversation that save wrote to path, if this model made it."""
        saved, ours = read_chat_state(path), self.model_record()
        theirs = saved.get("model", ours)  # a file from before the record: the shape decides
        if theirs["fingerprint"] != ours["fingerprint"]:
            made_by = f"{theirs['path']} (fingerprint {theirs['fingerprint']})"
            raise ValueError(
                f"--chat_state={path} was made by {made_by}, not by this model, {ours['path']} "
                f"(fingerprint {ours['fingerprint']}): give --init_from={theirs['path']}, or "
                f"leave --init_from and --out_dir out" if theirs["path"] != ours["path"] else
                f"--chat_state={path} was made by {made_by} as it was then; it holds another "
                f"model now (fingerprint {ours['fingerprint']})")
        try:
            self.cache = self.model.load_cache(saved["state"])
        except ValueError as e:
            raise ValueError(f"--chat_state={path}: {e}") from None
        self.messages = saved["messages"]
        log(f"continuing {path}: {len(self.messages)} messages, {self.cache.length} tokens")


def read_chat_state(path):
    """What Chat.save wrote to path: messages, state and (since it records it) the model."""
    if not os.path.isfile(path):
        raise ValueError(f"--chat_state={path}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file: torch raises many kinds
        raise ValueError(f"--chat_state={path}: not a saved conversation "
                         f"({type(e).__name__})") from None
    if not isinstance(saved, dict) or not {"messages", "state"} <= saved.keys():
        raise ValueError(f"--chat_state={path}: not a saved conversation (no messages and state)")
    return saved


COMMANDS = ("/save FILE keeps the conversation, /reset starts over, /exit (or Ctrl-D) quits, "
            "//text sends a message that starts with /")


def user_lines():
    """The user's lines: typed at a "> " prompt on a terminal, else read from stdin as they come
    (no prompt, so piped output holds only the replies)."""
    if not sys.stdin.isatty():
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    log(f"chat: type a message; {COMMANDS}")
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()  # the shell's prompt on a line of its own
            return


def save(chat, path):
    """/save FILE: a bad name costs a line on stderr, not the conversation."""
    if not path:
        log("/save needs a file name: /save FILE")
        return
    try:
        chat.save(path)
    except OSError as e:
        log(f"/save {path}: {e.strerror}")
        return
    log(f"(conversation saved to {path})")


def chat_loop(chat, cfg):
    """One answer to --start, or a conversation from user_lines. An empty line is no message."""
    if cfg.start:
        chat.answer(cfg.start)
        return
    for line in user_lines():
        command, _, argument = line.strip().partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            chat.reset()
            log("(conversation cleared)")
        elif command == "/save":
            save(chat, argument.strip())
        elif line.lstrip().startswith("//"):  # a message that starts with /
            chat.answer(line.lstrip()[1:])
        elif command.startswith("/"):
            log(f"unknown command {command}: {COMMANDS}")
        elif line.strip():
            chat.answer(line)


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
    if busy := busy_machine_note():
        log(busy)
    device, dtype = resolve_device_dtype(cfg)
    torch.manual_seed(cfg.seed)
    path = model_location(cfg)
    model = load_model(path, device, dtype)
    directory = tokenizer_directory(path)
    tokenizer = load_text_tokenizer(directory, model.config.vocab_size)
    stop = stop_ids(model, tokenizer, directory)
    log(f"loaded {path}: {model.num_params() / 1e6:.1f}M parameters on {device} ({dtype})")
    if cfg.chat or cfg.chat_state:
        chat_template = load_chat_template(directory)
        if chat_template is None:
            raise SystemExit(f"error: {directory} has no chat template (tokenizer_config.json "
                             f"'chat_template' or chat_template.jinja): --chat needs an Instruct model")
        chat = Chat(model, tokenizer, chat_template, cfg, stop, device)
        if cfg.chat_state:
            chat.load(cfg.chat_state)
        chat_loop(chat, cfg)
        return
    start_ids = prompt_ids(tokenizer, cfg.start)
    for _ in range(cfg.num_samples):
        sys.stdout.write(cfg.start)
        log(f"[{stream_reply(model, tokenizer, start_ids, cfg, stop, device)[2]}]")
        if cfg.num_samples > 1:
            print("---------------")


if __name__ == "__main__":
    main()

"""
Talk to a Doge: text continuation or chat, from a train.py run or a Hugging Face Doge directory.

    python sample.py                                     # the newest checkpoint of the tiny demo
    python sample.py --out_dir=out/doge-20m --start="def fib(n):" --num_samples=3
    python sample.py --init_from=models/Doge-20M --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=models/Doge-20M-Instruct --chat          # interactive
    python sample.py --init_from=models/Doge-20M-Instruct --chat < questions.txt   # piped
    python sample.py --chat_state=talk.pt      # after /save: goes on with the model that made it

Generated text goes to stdout as it is produced; everything else (loading, tokens/s) to stderr.
The generation and the chat's turns, at constant cost, are engine.py's, the core serve.py stands
on too. docs/sampling.md tells the rest: hub names, the optional packages, /save, --chat_state.
"""

import os
import sys
from dataclasses import dataclass
from functools import cached_property

import torch

from common import atomic_write, busy_machine_note, device_and_dtype, log, size_text
from configurator import apply_config
from doge import model_fingerprint
from engine import (Chat, ReplyText, Sampling, Turns, generate_reply, load_for_generation,
                    prompt_ids)


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
    chat_state: str = ""  # a /save file to continue (implies chat; alone: with the model it names)


def model_location(cfg):
    """Where the model is: --init_from (a hub name is fetched, see doge.local_model_path), or
    else out_dir; with --chat_state alone, the model that made it."""
    if cfg.chat_state and not cfg.init_from and cfg.out_dir == SampleConfig.out_dir:
        cfg.init_from = read_chat_state(cfg.chat_state).get("model", {}).get("path", "")
    if cfg.init_from:
        return cfg.init_from
    if not os.path.exists(cfg.out_dir):
        hint = ("train one with `python train.py config/doge_tiny.py`, or give "
                "--init_from=DIR with a Hugging Face Doge directory or hub name")
        raise SystemExit(f"error: no checkpoint found: {cfg.out_dir} does not exist; {hint}")
    return cfg.out_dir


class Printer(ReplyText):
    """A reply on stdout as it comes, whole characters at a time."""

    def show(self, token):
        sys.stdout.write(self.add(token))
        sys.stdout.flush()

    def end(self, reply):
        """Print the rest of reply (an engine.Reply) and a newline: "N tokens, R tokens/s"."""
        sys.stdout.write(self.rest() + "\n")
        sys.stdout.flush()
        count = len(reply.tokens)
        return f"{count} tokens, {count / max(reply.seconds, 1e-9):.1f} tokens/s"


class SavedChat(Chat):
    """engine.Chat that /save writes to a file and --chat_state reads back, with its model."""

    def __init__(self, model, turns, sampling, model_path):
        super().__init__(model, turns, sampling)
        self.model_path = model_path  # the model as given: --init_from, else out_dir

    @cached_property
    def model_record(self):
        """What made the conversation: the model as given and its fingerprint, once needed."""
        return {"path": self.model_path, "fingerprint": model_fingerprint(self.model)}

    def save(self, path):
        """/save FILE: the conversation (messages and state) and the model that made it, as one
        file; a bad name costs a line on stderr, not the conversation."""
        if not path:
            log("/save needs a file name: /save FILE")
            return
        saved = {"messages": self.messages, "state": self.cache.state_dict(),
                 "model": self.model_record}
        try:
            atomic_write(path, lambda temp_path: torch.save(saved, temp_path))
            log(f"(conversation saved to {path})")
        except OSError as e:
            log(f"/save {path}: {e.strerror}")

    def load(self, path):
        """Continue the conversation that save wrote to path, if this model made it."""
        saved, ours = read_chat_state(path), self.model_record
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
    """What SavedChat.save wrote to path: messages, state and (since it records it) the model."""
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


def answer(chat, question):
    """Stream the reply to question, then its figures on stderr."""
    printer = Printer(chat.turns.tokenizer)
    reply = chat.answer(question, printer.show)
    log(f"[{printer.end(reply)}; conversation {chat.cache.length} tokens, state "
        f"{size_text(chat.cache.state_bytes())}]")


def chat_loop(chat, cfg):
    """One answer to --start, or a conversation from user_lines. An empty line is no message."""
    if cfg.start:
        answer(chat, cfg.start)
        return
    for line in user_lines():
        command, _, argument = line.strip().partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            chat.reset()
            log("(conversation cleared)")
        elif command == "/save":
            chat.save(argument.strip())
        elif line.lstrip().startswith("//"):  # a message that starts with /
            answer(chat, line.lstrip()[1:])
        elif command.startswith("/"):
            log(f"unknown command {command}: {COMMANDS}")
        elif line.strip():
            answer(chat, line)


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
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    loaded = load_for_generation(model_location(cfg), device, dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    log(f"loaded {loaded.path}: {model.num_params() / 1e6:.1f}M parameters on {device} ({dtype})")
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                        cfg.repetition_penalty)
    if cfg.chat or cfg.chat_state:
        chat_loop(start_chat(loaded, sampling, cfg), cfg)
        return
    start_ids = prompt_ids(tokenizer, cfg.start)
    for _ in range(cfg.num_samples):
        sys.stdout.write(cfg.start)
        printer = Printer(tokenizer)
        reply = generate_reply(model, tokenizer, start_ids, sampling, loaded.stop,
                               show=printer.show)
        log(f"[{printer.end(reply)}]")
        if cfg.num_samples > 1:
            print("---------------")


def start_chat(loaded, sampling, cfg):
    """The conversation: a new one, or --chat_state's."""
    if loaded.chat_template is None:
        raise SystemExit(f"error: {loaded.directory} has no chat template (tokenizer_config.json "
                         f"'chat_template' or chat_template.jinja): --chat needs an Instruct model")
    turns = Turns(loaded.chat_template, loaded.tokenizer, loaded.stop)
    if turns.end_of_turn is None:
        log("chat template: a longer conversation's text does not extend a shorter one's, "
            "so each turn re-encodes the whole conversation")
    chat = SavedChat(loaded.model, turns, sampling, cfg.init_from or cfg.out_dir)
    if cfg.chat_state:
        chat.load(cfg.chat_state)
    return chat


if __name__ == "__main__":
    main()

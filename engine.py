"""
The model loaded for a program, and the generation core that sample.py and serve.py are front
ends on: what they generate is decided here, once. Every state is a DogeCache of at most
keep_window_size keys a layer, so a turn costs the same however long the conversation.
"""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common import one_line
from doge import (Doge, DogeCache, decode_step, decoding_weights, join_caches, local_model_path,
                  output_logits, sample_next)
from tokenizer import (Tokenizer, document_start, end_of_turn_text, load_chat_template,
                       load_text_tokenizer, render_chat, stop_ids, tokenizer_directory)

# ----------------------------------------------------------------------------------------------
# Loading: whatever fails is one line (SystemExit)


def load_model(init_from, device="cpu", dtype=None, setting="--init_from="):
    """(the model in eval mode, its local path) of init_from: a Hugging Face Doge directory or hub
    name (fetched: doge.local_model_path), a train.py out_dir (its newest checkpoint) or checkpoint
    file, on device in dtype (None: as saved). A path that is not there is named after `setting`."""
    try:
        path = local_model_path(init_from)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {setting}{e}") from None
    try:
        return Doge.from_pretrained(path, device=device, dtype=dtype).eval(), path
    except (FileNotFoundError, ValueError) as e:  # they name the file and what is wrong
        raise SystemExit(f"error: {e}") from None
    except Exception as e:  # a damaged file: torch and safetensors raise many kinds
        raise SystemExit(f"error: {path}: {one_line(e)}") from None


@dataclass
class Loaded:
    """A model as a front end needs it."""
    model: Doge
    path: str  # where it was read (a hub name's local snapshot)
    directory: str  # where its tokenizer files lie
    tokenizer: Tokenizer
    chat_template: dict | None  # tokenizer.load_chat_template's, None without one
    stop: list  # every id that ends generation (tokenizer.stop_ids)


def load_for_generation(init_from, device="cpu", dtype=None, setting="--init_from="):
    """init_from's model (see load_model) with its tokenizer, chat template and stop ids."""
    model, path = load_model(init_from, device, dtype, setting)
    directory = tokenizer_directory(path)
    try:
        tokenizer = load_text_tokenizer(directory, model.config.vocab_size)
        stop = stop_ids(model, tokenizer, directory)
        return Loaded(model, path, directory, tokenizer, load_chat_template(directory), stop)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------
# One sequence (sample.py): model.generate_stream, on CUDA one captured CUDA graph a step


@dataclass
class Sampling:
    """How the next tokens are picked (doge.sample_next)."""
    max_tokens: int  # new tokens at most, a stop token included
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # > 1: the tokens this call fed or made become less likely


@dataclass
class Reply:
    text: str  # without stop tokens
    tokens: list  # the ids generated, a stop token included (the state holds it)
    seconds: float  # from the prompt to the last token


def prompt_ids(tokenizer, text):
    """A text prompt as the model is given it (see Tokenizer.encode_prompt). An empty prompt of a
    tokenizer.json that adds nothing starts from document_start (begin-of-text, or end-of-text)."""
    return tokenizer.encode_prompt(text) or [document_start(tokenizer)]


def reply_text(tokenizer, tokens, stop):
    return tokenizer.decode([token for token in tokens if token not in stop])


def generate_reply(model, tokenizer, prompt, sampling, stop, cache=None, show=None):
    """The Reply after the ids prompt (continuing cache, when given, which then holds both) until
    a stop token or max_tokens; show(id) sees each id but a stop token as it comes."""
    idx = torch.tensor([prompt], dtype=torch.long, device=model.lm_head.weight.device)
    tokens, start = [], time.perf_counter()
    for token in model.generate_stream(idx, sampling.max_tokens, sampling.temperature,
                                       sampling.top_k, sampling.top_p,
                                       sampling.repetition_penalty, stop, cache):
        tokens.append(token.item())
        if tokens[-1] in stop:
            break
        if show is not None:
            show(tokens[-1])
    return Reply(reply_text(tokenizer, tokens, stop), tokens, time.perf_counter() - start)


class ReplyText:
    """The text a front end shows of a reply's ids as they come: decoded as whole characters,
    cut before the first of stop_strings (and holding back what could begin one)."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.ids, self.sent, self.stopped = [], 0, False

    def add(self, token):
        """The new text that can be sent after token."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        cuts = [text.find(stop) for stop in self.stop_strings if stop in text]
        if cuts:
            self.stopped = True
            return self.take(text[:min(cuts)])
        held_back = max((len(stop) - 1 for stop in self.stop_strings), default=0)
        return self.take(text[:len(text) - held_back])

    def rest(self):
        return "" if self.stopped else self.take(self.tokenizer.decode(self.ids))

    def take(self, text):
        new, self.sent = text[self.sent:], max(self.sent, len(text))
        return new


@torch.inference_mode()
def feed(model, tokens, cache):
    """Feed the ids tokens to the model after what cache holds (which then holds them too)."""
    if tokens:
        model.hidden_states(torch.tensor([tokens], device=model.lm_head.weight.device), cache)


# ----------------------------------------------------------------------------------------------
# A chat's turn: the new message's text after what the state holds, the reply, then the
# template's end of turn (the end-of-turn rule: Turns.after_reply)


class Turns:
    """A chat template as turns over one state, which together are the template's rendering of
    the whole conversation. For a template whose rendering of a longer conversation does not
    extend the shorter one's (end_of_turn None), each turn is the whole conversation."""

    def __init__(self, chat_template, tokenizer, stop):
        self.template, self.tokenizer, self.stop = chat_template, tokenizer, stop
        self.end_of_turn = end_of_turn_text(chat_template)
        self.end_ids = tokenizer.encode([self.end_of_turn])[0] if self.end_of_turn else []

    def held(self, messages):
        """The text of the finished conversation messages: what the state after it holds."""
        return render_chat(self.template, messages, add_generation_prompt=False) if messages else ""

    def prompt(self, messages, held):
        """What messages' turn feeds after a state that holds the text held: (its new text,
        True), or (the whole conversation, False: a new state) where the rendering of messages
        does not extend held."""
        text = render_chat(self.template, messages)  # up to where the answer begins
        if self.end_of_turn is None or not text.startswith(held):
            return text, False
        return text[len(held):], True

    def reply(self, tokens):
        """The reply's message, of the ids generated."""
        return {"role": "assistant", "content": reply_text(self.tokenizer, tokens, self.stop)}

    def after_reply(self, tokens):
        """The ids that follow the reply tokens (its last one included) in the state: the end of
        turn, less its first id when the reply ends with it (the model ended its turn itself)."""
        if tokens and self.end_ids[:1] == tokens[-1:]:
            return self.end_ids[1:]
        return self.end_ids


class Chat:
    """A conversation and the model's state after it, turn by turn (sample.py's chat)."""

    def __init__(self, model, turns, sampling):
        self.model, self.turns, self.sampling = model, turns, sampling
        self.reset()

    def reset(self):
        self.messages, self.cache = [], self.model.new_cache()

    def answer(self, question, show=None):
        """The Reply to question (show sees it come, see generate_reply), kept with question in
        the conversation and the state."""
        held = self.turns.held(self.messages)
        self.messages.append({"role": "user", "content": question})
        text, continues = self.turns.prompt(self.messages, held)
        if not continues:
            self.cache = self.model.new_cache()
        tokenizer = self.turns.tokenizer
        reply = generate_reply(self.model, tokenizer, tokenizer.encode([text])[0], self.sampling,
                               self.turns.stop, self.cache, show)
        self.messages.append(self.turns.reply(reply.tokens))
        feed(self.model, self.turns.after_reply(reply.tokens), self.cache)
        return reply


# ----------------------------------------------------------------------------------------------
# Many sequences (serve.py): rows that join and leave one ragged cache (doge.join_caches), a
# token a row a step (doge.decode_step); not captured on CUDA: its shapes change with the rows.
# The state each row leaves is kept (States) for the request that continues it.


@dataclass
class Kept:
    state: dict  # DogeCache.state_dict() of the tokens held
    pending: list  # tokens known to follow, not yet fed (the reply's last token, end of turn)
    text: str | None  # a chat's rendering that the tokens held and pending spell (else None)
    size: int  # bytes


class States:
    """Kept states, least recently used first, at most limit bytes; a request continues the
    longest one that its rendered text (a chat) or its tokens extend. One thread uses it."""

    def __init__(self, limit):
        self.limit, self.kept, self.bytes = limit, OrderedDict(), 0
        self.hits = self.misses = 0

    def keep(self, tokens, state, pending, text):
        key = tuple(tokens)
        self.drop(key)
        size = sum(t.nelement() * t.element_size() for t in state.values()
                   if isinstance(t, torch.Tensor))
        self.kept[key], self.bytes = Kept(state, pending, text, size), self.bytes + size
        while self.bytes > self.limit:
            self.drop(next(iter(self.kept)))

    def drop(self, key):
        if key in self.kept:
            self.bytes -= self.kept.pop(key).size

    def continued(self, text=None, tokens=None):
        """(tokens held, Kept) of the longest kept state that text or tokens extend, or None."""
        best = None
        for key, kept in self.kept.items():
            if text is not None:
                extends = kept.text is not None and len(kept.text) < len(text) and \
                    text.startswith(kept.text)
            else:
                covered = list(key) + kept.pending
                extends = len(covered) < len(tokens) and tokens[:len(covered)] == covered
            if extends and (best is None or len(key) > len(best[0])):
                best = (key, kept)
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.kept.move_to_end(best[0])
        return best

    def figures(self):
        return {"kept": len(self.kept), "bytes": self.bytes, "limit_bytes": int(self.limit),
                "hits": self.hits, "misses": self.misses}


@dataclass
class Row:
    """A sequence that a Batch generates: a chat (messages, rendered by the template) or a text
    prompt, how to sample it, and send, which the Batch calls with ("token", id) for each id
    generated but a stop token, then ("end", finish_reason, usage)."""
    messages: list | None
    prompt: str | None
    sampling: Sampling
    send: Callable
    seed: int | None = None  # the row's own random draws; None: torch's global generator
    cancelled: bool = False  # set by the front end: the row ends at the next step
    held: list = field(default_factory=list)  # the tokens its cache holds
    to_feed: list = field(default_factory=list)  # pieces of the prompt not yet fed
    generated: list = field(default_factory=list)
    cache: DogeCache | None = None  # its own while its prompt is fed, then a row of the batch's
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V): the ids the repetition penalty sees
    prompt_tokens: int = 0
    continues: tuple | None = None  # the key of the kept state it continues


class Batch:
    """The sequences generated together: a Row continues the kept state its prompt extends,
    feeds the rest on its own, prefill_chunk tokens a step, then decodes with the others."""

    def __init__(self, model, tokenizer, stop, turns=None, state_memory=2e9, prefill_chunk=512,
                 max_prompt_tokens=65536):
        self.model, self.tokenizer, self.stop, self.turns = model, tokenizer, set(stop), turns
        self.states = States(state_memory)
        self.prefill_chunk, self.max_prompt_tokens = prefill_chunk, max_prompt_tokens
        self.device = model.lm_head.weight.device
        self.feeding = []  # rows whose prompts are being fed
        self.rows = []  # rows being decoded, in the cache's row order
        self.cache = None
        self.weights = None  # doge.decoding_weights, made at the first step

    def __len__(self):
        return len(self.feeding) + len(self.rows)

    def add(self, row):
        """Start row: find the tokens it continues (a kept state's) and those it feeds. A
        ValueError refuses it (a prompt too long, messages the template cannot render)."""
        if row.messages is not None:
            try:
                text = render_chat(self.turns.template, row.messages)
            except Exception as e:  # jinja2's errors too: the template refuses these messages
                raise ValueError(f"the chat template cannot render these messages: {e}") from None
            found = None if self.turns.end_of_turn is None else self.states.continued(text=text)
            new = self.tokenizer.encode([text[len(found[1].text):] if found else text])[0]
        else:
            tokens = prompt_ids(self.tokenizer, row.prompt)
            found = self.states.continued(tokens=tokens)
            new = tokens[len(found[0]) + len(found[1].pending):] if found else tokens
        held, kept = found or ((), None)
        pending = kept.pending if kept else []
        row.held, row.continues = list(held), found[0] if found else None
        row.prompt_tokens = len(held) + len(pending) + len(new)
        if row.prompt_tokens > self.max_prompt_tokens:
            raise ValueError(f"the prompt is {row.prompt_tokens} tokens, more than this server's "
                             f"limit of {self.max_prompt_tokens}")
        row.to_feed = self.pieces(row.prompt_tokens, pending, new)
        row.cache = self.model.load_cache(kept.state) if kept else self.model.new_cache()
        if row.seed is not None:
            row.generator = torch.Generator(self.device).manual_seed(row.seed)
        if row.sampling.repetition_penalty != 1.0:
            row.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool,
                                   device=self.device)
            row.seen[0, pending + new] = True
        self.feeding.append(row)

    @torch.inference_mode()
    def step(self):
        """Feed a piece of each prompt being fed, then decode one token for every row."""
        if self.weights is None:
            self.weights = decoding_weights(self.model)
        joining = [row for row in self.feeding if self.feed(row)]
        self.feeding = [row for row in self.feeding if row.to_feed]
        self.regroup([row for row in joining if not self.finished(row)])
        if self.rows:
            self.decode()

    def clear(self):
        """Drop every row (after a failure): the rows that were in flight."""
        rows, self.feeding, self.rows, self.cache = self.feeding + self.rows, [], [], None
        return rows

    def pieces(self, length, pending, new):
        """The pieces that feed pending, then new, prefill_chunk tokens at most, to a state that
        ends at length. Past max_position_embeddings dynamic RoPE's base follows the length fed
        so far: there the pieces are Chat's (the reply's last token, the end of turn, the text)."""
        config = self.model.config
        pieces = [pending + new]
        if (config.rope_scaling or {}).get("rope_type") == "dynamic" and \
                length > config.max_position_embeddings:
            pieces = [piece for piece in (pending[:1], pending[1:], new) if piece]
        return [piece[i:i + self.prefill_chunk] for piece in pieces
                for i in range(0, len(piece), self.prefill_chunk)]

    def feed(self, row):
        """Feed the next piece of row's prompt; at its end, pick its first token: True."""
        chunk = row.to_feed.pop(0)
        hidden = self.model.hidden_states(torch.tensor([chunk], device=self.device), row.cache)
        row.held += chunk
        if row.to_feed:
            return False
        self.emit(row, output_logits(hidden[:, -1], self.weights[-1], self.model.config.vocab_size))
        return True

    def emit(self, row, logits, best=None):
        """Pick row's next token from its logits (1, V) and send it. best: the argmax, when the
        step found it for every row at once."""
        how = row.sampling
        if best is not None and how.temperature == 0 and how.repetition_penalty == 1.0:
            token = best
        else:
            token = sample_next(logits, row.seen, how.temperature, how.top_k, how.top_p,
                                how.repetition_penalty, row.generator).item()
        row.generated.append(token)
        if row.seen is not None:
            row.seen[0, token] = True
        if token not in self.stop:
            row.send("token", token)

    def finished(self, row):
        """End row if it is done (a stop token, max_tokens, or cancelled): True."""
        if row.generated[-1] in self.stop or row.cancelled:  # a row here has its first token
            self.end(row, "stop")
        elif len(row.generated) >= row.sampling.max_tokens:
            self.end(row, "length")
        else:
            return False
        return True

    def decode(self):
        """One token for every row, each continuing its own state."""
        tokens = torch.tensor([row.generated[-1] for row in self.rows], device=self.device)
        logits = decode_step(self.model, tokens, self.cache, self.weights)  # (B, V)
        best = logits.argmax(dim=-1).tolist()  # the greedy rows' tokens, in one operation
        for i, row in enumerate(self.rows):
            row.held.append(row.generated[-1])
            self.emit(row, logits[i:i + 1], best[i])
        self.regroup([])

    def regroup(self, joining):
        """Drop the rows that ended and add the rows joining: one new batch cache."""
        staying = [(i, row) for i, row in enumerate(self.rows) if not self.finished(row)]
        if len(staying) == len(self.rows) and not joining:
            return
        self.rows = [row for _, row in staying] + joining
        self.cache = join_caches(self.model, [(self.cache, i) for i, _ in staying]
                                 + [(row.cache, 0) for row in joining]) if self.rows else None
        for row in joining:
            row.cache = None

    def end(self, row, finish_reason):
        """Send row's end and keep its state: the tokens fed, then pending its last token and,
        for a chat, the template's end of turn after it (Turns.after_reply)."""
        i = next((i for i, other in enumerate(self.rows) if other is row), None)
        state = row.cache.state_dict() if i is None else self.cache.state_dict(i)
        pending, text = row.generated[-1:], None
        if row.messages is not None and self.turns.end_of_turn is not None:
            pending += self.turns.after_reply(row.generated)
            text = self.turns.held(row.messages + [self.turns.reply(row.generated)])
        if row.messages is None or text is not None:
            # the state it continued gives way to this one: one state a conversation (a client
            # that goes back a turn costs one re-encode)
            self.states.drop(row.continues)
            self.states.keep(row.held, state, pending, text)
        row.send("end", finish_reason, {
            "prompt_tokens": row.prompt_tokens, "completion_tokens": len(row.generated),
            "total_tokens": row.prompt_tokens + len(row.generated)})

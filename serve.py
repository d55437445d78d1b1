"""
An OpenAI-compatible server for a Doge: each conversation continues from its fixed-size state.

    python serve.py --init_from=models/Doge-20M-Instruct
    python serve.py --init_from=SmallDoge/Doge-20M-Instruct --port=8000 --api_key=secret

Routes: POST /v1/chat/completions and POST /v1/completions (streamed as server-sent events, or
not), GET /v1/models, GET /health (the state cache's figures). The API is stateless: a client
sends the whole conversation every turn. A Doge's state after a conversation is at most
keep_window_size keys per layer, so the server keeps the state after each reply (least recently
used dropped first, within --state_memory bytes), and a request that extends a kept
conversation feeds only its new tokens: turn 200 costs what turn 2 costs. The requests in flight
decode together, one row each, each at its own position. See docs/serving.md.
Needs the optional fastapi and uvicorn packages; the model loads as in sample.py.
"""

import asyncio
import json
import queue
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import torch

from common import busy_machine_note
from configurator import apply_config
from doge import (Doge, decode_step, decoding_weights, join_caches, local_model_path,
                  output_logits, sample_next)
from tokenizer import (document_start, end_of_turn_text, load_chat_template, load_text_tokenizer,
                       render_chat, stop_ids, tokenizer_directory)

try:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError:
    raise SystemExit("error: serve.py needs the optional fastapi and uvicorn packages "
                     "(pip install fastapi uvicorn)") from None


@dataclass
class ServeConfig:
    init_from: str = ""  # a Hugging Face Doge directory or hub name, or a train.py checkpoint
    host: str = "127.0.0.1"  # 0.0.0.0 to answer other machines too
    port: int = 8000  # 0: any free port (the one taken is printed)
    api_key: str = ""  # when given, requests need the header Authorization: Bearer API_KEY
    model_name: str = ""  # what /v1/models lists and requests name (default: init_from)
    state_memory: float = 2e9  # bytes of kept conversation states, least recently used dropped
    max_batch: int = 16  # requests decoded together; more wait their turn
    max_requests: int = 64  # requests in flight (decoding or waiting); more get 429
    max_tokens: int = 4096  # the most new tokens a request may ask for
    max_prompt_tokens: int = 65536  # the longest conversation a request may send, in tokens
    prefill_chunk: int = 512  # prompt tokens fed between two decoding steps of the others
    device: str = "auto"  # auto: cuda if available (in bfloat16), else cpu (float32)


# ----------------------------------------------------------------------------------------------
# Kept states: the model's state after a conversation, keyed by the tokens it holds


@dataclass
class Kept:
    state: dict  # DogeCache.state_dict() of the tokens held
    pending: list  # tokens known to follow, not yet fed (the reply's last token, end of turn)
    text: str | None  # a chat's rendering that the tokens held and pending spell (else None)
    size: int  # bytes


class States:
    """Kept states, least recently used first, at most limit bytes. A request continues the
    longest one whose tokens (held, then pending) begin its own: a chat's by its rendered text,
    a completion's by its tokens. Used by the engine's thread only."""

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


# ----------------------------------------------------------------------------------------------
# The engine: one thread owns the model, and decodes every request in flight together


@dataclass
class Job:
    """One request: a chat (messages) or a completion (prompt), how to sample, where its
    tokens go. The engine puts ("token", id), then ("end", finish_reason, usage) or
    ("error", status, message) on out (an asyncio.Queue, through its loop)."""
    messages: list | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: bool = False  # set by the client's side: stop at the next step
    held: list = field(default_factory=list)  # the tokens the cache holds
    to_feed: list = field(default_factory=list)  # pieces of the prompt not yet fed
    generated: list = field(default_factory=list)
    cache: object = None  # its own cache while its prompt is fed, then a row of the batch's
    generator: object = None
    prompt_tokens: int = 0
    continues: tuple | None = None  # the key of the kept state it continues

    def send(self, *item):
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Engine:
    """Feeds each new job's prompt after the kept state it continues (prefill_chunk tokens a
    step), then decodes all jobs together: one ragged cache (doge.join_caches), one row per job
    at its own position, one token per row per step. A job that ends leaves its state kept."""

    def __init__(self, model, tokenizer, chat_template, stop, cfg):
        self.model, self.tokenizer, self.template, self.cfg = model, tokenizer, chat_template, cfg
        self.stop = set(stop)
        self.end_of_turn = end_of_turn_text(chat_template) if chat_template else None
        self.states = States(cfg.state_memory)
        self.jobs = queue.Queue()
        self.rows = []  # the jobs being decoded, in the batch cache's row order
        self.batch_cache = None
        self.submitted = self.ended = 0  # each counted by one thread: the server's, the engine's
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def in_flight(self):
        return self.submitted - self.ended

    def submit(self, job):
        self.submitted += 1
        self.jobs.put(job)

    def close(self):
        self.jobs.put(None)
        self.thread.join()

    def run(self):
        with torch.inference_mode():
            self.weights = decoding_weights(self.model)
            feeding = []  # jobs whose prompts are being fed
            while feeding is not None:
                try:
                    feeding = self.iterate(feeding)
                except Exception as e:  # a bug: it fails the jobs in flight, not the server
                    for job in feeding + self.rows:
                        self.end(job, error=(500, f"internal error: {type(e).__name__}: {e}"))
                    feeding, self.rows, self.batch_cache = [], [], None

    def iterate(self, feeding):
        """Take new jobs while there is room, feed a piece of each prompt being fed, decode one
        token for every row: the jobs still being fed (None once closed)."""
        while len(self.rows) + len(feeding) < self.cfg.max_batch:
            try:  # wait for work only when there is none
                job = self.jobs.get(block=not (self.rows or feeding))
            except queue.Empty:
                break
            if job is None:
                return None
            try:
                feeding.append(self.start(job))
            except ValueError as e:  # a prompt too long, a template that refuses it
                self.end(job, error=(400, str(e)))
        joining = [job for job in feeding if self.feed(job)]
        feeding = [job for job in feeding if job.to_feed]
        self.regroup([job for job in joining if not self.finished(job)])
        if self.rows:
            self.step()
        return feeding

    def start(self, job):
        """Find the tokens job continues (a kept state's) and those it feeds: job, or a
        ValueError that refuses it."""
        if job.messages is not None:
            try:
                text = render_chat(self.template, job.messages)
            except Exception as e:  # jinja2's errors too: the template refuses these messages
                raise ValueError(f"the chat template cannot render these messages: {e}") from None
            found = self.states.continued(text=text) if self.end_of_turn else None
            new = self.tokenizer.encode([text[len(found[1].text):] if found else text])[0]
        else:
            tokens = self.tokenizer.encode_prompt(job.prompt) or [document_start(self.tokenizer)]
            found = self.states.continued(tokens=tokens)
            new = tokens[len(found[0]) + len(found[1].pending):] if found else tokens
        job.held, pending = (list(found[0]), found[1].pending) if found else ([], [])
        job.continues = found[0] if found else None
        job.prompt_tokens = len(job.held) + len(pending) + len(new)
        job.to_feed = [pending + new]
        config = self.model.config
        if (config.rope_scaling or {}).get("rope_type") == "dynamic" and \
                job.prompt_tokens > config.max_position_embeddings:
            # past max_position_embeddings dynamic RoPE's base follows the length fed so far:
            # feed the pieces sample.py's chat feeds (the reply's last token, the end of turn,
            # the new text), so that the two agree there too
            job.to_feed = [piece for piece in (pending[:1], pending[1:], new) if piece]
        job.to_feed = [piece[i:i + self.cfg.prefill_chunk] for piece in job.to_feed
                       for i in range(0, len(piece), self.cfg.prefill_chunk)]
        if job.prompt_tokens > self.cfg.max_prompt_tokens:
            raise ValueError(f"the prompt is {job.prompt_tokens} tokens, more than this server's "
                             f"limit of {self.cfg.max_prompt_tokens}")
        job.cache = self.model.load_cache(found[1].state) if found else self.model.new_cache()
        if job.seed is not None:
            job.generator = torch.Generator(self.model.lm_head.weight.device).manual_seed(job.seed)
        return job

    def feed(self, job):
        """Feed the next piece of job's prompt; at its end, sample its first token: True."""
        chunk = job.to_feed.pop(0)
        device = self.model.lm_head.weight.device
        hidden = self.model.hidden_states(torch.tensor([chunk], device=device), job.cache)
        job.held += chunk
        if job.to_feed:
            return False
        logits = output_logits(hidden[:, -1], self.weights[-1], self.model.config.vocab_size)
        self.emit(job, logits)
        return True

    def emit(self, job, logits, best=None):
        """Sample job's next token from its logits (1, V) and send it. best: the argmax, when
        the step found it for every row at once."""
        if job.temperature == 0 and best is not None:
            token = best
        else:
            token = sample_next(logits, None, job.temperature, None, job.top_p, 1.0,
                                job.generator).item()
        job.generated.append(token)
        if token not in self.stop:
            job.send("token", token)

    def finished(self, job):
        """End job if it is done (a stop token, max_tokens, or its client gone): True."""
        last = job.generated[-1] if job.generated else None
        if last in self.stop or job.cancelled:
            self.end(job, "stop")
        elif len(job.generated) >= job.max_tokens:
            self.end(job, "length")
        else:
            return False
        return True

    def step(self):
        """One token for every row, each continuing its own state."""
        tokens = torch.tensor([job.generated[-1] for job in self.rows],
                              device=self.model.lm_head.weight.device)
        logits = decode_step(self.model, tokens, self.batch_cache, self.weights)  # (B, V)
        best = logits.argmax(dim=-1).tolist()  # the greedy rows' tokens, in one operation
        for row, job in enumerate(self.rows):
            job.held.append(job.generated[-1])
            self.emit(job, logits[row:row + 1], best[row])
        self.regroup([])

    def regroup(self, joining):
        """Drop the rows that ended and add the jobs joining: one new batch cache."""
        staying = [(row, job) for row, job in enumerate(self.rows) if not self.finished(job)]
        if len(staying) == len(self.rows) and not joining:
            return
        self.rows = [job for _, job in staying] + joining
        self.batch_cache = join_caches(self.model, [(self.batch_cache, row) for row, _ in staying]
                                       + [(job.cache, 0) for job in joining]) if self.rows else None
        for job in joining:
            job.cache = None

    def end(self, job, finish_reason=None, error=None):
        """Send job's end (or error) and keep its state: the tokens fed, then pending its last
        token and, for a chat, the template's end of turn."""
        if error:
            self.ended += 1
            job.send("error", *error)
            return
        row = next((i for i, other in enumerate(self.rows) if other is job), None)
        state = job.cache.state_dict() if row is None else self.batch_cache.state_dict(row)
        pending, text = job.generated[-1:], None
        if job.messages is not None and self.end_of_turn:
            end_ids = self.tokenizer.encode([self.end_of_turn])[0]
            if end_ids[:1] == pending:  # the model ended its turn itself
                end_ids = end_ids[1:]
            pending += end_ids
            reply = self.tokenizer.decode([t for t in job.generated if t not in self.stop])
            text = render_chat(self.template, job.messages + [
                {"role": "assistant", "content": reply}], add_generation_prompt=False)
        if job.messages is None or text is not None:
            # the state it continued gives way to this one: one state a conversation (a client
            # that goes back a turn costs one re-encode)
            self.states.drop(job.continues)
            self.states.keep(job.held, state, pending, text)
        self.ended += 1
        job.send("end", finish_reason, {
            "prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.generated),
            "total_tokens": job.prompt_tokens + len(job.generated)})


# ----------------------------------------------------------------------------------------------
# Requests as the OpenAI API takes them: unknown fields refused


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(Sampling):
    prompt: str


def error(status, message, kind="invalid_request_error", code=None):
    """An error as the OpenAI API writes one."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status)


class ReplyText:
    """The text a client sees of the tokens: decoded as whole characters, cut before the first
    stop string (and holding back what could begin one)."""

    def __init__(self, tokenizer, stop_strings):
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


# ----------------------------------------------------------------------------------------------
# The app: the model loaded once, a few routes


def make_app(cfg, model, tokenizer, chat_template, stop):
    engine = Engine(model, tokenizer, chat_template, stop, cfg)
    name = cfg.model_name or cfg.init_from
    app = FastAPI(title="doge serve.py")
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error')})")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if not where and first.get("type") == "missing":  # no body at all: name what it needs
            request_class = ChatRequest if request.url.path.endswith("/chat/completions") \
                else CompletionRequest
            fields = [name for name, info in request_class.model_fields.items()
                      if info.is_required()]
            return error(400, f"the request has no body: send a JSON object with "
                              f"{' and '.join(fields)}")
        return error(400, f"{where}: {first.get('msg')}" if where else first.get("msg"))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def check_key(request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            return error(401, "wrong or missing API key (Authorization: Bearer KEY)",
                         "authentication_error", "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "states": engine.states.figures(),
                "requests": {"in_flight": engine.in_flight(), "decoding": len(engine.rows)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "doge"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        if chat_template is None:
            return error(400, f"{name} has no chat template: use /v1/completions")
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        return await complete(body, messages, None, body.max_completion_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await complete(body, None, body.prompt, None)

    async def complete(body, messages, prompt, max_completion_tokens):
        if body.model != name:
            return error(404, f"no model {body.model!r}: this server has {name!r}",
                         code="model_not_found")
        max_tokens = body.max_tokens or max_completion_tokens or cfg.max_tokens
        if max_tokens > cfg.max_tokens:
            return error(400, f"max_tokens {max_tokens} is more than this server's limit of "
                              f"{cfg.max_tokens}")
        characters = len(prompt) if prompt is not None else sum(len(m["content"]) for m in messages)
        if characters > 16 * cfg.max_prompt_tokens:  # refused before the engine tokenizes it
            return error(400, f"the prompt is {characters} characters, far more than this "
                              f"server's limit of {cfg.max_prompt_tokens} tokens")
        if engine.in_flight() >= cfg.max_requests:
            return error(429, f"the server has {engine.in_flight()} requests in flight: try again",
                         "rate_limit_error", "server_busy")
        job = Job(messages, prompt, max_tokens, body.temperature, body.top_p, body.seed,
                  asyncio.get_running_loop(), asyncio.Queue())
        engine.submit(job)
        first = await job.out.get()
        if first[0] == "error":
            return error(first[1], first[2])
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        reply = ReplyText(tokenizer, stops)
        chunks = answer(job, first, reply)
        kind = "chat.completion" if messages is not None else "text_completion"
        head = {"id": f"{'chatcmpl' if messages is not None else 'cmpl'}-{uuid.uuid4().hex}",
                "object": kind, "created": int(time.time()), "model": name}
        if body.stream:
            usage = (body.stream_options or {}).get("include_usage", False)
            return StreamingResponse(events(job, head, chunks, messages is not None, usage),
                                     media_type="text/event-stream")
        text, finish_reason, usage = "", None, None
        async for piece, finish_reason, usage in chunks:
            text += piece
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}}
                      if messages is not None else {"text": text})
        return {**head, "choices": [choice], "usage": usage}

    async def answer(job, item, reply):
        """(text, None, None) as the tokens come, then ("rest", finish_reason, usage)."""
        while item[0] == "token":
            if not reply.stopped:
                text = reply.add(item[1])
                job.cancelled |= reply.stopped
                if text:
                    yield text, None, None
            item = await job.out.get()
        yield reply.rest(), "stop" if reply.stopped else item[1], item[2]

    async def events(job, head, chunks, is_chat, with_usage):
        """The reply as server-sent events; a client that leaves ends the job."""
        kind = head["object"] + (".chunk" if is_chat else "")

        def event(choices, **extra):
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

        try:
            if is_chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}])
            async for text, finish_reason, usage in chunks:
                content = {"delta": {"content": text} if text or not finish_reason else {}} \
                    if is_chat else {"text": text, "logprobs": None}
                yield event([{"index": 0, **content, "finish_reason": finish_reason}])
            if with_usage:
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client left early; after the end it changes nothing

    return app


def load(cfg):
    """The model, tokenizer, chat template (or None) and stop ids of --init_from."""
    if not cfg.init_from:
        raise SystemExit("error: give --init_from=DIR (a Hugging Face Doge directory or hub "
                         "name, or a train.py checkpoint)")
    try:
        path = local_model_path(cfg.init_from)
        cuda = cfg.device == "cuda" or cfg.device == "auto" and torch.cuda.is_available()
        device = "cuda" if cuda else cfg.device if cfg.device != "auto" else "cpu"
        model = Doge.from_pretrained(path, device=device,
                                     dtype=torch.bfloat16 if cuda else torch.float32).eval()
        directory = tokenizer_directory(path)
        tokenizer = load_text_tokenizer(directory, model.config.vocab_size)
        return model, tokenizer, load_chat_template(directory), stop_ids(model, tokenizer,
                                                                         directory)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def listen(host, port):
    """A socket bound to host:port (port 0: a free one)."""
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror}") from None
    return listening


def serve(cfg):
    """Load the model and serve until interrupted."""
    listening = listen(cfg.host, cfg.port)
    model, tokenizer, chat_template, stop = load(cfg)
    app = make_app(cfg, model, tokenizer, chat_template, stop)
    print(f"serving {cfg.model_name or cfg.init_from} at "
          f"http://{cfg.host}:{listening.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    if busy := busy_machine_note():
        print(busy, file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
    app.state.engine.close()


if __name__ == "__main__":
    serve(apply_config(ServeConfig(), sys.argv[1:]))

"""
An OpenAI-compatible server for a Doge: each conversation continues from its fixed-size state.

    python serve.py --init_from=models/Doge-20M-Instruct
    python serve.py --init_from=SmallDoge/Doge-20M-Instruct --port=8000 --api_key=secret

Routes: POST /v1/chat/completions and POST /v1/completions (streamed as server-sent events, or
not), GET /v1/models, GET /health. A client sends the whole conversation every turn; the server
continues the state it kept, so turn 200 costs what turn 2 costs, and decodes the requests in
flight together (engine.Batch). docs/serving.md tells the rest. Needs fastapi and uvicorn.
"""

import asyncio
import json
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from common import busy_machine_note, device_and_dtype, log
from configurator import apply_config
from engine import Batch, ReplyText, Row, Sampling, Turns, load_for_generation

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
# The engine's thread: it owns the model


class Engine:
    """Adds queued requests to an engine.Batch while it has room, and runs it a step at a time."""

    def __init__(self, batch, max_batch):
        self.batch, self.max_batch, self.states = batch, max_batch, batch.states
        self.requests = queue.Queue()
        self.submitted = self.ended = 0  # each counted by one thread: the server's, the engine's
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def in_flight(self):
        return self.submitted - self.ended

    def submit(self, messages, prompt, sampling, seed):
        """Queue a request: (its engine.Row, the asyncio.Queue that gets ("token", id), then
        ("end", finish_reason, usage) or ("error", status, message))."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def send(*event):  # called by the engine's thread
            if event[0] != "token":  # the request's last event
                self.ended += 1
            loop.call_soon_threadsafe(events.put_nowait, event)

        row = Row(messages, prompt, sampling, send, seed)
        self.submitted += 1
        self.requests.put(row)
        return row, events

    def close(self):
        self.requests.put(None)
        self.thread.join()

    def run(self):
        """Until closed (waiting for a request only when the batch has none)."""
        while True:
            try:
                while len(self.batch) < self.max_batch:
                    try:
                        row = self.requests.get(block=not len(self.batch))
                    except queue.Empty:
                        break
                    if row is None:
                        return
                    try:
                        self.batch.add(row)
                    except ValueError as e:  # a prompt too long, a template that refuses it
                        row.send("error", 400, str(e))
                self.batch.step()
            except Exception as e:  # a bug: it fails the requests in flight, not the server
                for row in self.batch.clear():
                    row.send("error", 500, f"internal error: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------
# Requests as the OpenAI API takes them: unknown fields refused


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class Request(BaseModel):
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


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(Request):
    prompt: str


def error(status, message, kind="invalid_request_error", code=None):
    """An error as the OpenAI API writes one."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status)


# ----------------------------------------------------------------------------------------------
# The app: the model loaded once, a few routes


def make_app(cfg, loaded):
    """The app for the model loaded (an engine.Loaded): its engine's thread starts here."""
    turns = Turns(loaded.chat_template, loaded.tokenizer, loaded.stop) \
        if loaded.chat_template else None
    batch = Batch(loaded.model, loaded.tokenizer, loaded.stop, turns, cfg.state_memory,
                  cfg.prefill_chunk, cfg.max_prompt_tokens)
    app = FastAPI(title="doge serve.py")
    app.state.cfg, app.state.tokenizer = cfg, loaded.tokenizer
    app.state.name = name = cfg.model_name or cfg.init_from
    app.state.engine = engine = Engine(batch, cfg.max_batch)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)

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
                "requests": {"in_flight": engine.in_flight(), "decoding": len(engine.batch.rows)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "doge"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        if turns is None:
            return error(400, f"{name} has no chat template: use /v1/completions")
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        return await complete(app.state, body, messages, None, body.max_completion_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await complete(app.state, body, None, body.prompt, None)

    return app


async def invalid_request(request, exc):
    """A request that does not validate: the first problem, in one line."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error')})")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if not where and first.get("type") == "missing":  # no body at all: name what it needs
        request_class = ChatRequest if request.url.path.endswith("/chat/completions") \
            else CompletionRequest
        fields = [name for name, info in request_class.model_fields.items() if info.is_required()]
        return error(400, f"the request has no body: send a JSON object with "
                          f"{' and '.join(fields)}")
    return error(400, f"{where}: {first.get('msg')}" if where else first.get("msg"))


async def http_error(request, exc):
    return error(exc.status_code, str(exc.detail))


def refusal(state, body, messages, prompt, max_tokens):
    """The error that refuses a request before the engine sees it, or None."""
    cfg, engine = state.cfg, state.engine
    if body.model != state.name:
        return error(404, f"no model {body.model!r}: this server has {state.name!r}",
                     code="model_not_found")
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
    return None


async def complete(state, body, messages, prompt, max_completion_tokens):
    """A chat (messages) or text (prompt) completion: streamed as events, or one response."""
    max_tokens = body.max_tokens or max_completion_tokens or state.cfg.max_tokens
    if refused := refusal(state, body, messages, prompt, max_tokens):
        return refused
    row, events = state.engine.submit(messages, prompt, Sampling(
        max_tokens, body.temperature, top_p=body.top_p), body.seed)
    first = await events.get()
    if first[0] == "error":
        return error(first[1], first[2])
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    chunks = answer(row, events, first, ReplyText(state.tokenizer, stops))
    is_chat = messages is not None
    head = {"id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if is_chat else "text_completion",
            "created": int(time.time()), "model": state.name}
    if body.stream:
        usage = (body.stream_options or {}).get("include_usage", False)
        return StreamingResponse(server_events(row, head, chunks, is_chat, usage),
                                 media_type="text/event-stream")
    text, finish_reason, usage = "", None, None
    async for piece, finish_reason, usage in chunks:
        text += piece
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if is_chat
                  else {"text": text})
    return {**head, "choices": [choice], "usage": usage}


async def answer(row, events, event, reply):
    """(text, None, None) as the tokens come, then (the rest, finish_reason, usage)."""
    while event[0] == "token":
        if not reply.stopped:
            text = reply.add(event[1])
            row.cancelled |= reply.stopped
            if text:
                yield text, None, None
        event = await events.get()
    yield reply.rest(), "stop" if reply.stopped else event[1], event[2]


async def server_events(row, head, chunks, is_chat, with_usage):
    """The reply as server-sent events; a client that leaves ends the request."""
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
        row.cancelled = True  # the client left early; after the end it changes nothing


def load(cfg):
    """The model of --init_from, with its tokenizer, chat template and stop ids (engine.Loaded)."""
    if not cfg.init_from:
        raise SystemExit("error: give --init_from=DIR (a Hugging Face Doge directory or hub "
                         "name, or a train.py checkpoint)")
    return load_for_generation(cfg.init_from, *device_and_dtype(cfg.device), setting="")


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
    app = make_app(cfg, load(cfg))
    log(f"serving {cfg.model_name or cfg.init_from} at "
        f"http://{cfg.host}:{listening.getsockname()[1]}/v1")
    if busy := busy_machine_note():
        log(busy)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
    app.state.engine.close()


if __name__ == "__main__":
    serve(apply_config(ServeConfig(), sys.argv[1:]))

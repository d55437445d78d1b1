"""serve.py against a live server on a free local port (in this process, stopped at the end of
each test), with a tiny random model: the openai client, the kept states, sample.py's replies,
concurrent streams, and bad input."""

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("tokenizers")

import doge  # noqa: E402
import engine as core  # noqa: E402  (as core: a test's `engine` is serve.py's Engine)
import sample  # noqa: E402
import serve  # noqa: E402
from helpers import one_thread  # noqa: E402,F401
# the tiny model with random weights, its tokenizer.json and a Llama-3 style chat template
from test_sample import chat_dir, model_dir  # noqa: E402,F401
from tokenizer import load_chat_template, load_text_tokenizer, render_chat, stop_ids  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tiny-doge"


@contextlib.contextmanager
def live_server(directory, **settings):
    """serve.py's app for the model in directory, on a free port of 127.0.0.1: (url, engine)."""
    cfg = serve.ServeConfig(init_from=str(directory), model_name=NAME, **settings)
    app = serve.make_app(cfg, serve.load(cfg))
    listening = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]})
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{listening.getsockname()[1]}", app.state.engine
    finally:
        server.should_exit = True
        thread.join()
        app.state.engine.close()


def client(url, api_key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def greedy_conversation(url, questions, max_tokens=8, stream=False):
    """The replies of the openai client holding a conversation: the whole history each turn."""
    messages, replies = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        response = client(url).chat.completions.create(
            model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, stream=stream)
        reply = "".join(chunk.choices[0].delta.content or "" for chunk in response
                        if chunk.choices) if stream else response.choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


QUESTIONS = ["Hi", "And then?", "What now?"]


def test_the_openai_client_holds_a_conversation_streamed_and_not(chat_dir):
    with live_server(chat_dir) as (url, engine):
        assert [model.id for model in client(url).models.list()] == [NAME]
        plain = greedy_conversation(url, QUESTIONS)
        streamed = greedy_conversation(url, QUESTIONS, stream=True)
        assert plain == streamed and len(set(plain)) > 1
        response = client(url).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            temperature=0.8, top_p=0.9, seed=3)
        again = client(url).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            temperature=0.8, top_p=0.9, seed=3)
        assert response.choices[0].message.content == again.choices[0].message.content
        assert response.choices[0].finish_reason in ("stop", "length")
        usage = response.usage
        assert usage.completion_tokens <= 5 and usage.total_tokens == (
            usage.prompt_tokens + usage.completion_tokens)
        text = client(url).completions.create(model=NAME, prompt="the quick", max_tokens=6,
                                              temperature=0)
        assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 6
        pieces = client(url).completions.create(model=NAME, prompt="the quick", max_tokens=6,
                                                temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in pieces) == text.choices[0].text
        full = text.choices[0].text
        stop = full[3:5]  # cut before its first occurrence, streamed or not
        for stream in (False, True):
            cut = client(url).completions.create(model=NAME, prompt="the quick", max_tokens=6,
                                                 temperature=0, stop=[stop, "never"],
                                                 stream=stream)
            chunks = list(cut) if stream else [cut]
            assert "".join(chunk.choices[0].text for chunk in chunks) == full[:full.find(stop)]
            assert chunks[-1].choices[0].finish_reason == "stop"


def test_turns_continue_their_state_and_equal_sample_chat_and_a_forward_pass(
        chat_dir, capsys, monkeypatch):
    """Each turn after the first continues the state kept after the reply before it (a hit in
    /health), feeding only the new tokens; the replies are sample.py --chat's, and the last one
    is what one forward pass over the whole conversation predicts."""
    with live_server(chat_dir) as (url, engine):
        replies = greedy_conversation(url, QUESTIONS)
        figures = httpx.get(url + "/health").json()["states"]
        held, kept = max(engine.states.kept.items(), key=lambda item: len(item[0]))
    assert figures["hits"] == 2 and figures["misses"] == 1 and figures["kept"] == 1
    assert figures["bytes"] == sum(k.size for k in engine.states.kept.values()) > 0

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(q + "\n" for q in QUESTIONS)))
    sample.main([f"--init_from={chat_dir}", "--chat", "--temperature=0", "--max_new_tokens=8"])
    assert capsys.readouterr().out == "".join(reply + "\n" for reply in replies)

    # the last reply: its tokens are those after the last prompt, in what the state holds
    model = doge.Doge.from_pretrained(chat_dir).eval()
    tokenizer = load_text_tokenizer(str(chat_dir), 10 ** 6)
    template = load_chat_template(str(chat_dir))
    messages = [{"role": role, "content": text} for question, reply in zip(QUESTIONS, replies)
                for role, text in (("user", question), ("assistant", reply))]
    reply_ids = tokenizer.encode([replies[-1]])[0]
    conversation = list(held) + kept.pending[:1]
    assert kept.text == render_chat(template, messages, add_generation_prompt=False)
    start = len(conversation) - 8  # max_tokens 8, no stop token: the last 8 are the reply
    assert tokenizer.decode(conversation[start:]) == replies[-1] and reply_ids
    with torch.no_grad():
        logits = model(torch.tensor([conversation]))[0][0]  # (T, V)
    assert logits[start - 1:-1].argmax(-1).tolist() == conversation[start:]


def by_position(state):
    """A state's keys and dt in the order of their positions (slots may differ)."""
    order = state["positions"].argsort(dim=-1)
    return [state[name].gather(-2 if name == "keys" else -1, order.unsqueeze(-1).expand_as(
        state[name]) if name == "keys" else order) for name in ("keys", "dt")]


def test_past_max_position_embeddings_the_state_goes_on_as_sample_chat(chat_dir, tmp_path):
    """With max_position_embeddings 16, the conversation passes it in its first turn, where
    dynamic RoPE's base follows the length fed so far: the server goes on, and holds the state
    that sample.py's chat holds (it feeds the same pieces: the reply's last token, the end of
    turn, the new text), so it replies as sample.py does."""
    directory = tmp_path / "short"
    directory.mkdir()
    for path in chat_dir.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    with live_server(directory) as (url, engine):
        replies = greedy_conversation(url, QUESTIONS)
        assert engine.states.hits == 2
        held, kept = max(engine.states.kept.items(), key=lambda item: len(item[0]))
    model = doge.Doge.from_pretrained(directory).eval()
    tokenizer = load_text_tokenizer(str(directory), 10 ** 6)
    stop = stop_ids(model, tokenizer, str(directory))
    chat = core.Chat(model, core.Turns(load_chat_template(str(directory)), tokenizer, stop),
                       core.Sampling(max_tokens=8, temperature=0))
    for question in QUESTIONS:
        chat.answer(question)
    assert [m["content"] for m in chat.messages[1::2]] == replies
    cache = model.load_cache(kept.state)  # then the pending tokens, as sample.py feeds them
    with torch.no_grad():
        doge.decode_step(model, torch.tensor(kept.pending[:1]), cache,
                         doge.decoding_weights(model))
        model(torch.tensor([kept.pending[1:]]), cache=cache)
    assert cache.length == chat.cache.length == len(held) + len(kept.pending) > 16
    for ours, theirs in zip(by_position(cache.state_dict()), by_position(chat.cache.state_dict())):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_concurrent_streams_decode_together_as_each_would_alone(chat_dir, monkeypatch):
    """Four conversations at once: their rows decode in one batch (different lengths), and
    each stream gets the replies it gets alone."""
    questions = [["Hi"], ["hello world, how are you today?", "And?"], ["a small model"],
                 ["the lazy dog", "jumps"]]
    with live_server(chat_dir) as (url, _):
        alone = [greedy_conversation(url, q, max_tokens=12) for q in questions]
    batch_sizes = []
    step = core.decode_step
    monkeypatch.setattr(core, "decode_step", lambda model, token, *rest: batch_sizes.append(
        len(token)) or step(model, token, *rest))
    with live_server(chat_dir) as (url, _):
        together = [None] * len(questions)

        def talk(i):
            together[i] = greedy_conversation(url, questions[i], max_tokens=12, stream=True)

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(questions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert together == alone and max(batch_sizes) >= 2


def test_a_client_that_leaves_frees_its_row_and_keeps_its_state(chat_dir):
    with live_server(chat_dir) as (url, engine):
        body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            events = [next(lines) for _ in range(6)]
        assert events[0].startswith("data: ")
        deadline = time.time() + 10
        while (engine.in_flight() or engine.batch.rows) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.in_flight() == 0 and not engine.batch.rows
        (held, kept), = engine.states.kept.items()
        assert int(kept.state["length"]) == len(held) < 4000  # stopped long before max_tokens
        assert kept.text.endswith("<|eot_id|>") and len(kept.text) > len("Hi") + 60
        assert client(url).chat.completions.create(  # and the server goes on
            model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3).usage


def post(url, body, **kwargs):
    return httpx.post(url + "/v1/chat/completions", **({"content": body} if isinstance(
        body, (str, bytes)) else {"json": body}), **kwargs)


def assert_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"] and error["type"]


def test_bad_input_gets_an_openai_error_and_the_server_goes_on(chat_dir, tmp_path):
    good = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with live_server(chat_dir, max_prompt_tokens=50, max_tokens=100, api_key="secret") as (
            url, _):
        key = {"headers": {"Authorization": "Bearer secret"}}
        assert_error(post(url, good), 401)
        assert_error(post(url, good, headers={"Authorization": "Bearer wrong"}), 401)
        for body, status in [
                ('{"model": "tiny-doge", "messages": [', 400),  # malformed JSON
                ("[1, 2]", 400), ({**good, "temprature": 0.5}, 400),  # unknown field
                ({**good, "model": "gpt-4"}, 404), ({**good, "max_tokens": -1}, 400),
                ({**good, "max_tokens": 10 ** 30}, 400), ({**good, "temperature": "hot"}, 400),
                ({**good, "messages": []}, 400), ({**good, "n": 2}, 400),
                ({**good, "messages": [{"role": "robot", "content": "Hi"}]}, 400),
                ({**good, "seed": 2 ** 70}, 400), ({**good, "stop": [1]}, 400),
                ({**good, "messages": [{"role": "user", "content": "Hi " * 100}]}, 400),
                ({**good, "messages": [{"role": "user", "content": "Hi " * 10 ** 4}]}, 400)]:
            assert_error(post(url, body, **key), status)
            assert post(url, good, **key).status_code == 200
        for route, fields in (("/v1/chat/completions", "model and messages"),
                              ("/v1/completions", "model and prompt")):
            response = httpx.post(url + route, **key)  # no body at all
            assert_error(response, 400)
            assert response.json()["error"]["message"] == \
                f"the request has no body: send a JSON object with {fields}"
        assert_error(httpx.get(url + "/v1/nothing", **key), 404)
        openai_error = pytest.raises(openai.AuthenticationError)
        with openai_error:
            client(url, "wrong").chat.completions.create(model=NAME, messages=good["messages"])

        async def burst():
            async with httpx.AsyncClient(timeout=60) as session:
                return await asyncio.gather(*(session.post(
                    url + "/v1/chat/completions", json={**good, "stream": i % 2 == 0},
                    **key) for i in range(100)))

        responses = asyncio.run(burst())
        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {200, 429} and 200 in statuses, statuses
        for response in responses:
            if response.status_code == 429:
                assert_error(response, 429)
        assert post(url, good, **key).status_code == 200

    without_template = tmp_path / "plain"
    without_template.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (without_template / name).write_bytes((chat_dir / name).read_bytes())
    with live_server(without_template) as (url, _):
        response = post(url, good)
        assert_error(response, 400)
        assert "no chat template" in response.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={
            "model": NAME, "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_dropped_state_costs_a_re_encode_not_a_wrong_reply(chat_dir):
    """With room for about one state, a conversation whose state was dropped (another one came
    between its turns) is encoded from the start, and answers as if it had been kept."""
    with live_server(chat_dir) as (url, engine):
        kept = greedy_conversation(url, QUESTIONS)
        size = max(k.size for k in engine.states.kept.values())
    with live_server(chat_dir, state_memory=size * 1.5) as (url, engine):
        messages = []
        for question, reply in zip(QUESTIONS, kept):
            messages.append({"role": "user", "content": question})
            greedy_conversation(url, ["something else entirely"])  # takes the room
            response = client(url).chat.completions.create(
                model=NAME, messages=messages, max_tokens=8, temperature=0)
            assert response.choices[0].message.content == reply
            messages.append({"role": "assistant", "content": reply})
            assert engine.states.bytes <= size * 1.5
        assert engine.states.hits == 0


def test_serve_py_from_the_command_line(chat_dir):
    """python serve.py binds 127.0.0.1 on the port given (0: a free one), says where, and
    answers; a missing --init_from is one line."""
    command = [sys.executable, "serve.py", f"--init_from={chat_dir}", "--port=0"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stderr.readline()
        assert line.startswith("serving ") and "http://127.0.0.1:" in line, line
        url = line.split()[-1].removesuffix("/v1")
        assert httpx.get(url + "/health", timeout=30).json()["states"]["kept"] == 0
    finally:
        process.terminate()
        process.wait(timeout=30)
    with pytest.raises(SystemExit, match="^error: give --init_from"):
        serve.load(serve.ServeConfig())

"""engine.py, the generation core, where the front ends' tests do not reach: rows that join and
leave a Batch mid-decode (each row's logits against the plain definition), the end-of-turn rule
by hand, the kept states' rules, and a stop token ending a row."""

import pytest
import torch

import engine
from helpers import one_thread  # noqa: F401 (an autouse fixture)
from oracle import assert_close_to_scale, naive_forward
# the tiny model with random weights, its tokenizer.json and a Llama-3 style chat template
from test_sample import TEMPLATE, chat_dir, model_dir  # noqa: F401

pytest.importorskip("tokenizers")


def events():
    """A Row's send that keeps what it is sent."""
    sent = []
    return sent, lambda *event: sent.append(event)


def run_to_the_end(batch, schedule):
    """Step batch until every row has ended; schedule: {step: rows added before it}."""
    step = 0
    while len(batch) or any(later >= step for later in schedule):
        for row in schedule.get(step, []):
            batch.add(row)
        batch.step()
        step += 1


def three_rows():
    """Rows with distinct prompt tokens, greedy or seeded, all with a strong repetition penalty
    (so that each row's tokens stay distinct), ending after 12, 6 and 8 tokens."""
    settings = [("the lazy dog", engine.Sampling(12, 0, repetition_penalty=50.0), None),
                ("a small model", engine.Sampling(6, 1.0, 50, 0.9, 50.0), 1),
                ("language model writes", engine.Sampling(8, 0, repetition_penalty=50.0), None)]
    rows = []
    for prompt, sampling, seed in settings:
        sent, send = events()
        rows.append((engine.Row(None, prompt, sampling, send, seed), sent))
    return rows


def test_rows_that_join_and_leave_mid_decode_each_get_the_definitions_logits(chat_dir,
                                                                             monkeypatch):
    """Three rows join a batch at steps 0, 3 and 5 (the last fed 4 tokens a step while the
    others decode) and leave after 12, 6 and 8 tokens: every decoding step gives each row the
    logits that the plain definition gives its tokens so far (distinct within the row, past the
    window of 16), and each row gets the tokens it gets alone."""
    loaded = engine.load_for_generation(str(chat_dir))
    model = loaded.model

    def batch():
        return engine.Batch(model, loaded.tokenizer, stop=[], prefill_chunk=4)

    alone = []
    for row, sent in three_rows():
        run_to_the_end(batch(), {0: [row]})
        alone.append(row.generated)
    steps = []  # (each row's tokens, the tokens fed included; the step's logits (B, V))
    decode_step = engine.decode_step

    def recording(model, token, cache, weights):
        sequences = [row.held + row.generated[-1:] for row in together.rows]
        steps.append((sequences, decode_step(model, token, cache, weights)))
        return steps[-1][1]

    monkeypatch.setattr(engine, "decode_step", recording)
    rows = three_rows()
    together = batch()
    run_to_the_end(together, {0: [rows[0][0]], 3: [rows[1][0]], 5: [rows[2][0]]})
    assert [row.generated for row, _ in rows] == alone
    for (row, sent), expected in zip(rows, (12, 6, 8)):
        assert len(row.generated) == expected and sent[-1][:2] == ("end", "length")
        assert [event[1] for event in sent[:-1]] == row.generated  # no stop token: all sent
        assert len(set(row.held + row.generated)) == len(row.held) + 1
    assert len(rows[0][0].held) > len(rows[2][0].held) > model.config.keep_window_size
    sizes = [len(sequences) for sequences, _ in steps]
    assert max(sizes) == 3 and sizes[0] == 1 and sizes[-1] == 1  # joined, then left
    with torch.no_grad():
        for sequences, logits in steps:
            for sequence, row_logits in zip(sequences, logits):
                expected = naive_forward(model, torch.tensor([sequence]))[0, -1]
                assert_close_to_scale(row_logits, expected)


def test_a_stop_token_ends_a_row_and_its_state_is_kept(chat_dir):
    """A row whose first token is a stop token sends no token, ends with "stop", and leaves its
    state kept: the prompt held, the stop token pending."""
    loaded = engine.load_for_generation(str(chat_dir))
    first = engine.Row(None, "the lazy dog", engine.Sampling(5, 0), events()[1])
    run_to_the_end(engine.Batch(loaded.model, loaded.tokenizer, stop=[]), {0: [first]})
    stop = first.generated[0]
    sent, send = events()
    row = engine.Row(None, "the lazy dog", engine.Sampling(5, 0), send)
    batch = engine.Batch(loaded.model, loaded.tokenizer, stop=[stop])
    run_to_the_end(batch, {0: [row]})
    prompt = engine.prompt_ids(loaded.tokenizer, "the lazy dog")
    assert sent == [("end", "stop", {"prompt_tokens": len(prompt), "completion_tokens": 1,
                                     "total_tokens": len(prompt) + 1})]
    (held, kept), = batch.states.kept.items()
    assert list(held) == prompt and kept.pending == [stop] and kept.text is None


def test_the_end_of_turn_rule_by_hand(chat_dir, monkeypatch):
    """With an end of turn of two tokens (<|eot_id|> and a newline), a reply that ends with the
    first is followed by the second alone, any other reply by both; a chat's state after a turn
    is one pass over the prompt, the reply and what the rule adds."""
    two_token_end = TEMPLATE.replace("'<|eot_id|>' }}", "'<|eot_id|>\\n' }}")
    loaded = engine.load_for_generation(str(chat_dir))
    tokenizer, model = loaded.tokenizer, loaded.model
    turns = engine.Turns({"template": two_token_end, "bos_token": "<|begin_of_text|>",
                          "eos_token": ""}, tokenizer, loaded.stop)
    eot, newline = tokenizer.token_to_id("<|eot_id|>"), tokenizer.encode(["\n"])[0]
    assert turns.end_of_turn == "<|eot_id|>\n" and turns.end_ids == [eot] + newline
    words = tokenizer.encode(["hello world"])[0]
    assert turns.after_reply(words) == [eot] + newline
    assert turns.after_reply(words + [eot]) == newline
    assert turns.after_reply([]) == [eot] + newline

    for reply in (words, words + [eot]):
        prompts = []

        def scripted(model, tokenizer, prompt, sampling, stop, cache, show):
            prompts.append(prompt)  # what generate_reply leaves in the cache: prompt and reply
            engine.feed(model, prompt + reply, cache)
            return engine.Reply(engine.reply_text(tokenizer, reply, stop), reply, 0.0)

        monkeypatch.setattr(engine, "generate_reply", scripted)
        chat = engine.Chat(model, turns, engine.Sampling(8, 0))
        chat.answer("Hi")
        fed = prompts[0] + reply + turns.after_reply(reply)
        assert tokenizer.decode(fed) == turns.held(chat.messages)  # the template's text
        one_pass = model.new_cache()
        engine.feed(model, fed, one_pass)
        assert chat.cache.length == one_pass.length == len(fed)
        for name in ("keys", "dt", "positions"):
            ours, theirs = chat.cache.state_dict()[name], one_pass.state_dict()[name]
            assert_close_to_scale(ours.double(), theirs.double())


def test_kept_states_continue_the_longest_and_drop_the_least_recently_used():
    """By hand: a request continues the longest kept state whose tokens (held, then pending) or
    text begin its own, never one equal to it; within the limit the least recently used (kept
    or continued) goes first."""
    def state(n):
        return {"keys": torch.zeros(n, dtype=torch.float32), "length": torch.tensor(n)}

    states = engine.States(limit=60)
    states.keep([1, 2], state(5), [3], "ab")  # 20 + 8 bytes
    states.keep([1, 2, 3, 4], state(5), [5], "abcd")
    assert states.continued(tokens=[1, 2, 3, 4, 5, 6])[0] == (1, 2, 3, 4)
    assert states.continued(tokens=[1, 2, 3, 9])[0] == (1, 2)
    assert states.continued(tokens=[1, 2, 3]) is None  # nothing new to feed
    assert states.continued(text="abcx")[0] == (1, 2) and states.continued(text="ab") is None
    assert (states.hits, states.misses) == (3, 2)
    states.continued(text="abcde")  # (1, 2, 3, 4) used last: (1, 2) goes first
    states.keep([7], state(5), [], None)
    assert list(states.kept) == [(1, 2, 3, 4), (7,)] and states.bytes == 56
    states.keep([7], state(10), [], None)  # kept again: replaced (not counted twice), and the
    assert list(states.kept) == [(7,)] and states.bytes == 48  # rest dropped to fit
    assert states.figures() == {"kept": 1, "bytes": 48, "limit_bytes": 60, "hits": 4,
                                "misses": 2}

"""Instruction tuning (SFT) on CPU, with a tiny model and a SentencePiece tokenizer trained here:
prepare_data.py --chat (the SentencePiece -> tokenizer.json conversion, the chat tokens, the
assistant-only loss mask, conversation shards), the ConversationLoader (padding, one
conversation per row, the padded lengths), and train.py runs that learn a toy conversation set
and export it, which transformers and sample.py --chat both load and agree on."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare_data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from doge import Doge, DogeConfig, grow_vocabulary  # noqa: E402
from helpers import one_thread, random_documents  # noqa: E402,F401 (an autouse fixture)
from oracle import assert_close_to_scale  # noqa: E402
from prepare_data import (ConversationLoader, collate, prepare_chat,  # noqa: E402
                          read_conversation_shard, write_conversation_shard)
from tokenizer import (CHAT_TOKENS, DOGE_CHAT_TEMPLATE, chat_tokenizer,  # noqa: E402
                       load_chat_template, load_text_tokenizer, load_tokenizer, render_chat,
                       sentencepiece_as_tokenizers, stop_ids, train_sentencepiece)

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

TOY = [  # question -> the answer the model must learn to give
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Say hello.", "Hello there, friend!"),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a colour.", "Blue is a colour of the sky."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("Count to three.", "One, two, three."),
]
CORPUS = [f"{q} {a}" for q, a in TOY] * 4 + [
    "the quick brown fox jumps over the lazy dog 12345 67890",
    "def f(x):\n\treturn x  # tabs, spaces   and unicode: héllo wörld 日本語",
    "A small language model writes small sentences, one word after another."] * 4
TRAIN = ["--block_size=128", "--batch_size=6", "--total_batch_size=768", "--device=cpu",
         "--compile=False", "--seed=0", "--log_interval=1", "--eval_iters=1",
         "--save_interval=0"]


def messages_of(question, answer, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]


def write_jsonl(path, conversations):
    with open(path, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny untrained Doge as a Hugging Face directory with our kind of tokenizer.model (no
    chat tokens, no tokenizer.json), like the tiny pretraining demo's."""
    directory = tmp_path_factory.mktemp("base")
    (directory / "tokenizer.model").write_bytes(train_sentencepiece(CORPUS, vocab_size=400))
    vocab_size = load_tokenizer(str(directory / "tokenizer.model")).vocab_size
    torch.manual_seed(0)
    config = DogeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        bos_token_id=1, eos_token_id=2)
    Doge(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def base_run(base_dir, tmp_path_factory):
    """The same model as a train.py out_dir: a checkpoint, the data's tokenizer.model beside it."""
    directory = tmp_path_factory.mktemp("base_run")
    model = Doge.from_pretrained(str(base_dir))
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "step": 0}, directory / "ckpt_000000.pt")
    (directory / "tokenizer.model").write_bytes((base_dir / "tokenizer.model").read_bytes())
    return directory


@pytest.fixture(scope="module")
def chat_dir(base_dir, tmp_path_factory):
    """The chat tokenizer prepare_data.py --chat makes from base_dir, written alone."""
    directory = tmp_path_factory.mktemp("chat")
    tokenizer, config, _ = chat_tokenizer(str(base_dir))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def prepare_toy(directory, conversations, tokenizer_dir, **options):
    """prepare_data.py --chat of the conversations (a jsonl file) into directory/data."""
    data = write_jsonl(directory / "toy.jsonl", conversations)
    prepare_data.main(["--chat", f"--input={data}", f"--tokenizer={tokenizer_dir}",
                       f"--out_dir={directory / 'data'}",
                       *(f"--{key}={value}" for key, value in options.items())])
    return directory / "data"


@pytest.fixture(scope="module")
def sft_run(base_run, tmp_path_factory):
    """A short SFT run of the tiny model (from a train.py out_dir) on the toy conversations (one
    with a system message, one with two rounds), 100 passes over them."""
    directory = tmp_path_factory.mktemp("sft")
    conversations = [messages_of(q, a) for q, a in TOY[:4]]
    conversations.append(messages_of(*TOY[4], system="You are a helpful assistant."))
    conversations.append(messages_of(*TOY[5]) + messages_of("And again?", TOY[5][1]))
    data = prepare_toy(directory, conversations, base_run)
    out = directory / "out"
    train.main([f"--init_from={base_run}", f"--data_dir={data}", f"--out_dir={out}", *TRAIN,
                "--sft_epochs=100", "--learning_rate=1e-2", "--warmup_iters=5",
                "--decay_iters=20", "--eval_interval=50"])
    with open(out / "log.jsonl") as f:
        return out, [json.loads(line) for line in f]


def one_line_exit(excinfo):
    message = str(excinfo.value.code)
    assert "\n" not in message and message.startswith("error:"), message
    return message


# ----------------------------------------------------------------------------------------------
# the tokenizer


def test_sentencepiece_becomes_an_equal_tokenizer_json(base_dir):
    reference = load_tokenizer(str(base_dir / "tokenizer.model"))
    converted = sentencepiece_as_tokenizers(str(base_dir / "tokenizer.model"))
    texts = CORPUS + ["  two leading spaces, trailing  ", "\n\n\tnew lines\r\n", "Ünïcödé 🙂 ü",
                      "digits 3.14159 and x2", "<s> </s> <unk> are text here", ""] + \
        random_documents(50, seed=3)  # "▁" itself, control characters, byte fallback, ...
    for text, ids in zip(texts, reference.encode(texts)):
        assert converted.encode(text, add_special_tokens=False).ids == ids, text
        assert converted.decode(ids, skip_special_tokens=False) == text


DEFAULT_TOKENIZER = os.path.join(ROOT, "data", "default", "tokenizer.model")


@pytest.mark.skipif(not os.path.isfile(DEFAULT_TOKENIZER), reason="no prepared default corpus")
def test_the_default_corpus_tokenizer_converts_exactly():
    """The tiny demo's 32768-piece tokenizer, on Python source (what it was trained on)."""
    import glob
    import sysconfig
    reference = load_tokenizer(DEFAULT_TOKENIZER)
    converted = sentencepiece_as_tokenizers(DEFAULT_TOKENIZER)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:30]
    texts = [open(path, encoding="utf-8", errors="replace").read() for path in files]
    for text, ids in zip(texts, reference.encode(texts)):
        assert converted.encode(text, add_special_tokens=False).ids == ids


def test_a_tokenizer_json_gains_the_chat_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    size = tokenizer.get_vocab_size()
    chat, config, added = chat_tokenizer(str(tmp_path))
    assert [chat.token_to_id(t) for t in CHAT_TOKENS] == [size, size + 1, size + 2, 1]
    assert added == [size, size + 1, size + 2] and config["bos_token"] == "<|begin_of_text|>"
    assert config["chat_template"] == DOGE_CHAT_TEMPLATE


def test_chat_tokenizer_adds_what_the_template_needs(base_dir, chat_dir, tmp_path):
    sp_size = load_tokenizer(str(base_dir / "tokenizer.model")).vocab_size
    tokenizer = load_text_tokenizer(str(chat_dir), 10 ** 6)
    assert [tokenizer.token_to_id(t) for t in CHAT_TOKENS] == \
        list(range(sp_size, sp_size + 4))  # new ids after the SentencePiece vocabulary
    assert tokenizer.eot_id == 2  # </s>, the documents' separator in pretraining, still ends text
    assert tokenizer.bos_id == sp_size
    # text that spells a special token in a prompt is that token, as in transformers
    assert tokenizer.encode(["<|eot_id|>"])[0] == [sp_size + 3]
    # a model's own template is kept, and nothing is added
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'x' }}"}))
    (tmp_path / "tokenizer.json").write_text((chat_dir / "tokenizer.json").read_text())
    _, config, added = chat_tokenizer(str(tmp_path))
    assert config["chat_template"] == "{{ 'x' }}" and added == []


def test_new_token_rows_start_at_the_mean():
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    grown = grow_vocabulary(model, 53, [50, 51, 52])
    old = model.embed_tokens.weight
    assert grown.config.vocab_size == 53 and grown.lm_head.weight is grown.embed_tokens.weight
    assert torch.equal(grown.embed_tokens.weight[:50], old)
    assert torch.allclose(grown.embed_tokens.weight[50:], old.mean(0).expand(3, -1))
    idx = torch.tensor([[3, 7, 9, 1]])
    assert_close_to_scale(grown(idx)[0][..., :50], model(idx)[0])  # the same function


# ----------------------------------------------------------------------------------------------
# the loss mask, padding, rows


def test_the_mask_covers_exactly_the_assistant_turns(chat_dir, tmp_path):
    tokenizer = load_text_tokenizer(str(chat_dir), 10 ** 6)
    template = load_chat_template(str(chat_dir))
    messages = (messages_of("Hi!", "Hello there, friend!", system="Be brief.")
                + messages_of("What is two plus two?", "Two plus two is four."))
    [(text, spans)] = prepare_data.assistant_spans(template, [messages])
    assert [text[a:b] for a, b in spans] == ["Hello there, friend!<|eot_id|>",
                                             "Two plus two is four.<|eot_id|>"]
    [(ids, supervised)], counts = prepare_data.tokenize_conversations([messages], tokenizer,
                                                                      template)
    assert tokenizer.decode(ids) == text  # nothing lost, nothing added
    runs, current = [], []  # the supervised tokens, run by run
    for token, is_supervised in zip(ids.tolist(), supervised.tolist()):
        if is_supervised:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert [tokenizer.decode(run) for run in runs] == [text[a:b] for a, b in spans]
    # the prompt before each answer is what sample.py --chat feeds the model, token for token
    first_answer = int(np.argmax(supervised))
    prompt = render_chat(template, messages[:2])
    assert ids[:first_answer].tolist() == tokenizer.encode([prompt])[0]
    # targets: the next token where it is supervised, -1 elsewhere
    x, y = collate([(ids, supervised)], block_size=999)
    n = len(ids) - 1
    assert (x[0, :n] == ids[:-1]).all() and x.dtype == y.dtype == np.int64
    assert (y[0, :n] == np.where(supervised[1:], ids[1:], -1)).all() and (y[0, n:] == -1).all()
    assert counts["supervised"] == int(supervised.sum()) == sum(len(r) for r in runs)
    # through a conversation shard: the same tokens and mask come back
    write_conversation_shard(tmp_path / "c_train_000001.bin", [(ids, supervised), (ids, supervised)])
    tokens, mask, offsets = read_conversation_shard(tmp_path / "c_train_000001.bin")
    assert offsets.tolist() == [0, len(ids), 2 * len(ids)] and tokens.dtype == np.uint16
    assert (tokens[len(ids):] == ids).all() and (mask[:len(ids)] == supervised).all()
    # the loader cuts after block_size + 1 tokens, and drops a conversation left with no answer
    for block_size, rows in ((999, n), (first_answer, first_answer), (5, None)):
        if rows is None:
            with pytest.raises(ValueError, match="no train conversation .* within block_size 5"):
                ConversationLoader(tmp_path, "train", 1, block_size, 0, 1, 10 ** 6)
            continue
        loader = ConversationLoader(tmp_path, "train", 1, block_size, 0, 1, 10 ** 6)
        assert loader.lengths.tolist() == [rows, rows] and loader.dropped == 0
        assert loader.cut == (2 if block_size < n else 0)
        (x,), (y,) = loader.next_batch(1)
        assert (x[0, :rows] == ids[:rows]).all() and (y[0, :rows] == expected_targets(
            ids, supervised)[:rows]).all()


def expected_targets(ids, supervised):
    return np.where(supervised[1:], ids[1:], -1)


def test_spans_follow_other_templates():
    """A ChatML-style template (system default, newline after each turn): each answer's span is
    its content and the template's end of turn."""
    chatml = {"template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                          "<|im_start|>assistant\n{% endif %}",
              "bos_token": "", "eos_token": ""}
    messages = messages_of("a", "b") + messages_of("c", "d")
    [(text, spans), (other, [span])] = prepare_data.assistant_spans(chatml, [messages, messages[:2]])
    assert [text[a:b] for a, b in spans] == ["b<|im_end|>\n", "d<|im_end|>\n"]
    assert other[span[0]:span[1]] == "b<|im_end|>\n" and text.startswith(other)
    assert text == render_chat(chatml, messages)[:len(text)]  # the same as one at a time


def test_padding_does_not_change_the_loss(chat_dir):
    tokenizer = load_text_tokenizer(str(chat_dir), 10 ** 6)
    template = load_chat_template(str(chat_dir))
    examples, _ = prepare_data.tokenize_conversations([messages_of(q, a) for q, a in TOY[:2]],
                                                      tokenizer, template)
    torch.manual_seed(0)
    model = Doge(DogeConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, keep_window_size=8)).eval()
    longest = max(len(ids) for ids, _ in examples)
    with torch.no_grad():
        losses = [model(*map(torch.from_numpy, collate(examples, 999, length=longest + extra)))[1]
                  for extra in (0, 13, 64)]
        alone = [model(*map(torch.from_numpy, collate([example], 999)))[1] for example in examples]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], atol=1e-6, rtol=1e-6)
    # and a row's loss is its own: the batch's is the token-weighted mean of the rows'
    counts = [int(s[1:].sum()) for _, s in examples]
    torch.testing.assert_close(losses[0], sum(l * c for l, c in zip(alone, counts)) / sum(counts),
                               atol=1e-6, rtol=1e-6)


def test_conversations_never_share_a_row(tmp_path):
    """Every row holds exactly one conversation from its start, then padding; each epoch reads
    every conversation once (across two shards); two processes see the rows of one."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(23):  # ids: the conversation's number, then 4 to 64 tokens below 1000
        ids = np.concatenate([[1000 + i], rng.integers(3, 50, rng.integers(4, 65))])
        examples.append((ids.astype(np.int32), np.arange(len(ids)) % 3 == 0))
    write_conversation_shard(tmp_path / "c_train_000001.bin", examples[:10])
    write_conversation_shard(tmp_path / "c_train_000002.bin", examples[10:])

    def loader(rank=0, world_size=1):
        return ConversationLoader(tmp_path, "train", 3, 64, rank, world_size, 2000, seed=1)
    one = loader()
    two = [loader(rank, 2) for rank in (0, 1)]
    seen = []
    for _ in range(10):  # 10 steps of 2 x 3 rows: 60 rows, about 2.6 epochs
        xs, ys = one.next_batch(2)
        halves = [loader.next_batch(1) for loader in two]
        assert [np.array_equal(xs[m], halves[m][0][0]) and np.array_equal(ys[m], halves[m][1][0])
                for m in range(2)] == [True, True]
        for x, y in zip(xs, ys):
            assert x.shape[1] % prepare_data.PAD_MULTIPLE == 0 or x.shape[1] == 64
            for row in range(len(x)):
                first = int(x[row, 0]) - 1000
                ids = examples[first][0]
                n = len(ids) - 1
                assert x[row, :n].tolist() == ids[:-1].tolist()
                assert (x[row, n:] == 0).all() and (y[row, n:] == -1).all()
                assert not (x[row, 1:] >= 1000).any()  # no second conversation in the row
                seen.append(first)
    stream = loader().take(60)
    assert sorted(seen) == sorted(stream)  # the steps read the stream (sorted within a step)
    assert sorted(stream[:23]) == sorted(stream[23:46]) == list(range(23)) != stream[:23]
    state = one.state_dict()
    again = loader()
    again.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(again.next_batch(2)[0], one.next_batch(2)[0]))
    with pytest.raises(ValueError, match="token id 10.., outside the model's vocabulary of 1000"):
        ConversationLoader(tmp_path, "train", 3, 64, 0, 1, 1000, seed=1).next_batch(1)


def test_padded_lengths_come_in_buckets_when_compiled(tmp_path):
    """Uncompiled, a micro-batch is padded to a multiple of 16; compiled (one graph per shape),
    to a power of two of at least 64, at most block_size: a handful of lengths in a whole run."""
    rule = prepare_data.padded_length
    assert [rule(n, 256) for n in (1, 16, 17, 200, 256)] == [16, 16, 32, 208, 256]
    assert [rule(n, 256, bucket=True) for n in (1, 64, 65, 128, 129, 256)] == \
        [64, 64, 128, 128, 256, 256]
    assert rule(300, 320, bucket=True) == 320 and rule(20, 48, bucket=True) == 48
    assert len({rule(n, 8192, bucket=True) for n in range(1, 8193)}) == 8
    examples = [(np.arange(n, dtype=np.int32) % 50, np.ones(n, dtype=bool)) for n in (5, 30, 90)]
    write_conversation_shard(tmp_path / "c_train_000001.bin", examples)
    for bucket, lengths in ((False, {16, 32, 96}), (True, {64, 128})):
        loader = ConversationLoader(tmp_path, "train", 1, 256, 0, 1, 50, bucket=bucket)
        assert {loader.next_batch(1)[0][0].shape[1] for _ in range(3)} == lengths
    # train.py buckets exactly when it compiles
    write_conversation_shard(tmp_path / "c_val_000000.bin", examples)
    cfg = train.TrainConfig(data_dir=str(tmp_path), batch_size=1, block_size=256)
    for compile, lengths in ((False, {16, 32, 96}), (True, {64, 128})):
        run = train.Run(False, 0, 1, torch.device("cpu"), "gloo", torch.float32, compile, 1)
        loader, _ = train.open_loaders(cfg, True, 50, run)
        assert {loader.next_batch(1)[0][0].shape[1] for _ in range(3)} == lengths


# ----------------------------------------------------------------------------------------------
# a run, its export


def test_sft_learns_the_toy_conversations(sft_run, capsys):
    out, records = sft_run
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 100  # sft_epochs=100 of 6 conversations, 6 per step
    assert losses[-1] < 0.1 * losses[0] and losses[-1] < 0.3
    assert records[-1]["tokens"] > 0 and records[-1]["val_loss"] < 0.3
    for question, answer in TOY[:3]:  # its answers become the trained ones
        sample.main([f"--init_from={out / 'hf'}", "--chat", f"--start={question}",
                     "--temperature=0", "--max_new_tokens=30", "--device=cpu"])
        assert capsys.readouterr().out == answer + "\n"


def test_the_export_loads_in_transformers_and_agrees(sft_run, base_run):
    transformers = pytest.importorskip("transformers")
    out, _ = sft_run
    hf = str(out / "hf")
    ours = Doge.from_pretrained(hf).eval()
    # eager: up to some release after 5.17, the reference's default sdpa path skips the causal
    # mask and with it the dynamic mask (a reference defect; newer releases agree either way)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        hf, attn_implementation="eager").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert_close_to_scale(theirs(idx).logits, ours(idx)[0])
    # the same as the run's last checkpoint
    checkpoint = Doge.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpoint(idx)[0], ours(idx)[0], atol=0, rtol=0)
    # the chat template renders the same prompt, and the same tokens, in both
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    messages = messages_of("Hi!", "Hello there, friend!", system="Be brief.") + \
        [{"role": "user", "content": "What is ▁ in 日本語 🙂 ñ?\n\tTwo  spaces, <s> text."}]
    prompt = render_chat(load_chat_template(hf), messages)
    assert tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True) == prompt
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    ours_tokenizer = load_text_tokenizer(hf, ours.config.vocab_size)
    assert list(ids) == ours_tokenizer.encode([prompt])[0]
    assert tokenizer.decode(ids) == prompt
    assert set(tokenizer(prompt)) == {"input_ids", "attention_mask"}  # what generate() accepts
    # a message's text is tokenized as the base model's SentencePiece tokenizer does it
    content = messages[-1]["content"]
    base = load_tokenizer(str(base_run / "tokenizer.model"))
    assert tokenizer(content, add_special_tokens=False)["input_ids"] == base.encode([content])[0]
    # the model card names what it started from and what it was trained on
    card = (out / "hf" / "README.md").read_text()
    assert "- Training data: --input " in card and "toy.jsonl" in card
    # generation stops at the end of the answer in both
    eot = ours_tokenizer.token_to_id("<|eot_id|>")
    assert eot in stop_ids(ours, ours_tokenizer, hf)
    assert eot in theirs.generation_config.eos_token_id and tokenizer.eos_token == "<|eot_id|>"


def test_resumed_sft_equals_uninterrupted(base_dir, tmp_path):
    """An SFT run stopped at step 3 and resumed (weights with the grown vocabulary, optimizer,
    position in the conversations, the tokenizer left in out_dir) matches one never stopped."""
    data = prepare_toy(tmp_path, [messages_of(q, a) for q, a in TOY] * 2, base_dir)
    args = [f"--init_from={base_dir}", f"--data_dir={data}", *TRAIN, "--batch_size=4",
            "--total_batch_size=1024", "--warmup_iters=2", "--decay_iters=0", "--eval_interval=2"]

    def run(out, *more):
        train.main([*args, f"--out_dir={tmp_path / out}", *more])
        with open(tmp_path / out / "log.jsonl") as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

    full = run("full", "--max_iters=6")
    run("part", "--max_iters=3")
    resumed = run("part", "--max_iters=6", "--init_from=resume")
    assert resumed == full and len(full) == 6
    branch = run("branch", "--max_iters=6", "--init_from=resume",  # into a new out_dir
                 f"--resume_ckpt={tmp_path / 'part' / 'ckpt_000003.pt'}")
    assert branch == {step: loss for step, loss in full.items() if step > 3}
    assert (tmp_path / "branch" / "hf" / "tokenizer.json").is_file()
    a, b = (torch.load(tmp_path / out / "ckpt_000006.pt", weights_only=True)
            for out in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data_position"] == b["data_position"] == {"position": 48, "conversations": 12}


@pytest.mark.slow
def test_two_ddp_processes_match_one(base_dir, tmp_path):
    """Two gloo processes with a micro-step each see the rows one process gets in two: the same
    losses (each step's mean over all its supervised tokens) and weights."""
    import socket
    import subprocess
    data = prepare_toy(tmp_path, [messages_of(q, a) for q, a in TOY] * 2, base_dir)
    args = [f"--init_from={base_dir}", f"--data_dir={data}", *TRAIN, "--batch_size=3",
            "--total_batch_size=768", "--max_iters=4", "--eval_interval=2", "--eval_iters=2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", os.path.join(ROOT, "train.py"),
               *args, f"--out_dir={tmp_path / 'ddp'}"]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train.main([*args, f"--out_dir={tmp_path / 'one'}", "--eval_iters=4"])
    logs = {}
    for out in ("ddp", "one"):
        with open(tmp_path / out / "log.jsonl") as f:
            logs[out] = [json.loads(line) for line in f]
    for a, b in zip(logs["ddp"], logs["one"], strict=True):
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-5)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-5)
        assert a["tokens"] == b["tokens"]
    a, b = (torch.load(tmp_path / out / "ckpt_000004.pt", weights_only=True)
            for out in ("ddp", "one"))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4)


def test_a_hugging_face_data_set_comes_through_datasets(monkeypatch, tmp_path):
    """A --source is a data set for `datasets` (here a stand-in): its train split trains, its
    test split validates; offline with HF_DATASETS_OFFLINE=1 no network is tried."""
    import types
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        return {"train": [{"messages": messages_of(q, a)} for q, a in TOY],
                "test": [{"messages": messages_of(*TOY[0])}]}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = prepare_data.read_conversations(source="HuggingFaceTB/smoltalk:all")
    train_set, val_set, held_out = prepare_data.chat_splits(data, None, seed=0)
    assert calls == [("HuggingFaceTB/smoltalk", "all")] and "test split" in held_out
    assert len(train_set) == len(TOY) and val_set == [messages_of(*TOY[0])]
    # a local validation file instead of the test split
    val = write_jsonl(tmp_path / "val.jsonl", [messages_of(*TOY[1])] * 3)
    _, val_set, _ = prepare_data.chat_splits(data, prepare_data.read_conversations([val]), 0)
    assert val_set == [messages_of(*TOY[1])] * 3


def test_prepare_chat_writes_what_a_run_needs(base_dir, tmp_path):
    """The chat tokenizer, val and train conversation shards, and a meta.json saying what they
    hold; 1 in 20 conversations held out, chosen by the seed."""
    conversations = [messages_of(f"Question {i}?", f"Answer {i}.") for i in range(40)]
    meta = prepare_chat(str(tmp_path / "data"), [write_jsonl(tmp_path / "c.jsonl", conversations)],
                        tokenizer=str(base_dir), seed=3)
    names = sorted(os.listdir(tmp_path / "data"))
    assert names == ["chat_train_000001.bin", "chat_val_000000.bin", "meta.json",
                     "tokenizer.json", "tokenizer_config.json"]
    size = load_tokenizer(str(base_dir / "tokenizer.model")).vocab_size
    assert meta["kind"] == "conversations" and meta["vocab_size"] == size + 4
    assert meta["added_tokens"] == dict(zip(CHAT_TOKENS, range(size, size + 4)))
    assert meta["conversations"] == {"val": 2, "train": 38} and meta["eos_ids"][0] == size + 3
    assert meta["chat_template"] == DOGE_CHAT_TEMPLATE and "seed=3" in meta["held_out"]
    _, supervised, offsets = read_conversation_shard(tmp_path / "data" / "chat_val_000000.bin")
    assert len(offsets) == 3 and int(supervised.sum()) == meta["supervised"]["val"]
    again = prepare_chat(str(tmp_path / "other"), [str(tmp_path / "c.jsonl")],
                         tokenizer=str(base_dir), seed=4)
    assert again["held_out"] != meta["held_out"]
    first = read_conversation_shard(tmp_path / "data" / "chat_val_000000.bin")[0]
    assert not np.array_equal(first, read_conversation_shard(
        tmp_path / "other" / "chat_val_000000.bin")[0])  # other conversations held out
    # a damaged shard is a clear error
    path = tmp_path / "data" / "chat_train_000001.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="chat_train_000001.bin: .*truncated or corrupt"):
        read_conversation_shard(path)
    with pytest.raises(ValueError, match="holds conversations"):
        prepare_data.read_shard(tmp_path / "data" / "chat_val_000000.bin")


def prepare_error(*args):
    with pytest.raises(SystemExit) as excinfo:
        prepare_data.main(["--chat", *args])
    message = str(excinfo.value.code)
    assert "\n" not in message and message.startswith("prepare_data.py: error:"), message
    return message


def test_bad_conversation_data_is_a_clear_error(base_dir, tmp_path):
    out = f"--out_dir={tmp_path / 'data'}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": messages_of("q", "a")}) + "\n"
                   + json.dumps({"text": "no messages here"}) + "\n")
    message = prepare_error(f"--input={bad}", f"--tokenizer={base_dir}", out)
    assert f"{bad}:2" in message and "'messages'" in message and "'text'" in message
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    assert "non-empty list" in prepare_error(f"--input={bad}", f"--tokenizer={base_dir}", out)
    assert "no files match" in prepare_error(f"--input={tmp_path}/*.jsonl.gz",
                                             f"--tokenizer={base_dir}", out)
    message = prepare_error("--source=HuggingFaceTB/smoltalk:all", f"--tokenizer={base_dir}", out)
    assert "datasets" in message or "network" in message
    assert "--tokenizer" in prepare_error(f"--input={bad}", out)
    assert "no tokenizer.json or tokenizer.model" in prepare_error(
        f"--input={bad}", f"--tokenizer={tmp_path}", out)
    # conversation data fine-tunes a trained model: from scratch makes no sense
    data = prepare_toy(tmp_path, [messages_of(q, a) for q, a in TOY], base_dir)
    with pytest.raises(SystemExit) as excinfo:
        train.main([f"--out_dir={tmp_path / 'out'}", f"--data_dir={data}", *TRAIN])
    assert "init_from" in one_line_exit(excinfo)


def test_train_imports_no_terminal_program():
    """Imports run one way: train.py -> eval.py (the benchmarks), doge.py and the data side; nothing
    imports sample.py or bench.py."""
    import subprocess
    code = "import sys, train; print(sorted({'sample', 'bench', 'eval'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "['eval']", result.stderr[-2000:]

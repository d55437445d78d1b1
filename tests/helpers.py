"""What several test files need: one thread for tiny models, a small tokenizer.json, texts that
tokenizers get wrong."""

import random
import signal

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when the machine is
    busy with other work. A module uses it with `from helpers import one_thread`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt, as in a program started from a terminal, whatever this
    process inherited: a shell starts a background job (`pytest &`, nohup) with SIGINT ignored,
    and a Ctrl-C test would then see nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def write_bpe_tokenizer(directory, corpus, special_tokens, vocab_size):
    """A byte-level BPE tokenizer.json trained on corpus, as the Doge tokenizer is (special
    tokens first, ids 0, 1, ...); returns its size. Needs the optional `tokenizers` package."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer.get_vocab_size()


# Fragments that tokenizers get wrong when they normalise: spaces and tabs, CRLF, NUL and other control
# characters, "▁" (SentencePiece's own space symbol), BOM, combining marks, CJK, emoji, and text that spells
# special tokens.
FRAGMENTS = ["def f(x):\n", "    return x + 1\n", "\tindented\ttabs", "\r\n", "  two  spaces  ", "\n\n\n",
             "héllo wörld", "日本語のテキスト", "🙂🚀", "▁", "▁▁x▁", "\x00", "\x7f\x1b[31m", "\u2028", "\ufeff",
             "e\u0301", "</s>", "<s>", "<|end_of_text|>", "<0x41>", "12345.6789", "trailing   \n", " ", "\x0b\x0c"]


def random_documents(count, seed=0, max_fragments=40):
    rng = random.Random(seed)
    return ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, max_fragments))) for _ in range(count)]

"""prepare_data.py: shard format, lossless round trip, splits, inputs, streaming big files, tokenizers, errors,
Ctrl-C, re-runs. Every corpus here is written by the test itself into tmp_path; nothing comes from the network."""
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import tracemalloc
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import prepare_data  # noqa: E402
from prepare_data import list_shards, main, read_meta, read_shard, write_shard  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from helpers import FRAGMENTS, random_documents  # noqa: E402

def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:  # newline="": keep \r\n as written
        f.write(text)
    return str(path)


def write_docs_as_files(directory, documents):
    directory.mkdir(parents=True, exist_ok=True)
    return [write_text(directory / f"doc{i:04d}.txt", doc) for i, doc in enumerate(documents)]


def write_jsonl(path, documents, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(documents))
    return str(path)


def run(*args):
    """prepare_data.main with --key=value arguments; fast settings unless overridden."""
    defaults = {"--vocab_size": "512", "--workers": "1", "--val_tokens": "50"}
    given = {a.split("=", 1)[0] for a in args}
    return main(list(args) + [f"{k}={v}" for k, v in defaults.items() if k not in given])


def stream(out_dir):
    """All tokens of out_dir in index order, val first."""
    return np.concatenate([read_shard(p) for p in list_shards(out_dir, "val") + list_shards(out_dir, "train")])


def decoded_documents(out_dir):
    """Split the token stream on end-of-text and decode each document."""
    meta = read_meta(out_dir)
    tokenizer = load_tokenizer(os.path.join(out_dir, meta["tokenizer"]["path"]))
    tokens = stream(out_dir)
    ends = np.flatnonzero(tokens == meta["eos_id"])
    assert len(ends) and ends[-1] == len(tokens) - 1, "the stream must end with end-of-text"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e]) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A small SentencePiece model trained once by prepare_data, reused where training is not the point."""
    out = tmp_path_factory.mktemp("tokenizer")
    files = write_docs_as_files(out / "docs", random_documents(60, seed=1))
    run("--input", *files, f"--out_dir={out / 'data'}")
    return str(out / "data" / "tokenizer.model")


# -----------------------------------------------------------------------------
# shard format

def test_write_and_read_shard_header_and_tokens(tmp_path):
    tokens = np.array([0, 1, 65535, 42], dtype=np.uint16)
    write_shard(tmp_path / "a_train_000001.bin", tokens)
    header = np.fromfile(tmp_path / "a_train_000001.bin", dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 4] and not header[3:].any()
    assert os.path.getsize(tmp_path / "a_train_000001.bin") == 1024 + 4 * 2
    loaded = read_shard(tmp_path / "a_train_000001.bin")
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16 and list(loaded) == list(tokens)
    with pytest.raises(ValueError):  # read-only map
        loaded[0] = 1

    big = np.array([3, 65536, 2**32 - 1], dtype=np.uint32)
    write_shard(tmp_path / "b.bin", big)
    assert list(np.fromfile(tmp_path / "b.bin", dtype="<i4", count=3)) == [20240520, 2, 3]
    assert read_shard(tmp_path / "b.bin").dtype == np.uint32 and list(read_shard(tmp_path / "b.bin")) == list(big)


def test_write_shard_picks_dtype_for_other_integers(tmp_path):
    write_shard(tmp_path / "small.bin", np.array([1, 2, 65535]))  # int64 that fits uint16
    write_shard(tmp_path / "large.bin", [1, 70000])
    assert read_shard(tmp_path / "small.bin").dtype == np.uint16
    assert list(read_shard(tmp_path / "large.bin")) == [1, 70000]
    assert read_shard(tmp_path / "large.bin").dtype == np.uint32
    with pytest.raises(ValueError, match="must lie in"):
        write_shard(tmp_path / "negative.bin", np.array([-1, 2]))
    with pytest.raises(ValueError, match="integers"):
        write_shard(tmp_path / "float.bin", np.array([1.5]))


def test_write_shard_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError("disk full")
    monkeypatch.setattr(prepare_data.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path / "x_train_000001.bin", np.arange(10, dtype=np.uint16))
    assert os.listdir(tmp_path) == []  # neither the shard nor its temporary file


def test_ctrl_c_just_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The moment a CI run once caught: the signal arrives as os.open returns, before the first byte."""
    real_close = os.close

    def interrupted(fd):
        real_close(fd)
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data.os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "x_train_000001.bin", np.arange(10, dtype=np.uint16))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_open_gives(tmp_path, umask):
    old_umask = os.umask(umask)
    try:
        with open(tmp_path / "plain", "wb"):  # the oracle: what an ordinary open() makes
            pass
        write_shard(tmp_path / "a_train_000001.bin", np.arange(3, dtype=np.uint16))
        prepare_data.write_meta(str(tmp_path), {"complete": False})
    finally:
        os.umask(old_umask)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in os.listdir(tmp_path)}
    assert modes == dict.fromkeys(["plain", "a_train_000001.bin", "meta.json"], 0o666 & ~umask)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-2], "truncated or corrupt"),
    (lambda raw: raw + b"\0\0", "truncated or corrupt"),
    (lambda raw: raw[:100], "shorter than the 1024-byte header"),
    (lambda raw: np.int32(123).tobytes() + raw[4:], "not a token shard"),
    (lambda raw: raw[:4] + np.int32(7).tobytes() + raw[8:], "unknown shard version 7"),
    (lambda raw: raw[:8] + np.int32(-5).tobytes() + raw[12:], "truncated or corrupt"),
])
def test_read_shard_rejects_damaged_files(tmp_path, damage, message):
    path = tmp_path / "d_val_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        read_shard(path)
    assert str(path) in str(error.value) and "prepare_data.py" in str(error.value)
    assert "\n" not in str(error.value)


def test_read_shard_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read the shard"):
        read_shard(tmp_path / "nothing.bin")


def test_list_shards_orders_by_index_and_checks_meta(tmp_path):
    for index, split in [(10, "train"), (0, "val"), (2, "train"), (1, "train")]:
        write_shard(tmp_path / f"n_{split}_{index:06d}.bin", np.arange(3, dtype=np.uint16))
    (tmp_path / "n_train_000003.bin.123.tmp").write_bytes(b"half written")
    assert [os.path.basename(p) for p in list_shards(tmp_path, "train")] == \
        ["n_train_000001.bin", "n_train_000002.bin", "n_train_000010.bin"]
    assert [os.path.basename(p) for p in list_shards(tmp_path, "val")] == ["n_val_000000.bin"]
    with pytest.raises(ValueError, match="'train' or 'val'"):
        list_shards(tmp_path, "test")
    with pytest.raises(ValueError, match="no train shards"):
        list_shards(tmp_path / "empty", "train")

    prepare_data.write_meta(tmp_path, {"complete": False})
    with pytest.raises(ValueError, match="did not finish"):
        list_shards(tmp_path, "train")
    prepare_data.write_meta(tmp_path, {"complete": True, "shards": {"val": ["n_val_000000.bin"],
                                                                    "train": ["n_train_000001.bin", "gone.bin"]}})
    with pytest.raises(ValueError, match="gone.bin: listed in meta.json but missing"):
        list_shards(tmp_path, "train")


def file_pattern(text):
    """The regular expression of a file pattern a message or the docs write: <name> is any name,
    NNNNNN six digits, anything else itself."""
    return re.compile(re.escape(text).replace("<name>", r"[^/]+").replace("NNNNNN", r"\d{6}"))


@pytest.mark.parametrize("val_tokens", [None, 250])  # val in one shard, or in three
def test_messages_and_the_docstring_name_the_shards_a_run_writes(tmp_path, sp_model, val_tokens):
    """What the missing-shards error and the module's table of files say the shards are named:
    the names of a real run's shards of that split, and no other."""
    out = tmp_path / "out"
    run("--input", write_jsonl(tmp_path / "d.jsonl", random_documents(30, seed=3)), f"--out_dir={out}",
        f"--tokenizer={sp_model}", "--shard_tokens=100", *([f"--val_tokens={val_tokens}"] if val_tokens else []))
    written = {split: [os.path.basename(p) for p in list_shards(out, split)] for split in ("val", "train")}
    assert len(written["val"]) == (3 if val_tokens else 1) and written["train"]
    table = dict(re.findall(r"^ +(\S+_(val|train)_\d{6}\.bin) ", prepare_data.__doc__, flags=re.M))
    assert {split: name for name, split in table.items()} == {"val": "<name>_val_000000.bin",
                                                              "train": "<name>_train_000001.bin"}
    if not val_tokens:  # the table's names are the first shards of a run with a small val split
        assert [name.replace("<name>", "d") for name in table] == [written["val"][0], written["train"][0]]
    for split in ("val", "train"):
        with pytest.raises(ValueError) as e:
            list_shards(tmp_path / "empty", split)
        pattern = file_pattern(re.search(r"files named (\S+)\)", str(e.value))[1])
        assert sorted(name for name in os.listdir(out) if pattern.fullmatch(name)) == written[split]


@pytest.mark.parametrize("load, cores, note", [
    (6.5, 2, "note: the CPU is busy: load average 6.5 over 2 cores available; expect slower than the docs' figures"),
    (3.1, 2, "note: the CPU is busy: load average 3.1 over 2 cores available; expect slower than the docs' figures"),
    (2.0, 1, "note: the CPU is busy: load average 2.0 over 1 core available; expect slower than the docs' figures"),
    (2.9, 2, None), (0.3, 16, None), (20.0, 16, None)])
def test_a_busy_machine_gets_one_line(load, cores, note):
    """Oversubscribed: a 1-minute load average more than 1.5 times the cores available."""
    assert common.busy_machine_note(load, cores) == note


def test_the_busy_machine_note_reads_the_load_and_the_cores(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    monkeypatch.setattr(common, "available_cpus", lambda: 4)
    assert "load average 9.0 over 4 cores" in common.busy_machine_note()

    def no_load_average():
        raise OSError("unavailable")
    monkeypatch.setattr(os, "getloadavg", no_load_average)
    assert common.busy_machine_note() is None


@pytest.mark.parametrize("size, text", [(512, "0.5 KB"), (27_000, "26.4 KB"), (8_000_000, "7.6 MB"),
                                        (3 * 2 ** 30, "3.0 GB")])
def test_sizes_read_as_kb_mb_gb(size, text):
    assert common.size_text(size) == text


def test_the_tokenizer_sample_size_is_said_in_kb_for_a_small_corpus(tmp_path, capsys):
    """A 27 KB corpus is a 26.4 KB sample (of units of 1024 bytes), not a 0.0 MB one."""
    text = "".join(random.Random(0).choice("abcdefgh \n") for _ in range(27_000))
    run("--input", write_text(tmp_path / "small.txt", text), f"--out_dir={tmp_path / 'out'}")
    assert "(vocab 512) on a 26.4 KB sample" in capsys.readouterr().err


@pytest.mark.parametrize("inputs, name", [(["dir"], "input"), (["dir/a.txt"], "a"), (["one"], "b"),
                                         (["dir/*.txt"], "input"), (["dir/a.txt", "one/b.txt.gz"], "input")])
def test_the_shard_prefix_is_the_file_name_or_input(tmp_path, monkeypatch, inputs, name):
    """As docs/data.md's --name says: one input file gives its name, several give `input`."""
    monkeypatch.chdir(tmp_path)
    write_docs_as_files(tmp_path / "dir", ["some text " * 50, "more words " * 50])
    for i, path in enumerate(sorted((tmp_path / "dir").iterdir())):
        path.rename(tmp_path / "dir" / f"{'ab'[i]}.txt")
    (tmp_path / "one").mkdir()
    with gzip.open(tmp_path / "one" / "b.txt.gz", "wt") as f:
        f.write("other text " * 50)
    run("--input", *inputs, "--out_dir=out", "--vocab_size=300")
    assert sorted(os.path.basename(p) for p in list_shards("out", "val")) == [f"{name}_val_000000.bin"]


def test_dtype_for_vocab():
    assert prepare_data.dtype_for_vocab(32768) == np.uint16
    assert prepare_data.dtype_for_vocab(65536) == np.uint16
    assert prepare_data.dtype_for_vocab(65537) == np.uint32
    assert prepare_data.dtype_for_vocab(1000, "uint32") == np.uint32
    with pytest.raises(ValueError, match="does not fit uint16"):
        prepare_data.dtype_for_vocab(128256, "uint16")


# -----------------------------------------------------------------------------
# the whole preparation

def test_lossless_round_trip_with_trained_tokenizer(tmp_path):
    documents = random_documents(40, seed=2)
    files = write_docs_as_files(tmp_path / "docs", documents)
    out = tmp_path / "out"
    meta = run("--input", str(tmp_path / "docs"), f"--out_dir={out}", "--val_tokens=300", "--shard_tokens=500")
    assert decoded_documents(out) == documents
    assert meta["complete"] and meta["documents"] == len(documents) == len(files)
    assert meta["tokenizer"] == dict(kind="sentencepiece", path="tokenizer.model", trained=True, origin=None)
    assert (meta["eos_id"], meta["bos_id"], meta["dtype"], meta["shard_version"]) == (2, 1, "uint16", 1)
    assert meta["vocab_size"] <= 512 and meta["tokens"]["val"] == 300
    assert meta["tokens"]["train"] == len(stream(out)) - 300 and meta["source"].startswith("--input")
    assert read_meta(out) == meta

    # rebuilt with another vocabulary: a new tokenizer under the same file name, in the same process
    again = run("--input", str(tmp_path / "docs"), f"--out_dir={out}", "--vocab_size=400")
    assert again["vocab_size"] < meta["vocab_size"] and decoded_documents(out) == documents


def test_val_first_and_shard_sizes(tmp_path, sp_model):
    documents = random_documents(30, seed=3)
    out = tmp_path / "out"
    run("--input", write_jsonl(tmp_path / "d.jsonl", documents), f"--out_dir={out}", f"--tokenizer={sp_model}",
        "--val_tokens=250", "--shard_tokens=100")
    names = sorted(os.listdir(out))
    val, train = list_shards(out, "val"), list_shards(out, "train")
    assert [os.path.basename(p) for p in val] == ["d_val_000000.bin", "d_val_000001.bin", "d_val_000002.bin"]
    assert os.path.basename(train[0]) == "d_train_000003.bin" and len(names) == len(val) + len(train) + 2
    sizes = [len(read_shard(p)) for p in val + train]
    assert sizes[:3] == [100, 100, 50]  # val ends exactly at --val_tokens, inside a document
    assert all(size == 100 for size in sizes[3:-1]) and 0 < sizes[-1] <= 100
    for path in val + train:  # every header holds magic, version and its own token count
        assert list(np.fromfile(path, dtype="<i4", count=3)) == [20240520, 1, len(read_shard(path))]
    # the stream, val first, is exactly the documents encoded in order, each followed by end-of-text
    tokenizer = load_tokenizer(sp_model)
    expected = []
    for doc in documents:
        expected += list(np.concatenate([np.array(ids, dtype=int) for ids in tokenizer.encode([doc])])) + [2]
    assert list(stream(out)) == expected
    assert decoded_documents(out) == documents


def test_parallel_equals_serial_and_cutting_keeps_tokens(tmp_path, sp_model, monkeypatch):
    documents = random_documents(20, seed=4)
    documents[5] = "".join(random_documents(300, seed=5, max_fragments=20))  # long: cut into many pieces
    documents[6] = "word " * 3000  # one long line: cut before words
    path = write_jsonl(tmp_path / "d.jsonl", documents)
    monkeypatch.setattr(prepare_data, "TASK_CHARS", 2000)  # many tasks, documents cut across tasks
    serial = run("--input", path, f"--out_dir={tmp_path / 'serial'}", f"--tokenizer={sp_model}", "--workers=1")
    parallel = run("--input", path, f"--out_dir={tmp_path / 'parallel'}", f"--tokenizer={sp_model}", "--workers=2")
    assert serial["shards"] == parallel["shards"]
    for split in ("val", "train"):
        for filename in serial["shards"][split]:
            assert (tmp_path / "serial" / filename).read_bytes() == (tmp_path / "parallel" / filename).read_bytes()
    # cut pieces give the very tokens of the whole document (not only the same text)
    tokenizer = load_tokenizer(sp_model)
    whole = [list(tokenizer.encode([doc])[0]) + [2] for doc in documents]
    assert list(stream(tmp_path / "serial")) == [t for ids in whole for t in ids]
    assert decoded_documents(tmp_path / "parallel") == documents


def test_worker_errors_reach_the_caller(tmp_path):
    settings = (str(tmp_path / "missing.model"), None, "uint16", 0)
    with prepare_data.start_workers(2) as pool, pytest.raises(ValueError, match="missing.model: no such file"):
        list(prepare_data.encode_in_order([[("some text", True)]] * 3, pool, 2, settings))


def test_workers_that_cannot_start_are_an_error_not_a_hang(tmp_path):
    # spawned workers import the main script again; one without a __main__ guard kills them as they start
    script = write_text(tmp_path / "unguarded.py", f"""import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(prepare_data.__file__))!r})
import prepare_data
prepare_data.main(["--input", {write_text(tmp_path / "a.txt", "some text " * 100)!r}, "--workers=2",
                   "--vocab_size=300", "--val_tokens=5", "--out_dir=" + {str(tmp_path / "out")!r}])
""")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    # multiprocessing's resource tracker (its own process) may warn about leaked semaphores after
    # our message: those lines are not the script's
    lines = [line for line in done.stderr.splitlines()
             if "resource_tracker" not in line and "warnings.warn(" not in line]
    assert done.returncode == 1 and "a tokenizer worker process died" in lines[-1]


def test_split_text_cuts_at_line_and_word_starts():
    text = "".join(random_documents(50, seed=6))
    pieces = prepare_data.split_text(text, 200)
    assert "".join(pieces) == text and len(pieces) > 10
    for piece, following in zip(pieces, pieces[1:]):
        assert 100 <= len(piece) <= 200 and (piece.endswith("\n") or following.startswith(" "))
        assert following.lstrip(" \t")[:1].strip()  # the next piece starts a line (or word) with visible text
    strict = prepare_data.split_text(text, 200, prepare_data.CUT_RULES[1])
    assert "".join(strict) == text and all(p.endswith("\n") and p[-2:-1].strip() or f.startswith(" ")
                                           for p, f in zip(strict, strict[1:]))
    assert prepare_data.split_text("x" * 1000, 100) == ["x" * 1000]  # no place to cut: whole
    assert prepare_data.split_text("short " * 100, None) == ["short " * 100]
    assert prepare_data.split_text("short " * 100, 100, None) == ["short " * 100]


# -----------------------------------------------------------------------------
# streaming: one big text file is read a block at a time, with the very cuts, sample and shards of a whole read

STREAM_FRAGMENTS = FRAGMENTS + ["word", "\n", " \t ", "\t\t", "  ", "x" * 30, "\r\n  ", "a", "aaa", "<|sep", "|>"]


def random_text(rng, fragments):
    return "".join(rng.choice(fragments) for _ in range(rng.randint(0, 80)))


def random_pieces(documents, rng, longest):
    """(text, ends_document) pieces of the documents, cut at random lengths of 1 to longest characters."""
    for doc in documents:
        start = 0
        while start < len(doc):
            length = rng.randint(1, longest)
            yield doc[start:start + length], start + length >= len(doc)
            start += length


@pytest.mark.parametrize("cut_rule", [*prepare_data.CUT_RULES, None])
def test_cut_pieces_makes_split_texts_cuts(cut_rule):
    rng = random.Random(8)
    for _ in range(400):
        documents = [random_text(rng, STREAM_FRAGMENTS) or "x" for _ in range(rng.randint(1, 4))]
        max_chars = rng.randint(4, 40)
        expected = [(part, i == len(parts) - 1) for doc in documents
                    for parts in [prepare_data.split_text(doc, max_chars, cut_rule)] for i, part in enumerate(parts)]
        pieces = random_pieces(documents, rng, rng.choice([1, 3, 8, 50, 1000]))
        assert list(prepare_data.cut_pieces(pieces, max_chars, cut_rule)) == expected


@pytest.mark.parametrize("doc_sep", [None, "\n\n", "<|sep|>", "aa"])
def test_read_pieces_reads_text_in_blocks(tmp_path, monkeypatch, doc_sep):
    rng = random.Random(9)
    for trial in range(60):
        text = random_text(rng, STREAM_FRAGMENTS + ["<|sep|>", "\n\n"])
        if trial % 2:
            with gzip.open(tmp_path / "t.txt.gz", "wt", encoding="utf-8", newline="") as f:
                f.write(text)
            path = str(tmp_path / "t.txt.gz")
        else:
            path = write_text(tmp_path / "t.txt", text)
        monkeypatch.setattr(prepare_data, "BLOCK_CHARS", rng.randint(1, 9))
        pieces = list(prepare_data.read_pieces(path, doc_sep))
        assert all(piece for piece, _ in pieces) and (not pieces or pieces[-1][1])
        # the documents of a whole read (a separator may straddle two blocks; empty documents are skipped)
        documents = [doc for doc in (text.split(doc_sep) if doc_sep else [text]) if doc]
        assert list(prepare_data.read_documents(path, doc_sep)) == documents
        assert len(pieces) >= len(documents) + len(text) // 10 - 1  # in blocks, not whole


def test_sample_is_the_start_of_each_document(tmp_path, monkeypatch):
    rng = random.Random(10)
    texts = ["\n\n".join(random_documents(rng.randint(1, 30), seed=i)) for i in range(4)]
    files = [write_text(tmp_path / f"{i}.txt", text) for i, text in enumerate(texts)]
    monkeypatch.setattr(prepare_data, "BLOCK_CHARS", 7)
    for sample_chars in (1, 50, 3000, 10 ** 6):
        expected = []  # the definition, on whole documents
        for path, text in zip(files, texts):
            quota = sample_chars * os.path.getsize(path) / sum(map(os.path.getsize, files))
            taken = 0
            for doc in [doc for doc in text.split("\n\n") if doc]:
                if taken >= quota:
                    break
                expected.append(doc[:max(1, int(quota - taken))])
                taken += len(expected[-1])
        assert prepare_data.sample_files(files, lambda path: prepare_data.read_pieces(path, "\n\n"),
                                         sample_chars) == expected


@pytest.mark.parametrize("doc_sep", [None, "\n\n\n"])
def test_one_text_file_in_small_blocks_gives_the_same_data(tmp_path, monkeypatch, doc_sep):
    text = "".join(random_documents(360, seed=11, max_fragments=20))
    documents = [doc for doc in (text.split(doc_sep) if doc_sep else [text]) if doc]
    path = write_text(tmp_path / "big.txt", text)
    monkeypatch.setattr(prepare_data, "TASK_CHARS", 500)
    metas = {}
    for block_chars in (10 ** 9, 97):  # the whole file at once, and in blocks
        monkeypatch.setattr(prepare_data, "BLOCK_CHARS", block_chars)
        args = ["--input", path, f"--out_dir={tmp_path / str(block_chars)}", "--sample_bytes=20000",
                "--shard_tokens=3000"]
        metas[block_chars] = run(*args, *([f"--doc_sep={doc_sep}"] if doc_sep else []))
        metas[block_chars].pop("tokens_per_second")
    assert metas[97] == metas[10 ** 9]
    for filename in os.listdir(tmp_path / "97"):  # shards and the trained tokenizer too
        if filename != "meta.json":
            assert (tmp_path / "97" / filename).read_bytes() == (tmp_path / str(10 ** 9) / filename).read_bytes()
    tokenizer = load_tokenizer(str(tmp_path / "97" / "tokenizer.model"))
    assert list(stream(tmp_path / "97")) == [t for ids in tokenizer.encode(documents) for t in [*ids, 2]]


def test_reading_a_big_text_file_holds_a_few_blocks(tmp_path, monkeypatch):
    text = "".join(random_documents(3000, seed=12)) * 12  # 4.6M characters, 5.7 MB
    path = write_text(tmp_path / "big.txt", text)
    monkeypatch.setattr(prepare_data, "BLOCK_CHARS", 1 << 12)
    tracemalloc.start()
    try:
        sample = prepare_data.sample_files([path], prepare_data.read_pieces, 1 << 12)
        tasks = prepare_data.make_tasks(prepare_data.read_pieces(path), 1 << 12, prepare_data.CUT_RULES[0])
        chars = sum(len(part) for task in tasks for part, _ in task)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sample == [text[:1 << 12]] and chars == len(text)
    assert peak < len(text.encode()) / 10


def test_shards_are_written_as_the_tokens_come(tmp_path):
    def results():  # 8 MB of tokens in 40 results, one document each
        for i in range(40):
            yield np.full(100_000, i, dtype=np.uint16), 1

    tracemalloc.start()
    try:
        written = prepare_data.write_shards(results(), str(tmp_path), "m", np.dtype(np.uint16), 1000, 10 ** 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written["shards"] == {"val": [("m_val_000000.bin", 1000)], "train": [("m_train_000001.bin", 3_999_000)]}
    assert written["documents"] == 40 and list(stream(tmp_path)) == list(np.repeat(np.arange(40), 100_000))
    assert peak < 8_000_000 / 10


def test_doc_sep_and_gzip_and_globs(tmp_path, sp_model):
    write_text(tmp_path / "a.txt", "first doc\nline two\n\nsecond doc\n\n\n\nthird")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "from gzip"}) + "\n\n" + json.dumps({"body": ""}) + "\n")
    write_text(tmp_path / "skip.bin", "not picked by a glob on *.txt")
    out = tmp_path / "out"
    run("--input", str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl.gz"), "--doc_sep=\\n\\n", "--text_field=body",
        f"--out_dir={out}", f"--tokenizer={sp_model}", "--val_tokens=3")
    assert decoded_documents(out) == ["first doc\nline two", "second doc", "third", "from gzip"]


def test_parquet_input(tmp_path, sp_model):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    documents = random_documents(10, seed=7)
    pq.write_table(pa.table({"content": documents + [None, ""], "n": list(range(12))}), tmp_path / "d.parquet")
    run("--input", str(tmp_path), "--text_field=content", f"--out_dir={tmp_path / 'out'}",
        f"--tokenizer={sp_model}", "--val_tokens=10")
    assert decoded_documents(tmp_path / "out") == documents
    with pytest.raises(SystemExit, match="no column 'text'"):
        run("--input", str(tmp_path / "d.parquet"), f"--out_dir={tmp_path / 'o2'}", f"--tokenizer={sp_model}")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, sp_model, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit, match=r"d.parquet: reading .parquet files needs the optional pyarrow package"):
        run("--input", str(tmp_path / "d.parquet"), f"--out_dir={tmp_path / 'out'}", f"--tokenizer={sp_model}")


def test_default_corpus_is_the_standard_library(tmp_path):
    root, files = prepare_data.stdlib_files()
    relative = [os.path.relpath(path, root).split(os.sep) for path in files]
    assert len(files) > 300 and all(path.endswith(".py") for path in files)
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(parts) for parts in relative)
    assert ["argparse.py"] in relative and 5e6 < sum(os.path.getsize(p) for p in files) < 5e7
    out = tmp_path / "default"
    meta = prepare_data.prepare(out_dir=str(out), vocab_size=1000, sample_bytes=300_000,
                                max_tokens=20_000, workers=1)
    assert meta["source"].startswith("Python ") and "standard library" in meta["source"]
    assert list_shards(out, "val")[0].endswith("stdlib_val_000000.bin")
    decoded = decoded_documents(out)
    originals = [text for path in files for text in prepare_data.read_documents(path)][:len(decoded)]
    assert decoded == originals and meta["tokens"]["val"] + meta["tokens"]["train"] >= 20_000
    assert prepare_data.DEFAULT_DATA_DIR == "data/default"



def test_ensure_prepared_makes_only_the_default_corpus(tmp_path, monkeypatch):
    """train.py's first run: the default data directory is prepared when it has no shards (by the
    process told to), any other one without shards is refused with how to make it, and one with
    shards is left alone."""
    calls = []
    monkeypatch.setattr(prepare_data, "prepare", lambda out_dir: calls.append(out_dir))
    monkeypatch.setattr(prepare_data, "DEFAULT_DATA_DIR", str(tmp_path / "default"))
    with pytest.raises(ValueError, match=r"no train shards .*prepare_data.py --input=YOUR_TEXT"):
        prepare_data.ensure_prepared(str(tmp_path / "mine"))
    prepare_data.ensure_prepared(str(tmp_path / "default"), prepare_default=False)
    assert calls == []  # another process prepares it
    prepare_data.ensure_prepared(str(tmp_path / "default"))
    assert calls == [str(tmp_path / "default")]
    (tmp_path / "mine").mkdir()
    write_shard(str(tmp_path / "mine" / "x_train_000000.bin"), np.arange(10, dtype=np.uint16))
    prepare_data.ensure_prepared(str(tmp_path / "mine"))
    assert len(calls) == 1

# -----------------------------------------------------------------------------
# --source, through a stand-in for the `datasets` package that reads a local file

def fake_datasets(jsonl_path, calls):
    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        with open(jsonl_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    return types.SimpleNamespace(load_dataset=load_dataset)


def test_source_streams_through_datasets(tmp_path, sp_model, monkeypatch):
    documents = random_documents(30, seed=8)
    calls, reachable = [], []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(write_jsonl(tmp_path / "d.jsonl", documents), calls))
    monkeypatch.setattr(prepare_data, "check_hub_reachable", lambda name: reachable.append(name))
    meta = run("--source=org/corpus:part", f"--out_dir={tmp_path / 'out'}", "--val_tokens=20",
               "--sample_bytes=100000")  # trains a tokenizer on the head of the stream
    assert calls == [("org/corpus", "part", "train", True)] and reachable == ["org/corpus:part"]
    assert decoded_documents(tmp_path / "out") == documents and meta["source"].startswith("--source org/corpus")
    assert list_shards(tmp_path / "out", "val")[0].endswith("corpus-part_val_000000.bin")

    # --max_tokens stops at the first document end past it: whole documents only
    meta = run("--source=org/corpus", f"--out_dir={tmp_path / 'cut'}", f"--tokenizer={sp_model}", "--max_tokens=300")
    kept = decoded_documents(tmp_path / "cut")
    assert 0 < len(kept) < len(documents) and kept == documents[:len(kept)]
    assert meta["tokens"]["val"] + meta["tokens"]["train"] >= 300


def test_source_without_datasets_or_network_fails_at_once(tmp_path, sp_model, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SystemExit, match=r"needs the optional `datasets` package \(pip install datasets\)"):
        run("--source=org/corpus", f"--out_dir={out}")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(tmp_path / "unused", []))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(SystemExit, match="cannot reach 127.0.0.1:9.*needs network access"):
        run("--source=org/corpus", f"--out_dir={out}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE is set"):
        run("--source=org/corpus", f"--out_dir={out}")
    assert not out.exists()  # nothing was touched


# -----------------------------------------------------------------------------
# Hugging Face tokenizer.json

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_tokenizer(path, documents=None, vocab_size=400, filler=0, style="llama3"):
    """A byte-level BPE tokenizer.json with Llama-3 special tokens and pre-tokenizer (the Doge tokenizer's
    kind), or GPT-2's pre-tokenizer; `filler` extra tokens make it big."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if filler:
        vocab = {char: i for i, char in enumerate(alphabet)} | {f"filler{i}": len(alphabet) + i for i in range(filler)}
        tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    else:
        tokenizer = tokenizers.Tokenizer(models.BPE())
    if style == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if filler:
        tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    else:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False,
                                      special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
        tokenizer.train_from_iterator(documents, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (path / "chat_template.jinja").write_text("{{ messages }}")  # transformers 5.x keeps it apart
    return tokenizer


def test_huggingface_tokenizer_json(tmp_path):
    documents = random_documents(25, seed=9)
    hf = byte_level_tokenizer(tmp_path / "model", documents)
    out = tmp_path / "out"
    meta = run("--input", write_jsonl(tmp_path / "d.jsonl", documents), f"--tokenizer={tmp_path / 'model'}",
               f"--out_dir={out}", "--workers=2")
    assert meta["tokenizer"]["kind"] == "huggingface" and meta["tokenizer"]["path"] == "tokenizer.json"
    assert meta["eos_id"] == hf.token_to_id("<|end_of_text|>") and meta["bos_id"] == hf.token_to_id("<|begin_of_text|>")
    assert (out / "tokenizer_config.json").exists()  # the chat template comes along, either file
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    # documents that spell "<|end_of_text|>" stay whole: it is encoded as text, not as the special token
    assert sum("<|end_of_text|>" in doc for doc in documents) > 0
    assert decoded_documents(out) == documents and meta["documents"] == len(documents)

    with pytest.raises(SystemExit, match="no end-of-text token"):
        run("--input", str(tmp_path / "d.jsonl"), f"--tokenizer={tmp_path / 'model'}", "--eot_token=<|none|>",
            f"--out_dir={tmp_path / 'o2'}")

    # prompts (sample.py) want special tokens parsed; data never
    eot = meta["eos_id"]
    for_prompts = load_tokenizer(str(out / "tokenizer.json"), parse_special_tokens=True)
    assert for_prompts.encode(["a<|end_of_text|>"])[0][-1] == eot and for_prompts.token_to_id("<|none|>") is None
    assert eot not in load_tokenizer(str(out / "tokenizer.json")).encode(["a<|end_of_text|>"])[0]
    assert for_prompts.token_to_id("<|end_of_text|>") == eot


def test_sentencepiece_token_to_id(sp_model):
    tokenizer = load_tokenizer(sp_model)
    assert (tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<s>"), tokenizer.token_to_id("<unk>")) == (2, 1, 0)
    assert tokenizer.token_to_id("<|not a piece|>") is None and tokenizer.eot_id == 2 and tokenizer.bos_id == 1
    assert 2 not in tokenizer.encode(["text with </s> in it"])[0]  # control pieces are never read from text


def train_plain_sentencepiece(prefix, lines, **options):
    import sentencepiece
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), vocab_size=400, model_prefix=str(prefix),
                                             minloglevel=2, hard_vocab_limit=False, **options)
    return str(prefix) + ".model"


def test_choose_cut_rule_checks_the_tokenizer(tmp_path, sp_model):
    sample = random_documents(30, seed=13)
    assert prepare_data.choose_cut_rule(load_tokenizer(sp_model), sample) == 0
    for style, rule in (("llama3", 0), ("gpt2", 1)):
        byte_level_tokenizer(tmp_path / style, sample, style=style)
        assert prepare_data.choose_cut_rule(load_tokenizer(str(tmp_path / style)), sample) == rule, style
    # a dummy prefix at the start of every piece changes the tokens at every cut
    lines = "".join(sample).splitlines()
    prefixed = load_tokenizer(train_plain_sentencepiece(tmp_path / "prefixed", lines, byte_fallback=True,
                                                        normalization_rule_name="identity"))
    assert prepare_data.choose_cut_rule(prefixed, sample) is None


def test_tokenizer_that_cannot_be_cut_or_is_lossy_still_works(tmp_path, capsys):
    documents = ["first document\nwith  lines " * 100, "second"]
    path = write_jsonl(tmp_path / "d.jsonl", documents)
    lines = ["one line of text", "another line"] * 50
    prefixed = train_plain_sentencepiece(tmp_path / "prefixed", lines, byte_fallback=True,
                                         normalization_rule_name="identity", remove_extra_whitespaces=False)
    meta = run("--input", path, f"--tokenizer={prefixed}", f"--out_dir={tmp_path / 'out'}", "--val_tokens=5")
    assert "documents are encoded whole" in capsys.readouterr().err
    assert meta["documents"] == 2 and decoded_documents(tmp_path / "out") == documents

    usual = train_plain_sentencepiece(tmp_path / "usual", lines)  # NFKC, squeezes spaces: not lossless
    run("--input", path, f"--tokenizer={usual}", f"--out_dir={tmp_path / 'out2'}", "--val_tokens=5")
    assert "documents will not decode back exactly" in capsys.readouterr().err
    assert len(decoded_documents(tmp_path / "out2")) == 2


def test_big_vocabulary_uses_uint32(tmp_path):
    byte_level_tokenizer(tmp_path / "big", filler=70000)
    documents = random_documents(8, seed=10)
    path = write_jsonl(tmp_path / "d.jsonl", documents)
    out = tmp_path / "out"
    meta = run("--input", path, f"--tokenizer={tmp_path / 'big' / 'tokenizer.json'}", f"--out_dir={out}")
    assert meta["vocab_size"] == 70258 and meta["eos_id"] > 65535
    assert (meta["dtype"], meta["shard_version"]) == ("uint32", 2)
    for shard in list_shards(out, "val") + list_shards(out, "train"):
        assert list(np.fromfile(shard, dtype="<i4", count=2)) == [20240520, 2]
    assert decoded_documents(out) == documents
    with pytest.raises(SystemExit, match="vocabulary of 70,258 tokens does not fit uint16"):
        run("--input", path, f"--tokenizer={tmp_path / 'big'}", "--dtype=uint16", f"--out_dir={tmp_path / 'o2'}")
    assert not (tmp_path / "o2").exists()  # found before anything was written


def test_huggingface_tokenizer_needs_tokenizers_package(tmp_path, monkeypatch):
    write_text(tmp_path / "tokenizer.json", "{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(SystemExit, match=r"needs the optional `tokenizers` package"):
        run("--input", write_text(tmp_path / "a.txt", "hi"), f"--tokenizer={tmp_path / 'tokenizer.json'}",
            f"--out_dir={tmp_path / 'out'}")


# -----------------------------------------------------------------------------
# errors: one clear line each

@pytest.mark.parametrize("make_input, message", [
    (lambda d: [write_text(d / "empty.txt", "")], "no text in the input"),
    (lambda d: [str(d / "missing.txt")], "missing.txt: no such file or directory"),
    (lambda d: [str(d / "*.nothing")], r"\*.nothing: no files match"),
    (lambda d: [str(d / "sub")] if (d / "sub").mkdir() is None else [], "sub: no .txt, .jsonl"),
    (lambda d: [str(d / "bad.txt")] if (d / "bad.txt").write_bytes(b"ok \xff\xfe") else [], "not valid UTF-8"),
    (lambda d: [write_text(d / "bad.jsonl", '{"text": "a"}\n{oops\n')], r"bad.jsonl:2: not valid JSON"),
    (lambda d: [write_text(d / "f.jsonl", '{"body": "a"}\n')], r"f.jsonl:1: no text field 'text' \(found \['body'\]\)"),
])
def test_input_errors(tmp_path, make_input, message):
    with pytest.raises(SystemExit, match=message) as error:
        run("--input", *make_input(tmp_path), f"--out_dir={tmp_path / 'out'}")
    assert str(error.value).startswith("prepare_data.py: error: ") and "\n" not in str(error.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(tmp_path):
    path = write_text(tmp_path / "secret.txt", "text")
    os.chmod(path, 0)
    with pytest.raises(SystemExit, match="secret.txt: not readable"):
        run("--input", path, f"--out_dir={tmp_path / 'out'}")


def test_setting_errors(tmp_path):
    path = write_text(tmp_path / "a.txt", "some text " * 50)
    with pytest.raises(SystemExit, match="nothing is left for training"):
        run("--input", path, f"--out_dir={tmp_path / 'o1'}", "--val_tokens=100000")
    with pytest.raises(SystemExit, match="vocab_size=100 is too small"):
        run("--input", path, f"--out_dir={tmp_path / 'o2'}", "--vocab_size=100")
    with pytest.raises(SystemExit, match="--eos_id=1 must lie in"):
        run("--input", path, f"--out_dir={tmp_path / 'o3'}", "--eos_id=1")
    with pytest.raises(SystemExit, match="--input or --source, not both"):
        run("--input", path, "--source=x", f"--out_dir={tmp_path / 'o4'}")
    with pytest.raises(SystemExit, match="no such file"):
        run("--input", path, f"--tokenizer={tmp_path / 'none.model'}", f"--out_dir={tmp_path / 'o5'}")
    with pytest.raises(SystemExit, match="not a SentencePiece model"):
        run("--input", path, f"--tokenizer={path}", f"--out_dir={tmp_path / 'o6'}")
    with pytest.raises(SystemExit) as error:  # argparse: unknown option, exit status 2
        run("--input", path, "--vocab=5")
    assert error.value.code == 2


def test_small_vocabulary_on_many_distinct_characters(tmp_path):
    rng = random.Random(11)
    documents = ["".join(chr(rng.randrange(0x4E00, 0x9FFF)) if rng.random() < 0.8 else rng.choice(" \n")
                         for _ in range(2000)) for _ in range(5)]
    files = write_docs_as_files(tmp_path / "docs", documents)
    run("--input", *files, f"--out_dir={tmp_path / 'out'}", "--vocab_size=512")
    assert decoded_documents(tmp_path / "out") == documents


# -----------------------------------------------------------------------------
# re-running

def test_rerun_reuses_rebuilds_and_recovers(tmp_path, sp_model, monkeypatch, capsys):
    documents = random_documents(20, seed=12)
    path = write_jsonl(tmp_path / "d.jsonl", documents)
    out = tmp_path / "out"
    args = ["--input", path, f"--out_dir={out}", f"--tokenizer={sp_model}"]
    first = run(*args, "--shard_tokens=50")
    shard_names = sorted(os.listdir(out))
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in shard_names}

    assert run(*args, "--shard_tokens=50") == first  # same inputs and settings: nothing to do
    assert "already prepared" in capsys.readouterr().err
    assert {name: os.stat(out / name).st_mtime_ns for name in sorted(os.listdir(out))} == mtimes

    write_text(out / "tokenizer.json", "junk")  # another run's tokenizer
    write_text(out / "notes.txt", "not ours")
    second = run(*args, "--shard_tokens=500")  # a changed setting rebuilds; nothing stale survives
    assert sorted(os.listdir(out)) == sorted(second["shards"]["val"] + second["shards"]["train"]
                                             + ["meta.json", "notes.txt", "tokenizer.model"])
    assert len(os.listdir(out)) < len(shard_names) and decoded_documents(out) == documents

    # a run that dies half-way (inside a shard) leaves meta.json saying so, and list_shards refuses the directory
    real_encode = prepare_data.encode_in_order

    def interrupted_after_two_tasks(*args):
        results = real_encode(*args)
        yield next(results)
        yield next(results)
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "encode_in_order", interrupted_after_two_tasks)
    monkeypatch.setattr(prepare_data, "TASK_CHARS", 200)
    with pytest.raises(SystemExit, match="130"):  # main turns Ctrl-C into one line and status 130
        run(*args, "--shard_tokens=50", "--force")
    assert read_meta(out)["complete"] is False and not any(name.endswith(".tmp") for name in os.listdir(out))
    with pytest.raises(ValueError, match="did not finish"):
        list_shards(out, "train")
    monkeypatch.setattr(prepare_data, "encode_in_order", real_encode)
    assert run(*args, "--shard_tokens=50")["shards"] == first["shards"]
    assert decoded_documents(out) == documents

    # a tokenizer kept in the very directory being rebuilt is read before the directory is cleaned
    meta = run("--input", path, f"--out_dir={out}", f"--tokenizer={out / 'tokenizer.model'}", "--val_tokens=7")
    assert meta["tokens"]["val"] == 7 and decoded_documents(out) == documents


def test_temporary_files_of_a_killed_run_are_removed_at_start(tmp_path, sp_model, capsys):
    args = ["--input", write_jsonl(tmp_path / "d.jsonl", random_documents(5, seed=13)), f"--out_dir={tmp_path / 'out'}",
            f"--tokenizer={sp_model}"]
    first = run(*args)
    ours = ["d_train_000042.bin.x1y2z3w4.tmp", "meta.json.abcdefgh.tmp", "tokenizer.model.a_b_c_d_.tmp"]
    others = ["notes.txt.abcdefgh.tmp", "d_train_000042.bin.tmp", "mine.tmp", "meta.json.abc.tmp"]
    for size, filename in enumerate(ours + others, 1):
        write_text(tmp_path / "out" / filename, "x" * size)
    capsys.readouterr()
    assert run(*args) == first  # up to date: the data stays, the leftovers go, in one line
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"removed 3 temporary files (6 bytes) that an interrupted run left in {tmp_path / 'out'}"
    assert "already prepared" in lines[1]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(first["shards"]["val"] + first["shards"]["train"]
                                                          + ["meta.json", "tokenizer.model"] + others)


def test_worker_processes_leave_ctrl_c_to_the_main_process():
    with prepare_data.start_workers(2) as pool:  # what each worker blocks: SIGINT, from its start
        masks = [prepare_data.submit(pool, signal.pthread_sigmask, signal.SIG_BLOCK, []).result() for _ in range(4)]
    assert all(signal.SIGINT in mask for mask in masks)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # and this process does not


# prepare_data.py with Ctrl-C sent, as a terminal sends it, to its process group (workers
# included) the moment its first shard is full: a point the test controls, not a race with a sleep
CTRL_C_AT_FIRST_SHARD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import prepare_data
# SIGINT raises KeyboardInterrupt, as in a program started from a terminal, whatever this process
# inherited (a shell starts a background job with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
real_shard_header = prepare_data.shard_header

def shard_header(*args):
    prepare_data.shard_header = real_shard_header
    os.killpg(0, signal.SIGINT)
    return real_shard_header(*args)

if __name__ == "__main__":  # the workers import this file too
    prepare_data.shard_header = shard_header
    prepare_data.main(sys.argv[1:])
"""


def test_ctrl_c_while_tokenizing_is_one_line(tmp_path, sp_model):
    path = write_text(tmp_path / "big.txt", "".join(random_documents(2000, seed=14)) * 20)  # about 20 MB
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(CTRL_C_AT_FIRST_SHARD.format(root=os.path.dirname(prepare_data.__file__)))
    command = [sys.executable, str(driver), "--input", path, f"--tokenizer={sp_model}", f"--out_dir={out}",
               "--workers=2", "--shard_tokens=10000"]
    # a session of its own: the signal goes to its process group alone
    done = subprocess.run(command, capture_output=True, text=True, start_new_session=True, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert lines[-1] == f"prepare_data.py: interrupted; run it again to prepare {out}"
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines)
    assert read_meta(out)["complete"] is False and not any(name.endswith(".tmp") for name in os.listdir(out))
    assert "tokenizing" in done.stderr  # interrupted while its workers tokenize


def test_command_line_forms(tmp_path, sp_model):
    path = write_text(tmp_path / "a.txt", "hello world\n" * 20)
    args = prepare_data.parse_args(["--input", path, path, "--out_dir", str(tmp_path), "--val_tokens=1e2",
                                    "--shard_tokens=1_000", "--name='quoted'", "--force", "--doc_sep"])
    assert args.inputs == [path, path] and args.out_dir == str(tmp_path) and args.val_tokens == 100
    assert args.shard_tokens == 1000 and args.name == "quoted" and args.force is True and args.doc_sep == "\n\n"
    assert prepare_data.parse_args(["--force=False"]).force is False
    assert prepare_data.parse_args([]).out_dir == "data/default" and prepare_data.parse_args([]).vocab_size == 32768
    meta = run("--input", path, f"--out_dir={tmp_path / 'out'}", f"--tokenizer={sp_model}", "--val_tokens", "5")
    assert meta["tokens"]["val"] == 5 and list_shards(tmp_path / "out", "train")[0].endswith("a_train_000001.bin")

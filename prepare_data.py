"""
Turn raw text into what train.py reads: a tokenizer plus pre-tokenized binary shards.

    python prepare_data.py         # offline: the running Python's stdlib source -> data/default/
    python prepare_data.py --input notes/ 'books/*.txt' --doc_sep='\\n\\n' --out_dir=data/books
    python prepare_data.py --input corpus.jsonl --tokenizer=Doge-20M/ --out_dir=data/continued
    python prepare_data.py --source=HuggingFaceTB/smollm-corpus:cosmopedia-v2 --max_tokens=4e9
    python prepare_data.py --chat --input=config/sft_doge_tiny.jsonl --tokenizer=out/doge-tiny \\
        --out_dir=data/sft-tiny

What it writes in --out_dir (docs/data.md tells more; --chat writes conversation shards, see Chat):
    tokenizer.model          SentencePiece BPE, byte fallback, from a sample (or --tokenizer's copy)
    <name>_val_000000.bin    the first --val_tokens tokens of the stream: the validation split
    <name>_train_000001.bin  the rest, at most --shard_tokens per file
    meta.json                tokenizer, vocab_size, bos/eos, token counts; "complete" once done

Every document ends with the end-of-text token: the shards read in order and split on it give the
documents back exactly.
"""

import argparse
import contextlib
import functools
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import pathlib
import platform
import random
import re
import signal
import socket
import sys
import sysconfig
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from common import (atomic_open, atomic_write_text, available_cpus, log, one_line,
                    remove_temporary_files, size_text, write_file_atomically)
from configurator import parse_value
from tokenizer import (END_OF_TURN_TOKENS, LOSSLESS_PROBE, TOKENIZER_FILES, chat_tokenizer,
                       copy_tokenizer_files, is_lossless, load_chat_template, load_tokenizer,
                       render_chat, tokenizer_file, train_sentencepiece)

DEFAULT_DATA_DIR = "data/default"
META_FILE = "meta.json"

# ----------------------------------------------------------------------------------------------
# Shard format, llm.c's: a header of 256 int32 [20240520, version, num_tokens, 0, ...], then the
# tokens, uint16 (version 1) or, for vocabularies above 65536, uint32 (version 2)

SHARD_MAGIC = 20240520
HEADER_INTS = 256  # the header is 256 int32 = 1024 bytes
HEADER_BYTES = HEADER_INTS * 4
VERSION_OF_DTYPE = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}
DTYPE_OF_VERSION = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
CHAT_VERSION_OF_DTYPE = {np.dtype(np.uint16): 3, np.dtype(np.uint32): 4}  # conversation shards
CHAT_DTYPE_OF_VERSION = {3: np.dtype("<u2"), 4: np.dtype("<u4")}
SHARD_FILE = re.compile(r"^(?P<name>.+)_(?P<split>train|val)_(?P<index>\d{6})\.bin$")
REBUILD_HINT = "re-run prepare_data.py to rebuild it"


def dtype_for_vocab(vocab_size, dtype=None):
    """dtype, if given (the vocabulary must fit it), else uint16 up to 65536 tokens, else uint32."""
    dtype = np.dtype(("uint16" if vocab_size <= 1 << 16 else "uint32") if dtype is None else dtype)
    if dtype not in VERSION_OF_DTYPE:
        raise ValueError(f"dtype must be uint16 or uint32, not {dtype}")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"a vocabulary of {vocab_size:,} tokens does not fit {dtype} (at most "
                         f"{np.iinfo(dtype).max + 1:,}); use --dtype=uint32 or leave --dtype unset")
    return dtype


def shard_dtype(chunks):
    """Keeps uint16/uint32 (the wider); other integers: uint16 if all values fit, else uint32."""
    dtypes = {chunk.dtype for chunk in chunks}
    if dtypes and dtypes <= set(VERSION_OF_DTYPE):
        return max(dtypes, key=lambda d: d.itemsize)
    if any(d.kind not in "iu" for d in dtypes):
        raise ValueError(f"token arrays must hold integers, not {sorted(str(d) for d in dtypes)}")
    nonempty = [chunk for chunk in chunks if chunk.size]
    low = min((int(chunk.min()) for chunk in nonempty), default=0)
    high = max((int(chunk.max()) for chunk in nonempty), default=0)
    if low < 0 or high >= 1 << 32:
        raise ValueError(f"token ids must lie in [0, 2**32), got values from {low} to {high}")
    return np.dtype(np.uint16) if high < 1 << 16 else np.dtype(np.uint32)


def shard_header(version, num_tokens, count=0) -> bytes:
    """[20240520, version, num_tokens, count, 0, ...] as 256 little-endian int32."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = (SHARD_MAGIC, version, num_tokens, count)
    return header.tobytes()


def write_shard(path, tokens: np.ndarray):
    """Write one shard atomically: the header, then the tokens in the dtype shard_dtype chooses."""
    tokens = np.asarray(tokens).ravel()
    dtype = shard_dtype([tokens])
    if tokens.size > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: {tokens.size:,} tokens do not fit the int32 token count of the "
                         f"header")
    with atomic_open(path) as f:
        f.write(shard_header(VERSION_OF_DTYPE[dtype], tokens.size))
        f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())


def read_header(path):
    """A shard's header as ints and the file's size, after checking size and magic number."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the shard ({e.strerror or e}); "
                         f"{REBUILD_HINT}") from None
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header "
                         f"(truncated); {REBUILD_HINT}")
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(f"{path}: not a token shard (magic number {int(header[0])}, expected "
                         f"{SHARD_MAGIC}); {REBUILD_HINT}")
    if min(header[2], header[3]) < 0:
        raise ValueError(f"{path}: a negative count in the header (truncated or corrupt); "
                         f"{REBUILD_HINT}")
    return [int(x) for x in header], size


def check_size(path, size, expected, what):
    if size != expected:
        raise ValueError(f"{path}: the header says {what} ({expected:,} bytes) but the file has "
                         f"{size:,} bytes (truncated or corrupt); {REBUILD_HINT}")


def read_shard(path) -> np.ndarray:
    """A shard's tokens, memory-mapped read-only once its magic, version and size are checked."""
    header, size = read_header(path)
    version, num_tokens = header[1], header[2]
    if version in CHAT_DTYPE_OF_VERSION:
        raise ValueError(f"{path}: holds conversations (prepare_data.py --chat), not a token "
                         f"stream")
    if version not in DTYPE_OF_VERSION:
        raise ValueError(f"{path}: unknown shard version {version} (1 = uint16 tokens, "
                         f"2 = uint32); {REBUILD_HINT}")
    dtype = DTYPE_OF_VERSION[version]
    check_size(path, size, HEADER_BYTES + num_tokens * dtype.itemsize, f"{num_tokens:,} tokens")
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def write_conversation_shard(path, examples):
    """Write conversations, (ids, supervised) arrays of equal lengths, as one shard, atomically: the
    header [20240520, version, num_tokens, num_conversations, 0, ...] (version 3: uint16 tokens, 4:
    uint32), num_conversations + 1 int32 offsets (conversation i: tokens[offsets[i]:offsets[i+1]]),
    the tokens, and a uint8 per token: 1 where it is trained on (an answer and its end of turn)."""
    lengths = [len(ids) for ids, _ in examples]
    if sum(lengths) > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: {sum(lengths):,} tokens do not fit the int32 token count of the "
                         f"header")
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype("<i4")
    tokens = np.concatenate([np.asarray(ids) for ids, _ in examples] or [np.zeros(0, np.uint16)])
    supervised = np.concatenate([np.asarray(s, dtype=np.uint8) for _, s in examples]
                                or [np.zeros(0, np.uint8)])
    dtype = shard_dtype([tokens])
    with atomic_open(path) as f:
        f.write(shard_header(CHAT_VERSION_OF_DTYPE[dtype], len(tokens), len(examples)))
        for part in (offsets, tokens.astype(dtype.newbyteorder("<"), copy=False), supervised):
            f.write(part.tobytes())


def read_conversation_shard(path):
    """Memory-mapped tokens and supervised (uint8), and offsets (int64), checked like read_shard."""
    header, size = read_header(path)
    version, num_tokens, count = header[1], header[2], header[3]
    if version not in CHAT_DTYPE_OF_VERSION:
        raise ValueError(f"{path}: not a conversation shard (version {version}; versions 3 and 4 "
                         f"hold conversations); {REBUILD_HINT}")
    dtype = CHAT_DTYPE_OF_VERSION[version]
    tokens_at = HEADER_BYTES + 4 * (count + 1)
    mask_at = tokens_at + num_tokens * dtype.itemsize
    check_size(path, size, mask_at + num_tokens,
               f"{num_tokens:,} tokens in {count:,} conversations")
    offsets = np.fromfile(path, dtype="<i4", count=count + 1, offset=HEADER_BYTES).astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != num_tokens or (np.diff(offsets) < 0).any():
        raise ValueError(f"{path}: the conversations' offsets are out of order (corrupt); "
                         f"{REBUILD_HINT}")
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.uint8), offsets
    return (np.memmap(path, dtype=dtype, mode="r", offset=tokens_at, shape=(num_tokens,)),
            np.memmap(path, dtype=np.uint8, mode="r", offset=mask_at, shape=(num_tokens,)), offsets)


def read_meta(data_dir):
    """The meta.json of a data directory as a dict, or None when there is none."""
    path = os.path.join(data_dir, META_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); re-run prepare_data.py") from None


def list_shards(data_dir, split) -> list:
    """The paths of data_dir's `split` ('train' or 'val') shards, in index order. meta.json, if
    there, is the authority: an unfinished run or a missing shard is an error, not less data."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    meta = read_meta(data_dir)
    if meta is not None and not meta.get("complete"):
        raise ValueError(f"{data_dir}: an earlier prepare_data.py run did not finish; re-run "
                         f"prepare_data.py")
    if meta is not None and "shards" in meta:
        paths = [os.path.join(data_dir, filename) for filename in meta["shards"][split]]
        if missing := [path for path in paths if not os.path.exists(path)]:
            raise ValueError(f"{missing[0]}: listed in {META_FILE} but missing; re-run "
                             f"prepare_data.py")
    else:  # shards made by hand or by another tool: take what is there
        matches = [SHARD_FILE.match(f) for f in os.listdir(data_dir)] \
            if os.path.isdir(data_dir) else []
        matches = sorted((int(m["index"]), m.string) for m in matches if m and m["split"] == split)
        paths = [os.path.join(data_dir, filename) for _, filename in matches]
    if not paths:
        raise ValueError(f"{data_dir}: no {split} shards (files named <name>_{split}_NNNNNN.bin); "
                         f"run prepare_data.py first")
    return paths


# ----------------------------------------------------------------------------------------------
# Documents: where the text comes from, one document or piece of one at a time.

STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")  # what walk_directory takes
BLOCK_CHARS = 1 << 16  # a plain text file is read this many characters at a time (bench_big_text)


def stdlib_files():
    """The standard library's .py files but its test suites (about 12 MB for 3.11), in a fixed
    shuffled order: the validation split, the stream's start, is then a fair sample of modules."""
    root = sysconfig.get_paths()["stdlib"]
    paths = walk_directory(root, ".py", STDLIB_SKIP_DIRS)
    random.Random(0).shuffle(paths)
    return root, paths


def find_input_files(patterns):
    """Expand --input: files as given, globs, directories walked (walk_directory)."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if re.search(r"[*?[]", pattern) \
            else [pattern]
        if not matches:
            raise ValueError(f"--input {pattern}: no files match")
        for match in matches:
            if os.path.isdir(match):
                if not (found := walk_directory(match)):
                    raise ValueError(f"{match}: no {', '.join(INPUT_SUFFIXES)} files in this "
                                     f"directory")
                files += found
            elif os.path.isfile(match):
                files.append(match)
            else:
                raise ValueError(f"{match}: no such file or directory")
    for path in files:
        if not os.access(path, os.R_OK):
            raise ValueError(f"{path}: not readable (permission denied)")
    return list(dict.fromkeys(files))  # a file named twice is read once


def walk_directory(root, suffixes=INPUT_SUFFIXES, skip_dirs=()):
    """The files under root named *suffixes, sorted, leaving out hidden ones and skip_dirs."""
    found = []
    for directory, subdirs, filenames in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in skip_dirs and not d.startswith("."))
        found += [os.path.join(directory, f) for f in sorted(filenames)
                  if f.endswith(suffixes) and not f.startswith(".")]
    return found


def open_text(path):
    # newline="" keeps \r\n and lone \r as they are: documents must come back byte for byte
    return (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", newline="")


def read_pieces(path, doc_sep=None, text_field="text"):
    """The documents of one file as (text, ends_document) pieces, none empty: .jsonl (one per line,
    field text_field) and .parquet (column text_field) give each document whole; anything else is
    plain text, one document per file or split on doc_sep (read_text_pieces)."""
    name = path[:-3] if path.endswith(".gz") else path
    try:
        if name.endswith(".jsonl"):
            yield from ((doc, True) for doc in read_jsonl(path, text_field))
        elif name.endswith(".parquet"):
            yield from ((doc, True) for doc in read_parquet(path, text_field))
        else:
            with open_text(path) as f:
                yield from read_text_pieces(f, doc_sep)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (at the bytes "
                         f"{e.object[e.start:e.start + 4]!r}); convert it to UTF-8 first") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def read_text_pieces(f, doc_sep):
    """(text, ends_document) pieces of the documents `f.read().split(doc_sep)` (or the whole text),
    less the empty ones, read BLOCK_CHARS at a time (a document may outgrow memory); a block's last
    characters that may begin a separator wait for the next."""
    held, carry = "", ""  # held: the current document's latest text, not yet known to be its last
    while True:
        block = f.read(BLOCK_CHARS)
        parts = (carry + block).split(doc_sep) if doc_sep else [carry + block]
        carry = ""
        if block and doc_sep:
            keep = max(0, len(parts[-1]) - len(doc_sep) + 1)
            parts[-1], carry = parts[-1][:keep], parts[-1][keep:]
        for i, part in enumerate(parts):
            if part:
                if held:
                    yield held, False
                held = part
            if held and (i < len(parts) - 1 or not block):  # a separator follows, or the file ends
                yield held, True
                held = ""
        if not block:
            return


def read_documents(path, doc_sep=None, text_field="text"):
    """A file's documents as str: read_pieces joined, for files whose documents fit in memory."""
    pieces = []
    for text, ends_document in read_pieces(path, doc_sep, text_field):
        pieces.append(text)
        if ends_document:
            yield "".join(pieces)
            pieces = []


def jsonl_rows(path):
    """(where, row) for each non-blank line of a .jsonl file; where is "path:line"."""
    with open_text(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None


def found_keys(row):
    """What a JSON row holds, for an error message."""
    return list(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"


def read_jsonl(path, text_field):
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict) or text_field not in row \
                or not isinstance(row[text_field], (str, type(None))):
            raise ValueError(f"{where}: no text field {text_field!r} (found {found_keys(row)}); "
                             f"name the field with --text_field")
        if row[text_field]:
            yield row[text_field]


def open_parquet(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"{path}: reading .parquet files needs the optional pyarrow package "
                         f"(pip install pyarrow)") from None
    try:
        return pyarrow.parquet.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable parquet file ({one_line(e)})") from None


def read_parquet(path, text_field):
    parquet_file = open_parquet(path)
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"{path}: no column {text_field!r} (found {columns}); name it with "
                         f"--text_field")
    for batch in parquet_file.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text)


def open_source(name, text_field="text", split="train"):
    """Stream a Hugging Face data set NAME or NAME:CONFIG (the optional `datasets` package). What
    can fail without data fails here, at once: the package, the network, the name."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--source {name}: streaming a data set needs the optional `datasets` "
                         f"package (pip install datasets); for local files use --input") from None
    path, _, config = name.partition(":")
    if not os.path.exists(path):  # a local data set directory needs no network
        check_hub_reachable(name)
    try:
        rows = iter(datasets.load_dataset(path, config or None, split=split, streaming=True))
    except Exception as e:  # datasets raises many kinds: bad name, bad config, network, auth
        raise ValueError(f"--source {name}: cannot open it ({one_line(e)})") from None
    return source_documents(name, rows, text_field)


def source_documents(name, rows, text_field):
    for row in rows:
        if text_field not in row:
            raise ValueError(f"--source {name}: rows have no field {text_field!r} (found "
                             f"{list(row)}); name it with --text_field")
        if row[text_field]:
            yield row[text_field]


def hub_offline_setting():
    """The HF_*_OFFLINE variable that is set (datasets then reads only its cache), or None."""
    return next((variable for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                 if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on")), None)


def hub_unreachable(timeout=5.0):
    """Why the hub's host is unreachable, or None: asked first, as `datasets` retries minutes."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({e.strerror or e})"
    return None


def check_hub_reachable(name):
    """Fail fast when --source cannot stream: offline, or no network."""
    if variable := hub_offline_setting():
        raise ValueError(f"--source {name}: {variable} is set, so the hub cannot be reached; "
                         f"use --input with local files")
    if reason := hub_unreachable():
        raise ValueError(f"--source {name}: {reason}; --source needs network access, use --input "
                         f"for local files")


# ----------------------------------------------------------------------------------------------
# Cutting long documents where tokenizers never merge across

# Where a long text may be cut, most permissive first: at line starts (before a line with visible
# text) or before a single space between words. Our SentencePiece models and Llama-3-style
# byte-level BPE never merge across either; GPT-2-style pre-tokenizers join runs of newlines and
# indentation, so the second rule keeps to a newline between two visible characters (checked on
# the data: choose_cut_rule).
CUT_RULES = (re.compile(r"(?<=\n)(?=[ \t]*\S)|(?<=\S)(?= \S)"),
             re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)"))


def split_text(text, max_chars, cut_rule=CUT_RULES[0]):
    """Cut text into pieces of max_chars / 2 to max_chars characters at places cut_rule allows (a
    piece is longer only where the text offers none). No cuts when max_chars or cut_rule is None."""
    if max_chars is None or cut_rule is None or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        low = start + max_chars // 2
        match = cut_rule.search(text, low, start + max_chars) or cut_rule.search(text, low)
        if match is None:
            break
        pieces.append(text[start:match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


def cut_pieces(pieces, max_chars, cut_rule):
    """split_text over documents that come as (text, ends_document) pieces, holding about max_chars
    and a piece, not a document: yields (part, ends_document), a document's parts being split_text's
    (for max_chars >= 4: a cut's lookbehind reaches two characters back, and the search starts
    max_chars // 2 into the part). A cut is settled once the text reaches max_chars past the part's
    start, as split_text's first search looks no further. When that search finds nothing, the
    fallback's first match in the text so far is its first match in the whole document: a place
    whose lookahead runs off the end lies in the blanks ([ \\t]) that end the text, after any
    match. With no match, the search resumes there when more text has come."""
    buf, start, searched = "", 0, 0  # buf[start:]: the part so far; no cut in buf[start:searched]
    # waiting: text for buf, joined once it is as long as the part: linear time without cuts
    waiting, waiting_chars = [], 0
    for text, ends_document in pieces:
        waiting.append(text)
        waiting_chars += len(text)
        if waiting_chars < len(buf) - start and not ends_document:
            continue
        buf, searched, start = "".join([buf[start:], *waiting]), searched - start, 0
        waiting, waiting_chars = [], 0
        while cut_rule and len(buf) - start > max_chars:
            low = start + max_chars // 2
            match = cut_rule.search(buf, low, start + max_chars) \
                or cut_rule.search(buf, max(low, searched))
            if match is None:
                searched = len(buf.rstrip(" \t"))
                break
            yield buf[start:match.start()], False
            start = match.start()
        if ends_document:
            yield buf[start:], True
            buf, start, searched = "", 0, 0


def choose_cut_rule(tokenizer, sample):
    """Index of the first of CUT_RULES that leaves the data's tokens unchanged (whole text against
    cut pieces), or None: documents are then encoded whole (a model that adds a dummy prefix)."""
    text = "".join(sample)[:1 << 16] + LOSSLESS_PROBE
    whole = list(tokenizer.encode([text])[0])
    for index, cut_rule in enumerate(CUT_RULES):
        if list(chain.from_iterable(tokenizer.encode(split_text(text, 64, cut_rule)))) == whole:
            return index
    return None


# ----------------------------------------------------------------------------------------------
# Tokenizing in worker processes

PIECE_CHARS = 2048  # what one encode call sees: a few lines, where SentencePiece runs at full speed
TASK_CHARS = 1 << 18  # one worker task: big enough that passing it between processes costs little
_worker = {}  # this process's tokenizer, loaded by its first task


def encode_task(task, settings):
    """task: [(text, ends_a_document)]; settings: (tokenizer path, eot_token, dtype, cut rule).
    Returns the tokens, an end-of-text after each document's end, and how many documents ended."""
    if _worker.get("settings") != settings:
        tokenizer_path, eot_token, dtype, cut_rule_index = settings
        tokenizer = load_tokenizer(tokenizer_path, eot_token)
        _worker.update(settings=settings, encode=tokenizer.encode, eot_id=tokenizer.eot_id,
                       dtype=np.dtype(dtype),
                       cut_rule=None if cut_rule_index is None else CUT_RULES[cut_rule_index])
    texts, ends = [], []
    for text, ends_document in task:
        pieces = split_text(text, PIECE_CHARS, _worker["cut_rule"])
        texts += pieces
        ends += [False] * (len(pieces) - 1) + [ends_document]
    eot = [_worker["eot_id"]]
    ids = [part for piece_ids, end in zip(_worker["encode"](texts), ends)
           for part in ([piece_ids, eot] if end else [piece_ids])]
    count = sum(map(len, ids))
    try:
        tokens = np.fromiter(chain.from_iterable(ids), dtype=_worker["dtype"], count=count)
    except (OverflowError, ValueError):
        raise ValueError(f"the tokenizer produced an id that does not fit {_worker['dtype']}: "
                         f"its vocabulary and dtype disagree") from None
    return tokens, sum(ends)


def make_tasks(pieces, task_chars, cut_rule):
    """The pieces in tasks of about task_chars, long documents cut: every worker gets work."""
    task, size = [], 0
    for part, ends_document in cut_pieces(pieces, task_chars, cut_rule):
        task.append((part, ends_document))
        size += len(part)
        if size >= task_chars:
            yield task
            task, size = [], 0
    if task:
        yield task


def start_workers(workers):
    """`workers` processes, started now so that their start-up (half a second each) overlaps the
    sampling and tokenizer training; for one, none: all runs here. spawn: fork can hang with the
    threads (torch) a caller may run. concurrent.futures: a worker that cannot start is an error."""
    if workers == 1:
        return contextlib.nullcontext()
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"))
    for _ in range(workers):
        submit(pool, int)  # each submission to an idle pool starts one more process
    return pool


def submit(pool, function, *args):
    """pool.submit with SIGINT blocked, so that a worker it starts inherits it blocked: Ctrl-C, sent
    to the terminal's whole process group, then stops only this process, which stops the workers."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(function, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def encode_in_order(tasks, pool, workers, settings):
    """Each task's encode_task, in order, from the pool (or here), few in flight: bounded memory."""
    if pool is None:
        _worker.clear()  # the tokenizer file may be rebuilt under the same name between calls
        yield from (encode_task(task, settings) for task in tasks)
        return
    in_flight = deque()
    try:
        for task in tasks:
            in_flight.append(submit(pool, encode_task, task, settings))
            if len(in_flight) > 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    except BrokenProcessPool:
        raise ValueError("a tokenizer worker process died (out of memory? or, called from a "
                         "script, that script lacks `if __name__ == '__main__':`); --workers=1 "
                         "runs in-process") from None
    finally:
        for future in in_flight:  # stopping early (--max_tokens, an error): drop what is not needed
            future.cancel()


def shard_end(position, val_tokens, shard_tokens):
    """Stream position where the shard holding the token at `position` ends: val shards end at
    multiples of shard_tokens and at val_tokens; train shards every shard_tokens after that."""
    if position < val_tokens:
        return min(val_tokens, (position // shard_tokens + 1) * shard_tokens)
    return val_tokens + ((position - val_tokens) // shard_tokens + 1) * shard_tokens


def write_shards(results, out_dir, name, dtype, val_tokens, shard_tokens, max_tokens=None,
                 eot_id=None):
    """The token stream cut into shards of `dtype` tokens, the first val_tokens validation, the rest
    train (a shard may end inside a document); with max_tokens, up to the first document end past
    it. A shard is written as its tokens come (memory holds a result), its count when it is full."""
    shards = {"val": [], "train": []}
    total, documents, shard = 0, 0, None  # shard being written: (file, split, filename, its start)
    start = time.perf_counter()
    with tqdm(desc="tokenizing", unit=" docs", file=sys.stderr, dynamic_ncols=True) as bar, \
            contextlib.ExitStack() as open_shard:
        def finish():
            f, split, filename, shard_start = shard
            f.seek(0)
            f.write(shard_header(VERSION_OF_DTYPE[dtype], total - shard_start))
            open_shard.close()  # synced and renamed to its name
            shards[split].append((filename, total - shard_start))

        for tokens, documents_ended in results:
            first = max(0, max_tokens - total - 1) if max_tokens else len(tokens)
            ends = np.flatnonzero(tokens[first:] == eot_id)  # ends of text at or past max_tokens
            reached_max = len(ends) > 0
            if reached_max:  # keep up to the first
                tokens = tokens[:first + ends[0] + 1]
                documents_ended = int(np.count_nonzero(tokens == eot_id))
            documents += documents_ended
            while len(tokens):
                if shard is None:
                    split = "val" if total < val_tokens else "train"
                    filename = f"{name}_{split}_{len(shards['val']) + len(shards['train']):06d}.bin"
                    shard = (open_shard.enter_context(atomic_open(os.path.join(out_dir, filename))),
                             split, filename, total)
                    shard[0].write(bytes(HEADER_BYTES))  # a placeholder until the count is known
                end = shard_end(total, val_tokens, shard_tokens)
                part = tokens[:end - total].astype(dtype.newbyteorder("<"), copy=False)
                shard[0].write(part.tobytes())
                tokens, total = tokens[end - total:], min(end, total + len(tokens))
                if total == end:
                    finish()
                    shard = None
            bar.update(documents_ended)
            rate = total / (time.perf_counter() - start)
            bar.set_postfix_str(f"{total:,} tokens, {rate:,.0f} tok/s", refresh=False)
            if reached_max:
                break
        if shard:
            finish()
    return dict(shards=shards, documents=documents, tokens=total,
                seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# The whole preparation


def sample_files(files, read, sample_chars):
    """About sample_chars of text spread over all input files (shares proportional to their sizes),
    so that the tokenizer sees every kind of input: the start of each document, until the file's
    quota is taken."""
    sizes = [os.path.getsize(path) for path in files]
    sample = []
    for path, size in zip(files, sizes):
        quota = sample_chars * size / max(1, sum(sizes))
        taken, room = 0, None  # room: what the document may still add; None between documents
        with contextlib.closing(read(path)) as pieces:
            for text, ends_document in pieces:
                if room is None:
                    head, room = [], max(1, int(quota - taken))
                if room > 0:
                    head.append(text[:room])
                    room -= len(head[-1])
                    if room == 0 or ends_document:
                        sample.append("".join(head))
                        taken += len(sample[-1])
                        if taken >= quota:
                            break  # the rest of the file is not read
                if ends_document:
                    room = None
    return sample


def take_head(documents, sample_chars):
    """The first sample_chars of a stream that can be read only once, and the whole stream again."""
    head, size = [], 0
    for doc in documents:
        head.append(doc)
        size += len(doc)
        if size >= sample_chars:
            break
    return head, chain(head, documents)


def up_to_date(out_dir, settings):
    """Whether out_dir holds a finished preparation made with exactly these settings and inputs."""
    try:
        meta = read_meta(out_dir)
        if not meta or not meta.get("complete") or meta.get("settings") != settings:
            return False
        for split in ("val", "train"):
            for filename, num_tokens in zip(meta["shards"][split], meta["shard_tokens"][split]):
                if len(read_shard(os.path.join(out_dir, filename))) != num_tokens:
                    return False
        return os.path.exists(os.path.join(out_dir, meta["tokenizer"]["path"]))
    except (ValueError, KeyError, TypeError):
        return False


def write_meta(out_dir, meta):
    atomic_write_text(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=2) + "\n")


def shard_lists(shards):
    """meta.json's "shards" and "shard_tokens" of shards {split: [(filename, tokens)]}."""
    return dict(shards={split: [filename for filename, _ in shards[split]] for split in shards},
                shard_tokens={split: [n for _, n in shards[split]] for split in shards})


def start_rebuild(out_dir, settings):
    """Mark out_dir unfinished (list_shards refuses it); remove what left_by_earlier_run names."""
    os.makedirs(out_dir, exist_ok=True)
    write_meta(out_dir, dict(complete=False, settings=settings))
    for filename in os.listdir(out_dir):
        if left_by_earlier_run(filename):
            os.remove(os.path.join(out_dir, filename))


def left_by_earlier_run(filename):
    """Shards and tokenizer files: what a rebuild replaces."""
    return bool(SHARD_FILE.match(filename)) or filename in TOKENIZER_FILES


def remove_interrupted_writes(out_dir):
    """Remove what our atomic writes left in out_dir when a run was killed, saying so in a line."""
    count, size = remove_temporary_files(
        out_dir, lambda name: left_by_earlier_run(name) or name == META_FILE)
    if count:
        log(f"removed {count} temporary file{'s' * (count > 1)} ({size:,} bytes) that an "
            f"interrupted run left in {out_dir}")


def describe_input(inputs, source, source_split, text_field):
    """Where the text comes from, without reading it: (files or None for a stream, description,
    default shard name, total input bytes or None, a digest that changes with any of the files)."""
    if source:
        description = f"--source {source} (split {source_split}, field {text_field!r})"
        return None, description, source.split("/")[-1].replace(":", "-"), None, None
    if inputs:
        files = find_input_files(inputs)
        description = f"--input {' '.join(inputs)} ({len(files)} files)"
        name = os.path.splitext(os.path.basename(files[0].removesuffix(".gz")))[0] \
            if len(files) == 1 else "input"
    else:
        root, files = stdlib_files()
        description = (f"Python {platform.python_version()} standard library: {len(files)} .py "
                       f"files in {root}")
        name = "stdlib"
    stats = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files]
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    return files, description, name, sum(size for _, size, _ in stats), digest


def install_tokenizer(out_dir, source_file, tokenizer_bytes, sample, vocab_size, eos_id):
    """The path in out_dir of a copy of --tokenizer, or of a SentencePiece BPE trained on sample."""
    tokenizer_path = os.path.join(out_dir, os.path.basename(source_file or "tokenizer.model"))
    if source_file is None:
        log(f"training a SentencePiece BPE tokenizer (vocab {vocab_size:,}) on a "
            f"{size_text(sum(len(doc.encode()) for doc in sample))} sample")
        tokenizer_bytes = train_sentencepiece(sample, vocab_size, eos_id)
    write_file_atomically(tokenizer_path, tokenizer_bytes)
    if source_file and source_file.endswith(".json"):  # a chat template beside it, in either file
        copy_tokenizer_files(os.path.dirname(source_file), out_dir,
                             ("tokenizer_config.json", "chat_template.jinja"))
    return tokenizer_path


def check_settings(inputs, source, vocab_size, sample_bytes, val_tokens, shard_tokens, max_tokens,
                   workers):
    if inputs and source:
        raise ValueError("give --input or --source, not both")
    positive = dict(vocab_size=vocab_size, sample_bytes=sample_bytes, shard_tokens=shard_tokens,
                    max_tokens=max_tokens, workers=workers)
    for key, value in positive.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"--{key} must be a positive integer, not {value!r}")
    if val_tokens is not None and (not isinstance(val_tokens, int) or val_tokens < 0):
        raise ValueError(f"--val_tokens must be an integer >= 0, not {val_tokens!r}")
    if shard_tokens > np.iinfo(np.int32).max:
        raise ValueError(f"--shard_tokens must fit the int32 header: at most "
                         f"{np.iinfo(np.int32).max:,}")


def prepare(out_dir=DEFAULT_DATA_DIR, inputs=None, source=None, source_split="train",
            text_field="text", doc_sep=None, name=None, vocab_size=32768, tokenizer=None,
            eot_token=None, eos_id=2, sample_bytes=8_000_000, val_tokens=None,
            shard_tokens=100_000_000, max_tokens=None, dtype=None, workers=None, force=False):
    """Build out_dir from local files (inputs), a streamed data set (source) or by default the
    Python standard library; returns the meta dict. Problems raise ValueError, each one found
    without reading all the text before out_dir is touched; Ctrl-C leaves out_dir for a rerun."""
    check_settings(inputs, source, vocab_size, sample_bytes, val_tokens, shard_tokens, max_tokens,
                   workers)
    workers = workers or available_cpus()
    files, description, default_name, input_bytes, inputs_digest = describe_input(
        inputs, source, source_split, text_field)
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", name or default_name).strip("-") or "data"
    if val_tokens is None:  # about 5% of the data (at a typical 4 bytes a token), at most 10M
        estimates = [n for n in (input_bytes and input_bytes // 4, max_tokens) if n]
        val_tokens = max(1, min([10_000_000] + [n // 20 for n in estimates]))
    source_tokenizer = tokenizer_file(tokenizer) if tokenizer else None
    tokenizer_vocab = load_tokenizer(source_tokenizer, eot_token).vocab_size if tokenizer else None
    dtype_for_vocab(tokenizer_vocab or vocab_size, dtype)
    # read now: the tokenizer may lie in out_dir, cleaned before the copy
    tokenizer_bytes = pathlib.Path(source_tokenizer).read_bytes() if tokenizer else None

    # Everything that decides the output: when none of it changed, the existing data is reused.
    settings = dict(
        source=description, inputs=inputs_digest, source_split=source_split if source else None,
        text_field=text_field, doc_sep=doc_sep, name=name, val_tokens=val_tokens,
        shard_tokens=shard_tokens, max_tokens=max_tokens, dtype=dtype, eot_token=eot_token,
        tokenizer=hashlib.sha256(tokenizer_bytes).hexdigest() if tokenizer else None,
        vocab_size=None if tokenizer else vocab_size, eos_id=None if tokenizer else eos_id,
        sample_bytes=None if tokenizer else sample_bytes, format=1)
    remove_interrupted_writes(out_dir)
    if not force and up_to_date(out_dir, settings):
        log(f"{out_dir} is already prepared from {description} with these settings; --force "
            f"rebuilds it")
        return read_meta(out_dir)
    built = rebuild(out_dir, settings, files, source, source_tokenizer, tokenizer_bytes, workers)
    return finish_rebuild(out_dir, settings, source_tokenizer, *built)


def rebuild(out_dir, settings, files, source, source_tokenizer, tokenizer_bytes, workers):
    """prepare()'s run, every choice from settings: sample the input, put the tokenizer in out_dir,
    tokenize into shards. Returns write_shards()'s summary, the tokenizer, its path and dtype."""
    description, text_field = settings["source"], settings["text_field"]
    read = functools.partial(read_pieces, doc_sep=settings["doc_sep"], text_field=text_field)
    stream = open_source(source, text_field, settings["source_split"]) if source else None
    with start_workers(workers) as pool:
        # with --tokenizer: enough to check cutting
        sample_chars = 1 << 16 if source_tokenizer else settings["sample_bytes"]
        if source:
            sample, documents = take_head(stream, sample_chars)
            pieces = ((doc, True) for doc in documents)
        else:
            sample = sample_files(files, read, sample_chars)
            pieces = chain.from_iterable(map(read, files))
        if not sample:
            raise ValueError(f"no text in the input: {description} holds no non-empty document")

        start_rebuild(out_dir, settings)
        tokenizer_path = install_tokenizer(out_dir, source_tokenizer, tokenizer_bytes, sample,
                                           settings["vocab_size"], settings["eos_id"])
        loaded = load_tokenizer(tokenizer_path, settings["eot_token"])
        token_dtype = dtype_for_vocab(loaded.vocab_size, settings["dtype"])
        if not is_lossless(loaded):
            log(f"warning: {tokenizer_path} changes text (it normalises it): documents will not "
                f"decode back exactly")
        cut_rule_index = choose_cut_rule(loaded, sample)
        if cut_rule_index is None:
            log("warning: this tokenizer merges across lines and words, so documents are encoded "
                "whole (slower)")

        log(f"tokenizing {description} with {workers} worker{'s' * (workers > 1)} into {out_dir}")
        cut_rule = None if cut_rule_index is None else CUT_RULES[cut_rule_index]
        tasks = make_tasks(pieces, TASK_CHARS, cut_rule)
        worker_settings = (tokenizer_path, settings["eot_token"], token_dtype.name, cut_rule_index)
        results = encode_in_order(tasks, pool, workers, worker_settings)
        with contextlib.closing(results):
            written = write_shards(results, out_dir, settings["name"], token_dtype,
                                   settings["val_tokens"], settings["shard_tokens"],
                                   settings["max_tokens"], loaded.eot_id)
    return written, loaded, tokenizer_path, token_dtype


def finish_rebuild(out_dir, settings, source_tokenizer, written, loaded, tokenizer_path,
                   token_dtype):
    """prepare()'s end: refuse data leaving nothing to train on, write meta.json, log; the meta."""
    val_tokens = settings["val_tokens"]
    if written["tokens"] <= val_tokens:
        raise ValueError(f"only {written['tokens']:,} tokens in all, and the first "
                         f"--val_tokens={val_tokens:,} go to validation: nothing is left for "
                         f"training; lower --val_tokens or add text")
    shards = written["shards"]
    meta = dict(
        complete=True, source=settings["source"], settings=settings,
        tokenizer=dict(kind=loaded.kind, path=os.path.basename(tokenizer_path),
                       trained=source_tokenizer is None,
                       origin=os.path.abspath(source_tokenizer) if source_tokenizer else None),
        vocab_size=loaded.vocab_size, bos_id=loaded.bos_id, eos_id=loaded.eot_id,
        dtype=token_dtype.name, shard_version=VERSION_OF_DTYPE[token_dtype],
        documents=written["documents"],
        tokens={split: sum(n for _, n in shards[split]) for split in shards}, **shard_lists(shards),
        tokens_per_second=round(written["tokens"] / written["seconds"]),
        python=platform.python_version())
    write_meta(out_dir, meta)
    log(f"wrote {meta['tokens']['val']:,} val + {meta['tokens']['train']:,} train tokens "
        f"({written['documents']:,} documents) in {len(shards['val']) + len(shards['train'])} "
        f"shards to {out_dir} ({meta['tokens_per_second']:,} tokens/s)")
    return meta


def ensure_prepared(data_dir, prepare_default=True):
    """Refuse (ValueError, saying how to make it) a data_dir without training shards, unless it is
    the default one: there the default corpus is made (if prepare_default: train.py's first run)."""
    try:
        list_shards(data_dir, "train")
        return
    except ValueError as e:
        if os.path.abspath(data_dir) != os.path.abspath(DEFAULT_DATA_DIR):
            raise ValueError(f"{e} (make it with `python prepare_data.py --input=YOUR_TEXT "
                             f"--out_dir={data_dir}`, conversations with `prepare_data.py --chat`, "
                             f"or use the default corpus: data_dir={DEFAULT_DATA_DIR})") from None
    if prepare_default:
        log(f"no data in {data_dir}: preparing the default corpus there")
        try:
            prepare(data_dir)  # no inputs: the default corpus
        except ValueError as e:
            raise ValueError(f"preparing the default corpus: {e}") from None


# ----------------------------------------------------------------------------------------------
# Chat: conversations -> the chat tokenizer and conversation shards (prepare_data.py --chat)


def check_messages(messages, where):
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                         f"{{\"role\": str, \"content\": str}} objects")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl_conversations(path):
    conversations = []
    try:
        for where, row in jsonl_rows(path):
            if not isinstance(row, dict) or "messages" not in row:
                raise ValueError(f"{where}: no 'messages' (found {found_keys(row)}); each line "
                                 f"must be {{\"messages\": [{{\"role\": \"user\", "
                                 f"\"content\": \"...\"}}, {{\"role\": \"assistant\", ...}}]}}")
            conversations.append(check_messages(row["messages"], where))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({one_line(e)})") from None
    return conversations


def read_conversations(inputs=None, source=None):
    """{split: conversations} from jsonl files (inputs: paths, globs, directories; all 'train'), or
    every split of a Hugging Face data set NAME[:CONFIG] (source; the optional `datasets`)."""
    if inputs:
        return {"train": [c for path in find_input_files(inputs)
                          for c in read_jsonl_conversations(path)]}
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--source {source}: reading a data set needs the optional "
                         f"`datasets` package (pip install datasets); or give jsonl files "
                         f"with --input") from None
    name, _, config = source.partition(":")
    local = os.path.exists(name) or hub_offline_setting()  # offline, datasets only reads its cache
    if not local and (reason := hub_unreachable()):
        raise ValueError(f"--source {source}: the data set needs the network: {reason}; give jsonl "
                         f"files with --input, or set HF_DATASETS_OFFLINE=1 to read the data set "
                         f"from the local cache")
    try:
        splits = datasets.load_dataset(name, config or None)
    except Exception as e:  # datasets raises many kinds: bad name, bad config, network
        raise ValueError(f"--source {source}: cannot load it ({one_line(e)})") from None
    return {split: [check_messages(row.get("messages"), f"{source}[{split}][{i}]")
                    for i, row in enumerate(rows)]
            for split, rows in splits.items()}


def chat_splits(data, val_data, seed):
    """(training conversations, validation conversations, how the latter were chosen): val_data's
    ('test' or 'train'), else the data set's 'test' split, else 1 in 20 held out by the seed (at
    most 1000), else (fewer than 20) the training conversations themselves."""
    if not (train_set := data.get("train")):
        raise ValueError("no training conversations in the input")
    if val_data is not None:
        val_set, held_out = val_data.get("test") or val_data.get("train") or [], "--val_input"
    elif data.get("test"):
        val_set, held_out = data["test"], "the data set's test split"
    elif len(train_set) >= 20:
        order = np.random.default_rng([seed, 20]).permutation(len(train_set))
        chosen = set(order[:min(1000, len(train_set) // 20)].tolist())
        val_set = [c for i, c in enumerate(train_set) if i in chosen]
        train_set = [c for i, c in enumerate(train_set) if i not in chosen]
        held_out = f"1 in 20 of the input's conversations (at most 1000), chosen by --seed={seed}"
    else:
        val_set = train_set
        held_out = "none held out (fewer than 20 conversations): the training ones"
    if not val_set:
        raise ValueError("--val_input holds no conversations")
    return train_set, val_set, held_out


def render_many(chat_template, items):
    """render_chat of many (messages, add_generation_prompt) pairs in one call, the template in a
    loop binding both names for each (compiling it for each costs 1.5 ms, hours for smoltalk)."""
    separator = "\x00<|next rendering|>\x00"
    loop = ("{% for messages, add_generation_prompt in messages %}" + chat_template["template"]
            + separator + "{% endfor %}")
    texts = render_chat({**chat_template, "template": loop}, items).split(separator)
    if len(texts) != len(items) + 1:
        raise ValueError(f"a conversation holds the text {separator!r}")
    return texts[:-1]


def assistant_spans(chat_template, conversations):
    """Each conversation as text, with the spans of the assistant's turns in it: a turn runs from
    where its prompt ends (the conversation before it and the generation prompt) to where the
    conversation through it ends: what is supervised is what the model writes, end of turn too."""
    items = []
    for messages in conversations:
        items.append((messages, False))
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                items += [(messages[:i], True), (messages[:i + 1], False)]
    texts, rendered = iter(render_many(chat_template, items)), []
    for messages in conversations:
        text, spans = next(texts), []
        for message in messages:
            if message["role"] == "assistant":
                prompt, through = next(texts), next(texts)
                if not (text.startswith(through) and through.startswith(prompt)):
                    raise ValueError("the chat template does not render a conversation as its "
                                     "prompts followed by the answers, so the assistant's turns "
                                     "cannot be found in it")
                spans.append((len(prompt), len(through)))
        rendered.append((text, spans))
    return rendered


def tokenize_conversations(conversations, tokenizer, chat_template):
    """Examples (ids int32, supervised bool), and counts. Each piece of text between span boundaries
    is encoded on its own, as sample.py encodes a prompt that ends where the answer begins; the text
    after the last answer is left out. Conversations with nothing supervised are dropped."""
    examples = []
    counts = {"conversations": len(conversations), "dropped": 0, "tokens": 0, "supervised": 0}
    for begin in range(0, len(conversations), 1024):
        pieces, layout = [], []  # layout: per conversation, (its first piece, pieces)
        for text, spans in assistant_spans(chat_template, conversations[begin:begin + 1024]):
            cuts = [0, *(i for span in spans for i in span)]
            layout.append((len(pieces), len(cuts) - 1))
            pieces += [text[a:b] for a, b in zip(cuts, cuts[1:])]
        encoded = tokenizer.encode(pieces)
        for first, count in layout:
            ids = [i for piece in encoded[first:first + count] for i in piece]
            supervised = [k % 2 == 1 for k in range(count) for _ in encoded[first + k]]
            if not any(supervised[1:]):
                counts["dropped"] += 1
                continue
            examples.append((np.array(ids, dtype=np.int32), np.array(supervised)))
            counts["tokens"] += len(ids)
            counts["supervised"] += sum(supervised[1:])
    return examples, counts


def write_conversation_shards(examples, out_dir, name, split, first_index, shard_tokens):
    """Shards of at most shard_tokens tokens (a longer conversation alone): [(filename, tokens)]."""
    groups, size = [[]], 0
    for example in examples:
        if groups[-1] and size + len(example[0]) > shard_tokens:
            groups.append([])
            size = 0
        groups[-1].append(example)
        size += len(example[0])
    shards = []
    for index, group in enumerate(groups, first_index):
        filename = f"{name}_{split}_{index:06d}.bin"
        write_conversation_shard(os.path.join(out_dir, filename), group)
        shards.append((filename, sum(len(ids) for ids, _ in group)))
    return shards


def prepare_chat(out_dir, inputs=None, source=None, tokenizer=None, val_inputs=None, name=None,
                 seed=1337, shard_tokens=100_000_000):
    """Conversations (jsonl files, or a Hugging Face data set) -> out_dir: the chat tokenizer
    (tokenizer.json, tokenizer_config.json with the template) and conversation shards, val first.
    Returns the meta dict. Rebuilt at every call (about 10,000 conversations a second)."""
    if not tokenizer:
        raise ValueError("--chat needs --tokenizer: the directory of the model to fine-tune (its "
                         "tokenizer.json or tokenizer.model)")
    if bool(inputs) == bool(source):
        raise ValueError("--chat needs the conversations: --input jsonl files or --source "
                         "NAME[:CONFIG], one of them")
    if not isinstance(shard_tokens, int) or not 1 <= shard_tokens <= np.iinfo(np.int32).max:
        raise ValueError(f"--shard_tokens must be a positive integer that fits int32, not "
                         f"{shard_tokens!r}")
    chat, tokenizer_config, added = chat_tokenizer(tokenizer)
    data = read_conversations(inputs, source)
    val_data = read_conversations(val_inputs) if val_inputs else None
    train_set, val_set, held_out = chat_splits(data, val_data, seed)
    description = f"--input {' '.join(inputs)}" if inputs else f"--source {source}"
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", name or "chat").strip("-") or "chat"
    settings = dict(kind="conversations", source=description, val_inputs=val_inputs,
                    tokenizer=os.path.abspath(tokenizer), seed=seed, name=name,
                    shard_tokens=shard_tokens, format=1)

    remove_interrupted_writes(out_dir)
    start_rebuild(out_dir, settings)
    write_file_atomically(os.path.join(out_dir, "tokenizer.json"), chat.to_str().encode())
    write_file_atomically(os.path.join(out_dir, "tokenizer_config.json"),
                          json.dumps(tokenizer_config, indent=2, ensure_ascii=False).encode())
    loaded = load_tokenizer(os.path.join(out_dir, "tokenizer.json"), parse_special_tokens=True)
    chat_template = load_chat_template(out_dir)
    eos_ids = [loaded.token_to_id(token) for token in END_OF_TURN_TOKENS] + [loaded.eot_id]
    shards, counts = {}, {}
    for split, conversations in (("val", val_set), ("train", train_set)):
        examples, counts[split] = tokenize_conversations(conversations, loaded, chat_template)
        if not examples:
            raise ValueError(f"no {split} conversation has an assistant turn")
        shards[split] = write_conversation_shards(examples, out_dir, name, split,
                                                  len(shards.get("val", [])), shard_tokens)
        log(f"{split}: {counts[split]['conversations']:,} conversations "
            f"({counts[split]['dropped']:,} dropped: no answer), "
            f"{counts[split]['tokens']:,} tokens, {counts[split]['supervised']:,} trained on")
    meta = dict(
        complete=True, kind="conversations", source=description, settings=settings,
        held_out=held_out, tokenizer=dict(kind="huggingface", path="tokenizer.json", trained=False,
                                          origin=os.path.abspath(tokenizer)),
        vocab_size=loaded.vocab_size, bos_id=loaded.bos_id, eos_id=loaded.eot_id,
        eos_ids=list(dict.fromkeys(i for i in eos_ids if i is not None)),
        added_tokens={chat.id_to_token(i): i for i in added},
        chat_template=chat_template["template"],
        conversations={split: n["conversations"] - n["dropped"] for split, n in counts.items()},
        tokens={split: n["tokens"] for split, n in counts.items()},
        supervised={split: n["supervised"] for split, n in counts.items()},
        **shard_lists(shards), python=platform.python_version())
    write_meta(out_dir, meta)
    log(f"wrote {sum(meta['conversations'].values()):,} conversations to {out_dir}; added to the "
        f"vocabulary: {', '.join(meta['added_tokens']) or 'nothing'}")
    return meta


# ----------------------------------------------------------------------------------------------
# Reading shards for training (train.py): ShardLoader and ConversationLoader give next_batch(steps)
# -> (x, y) of this process's rows, step_tokens, reset(), a position (state_dict) for checkpoints.

PAD_MULTIPLE = 16  # micro-batches of conversations are padded to a multiple of this many tokens
BUCKET_MIN = 64  # with torch.compile: to a power of two of at least this many


def check_token_ids(tokens, vocab_size, path):
    """Each token id of a shard fits a model of vocab_size; a ValueError naming the shard if not."""
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= vocab_size:
        raise ValueError(f"{path} holds token id {largest}, outside the model's vocabulary of "
                         f"{vocab_size}")


class ShardLoader:
    """Batches of sequences from memory-mapped shards, the same whatever the number of processes:
    sequences of block_size + 1 tokens at multiples of block_size, in an order fixed by (seed,
    epoch, shard), so a batch mixes many documents even in a small corpus. A call takes the next
    micro_steps * world_size rows of batch_size sequences, process `rank` rows rank, rank +
    world_size, ...; a shard with too few left gives way to the next (after the last, the first:
    the next epoch). The position is three ints; step_tokens counts all processes' tokens."""

    def __init__(self, data_dir, split, batch_size, block_size, rank, world_size, vocab_size,
                 seed=0):
        self.paths = list_shards(data_dir, split)
        self.shards = [read_shard(path) for path in self.paths]
        self.batch_size, self.block_size, self.vocab_size = batch_size, block_size, vocab_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.checked = set()  # the shards whose token ids are known to fit the vocabulary
        self.reset()

    def reset(self):
        self.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})

    def state_dict(self):
        return {"shard": self.shard, "offset": self.offset, "epoch": self.epoch}

    def load_state_dict(self, state):
        if not 0 <= state["shard"] < len(self.shards):
            raise ValueError(f"the checkpoint's data position is in shard {state['shard']}"
                             f" but there are {len(self.shards)} shards")
        self.shard, self.offset, self.epoch = state["shard"], state["offset"], state["epoch"]
        self.order = None  # the current shard's order of sequences, made when first needed

    def sequence_order(self):
        if self.order is None:
            # the whole shard when first read: every process reads the same one at the same step,
            # so they all refuse a bad token id together
            if self.shard not in self.checked:
                check_token_ids(self.shards[self.shard], self.vocab_size, self.paths[self.shard])
                self.checked.add(self.shard)
            count = (len(self.shards[self.shard]) - 1) // self.block_size
            rng = np.random.default_rng([self.seed, self.epoch, self.shard])
            self.order = rng.permutation(count)
        return self.order

    def next_batch(self, micro_steps):
        """x, y: int64 arrays (micro_steps, batch_size, block_size), this process's rows."""
        batch, length = self.batch_size, self.block_size
        need = micro_steps * self.world_size * batch  # sequences, all processes together
        if self.offset + need > len(self.sequence_order()):
            self.load_state_dict({"shard": (self.shard + 1) % len(self.shards), "offset": 0,
                                  "epoch": self.epoch + (self.shard + 1 == len(self.shards))})
            if need > len(self.sequence_order()):
                raise ValueError(f"shard {self.paths[self.shard]} holds "
                                 f"{len(self.shards[self.shard])} tokens, fewer than the "
                                 f"{need * length + 1} one step reads; use a smaller "
                                 f"total_batch_size or batch_size")
        rows = [self.offset + (m * self.world_size + self.rank) * batch for m in range(micro_steps)]
        starts = np.concatenate([self.order[row:row + batch] for row in rows]) * length
        tokens = self.shards[self.shard][starts[:, None] + np.arange(length + 1)]  # (M*B, T+1)
        self.offset += need
        self.step_tokens = need * length
        tokens = tokens.astype(np.int64).reshape(micro_steps, batch, length + 1)
        return tokens[..., :-1], tokens[..., 1:]


class ConversationLoader:
    """Batches of conversations (SFT) from conversation shards, ShardLoader's interface. Packing
    would let conversations attend to each other (our attention has no document mask), so each is
    a row of its own, right-padded (causal attention: nothing before the padding changes) and cut
    after block_size + 1 tokens; one left with no supervised target is dropped. The conversations
    are an endless stream of epochs, each in an order fixed by (seed, epoch). A step's conversations
    are sorted by length (its loss, the mean over its supervised tokens, is unchanged; a
    micro-batch's rows alike in length) and dealt out as ShardLoader's rows. x, y: lists of
    micro_steps arrays (batch_size, padded_length). The position: one int, saved with the count."""

    def __init__(self, data_dir, split, batch_size, block_size, rank, world_size, vocab_size,
                 seed=0, bucket=False):
        self.paths = list_shards(data_dir, split)
        self.shards = [read_conversation_shard(path) for path in self.paths]
        for path, (tokens, _, _) in zip(self.paths, self.shards):  # all now: every process refuses
            check_token_ids(tokens, vocab_size, path)
        shard_of, starts, lengths, self.cut, self.dropped = [], [], [], 0, 0
        for index, (tokens, supervised, offsets) in enumerate(self.shards):
            begin, full = offsets[:-1], np.diff(offsets)
            kept = np.minimum(full, block_size + 1)
            targets = np.append(np.flatnonzero(supervised), np.iinfo(np.int64).max)
            first_target = targets[np.searchsorted(targets, begin + 1)]  # per conversation
            keep = first_target < begin + kept
            shard_of.append(np.full(keep.sum(), index))
            starts.append(begin[keep])
            lengths.append(kept[keep] - 1)  # the targets of each row
            self.cut += int((full > block_size + 1).sum())
            self.dropped += int((~keep).sum())
        self.shard_of, self.starts, self.lengths = map(np.concatenate, (shard_of, starts, lengths))
        if not len(self.lengths):
            raise ValueError(f"no {split} conversation in {data_dir} has an assistant turn "
                             f"within block_size {block_size} tokens")
        self.batch_size, self.block_size, self.bucket = batch_size, block_size, bucket
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.reset()

    def __len__(self):
        return len(self.lengths)

    def reset(self):
        self.position, self.order_epoch = 0, None

    def state_dict(self):
        return {"position": self.position, "conversations": len(self)}

    def load_state_dict(self, state):
        if state.get("conversations") != len(self):
            raise ValueError(f"the checkpoint was made reading {state.get('conversations')}"
                             f" conversations, these settings give {len(self)}: resume with the "
                             f"same data_dir, block_size and seed")
        self.position = state["position"]

    def take(self, count):
        """The indices of the next `count` conversations of the stream."""
        taken = []
        while len(taken) < count:
            epoch, offset = divmod(self.position, len(self))
            if self.order_epoch != epoch:
                self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
                self.order_epoch = epoch
            part = self.order[offset:offset + count - len(taken)]
            taken += part.tolist()
            self.position += len(part)
        return taken

    def example(self, i):
        """Conversation i as (ids, supervised), cut to its row's length + 1."""
        tokens, supervised, _ = self.shards[self.shard_of[i]]
        start, end = self.starts[i], self.starts[i] + self.lengths[i] + 1
        return tokens[start:end], supervised[start:end]

    def next_batch(self, micro_steps):
        rows = self.batch_size
        chosen = sorted(self.take(micro_steps * self.world_size * rows),
                        key=lambda i: self.lengths[i])
        self.step_tokens = int(self.lengths[chosen].sum())
        starts = [(m * self.world_size + self.rank) * rows for m in range(micro_steps)]
        batches = [collate([self.example(i) for i in chosen[start:start + rows]], self.block_size,
                           bucket=self.bucket) for start in starts]
        return [x for x, _ in batches], [y for _, y in batches]


def padded_length(longest, block_size, bucket=False):
    """A micro-batch's length: its longest row rounded up to a multiple of PAD_MULTIPLE, or, with
    bucket (torch.compile, which compiles one graph per length), to a power of two of at least
    BUCKET_MIN: a handful of lengths (8 up to block_size 8192), not one per 16; <= block_size."""
    if bucket:
        return min(block_size, max(BUCKET_MIN, 1 << (longest - 1).bit_length()))
    return min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(examples, block_size, length=None, bucket=False):
    """x, y int64 arrays (rows, length) of conversations: inputs right-padded with 0, targets the
    next token where it is supervised and -1 elsewhere (padding included)."""
    if length is None:
        length = padded_length(max(len(ids) - 1 for ids, _ in examples), block_size, bucket)
    x = np.zeros((len(examples), length), dtype=np.int64)
    y = np.full((len(examples), length), -1, dtype=np.int64)
    for row, (ids, supervised) in enumerate(examples):
        ids, n = np.asarray(ids, dtype=np.int64), len(ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = np.where(np.asarray(supervised[1:], dtype=bool), ids[1:], -1)
    return x, y


# ----------------------------------------------------------------------------------------------
# Command line: --key=value or --key value, a Python literal or a bare string (docs/reference.md)

def as_int(text):
    value = parse_value(text)
    if isinstance(value, float) and value.is_integer():  # --max_tokens=4e9
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    return value


def as_str(text):
    value = parse_value(text)
    return value if isinstance(value, str) else text


def as_separator(text):
    """--doc_sep='\\n\\n' comes with a real backslash from the shell: read escapes as Python."""
    value = parse_value(text)
    if isinstance(value, str) and value != text:
        return value
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def as_bool(text):
    value = parse_value(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"not True or False: {text!r}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = functools.partial(parser.add_argument, type=as_str)  # unless an option says otherwise
    switch = dict(type=as_bool, nargs="?", const=True, default=False)  # --force, --force=False
    add("--input", dest="inputs", nargs="+", metavar="PATH", type=str,
        help="local .txt (one document per file, or split on --doc_sep), .jsonl, .parquet files, "
             "directories or globs; default: the Python standard library's source")
    add("--source", help="stream a Hugging Face data set NAME or NAME:CONFIG (needs `datasets`)")
    add("--source_split", default="train", help="split of --source to stream")
    add("--text_field", default="text", help="field holding the text in .jsonl, .parquet, --source")
    add("--doc_sep", type=as_separator, nargs="?", const="\n\n",
        help="split .txt files into documents on this string (escapes like \\n are read); "
             "bare: a blank line")
    add("--out_dir", default=DEFAULT_DATA_DIR)
    add("--name", help="shard name prefix (default from the input: stdlib, the file name, ...)")
    add("--vocab_size", type=as_int, default=32768,
        help="size of the SentencePiece vocabulary to train")
    add("--tokenizer",
        help="reuse a SentencePiece .model, or a tokenizer.json (or a directory with one)")
    add("--eot_token",
        help="end-of-text token (default: eos of a .model; <|end_of_text|>, </s>, ...)")
    add("--eos_id", type=as_int, default=2,
        help="id of eos (end of text) in a trained tokenizer; unk is 0, bos 1")
    add("--sample_bytes", type=as_int, default=8_000_000, help="text the tokenizer is trained on")
    add("--val_tokens", type=as_int,
        help="tokens in the validation split (default about 5%%, at most 10M)")
    add("--shard_tokens", type=as_int, default=100_000_000, help="tokens per shard file")
    add("--max_tokens", type=as_int, help="stop after the first document end past this many tokens")
    add("--dtype", choices=["uint16", "uint32"],
        help="token dtype (default from the vocabulary size)")
    add("--workers", type=as_int, default=available_cpus(), help="tokenizer processes")
    add("--force", **switch, help="rebuild even when out_dir already holds this exact preparation")
    add("--chat", **switch, help="conversations ({\"messages\": [...]} jsonl, or a data set) -> "
        "chat tokenizer + conversation shards")
    add("--val_input", dest="val_inputs", nargs="+", metavar="PATH", type=str,
        help="--chat: validation conversations; default: the data set's test split, or 1 in 20 "
             "held out")
    add("--seed", type=as_int, default=1337, help="--chat: chooses the held-out conversations")
    return parser.parse_args(argv)


def main(argv=None):
    args = vars(parse_args(argv))
    chat, val_inputs, seed = args.pop("chat"), args.pop("val_inputs"), args.pop("seed")
    try:
        if chat:
            return prepare_chat(args["out_dir"], args["inputs"], args["source"], args["tokenizer"],
                                val_inputs, args["name"], seed, args["shard_tokens"])
        if val_inputs:
            raise ValueError("--val_input is for --chat")
        return prepare(**args)
    except ValueError as e:
        raise SystemExit(f"prepare_data.py: error: {e}") from None
    except KeyboardInterrupt:
        log(f"prepare_data.py: interrupted; run it again to prepare {args['out_dir']}")
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    main()

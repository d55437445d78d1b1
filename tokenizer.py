"""
Tokenizers and chat templates: what turns text into a model's token ids and back, and a
conversation into the text a chat model reads; then a model directory's tokenizer files.
"""

import contextlib
import io
import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import Callable

import numpy as np

from common import atomic_write, atomic_write_text, available_cpus, one_line

# ----------------------------------------------------------------------------------------------
# Tokenizers: train SentencePiece BPE, or load a .model or a tokenizer.json; both give one record

# a tokenizer directory's tokenizer files: prepare_data.py's out_dir and a model directory alike
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "chat_template.jinja")


@dataclass
class Tokenizer:
    kind: str  # "sentencepiece" or "huggingface"
    vocab_size: int  # ids are 0 .. vocab_size - 1
    eot_id: int  # end of text: closes every document in the shards
    bos_id: int | None
    encode: Callable  # list of str -> list of lists of ids, no special tokens added
    decode: Callable  # ids -> str
    token_to_id: Callable  # token text -> id, or None when the vocabulary has no such token
    # str -> the ids a prompt is given to the model as: transformers' tokenizer(text) for a
    # tokenizer.json (with whatever special tokens its post-processor adds, perhaps none); for our
    # SentencePiece models, the end-of-text token first, as every document follows one in shards.
    encode_prompt: Callable


# Every option here is about getting the text back exactly (or fast, or small).
SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,  # characters outside the vocabulary become UTF-8 byte pieces: never <unk>
    normalization_rule_name="identity",  # no NFKC: text comes back as it went in
    add_dummy_prefix=False,  # no invented space at the start of the text
    remove_extra_whitespaces=False,  # keep indentation, runs of spaces, trailing spaces
    allow_whitespace_only_pieces=True,  # an indentation of 8 spaces is one piece, not 8
    split_digits=True,  # numbers digit by digit, as in Llama
    character_coverage=0.9995,  # the rarest characters go to byte pieces
    max_sentence_length=1 << 14,  # bytes; the trainer is given lines of at most 4096 characters
    hard_vocab_limit=False,  # a tiny corpus gets a smaller vocabulary instead of an error
    shuffle_input_sentence=True,
    input_sentence_size=5_000_000,  # lines; a bound on training time whatever --sample_bytes says
    unk_id=0, bos_id=1, pad_id=-1,
    minloglevel=2,  # SentencePiece logs hundreds of lines otherwise
)


# searched in tokenizer.json
EOT_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>")
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")

META_SYMBOL = "\u2581"  # "▁": SentencePiece's stand-in for a space


def train_sentencepiece(sample, vocab_size, eos_id=2):
    """Train SentencePiece BPE on the lines of the sample documents; returns the model file's bytes.
    Lines go in without their line break, so no piece contains "\\n": a newline is always its own
    byte piece, and cutting documents at line starts never changes the tokens."""
    # SentencePiece drops lines over max_sentence_length bytes: slice them (minified text, CJK).
    lines = [line[i:i + 4096] for doc in sample for line in doc.splitlines()
             for i in range(0, len(line), 4096)]
    if vocab_size < 260:
        raise ValueError(f"--vocab_size={vocab_size} is too small: the 256 byte pieces and unk, "
                         f"bos, eos come first")
    if eos_id in (0, 1) or not 0 <= eos_id < vocab_size:
        raise ValueError(f"--eos_id={eos_id} must lie in [2, vocab_size): 0 is unk and 1 is bos")
    if not lines:
        raise ValueError("the tokenizer's training sample holds no text, only line breaks")
    try:
        return run_sentencepiece_trainer(lines, vocab_size, eos_id)
    except ValueError as e:
        if "required_chars" not in str(e):
            raise
    # The vocabulary cannot hold every character that 99.95% coverage asks for (text in Chinese,
    # say, with a vocabulary of 512): train on the commonest characters only, cutting lines at the
    # others, which byte pieces encode as they encode any character the tokenizer never saw.
    counts = Counter(chain.from_iterable(lines))
    keep = {char for char, _ in counts.most_common(max(1, (vocab_size - 259) // 2))}
    rare = re.compile("[" + re.escape("".join(set(counts) - keep)) + "]+")
    return run_sentencepiece_trainer([part for line in lines for part in rare.split(line) if part],
                                     vocab_size, eos_id)


def run_sentencepiece_trainer(lines, vocab_size, eos_id):
    import sentencepiece

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, eos_id=eos_id,
            num_threads=available_cpus(), **SENTENCEPIECE_OPTIONS)
    except RuntimeError as e:  # SentencePiece says "INTERNAL: file(line) [check] message"
        reason = str(e).split("] ", 1)[-1].strip() or str(e).strip()
        raise ValueError(f"training the tokenizer failed: {reason} (--vocab_size={vocab_size}, "
                         f"--eos_id={eos_id}; unk is 0, bos 1)") from None
    return model.getvalue()


def tokenizer_file(path):
    """--tokenizer names a file, or a model directory whose tokenizer.json is meant."""
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def load_tokenizer(path, eot_token=None, parse_special_tokens=False) -> Tokenizer:
    """A SentencePiece .model, or a Hugging Face tokenizer.json (or a model directory holding one).
    parse_special_tokens: text that spells a special token (<|start_header_id|>) is encoded as that
    token, as prompts need; off for data, where such text stays text, as SentencePiece keeps it."""
    path = tokenizer_file(path)
    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path}: no such file")
    if path.endswith(".json"):
        return load_huggingface_tokenizer(path, eot_token, parse_special_tokens)
    return load_sentencepiece(path, eot_token)


def load_sentencepiece(path, eot_token=None):
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"--tokenizer {path}: not a SentencePiece model ({one_line(e)})") from None

    def token_to_id(piece):
        piece_id = processor.piece_to_id(piece)
        unknown = piece_id == processor.unk_id() and piece != processor.id_to_piece(piece_id)
        return None if unknown else piece_id

    eot_id = processor.eos_id() if eot_token is None else token_to_id(eot_token)
    if eot_id is None:
        raise ValueError(f"--tokenizer {path}: no end-of-text token {eot_token!r} (--eot_token)")
    if eot_id < 0:
        raise ValueError(f"--tokenizer {path}: the model has no eos piece; name an end-of-text "
                         f"piece with --eot_token")
    bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
    encode = sentencepiece_encoder(processor)
    return Tokenizer("sentencepiece", processor.get_piece_size(), eot_id, bos_id, encode,
                     lambda ids: processor.decode(np.asarray(ids).tolist()), token_to_id,
                     lambda text: [eot_id] + encode([text])[0])


def sentencepiece_encoder(processor):
    """SentencePiece's encode, made lossless for text holding "▁" itself (SentencePiece would decode
    it as a space): such text is encoded around it, "▁" spelled with its three UTF-8 byte pieces."""
    meta_symbol_ids = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in META_SYMBOL.encode()]
    has_byte_pieces = all(processor.is_byte(i) for i in meta_symbol_ids)

    def encode_around_meta_symbol(text):
        parts = text.split(META_SYMBOL)
        ids = processor.encode(parts[0])
        for part in parts[1:]:
            ids += meta_symbol_ids + processor.encode(part)
        return ids

    def encode(texts):
        ids = processor.encode(texts, num_threads=1)  # parallelism comes from worker processes
        if has_byte_pieces:
            for i, text in enumerate(texts):
                if META_SYMBOL in text:
                    ids[i] = encode_around_meta_symbol(text)
        return ids

    return encode


def load_huggingface_tokenizer(path, eot_token=None, parse_special_tokens=False):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    try:
        import tokenizers
    except ImportError:
        raise ValueError(f"--tokenizer {path}: a tokenizer.json needs the optional `tokenizers` "
                         f"package (pip install tokenizers)") from None
    try:
        hf_tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"--tokenizer {path}: not a tokenizer.json ({one_line(e)})") from None
    # In data, text that spells "<|end_of_text|>" must stay text, or it would end a document.
    with contextlib.suppress(AttributeError):  # tokenizers < 0.15 lacks the switch
        hf_tokenizer.encode_special_tokens = not parse_special_tokens
    candidates = [eot_token] if eot_token is not None else EOT_TOKENS
    eot_id = next((i for i in map(hf_tokenizer.token_to_id, candidates) if i is not None), None)
    if eot_id is None:
        raise ValueError(f"--tokenizer {path}: no end-of-text token ({', '.join(candidates)}); "
                         f"name one with --eot_token")
    bos_id = next((i for i in map(hf_tokenizer.token_to_id, BOS_TOKENS) if i is not None), None)

    def encode(texts):
        return [encoding.ids
                for encoding in hf_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(ids):
        return hf_tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    return Tokenizer("huggingface", hf_tokenizer.get_vocab_size(with_added_tokens=True), eot_id,
                     bos_id, encode, decode, hf_tokenizer.token_to_id,
                     lambda text: hf_tokenizer.encode(text, add_special_tokens=True).ids)


def tokenizer_directory(path):
    """Where a model's tokenizer lies: the model directory, or a checkpoint's directory."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def load_text_tokenizer(directory, vocab_size):
    """The tokenizer.json or tokenizer.model of a model directory, checked against the model's
    vocab_size, parsing special tokens in text (as prompts need). Problems raise ValueError."""
    found = next((name for name in ("tokenizer.json", "tokenizer.model")
                  if os.path.exists(os.path.join(directory, name))), None)
    if found is None:
        raise ValueError(f"no tokenizer.json or tokenizer.model in {directory}")
    tokenizer = load_tokenizer(os.path.join(directory, found), parse_special_tokens=True)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the "
                         f"model only {vocab_size}: they do not belong together")
    return tokenizer


def document_start(tokenizer):
    """The token scoring puts before a document (bits per byte) or an empty context: every prompt's
    first, if any (end-of-text for our SentencePiece models), else a tokenizer.json's begin-of-text
    (lm-eval-harness's prefix), else end-of-text."""
    if prompt_start := tokenizer.encode_prompt(""):
        return prompt_start[0]
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id


LOSSLESS_PROBE = ("def f(x):\n\tif x:  # ok\r\n        return 'héllo wörld 日本語 🙂'\n\n"
                  "\x00\x7f \u2028▁ end  ")


def is_lossless(tokenizer):
    decoded = tokenizer.decode(list(chain.from_iterable(tokenizer.encode([LOSSLESS_PROBE]))))
    return decoded == LOSSLESS_PROBE


# ----------------------------------------------------------------------------------------------
# Chat templates: a conversation as the text a chat model reads, and the chat tokenizer

# Doge's chat format (Llama-3 style), for tokenizers that bring no template of their own
DOGE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] "
    "+ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|end_of_text|>")  # besides the tokenizer's own end of text


def read_json(path):
    """The JSON object in path, or {} when there is no such file; an unreadable one: ValueError."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def token_text(value):
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


def load_chat_template(directory):
    """A model directory's Jinja chat template ({"template", "bos_token", "eos_token"}), or None."""
    tokenizer_config = read_json(os.path.join(directory, "tokenizer_config.json"))
    template = tokenizer_config.get("chat_template")
    jinja_path = os.path.join(directory, "chat_template.jinja")  # transformers 5.x writes it apart
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None:
        return None
    return {"template": template, "bos_token": token_text(tokenizer_config.get("bos_token")) or "",
            "eos_token": token_text(tokenizer_config.get("eos_token")) or ""}


def render_chat(chat_template, messages, add_generation_prompt=True):
    """The text of a conversation; with add_generation_prompt it ends where the assistant's answer
    begins."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("a chat template needs the optional jinja2 package "
                         "(pip install jinja2)") from None

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(chat_template["template"]).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=chat_template["bos_token"], eos_token=chat_template["eos_token"])


def end_of_turn_text(chat_template):
    """The text the template puts after an assistant's reply, if each turn's rendering extends the
    one before (so a turn can feed the model only its own text); else None."""
    user, reply = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    asking = render_chat(chat_template, [user]) + reply["content"]
    answered = render_chat(chat_template, [user, reply], add_generation_prompt=False)
    asking_again = render_chat(chat_template, [user, reply, user])
    if not (answered.startswith(asking) and asking_again.startswith(answered)):
        return None
    return answered[len(asking):]


def stop_ids(model, tokenizer, directory):
    """Every id that ends generation: the model's config.json's and generation_config.json's eos
    ids, and the tokenizer's own end-of-text and end-of-turn tokens."""
    ids = {tokenizer.eot_id}
    for value in (model.config.eos_token_id,
                  read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id")):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    tokenizer_config = read_json(os.path.join(directory, "tokenizer_config.json"))
    for text in (token_text(tokenizer_config.get("eos_token")), *END_OF_TURN_TOKENS):
        if text is not None and tokenizer.token_to_id(text) is not None:
            ids.add(tokenizer.token_to_id(text))
    return sorted(ids)


# what transformers' tokenizer(...) returns for a Doge: transformers 4.x adds token_type_ids by
# default, which generate() refuses
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def sentencepiece_as_tokenizers(path):
    """Our SentencePiece BPE model (byte fallback, identity normalisation, no dummy prefix) as a
    `tokenizers` BPE giving the same ids, for transformers: the vocabulary in id order, and a merge
    for every split of a piece into two pieces, ranked by the piece's score (SentencePiece BPE
    merges the adjacent pair whose union scores best). Pieces spell a space as a space, not "▁": a
    "▁" in text finds no piece and gets byte pieces, as in load_tokenizer."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models

    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    pieces = [piece if processor.is_byte(i) else piece.replace(META_SYMBOL, " ")
              for i, piece in enumerate(map(processor.id_to_piece, range(len(processor))))]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    plain = {piece for i, piece in enumerate(pieces)  # never made from text by merging
             if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
                     or processor.is_unused(i))}
    merges = sorted((-processor.get_score(vocab[piece]), vocab[piece], k, piece[:k], piece[k:])
                    for piece in plain for k in range(1, len(piece))
                    if piece[:k] in plain and piece[k:] in plain)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                                     unk_token=pieces[processor.unk_id()], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def sentencepiece_export(path):
    """Our SentencePiece tokenizer.model as text files that AutoTokenizer loads with `tokenizers`
    alone: a tokenizer.json (sentencepiece_as_tokenizers; unk, bos, eos special; end-of-text put
    first, so that tokenizer(text) is load_tokenizer's encode_prompt) and its tokenizer_config.json,
    whose split_special_tokens keeps text that spells "</s>" text, as SentencePiece does."""
    import sentencepiece
    from tokenizers import AddedToken, processors

    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    if processor.eos_id() < 0:
        raise ValueError(f"{path}: the model has no eos piece, which every document follows")
    ids = {"unk_token": processor.unk_id(), "bos_token": processor.bos_id(),
           "eos_token": processor.eos_id()}
    special = {name: processor.id_to_piece(i) for name, i in ids.items() if i >= 0}
    tokenizer = sentencepiece_as_tokenizers(path)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in special.values()])
    eos = special["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, processor.eos_id())])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "model_input_names": MODEL_INPUT_NAMES}
    return tokenizer.to_str(), json.dumps(config, indent=2)


def chat_tokenizer(path):
    """The chat tokenizer of a model (path: its directory, tokenizer.json or tokenizer.model): the
    tokenizer.json, or our tokenizer.model converted, and its tokenizer_config.json. One with a chat
    template keeps it; one without gets the Doge template, <|begin_of_text|> as bos, <|eot_id|> as
    eos, and the template's special tokens its vocabulary lacks (new ids after the last). Returns
    the `tokenizers.Tokenizer`, the tokenizer_config dict and the added tokens' ids."""
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError:
        raise ValueError("--chat needs the optional `tokenizers` package "
                         "(pip install tokenizers)") from None
    candidates = [os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")] \
        if os.path.isdir(path) else [path]
    found = next((candidate for candidate in candidates if os.path.isfile(candidate)), None)
    if found is None:
        raise ValueError(f"--tokenizer {path}: no tokenizer.json or tokenizer.model there")
    try:
        tokenizer = Tokenizer.from_file(found) if found.endswith(".json") \
            else sentencepiece_as_tokenizers(found)
    except Exception as e:  # tokenizers and sentencepiece raise their own kinds for damaged files
        raise ValueError(f"--tokenizer {found}: unreadable ({one_line(e)})") from None
    directory = os.path.dirname(found)
    config = read_json(os.path.join(directory, "tokenizer_config.json"))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_input_names", MODEL_INPUT_NAMES)
    own_template = load_chat_template(directory)
    if own_template is not None:  # chat_template.jinja, if that is where it was, goes inline
        return tokenizer, {**config, "chat_template": own_template["template"]}, []
    missing = [token for token in CHAT_TOKENS if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in missing])
    config = {**config, "chat_template": DOGE_CHAT_TEMPLATE, "bos_token": CHAT_TOKENS[0],
              "eos_token": "<|eot_id|>"}
    return tokenizer, config, [tokenizer.token_to_id(token) for token in missing]


# ----------------------------------------------------------------------------------------------
# Export: a model directory's tokenizer files


def copy_tokenizer_files(source_dir, target_dir, names=TOKENIZER_FILES):
    """Whichever of the named files source_dir holds, copied into target_dir (each atomically)."""
    for name in names:
        source = os.path.join(source_dir, name)
        if os.path.isfile(source):
            atomic_write(os.path.join(target_dir, name), lambda temp: shutil.copyfile(source, temp))


def write_tokenizer_files(tokenizer_dir, path):
    """tokenizer_dir's tokenizer files into path, a lone tokenizer.model of ours as a tokenizer.json
    and its config (AutoTokenizer would read it as a tiktoken file)."""
    model_file = os.path.join(tokenizer_dir, "tokenizer.model")
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")) or \
            not os.path.isfile(model_file):
        copy_tokenizer_files(tokenizer_dir, path)
        return
    try:
        tokenizer_json, tokenizer_config = sentencepiece_export(model_file)
    except ImportError as e:  # the conversion needs the optional `tokenizers` package
        copy_tokenizer_files(tokenizer_dir, path)
        print(f"exported tokenizer.model only, which transformers cannot load: a tokenizer.json "
              f"needs {e.name or 'a missing package'} (pip install tokenizers)", file=sys.stderr)
        return
    atomic_write_text(os.path.join(path, "tokenizer.json"), tokenizer_json)
    atomic_write_text(os.path.join(path, "tokenizer_config.json"), tokenizer_config)


"""save_pretrained as a hub upload needs it: our SentencePiece tokenizer as a tokenizer.json that
transformers' AutoTokenizer loads and that encodes and decodes exactly as ours, and a model card
naming the base model and the training data from the run's record."""

import json
import sys

import pytest
import torch

import doge
from helpers import random_documents
from oracle import tiny_config
from tokenizer import document_start, load_text_tokenizer, load_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Doge exported with a SentencePiece tokenizer trained on texts full of what
    tokenizers get wrong (byte fallback for the rarest characters); our tokenizer and the path."""
    out_dir = tmp_path_factory.mktemp("out")
    (out_dir / "tokenizer.model").write_bytes(
        train_sentencepiece(random_documents(200, seed=1), vocab_size=300))
    ours = load_tokenizer(str(out_dir / "tokenizer.model"))
    torch.manual_seed(0)
    model = doge.Doge(tiny_config(vocab_size=ours.vocab_size, bos_token_id=ours.bos_id,
                                  eos_token_id=ours.eot_id))
    path = tmp_path_factory.mktemp("export")
    model.save_pretrained(path, tokenizer_dir=out_dir)
    return ours, path


def test_autotokenizer_encodes_and_decodes_as_ours(exported):
    transformers = pytest.importorskip("transformers")
    ours, path = exported
    assert not (path / "tokenizer.model").exists()  # transformers would take it for tiktoken's
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0, ours.bos_id, ours.eot_id)
    texts = random_documents(100, seed=2) + ["", " ", "▁", "</s><s><unk>", "<0x41>", "🙂" * 3]
    byte_fallbacks = 0
    for text in texts:
        ids = ours.encode([text])[0]
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert tokenizer(text)["input_ids"] == ours.encode_prompt(text), repr(text)
        assert tokenizer.decode(ids) == text, repr(text)
        assert tokenizer.decode(ours.encode_prompt(text), skip_special_tokens=True) == text
        byte_fallbacks += sum(token.startswith("<0x") for token in tokenizer.convert_ids_to_tokens(ids))
    assert byte_fallbacks > 100  # the texts did reach the byte pieces
    # what generate(**inputs) accepts (transformers 4.x would add token_type_ids)
    assert set(tokenizer("a prompt", return_tensors="pt")) == {"input_ids", "attention_mask"}


def record(init_from, source, data_dir="data/x", resume_ckpt=None):
    return {"train_config": {"init_from": init_from, "resume_ckpt": resume_ckpt,
                             "data_dir": data_dir, "max_iters": 100,
                             "total_batch_size": 4096, "learning_rate": 8e-5},
            "data": {"source": source}, "started": "2026-12-05 09:00:00"}


def card_of(tmp_path, records):
    """The README.md that save_pretrained writes, given an out_dir with these run records."""
    out_dir = tmp_path / "out"
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    for i, value in enumerate(records):
        (out_dir / "runs" / f"20261205-09000{i}-1.json").write_text(json.dumps(value))
    doge.Doge(tiny_config()).save_pretrained(tmp_path / "export", tokenizer_dir=out_dir)
    return (tmp_path / "export" / "README.md").read_text()


def test_model_card_names_the_base_model_and_the_data_of_the_run(tmp_path):
    card = card_of(tmp_path, [
        record("scratch", "--input old.txt (1 files)"),  # an earlier run in the same out_dir
        record("SmallDoge/Doge-20M", "--source HuggingFaceTB/smoltalk:all"),
        record("resume", "--source HuggingFaceTB/smoltalk:all")])
    assert "\n# out\n" in card  # the run's name
    metadata = card.split("---")[1]
    assert "base_model: SmallDoge/Doge-20M\n" in metadata
    assert "datasets:\n- HuggingFaceTB/smoltalk\n" in metadata
    assert "- Base model: SmallDoge/Doge-20M\n" in card
    assert "- Training data: --source HuggingFaceTB/smoltalk:all\n" in card


def test_model_card_of_a_local_start_or_without_a_record(tmp_path):
    card = card_of(tmp_path, [record("resume", None, "data/mine", resume_ckpt="out/a/ckpt_1.pt")])
    assert "base_model" not in card and "datasets" not in card
    assert "- Base model: resumed out/a/ckpt_1.pt\n- Training data: data/mine\n" in card
    doge.Doge(tiny_config()).save_pretrained(tmp_path / "bare")
    assert "- Base model and training data: not recorded" in (tmp_path / "bare" / "README.md").read_text()


def test_our_own_loader_reads_the_export_as_it_reads_the_tokenizer_model(exported):
    pytest.importorskip("tokenizers")
    ours, path = exported
    export = load_text_tokenizer(str(path), ours.vocab_size)
    text = "def f(x):\n\treturn 'héllo ▁ 日本語 🙂'"
    assert export.encode_prompt(text) == ours.encode_prompt(text)
    # scoring (eval.py) starts documents with end-of-text from both, not with the unused <s>
    assert document_start(export) == document_start(ours) == ours.eot_id != export.bos_id


def test_without_tokenizers_the_export_keeps_tokenizer_model_and_says_so(tmp_path, monkeypatch,
                                                                         capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.model").write_bytes(b"a SentencePiece model")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    doge.Doge(tiny_config()).save_pretrained(tmp_path / "export", tokenizer_dir=tmp_path / "out")
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == b"a SentencePiece model"
    assert not (tmp_path / "export" / "tokenizer.json").exists()
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "needs tokenizers (pip install tokenizers)" in message

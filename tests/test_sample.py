"""sample.py: a tiny model saved as a Hugging Face directory (with a tokenizer.json and a chat
template written here) and as a train.py checkpoint, driven through main()."""

import dataclasses
import json
import shutil

import pytest
import torch

import doge
import sample
from helpers import write_bpe_tokenizer

tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
            "message['content'] + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
            "{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "a small language model writes small sentences"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    vocab_size = write_bpe_tokenizer(directory, CORPUS, SPECIAL, 300)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|end_of_text|>"}}))
    torch.manual_seed(0)
    config = doge.DogeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             keep_window_size=16, bos_token_id=0, eos_token_id=1)
    doge.Doge(config).save_pretrained(directory)
    return directory


def run(capsys, *args):
    sample.main(list(args))
    return capsys.readouterr()


def test_chat_prompt_equals_the_template_string(model_dir):
    template = sample.load_chat_template(str(model_dir))
    messages = [{"role": "user", "content": "Hi"}]
    expected = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert sample.render_chat(template, messages) == expected
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"), chat_template=TEMPLATE,
        bos_token="<|begin_of_text|>")
    assert reference.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True) == expected
    tokenizer = sample.load_text_tokenizer(str(model_dir), 10 ** 6)
    ids = tokenizer.encode([expected])[0]
    assert ids[0] == tokenizer.token_to_id("<|begin_of_text|>")  # specials are parsed, not spelled
    assert tokenizer.token_to_id("<|eot_id|>") in ids


def with_bos_post_processor(model_dir, directory):
    """model_dir's files, its tokenizer.json given a post-processor that puts <|begin_of_text|>
    before every text (as Llama-3's does); model_dir's own tokenizer.json has none."""
    from tokenizers import Tokenizer, processors
    shutil.copytree(model_dir, directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.parametrize("bos_post_processor", [False, True])
def test_prompt_and_greedy_continuation_equal_transformers(model_dir, capsys, tmp_path,
                                                           bos_post_processor):
    """The prompt is what transformers' tokenizer(prompt) gives (the post-processor decides about
    <|begin_of_text|>), and the greedy continuation is the reference's, token for token."""
    transformers = pytest.importorskip("transformers")
    from oracle import reference_class
    directory = with_bos_post_processor(model_dir, tmp_path / "bos") if bos_post_processor \
        else model_dir
    prompt = "hello world, how"
    reference_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"))
    expected_ids = reference_tokenizer(prompt)["input_ids"]
    tokenizer = sample.load_text_tokenizer(str(directory), 10 ** 6)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    assert sample.prompt_ids(tokenizer, prompt) == expected_ids
    assert (expected_ids[0] == bos) == bos_post_processor  # the two kinds really differ
    assert sample.prompt_ids(tokenizer, "") == [bos]  # nothing to continue: a document's start
    reference = reference_class().from_pretrained(directory).eval()
    with torch.no_grad():
        generated = reference.generate(torch.tensor([expected_ids]), max_new_tokens=20,
                                       do_sample=False)[0, len(expected_ids):].tolist()
    stop = sample.stop_ids(doge.Doge.from_pretrained(directory), tokenizer, str(directory))
    new_ids = [token for token in generated[:next(
        (i for i, t in enumerate(generated) if t in stop), len(generated))]]
    out = run(capsys, f"--init_from={directory}", f"--start={prompt}", "--temperature=0",
              "--max_new_tokens=20")
    assert out.out == prompt + tokenizer.decode(new_ids) + "\n"
    assert "tokens/s" in out.err and "tokens/s" not in out.out


def test_our_sentencepiece_prompt_follows_end_of_text(tmp_path):
    from prepare_data import load_tokenizer, train_sentencepiece
    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece(CORPUS, 300))
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert sample.prompt_ids(tokenizer, "the quick") == [2] + tokenizer.encode(["the quick"])[0]
    assert sample.prompt_ids(tokenizer, "") == [2]  # documents follow end-of-text in the shards


def test_sampling_is_reproducible_under_a_seed(model_dir, capsys):
    args = (f"--init_from={model_dir}", "--start=the", "--max_new_tokens=30", "--temperature=1.0",
            "--num_samples=2")
    first = run(capsys, *args, "--seed=5").out
    assert run(capsys, *args, "--seed=5").out == first
    assert first.count("---------------") == 2


def test_prompt_from_file(model_dir, capsys, tmp_path):
    (tmp_path / "prompt.txt").write_text("hello world")
    from_file = run(capsys, f"--init_from={model_dir}", f"--start=FILE:{tmp_path / 'prompt.txt'}",
                    "--temperature=0", "--max_new_tokens=8").out
    inline = run(capsys, f"--init_from={model_dir}", "--start=hello world", "--temperature=0",
                 "--max_new_tokens=8").out
    assert from_file == inline


def test_chat_once_answers_from_the_rendered_prompt(model_dir, capsys, monkeypatch):
    prompts = []
    original = sample.stream_reply
    monkeypatch.setattr(sample, "stream_reply",
                        lambda model, tok, ids, *rest: prompts.append(ids) or original(model, tok, ids, *rest))
    out = run(capsys, f"--init_from={model_dir}", "--chat", "--start=Hi", "--temperature=0",
              "--max_new_tokens=10")
    tokenizer = sample.load_text_tokenizer(str(model_dir), 10 ** 6)
    template = sample.load_chat_template(str(model_dir))
    expected = tokenizer.encode([sample.render_chat(template, [{"role": "user", "content": "Hi"}])])
    assert prompts == expected
    assert out.out.endswith("\n") and "tokens/s" in out.err


def test_interactive_chat_keeps_the_conversation_and_resets(model_dir, capsys, monkeypatch):
    prompts = []
    original = sample.stream_reply
    monkeypatch.setattr(sample, "stream_reply",
                        lambda model, tok, ids, *rest: prompts.append(ids) or original(model, tok, ids, *rest))
    lines = iter(["Hi", "And then?", "/reset", "Hi", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    run(capsys, f"--init_from={model_dir}", "--chat", "--temperature=0", "--max_new_tokens=5")
    assert len(prompts) == 3
    assert len(prompts[1]) > len(prompts[0])  # the second turn carries the first
    assert prompts[2] == prompts[0]  # after /reset the conversation starts over


def test_our_checkpoint_with_a_sentencepiece_tokenizer(tmp_path, capsys):
    from prepare_data import train_sentencepiece
    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece(CORPUS, 300))
    config = doge.DogeConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = doge.Doge(config)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(config)},
               tmp_path / "ckpt_000010.pt")
    out = run(capsys, f"--out_dir={tmp_path}", "--start=the quick", "--max_new_tokens=12",
              "--temperature=0")
    assert out.out.startswith("the quick")
    with pytest.raises(SystemExit, match="no chat template"):
        sample.main([f"--out_dir={tmp_path}", "--chat"])


def test_clear_errors(tmp_path, model_dir):
    with pytest.raises(SystemExit, match="no checkpoint found: .*nowhere does not exist"):
        sample.main([f"--out_dir={tmp_path / 'nowhere'}"])
    small = tmp_path / "small"
    small.mkdir()
    (small / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    config = doge.DogeConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    doge.Doge(config).save_pretrained(small)
    with pytest.raises(SystemExit, match="tokenizer .* has 300 tokens but the model only 50"):
        sample.main([f"--init_from={small}"])
    with pytest.raises(SystemExit, match="unknown setting 'temprature'"):
        sample.main(["--temprature=0"])
    (small / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    config = dataclasses.replace(config, vocab_size=300)
    doge.Doge(config).save_pretrained(small)
    (small / "generation_config.json").write_text('{"eos_token_id": 1,')  # cut short
    with pytest.raises(SystemExit, match="generation_config.json: unreadable"):
        sample.main([f"--init_from={small}", "--max_new_tokens=2"])
    (small / "generation_config.json").write_text("[1]")
    with pytest.raises(SystemExit, match="generation_config.json: expected a JSON object"):
        sample.main([f"--init_from={small}", "--max_new_tokens=2"])

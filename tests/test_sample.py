"""sample.py: a tiny model saved as a Hugging Face directory (with a tokenizer.json and a chat
template written here) and as a train.py checkpoint, driven through main()."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import doge
import engine
import eval as eval_script
import sample
from helpers import write_bpe_tokenizer
from oracle import randomize
from tokenizer import (copy_tokenizer_files, end_of_turn_text, load_chat_template,
                       load_text_tokenizer, render_chat, stop_ids)

tokenizers = pytest.importorskip("tokenizers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


@pytest.fixture(scope="module")
def chat_dir(model_dir, tmp_path_factory):
    """model_dir with every weight random (oracle.randomize), so that replies depend on the
    conversation (at initialisation greedy replies are the same token again and again)."""
    directory = tmp_path_factory.mktemp("chat")
    copy_tokenizer_files(str(model_dir), str(directory))
    randomize(doge.Doge.from_pretrained(model_dir)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def wide_chat_dir(chat_dir, tmp_path_factory):
    """chat_dir's model with a window of 200 keys: a chat's state starts with fewer slots
    (doge.FIRST_CACHE_SLOTS, 64) and grows them during the replies, then the window fills."""
    directory = tmp_path_factory.mktemp("wide")
    copy_tokenizer_files(str(chat_dir), str(directory))
    model = doge.Doge.from_pretrained(chat_dir)
    wide = doge.Doge(dataclasses.replace(model.config, keep_window_size=200))
    wide.load_state_dict(model.state_dict())
    wide.save_pretrained(directory)
    return directory


def run(capsys, *args):
    sample.main(list(args))
    return capsys.readouterr()


def test_chat_prompt_equals_the_template_string(model_dir):
    template = load_chat_template(str(model_dir))
    messages = [{"role": "user", "content": "Hi"}]
    expected = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat(template, messages) == expected
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"), chat_template=TEMPLATE,
        bos_token="<|begin_of_text|>")
    assert reference.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True) == expected
    tokenizer = load_text_tokenizer(str(model_dir), 10 ** 6)
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
    tokenizer = load_text_tokenizer(str(directory), 10 ** 6)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    assert engine.prompt_ids(tokenizer, prompt) == expected_ids
    assert (expected_ids[0] == bos) == bos_post_processor  # the two kinds really differ
    assert engine.prompt_ids(tokenizer, "") == [bos]  # nothing to continue: a document's start
    reference = reference_class().from_pretrained(directory).eval()
    with torch.no_grad():
        generated = reference.generate(torch.tensor([expected_ids]), max_new_tokens=20,
                                       do_sample=False)[0, len(expected_ids):].tolist()
    stop = stop_ids(doge.Doge.from_pretrained(directory), tokenizer, str(directory))
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
    assert engine.prompt_ids(tokenizer, "the quick") == [2] + tokenizer.encode(["the quick"])[0]
    assert engine.prompt_ids(tokenizer, "") == [2]  # documents follow end-of-text in the shards


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
    original = engine.generate_reply
    monkeypatch.setattr(engine, "generate_reply",
                        lambda model, tok, ids, *rest: prompts.append(ids) or original(model, tok, ids, *rest))
    out = run(capsys, f"--init_from={model_dir}", "--chat", "--start=Hi", "--temperature=0",
              "--max_new_tokens=10")
    tokenizer = load_text_tokenizer(str(model_dir), 10 ** 6)
    template = load_chat_template(str(model_dir))
    expected = tokenizer.encode([render_chat(template, [{"role": "user", "content": "Hi"}])])
    assert prompts == expected
    assert out.out.endswith("\n") and "tokens/s" in out.err


def recorded_turns(monkeypatch):
    """The prompt ids and the answer of every engine.generate_reply call from now on."""
    prompts, answers = [], []
    original = engine.generate_reply

    def recording(model, tokenizer, ids, *rest):
        prompts.append(ids)
        result = original(model, tokenizer, ids, *rest)
        answers.append(result.text)
        return result

    monkeypatch.setattr(engine, "generate_reply", recording)
    return prompts, answers


def piped_chat(capsys, monkeypatch, directory, lines, *args):
    """sample.py --chat with lines piped to stdin (greedy, 8 new tokens a turn)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    return run(capsys, f"--init_from={directory}", "--chat", "--temperature=0",
               "--max_new_tokens=8", *args)


def test_chat_turns_feed_only_their_own_text(chat_dir, capsys, monkeypatch):
    """Each turn feeds the template's text for the new user message and the assistant header;
    after each reply the state holds it and the end-of-turn tokens, so the turns together are
    the template's rendering of the whole conversation. /reset starts over; an empty line is no
    message; /exit ends the chat."""
    prompts, answers = recorded_turns(monkeypatch)
    out = piped_chat(capsys, monkeypatch, chat_dir, ["Hi", "", "And then?", "/reset", "Hi",
                                                       "/exit", "never read"])
    template = load_chat_template(str(chat_dir))
    tokenizer = load_text_tokenizer(str(chat_dir), 10 ** 6)
    first = answers[0]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "And then?"}]
    so_far = render_chat(template, messages[:2], add_generation_prompt=False)
    assert prompts == [tokenizer.encode([render_chat(template, messages[:1])])[0],
                       tokenizer.encode([render_chat(template, messages)[len(so_far):]])[0],
                       tokenizer.encode([render_chat(template, messages[:1])])[0]]
    assert so_far.endswith(first + "<|eot_id|>")  # its end-of-turn: fed after the reply
    stats = [line for line in out.err.splitlines() if "tokens/s" in line]
    assert len(stats) == 3 and all(line.startswith("[8 tokens, ") for line in stats)
    # the state: each prompt, 8 generated tokens and <|eot_id|>; 16 keys (the window) in each of
    # 2 layers, each 16 key + 16 value channels + dt in float32 and an int64 position
    held = len(prompts[0]) + 8 + 1 + len(prompts[1]) + 8 + 1
    assert stats[1].endswith(f"; conversation {held} tokens, state 4.4 KB]")  # 4480 bytes
    assert stats[2] == stats[0].replace(stats[0].split()[2], stats[2].split()[2])  # after /reset


def test_an_unknown_command_lists_the_commands_and_a_double_slash_sends_a_slash(
        chat_dir, capsys, monkeypatch):
    prompts, _ = recorded_turns(monkeypatch)
    out = piped_chat(capsys, monkeypatch, chat_dir, ["/bogus now", "//etc/hosts?", "/exit"])
    template = load_chat_template(str(chat_dir))
    tokenizer = load_text_tokenizer(str(chat_dir), 10 ** 6)
    asked = [{"role": "user", "content": "/etc/hosts?"}]
    assert prompts == [tokenizer.encode([render_chat(template, asked)])[0]]
    unknown = [line for line in out.err.splitlines() if "/bogus" in line]
    assert unknown == [f"unknown command /bogus: {sample.COMMANDS}"]
    assert all(command in unknown[0] for command in ("/save FILE", "/reset", "/exit", "//text"))


def test_a_busy_machine_is_named_when_the_chat_starts(chat_dir, capsys, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 1.0, 1.0))  # busy with any core count
    out = piped_chat(capsys, monkeypatch, chat_dir, ["Hi"])
    assert out.err.startswith("note: the CPU is busy: load average 1000.0 over ")
    assert out.err.splitlines()[0].endswith("available; expect slower than the docs' figures")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 1.0, 1.0))
    assert "busy" not in piped_chat(capsys, monkeypatch, chat_dir, ["Hi"]).err


def test_piped_chat_saved_and_continued_answers_as_one_process(chat_dir, capsys, monkeypatch,
                                                               tmp_path):
    """Three turns piped in and /save, then a second process (a real one, piped: no prompt on
    its stdout) with --chat_state: its answer to a fourth turn is the one of an uninterrupted
    conversation."""
    lines = ["Hi", "", "And then?", "What now?"]
    uninterrupted = piped_chat(capsys, monkeypatch, chat_dir, lines + ["Fourth"])
    saved = tmp_path / "talk.pt"
    first = piped_chat(capsys, monkeypatch, chat_dir, lines + [f"/save {saved}"])
    assert "conversation saved" in first.err and uninterrupted.out.startswith(first.out)
    second = subprocess.run(
        [sys.executable, "sample.py", f"--init_from={chat_dir}", f"--chat_state={saved}",
         "--temperature=0", "--max_new_tokens=8"], input="Fourth\n", capture_output=True,
        text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert second.returncode == 0, second.stderr
    assert "continuing" in second.stderr and "6 messages" in second.stderr
    assert first.out + second.stdout == uninterrupted.out
    assert not second.stdout.startswith("> ")
    fresh = piped_chat(capsys, monkeypatch, chat_dir, ["Fourth"])
    assert fresh.out != second.stdout  # the answer depends on the conversation before it


TEN_TURNS = ["Hi", "how are you today?", "the quick brown fox", "and then?", "a small model",
             "jumps over the lazy dog", "hello world", "what now?", "small sentences", "bye"]


def sample_py(*args, lines=()):
    """sample.py as a user runs it, with lines piped to its stdin: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True,
                          text=True, input="".join(line + "\n" for line in lines),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("max_new_tokens, temperature", [(8, 0), (8, 0.8), (64, 0), (64, 0.8)])
def test_a_piped_chat_runs_to_its_end_while_its_state_grows(wide_chat_dir, max_new_tokens,
                                                             temperature):
    """Ten turns piped into sample.py --chat, replies short and long, greedy and sampled: the
    state grows its slots during the replies (64, 128, then the window of 200) and every turn is
    answered, its figures on a line of stderr, until the window holds the state's size."""
    code, out, err = sample_py(f"--init_from={wide_chat_dir}", "--chat",
                               f"--max_new_tokens={max_new_tokens}",
                               f"--temperature={temperature}", lines=TEN_TURNS)
    assert code == 0, err
    stats = [line for line in err.splitlines() if "tokens/s" in line]
    assert len(stats) == 10 and out.count("\n") >= 10
    held = [int(line.split("conversation ")[1].split()[0]) for line in stats]
    assert held == sorted(held) and held[-1] > 200  # past the window
    if max_new_tokens == 64:  # the window is full: 200 keys in each of 2 layers, each 16 key
        # and 16 value channels and dt in float32 and an int64 position: 56,000 bytes
        assert stats[-1].endswith("state 54.7 KB]") and stats[-2].endswith("state 54.7 KB]")


def test_a_long_piped_chat_saved_and_continued_answers_as_one_process(wide_chat_dir, tmp_path):
    """Five turns of long greedy replies and /save, then --chat_state and five more: the same
    replies as the ten turns in one process, across the growth of the state's slots."""
    args = (f"--init_from={wide_chat_dir}", "--chat", "--max_new_tokens=64", "--temperature=0")
    code, uninterrupted, err = sample_py(*args, lines=TEN_TURNS)
    assert code == 0, err
    saved = tmp_path / "talk.pt"
    code, first, err = sample_py(*args, lines=TEN_TURNS[:5] + [f"/save {saved}"])
    assert code == 0 and "conversation saved" in err, err
    code, second, err = sample_py(*args, f"--chat_state={saved}", lines=TEN_TURNS[5:])
    assert code == 0 and "continuing" in err, err
    assert first + second == uninterrupted


def test_the_demo_model_drops_keys_and_its_chat_state_stops_growing(chat_dir, capsys,
                                                                    monkeypatch, tmp_path):
    """config/doge_tiny.py (and the SFT demo, which takes its model from it) keeps fewer keys
    than a training block holds, so the mask drops keys in training; a 20-turn chat with a
    model of its shape reports the state on each turn's line, and it stops growing once the
    window is full: at 64 keys in each of 4 layers, each 2 bias heads of 32 key and 32 value
    channels and dt in float32 and an int64 position (137,216 bytes)."""
    import configurator
    import train
    demo, shape = configurator.apply_config([train.TrainConfig(), train.ModelOverrides()],
                                            [os.path.join(REPO, "config", "doge_tiny.py")])
    assert shape.keep_window_size == 64 < demo.block_size == 256
    sft, sft_shape = configurator.apply_config([train.TrainConfig(), train.ModelOverrides()],
                                               [os.path.join(REPO, "config", "sft_doge_tiny.py")])
    assert sft.init_from == demo.out_dir and sft_shape.keep_window_size is None  # inherited
    directory = tmp_path / "demo-shape"
    directory.mkdir()
    copy_tokenizer_files(str(chat_dir), str(directory))
    config = doge.Doge.from_pretrained(chat_dir).config
    torch.manual_seed(0)
    demo_shape = {key: value for key, value in dataclasses.asdict(shape).items()
                  if value is not None}  # the demo's model on chat_dir's vocabulary
    randomize(doge.Doge(dataclasses.replace(config, head_dim=None, **demo_shape))).save_pretrained(
        directory)
    out = piped_chat(capsys, monkeypatch, directory, (TEN_TURNS * 2))
    sizes = [line.split("state ")[1] for line in out.err.splitlines() if "tokens/s" in line]
    assert len(sizes) == 20 and sizes[-1] == "134.0 KB]"
    full = sizes.index("134.0 KB]")
    assert 0 < full < 10 and set(sizes[full:]) == {"134.0 KB]"}


def test_a_template_that_does_not_extend_re_encodes_each_turn(chat_dir, capsys, monkeypatch,
                                                               tmp_path):
    """A template that closes a finished conversation with <|end_of_text|>: a longer one's text
    does not extend it. One line says so at start, and every turn feeds the whole conversation."""
    directory = tmp_path / "closing"
    shutil.copytree(chat_dir, directory)
    closing = TEMPLATE.replace("{% endif %}", "{% else %}{{ '<|end_of_text|>' }}{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": closing, "bos_token": "<|begin_of_text|>"}))
    prompts, answers = recorded_turns(monkeypatch)
    out = piped_chat(capsys, monkeypatch, directory, ["Hi", "And then?"])
    assert out.err.count("re-encodes the whole conversation") == 1
    template = load_chat_template(str(directory))
    tokenizer = load_text_tokenizer(str(directory), 10 ** 6)
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": answers[0]},
                {"role": "user", "content": "And then?"}]
    assert prompts[1] == tokenizer.encode([render_chat(template, messages)])[0]
    assert end_of_turn_text(load_chat_template(str(chat_dir))) == "<|eot_id|>"


def test_chat_state_errors_are_one_line(chat_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match=r"--chat_state=\S*nowhere.pt: no such file$"):
        piped_chat(capsys, monkeypatch, chat_dir, [], f"--chat_state={tmp_path / 'nowhere.pt'}")
    other = tmp_path / "other"
    shutil.copytree(chat_dir, other)
    config = doge.Doge.from_pretrained(chat_dir).config
    doge.Doge(dataclasses.replace(config, keep_window_size=8)).save_pretrained(other)
    narrow = tmp_path / "narrow.pt"
    piped_chat(capsys, monkeypatch, other, ["Hi", f"/save {narrow}"])
    with pytest.raises(SystemExit) as e:
        piped_chat(capsys, monkeypatch, chat_dir, [], f"--chat_state={narrow}")
    fingerprints = [doge.model_fingerprint(doge.Doge.from_pretrained(d)) for d in (other, chat_dir)]
    assert str(e.value) == (
        f"error: --chat_state={narrow} was made by {other} (fingerprint {fingerprints[0]}), not by "
        f"this model, {chat_dir} (fingerprint {fingerprints[1]}): give --init_from={other}, or "
        f"leave --init_from and --out_dir out")
    saved = torch.load(narrow)
    del saved["model"]  # a file from before states recorded their model: the shape decides
    torch.save(saved, narrow)
    with pytest.raises(SystemExit, match=r"narrow.pt: the state was made by a model of another "
                                         r"shape: keep_window_size 8 there, 16 here$"):
        piped_chat(capsys, monkeypatch, chat_dir, [], f"--chat_state={narrow}")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(SystemExit, match=r"text.pt: not a saved conversation \(\w+\)$"):
        piped_chat(capsys, monkeypatch, chat_dir, [], f"--chat_state={tmp_path / 'text.pt'}")
    out = piped_chat(capsys, monkeypatch, chat_dir, ["/save", f"/save {tmp_path / 'no/such.pt'}"])
    assert "/save needs a file name" in out.err and "No such file or directory" in out.err


def test_a_chat_state_alone_reopens_the_model_that_made_it(chat_dir, capsys, monkeypatch,
                                                          tmp_path):
    """The file records the model as given and its fingerprint; --chat_state=FILE alone goes on
    with that model, as --init_from with it does."""
    saved = tmp_path / "talk.pt"
    piped_chat(capsys, monkeypatch, chat_dir, ["Hi", f"/save {saved}"])
    record = torch.load(saved)["model"]
    assert record == {"path": str(chat_dir),
                      "fingerprint": doge.model_fingerprint(doge.Doge.from_pretrained(chat_dir))}
    given = piped_chat(capsys, monkeypatch, chat_dir, ["And then?"], f"--chat_state={saved}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("And then?\n"))
    alone = run(capsys, f"--chat_state={saved}", "--temperature=0", "--max_new_tokens=8")
    assert f"loaded {chat_dir}" in alone.err and "continuing" in alone.err
    assert alone.out == given.out


def test_the_fingerprint_tells_models_apart_whatever_their_dtype():
    config = doge.DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = randomize(doge.Doge(config))
    fingerprint = doge.model_fingerprint(model)
    assert len(fingerprint) == 16
    bfloat16 = doge.Doge(config).to(torch.bfloat16)
    bfloat16.load_state_dict(model.state_dict())
    assert doge.model_fingerprint(bfloat16) == fingerprint
    with torch.no_grad():
        bfloat16.norm.weight[0] += 0.5
    assert doge.model_fingerprint(bfloat16) != fingerprint
    other = doge.Doge(dataclasses.replace(config, keep_window_size=8))
    other.load_state_dict(model.state_dict())  # the same weights, another config
    assert doge.model_fingerprint(other) != fingerprint


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


def files_of(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def test_reading_commands_skip_a_damaged_checkpoint_and_rename_nothing(tmp_path, capsys,
                                                                        monkeypatch):
    """Doge.from_pretrained, sample.py and eval.py on an out_dir: a damaged newest checkpoint is
    skipped with a warning that quotes the error whole, on one line; with no intact one left,
    one line says so. Every file stays as it was (only train.py's resume sets one aside)."""
    config = doge.DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = doge.Doge(config)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(config)},
               tmp_path / "ckpt_000010.pt")
    (tmp_path / "ckpt_000020.pt").write_bytes((tmp_path / "ckpt_000010.pt").read_bytes()[:500])
    before = files_of(tmp_path)
    capsys.readouterr()
    loaded = doge.Doge.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  model.state_dict().values()))
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith(
        f"warning: skipping {tmp_path / 'ckpt_000020.pt'}: cannot be read: ")
    assert files_of(tmp_path) == before

    os.remove(tmp_path / "ckpt_000010.pt")
    before = files_of(tmp_path)
    expected = (f"error: {tmp_path}: its only checkpoint, ckpt_000020.pt, is damaged "
                f"(cannot be read: ")
    for main in (sample.main, eval_script.main):
        with pytest.raises(SystemExit) as e:
            main([f"--out_dir={tmp_path}" if main is sample.main else f"--init_from={tmp_path}"])
        assert str(e.value).startswith(expected) and "\n" not in str(e.value)
        assert capsys.readouterr().err == "" and files_of(tmp_path) == before

    def failing_load(*args, **kwargs):  # an error of several lines, quoted whole on one
        raise RuntimeError("the first line\n  and the second, where the cause is.")
    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(ValueError, match=r"\(cannot be read: RuntimeError: the first line and the "
                                         r"second, where the cause is\.\)$"):
        doge.Doge.from_pretrained(tmp_path)

"""Hub names wherever a path goes: which names are fetched, which files, and the one-line errors.
A local function stands in for huggingface_hub's download: nothing here reaches the network."""

import fnmatch
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import doge
import eval as eval_script
import sample
import train
from helpers import one_thread, write_bpe_tokenizer  # noqa: F401  (one_thread: a fixture)
from oracle import randomize, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what else a published repository holds besides a Doge's own files: none of it is wanted
OTHER_FILES = ["README.md", ".gitattributes", "configuration_doge.py", "modeling_doge.py",
               "special_tokens_map.json", "training_args.bin", "onnx/model.onnx",
               "optimizer.pt"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub: hub.repos maps a repository id to its directory of files; doge.hub_snapshot
    is replaced by a copy, into a cache directory, of the files that match the patterns (as
    huggingface_hub matches allow_patterns, with fnmatch). hub.calls lists (repo, revision)."""
    state = types.SimpleNamespace(repos={}, calls=[])

    def snapshot(repo_id, revision, patterns):
        state.calls.append((repo_id, revision))
        source = state.repos[repo_id]
        target = tmp_path / "cache" / repo_id / (revision or "main")
        for root, _, names in os.walk(source):
            for name in names:
                relative = os.path.relpath(os.path.join(root, name), source)
                if any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
                    os.makedirs(target / os.path.dirname(relative), exist_ok=True)
                    shutil.copyfile(os.path.join(root, name), target / relative)
        os.makedirs(target, exist_ok=True)
        return str(target)

    monkeypatch.setattr(doge, "hub_snapshot", snapshot)
    return state


def publish(directory, weights=("model.safetensors",)):
    """A repository as published: a tiny Doge with a tokenizer.json, its weights in the given
    files (pytorch_model.bin, safetensors shards), and OTHER_FILES. Returns the model."""
    vocab_size = write_bpe_tokenizer(directory, ["hello world, a hub", "of small models"] * 5,
                                     ["<|end_of_text|>"], 280)
    torch.manual_seed(0)
    model = randomize(doge.Doge(tiny_config(vocab_size=vocab_size))).eval()
    model.save_pretrained(directory)
    state = {doge.hf_name(name): tensor for name, tensor in model.state_dict().items()
             if name != "lm_head.weight"}
    if "pytorch_model.bin" in weights:
        torch.save(state, directory / "pytorch_model.bin")
    if "model.safetensors" not in weights:
        os.remove(directory / "model.safetensors")
    for name in OTHER_FILES + [w for w in weights if "-of-" in w or w.endswith(".json")]:
        os.makedirs(os.path.dirname(directory / name), exist_ok=True)
        (directory / name).write_text("{}")
    return model


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


WEIGHTS = {  # the repository's weight files -> the ones fetched
    "safetensors and bin": (("model.safetensors", "pytorch_model.bin"), ["model.safetensors"]),
    "bin only": (("pytorch_model.bin",), ["pytorch_model.bin"]),
    "shards": (("model.safetensors", "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors", "model.safetensors.index.json"),
               ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                "model.safetensors", "model.safetensors.index.json"]),
}


def test_every_tokenizer_file_is_fetched_with_the_model():
    """doge.py names the tokenizer's files itself (it imports nothing of ours): every file that
    tokenizer.py reads or exports must be among those a hub name fetches."""
    import tokenizer
    assert set(tokenizer.TOKENIZER_FILES) <= set(doge.HUB_FILES)


@pytest.mark.parametrize("case", WEIGHTS)
def test_only_what_a_doge_needs_is_fetched(tmp_path, hub, case):
    pytest.importorskip("tokenizers")
    weights, fetched = WEIGHTS[case]
    (tmp_path / "repo").mkdir()
    hub.repos["SmallDoge/Doge-20M"] = tmp_path / "repo"
    published = publish(tmp_path / "repo", weights)
    directory = doge.local_model_path("SmallDoge/Doge-20M")
    found = sorted(os.path.relpath(os.path.join(root, name), directory)
                   for root, _, names in os.walk(directory) for name in names)
    assert found == sorted(["config.json", "generation_config.json", "tokenizer.json", *fetched])
    if case != "shards":  # the shards here are stand-ins
        assert same_weights(doge.Doge.from_pretrained("SmallDoge/Doge-20M"), published)


def test_names_and_revisions_resolve_and_a_local_path_wins(tmp_path, hub, monkeypatch):
    for name in ("SmallDoge/Doge-20M", "owner/other.model_v2"):
        hub.repos[name] = tmp_path / "empty"
    os.makedirs(tmp_path / "empty")
    doge.local_model_path("SmallDoge/Doge-20M@v1.0")
    doge.local_model_path("owner/other.model_v2@refs/pr/3")
    # no safetensors in the snapshot: a second call for pytorch_model.bin alone
    assert hub.calls == [("SmallDoge/Doge-20M", "v1.0")] * 2 + [
        ("owner/other.model_v2", "refs/pr/3")] * 2
    monkeypatch.chdir(tmp_path)
    os.makedirs("SmallDoge/Doge-20M")
    assert doge.local_model_path("SmallDoge/Doge-20M") == "SmallDoge/Doge-20M"
    assert len(hub.calls) == 4


@pytest.mark.parametrize("name", ["missing", "a/b/c", "owner/na--me", "owner/name.", "owner/name@",
                                  "-owner/name", "owner/na me"])
def test_neither_a_path_nor_a_hub_name_is_refused_in_one_line(hub, name):
    with pytest.raises(FileNotFoundError, match=r"no such file or directory, nor a hub name") as e:
        doge.Doge.from_pretrained(name)
    assert "\n" not in str(e.value) and hub.calls == []


@pytest.mark.parametrize("name, nearest", [
    ("out/nonexistent", ""), ("out/doge-tiy", "; the nearest in out: doge-tiny"),
    ("./out/doge-tiny/ckpt_000004.pt", "; the nearest in ./out/doge-tiny: ckpt_000040.pt"),
    ("data/default", ""), ("/no/such/dir", ""), ("../x", ""), ("~/no-such-doge", ""),
    ("SmallDoge/Doge-20M", "; the nearest in SmallDoge: Doge-20M-Instruct")])
def test_a_local_typo_never_goes_to_the_hub(tmp_path, hub, monkeypatch, name, nearest):
    """A name whose first part is a directory here, or that starts with '.', '/' or '~', is a
    local path: missing, one line says so, with the closest names of its directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "data"))  # an empty home: nothing near there
    hub.repos["SmallDoge/Doge-20M"] = tmp_path / "empty"
    for directory in ("out/doge-tiny", "out/doge-20m-long", "data", "SmallDoge/Doge-20M-Instruct"):
        os.makedirs(directory)
    (tmp_path / "out/doge-tiny/ckpt_000040.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        doge.local_model_path(name)
    assert str(e.value) == f"{name}: no such file or directory{nearest}" and hub.calls == []
    with pytest.raises(SystemExit) as e:
        sample.main([f"--init_from={name}"])
    assert str(e.value) == f"error: --init_from={name}: no such file or directory{nearest}"


def test_without_huggingface_hub_one_line_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError) as e:
        doge.local_model_path("SmallDoge/Doge-20M@v1.0")
    message = str(e.value)
    assert "\n" not in message and "pip install huggingface_hub" in message
    assert "hf download SmallDoge/Doge-20M --revision v1.0 --local-dir DIR" in message


def test_offline_sample_py_stops_with_one_line(tmp_path):
    """The real huggingface_hub (or its absence) with HF_HUB_OFFLINE=1 and an empty cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "sample.py", "--init_from=SmallDoge/Doge-20M"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stdout == ""
    lines = [line for line in result.stderr.strip().splitlines()  # a busy machine adds a note
             if not line.startswith("note: the CPU is busy")]
    assert len(lines) == 1 and lines[0].startswith("error: --init_from=SmallDoge/Doge-20M is no ")
    assert "hf download SmallDoge/Doge-20M --local-dir DIR" in lines[0]


def test_sample_eval_and_train_take_hub_names(tmp_path, hub, capsys):
    pytest.importorskip("tokenizers")
    (tmp_path / "repo").mkdir()
    hub.repos["SmallDoge/Doge-20M"] = tmp_path / "repo"
    published = publish(tmp_path / "repo")
    sample.main(["--init_from=SmallDoge/Doge-20M", "--start=hello", "--max_new_tokens=3",
                 "--temperature=0"])
    assert capsys.readouterr().out.startswith("hello")
    (tmp_path / "text.txt").write_text("hello world, a hub of small models")
    eval_script.main(["--init_from=SmallDoge/Doge-20M", "--task=bpb", f"--data={tmp_path}/text.txt"])
    assert '"task": "bpb"' in capsys.readouterr().out
    cfg = train.TrainConfig(init_from="SmallDoge/Doge-20M")
    model, _ = train.load_model(cfg, {}, {}, types.SimpleNamespace(say=print))
    assert same_weights(model, published)
    with pytest.raises(SystemExit, match="init_from is not 'scratch' or 'resume', and a/b/c: no"):
        train.load_model(train.TrainConfig(init_from="a/b/c"), {}, {}, None)

"""train.py and configurator.py on CPU with tiny models: learning, exact resume, branching a WSD
decay, DDP equality (two gloo processes), the schedule, config errors, shard errors, checkpoints."""

import dataclasses
import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from configurator import apply_config  # noqa: E402
from helpers import ctrl_c_as_in_a_terminal, one_thread  # noqa: E402,F401 (fixtures)
from prepare_data import ShardLoader, read_shard  # noqa: E402
from train import TrainConfig, latest_checkpoint, list_checkpoints, wsd_lr  # noqa: E402

VOCAB = 256
TINY = ["--model=None", f"--vocab_size={VOCAB}", "--hidden_size=32", "--intermediate_size=64",
        "--num_hidden_layers=2", "--num_attention_heads=2", "--num_key_value_heads=1",
        "--block_size=32", "--batch_size=4", "--total_batch_size=256",  # 2 micro-steps
        "--learning_rate=1e-2", "--warmup_iters=2", "--decay_iters=0", "--eval_iters=2",
        "--log_interval=1", "--eval_interval=0", "--save_interval=0", "--device=cpu",
        "--compile=False", "--seed=0"]


# ----------------------------------------------------------------------------------------------
# helpers


def write_shard(path, tokens):
    """The shard format (docs/reference.md, Shard format): 256 int32 header [magic, 1, count],
    uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def markov_stream(length, seed):
    """A learnable stream: the next token is a fixed function of the previous one 80% of the
    time, uniform otherwise (entropy about 1.6 nats, against ln 256 = 5.5 for a blind guess)."""
    rng = np.random.default_rng(seed)
    successor = np.random.default_rng(0).permutation(VOCAB)
    tokens = np.empty(length, dtype=np.int64)
    tokens[0] = 0
    noise = rng.random(length) < 0.2
    random_tokens = rng.integers(0, VOCAB, length)
    for i in range(1, length):
        tokens[i] = random_tokens[i] if noise[i] else successor[tokens[i - 1]]
    return tokens


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_shard(directory / "synth_val_000000.bin", markov_stream(20_000, seed=1))
    write_shard(directory / "synth_train_000001.bin", markov_stream(60_000, seed=2))
    write_shard(directory / "synth_train_000002.bin", markov_stream(50_000, seed=3))
    return str(directory)


def run(data_dir, out_dir, *args):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *args])
    return read_log(out_dir)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def one_line_exit(excinfo):
    message = str(excinfo.value.code)
    assert "\n" not in message and message.startswith("error:"), message
    return message


# ----------------------------------------------------------------------------------------------
# the schedule


def test_wsd_boundaries():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, decay_iters=20, learning_rate=1.0,
                      min_lr_ratio=0.1)
    assert wsd_lr(0, cfg) == pytest.approx(0.1)  # warmup starts at lr / warmup_iters
    assert wsd_lr(4, cfg) == pytest.approx(0.5)
    assert wsd_lr(9, cfg) == pytest.approx(1.0)  # warmup done
    assert wsd_lr(10, cfg) == wsd_lr(50, cfg) == wsd_lr(79, cfg) == 1.0  # stable
    assert wsd_lr(80, cfg) == pytest.approx(1.0)  # the decay starts from the full rate
    assert wsd_lr(90, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert wsd_lr(99, cfg) == pytest.approx(0.1 + 0.9 / 20)
    assert wsd_lr(100, cfg) == pytest.approx(0.1)  # ends at min_lr_ratio * learning_rate
    lrs = [wsd_lr(step, cfg) for step in range(101)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    # no warmup, no decay: constant; to zero by default
    assert wsd_lr(0, TrainConfig(warmup_iters=0, learning_rate=2.0)) == 2.0
    flat = TrainConfig(max_iters=10, warmup_iters=0, decay_iters=0, learning_rate=2.0)
    assert [wsd_lr(s, flat) for s in range(10)] == [2.0] * 10
    assert wsd_lr(8000, TrainConfig()) == 0.0 and wsd_lr(7200, TrainConfig()) == 8e-3
    # a decay longer than the run (e.g. --max_iters=20 on a config made for more) starts at once
    short = TrainConfig(max_iters=20, warmup_iters=0, decay_iters=60, learning_rate=1.0)
    assert wsd_lr(0, short) == 1.0 and wsd_lr(10, short) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# configuration


def test_configurator_types_and_sources(tmp_path):
    config_file = tmp_path / "conf.py"
    config_file.write_text("import math\n_scratch = 3\nmax_iters = 2 * 50\n"
                           "learning_rate = 1  # an int is fine for a float\nout_dir = 'out/x'\n")
    cfg = apply_config(TrainConfig(), [str(config_file), "--max_iters=7", "--compile",
                                       "--data_dir=some/dir", "--resume_ckpt=None",
                                       "--wandb_run_name='1e3'", "--out_dir=1e3"])
    assert cfg.max_iters == 7  # the command line comes after the file
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.compile is True and cfg.data_dir == "some/dir" and cfg.resume_ckpt is None
    assert cfg.wandb_run_name == "1e3" and cfg.out_dir == "1e3"
    assert TrainConfig().max_iters == 8000  # the defaults are untouched
    # dicts, None defaults and several targets at once
    settings, other = apply_config([{"a": 1, "b": None}, {"c": (0.9, 0.95)}],
                                   ["--b={'x': 1}", "--c=[0.8, 0.9]"])
    assert settings == {"a": 1, "b": {"x": 1}} and other == {"c": (0.8, 0.9)}


@pytest.mark.parametrize("argv, words", [
    (["--max_itres=5"], ["unknown setting 'max_itres'", "did you mean max_iters or"]),
    (["--learning_rat=1e-3"], ["did you mean learning_rate?"]),
    (["--xyzzy=1"], ["unknown setting 'xyzzy'", "--help lists them all"]),
    (["--max_iters=abc"], ["'max_iters'", "expected int", "'abc'"]),
    (["--max_iters=1.5"], ["expected int"]),
    (["--wandb_log=1"], ["expected bool"]),
    (["--learning_rate=fast"], ["expected float"]),
    (["--hidden_size=big"], ["'hidden_size'", "expected int"]),
    (["max_iters=5"], ["unexpected argument"]),
    (["missing_config.py"], ["not found", "doge_20m.py", "doge_tiny.py", "sft_doge_tiny.py"]),
])
def test_config_errors_are_one_line(argv, words):
    with pytest.raises(SystemExit) as excinfo:
        apply_config([TrainConfig(), train.ModelOverrides()], argv)
    message = one_line_exit(excinfo)
    for word in words:
        assert word in message
    assert "unknown setting" not in message or len(message) < 160  # the closest keys only


def test_config_file_errors(tmp_path):
    unknown = tmp_path / "unknown.py"
    unknown.write_text("max_iters = 10\nlearnin_rate = 0.1\n")
    with pytest.raises(SystemExit) as excinfo:
        apply_config(TrainConfig(), [str(unknown)])
    assert "'learnin_rate'" in one_line_exit(excinfo) and "unknown.py" in str(excinfo.value)
    broken = tmp_path / "broken.py"
    broken.write_text("max_iters = (\n")
    with pytest.raises(SystemExit) as excinfo:
        apply_config(TrainConfig(), [str(broken)])
    assert "SyntaxError" in one_line_exit(excinfo)


def test_main_refuses_bad_settings(tmp_path, data_dir):
    cases = [(["--nope=1"], ["unknown setting", "--help"]),
             (["--total_batch_size=200"], ["total_batch_size 200", "multiple"]),
             (["--dtype=float16"], ["dtype"]),
             (["--model=doge-7b"], ["unknown model preset", "doge-20m"]),
             (["--num_attention_heads=3"], ["model settings"]),
             (["--init_from=resume"], ["no checkpoint"]),
             (["--device=gpu"], ["device 'gpu'", "cuda:N"]),
             (["--sft_epochs=2"], ["sft_epochs", "token stream"])]
    if not torch.cuda.is_available():
        cases.append((["--device=cuda"], ["device 'cuda'", "no CUDA GPU"]))
    for args, words in cases:
        with pytest.raises(SystemExit) as excinfo:
            run(data_dir, tmp_path / "bad", *args)
        message = one_line_exit(excinfo)
        assert all(word in message for word in words), message


def test_every_config_file_is_valid():
    config_dir = os.path.join(ROOT, "config")
    names = sorted(n for n in os.listdir(config_dir) if n.endswith(".py"))
    assert {"doge_tiny.py", "doge_20m.py", "doge_60m.py", "doge_160m.py",
            "doge_320m.py", "doge_40m_moe.py"} <= set(names)
    for name in names:
        cfg, model = apply_config([TrainConfig(), train.ModelOverrides()],
                                  [os.path.join(config_dir, name)])
        train.check_config(cfg)
        assert cfg.total_batch_size % (cfg.batch_size * cfg.block_size) == 0, name
        overrides = {k: v for k, v in vars(model).items() if v is not None}
        preset = train.PRESETS[cfg.model] if cfg.model else {}
        train.DogeConfig(**{**preset, **overrides})  # a valid model
    recipe = apply_config(TrainConfig(), [os.path.join(config_dir, "doge_20m.py")])
    assert (recipe.max_iters, recipe.total_batch_size, recipe.block_size, recipe.learning_rate,
            recipe.warmup_iters, recipe.decay_iters, recipe.min_lr_ratio, recipe.weight_decay,
            recipe.beta1, recipe.beta2, recipe.adam_eps, recipe.grad_clip, recipe.dtype,
            recipe.compile) == (8000, 524288, 2048, 8e-3, 800, 800, 0.0, 0.01, 0.9, 0.95, 1e-8,
                                1.0, "bfloat16", True)


# ----------------------------------------------------------------------------------------------
# data


def test_truncated_shard_is_a_clear_error(tmp_path):
    write_shard(tmp_path / "t_val_000000.bin", markov_stream(5000, 1))
    write_shard(tmp_path / "t_train_000001.bin", markov_stream(5000, 2))
    path = tmp_path / "t_train_000001.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SystemExit) as excinfo:
        run(tmp_path, tmp_path / "out")
    message = one_line_exit(excinfo)
    assert "t_train_000001.bin" in message and "truncated" in message


def test_every_process_refuses_a_token_outside_the_vocabulary(tmp_path):
    """A token id the model has no embedding for is refused by every process at the same step
    (the whole shard is checked when it is first read), not only by the one whose rows hold it:
    under DDP the others would wait in the next all-reduce."""
    tokens = markov_stream(5000, 2)
    tokens[-1] = VOCAB + 3  # in the last sequence of the shard
    write_shard(tmp_path / "t_train_000000.bin", tokens)
    for rank in range(2):
        loader = ShardLoader(tmp_path, "train", 2, 32, rank, 2, VOCAB)
        with pytest.raises(ValueError, match=f"token id {VOCAB + 3}, outside the model's vocab"):
            loader.next_batch(1)


def test_missing_data_dir_says_how_to_make_it(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        run(tmp_path / "nowhere", tmp_path / "out")
    assert "prepare_data.py" in one_line_exit(excinfo)


def test_loader_is_the_same_stream_for_any_number_of_processes(data_dir):
    """One process with 4 micro-steps reads what 2 processes with 2 micro-steps each read, or
    4 processes with one, crossing shards the same way; the order is shuffled (a batch is not
    one stretch of text) but fixed by the seed, and every sequence of a shard comes once."""
    def rows(world, micro_steps, steps=40):
        loaders = [ShardLoader(data_dir, "train", 16, 32, rank, world, VOCAB)
                   for rank in range(world)]
        out = []
        for _ in range(steps):
            batches = [loader.next_batch(micro_steps) for loader in loaders]
            for m in range(micro_steps):  # the window's rows in order: m * world + rank
                out += [np.concatenate((x[m], y[m][:, -1:]), axis=1) for x, y in batches]
        return np.stack(out), loaders[0].state_dict()
    single, state = rows(1, 4)
    assert np.array_equal(single, rows(2, 2)[0]) and np.array_equal(single, rows(4, 1)[0])
    assert state["shard"] == 1 and state["epoch"] == 0  # moved to the second shard
    x, y = ShardLoader(data_dir, "train", 2, 16, 0, 1, VOCAB).next_batch(1)
    assert np.array_equal(x[0, :, 1:], y[0, :, :-1])  # targets are the next tokens
    # shuffled: 1874 sequences of 32 in the first shard, each once, not in order
    loader = ShardLoader(data_dir, "train", 2, 32, 0, 1, VOCAB, seed=5)
    shard = read_shard(loader.paths[0])
    start_of = {shard[i:i + 32].astype(np.int64).tobytes(): i for i in range(0, 1874 * 32, 32)}
    starts = [start_of[sequence.tobytes()]
              for _ in range(1874 // 2) for sequence in loader.next_batch(1)[0][0]]
    assert sorted(starts) == list(range(0, 1874 * 32, 32)) and starts != sorted(starts)
    again = ShardLoader(data_dir, "train", 2, 32, 0, 1, VOCAB, seed=5).next_batch(1)
    other = ShardLoader(data_dir, "train", 2, 32, 0, 1, VOCAB, seed=6).next_batch(1)
    assert start_of[again[0][0, 0].tobytes()] == starts[0]
    assert not np.array_equal(again[0], other[0])


# ----------------------------------------------------------------------------------------------
# training


def test_loss_falls_on_held_out_data(tmp_path, data_dir):
    records = run(data_dir, tmp_path / "out", "--max_iters=150", "--warmup_iters=10",
                  "--decay_iters=30", "--eval_interval=50", "--eval_iters=4")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 50, 100, 150]
    assert val[0] > 5.0  # about ln 256 at initialisation
    assert val[150] < 2.5 and val[150] < 0.5 * val[0]
    last = records[-1]
    assert {"step", "loss", "lr", "tokens_per_sec", "val_loss", "mfu"} <= set(last)
    assert last["tokens"] == 150 * 256
    assert os.path.isfile(tmp_path / "out" / "ckpt_000150.pt")  # the end always saves
    assert not os.path.exists(tmp_path / "out" / "tokenizer.model")  # the data has none
    run_record = os.listdir(tmp_path / "out" / "runs")
    with open(tmp_path / "out" / "runs" / run_record[0]) as f:
        record = json.load(f)
    # the source of every module of ours that a train.py process imports
    listing = ("import os, sys, train; print(*(os.path.basename(m.__file__) for m in list("
               "sys.modules.values()) if os.path.dirname(getattr(m, '__file__', None) or '') == "
               "os.getcwd()))")
    imported = subprocess.run([sys.executable, "-c", listing], cwd=ROOT, capture_output=True,
                              text=True).stdout.split()
    assert set(record["source"]) == set(imported) >= {"train.py", "doge.py", "common.py"}
    assert record["versions"]["torch"] == torch.__version__


def test_stop_and_resume_equals_uninterrupted(tmp_path, data_dir, monkeypatch,
                                              ctrl_c_as_in_a_terminal):
    """Ctrl-C during step 5 saves ckpt_000005 and stops; resuming then matches a run that was
    never stopped exactly: every loss, the final weights and optimizer state. Dropout is on, so
    the RNG state has to come back too. A log line cut short by a crash is dropped on resume."""
    args = ["--max_iters=9", "--decay_iters=4", "--hidden_dropout=0.1", "--eval_interval=3"]
    full = run(data_dir, tmp_path / "full", *args)

    real_wsd_lr = train.wsd_lr

    def interrupt_at_step_4(step, cfg):
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # handled before it returns: no race
        return real_wsd_lr(step, cfg)
    monkeypatch.setattr(train, "wsd_lr", interrupt_at_step_4)
    handler = signal.getsignal(signal.SIGINT)
    run(data_dir, tmp_path / "part", *args)
    monkeypatch.setattr(train, "wsd_lr", real_wsd_lr)
    assert sorted(os.listdir(tmp_path / "part"))[:1] == ["ckpt_000005.pt"]
    assert not os.path.exists(tmp_path / "part" / "ckpt_000009.pt")
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are restored

    with open(tmp_path / "part" / "log.jsonl", "a") as f:
        f.write('{"step": 6, "tokens": 15')  # a record cut short, as by a kill in mid-write
    resumed = run(data_dir, tmp_path / "part", *args, "--init_from=resume")
    assert losses(resumed) == losses(full) and len(losses(full)) == 9
    assert [r.get("val_loss") for r in resumed if r["step"] > 5] == \
        [r.get("val_loss") for r in full if r["step"] > 5]
    a, b = load(tmp_path / "full" / "ckpt_000009.pt"), load(tmp_path / "part" / "ckpt_000009.pt")
    assert_same_tensors(a["model"], b["model"])
    for key in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][key], b["optimizer"]["state"][key])
    assert a["data_position"] == b["data_position"] and a["step"] == b["step"] == 9
    assert set(a) >= {"model", "model_config", "optimizer", "step", "train_config",
                      "data_position", "rng"}


@pytest.mark.parametrize("logged", [True, False])
def test_a_diverging_run_stops_without_saving_nan_weights(tmp_path, data_dir, logged):
    """lr 30 without clipping turns this model's weights to nan at step 3 (2 steps of warm-up
    towards it are still finite). Logged every step, the loss reveals it; logged only at the end,
    the check before each save must."""
    out_dir = tmp_path / "diverged"
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, out_dir, "--learning_rate=30", "--warmup_iters=20", "--max_iters=40",
            "--grad_clip=0", "--save_interval=1" if not logged else "--save_interval=2",
            "--log_interval=1" if logged else "--log_interval=1000")
    message = one_line_exit(excinfo)
    checkpoints = sorted(out_dir.glob("ckpt_*.pt"))
    assert checkpoints, "the steps before the divergence saved checkpoints"
    for path in checkpoints:
        weights = torch.load(path, weights_only=False)["model"]
        assert all(tensor.isfinite().all() for tensor in weights.values()), path
    assert "diverged at step" in message and "nan" in message and str(checkpoints[-1]) in message
    assert "learning_rate" in message and "grad_clip" in message
    diverged_at = int(message.split("step ")[1].split(":")[0])
    records = [record for record in read_log(out_dir) if "loss" in record]
    assert all(record["step"] < diverged_at for record in records[:-1])  # it stopped right there
    if logged:  # the step that diverged is the log's last record
        assert records[-1]["step"] == diverged_at and not math.isfinite(records[-1]["loss"])


def test_branching_a_decay_from_a_stable_checkpoint(tmp_path, data_dir):
    """A long constant-rate run saved at step 8; a decay branched from there with new
    max_iters/decay_iters is exactly the run that planned that decay from the start."""
    stable = tmp_path / "stable"
    run(data_dir, stable, "--max_iters=12", "--decay_iters=0", "--save_interval=4")
    branch = run(data_dir, tmp_path / "branch", "--init_from=resume",
                 f"--resume_ckpt={stable / 'ckpt_000008.pt'}", "--max_iters=11", "--decay_iters=3")
    planned = run(data_dir, tmp_path / "planned", "--max_iters=11", "--decay_iters=3")
    assert sorted(losses(branch)) == [9, 10, 11]
    assert [losses(branch)[s] for s in (9, 10, 11)] == [losses(planned)[s] for s in (9, 10, 11)]
    assert [r["lr"] for r in branch] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert_same_tensors(load(tmp_path / "branch" / "ckpt_000011.pt")["model"],
                        load(tmp_path / "planned" / "ckpt_000011.pt")["model"])
    # branching into the stable run's own directory would mix two schedules' checkpoints
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, stable, "--init_from=resume", f"--resume_ckpt={stable / 'ckpt_000008.pt'}",
            "--max_iters=11", "--decay_iters=3")
    assert "new out_dir" in one_line_exit(excinfo)


def test_the_tokenizer_goes_beside_the_checkpoints(tmp_path, data_dir):
    """sample.py looks for the tokenizer in out_dir."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "tokenizer.model").write_bytes(b"a sentencepiece model")
    run(data, tmp_path / "out", "--max_iters=1")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"a sentencepiece model"


def test_a_new_run_never_mixes_with_an_old_one(tmp_path, data_dir):
    out = tmp_path / "out"
    run(data_dir, out, "--max_iters=3", "--save_interval=1")
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, out, "--max_iters=2")
    assert "overwrite=True" in one_line_exit(excinfo)
    records = run(data_dir, out, "--max_iters=2", "--overwrite")
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == \
        ["ckpt_000002.pt"]  # the old run's ckpt_000001 and ckpt_000003 are gone
    assert [r["step"] for r in records] == [0, 1, 2]  # and so is its log
    # a run that stopped before its first checkpoint left only its log: that is a run too
    for name in os.listdir(out):
        if name.startswith("ckpt"):
            os.remove(out / name)
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, out, "--max_iters=1")
    assert "log.jsonl" in one_line_exit(excinfo) and "overwrite=True" in one_line_exit(excinfo)
    assert [r["step"] for r in run(data_dir, out, "--max_iters=1", "--overwrite")] == [0, 1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ddp_processes_match_one(tmp_path, data_dir):
    """Two gloo processes with a micro-step each see the same tokens as one process with two
    micro-steps, so the losses (means over all micro-batches and processes) agree."""
    args = [f"--data_dir={data_dir}", *TINY, "--max_iters=6", "--eval_interval=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               os.path.join(ROOT, "train.py"), *args, f"--out_dir={tmp_path / 'ddp'}"]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = read_log(tmp_path / "ddp")
    single = run(data_dir, tmp_path / "single", "--max_iters=6", "--eval_interval=3",
                 "--eval_iters=4")  # 2 processes x 2 validation batches
    assert sorted(losses(ddp)) == list(range(1, 7))
    for step, loss in losses(single).items():
        assert losses(ddp)[step] == pytest.approx(loss, abs=1e-5), step
    val_single = [r["val_loss"] for r in single if "val_loss" in r]
    val_ddp = [r["val_loss"] for r in ddp if "val_loss" in r]
    assert val_ddp == pytest.approx(val_single, abs=1e-5) and len(val_ddp) == 3
    a, b = load(tmp_path / "ddp" / "ckpt_000006.pt"), load(tmp_path / "single" / "ckpt_000006.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4)
    assert len(a["rng"]) == 2  # each process's RNG state


def test_bfloat16_autocast_and_moe_train(tmp_path, data_dir):
    """The GPU settings that also run on a CPU: bf16 autocast (weights stay float32), and a
    CDMoE model from scratch, whose training loss includes the load-balancing term."""
    records = run(data_dir, tmp_path / "bf16", "--max_iters=3", "--dtype=bfloat16",
                  "--is_moe=True", "--num_experts=16", "--num_experts_per_tok=2")
    assert all(np.isfinite(loss) for loss in losses(records).values())
    saved = load(tmp_path / "bf16" / "ckpt_000003.pt")
    assert saved["model"]["embed_tokens.weight"].dtype == torch.float32
    assert saved["model_config"]["is_moe"] and saved["train_config"]["dtype"] == "bfloat16"


def test_atomic_write_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    """A rename that reaches the disk before the data can leave an empty file after a power loss."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    train.atomic_write_text(str(tmp_path / "run.json"), "{}")
    assert events == ["fsync", "replace"]
    assert os.listdir(tmp_path) == ["run.json"] and (tmp_path / "run.json").read_text() == "{}"


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    model = train.Doge(train.DogeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1))
    cfg = TrainConfig()
    optimizer = train.configure_optimizer(model, cfg, "cpu")
    path = tmp_path / "ckpt_000001.pt"
    one_process = train.Run(False, 0, 1, torch.device("cpu"), "gloo", torch.float32, False, 1)
    train.save_checkpoint(str(path), model, optimizer, 1, cfg, {"shard": 0}, one_process)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full_half_way(obj, target):
        real_save(obj, target)
        with open(target, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_full_half_way)
    with pytest.raises(SystemExit) as excinfo:  # one line: the step, the path, the free space
        train.save_checkpoint(str(path), model, optimizer, 2, cfg, {"shard": 0}, one_process)
    message = one_line_exit(excinfo)
    assert "step 2" in message and str(path) in message and "No space left" in message
    assert re.search(r"[\d,]+ MB free", message)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt_000001.pt"]  # and no partial file is left behind
    assert load(path)["step"] == 1
    assert train.latest_checkpoint(str(tmp_path)) == str(path)
    (tmp_path / "ckpt_000010.pt").write_bytes(before)
    (tmp_path / "ckpt_000009.pt").write_bytes(before)
    assert train.latest_checkpoint(str(tmp_path)).endswith("ckpt_000010.pt")


def test_weight_decay_groups():
    model = train.Doge(train.DogeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, is_moe=True, num_experts=4,
                                        num_experts_per_tok=2))
    optimizer = train.configure_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {"embed_tokens.weight", "layers.0.mlp.up_embed.weight"} <= decayed_names
    assert "layers.0.self_attn.q_proj.weight" in decayed_names
    assert {"layers.0.self_attn.A", "layers.0.input_residual", "norm.weight",
            "layers.0.self_attn.q_norm.weight"} <= plain_names
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_init_from_weights_and_upcycling(tmp_path, data_dir):
    """A checkpoint file, an out_dir and a Hugging Face directory all start a new run from the
    same weights (the step-0 validation loss is the dense model's); upcycling to a CDMoE keeps
    the function, then trains."""
    dense = run(data_dir, tmp_path / "dense", "--max_iters=4")
    dense_val = [r["val_loss"] for r in dense if "val_loss" in r][-1]
    ckpt = tmp_path / "dense" / "ckpt_000004.pt"
    model = train.Doge(train.DogeConfig(**load(ckpt)["model_config"]))
    model.load_state_dict(load(ckpt)["model"])
    model.save_pretrained(str(tmp_path / "hf"))
    assert train.Doge.from_pretrained(str(ckpt)).config.num_hidden_layers == 2  # doge.py reads it
    for source, out in [(ckpt, "from_ckpt"), (tmp_path / "dense", "from_dir"),
                        (tmp_path / "hf", "from_hf")]:
        records = run(data_dir, tmp_path / out, f"--init_from={source}", "--max_iters=1")
        assert records[0]["step"] == 0
        assert records[0]["val_loss"] == pytest.approx(dense_val, abs=1e-5)
    moe = run(data_dir, tmp_path / "moe", f"--init_from={ckpt}", "--upcycle_experts=16",
              "--upcycle_experts_per_tok=2", "--max_iters=2")
    assert moe[0]["val_loss"] == pytest.approx(dense_val, abs=1e-5)
    saved = load(tmp_path / "moe" / "ckpt_000002.pt")
    assert saved["model_config"]["is_moe"] and saved["model_config"]["num_experts"] == 16
    assert np.isfinite(losses(moe)[2])


def test_optional_loss_plot_and_wandb(tmp_path, data_dir, monkeypatch):
    """matplotlib and wandb stay optional: without them nothing is drawn or sent; with them (here
    stand-ins recording the calls) loss.png is drawn at each evaluation and every record is sent."""
    import types
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    run(data_dir, tmp_path / "plain", "--max_iters=2")
    assert not os.path.exists(tmp_path / "plain" / "loss.png")
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, tmp_path / "nowandb", "--max_iters=1", "--wandb_log")
    assert "pip install wandb" in one_line_exit(excinfo)

    calls = []

    class Figure:
        def tight_layout(self):
            pass

        def savefig(self, path, format, dpi):
            calls.append(("savefig", format))
            with open(path, "wb") as f:
                f.write(b"\x89PNG")

    class Axes:
        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args))

    pyplot = types.SimpleNamespace(subplots=lambda figsize: (Figure(), Axes()),
                                   close=lambda fig: None)
    matplotlib = types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot)
    wandb = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs["project"])),
                                  log=lambda record, step: calls.append(("log", step)),
                                  finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run(data_dir, tmp_path / "drawn", "--max_iters=2", "--eval_interval=1", "--wandb_log")
    assert (tmp_path / "drawn" / "loss.png").read_bytes() == b"\x89PNG"
    assert calls.count(("savefig", "png")) == 2  # after the evaluations at steps 1 and 2
    assert ("init", "doge") in calls and calls[-1] == ("finish",)
    assert [c[1] for c in calls if c[0] == "log"] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# nothing lost, nothing stuck: checks before deletion, interrupts, damaged and temporary files


def out_dir_state(out_dir):
    """Every file under out_dir with its bytes: what a run must leave as it found it."""
    return {str(path.relative_to(out_dir)): path.read_bytes()
            for path in sorted(out_dir.rglob("*")) if path.is_file()}


def test_a_refused_run_deletes_nothing(tmp_path, data_dir):
    """overwrite deletes an earlier run only once init_from, the data and eval_tasks are known to
    work: a typo in any of them leaves the trained model where it was."""
    out = tmp_path / "out"
    run(data_dir, out, "--max_iters=2", "--save_interval=1")
    before = out_dir_state(out)
    (tmp_path / "empty").mkdir()
    for bad in ([f"--init_from={tmp_path / 'nothere'}"], [f"--data_dir={tmp_path / 'empty'}"],
                ["--eval_tasks=hellaswag", f"--eval_data_dir={tmp_path / 'empty'}"]):
        with pytest.raises(SystemExit) as excinfo:
            train.main([f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--max_iters=2",
                        "--overwrite", *bad])
        one_line_exit(excinfo)
        assert out_dir_state(out) == before, bad


def test_ctrl_c_before_the_first_step_leaves_out_dir_as_it_was(tmp_path, data_dir, monkeypatch,
                                                               capsys, ctrl_c_as_in_a_terminal):
    """Ctrl-C during the step-0 evaluation is one line (exit 130), and neither a new out_dir nor
    an earlier run's is touched; a log that holds no trained step counts as empty, so a plain
    rerun then works, as does resume of a run that has checkpoints."""
    real_evaluator = train.evaluator

    def interrupted_evaluator(*args):
        def evaluation():
            # as the terminal sends it, handled before raise_signal returns: no race with
            # the handler the loop installs after the evaluation
            signal.raise_signal(signal.SIGINT)
            return real_evaluator(*args)()
        return evaluation
    monkeypatch.setattr(train, "evaluator", interrupted_evaluator)
    for out, args in ((tmp_path / "new", []), (tmp_path / "new", ["--overwrite"])):
        with pytest.raises(SystemExit) as excinfo:
            run(data_dir, out, "--max_iters=2", *args)
        assert excinfo.value.code == 130 and not out.exists()
        assert "interrupted: no checkpoint" in capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setattr(train, "evaluator", real_evaluator)

    out = tmp_path / "stepless"  # what an earlier version left: a log of step 0 alone
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0, "tokens": 0, "val_loss": 5.5}\n')
    assert [r["step"] for r in run(data_dir, out, "--max_iters=1")] == [0, 1]
    # a log of trained steps but no checkpoint (a kill before the first save): resume says how
    os.remove(out / "ckpt_000001.pt")
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, out, "--max_iters=1", "--init_from=resume")
    assert "overwrite=True" in one_line_exit(excinfo)


def damage(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a file that loads, but holds no checkpoint
        torch.save({"weights": 1}, path)


@pytest.mark.parametrize("how", ["truncated", "empty", "not a checkpoint"])
def test_a_damaged_newest_checkpoint_is_set_aside(tmp_path, data_dir, capsys, how):
    """resume and Doge.from_pretrained(out_dir) warn in one line and take the checkpoint before
    it; resume (the writer) keeps the damaged file as <name>.damaged, from_pretrained (a reader)
    leaves every file as it was; resume_ckpt naming it is refused."""
    full = run(data_dir, tmp_path / "full", "--max_iters=4", "--save_interval=2")
    out = tmp_path / "out"
    run(data_dir, out, "--max_iters=4", "--save_interval=2")
    damage(out / "ckpt_000004.pt", how)
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, out, "--max_iters=4", "--init_from=resume",
            f"--resume_ckpt={out / 'ckpt_000004.pt'}")
    assert "ckpt_000004.pt" in one_line_exit(excinfo)
    import shutil
    shutil.copytree(out, tmp_path / "copy")
    before = {path.name: path.read_bytes() for path in (tmp_path / "copy").iterdir()
              if path.is_file()}
    capsys.readouterr()
    model = train.Doge.from_pretrained(tmp_path / "copy")
    warning = capsys.readouterr().err.strip()
    assert "\n" not in warning and warning.startswith("warning:") and "ckpt_000004.pt" in warning
    assert torch.equal(model.state_dict()["norm.weight"],
                       load(out / "ckpt_000002.pt")["model"]["norm.weight"])
    assert before == {path.name: path.read_bytes() for path in (tmp_path / "copy").iterdir()
                      if path.is_file()}

    resumed = run(data_dir, out, "--max_iters=4", "--save_interval=2", "--init_from=resume")
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "ckpt_000004.pt" in warning[0]
    assert (out / "ckpt_000004.pt.damaged").exists()
    assert losses(resumed) == losses(full)
    assert_same_tensors(load(out / "ckpt_000004.pt")["model"],
                        load(tmp_path / "full" / "ckpt_000004.pt")["model"])


def test_checkpoint_messages_name_the_files_a_run_writes(tmp_path, data_dir, capsys):
    """With every checkpoint of a real run damaged: a reader's one line names the file the run
    wrote and leaves it; resume's warnings name it and the name it is kept under."""
    out = tmp_path / "out"
    run(data_dir, out, "--max_iters=2", "--save_interval=1")
    written = sorted(name for name in os.listdir(out) if name.startswith("ckpt_"))
    assert written == ["ckpt_000001.pt", "ckpt_000002.pt"]
    for name in written:
        damage(out / name, "empty")
    with pytest.raises(ValueError) as excinfo:
        train.Doge.from_pretrained(out)
    assert str(excinfo.value).startswith(f"{out}: all 2 of its checkpoints are damaged (the "
                                         f"oldest, {written[0]}: cannot be read: ")
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        run(data_dir, out, "--max_iters=2", "--init_from=resume")
    warning = capsys.readouterr().err.strip()
    kept = sorted(name for name in os.listdir(out) if name.startswith("ckpt_"))
    assert kept == [name + ".damaged" for name in written]
    assert warning.startswith(f"warning: skipping {out / written[1]}, kept as {kept[1]}: ")
    assert f"(the oldest, {written[0]}: " in one_line_exit(excinfo)
    assert one_line_exit(excinfo).endswith(f"), kept as {kept[0]}")


def test_a_busy_machine_is_named_at_start_and_when_throughput_falls(tmp_path, data_dir, capsys,
                                                                    monkeypatch):
    """At start, one line with the load when the CPU is oversubscribed (the load injected); a
    logged throughput under half of the run's best so far gets one line, once until it
    recovers, with the load when the machine is busy."""
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 7.0, 7.0))  # busy with any core count
    run(data_dir, tmp_path / "busy", "--max_iters=1")
    assert capsys.readouterr().err.startswith("note: the CPU is busy: load average 1000.0 over ")
    busy = "note: the CPU is busy: load average 7.0 over 2 cores available; expect slower..."
    monkeypatch.setattr(train, "busy_machine_note", lambda: busy)
    cfg = TrainConfig(out_dir=str(tmp_path / "log"))
    os.makedirs(cfg.out_dir)
    log = train.RunLog(cfg, types.SimpleNamespace(master=True, say=print), 0, {})
    for step, (speed, busy) in enumerate([(1000, None), (1200, None), (500, None), (400, None),
                                          (700, None), (550, busy), (100, busy)], 1):
        log.write({"step": step, "tokens_per_sec": speed})
    log.close()
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: 500 tokens/s, under half of this run's best (1,200)",
                     "note: 550 tokens/s, under half of this run's best (1,200); the CPU is busy: "
                     "load average 7.0 over 2 cores available; expect slower..."]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_keep_the_umask_mode(tmp_path, umask):
    """As open() would: 0666 less the umask (mkstemp alone gives 0600)."""
    previous = os.umask(umask)
    try:
        train.atomic_write_text(str(tmp_path / "a.json"), "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_temporary_files_of_interrupted_writes_are_removed(tmp_path, data_dir, capsys):
    """Only atomic_path's own names, in out_dir, runs/ and hf/, reported in one line."""
    out = tmp_path / "out"
    run(data_dir, out, "--max_iters=1")
    (out / "hf").mkdir()
    left = [out / "ckpt_000008.pt.k3j_x9a2.tmp", out / "runs" / "20261205.json.abcdefgh.tmp",
            out / "hf" / "model.safetensors.0a1b2c3d.tmp"]
    for path in left:
        path.write_bytes(b"x" * 1000)
    kept = [out / "notes.txt", out / "mine.tmp", out / "hf" / "README.md"]
    for path in kept:
        path.write_text("mine")
    capsys.readouterr()
    run(data_dir, out, "--max_iters=2", "--init_from=resume")
    lines = [line for line in capsys.readouterr().err.splitlines() if "removed" in line]
    assert len(lines) == 1 and "3 temporary file(s) (0.0 MB)" in lines[0]
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)


def test_a_gpu_recipe_on_a_cpu_says_how_long_a_step_takes(capsys):
    """From the recipe's own numbers: doge-20m's step takes many minutes on any CPU, the tiny
    recipe's a second or so."""
    def warning(recipe):
        cfg, settings = apply_config([TrainConfig(), train.ModelOverrides()],
                                     [os.path.join(ROOT, "config", recipe), "--device=cpu"])
        model = train.Doge(train.DogeConfig(**{**train.PRESETS.get(cfg.model, {}), **{
            k: v for k, v in dataclasses.asdict(settings).items() if v is not None}}))
        seconds = model.flops_per_token(cfg.block_size) * cfg.total_batch_size / \
            train.peak_flops("cpu", torch.float32)
        one_process = train.Run(False, 0, 1, torch.device("cpu"), "gloo", torch.float32, False, 1)
        train.warn_if_slow(cfg, one_process, seconds)
        return capsys.readouterr().err
    slow = warning("doge_20m.py")
    assert slow.count("\n") == 1 and "config/doge_tiny.py" in slow and "8,000 steps" in slow
    assert warning("doge_tiny.py") == ""


def test_help_shows_what_the_config_file_sets(tmp_path, capsys):
    config_file = tmp_path / "recipe.py"
    config_file.write_text("max_iters = 123\nout_dir = 'out/recipe'\n")
    with pytest.raises(SystemExit) as excinfo:
        apply_config([TrainConfig(), train.ModelOverrides()],
                     [str(config_file), "--learning_rate=0.5", "--help"])
    assert excinfo.value.code == 0
    shown = capsys.readouterr().err
    assert f"--max_iters=123  # {config_file}" in shown
    assert "--learning_rate=0.5  # --learning_rate=0.5" in shown
    assert "--out_dir='out/recipe'" in shown and "--warmup_iters=800\n" in shown  # a default


# A train.py launch that a signal hits: SIGNAL_AT=STEP:NAME sends it at that step (0-based) to
# the processes of RANKS (all by default); KILL_IN_SAVE=STEP kills the process half-way through
# writing that step's checkpoint, as a power cut or the OOM killer would.
DRIVER = """
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
import train
real_lr, real_save = train.wsd_lr, torch.save
at, name = os.environ.get("SIGNAL_AT", "-1:SIGKILL").split(":")
ranks = os.environ.get("RANKS", os.environ.get("RANK", "0")).split(",")
kill_in_save = "ckpt_%06d" % int(os.environ.get("KILL_IN_SAVE", -1))

def wsd_lr(step, cfg):
    if step == int(at) and os.environ.get("RANK", "0") in ranks:
        signal.raise_signal(getattr(signal, name))  # handled before it returns: no race
    return real_lr(step, cfg)

def save(obj, path):
    real_save(obj, path)
    if kill_in_save in str(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

train.wsd_lr, torch.save = wsd_lr, save
train.main(sys.argv[1:])
"""


def launch(tmp_path, args, processes=1, **env):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **env}
    command = [sys.executable, str(driver), *args]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nnodes=1",
                        f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
                        f"--master_port={free_port()}"]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, data_dir):
    """SIGKILL at random steps and half-way through writing a checkpoint, four times, each
    followed by init_from=resume: the weights, optimizer state and losses equal those of a run
    that was never stopped, bit for bit, and no temporary file is left. SIGTERM (a scheduler's
    notice) saves a checkpoint and stops, like Ctrl-C."""
    args = [f"--data_dir={data_dir}", *TINY, "--max_iters=12", "--save_interval=2",
            "--eval_interval=4", "--hidden_dropout=0.1"]
    full = run(data_dir, tmp_path / "full", *args[1:])
    out = tmp_path / "out"
    resume = [f"--out_dir={out}", "--init_from=resume"]
    first = launch(tmp_path, [*args, f"--out_dir={out}"], SIGNAL_AT="5:SIGKILL")
    assert first.returncode == -signal.SIGKILL and latest_checkpoint(out).endswith("4.pt")
    assert launch(tmp_path, [*args, *resume], KILL_IN_SAVE="6").returncode == -signal.SIGKILL
    assert any(name.startswith("ckpt_000006.pt.") and name.endswith(".tmp")
               for name in os.listdir(out))
    third = launch(tmp_path, [*args, *resume], SIGNAL_AT="8:SIGTERM")
    assert third.returncode == 0 and "removed 1 temporary file(s)" in third.stderr
    assert latest_checkpoint(out).endswith("ckpt_000009.pt")  # the step ran to its end
    assert launch(tmp_path, [*args, *resume], SIGNAL_AT="10:SIGKILL").returncode == -signal.SIGKILL
    assert launch(tmp_path, [*args, *resume], KILL_IN_SAVE="12").returncode == -signal.SIGKILL
    last = launch(tmp_path, [*args, *resume])
    assert last.returncode == 0, last.stderr[-2000:]
    assert losses(read_log(out)) == losses(full)
    a, b = load(tmp_path / "full" / "ckpt_000012.pt"), load(out / "ckpt_000012.pt")
    assert_same_tensors(a["model"], b["model"])
    for key in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][key], b["optimizer"]["state"][key])
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigterm_to_one_ddp_process_stops_them_all_with_a_checkpoint(tmp_path, data_dir):
    """A scheduler may signal the processes at slightly different moments: the one signalled
    tells the others, and they all finish the same step, save it and stop."""
    out = tmp_path / "ddp"
    result = launch(tmp_path, [f"--data_dir={data_dir}", *TINY, "--max_iters=8",
                               f"--out_dir={out}", "--batch_size=2"],
                    processes=2, SIGNAL_AT="2:SIGTERM", RANKS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list_checkpoints(out).keys() == {3} and len(load(out / "ckpt_000003.pt")["rng"]) == 2

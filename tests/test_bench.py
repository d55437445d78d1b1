"""bench.py's plumbing on CPU: the GPU cases at tiny sizes (their numbers mean nothing here), the
synthetic data train.py reads, a driver that survives a failing case, and the memory of a process tree."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import bench
import train
from test_train import TINY


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU: the cases would run")
def test_gpu_cases_without_cuda_say_so_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--cases=gpu"])
    with pytest.raises(SystemExit) as excinfo:
        bench.main()
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and err.count("\n") == 1


def test_a_failing_case_prints_its_error_and_the_others_run(monkeypatch, capsys):
    def run_worker(name, which, threads):
        if name == "broken":
            raise bench.CaseFailed("RuntimeError: out of memory")
        return {"tokens_per_sec": {"ours": 3.0, "ref": 2.0, "alone": 5.0}[which]}

    monkeypatch.setattr(bench, "run_worker", run_worker)
    cases = [("first", None, (), "apart"), ("broken", None, (), "alone"),
             ("last", None, (), "alone")]
    assert bench.run_group(cases, threads=1) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["first", "tokens_per_sec", "3", "2", "1.50x"]
    assert lines[1].split() == ["broken", "failed:", "RuntimeError:", "out", "of", "memory"]
    assert lines[2].split() == ["last", "tokens_per_sec", "5"]


def test_every_gpu_case_names_a_function_and_a_mode():
    for name, function, arguments, mode in bench.CASES["gpu"]:
        assert callable(function) and mode in ("turns", "apart", "alone"), name


@pytest.mark.parametrize("which", ["ours", "ref"])
def test_gpu_training_step_case_runs_both_models(which):
    if which == "ref":
        pytest.importorskip("transformers")
    result = bench.case_gpu_train(which, 1, 16, steps=1, compiled=False,
                                  config_overrides=dict(num_hidden_layers=1, vocab_size=256))
    assert result["tokens_per_sec"] > 0


def test_gpu_attention_case_checks_every_path_against_the_oracle():
    result = bench.case_gpu_attention(1, 24, heads=4, bias_heads=2, head_dim=16, repeats=1,
                                      compiled=False)
    assert result["folded_error"] < 1e-5
    assert result["flash_no_bias_error"] > 1e-2  # the oracle sees the bias that flash leaves out
    assert all(result[f"{name}_ms"] > 0 for name in ("folded", "flash_no_bias"))


def test_synthetic_data_is_what_train_py_reads(tmp_path):
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    data_dir.mkdir()
    bench.write_synthetic_data(str(data_dir), vocab_size=256, train_tokens=4097, val_tokens=1025)
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, "--max_iters=2"])
    figures = bench.last_log_window(str(out_dir))
    assert figures["tokens_per_sec"] > 0 and figures["mfu"] > 0


LONG_TINY = dict(num_hidden_layers=1, vocab_size=256, keep_window_size=16)


@pytest.mark.parametrize("which", ["ours", "ref"])
def test_gpu_long_context_cases_run_both_models(which):
    """Past the window (40 tokens, keep_window_size 16): a training step, a forward pass and
    greedy decoding at batch 2 (the CPU paths here; the numbers mean nothing)."""
    if which == "ref":
        pytest.importorskip("transformers")
    train = bench.case_gpu_long_train(which, 40, steps=1, config_overrides=LONG_TINY)
    forward = bench.case_gpu_long_forward(which, 40, repeats=1, config_overrides=LONG_TINY)
    decode = bench.case_gpu_decode(which, 2, new_tokens=3, rounds=1, config_overrides=LONG_TINY)
    assert train["seconds"] > 0 and forward["seconds"] > 0 and decode["tokens_per_sec"] > 0


def test_a_reference_out_of_memory_is_printed():
    rows = bench.ratio_rows("long", {"seconds": 2.0, "peak_mb": 10.0}, {"out_of_memory": 1})
    assert rows[-1] == ("long", "out_of_memory", None, 1, None)
    assert [row[1] for row in rows] == ["seconds", "peak_mb", "out_of_memory"]


def test_process_tree_memory_sums_a_process_and_its_children():
    holds = "b = b'x' * 100_000_000"  # 100 MB, every page touched
    child = f"{holds}; print(flush=True); import time; time.sleep(60)"
    parent = f"import subprocess, sys; {holds}; subprocess.run([sys.executable, '-c', {child!r}])"
    with subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, start_new_session=True) as run:
        try:
            run.stdout.readline()  # the child holds its 100 MB, and the parent its own
            alone, tree = bench.current_rss_mb(run.pid), bench.process_tree_rss_mb(run.pid)
        finally:
            os.killpg(run.pid, signal.SIGKILL)
    assert 95 < alone < 150 and 190 < tree < 300 and tree > alone + 95


@pytest.mark.parametrize("which, mode", [("ours", "cache"), ("ref", "cache"), ("ref", "reencode")])
@pytest.mark.filterwarnings("error::FutureWarning")
def test_chat_case_runs_ours_and_both_references(which, mode):
    """A conversation of 4 turns past the window (7 tokens a turn, keep_window_size 16): ours and
    the reference continuing their caches, the reference re-encoding (the numbers mean nothing).
    The reference gets its cache under the name its release takes (no FutureWarning)."""
    if which == "ref":
        pytest.importorskip("transformers")
    result = bench.case_chat(which, mode, prompt=4, reply=3, reported=(1, 2, 3, 4),
                             config_overrides=LONG_TINY)
    assert all(result[f"ms_turn_{turn}"] > 0 for turn in (1, 2, 3, 4))
    assert ("turn4/turn2" in result) == ("rss_growth_2_4" in result) == (mode == "cache")

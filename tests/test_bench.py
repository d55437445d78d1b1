"""bench.py's plumbing on CPU: the GPU cases at tiny sizes (their numbers mean nothing here), the
synthetic data train.py reads, a driver that survives a failing case, and the memory of a process tree."""

import json
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
    cases = [("first", "apart", None), ("broken", "alone", None), ("last", "alone", None)]
    assert bench.run_group(cases, bench.BenchConfig(threads=1)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["first", "tokens_per_sec", "3", "2", "1.50x"]
    assert lines[1].split() == ["broken", "failed:", "RuntimeError:", "out", "of", "memory"]
    assert lines[2].split() == ["last", "tokens_per_sec", "5"]


def test_documented_commands_run_the_cases_they_name(monkeypatch, capsys):
    """`--cases=train,decode --threads=N` runs those groups' cases, each in a worker of N threads,
    and prints their rows between the header and the ratio line."""
    calls, threads = [], torch.get_num_threads()

    def run_worker(name, which, threads):
        calls.append((name, which, threads))
        return {"ours": {"tokens_per_sec": 3.0}, "ref": {"tokens_per_sec": 2.0}}

    monkeypatch.setattr(bench, "run_worker", run_worker)
    bench.main(["--cases=train,decode", f"--threads={threads}"])
    assert calls == [(name, "both", threads) for name in ("train_b4_t512", "train_b1_t2048",
                                                          "decode_256")]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["case", "metric", "ours", "reference", "ratio"]
    assert [line.split() for line in lines[2:5]] == [
        [name, "tokens_per_sec", "3", "2", "1.50x"]
        for name in ("train_b4_t512", "train_b1_t2048", "decode_256")]
    assert lines[5].startswith("ratio:") and len(lines) == 6


@pytest.mark.parametrize("big_text_mb, sizes", [("20,200", (20, 200)), ("20", (20,)),
                                                ("20,x", None)])
def test_tokenize_command_takes_its_sizes(monkeypatch, capsys, big_text_mb, sizes):
    """`--cases=tokenize --big_text_mb=20,200` (a tuple to ast.literal_eval) gives bench_big_text
    those sizes; sizes that are not whole MB fail that group in one line (exit status 1)."""
    given = []
    monkeypatch.setattr(bench, "bench_tokenize", lambda: {"megabytes": 36.0})
    monkeypatch.setattr(bench, "bench_big_text", lambda sizes: given.append(sizes) or {})
    argv = ["--cases=tokenize", f"--big_text_mb={big_text_mb}"]
    if sizes is None:
        with pytest.raises(SystemExit) as excinfo:
            bench.main(argv)
        assert excinfo.value.code == 1 and given == []
        failed = capsys.readouterr().out.splitlines()[2]
        assert failed.startswith("tokenize") and "--big_text_mb=20,x" in failed
        return
    bench.main(argv)
    assert given == [sizes]
    assert capsys.readouterr().out.splitlines()[2].split() == ["tokenize", "megabytes", "36"]


def test_worker_runs_the_case_it_names_and_refuses_others(monkeypatch, capsys):
    """run_worker's command line: --worker=NAME --which=ours|ref runs a case apart with that
    model and prints its numbers as one JSON line; a case that is not there is one line."""
    monkeypatch.setitem(bench.CASES, "probe", [("probe", "apart", lambda which: {which: 1})])
    bench.main(["--worker=probe", "--which=ref"])
    assert json.loads(capsys.readouterr().out) == {"ref": 1}
    for argv in (["--worker=nothing"], ["--worker=probe", "--which=both"]):
        with pytest.raises(SystemExit) as excinfo:
            bench.main(argv)
        assert "\n" not in str(excinfo.value.code) and "bench.py:" in str(excinfo.value.code)


def test_an_unknown_setting_is_refused_in_one_line():
    """Through the real entry point: a misspelled setting is one line naming the right one, and
    nothing runs."""
    result = subprocess.run([sys.executable, "bench.py", "--case=decode"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(
                                __file__))), timeout=120)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "'case'" in result.stderr
    assert "cases" in result.stderr.split("'case'")[1]


def test_every_gpu_case_names_a_function_and_a_mode():
    for name, mode, function in bench.CASES["gpu"]:
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

"""eval.py: log-likelihoods against transformers' DogeForCausalLM, the harness's context/continuation
split and prompt formats, acc and acc_norm, bits per byte, one-line errors, the command line end to
end, and eval_tasks in train.py."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import doge
import eval as eval_program
import prepare_data
import train
from eval import Question, benchmark_requests, encode_pairs, grade, read_benchmark
from helpers import one_thread, write_bpe_tokenizer  # noqa: F401 (one_thread: a fixture)
from oracle import randomize, reference_class, tiny_config
from tokenizer import load_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "a small language model writes small sentences", "héllo wörld 日本語 🙂"] * 20
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the network: a missing file must fail without a hub lookup."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Doge saved as a Hugging Face directory with its tokenizer.json."""
    directory = tmp_path_factory.mktemp("model")
    vocab_size = write_bpe_tokenizer(directory, CORPUS, SPECIAL, 400)
    torch.manual_seed(0)
    model = randomize(doge.Doge(tiny_config(vocab_size=vocab_size, max_position_embeddings=256)))
    model.save_pretrained(directory)
    return directory


def tokenizer_of(directory):
    return load_tokenizer(str(directory / "tokenizer.json"))


def reference_model(directory):
    pytest.importorskip("transformers")
    return reference_class().from_pretrained(directory, attn_implementation="eager").eval()


def reference_score(reference, context_ids, continuation_ids):
    """Summed log-probability of the continuation by transformers, one plain forward pass over
    every token but the last (which predicts nothing, and would stretch dynamic RoPE)."""
    ids = torch.tensor([(context_ids + continuation_ids)[:-1]])
    with torch.no_grad():
        log_probs = reference(input_ids=ids).logits[0].double().log_softmax(-1)
    start = len(context_ids)
    return sum(log_probs[start - 1 + j, token].item() for j, token in enumerate(continuation_ids))


def close(ours, theirs):
    return abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------------
# the model's scores


def test_loglikelihoods_match_reference(tmp_path):
    """Sums over continuation tokens, batched with padding in any order, past keep_window_size (8),
    and a pair longer than max_position_embeddings (64) losing the start of its context."""
    torch.manual_seed(0)
    model = randomize(doge.Doge(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    reference = reference_model(tmp_path)
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(0, 97, (n,), generator=generator).tolist()

    shared = tokens(20)
    requests = [(tokens(3), tokens(2)), (shared, tokens(5)), (shared, tokens(1)),
                (tokens(1), tokens(30)), (shared, tokens(12)), (tokens(50), tokens(25))]
    ours = model.loglikelihoods(requests, batch_size=4)
    for (context, continuation), score in zip(requests, ours):
        context = context[-(65 - len(continuation)):]  # the last 65 tokens of a longer pair
        theirs = reference_score(reference, context, continuation)
        assert close(score, theirs), (score, theirs)
    assert model.loglikelihoods(requests, batch_size=1) == pytest.approx(ours, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what eval.py does on a GPU
        low = model.loglikelihoods(requests, batch_size=4)
    assert low == pytest.approx(ours, rel=0.05)


# ----------------------------------------------------------------------------------------------
# the split rule and the prompts


def test_split_moves_trailing_whitespace_and_takes_the_tail_of_the_whole(model_dir):
    tokenizer = tokenizer_of(model_dir)

    def ids(text):
        return tokenizer.encode([text])[0]

    pairs = [("hello ", "world"), ("hello\n\n", "world"), ("Answer: \n ", "yes"),
             ("héllo wörld ", "日本語 🙂"), ("the quick", " brown fox")]
    for (context, continuation), (context_ids, continuation_ids) in zip(
            pairs, encode_pairs(tokenizer, pairs)):
        kept = context.rstrip()
        assert context_ids == ids(kept)
        assert continuation_ids == ids(context + continuation)[len(ids(kept)):]
        assert tokenizer.decode(context_ids + continuation_ids) == context + continuation
    (_, world), = encode_pairs(tokenizer, [("hello ", "world")])
    assert world == ids(" world") and len(world) == 1  # the space rides with its word
    # a token merged across the boundary: "hel" is two tokens, "hello world" two as well, so
    # the continuation keeps none (the harness's count-based rule, not a re-tokenization)
    (hel, tail), = encode_pairs(tokenizer, [("hel", "lo world")])
    assert len(hel) == 2 and ids("hello world") == [tokenizer.token_to_id("hello"), *world]
    assert tail == []
    (start, rest), = encode_pairs(tokenizer, [("  ", "hello")])  # nothing left of the context
    assert start == [tokenizer.bos_id] and rest == ids("  hello")


HELLASWAG_ROWS = [
    {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow "
     "covering the window of a car.", "ctx_b": "the Man", "endings": [
         ", the man adds wax to the windshield.", "stops and talks on the phone. "],
     "label": "1"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick "
     "a sunny spot.", "ctx_b": "", "endings": ["[step] Tomatoes need  eight hours of sun.",
                                               "Water them [substeps] daily."], "label": 0},
]
ARC_ROWS = [
    {"question": "Which gas do plants take in?", "answerKey": "B", "choices": {
        "text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}},
    {"question": "What melts ice fastest?", "answerKey": "4", "choices": {
        "text": ["wool", "wood", "paper", "salt"], "label": ["1", "2", "3", "4"]}},
]
PIQA_ROWS = [{"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "freeze the lid.",
              "label": 0},
             {"goal": "Keep bread fresh", "sol1": "leave it out", "sol2": "wrap it", "label": 1}]
OPENBOOKQA_ROWS = [
    {"question_stem": "The sun is responsible for", "answerKey": "D", "choices": {
        "text": ["puppies", "rain", "rocks", "plants sprouting"], "label": ["A", "B", "C", "D"]}},
    {"question_stem": "Echoes are", "answerKey": " A", "choices": {
        "text": ["sound reflecting", "light"], "label": ["A", "B"]}},
]
WINOGRANDE_ROWS = [
    {"sentence": "The trophy doesn't fit in the case because the _ is too large.",
     "option1": "trophy", "option2": "case", "answer": "1"},
    {"sentence": "Ann asked Mary what time it was because _ had no watch.", "option1": "Ann",
     "option2": "Mary", "answer": "2"},
]
EXPECTED = {
    "hellaswag": [
        Question(["Removing ice from car: Then, the man writes over the snow covering the window "
                  "of a car. The man"] * 2,
                 [", the man adds wax to the windshield.", "stops and talks on the phone."], 1),
        Question(["Home and Garden: How to grow tomatoes. Pick a sunny spot."] * 2,
                 [" Tomatoes need eight hours of sun.", "Water them daily."], 0)],
    "arc_easy": [
        Question(["Question: Which gas do plants take in?\nAnswer:"] * 3,
                 ["oxygen", "carbon dioxide", "helium"], 1),
        Question(["Question: What melts ice fastest?\nAnswer:"] * 4,
                 ["wool", "wood", "paper", "salt"], 3)],
    "piqa": [Question(["Question: To open a jar,\nAnswer:"] * 2,
                      ["twist the lid.", "freeze the lid."], 0),
             Question(["Question: Keep bread fresh\nAnswer:"] * 2,
                      ["leave it out", "wrap it"], 1)],
    "openbookqa": [Question(["The sun is responsible for"] * 4,
                            ["puppies", "rain", "rocks", "plants sprouting"], 3),
                   Question(["Echoes are"] * 2, ["sound reflecting", "light"], 0)],
    "winogrande": [
        Question(["The trophy doesn't fit in the case because the trophy",
                  "The trophy doesn't fit in the case because the case"],
                 ["is too large."] * 2, 0),
        Question(["Ann asked Mary what time it was because Ann",
                  "Ann asked Mary what time it was because Mary"], ["had no watch."] * 2, 1)],
}
ROWS = {"hellaswag": HELLASWAG_ROWS, "arc_easy": ARC_ROWS, "arc_challenge": ARC_ROWS,
        "piqa": PIQA_ROWS, "openbookqa": OPENBOOKQA_ROWS, "winogrande": WINOGRANDE_ROWS}


@pytest.mark.parametrize("task", list(ROWS))
def test_prompts_are_the_harness_prompts(tmp_path, task):
    write_jsonl(tmp_path / f"{task}.jsonl", ROWS[task])
    expected = EXPECTED.get(task, EXPECTED["arc_easy"])  # arc_challenge: the same layout
    assert read_benchmark(task, str(tmp_path)) == expected
    assert read_benchmark(task, str(tmp_path), limit=1) == expected[:1]


def test_gzip_and_parquet_files_read_the_same(tmp_path):
    import gzip
    with gzip.open(tmp_path / "piqa.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(row) + "\n" for row in PIQA_ROWS))
    assert read_benchmark("piqa", str(tmp_path)) == EXPECTED["piqa"]
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ARC_ROWS), tmp_path / "arc_easy.parquet")
    assert read_benchmark("arc_easy", str(tmp_path)) == EXPECTED["arc_easy"]


def test_requests_put_a_space_before_each_choice(model_dir):
    tokenizer = tokenizer_of(model_dir)
    question = EXPECTED["winogrande"][0]
    expected = encode_pairs(tokenizer, [(question.contexts[0], " is too large."),
                                        (question.contexts[1], " is too large.")])
    assert benchmark_requests(tokenizer, [question]) == expected


def test_acc_and_acc_norm_by_hand():
    questions = [Question(["q"] * 2, ["a", "bbbb"], 1),  # sum: a (-2 > -4); per char: bbbb (-1)
                 Question(["q"] * 3, ["xx", "y", "zzz"], 0),  # both pick xx
                 Question(["q"] * 2, ["cc", "dd"], 1),  # a tie: the first wins, wrongly
                 Question(["q"] * 2, ["e", "ffffff"], 0),  # sum: e; per char: ffffff (-0.2)
                 Question(["q"] * 2, ["a", "bbb"], 1)]  # per char, the space not counted: bbb
    loglikelihoods = [-2.0, -4.0, -1.0, -3.0, -2.5, -5.0, -5.0, -1.0, -1.2, -1.0, -2.5]
    assert grade(questions, loglikelihoods) == [(False, True), (True, True), (False, False),
                                                (True, False), (False, True)]


# ----------------------------------------------------------------------------------------------
# bits per byte


def reference_nats(reference, ids, block):
    """-log p of ids[1:] in windows of block tokens, each window after the token before it."""
    total = 0.0
    for start in range(0, len(ids) - 1, block):
        window = torch.tensor([ids[start:start + block + 1]])
        with torch.no_grad():
            logits = reference(input_ids=window[:, :-1]).logits[0].double()
        total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    return total


def run_eval(capsys, *args):
    eval_program.main([*args, "--device=cpu"])
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("block", [256, 7])
def test_bpb_is_the_loss_in_bits_times_tokens_per_byte(model_dir, tmp_path, capsys, block):
    text = "hello world, how are you today?\nthe lazy dog 日本語 🙂 sleeps"
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    result, = run_eval(capsys, f"--init_from={model_dir}", "--task=bpb",
                       f"--data={tmp_path / 'text.txt'}", f"--block_size={block}")
    tokenizer = tokenizer_of(model_dir)
    ids = [tokenizer.bos_id] + tokenizer.encode([text])[0]
    loss = reference_nats(reference_model(model_dir), ids, block) / (len(ids) - 1)  # nats/token
    tokens_per_byte = (len(ids) - 1) / len(text.encode("utf-8"))
    assert result["bpb"] == pytest.approx(loss / math.log(2) * tokens_per_byte, rel=1e-4)
    assert result["tokens"] == len(ids) - 1


def test_bpb_of_a_shard_equals_bpb_of_its_text(model_dir, tmp_path, capsys):
    """The shard's documents (split at end-of-text, which counts no bytes) are the texts."""
    tokenizer = tokenizer_of(model_dir)
    texts = ["the quick brown fox", "a small language model writes", "héllo wörld"]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in texts])
    stream = [tokenizer.eot_id]
    for ids in tokenizer.encode(texts):
        stream += ids + [tokenizer.eot_id]
    prepare_data.write_shard(str(tmp_path / "docs_val_000000.bin"), np.array(stream))
    from_text, = run_eval(capsys, f"--init_from={model_dir}", "--task=bpb",
                          f"--data={tmp_path / 'docs.jsonl'}")
    from_shard, = run_eval(capsys, f"--init_from={model_dir}", "--task=bpb",
                           f"--data={tmp_path / 'docs_val_000000.bin'}")
    assert from_shard["bytes"] == from_text["bytes"] == sum(len(t.encode()) for t in texts)
    assert from_shard["bpb"] == pytest.approx(from_text["bpb"], rel=1e-6)


def test_a_shard_of_another_tokenizer_is_refused_in_one_line(model_dir, tmp_path, capsys):
    """A shard whose meta.json names another tokenizer, or with ids past the model's, would be
    scored as the wrong text: one line says so. The model's own tokenizer beside it is fine."""
    tokenizer = tokenizer_of(model_dir)
    stream = np.array([tokenizer.eot_id] + tokenizer.encode(["the quick brown fox"])[0])
    for name, corpus in (("same", CORPUS), ("other", ["completely different words here"] * 30)):
        directory = tmp_path / name
        directory.mkdir()
        if name == "same":
            shutil.copy(model_dir / "tokenizer.json", directory / "tokenizer.json")
        else:
            write_bpe_tokenizer(directory, corpus, ["<|end_of_text|>"], 280)
        prepare_data.write_meta(str(directory), {"tokenizer": {"path": "tokenizer.json"}})
        prepare_data.write_shard(str(directory / "docs_val_000000.bin"), stream)
    same, = run_eval(capsys, f"--init_from={model_dir}", "--task=bpb",
                     f"--data={tmp_path / 'same' / 'docs_val_000000.bin'}")
    assert same["tokens"] == len(stream) - 1
    with pytest.raises(SystemExit) as excinfo:
        run_eval(capsys, f"--init_from={model_dir}", "--task=bpb",
                 f"--data={tmp_path / 'other' / 'docs_val_000000.bin'}")
    assert "which is not the model's tokenizer" in one_line_exit(excinfo)
    prepare_data.write_shard(str(tmp_path / "wide_val_000000.bin"), np.array([1, 10 ** 5]))
    with pytest.raises(SystemExit) as excinfo:
        run_eval(capsys, f"--init_from={model_dir}", "--task=bpb",
                 f"--data={tmp_path / 'wide_val_000000.bin'}")
    assert "holds token id 100000, past the model's tokenizer" in one_line_exit(excinfo)


# ----------------------------------------------------------------------------------------------
# errors


def one_line_exit(excinfo):
    message = str(excinfo.value.code)
    assert "\n" not in message and message.startswith("error:"), message
    return message


def test_missing_file_and_missing_field_are_one_line_errors(model_dir, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        eval_program.main([f"--init_from={model_dir}", "--tasks=hellaswag",
                           f"--data_dir={tmp_path}"])
    assert str(tmp_path / "hellaswag.jsonl") in one_line_exit(excinfo)
    rows = [HELLASWAG_ROWS[0], {k: v for k, v in HELLASWAG_ROWS[1].items() if k != "endings"}]
    write_jsonl(tmp_path / "hellaswag.jsonl", rows)
    with pytest.raises(SystemExit) as excinfo:
        eval_program.main([f"--init_from={model_dir}", "--tasks=hellaswag",
                           f"--data_dir={tmp_path}"])
    message = one_line_exit(excinfo)
    assert "hellaswag.jsonl:2" in message and "'endings'" in message
    write_jsonl(tmp_path / "winogrande.jsonl", [{**WINOGRANDE_ROWS[0], "sentence": "no blank"}])
    with pytest.raises(ValueError, match="winogrande.jsonl:1: not a winogrande row"):
        read_benchmark("winogrande", str(tmp_path))
    (tmp_path / "empty.txt").write_text("")
    for argv, words in ((["--tasks=mmlu"], "unknown task mmlu"), (["--task=bpb"], "--data=FILE"),
                        (["--task=bpb", f"--data={tmp_path}/none.txt"], "none.txt: no such"),
                        (["--task=bpb", f"--data={tmp_path}/empty.txt"], "no text to score")):
        with pytest.raises(SystemExit) as excinfo:
            eval_program.main([f"--init_from={model_dir}", *argv])
        assert words in one_line_exit(excinfo)
    bare = tmp_path / "no-tokenizer"  # the weights without their tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(SystemExit) as excinfo:
        eval_program.main([f"--init_from={bare}", "--tasks=hellaswag", f"--data_dir={tmp_path}"])
    assert f"no tokenizer.json or tokenizer.model in {bare}" in one_line_exit(excinfo)


# ----------------------------------------------------------------------------------------------
# end to end


def test_command_line_scores_the_questions_as_the_reference_does(model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG_ROWS)
    write_jsonl(tmp_path / "winogrande.jsonl", WINOGRANDE_ROWS)
    output = tmp_path / "out" / "items.json"
    (tmp_path / "out").mkdir()
    lines = run_eval(capsys, f"--init_from={model_dir}", "--tasks=hellaswag,winogrande",
                     f"--data_dir={tmp_path}", f"--output={output}", "--batch_size=3")
    assert [(line["task"], line["n"]) for line in lines] == [("hellaswag", 2), ("winogrande", 2)]
    assert lines[1]["acc_norm"] is None  # the harness reports acc alone for Winogrande
    items = json.loads(output.read_text())["items"]
    tokenizer, reference = tokenizer_of(model_dir), reference_model(model_dir)
    for line in lines:
        questions = EXPECTED[line["task"]]
        scores = [item["loglikelihoods"] for item in items[line["task"]]]
        for question, choice_scores in zip(questions, scores):  # the rule, written out again
            for context, choice, score in zip(question.contexts, question.choices, choice_scores):
                whole = tokenizer.encode([context + " " + choice])[0]
                context_ids = tokenizer.encode([context])[0]  # no trailing spaces in these
                theirs = reference_score(reference, context_ids, whole[len(context_ids):])
                assert close(score, theirs), (score, theirs)
        right = [max(range(len(s)), key=s.__getitem__) == q.gold for q, s in zip(questions, scores)]
        assert line["acc"] == sum(right) / len(right)


def test_the_table_gives_bits_per_byte_a_header_of_its_own(model_dir, tmp_path, capsys):
    """The table on stderr: the benchmarks under task, n, acc, acc_norm; bpb under task, bytes,
    tokens, bpb, each value right-aligned under its own header; stdout keeps its JSON lines."""
    write_jsonl(tmp_path / "winogrande.jsonl", WINOGRANDE_ROWS)
    (tmp_path / "text.txt").write_text("hello world, how are you today?", encoding="utf-8")
    eval_program.main([f"--init_from={model_dir}", "--tasks=bpb,winogrande", "--device=cpu",
                       f"--data_dir={tmp_path}", f"--data={tmp_path / 'text.txt'}"])
    captured = capsys.readouterr()
    bpb, winogrande = [json.loads(line) for line in captured.out.splitlines()]
    assert (bpb["task"], winogrande["task"]) == ("bpb", "winogrande")
    table = captured.err.splitlines()[-4:]
    assert [line.split() for line in table] == [
        ["task", "n", "acc", "acc_norm"],
        ["winogrande", "2", f"{winogrande['acc']:.4f}", "-"],
        ["task", "bytes", "tokens", "bpb"],
        ["bpb", str(bpb["bytes"]), str(bpb["tokens"]), f"{bpb['bpb']:.4f}"]]

    def column_ends(line):  # where each right-aligned field after the task name ends
        return [match.end() for match in re.finditer(r"\S+", line)][1:]
    assert column_ends(table[1]) == column_ends(table[0])
    assert column_ends(table[3]) == column_ends(table[2])


def test_train_logs_the_benchmarks_at_each_evaluation(model_dir, tmp_path, capsys):
    """eval_tasks in train.py: hellaswag_acc, hellaswag_acc_norm and winogrande_acc in log.jsonl
    at every evaluation, the last equal to eval.py's on the final checkpoint."""
    tokenizer = tokenizer_of(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    ids = np.array(tokenizer.encode([" ".join(CORPUS)])[0] * 4)
    prepare_data.write_shard(str(data / "c_val_000000.bin"), ids[:2000])
    prepare_data.write_shard(str(data / "c_train_000001.bin"), ids[2000:])
    write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG_ROWS)
    write_jsonl(tmp_path / "winogrande.jsonl", WINOGRANDE_ROWS)
    out = tmp_path / "run"
    train.main([f"--data_dir={data}", f"--out_dir={out}", "--model=None",
                f"--vocab_size={tokenizer.vocab_size}", "--hidden_size=32",
                "--intermediate_size=64", "--num_hidden_layers=2", "--num_attention_heads=2",
                "--num_key_value_heads=1", "--block_size=32", "--batch_size=4",
                "--total_batch_size=128", "--max_iters=2", "--warmup_iters=1", "--decay_iters=0",
                "--eval_iters=1", "--eval_interval=1", "--log_interval=1", "--device=cpu",
                "--compile=False", "--eval_tasks=hellaswag,winogrande",
                f"--eval_data_dir={tmp_path}"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 1, 2]
    for record in evaluations:
        assert {"hellaswag_acc", "hellaswag_acc_norm", "winogrande_acc"} <= set(record)
        assert "winogrande_acc_norm" not in record
    capsys.readouterr()  # train.py's own lines
    hellaswag, winogrande = run_eval(capsys, f"--init_from={out}", "--tasks=hellaswag,winogrande",
                                     f"--data_dir={tmp_path}")
    assert evaluations[-1]["hellaswag_acc"] == hellaswag["acc"]
    assert evaluations[-1]["hellaswag_acc_norm"] == hellaswag["acc_norm"]
    assert evaluations[-1]["winogrande_acc"] == winogrande["acc"]

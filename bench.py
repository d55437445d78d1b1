"""Side-by-side benchmarks: our Doge against transformers' DogeForCausalLM (sdpa) on the same
weights and shapes, reported as ratios (CASES says what each case measures). CPU float32 here;
on a CUDA machine the model cases run in bfloat16 on the GPU. docs/performance.md has the figures.

    python bench.py                      # every case (several minutes on 2 CPU cores)
    python bench.py --cases=train,decode # some groups of them
    python bench.py --threads=2          # torch threads per process (default 2)
    python bench.py --cases=gpu          # the GPU cases (CUDA only; under 5 minutes on one GPU)
    python bench.py --cases=tokenize --big_text_mb=20,200   # big .txt files (default 200,2000)

Without CUDA, --cases=gpu prints one line and exits with status 2. A case that fails prints its
error and the others still run; the exit status is then 1."""

import contextlib
import inspect
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import common
import doge
import engine
import prepare_data
from configurator import apply_config
from tokenizer import CHAT_TOKENS, DOGE_CHAT_TEMPLATE, MODEL_INPUT_NAMES


@dataclass
class BenchConfig:
    cases: str = ""  # groups of CASES, comma-separated; empty: all (gpu only on a CUDA machine)
    threads: int = 2  # torch threads in each process
    big_text_mb: str = "200,2000"  # tokenize: the sizes of its big .txt files, MB, comma-separated
    worker: str = ""  # run_worker's: the one case this process runs, its numbers printed as JSON
    which: str = "both"  # run_worker's: ours or ref (a case apart), both (in turns) or alone


# Each case: (name, how it runs, what it measures). "turns": both models in one process, timed in
# turns (measure() returns {"ours": ..., "ref": ...}); "apart": measure("ours") and
# measure("ref"), each in a process of its own (peak memory its own); "alone": measure() in a
# process of its own, no reference; "here": measure(cfg) in bench.py's process, no reference.
CASES = {
    "train": [("train_b4_t512", "turns", lambda: case_train(4, 512)),  # a training step: tokens/s
              ("train_b1_t2048", "turns", lambda: case_train(1, 2048))],  # the same at T=2048
    "long": [("forward_t8192", "apart", lambda which: case_long(which, "forward")),  # W=2048:
             ("train_t8192", "apart", lambda which: case_long(which, "train"))],  # s, peak MB
    "decode": [("decode_256", "turns", lambda: case_decode())],  # batch-1 greedy: tokens/s, GB/s
    "window": [("window_4000", "turns", lambda: case_window())],  # ms/token before, after W fills
    "moe": [("moe_e1024_top8", "apart", lambda which: case_moe(which))],  # CDMoE forward+backward
    "chat": [("chat_vs_cache", "apart", lambda which: case_chat(which, "cache")),  # ms/turn, MB
             ("chat_vs_reencode", "apart", lambda which: case_chat(which, "reencode"))],
    "serve": [("serve", "apart", lambda which: case_serve(which))],  # serve.py: s/turn, tokens/s
    "gpu": [  # CUDA only (a CPU's default run leaves it out); more GPU cases go on this list
        ("gpu_train_b16", "apart", lambda which: case_gpu_train(which, 16, 2048)),  # compiled
        ("gpu_attn_t2048", "alone", lambda: case_gpu_attention(16, 2048)),  # exact T <= W: ms
        ("gpu_train_py_20m", "alone", lambda: case_gpu_train_py(12)),  # train.py: tokens/s, MFU
        ("gpu_train_t8192", "apart", lambda which: case_gpu_long_train(which, 8192)),  # B=1
        ("gpu_train_t32768", "apart", lambda which: case_gpu_long_train(which, 32768, 1)),
        ("gpu_forward_t8192", "apart", lambda which: case_gpu_long_forward(which, 8192)),
        ("gpu_decode_b1", "apart", lambda which: case_gpu_decode(which, 1)),  # greedy tokens/s
        ("gpu_decode_b64", "apart", lambda which: case_gpu_decode(which, 64))],
    "tiny": [("tiny", "here", lambda cfg: train_py_figures(TINY_RUN))],  # train.py, CPU demo
    "tokenize": [("tokenize", "here", lambda cfg: bench_tokenize_group(cfg.big_text_mb))],
}

# ----------------------------------------------------------------------------------------------
# Shared set-up

HERE = os.path.dirname(os.path.abspath(__file__))  # the project's folder, with its programs
WHICH = ("ours", "ref")


def make_models(which, config_overrides=None, dtype=None):
    """Doge-20M, random weights (A too: the mask is not constant), saved and loaded as programs do:
    ours by engine.load_model, "ref" as DogeForCausalLM (sdpa); dtype None: the device rule's."""
    device, default_dtype = common.device_and_dtype()
    config = doge.DogeConfig.from_preset("doge-20m", **(config_overrides or {}))
    torch.manual_seed(0)
    model = doge.Doge(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.A.normal_()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        if which == "ours":
            return engine.load_model(directory, device, dtype or default_dtype)[0]
        from transformers import DogeForCausalLM
        model = DogeForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
        return model.to(device=device, dtype=dtype or default_dtype)


def model_and_tokens(which, shape, config_overrides=None, train=False, dtype=None):
    """make_models' model, training or not, and random tokens of that shape on its device."""
    model = make_models(which, config_overrides, dtype).train(train)
    return model, torch.randint(0, model.config.vocab_size, shape,
                                device=model.lm_head.weight.device)


def loss_of(model, which, idx):
    if which == "ref":
        return model(idx, labels=idx).loss
    targets = torch.cat((idx[:, 1:], torch.full_like(idx[:, :1], -1)), dim=1)
    return model(idx, targets, keep_logits=False)[1]


def logits_of(model, which, idx):
    """A forward pass with full logits, no gradient."""
    with torch.no_grad():
        return model(idx)[0] if which == "ours" else model(idx).logits


def sync():
    """Wait for the GPU's queued work (none where CUDA never started)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def current_rss_mb(pid="self"):
    """A process's resident memory now; 0 once it has exited."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    return 0


def process_tree_rss_mb(root):
    """Resident memory of a process and all its descendants (its workers), summed (Linux /proc)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:  # or it exited
            parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:  # grows as it goes: breadth first
        tree += [child for child, parent in parents.items() if parent == pid]
    return sum(current_rss_mb(pid) for pid in tree)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_time(function, repeats):
    """Seconds per call of `repeats` calls in a row (a GPU queues them as in training; one wait)."""
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    sync()
    return (time.perf_counter() - start) / repeats


def best_time(function, repeats):
    """The fastest of `repeats` calls timed one by one, after one that warms up."""
    function()
    return min(mean_time(function, 1) for _ in range(repeats))


# ----------------------------------------------------------------------------------------------
# Cases: each returns a dict of numbers (see CASES)


def in_turns(measures, rounds):
    """Call each model's measure() in turns (a shared machine's speed drifts: both see the same),
    `rounds` times; keep each key's smallest value (times: other work only ever slows a run)."""
    best = {which: {} for which in measures}
    for _ in range(rounds):
        for which, measure in measures.items():
            for key, value in measure().items():
                best[which][key] = min(best[which].get(key, float("inf")), value)
    return best


def training_step(model, which, idx, autocast=None, **adamw):
    """A function taking one step on idx: forward (under autocast), backward, AdamW(**adamw)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw)

    def step():
        with autocast or contextlib.nullcontext():
            loss = loss_of(model, which, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def case_train(batch, length):
    def timed_step(which):
        model, idx = model_and_tokens(which, (batch, length), train=True)
        step = training_step(model, which, idx)
        # each round warms up with one step (the other model has just run), then times one
        return lambda: {"seconds": best_time(step, 1)}

    best = in_turns({which: timed_step(which) for which in WHICH}, rounds=10)
    return {which: {"tokens_per_sec": batch * length / best[which]["seconds"]} for which in WHICH}


def case_long(which, mode):
    """T=8192, keep_window_size 2048: a forward pass with full logits, or forward+backward."""
    model, idx = model_and_tokens(which, (1, 8192), train=mode == "train")
    before = current_rss_mb()
    if mode == "train":
        seconds = mean_time(lambda: loss_of(model, which, idx).backward(), 1)
    else:
        seconds = mean_time(lambda: logits_of(model, which, idx), 1)
    return {"seconds": seconds, "peak_mb": peak_rss_mb() - before}


def generate_timestamps(model, which, prompt, new_tokens):
    """Greedy decoding; the wall-clock time at which each new token was ready."""
    stamps = []
    if which == "ours":
        for _ in model.generate_stream(prompt, new_tokens, temperature=0):
            sync()
            stamps.append(time.perf_counter())
        return stamps
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   logits_processor=LogitsProcessorList([Stamp()]))
    return stamps


def decoding_in_turns(new_tokens, rounds, figures, config_overrides=None):
    """Both models, and in_turns' best of figures(timestamps) of greedy decoding after 8 tokens."""
    models = {which: make_models(which, config_overrides).eval() for which in WHICH}
    prompt = torch.randint(0, 32768, (1, 8), device=models["ours"].lm_head.weight.device)
    return models, in_turns({which: lambda which=which: figures(generate_timestamps(
        models[which], which, prompt, new_tokens)) for which in WHICH}, rounds)


def case_decode():
    models, best = decoding_in_turns(257, 5, lambda stamps: {"seconds": stamps[-1] - stamps[0]})
    weight_bytes = sum(p.numel() * p.element_size() for p in models["ours"].parameters())
    # the ceiling for decoding: GB/s a large copy moves (bytes read + bytes written)
    source, target = torch.ones(64 * 2 ** 20), torch.empty(64 * 2 ** 20)  # 256 MB each
    copy_gb_per_sec = 2 * source.numel() * 4 / best_time(lambda: target.copy_(source), 5) / 1e9
    tokens_per_sec = {which: 256 / best[which]["seconds"] for which in WHICH}
    return {which: {"tokens_per_sec": tokens_per_sec[which], "weight_mb": weight_bytes / 2 ** 20,
                    "weight_gb_per_sec": weight_bytes * tokens_per_sec[which] / 1e9,
                    "copy_gb_per_sec": copy_gb_per_sec} for which in WHICH}


def case_window():
    def spans(stamps):  # seconds per token over each span of 1000 tokens
        return {span: (stamps[span + 1000] - stamps[span]) / 1000 for span in range(0, 4000, 1000)}

    # Each span keeps its best round: the best 3000-token stretch would be more likely to include
    # one of this machine's slow spells than the first 1000 tokens, overstating later/first.
    best = decoding_in_turns(4001, 3, spans, {"keep_window_size": 1024})[1]
    later = {which: sum(best[which][span] for span in (1000, 2000, 3000)) / 3 for which in WHICH}
    return {which: {"ms_first_1000": best[which][0] * 1e3, "ms_1000_to_4000": later[which] * 1e3,
                    "later/first": later[which] / best[which][0]}  # 1.0: the cache stopped growing
            for which in WHICH}


# A conversation (--cases=chat): 200 turns of a 40-token user prompt and a 30-token greedy reply
CHAT_PROMPT, CHAT_REPLY = 40, 30
CHAT_REPORTED = (10, 50, 100, 200)  # the turns whose time is reported; the last one ends it
CHAT_MEDIAN_OF = 5  # a continued turn's time: the median of turns t-4..t (the speed drifts)


def continued_turns(model, which, prompt, reply):
    """Yield the seconds of each turn of an endless conversation on one continued state: our cache,
    or the reference's carried across turns. Random tokens: the cost depends on lengths alone."""
    generator = torch.Generator().manual_seed(0)
    device = model.lm_head.weight.device
    if which == "ours":
        cache = model.new_cache()
    else:
        from transformers import DynamicCache
        cache, history = DynamicCache(config=model.config), torch.empty(1, 0, dtype=torch.long)
        # a cache to continue goes in as `cache` where forward takes it (and warns at the old name)
        takes_cache = "cache" in inspect.signature(type(model).forward).parameters
        continued = {"cache" if takes_cache else "past_key_values": cache}
    while True:
        new = torch.randint(0, model.config.vocab_size, (1, prompt), generator=generator)
        start = time.perf_counter()
        if which == "ours":
            for _ in model.generate_stream(new.to(device), reply, temperature=0, cache=cache):
                pass
        else:
            history = model.generate(torch.cat((history, new), dim=1).to(device), **continued,
                                     max_new_tokens=reply, min_new_tokens=reply,
                                     do_sample=False).cpu()
        sync()
        yield time.perf_counter() - start


def reencoded_turn_seconds(model, turn, prompt, reply):
    """Seconds of turn `turn` when the reference re-encodes the whole history (random tokens of
    its length: every earlier prompt and reply, and the new prompt), then replies."""
    length = (turn - 1) * (prompt + reply) + prompt
    history = torch.randint(0, model.config.vocab_size, (1, length),
                            generator=torch.Generator().manual_seed(turn))
    return mean_time(lambda: model.generate(history.to(model.lm_head.weight.device),
                                            max_new_tokens=reply, min_new_tokens=reply,
                                            do_sample=False), 1)


def case_chat(which, reference_mode, prompt=CHAT_PROMPT, reply=CHAT_REPLY,
              reported=CHAT_REPORTED, config_overrides=None):
    """ms per turn at the reported turns, peak memory and, on a continued state, its growth from
    the second to the last: ours, or the reference with its cache ("cache") or re-encoding."""
    model = make_models(which, config_overrides).eval()
    before = current_rss_mb()
    if which == "ref" and reference_mode == "reencode":
        reencoded_turn_seconds(model, 1, prompt, reply)  # warm up
        return {**{f"ms_turn_{turn}": 1e3 * reencoded_turn_seconds(model, turn, prompt, reply)
                   for turn in reported}, "peak_mb": peak_rss_mb() - before}
    seconds, rss = [], {}
    for turn, turn_seconds in zip(range(1, reported[-1] + 1),
                                  continued_turns(model, which, prompt, reply)):
        seconds.append(turn_seconds)
        if turn in reported:
            rss[turn] = current_rss_mb()
    ms = {f"ms_turn_{turn}": 1e3 * float(np.median(seconds[max(0, turn - CHAT_MEDIAN_OF):turn]))
          for turn in reported}
    first, last = reported[1], reported[-1]
    return {**ms, f"turn{last}/turn{first}": ms[f"ms_turn_{last}"] / ms[f"ms_turn_{first}"],
            "peak_mb": peak_rss_mb() - before, f"rss_growth_{first}_{last}": rss[last] - rss[first]}


# Serving (--cases=serve): our serve.py and `transformers serve` on the same exported Doge-20M,
# driven by the openai client as chat clients drive them: the whole history sent every turn
SERVE_TURNS, SERVE_PROMPT, SERVE_REPLY = 100, 40, 30  # turns, words a prompt, tokens a reply
SERVE_CONCURRENT, SERVE_CONCURRENT_TURNS = 8, 4  # conversations at once, turns each
SERVE_ROUNDS = 2  # tokens/s of 1 and of SERVE_CONCURRENT conversations, measured in turns
SERVE_BUDGET = 900  # seconds the long conversation may take; a slower server stops there
SERVE_WORDS = ("the quick brown fox jumps over the lazy dog while a small language model writes "
               "short sentences about rivers mountains cities numbers colours and music").split()


def export_chat_model(directory):
    """make_models' Doge-20M with a small byte-level BPE tokenizer.json and the Doge chat template.
    The tied embedding's rows of special tokens and past the tokenizer's are zero: their logits, 0,
    lie below the others' largest, so greedy replies are words, and never end early."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    special = ["<|end_of_text|>", *CHAT_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([" ".join(SERVE_WORDS)] * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>", "chat_template": DOGE_CHAT_TEMPLATE,
                   "model_input_names": MODEL_INPUT_NAMES}, f)
    model = make_models("ours", dtype=torch.float32)
    ids = [tokenizer.token_to_id(token) for token in special]
    with torch.no_grad():
        model.embed_tokens.weight[tokenizer.get_vocab_size():] = 0
        model.embed_tokens.weight[ids] = 0
    model.config.bos_token_id, model.config.eos_token_id = ids[1], ids[4]
    model.save_pretrained(directory)


@contextlib.contextmanager
def running_server(which, directory, threads):
    """The server's process, answering on a free local port: (process, base url, model name)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, os.path.join(HERE, "serve.py"), f"--init_from={directory}",
               f"--port={port}", "--model_name=doge"]
    if which == "ref":
        command = ["transformers", "serve", directory, "--port", str(port), "--device", "cpu",
                   "--host", "127.0.0.1"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx
        for _ in range(600):
            if process.poll() is not None:
                raise RuntimeError(f"the {which} server exited: {process.stderr.read()[-500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the {which} server did not answer in 5 minutes")
        yield process, url + "/v1", "doge" if which == "ours" else directory
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        process.kill()  # if it is still there
        process.wait()


def serve_turn(client, model, messages, rng):
    """One turn: a new SERVE_PROMPT-word user message, and the reply (the seconds it took)."""
    messages.append({"role": "user", "content": " ".join(
        rng.choice(SERVE_WORDS) for _ in range(SERVE_PROMPT))})
    start = time.perf_counter()
    response = client.chat.completions.create(model=model, messages=messages,
                                              max_tokens=SERVE_REPLY, temperature=0)
    seconds = time.perf_counter() - start
    messages.append({"role": "assistant", "content": response.choices[0].message.content})
    return seconds, response.usage.completion_tokens


def served_tokens_per_sec(client, model, conversations):
    """Reply tokens per second of `conversations` clients at once, SERVE_CONCURRENT_TURNS each."""
    from concurrent.futures import ThreadPoolExecutor

    def talk(i):  # one client's reply tokens
        messages, rng = [], random.Random(1000 + i)
        return sum(serve_turn(client, model, messages, rng)[1]
                   for _ in range(SERVE_CONCURRENT_TURNS))

    start = time.perf_counter()
    with ThreadPoolExecutor(conversations) as pool:
        tokens = sum(pool.map(talk, range(conversations)))
    return tokens / (time.perf_counter() - start)


def case_serve(which, turns=SERVE_TURNS):
    """docs/serving.md's figures: ms per turn at turns 10, 50 and 100 of one conversation, where
    the server stopped or the turns it served in SERVE_BUDGET s, its peak memory, and reply
    tokens/s of 1 and SERVE_CONCURRENT conversations at once."""
    try:
        import httpx  # noqa: F401
        import openai
    except ImportError:
        raise SystemExit("the serve case needs the openai client and httpx (pip install openai "
                         "httpx)") from None
    if which == "ref" and subprocess.run(["transformers", "serve", "--help"],
                                         capture_output=True).returncode != 0:
        raise SystemExit("the reference needs `transformers serve` (pip install "
                         "'transformers[serving]')")
    with tempfile.TemporaryDirectory() as directory:
        export_chat_model(directory)
        with running_server(which, directory, torch.get_num_threads()) as (process, url, model):
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            messages, rng, seconds, stopped = [], random.Random(0), [], {}
            for turn in range(1, turns + 1):
                if sum(seconds) > SERVE_BUDGET:
                    stopped = {"turns_in_budget_s": len(seconds)}
                    break
                try:
                    seconds.append(serve_turn(client, model, messages, rng)[0])
                except openai.APIStatusError as e:  # the reference past its positions
                    stopped = {"stopped_at_turn": turn, "stopped_status": e.status_code}
                    break
                common.log(f"turn {turn}: {seconds[-1]:.2f} s")
            figures = {f"ms_turn_{t}": 1e3 * float(np.median(seconds[t - 5:t]))
                       for t in (10, 50, 100) if t <= len(seconds)}
            if "ms_turn_100" in figures:
                figures["turn100/turn10"] = figures["ms_turn_100"] / figures["ms_turn_10"]
            single, together = 0, 0
            for _ in range(SERVE_ROUNDS):  # in turns: the best of each, on a shared machine
                single = max(single, served_tokens_per_sec(client, model, 1))
                together = max(together, served_tokens_per_sec(client, model, SERVE_CONCURRENT))
            with open(f"/proc/{process.pid}/status") as f:  # the server's peak resident memory
                peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            return {**figures, **stopped, "peak_mb": peak_kb / 1024,
                    "tokens_per_sec_1": single, f"tokens_per_sec_{SERVE_CONCURRENT}": together,
                    f"x{SERVE_CONCURRENT}/x1": together / single}


def case_moe(which):
    device, dtype = common.device_and_dtype()
    config = doge.DogeConfig.from_preset("doge-40m-moe", vocab_size=32768)
    torch.manual_seed(0)
    moe = doge.CDMoE(config)
    if which == "ref":
        from transformers import DogeConfig as ReferenceConfig
        from transformers.models.doge.modeling_doge import DogeCDMoE
        state = moe.state_dict()
        moe = DogeCDMoE(ReferenceConfig(**{k: v for k, v in config.to_dict().items()
                                           if k in ("hidden_size", "intermediate_size", "is_moe",
                                                    "num_experts", "num_experts_per_tok")}))
        moe.load_state_dict(state)
    moe = moe.to(device=device, dtype=dtype)
    x = torch.randn(4, 512, config.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def step():
        out = moe(x)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()

    before = current_rss_mb()
    return {"seconds": best_time(step, 3), "peak_mb": peak_rss_mb() - before}


def _bare_init(model_path):  # a baseline worker process: its SentencePiece model
    import sentencepiece
    _bare_encode.processor = sentencepiece.SentencePieceProcessor(model_file=model_path)


def _bare_encode(lines):  # a count: the ids stay in the worker
    return sum(map(len, _bare_encode.processor.encode(lines, num_threads=1)))


def bench_tokenize_group(big_text_mb):
    """The tokenize group: bench_tokenize, then bench_big_text on files of big_text_mb's sizes."""
    try:
        sizes = tuple(int(mb) for mb in big_text_mb.split(","))
    except ValueError:
        raise SystemExit(f"--big_text_mb={big_text_mb}: give sizes in MB, comma-separated, as "
                         f"--big_text_mb=200,2000") from None
    return {**bench_tokenize(), **bench_big_text(sizes)}


def bench_tokenize(target_mb=36, workers=None, vocab_size=32768, rounds=3):
    """All of prepare_data.main against bare SentencePiece encode in as many processes (see
    docs/data.md, Fast) on the standard library's source repeated to about target_mb, as a .jsonl
    of many documents and as one huge .txt (which needs cutting); best of `rounds` in turns."""
    workers = workers or common.available_cpus()
    _, files = prepare_data.stdlib_files()
    documents = [doc for path in files for doc in prepare_data.read_documents(path)]
    documents *= max(1, round(target_mb * 1e6 / sum(map(len, documents))))
    text = "".join(documents)
    megabytes = len(text.encode()) / 1e6
    lines = text.splitlines(keepends=True)
    chunks = [lines[i * len(lines) // workers:(i + 1) * len(lines) // workers]
              for i in range(workers)]
    common.log(f"bench_tokenize: training a {vocab_size}-token tokenizer on the standard library")
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data.main([f"--out_dir={tmp}/tok", f"--vocab_size={vocab_size}", "--workers=1",
                           "--max_tokens=1000", "--val_tokens=100"])
        model = os.path.join(tmp, "tok", "tokenizer.model")
        inputs = {"jsonl": f"{tmp}/docs.jsonl", "one_doc": f"{tmp}/one.txt"}
        common.atomic_write_text(inputs["jsonl"],  # many documents
                                 "".join(json.dumps({"text": doc}) + "\n" for doc in documents))
        common.atomic_write_text(inputs["one_doc"], text)  # one huge document
        best = {}  # what -> best seconds
        with multiprocessing.get_context("spawn").Pool(workers, _bare_init, (model,)) as pool:
            pool.map(_bare_encode, [["warm up"]] * workers)
            for _ in range(rounds):
                start = time.perf_counter()
                bare_tokens = sum(pool.map(_bare_encode, chunks))
                best["bare"] = min(best.get("bare", float("inf")), time.perf_counter() - start)
                for key, path in inputs.items():
                    start = time.perf_counter()
                    meta = prepare_data.main(["--input", path, f"--tokenizer={model}",
                                              f"--out_dir={tmp}/out", f"--workers={workers}",
                                              "--force"])
                    best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
                    # minus the end-of-text tokens; cutting never changes the tokens
                    tokens = meta["tokens"]["val"] + meta["tokens"]["train"] - meta["documents"]
                    assert tokens == bare_tokens, (key, tokens, bare_tokens)
    result = {"megabytes": megabytes, "bare_mb_per_sec": megabytes / best["bare"]}
    for key in inputs:
        result[f"{key}_mb_per_sec"] = megabytes / best[key]
        result[f"{key}_vs_bare"] = best["bare"] / best[key]
    return result


def bench_big_text(sizes_mb=(200, 2000), workers=2):
    """prepare_data.py at its default settings with 2 workers on one big .txt of each size: MB/s
    end to end, and the peak memory of it and its workers summed (sampled every 50 ms)."""
    result = {}
    files = prepare_data.stdlib_files()[1]
    text = "".join(doc for source in files for doc in prepare_data.read_documents(source)).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.txt")
        for megabytes in sizes_mb:
            with open(path, "wb") as f:  # the standard library's source repeated, to a line
                for start in range(0, int(megabytes * 1e6), len(text)):
                    part = text[:int(megabytes * 1e6) - start]
                    f.write(part if len(part) == len(text) else part[:part.rfind(b"\n") + 1])
            common.log(f"bench_big_text: prepare_data.py on {os.path.getsize(path) / 1e6:,.0f} MB")
            command = [sys.executable, os.path.join(HERE, "prepare_data.py"), "--input", path,
                       f"--out_dir={tmp}/out", f"--workers={workers}", "--force"]
            peak, start = 0.0, time.perf_counter()
            with (open(os.path.join(tmp, "stderr"), "w+") as stderr,  # a full pipe would stop it
                  subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr) as run):
                while run.poll() is None:
                    peak = max(peak, process_tree_rss_mb(run.pid))
                    time.sleep(0.05)
                seconds = time.perf_counter() - start
                if run.returncode:
                    stderr.seek(0)
                    raise SystemExit(f"prepare_data.py on {megabytes} MB failed: "
                                     f"{stderr.read().splitlines()[-1]}")
            result[f"{megabytes}mb_mb_per_sec"] = os.path.getsize(path) / 1e6 / seconds
            result[f"{megabytes}mb_peak_mb"] = peak
    if len(sizes_mb) > 1:
        result["peak_ratio"] = (result[f"{max(sizes_mb)}mb_peak_mb"]
                                / result[f"{min(sizes_mb)}mb_peak_mb"])
    return result


# ----------------------------------------------------------------------------------------------
# GPU cases (--cases=gpu, CUDA only); the tests run them on a CPU at tiny sizes


def time_and_gpu_peak(function, repeats, device, warmups=0):
    """{"seconds": mean_time after `warmups` calls (the first compiles), "peak_mb": CUDA's peak}."""
    for _ in range(warmups):
        function()
    if device.type != "cuda":
        return {"seconds": mean_time(function, repeats)}
    torch.cuda.reset_peak_memory_stats()
    seconds = mean_time(function, repeats)
    return {"seconds": seconds, "peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20}


def host_syncs(function, device):
    """How often function makes the host wait for the GPU, as torch.cuda's sync debug mode sees it
    (.item(), copies to the host, nonzero, ...): {"host_syncs": count}, {} off CUDA."""
    if device.type != "cuda":
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
            sync()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"host_syncs": sum("synchroniz" in str(warning.message) for warning in caught)}


def case_gpu_train(which, batch, length, steps=10, compiled=True, config_overrides=None):
    """A training step as train.py takes it on a GPU (float32 weights, bf16 autocast, compiled,
    fused AdamW): tokens/s over `steps` in a row, peak memory, one step's host syncs."""
    model, idx = model_and_tokens(which, (batch, length), config_overrides, train=True,
                                  dtype=torch.float32)
    device = idx.device
    step = training_step(torch.compile(model) if compiled else model, which, idx,
                         common.autocast(device, torch.bfloat16), fused=device.type == "cuda")
    figures = time_and_gpu_peak(step, steps, device, warmups=3)
    return {"tokens_per_sec": batch * length / figures.pop("seconds"), **figures,
            **host_syncs(step, device)}


def case_gpu_attention(batch, length, heads=2, bias_heads=1, head_dim=128, repeats=20,
                       compiled=True):
    """doge.attend_short (T <= keep_window_size, the bias folded into q and k) beside causal flash
    without the bias, forward+backward of one layer, each compiled: ms per call, and the largest
    error of the output and every gradient against the float32 oracle (max |a - b| / max |b|)."""
    device, dtype = common.device_and_dtype()
    torch.manual_seed(0)
    q = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, bias_heads, length, head_dim, device=device, dtype=dtype)
            for _ in range(2))
    dt = torch.rand(batch, bias_heads, length, device=device) * 3  # float32, as the model has it
    inputs = [t.requires_grad_() for t in (q, k, v, dt)]
    grad_out = torch.randn_like(q)
    scale = head_dim ** -0.5

    def outputs_and_grads(attend):  # flash has no gradient for dt: None
        out = attend(*inputs, scale)
        return [out.detach(), *torch.autograd.grad(out, inputs, grad_out, allow_unused=True)]

    # the oracle: the definition in float32 with a window of T (every visible key kept)
    expected = outputs_and_grads(lambda q, k, v, dt, scale: doge.attention_by_definition(
        q.float(), k.float(), v.float(), dt.float(), length, scale))
    paths = {"folded": doge.attend_short,
             # the floor: plain causal SDPA, the dynamic bias left out (not exact)
             "flash_no_bias": lambda q, k, v, dt, scale: F.scaled_dot_product_attention(
                 q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])}
    result = {}
    for name, attend in paths.items():
        attend = torch.compile(attend) if compiled else attend
        actual = outputs_and_grads(attend)  # compiles, and the error
        outputs_and_grads(attend)
        result[f"{name}_ms"] = mean_time(lambda: outputs_and_grads(attend), repeats) * 1e3
        result[f"{name}_error"] = max(
            ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for a, b in zip(actual, expected) if a is not None)
    return result


def write_synthetic_data(directory, vocab_size, train_tokens=2 ** 21 + 1, val_tokens=2 ** 16 + 1,
                         seed=0):
    """A data directory train.py reads: one train and one val shard of random tokens, meta.json."""
    rng = np.random.default_rng(seed)
    shards = {"train": ["synthetic_train_000001.bin"], "val": ["synthetic_val_000000.bin"]}
    counts = {"train": train_tokens, "val": val_tokens}
    for split, count in counts.items():
        tokens = rng.integers(0, vocab_size, count).astype(prepare_data.dtype_for_vocab(vocab_size))
        prepare_data.write_shard(os.path.join(directory, shards[split][0]), tokens)
    prepare_data.write_meta(directory, {"complete": True, "vocab_size": vocab_size,
                                        "shards": shards, "tokens": counts})


TINY_RUN = ["config/doge_tiny.py", "--max_iters=30", "--log_interval=10"]  # the CPU demo's


def train_py_figures(args):
    """tokens/s and MFU of train.py's last log window, run with args (evaluating at the end)."""
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, "train.py", *args, "--eval_interval=0", "--eval_iters=1",
                   f"--out_dir={out_dir}"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
        if result.returncode != 0:
            raise SystemExit(f"train.py failed:\n{result.stderr[-2000:]}")
        return last_log_window(out_dir)


def last_log_window(out_dir):
    """tokens/s and MFU of the last logged window in out_dir/log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if '"tokens_per_sec"' in line]
    return {"tokens_per_sec": records[-1]["tokens_per_sec"], "mfu": records[-1]["mfu"]}


def case_gpu_train_py(iters, vocab_size=32768, args=("config/doge_20m.py",)):
    """train.py on a recipe (the 20M one: 16 micro-steps of 16 x 2048 tokens a step) over
    synthetic shards: tokens/s and MFU of its last log window (the first holds the compile)."""
    with tempfile.TemporaryDirectory() as data_dir:
        write_synthetic_data(data_dir, vocab_size)
        return train_py_figures([*args, f"--data_dir={data_dir}", f"--max_iters={iters}",
                                 f"--log_interval={max(1, iters // 3)}", "--save_interval=0"])


def case_gpu_long_train(which, length, steps=3, config_overrides=None):
    """A training step at B=1 and `length` tokens, bf16 weights, uncompiled (past the window ours
    compiles its FlexAttention call itself): seconds, peak memory, or out_of_memory."""
    model, idx = model_and_tokens(which, (1, length), config_overrides, train=True)
    try:
        return time_and_gpu_peak(training_step(model, which, idx), steps, idx.device, warmups=2)
    except torch.cuda.OutOfMemoryError:
        return {"out_of_memory": 1}


def case_gpu_long_forward(which, length, repeats=3, config_overrides=None):
    """Forward at B=1 and `length` tokens with full logits (bf16, uncompiled): seconds, peak."""
    model, idx = model_and_tokens(which, (1, length), config_overrides)
    return time_and_gpu_peak(lambda: logits_of(model, which, idx), repeats, idx.device, warmups=1)


def case_gpu_decode(which, batch, new_tokens=256, rounds=2, config_overrides=None):
    """Greedy decoding after an 8-token prompt: tokens/s over `new_tokens` from the third token
    (ours captures its CUDA graph at the second), best of `rounds` runs."""
    model, prompt = model_and_tokens(which, (batch, 8), config_overrides)
    generate_timestamps(model, which, prompt, 4)  # warms up
    runs = [generate_timestamps(model, which, prompt, new_tokens + 3) for _ in range(rounds)]
    seconds = min(stamps[-1] - stamps[2] for stamps in runs)
    return {"tokens_per_sec": batch * new_tokens / seconds}


# ----------------------------------------------------------------------------------------------
# Driver


class CaseFailed(Exception):
    """A case failed; the message is the last line of its error."""


def run_worker(name, which, threads):
    """One case's numbers from a fresh process; if it fails, its error's tail and CaseFailed."""
    command = [sys.executable, __file__, f"--worker={name}", f"--which={which}",
               f"--threads={threads}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"bench case {name} ({which}) failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise CaseFailed(lines[-1])
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_case(cfg):
    """--worker=NAME: measure that case in this process and print its numbers as one JSON line."""
    found = [(mode, measure) for cases in CASES.values() for name, mode, measure in cases
             if name == cfg.worker and mode != "here"]
    if not found:
        raise SystemExit(f"bench.py: no case {cfg.worker!r} runs in a worker")
    mode, measure = found[0]
    if mode == "apart" and cfg.which not in ("ours", "ref"):
        raise SystemExit(f"bench.py: case {cfg.worker} runs --which=ours or --which=ref")
    print(json.dumps(measure(cfg.which) if mode == "apart" else measure()))


def case_numbers(name, mode, measure, cfg):
    """(ours, ref) of one case, run as its mode says (see CASES); ref is {} without a reference."""
    if mode == "here":
        try:
            return measure(cfg), {}
        except SystemExit as e:
            raise CaseFailed(str(e.code).splitlines()[0]) from None
    if mode == "turns":
        both = run_worker(name, "both", cfg.threads)
        return both["ours"], both["ref"]
    if mode == "apart":
        return run_worker(name, "ours", cfg.threads), run_worker(name, "ref", cfg.threads)
    return run_worker(name, "alone", cfg.threads), {}


def ratio_rows(name, ours, ref):
    """(name, key, ours, ref, ratio) for each of ours' keys, with a ratio where both report a rate,
    a time or a size; then what only the reference reports (out_of_memory where ours ran)."""
    rows = []
    for key, value in ours.items():
        if ref.get(key) and any(unit in key for unit in ("per_sec", "seconds", "ms_", "_mb")):
            ratio = value / ref[key] if "per_sec" in key else ref[key] / value
            rows.append((name, key, value, ref[key], ratio))
        else:
            rows.append((name, key, value, None, None))
    return rows + [(name, key, None, value, None) for key, value in ref.items() if key not in ours]


def run_group(cases, cfg):
    """Run the cases and print their rows (a case that fails, one line); return how many failed."""
    failed = 0
    for name, mode, measure in cases:
        try:
            ours, ref = case_numbers(name, mode, measure, cfg)
        except CaseFailed as e:
            print(f"{name:<16} failed: {e}", flush=True)
            failed += 1
            continue
        for _, key, ours_value, ref_value, ratio in ratio_rows(name, ours, ref):
            ours_text = f"{'n/a':>10}" if ours_value is None else f"{ours_value:>10.4g}"
            ref_text = f"{'':>10}" if ref_value is None else f"{ref_value:>10.4g}"
            ratio_text = "" if ratio is None else f"{ratio:>6.2f}x"
            print(f"{name:<16} {key:<18} {ours_text} {ref_text} {ratio_text}".rstrip(), flush=True)
    return failed


def main(argv=None):
    cfg = apply_config(BenchConfig(), sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    if cfg.worker:
        return run_case(cfg)
    device, dtype = common.device_and_dtype()
    default = [group for group in CASES if group != "gpu" or device.type == "cuda"]
    selected = cfg.cases.split(",") if cfg.cases else default
    unknown = [group for group in selected if group not in CASES]
    if unknown:
        raise SystemExit(f"bench.py: unknown case group {unknown[0]!r}; choose from "
                         f"{', '.join(CASES)}")
    if "gpu" in selected and device.type != "cuda":
        print("bench.py: --cases=gpu needs a CUDA GPU and there is none here; nothing measured",
              file=sys.stderr)
        sys.exit(2)
    print(f"# bench.py on {device.type} ({dtype}), {cfg.threads} threads, "
          f"torch {torch.__version__}")
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    print(f"{'case':<16} {'metric':<18} {'ours':>10} {'reference':>10} {'ratio':>7}")
    failed = sum(run_group(CASES[group], cfg) for group in selected)
    print("ratio: ours/reference for rates, reference/ours for seconds, ms and MB (>1 is better)")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

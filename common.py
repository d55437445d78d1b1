"""
What every program here shares, and nothing of the model: files written atomically, errors in one
line, the machine's load, sizes as one reads them, and the one rule for where a program runs. It
imports no module of this project (doge.py imports it, and so can be copied with it alone).
"""

import contextlib
import os
import re
import secrets
import sys

# ----------------------------------------------------------------------------------------------
# Files written atomically: a file that exists under its real name is complete

TEMPORARY_FILE = re.compile(r"^(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # atomic_path's temporary files


@contextlib.contextmanager
def atomic_path(path):
    """The one atomic writer: a temporary path in path's directory (<name>.<random>.tmp) for the
    block to write; when it completes, the file is synced to disk and renamed to path, so a crash
    (even a power loss) never leaves a partial file under the real name; on failure it is removed.
    The file gets open()'s mode (0o666 less the umask), not mkstemp's private 0o600."""
    temp_path = f"{os.path.abspath(path)}.{secrets.token_hex(4)}.tmp"
    try:  # created inside the try: a Ctrl-C that lands just after the file is made still removes it
        os.close(os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield temp_path
        fd = os.open(temp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp_path)
        raise


@contextlib.contextmanager
def atomic_open(path):
    """path open for binary writing through atomic_path."""
    with atomic_path(path) as temp_path, open(temp_path, "wb") as f:
        yield f


def atomic_write(path, write):
    """write(temp_path) writes the file (torch.save, safetensors, ...) through atomic_path."""
    with atomic_path(path) as temp_path:
        write(temp_path)


def write_file_atomically(path, data: bytes):
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path, text):
    """Write text (UTF-8) to path through atomic_path."""
    write_file_atomically(path, text.encode("utf-8"))


def remove_temporary_files(directory, ours=None):
    """Delete what atomic_path left in directory when a process died in mid-write: only the names it
    makes, and of those only the ones whose real name ours(name) accepts (all when None). Returns
    how many files and bytes."""
    matches = [TEMPORARY_FILE.match(name) for name in os.listdir(directory)] \
        if os.path.isdir(directory) else []
    paths = [os.path.join(directory, m.string) for m in matches
             if m and (ours is None or ours(m["name"]))]
    paths = [path for path in paths if os.path.isfile(path)]
    sizes = [os.path.getsize(path) for path in paths]
    for path in paths:
        os.remove(path)
    return len(paths), sum(sizes)


# ----------------------------------------------------------------------------------------------
# Errors, the log, the machine


def one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def log(message):
    print(message, file=sys.stderr, flush=True)


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_machine_note(load=None, cores=None):
    """One line when the CPU is oversubscribed: the 1-minute load average (processes running or
    waiting to run) more than half as high again as the cores this process may use, as when several
    programs each take every core: why a run is slower than the docs' figures. None on a quiet
    machine, or where the load average cannot be read."""
    try:
        load = os.getloadavg()[0] if load is None else load
    except (AttributeError, OSError):  # no load average (Windows)
        return None
    cores = cores or available_cpus()
    if load <= 1.5 * cores:
        return None
    return (f"note: the CPU is busy: load average {load:.1f} over {cores} core"
            f"{'s' * (cores > 1)} available; expect slower than the docs' figures")


def size_text(size):
    """A size in bytes as one reads it: '27.3 KB', '8.0 MB', '1.2 GB' (units of 1024)."""
    for unit in ("KB", "MB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GB"


# ----------------------------------------------------------------------------------------------
# Where a program runs

DTYPES = ("float32", "bfloat16", "float16")


def device_and_dtype(device="auto", dtype="auto"):
    """The one rule for where a program runs: (torch.device, torch dtype). auto: cuda and bfloat16
    when torch sees a GPU (float32 on one without bfloat16), else cpu and float32; a program's
    --device ('cpu', 'cuda', 'cuda:1') and --dtype override either. A value that cannot work is a
    one-line SystemExit."""
    import torch  # here: the data side imports this file and never needs torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"error: device {device!r} is not 'auto', 'cpu', 'cuda' or "
                         f"'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: device {str(device)!r}, but this machine has no CUDA GPU torch "
                         f"can use (device=cpu)")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() \
            else "float32"
    if dtype not in DTYPES:
        raise SystemExit(f"error: dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return device, getattr(torch, dtype)


def autocast(device, dtype):
    """The autocast context of a program whose weights stay in float32 and whose products run in
    dtype (eval.py, recall.py): none for float32."""
    import torch
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib, an optional package)


def pyplot(required=True):
    """matplotlib's pyplot, drawing to files; without the package, a one-line SystemExit (None
    when the picture is not required)."""
    try:
        import matplotlib
    except ImportError:
        if not required:
            return None
        raise SystemExit("error: pictures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """fig as a PNG file, written atomically."""
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=100))

"""
The model loaded for a program, and the generation core that sample.py and serve.py stand on.
"""

from common import one_line
from doge import Doge, local_model_path


# ----------------------------------------------------------------------------------------------
# Loading


def load_model(init_from, device="cpu", dtype=None, setting="--init_from="):
    """(the model in eval mode, its local path) of init_from: a Hugging Face Doge directory or hub
    name (fetched: doge.local_model_path), a train.py out_dir (its newest checkpoint) or
    checkpoint file, on device in dtype (None: as saved). Whatever fails is one line (SystemExit)
    that names it, after `setting` for a path that is not there."""
    try:
        path = local_model_path(init_from)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {setting}{e}") from None
    try:
        return Doge.from_pretrained(path, device=device, dtype=dtype).eval(), path
    except (FileNotFoundError, ValueError) as e:  # they name the file and what is wrong
        raise SystemExit(f"error: {e}") from None
    except Exception as e:  # a damaged file: torch and safetensors raise many kinds
        raise SystemExit(f"error: {path}: {one_line(e)}") from None

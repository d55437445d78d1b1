"""
Settings from the command line: an optional config file, then --key=value overrides.

    python train.py config/doge_tiny.py --max_iters=200 --learning_rate=3e-3 --compile

A config file is plain assignments (`max_iters = 8000`); `--key=value` is a Python literal, else
a bare string, and a bare `--flag` is True. Every value is checked against the setting's type; a
mistake exits with one line (docs/reference.md has the rules). Unlike nanoGPT's configurator,
nothing is exec'd into the caller's globals: the defaults come in as a dataclass instance or
dict, and a new one comes back.
"""

import ast
import dataclasses
import difflib
import os
import sys
import types
import typing

# ----------------------------------------------------------------------------------------------
# Type checking


def _kinds(expected):
    """The arms of a union annotation (int | None -> [int, NoneType]), or [expected]."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return list(typing.get_args(expected))
    return [expected]


def _convert(value, expected):
    """value made to fit the type `expected`, or raise TypeError."""
    for kind in _kinds(expected):
        origin = typing.get_origin(kind) or kind
        if kind is typing.Any:
            return value
        if kind is type(None) and value is None:
            return value
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin in (tuple, list) and isinstance(value, (tuple, list)):
            return origin(value)
        if origin is dict and isinstance(value, dict):
            return value
    names = " | ".join(getattr(kind, "__name__", str(kind)) for kind in _kinds(expected))
    raise TypeError(f"expected {names}, got {type(value).__name__} {value!r}")


def _expected_type(defaults, key):
    """The type a setting must have: its dataclass annotation, else its default's type."""
    if dataclasses.is_dataclass(defaults):
        hints = typing.get_type_hints(type(defaults))
        if key in hints:
            return hints[key]
    default = defaults[key] if isinstance(defaults, dict) else getattr(defaults, key)
    return typing.Any if default is None else type(default)


# ----------------------------------------------------------------------------------------------
# Parsing


def _keys(defaults):
    if dataclasses.is_dataclass(defaults):
        return [f.name for f in dataclasses.fields(defaults)]
    return list(defaults)


def parse_value(text):
    """A Python literal if it is one, else the text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def config_files():
    """The recipe files in the project's config/ folder, sorted."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
    return sorted(name for name in os.listdir(folder) if name.endswith(".py"))


def _read_config_file(path):
    """{name: value} of the plain assignments in a config file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path!r} not found; config/ holds: "
                         f"{', '.join(config_files())}")
    namespace = {"__file__": os.path.abspath(path), "__name__": "__config__"}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except Exception as e:  # a broken config file: one line, not a traceback
        raise SystemExit(f"error: config file {path}: {type(e).__name__}: {e}") from None
    return {name: value for name, value in namespace.items()
            if not name.startswith("_")
            and not isinstance(value, (types.ModuleType, types.FunctionType, type))}


def apply_config(defaults, argv):
    """Apply the config files and --key=value overrides in argv (a list of strings, without the
    program name) to `defaults`: a dataclass instance, a dict, or a list/tuple of them (a key
    then belongs to the first one that has it). Returns new objects of the same shape; the
    defaults are not modified. Exits with a one-line message on any error."""
    many = isinstance(defaults, (list, tuple))
    targets = list(defaults) if many else [defaults]
    owner = {}  # key -> index of the target holding it
    for index, target in enumerate(targets):
        for key in _keys(target):
            owner.setdefault(key, index)

    settings = []  # (key, value, where it came from, the text given), in the order given
    for arg in argv:
        if arg in ("-h", "--help"):
            break  # the settings given so far are shown
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            if has_value:
                settings.append((key, parse_value(text), arg, text))
            else:  # a bare --flag
                settings.append((key, True, arg, None))
        elif arg.endswith(".py") or os.path.isfile(arg):
            for key, value in _read_config_file(arg).items():
                settings.append((key, value, arg, None))
        else:
            raise SystemExit(f"error: unexpected argument {arg!r}: give a config file (.py) and "
                             f"--key=value overrides")

    updates = [{} for _ in targets]
    for key, value, source, raw in settings:
        if key not in owner:
            close = difflib.get_close_matches(key, owner, n=3, cutoff=0.6)
            raise SystemExit(f"error: unknown setting {key!r} (from {source}); " + (
                f"did you mean {' or '.join(close)}?" if close else "--help lists them all"))
        target = targets[owner[key]]
        expected = _expected_type(target, key)
        try:
            value = _convert(value, expected)
        except TypeError as e:
            if raw is None:  # from a config file, or a bare --flag
                raise SystemExit(f"error: setting {key!r} (from {source}): {e}") from None
            try:  # e.g. --out_dir=1e3: a literal, but the setting wants the text itself
                value = _convert(raw, expected)
            except TypeError:
                raise SystemExit(f"error: setting {key!r} (from {source}): {e}") from None
        updates[owner[key]][key] = value

    results = []
    for target, update in zip(targets, updates):
        if dataclasses.is_dataclass(target):
            results.append(dataclasses.replace(target, **update))
        else:
            results.append({**target, **update})
    if "-h" in argv or "--help" in argv:
        show_settings(results, {key: source for key, _, source, _ in settings})
    return results if many else results[0]


def show_settings(targets, sources):
    """--help: every setting with its value, and where a value that is not the default came from."""
    print("settings (a config file, then --key=value):", file=sys.stderr)
    for target in targets:
        for key in _keys(target):
            value = target[key] if isinstance(target, dict) else getattr(target, key)
            where = f"  # {sources[key]}" if key in sources else ""
            print(f"  --{key}={value!r}{where}", file=sys.stderr)
    raise SystemExit(0)

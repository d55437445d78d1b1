"""The README's and docs/'s code blocks run as written, and their links lead somewhere.

Every ```python, ```bash and ```sh block runs, page by page in the order a reader meets them, in a
temporary copy of the repository that already holds what the quick start makes: data/default
(the default corpus, at a tiny size) and out/doge-tiny (config/doge_tiny.py trained a few steps).
A marker line right before a fence changes that:

    <!-- not run: REASON -->                       skipped, with its reason (a GPU, the network...)
    <!-- run at tiny size: SCRIPT ARGS; ... -->    ARGS are appended to every `python SCRIPT`
                                                   command of the block (e.g. train.py --max_iters=4)

Other fences (```text: output, file trees) are not code, and every fence names its language.
The blocks run with no network: a block that needs one says so in its marker. A block writes
under out/ or data/ (which .gitignore covers): after each, `git status` of the copy shows nothing.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_LANGUAGES = {"python", "bash", "sh"}
MARKER = re.compile(r"^<!-- (not run|run at tiny size): (.*) -->$")
FENCE = re.compile(r"^( *)```(\S*)\s*$")

# What the fixture trains for out/doge-tiny, and the shrinking of a data preparation: a few steps
# of the demo's model on a sliver of the default corpus.
TINY_TRAIN = ["--max_iters=4", "--warmup_iters=1", "--decay_iters=1", "--eval_interval=2",
              "--eval_iters=1", "--log_interval=1"]
TINY_DATA = dict(vocab_size=512, sample_bytes=200_000, max_tokens=60_000, val_tokens=6_000)
TIMEOUT = 300  # seconds a block may take
# What a block needs beyond requirements.txt, by what it contains: such a block is skipped
# where the optional package is missing, as the other tests skip.
OPTIONAL = {"transformers": ["transformers"], "--chat": ["tokenizers", "jinja2"],
            "--task=mask": ["matplotlib"], "--plot": ["matplotlib"]}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: tuple  # (kind, text) or None

    @property
    def name(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page):
    """Every fenced block of a page, with the marker line right before it (if any)."""
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == indent + "```")
        body = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        marker = MARKER.match(before)
        blocks.append(Block(page, i + 1, language, body + "\n", marker.groups() if marker else None))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]
CODE_BLOCKS = [block for block in ALL_BLOCKS if block.language in CODE_LANGUAGES]


def tiny_arguments(marker_text):
    """{script: [args]} from 'train.py --max_iters=4; sample.py --max_new_tokens=8'."""
    overrides = {}
    for part in marker_text.split(";"):
        words = shlex.split(part)
        assert words and words[0].endswith(".py"), f"a tiny-size marker part names a script: {part!r}"
        overrides[words[0]] = words[1:]
    return overrides


def optional_packages(block):
    return [package for word, packages in OPTIONAL.items() if word in block.code
            for package in packages]


# A `python` on PATH that appends a block's tiny-size arguments to `python SCRIPT ...`.
PYTHON_SHIM = """#!{executable}
import json, os, sys
args = sys.argv[1:]
extra = json.loads(os.environ.get("DOCS_TINY_ARGUMENTS", "{{}}"))
if args and args[0] in extra:
    args += extra[args[0]]
os.execv({executable!r}, [{executable!r}, *args])
"""


def copy_repository(destination):
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "out", "models", "__pycache__", ".pytest_cache"))
    return destination


def run_code(block, directory, shim_dir):
    env = {**os.environ, "PATH": f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(directory),
           "DOCS_TINY_ARGUMENTS": json.dumps(
               tiny_arguments(block.marker[1]) if block.marker else {})}
    if block.language == "python":
        script = directory / "docs_snippet.py"
        script.write_text(block.code)
        command = [str(shim_dir / "python"), str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    result = subprocess.run(command, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (
        f"{block.name} exited with {result.returncode}:\n{block.code}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def shim_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bin")
    (directory / "python").write_text(PYTHON_SHIM.format(executable=sys.executable))
    (directory / "python").chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory, shim_dir):
    """A copy of the repository after the quick start's first line, at tiny size: the default
    corpus prepared (a sliver of it), out/doge-tiny trained a few steps, and a sample written."""
    directory = copy_repository(tmp_path_factory.mktemp("quick_start") / "repo")
    prepare = ("import prepare_data; prepare_data.prepare('data/default', "
               + ", ".join(f"{key}={value!r}" for key, value in TINY_DATA.items()) + ")")
    demo = Block(ROOT / "README.md", 0, "bash",
                 f"python -c {shlex.quote(prepare)}\n"
                 "python train.py config/doge_tiny.py && python sample.py\n",
                 ("run at tiny size", "train.py " + " ".join(TINY_TRAIN)
                  + "; sample.py --max_new_tokens=16"))
    run_code(demo, directory, shim_dir)
    (directory / "reviews.jsonl").write_text("".join(  # the file classification.md's user has
        json.dumps({"text": text, "label": label}) + "\n"
        for text, label in [("a fine and useful module", 1), ("broken, slow and confusing", 0)] * 8))
    if shutil.which("git"):  # a clone as a reader has it: what the blocks leave shows in git status
        for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=docs", "-c",
                        "user.email=docs@localhost", "-c", "commit.gpgsign=false", "commit", "-qm",
                        "the quick start's copy"]):
            subprocess.run(["git", *command], cwd=directory, check=True, capture_output=True)
    return directory


def files_left(directory):
    """What git status shows in a copy (a clone as a reader has it): files the blocks wrote
    outside out/ and data/ (ignored), or changed; [] without git."""
    if not (directory / ".git").is_dir():
        return []
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                            cwd=directory, capture_output=True, text=True, check=True).stdout
    return [line for line in status.splitlines() if line[3:] != "docs_snippet.py"]


@pytest.fixture(scope="module")
def page_copies(tmp_path_factory, quick_start):
    """One copy of quick_start per page, and which of its blocks have run there."""
    copies = {}

    def copy_for(page):
        if page not in copies:
            destination = tmp_path_factory.mktemp(page.stem) / "repo"
            shutil.copytree(quick_start, destination, symlinks=True)
            copies[page] = (destination, set())
        return copies[page]
    return copy_for


@pytest.mark.parametrize("block", CODE_BLOCKS, ids=[block.name for block in CODE_BLOCKS])
def test_code_block_runs(block, page_copies, shim_dir):
    """A block runs after the blocks before it on its page, as a reader runs them."""
    if block.marker and block.marker[0] == "not run":
        assert block.marker[1].strip(), f"{block.name}: a block that is not run says why"
        pytest.skip(block.marker[1])
    earlier = [other for other in CODE_BLOCKS if other.page == block.page
               and other.line < block.line and not (other.marker and other.marker[0] == "not run")]
    for needed in {package for other in [*earlier, block] for package in optional_packages(other)}:
        pytest.importorskip(needed)
    directory, done = page_copies(block.page)
    for other in earlier:
        if other.line not in done:
            run_code(other, directory, shim_dir)
            done.add(other.line)
    run_code(block, directory, shim_dir)
    done.add(block.line)
    left = files_left(directory)
    assert left == [], (f"{block.name} (or a block before it) left {left} behind, outside out/ "
                        f"and data/ (which .gitignore covers): write under out/ or data/")


def test_every_fence_names_its_language_and_markers_are_well_formed():
    for block in ALL_BLOCKS:
        assert block.language, f"{block.name}: say ```text for output, ```bash or ```python for code"
        if block.marker:
            assert block.language in CODE_LANGUAGES, f"{block.name}: a marker on a block that is not code"
            if block.marker[0] == "run at tiny size":
                tiny_arguments(block.marker[1])
    for page in PAGES:  # a marker that is not right before a fence is a typo
        lines = page.read_text().split("\n")
        for i, line in enumerate(lines):
            if MARKER.match(line.strip()):
                following = next(later for later in lines[i + 1:] if later.strip())
                assert FENCE.match(following), f"{page.name}:{i + 1}: a marker not before a fence"


# ----------------------------------------------------------------------------------------------
# links


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.S | re.M)
    return {anchor(match) for match in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def links(page):
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.S | re.M)  # not in code
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_lead_to_a_file_and_heading(page):
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        assert destination.exists(), f"{page.name}: link to {target}: no such file"
        if fragment:
            assert fragment in anchors(destination), \
                f"{page.name}: link to {target}: {destination.name} has no heading {fragment!r}"


def test_docs_pages_link_back_to_the_readme_and_the_readme_links_every_page():
    readme_links = links(ROOT / "README.md")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_links, f"README.md does not link docs/{page.name}"
        assert any(target.startswith("../README.md") for target in links(page)), \
            f"docs/{page.name} does not link back to the README"


def test_citations_of_docs_reference_name_its_sections():
    """A citation of docs/reference.md (the page, a comma, a section title) in the code or the
    docs names a section that the page has."""
    sections = re.findall(r"^## (.*)$", (ROOT / "docs" / "reference.md").read_text(), flags=re.M)
    files = [*PAGES, *ROOT.glob("*.py"), *ROOT.glob("config/*.py"), *ROOT.glob("tests/*.py")]
    for path in [path for path in files if path.name != "test_docs.py"]:  # its messages would match
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text())  # a title may wrap, in a comment too
        for cited in re.findall(r"docs/reference\.md, \[?([^\]\n]*)", text):
            assert any(cited.startswith(section) for section in sections), \
                f"{path.name} cites {cited!r} in docs/reference.md, whose sections are {sections}"

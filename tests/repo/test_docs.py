"""The docs' code runs: every Python block of README.md and docs/**/*.md, every shell command they show.

Blocks are found generically (docs/testing.md states the conventions):
- a fenced ```python block runs in a fresh process, with the globals of the setup its marker names
  (`<!-- docs-test: setup=NAME -->` on the line before it; tests/docs_setups.py); no marker: no globals;
- a shell command is a line of a fenced bash/sh/shell/console block, or of an indented block whose first line
  starts with a command (python, pip, torchrun, ...). `pip install` lines must name extras setup.py has;
  `python -m pytest` lines must name paths that exist; every other command runs at a small size (the flags
  of SMALL_ARGS appended: argparse keeps the last value) in a folder with small input files, unless it says
  it is long, with its expected time (a trailing comment `# ~8 min ...` or `<!-- docs-test: long TIME -->`
  before its block), or cannot run here (`<!-- docs-test: skip REASON -->`).
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest
from harness import REPO_ROOT

ROOT = REPO_ROOT
SETUPS_SCRIPT = os.path.join(ROOT, "tests", "docs_setups.py")

SHELL_FENCES = {"bash", "sh", "shell", "console"}
COMMAND = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(?:python3?|pip3?|torchrun|bash|sh|nice|perf|vllm|llama-server|ollama)\b")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<body>.*?)\s*-->$")
DURATION = re.compile(r"\d+(?:\.\d+)?\s*(?:s|sec|seconds?|min|minutes?|h|hours?)\b|\b(?:seconds|minutes|hours|days)\b")

# Flags that make a documented command small: appended after the documented ones.
SMALL_ARGS: dict[str, list[str]] = {
    "training.demo": ["--steps", "2", "--train-size", "64", "--val-size", "16", "--batch-size", "16",
                      "--no-progress", "--jobs", "1"],
    "training.train": ["--steps", "2", "--train-size", "64", "--val-size", "16", "--batch-size", "16",
                       "--no-progress", "--checkpoint-every", "2"],
}


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the block's first code line
    kind: str  # "python", "shell" or "other"
    code: str
    marker: str  # the body of the `<!-- docs-test: ... -->` comment before the block, or ""

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    found = ["README.md"] + sorted(glob.glob("docs/**/*.md", root_dir=ROOT, recursive=True))
    return [page for page in found if os.path.isfile(os.path.join(ROOT, page))]


def marker_before(lines: list[str], index: int) -> str:
    """The docs-test marker on the nearest non-blank line above `lines[index]`, or ""."""
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    match = MARKER.match(lines[j].strip()) if j >= 0 else None
    return match.group("body") if match else ""


def blocks_of(page: str, text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if fence:
            indent, ticks, language = fence.groups()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(ticks):
                end += 1
            code = "\n".join(body[len(indent):] if body.startswith(indent) else body for body in lines[i + 1 : end])
            language = language.lower()
            kind = "python" if language == "python" else "shell" if language in SHELL_FENCES else "other"
            blocks.append(Block(page, i + 2, kind, code + "\n", marker_before(lines, i)))
            i = end + 1
            continue
        after = lines[i - 1].strip() if i else ""
        indented = line.startswith("    ") and line.strip() and (not after or MARKER.match(after))
        if indented:
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                if not lines[end].strip() and (end + 1 >= len(lines) or not lines[end + 1].startswith("    ")):
                    break
                end += 1
            code = "\n".join(body[4:] for body in lines[i:end])
            kind = "shell" if COMMAND.match(code.lstrip()) else "other"
            blocks.append(Block(page, i + 1, kind, code + "\n", marker_before(lines, i)))
            i = end
            continue
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    found = []
    for page in pages():
        with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
            found += blocks_of(page, handle.read())
    return found


@dataclass
class Command:
    block: Block
    text: str  # continuations joined, comment dropped
    comment: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def split_comment(line: str) -> tuple[str, str]:
    """(command, trailing `# comment`) of one shell line; a `#` inside quotes is not a comment."""
    quote = ""
    for k, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (k == 0 or line[k - 1] == " "):
            return line[:k].rstrip(), line[k:]
    return line, ""


def commands_of(block: Block) -> list[Command]:
    """The block's commands: `\\` continuations joined, comment lines skipped, `&&` chains split."""
    joined, pending = [], ""
    for raw in block.code.splitlines():
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            joined.append(" ".join(pending.split()))
        pending = ""
    commands = []
    for line in joined:
        code, comment = split_comment(line)
        for part in code.split("&&"):
            if part.strip():
                commands.append(Command(block, part.strip(), comment))
    return commands


def all_commands() -> list[Command]:
    return [command for block in all_blocks() if block.kind == "shell" for command in commands_of(block)]


def setup_extras() -> set[str]:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require" and isinstance(node.value, ast.Dict):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    raise AssertionError("setup.py: no literal extras_require dict")


def classify(command: Command) -> str:
    """"pip", "pytest", "long", "skip" or "run"."""
    argv = command.argv
    words = [w for w in argv if not re.match(r"^[A-Z_]+=", w)]
    if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
        return "pip"
    if words[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if command.block.marker.startswith("skip"):
        return "skip"
    if command.block.marker.startswith("long") or DURATION.search(command.comment):
        return "long"
    return "run"


PYTHON_BLOCKS = [block for block in all_blocks() if block.kind == "python"]
RUN_COMMANDS = [command for command in all_commands() if classify(command) == "run"]


def test_the_docs_have_blocks_to_test():
    # the discovery itself: a parser that finds nothing would pass every test below
    assert len(PYTHON_BLOCKS) >= 8 and len(RUN_COMMANDS) >= 3, (len(PYTHON_BLOCKS), len(RUN_COMMANDS))
    readme = [block for block in all_blocks() if block.page == "README.md"]
    assert {block.kind for block in readme} >= {"python", "shell"}


def run_python_block(block: Block, folder: str) -> subprocess.CompletedProcess:
    setup = "none"
    if block.marker:
        match = re.fullmatch(r"setup=(\S+)", block.marker)
        assert match, f"{block.name}: a Python block's marker is `setup=NAME`, got {block.marker!r}"
        setup = match.group(1)
    path = os.path.join(folder, "block.py")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(block.code)
    env = {**os.environ, "PYTHONPATH": ROOT, "DOCS_BLOCK_NAME": f"{block.name} (setup={setup})"}
    return subprocess.run([sys.executable, SETUPS_SCRIPT, setup, path], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.name)
def test_python_block_runs(block, tmp_path):
    result = run_python_block(block, str(tmp_path))
    assert result.returncode == 0, f"{block.name} failed:\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("command", [c for c in all_commands() if classify(c) == "pip"], ids=lambda c: c.block.name)
def test_pip_install_names_existing_extras(command):
    extras = setup_extras()
    named = {extra.strip() for group in re.findall(r"\.\[([^\]]+)\]", command.text) for extra in group.split(",")}
    assert named <= extras, f"{command.block.name}: `{command.text}` names extras {sorted(named - extras)}; " \
                            f"setup.py has {sorted(extras)}"


@pytest.mark.parametrize("command", [c for c in all_commands() if classify(c) == "pytest"],
                         ids=lambda c: c.block.name)
def test_pytest_commands_name_existing_paths(command):
    argv = command.argv[command.argv.index("pytest") + 1 :]  # after `[VAR=value ...] python -m pytest`
    paths = [word.split("::")[0] for word in argv if not word.startswith("-")]
    missing = [path for path in paths if not os.path.exists(os.path.join(ROOT, path))]
    assert paths and not missing, f"{command.block.name}: `{command.text}`: no such path {missing}"


@pytest.mark.parametrize("command", [c for c in all_commands() if classify(c) in ("long", "skip")],
                         ids=lambda c: c.block.name)
def test_commands_not_run_say_why(command):
    kind = classify(command)
    if kind == "skip":
        assert len(command.block.marker.split(None, 1)) == 2, f"{command.block.name}: `skip` needs a reason"
    else:
        said = command.block.marker if command.block.marker.startswith("long") else command.comment
        assert DURATION.search(said), f"{command.block.name}: a long command states its expected time: {said!r}"


def write_inputs(folder: str) -> None:
    """The small files the documented commands read: image/caption pairs and triplet CSVs."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    colors = ["red", "blue", "green", "yellow"]
    rows = []
    for i, color in enumerate(colors * 8):
        name = f"images/{i:02d}.png"
        Image.new("RGB", (32, 32), color).save(os.path.join(folder, name))
        rows.append((name, f"a {color} square", f"a square that is {color}", f"no {color} square"))
    with open(os.path.join(folder, "pairs.csv"), "w", encoding="utf-8") as handle:
        handle.write("filepath,caption\n" + "".join(f"{r[0]},{r[1]}\n" for r in rows))
    with open(os.path.join(folder, "pairs.tsv"), "w", encoding="utf-8") as handle:
        handle.write("filepath\tcaption\n" + "".join(f"{r[0]}\t{r[1]}\n" for r in rows))
    for name in ("triplets.csv", "train.csv", "val.csv"):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write("filepath,caption,paraphrase,negation\n" + "".join(",".join(r) + "\n" for r in rows))


def small(command: Command) -> list[str]:
    argv = [word for word in command.argv if not re.match(r"^[A-Z_]+=", word)]
    if argv[0] == "nice":
        argv = argv[1:]
    if argv[0] == "torchrun":  # the same launcher, from the test's Python
        module_at = argv.index("-m")
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:], *SMALL_ARGS.get(argv[module_at + 1], [])]
    assert argv[:2] == ["python", "-m"], (
        f"{command.block.name}: `{command.text}` is neither run by this test (python -m MODULE ...) nor marked "
        "long or skip (docs/testing.md)"
    )
    return [sys.executable, *argv[1:], *SMALL_ARGS.get(argv[2], [])]


@pytest.fixture(scope="module")
def inputs_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("docs_commands"))
    write_inputs(folder)
    return folder


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: f"{c.block.name}:{' '.join(c.argv[:3])}")
def test_shell_command_runs_at_a_small_size(command, inputs_folder):
    # One folder per page, the page's commands in order: a later command reads what an earlier one wrote
    # (training.evaluate the checkpoint of training.train).
    folder = os.path.join(inputs_folder, command.block.page.replace("/", "_"))
    if not os.path.isdir(folder):
        os.makedirs(folder)
        write_inputs(folder)
    argv = small(command)
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command.block.name}: `{shlex.join(argv)}` failed:\n{result.stderr[-4000:]}"


def load_refresh_docs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("refresh_docs", os.path.join(ROOT, "tools", "refresh_docs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_refresh_docs_quotes_what_the_command_printed(tmp_path):
    tool = load_refresh_docs()
    page = tmp_path / "page.md"
    stale = ("<!-- output: python -c \"print('10%\\r100%'); print('table 1.0')\" -->\n"
             "```text\nold\n```\n<!-- /output -->")
    failing = "<!-- output: python -c 'import sys; sys.exit(3)' -->\n```text\nkept\n```\n<!-- /output -->"
    page.write_text(f"# Page\n\n{stale}\n\ntext between\n\n{failing}\n", encoding="utf-8")
    assert tool.main([str(page), "--only", "print"]) == 0
    text = page.read_text(encoding="utf-8")
    assert "```text\n100%\ntable 1.0\n```\n<!-- /output: " in text and "old" not in text  # a terminal's view
    assert "load average" in text and "commit" in text and "text between" in text
    assert tool.main([str(page), "--only", "sys.exit"]) == 1  # a failing command leaves its block as it was
    assert "```text\nkept\n```\n<!-- /output -->" in page.read_text(encoding="utf-8")
    assert [block.command for block in tool.quoted_outputs(page.read_text(encoding="utf-8"))] == [
        "python -c \"print('10%\\r100%'); print('table 1.0')\"", "python -c 'import sys; sys.exit(3)'"]


def test_every_quoted_output_states_its_expected_time():
    tool = load_refresh_docs()
    for page in pages():
        with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
            for block in tool.quoted_outputs(handle.read()):
                _, comment = split_comment(block.command)
                assert DURATION.search(comment), f"{page}: `{block.command}` needs `# <expected time>`"

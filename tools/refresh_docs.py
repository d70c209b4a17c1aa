"""Rewrite the command outputs quoted in the docs by running the commands, so that no figure is copied by hand.

A quoted output in a markdown page is the command, what it printed, and when it ran:

    <!-- output: python -m benchmarks.bench_foundation  # ~6 min on 2 cores -->
    ```text
    ...what the command printed on stdout...
    ```
    <!-- /output: 2026-12-07 00:40 UTC, commit abc1234, 312 s, load average 0.1 before, 1.9 after -->

    python tools/refresh_docs.py docs/results.md                      # run every quoted command, rewrite its block
    python tools/refresh_docs.py docs/results.md --only bench_foundation  # the commands containing this text
    python tools/refresh_docs.py README.md --only "python -m training.demo" --saved demo.txt  # a run you have
    python tools/refresh_docs.py README.md docs/results.md --list     # the quoted commands, nothing run

Commands run with `bash -c` from the repository root (PYTHONPATH set to it); stderr goes to the terminal,
stdout is quoted as a terminal shows it (a progress bar's last state only). A command that fails leaves its
block as it was and makes the tool exit non-zero. The footer's load average is what the machine carried
besides the command: figures measured on a busy machine say so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK = re.compile(
    r"(?P<open><!-- output: (?P<command>.+?) -->\n)(?P<body>.*?)(?P<close><!-- /output(?::[^>]*)? -->)", re.S
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class QuotedOutput:
    command: str  # as written, a trailing `# comment` (the expected time) included
    start: int  # span of the whole block in the page's text
    end: int


def quoted_outputs(text: str) -> list[QuotedOutput]:
    """Every `<!-- output: ... -->` block of a page, in order."""
    return [QuotedOutput(m.group("command").strip(), m.start(), m.end()) for m in BLOCK.finditer(text)]


def terminal_view(stdout: str) -> str:
    """What a terminal shows of `stdout`: ANSI codes dropped, each line's text after its last carriage return."""
    lines = [ANSI.sub("", line).rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in stdout.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def render(command: str, printed: str, footer: str) -> str:
    return f"<!-- output: {command} -->\n```text\n{terminal_view(printed)}```\n<!-- /output: {footer} -->"


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown commit"


def run(command: str) -> tuple[str, str]:
    """(stdout, footer) of `command` run from the repository root; raises RuntimeError when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    # bytes, decoded here: text mode would turn a progress bar's carriage returns into line breaks
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"`{command}` exited with {result.returncode}; its block is left as it was")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"{when}, commit {commit()}, {seconds:.0f} s, load average {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after")
    return result.stdout.decode("utf-8", errors="replace"), footer


def refresh(path: str, only: str | None = None, saved: str | None = None, note: str = "") -> int:
    """Rewrite the selected blocks of the page at `path`; returns how many were rewritten."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    commands = [block.command for block in quoted_outputs(text)]
    exact = [command for command in commands if only is not None and command.split("  #")[0].strip() == only]
    selected = exact or [command for command in commands if only is None or only in command]
    if saved is not None and len(selected) != 1:
        raise SystemExit(f"--saved needs --only to select exactly one quoted command in {path}, got {len(selected)}")
    done = 0
    for command in selected:
        if saved is not None:
            with open(saved, encoding="utf-8", newline="") as f:
                printed = f.read()
            footer = f"saved output {os.path.basename(saved)}, quoted {datetime.date.today()}"
            footer += f"; {note}" if note else ""
        else:
            print(f"{path}: running {command}", file=sys.stderr, flush=True)
            printed, footer = run(command)
        with open(path, encoding="utf-8") as f:  # re-read: the page may have been edited while it ran
            text = f.read()
        block = next(b for b in quoted_outputs(text) if b.command == command)
        text = text[: block.start] + render(command, printed, footer) + text[block.end :]
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="+", help="markdown pages (README.md, docs/results.md, ...)")
    parser.add_argument("--only", help="only the quoted command that is exactly this, else those that contain it")
    parser.add_argument("--saved", help="quote this file (a saved stdout) instead of running the one selected command")
    parser.add_argument("--note", default="", help="with --saved: how that run was made (command, load, time)")
    parser.add_argument("--list", action="store_true", help="list the quoted commands; run nothing")
    args = parser.parse_args(argv)
    for page in args.pages:
        if not os.path.isfile(page):
            parser.error(f"no such page: {page}")
    if args.saved is not None and not os.path.isfile(args.saved):
        parser.error(f"--saved {args.saved}: no such file")
    for page in args.pages:
        if args.list:
            with open(page, encoding="utf-8") as f:
                for block in quoted_outputs(f.read()):
                    print(f"{page}: {block.command}")
            continue
        try:
            count = refresh(page, args.only, args.saved, args.note)
        except RuntimeError as error:
            print(f"{page}: {error}", file=sys.stderr)
            return 1
        print(f"{page}: {count} block(s) rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

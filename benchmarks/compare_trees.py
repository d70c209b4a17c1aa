"""One benchmark on two source trees, run alternately (A, B, A, B, ...), its numeric results side by side.

    python -m benchmarks.compare_trees --trees BEFORE AFTER --rounds 2 -- bench_cpu_kernel --batch 1024

Each run is a fresh process in that tree (its own `semclip_kernels`, `PYTHONPATH` = the tree) calling the
benchmark's `main(argv)`, which returns its results; the table gives each tree's median over the rounds and
AFTER / BEFORE. Alternating the trees spreads a shared machine's load over both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RESULT_PREFIX = "COMPARE_TREES_RESULT "
_RUN = (
    "import json, sys\n"
    "from benchmarks.{bench} import main\n"
    "print({prefix!r} + json.dumps(main(sys.argv[1:]), default=str), flush=True)\n"
)


def run_once(tree: str, bench: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    code = _RUN.format(bench=bench, prefix=RESULT_PREFIX)
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{bench} failed in {tree}:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX) :])


def numbers(result: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) result, by dotted name."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("bench", help="a module of benchmarks/, e.g. bench_cpu_kernel")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for round_index in range(args.rounds):
        for tree in args.trees if round_index % 2 == 0 else reversed(args.trees):
            runs[tree].append(numbers(run_once(tree, args.bench, args.bench_args)))
    before, after = args.trees
    print(f"\n{args.bench} {' '.join(args.bench_args)}: median of {args.rounds} alternating runs per tree")
    print(f"{'result':<52} {'before':>11} {'after':>11} {'after/before':>12}")
    for name in runs[before][0]:
        b = statistics.median(run[name] for run in runs[before])
        a = statistics.median(run[name] for run in runs[after] if name in run)
        ratio = f"{a / b:12.3f}" if b else f"{'-':>12}"
        print(f"{name:<52} {b:11.4g} {a:11.4g} {ratio}")


if __name__ == "__main__":
    main()

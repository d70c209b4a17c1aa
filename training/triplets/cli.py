"""`python -m training.triplets`: turn an (image, caption) CSV/TSV into a triplet CSV (docs/contract.md §6).

    python -m training.triplets --input pairs.csv --output triplets.csv                  # rules, offline
    python -m training.triplets --input pairs.tsv --output triplets.csv --generator llm \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --concurrency 8 --fallback rules

Output rows keep the input order, one per usable input row. Rows the generator could not fill are
listed on stderr and in OUTPUT.failed.csv (never dropped silently); with `--generator llm`,
`--fallback rules` fills the captions the LLM could not answer by rules (not after a fatal error).
LLM answers are cached in OUTPUT.cache.jsonl as they arrive: rerun the same command after a crash or
a kill and only the missing captions are asked. Exit status: 0 when every row was written, 1 when some
rows failed, 2 on bad input or a fatal server error (bad URL or key, or no server reachable at --base-url).
See docs/triplets.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TextIO

from tqdm import tqdm

from semclip_kernels.triplets import COLUMNS, join_cell

from .cache import AnswerCache, cache_key
from .llm import FatalLLMError, LLMGenerator, LLMSettings, Outcome
from .pairs import FAILED_COLUMNS, InputError, PairRow, atomic_write_csv, read_pairs
from .rules import RulesGenerator


@dataclass
class Summary:
    rows: int = 0  # usable input rows
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # skipped input rows (--bad-rows skip)
    captions: int = 0  # distinct captions among the rows
    cached: int = 0  # captions answered from the cache
    generated: int = 0  # captions answered in this run by the generator
    fallback: int = 0  # captions filled by the rules fallback
    failed: dict[str, str] = field(default_factory=dict)  # caption -> reason
    written: int = 0  # rows in the output
    failed_rows: list[tuple[PairRow, str]] = field(default_factory=list)
    fatal: str | None = None
    seconds: float = 0.0
    llm_counts: dict[str, int] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.triplets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument("--input", required=True, help="CSV/TSV with an image-path and a caption column")
    io_group.add_argument("--output", required=True,
                          help="triplet CSV to write (filepath, caption, paraphrase, negation)")
    io_group.add_argument("--img-key", "--csv-img-key", default="filepath",
                          help="image path column (default: filepath)")
    io_group.add_argument("--caption-key", "--csv-caption-key", default="caption",
                          help="caption column (default: caption)")
    io_group.add_argument("--separator", "--csv-separator", default=None,
                          help=r"field separator (default: tab for .tsv, else comma; '\t' means tab)")
    io_group.add_argument("--image-root", default=None,
                          help="folder relative image paths start from (default: the input's folder; "
                               "'.' for open_clip CSVs whose paths are relative to the working directory)")
    io_group.add_argument("--bad-rows", choices=("error", "skip"), default="error",
                          help="unusable input rows: stop naming them (default) or skip and list them")
    io_group.add_argument("--limit", type=int, default=None, help="use only the first N usable rows")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--generator", choices=("rules", "llm"), default="rules")
    gen.add_argument("--paraphrases", type=int, default=1, help="paraphrases per caption (default 1)")
    gen.add_argument("--negations", type=int, default=1, help="negations per caption (default 1)")
    gen.add_argument("--fallback", choices=("none", "rules"), default="none",
                     help="fill rows the LLM could not answer by rules (default: list them as failed)")
    llm = parser.add_argument_group("LLM (--generator llm)")
    llm.add_argument("--base-url", default=None, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    llm.add_argument("--model", default=None, help="model name the server knows")
    llm.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    llm.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    llm.add_argument("--max-retries", type=int, default=4, help="retries per caption (default 4)")
    llm.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubling (default 1)")
    llm.add_argument("--max-wait", type=float, default=60.0, help="cap on one wait, Retry-After included (default 60)")
    llm.add_argument("--temperature", type=float, default=0.7)
    llm.add_argument("--max-tokens", type=int, default=512)
    llm.add_argument("--no-json-mode", dest="json_mode", action="store_false",
                     help="do not send response_format=json_object (for servers that reject it)")
    llm.add_argument("--cache", default=None, help="answer cache (default: OUTPUT.cache.jsonl)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("paraphrases", "negations", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_retries < 0 or args.timeout <= 0 or args.limit is not None and args.limit < 1:
        parser.error("--max-retries must be >= 0, --timeout > 0 and --limit >= 1")
    if args.generator == "llm" and (not args.base_url or not args.model):
        parser.error("--generator llm needs --base-url and --model")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        parser.error("--output must differ from --input")


def _generate_llm(args: argparse.Namespace, captions: list[str], summary: Summary,
                  results: dict[str, tuple[list[str], list[str]]], report: TextIO) -> None:
    settings = LLMSettings(base_url=args.base_url, model=args.model, api_key=os.environ.get("OPENAI_API_KEY"),
                           temperature=args.temperature, max_tokens=args.max_tokens, timeout=args.timeout,
                           max_retries=args.max_retries, backoff=args.backoff, max_wait=args.max_wait,
                           json_mode=args.json_mode)
    generator = LLMGenerator(settings)
    key_settings = settings.cache_settings(args.paraphrases, args.negations)
    cache_path = args.cache or args.output + ".cache.jsonl"
    with AnswerCache(cache_path, report=report) as cache:
        pending = []
        for caption in captions:
            entry = cache.get(cache_key(caption, key_settings))
            if entry is not None:
                results[caption] = (entry["paraphrases"], entry["negations"])
                summary.cached += 1
            else:
                pending.append(caption)
        print(f"{args.input}: {len(captions)} distinct caption(s), {summary.cached} in the cache ({cache_path}), "
              f"{len(pending)} to ask {settings.base_url} ({settings.model})", file=report)
        progress = tqdm(total=len(pending), unit="caption", file=report, disable=not args.progress,
                        desc="triplets (llm)", dynamic_ncols=True)
        window = 4 * args.concurrency  # bounded look-ahead: millions of captions never become millions of futures
        queue = iter(pending)
        in_flight: dict[Future[Outcome], str] = {}
        executor = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="triplets-llm")
        try:
            while True:
                while len(in_flight) < window and summary.fatal is None:
                    caption = next(queue, None)
                    if caption is None:
                        break
                    in_flight[executor.submit(generator.generate, caption, args.paraphrases, args.negations)] = caption
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    caption = in_flight.pop(future)
                    if future.cancelled():  # after a fatal error
                        summary.failed[caption] = f"not asked: {summary.fatal}"
                        continue
                    try:
                        outcome = future.result()
                    except FatalLLMError as error:
                        summary.fatal = str(error)
                        summary.failed[caption] = str(error)
                        continue
                    if outcome.error is None:
                        cache.put(cache_key(caption, key_settings), caption, outcome.paraphrases, outcome.negations)
                        results[caption] = (outcome.paraphrases, outcome.negations)
                        summary.generated += 1
                    else:
                        summary.failed[caption] = outcome.error
                    progress.update(1)
                if summary.fatal is not None:
                    for future in in_flight:
                        future.cancel()
            for caption in queue:  # not asked because of a fatal error
                summary.failed[caption] = f"not asked: {summary.fatal}"
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            progress.close()
        summary.llm_counts = dict(generator.stats.counts)


def run(args: argparse.Namespace, report: TextIO | None = None) -> Summary:
    """Read, generate, write; everything the summary prints is in the returned Summary."""
    report = report or sys.stderr
    started = time.monotonic()
    summary = Summary()
    rows, summary.bad_rows = read_pairs(args.input, args.img_key, args.caption_key, args.separator, args.bad_rows,
                                        args.image_root, os.path.dirname(os.path.abspath(args.output)))
    for line, reason in summary.bad_rows:
        print(f"{args.input}:{line}: skipped bad row: {reason}", file=report)
    if args.limit is not None:
        rows = rows[:args.limit]
    if not rows:
        raise InputError(f"{args.input}: no usable rows")
    summary.rows = len(rows)
    captions = list(dict.fromkeys(row.caption for row in rows))  # each distinct caption is generated once
    summary.captions = len(captions)
    results: dict[str, tuple[list[str], list[str]]] = {}
    rules = RulesGenerator()
    if args.generator == "llm":
        _generate_llm(args, captions, summary, results, report)
    else:
        for caption in tqdm(captions, unit="caption", file=report, disable=not args.progress,
                            desc="triplets (rules)", dynamic_ncols=True):
            paraphrases, negations, problem = rules.generate(caption, args.paraphrases, args.negations)
            if problem is None:
                results[caption] = (paraphrases, negations)
                summary.generated += 1
            else:
                summary.failed[caption] = problem
    # A run stopped by a fatal server error (bad URL or key, no server) fills nothing by rules: the fallback is
    # for the captions a working server could not answer, not for a server that is not there.
    if args.generator == "llm" and args.fallback == "rules" and summary.fatal is None:
        for caption, reason in list(summary.failed.items()):
            paraphrases, negations, problem = rules.generate(caption, args.paraphrases, args.negations)
            if problem is None:
                results[caption] = (paraphrases, negations)
                del summary.failed[caption]
                summary.fallback += 1
            else:
                summary.failed[caption] = f"{reason}; fallback: {problem}"

    output_rows = []
    for row in rows:
        if row.caption in results:
            paraphrases, negations = results[row.caption]
            output_rows.append((row.filepath, row.caption, join_cell(paraphrases), join_cell(negations)))
        else:
            summary.failed_rows.append((row, summary.failed.get(row.caption, "not generated")))
    atomic_write_csv(args.output, COLUMNS, output_rows)
    summary.written = len(output_rows)
    failed_path = args.output + ".failed.csv"
    if summary.failed_rows:
        atomic_write_csv(failed_path, FAILED_COLUMNS, [(row.line, row.filepath, row.caption, reason)
                                                       for row, reason in summary.failed_rows])
    elif os.path.exists(failed_path):
        os.unlink(failed_path)  # a stale list from an earlier run would mislead
    summary.seconds = time.monotonic() - started
    print_summary(args, summary, report)
    return summary


def print_summary(args: argparse.Namespace, summary: Summary, report: TextIO) -> None:
    shown = 20
    for row, reason in summary.failed_rows[:shown]:
        print(f"{args.input}:{row.line}: not generated: {reason}", file=report)
    if len(summary.failed_rows) > shown:
        print(f"... and {len(summary.failed_rows) - shown} more", file=report)
    parts = [f"{summary.rows} row(s), {summary.captions} distinct caption(s)"]
    if summary.bad_rows:
        parts.append(f"{len(summary.bad_rows)} bad input row(s) skipped")
    if args.generator == "llm":
        parts.append(f"{summary.cached} from cache, {summary.generated} generated")
        counts = ", ".join(f"{name} {count}" for name, count in sorted(summary.llm_counts.items()))
        parts.append(f"server: {counts or 'no requests'}")
        if args.fallback == "rules":
            parts.append(f"{summary.fallback} filled by rules")
    else:
        parts.append(f"{summary.generated} generated by rules")
    parts.append(f"{summary.written} row(s) written to {args.output}")
    if summary.failed_rows:
        parts.append(f"{len(summary.failed_rows)} row(s) failed, listed in {args.output}.failed.csv")
    print("summary: " + "; ".join(parts) + f" ({summary.seconds:.1f} s)", file=report)
    if summary.fatal:
        print(f"stopped: {summary.fatal}", file=report)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        summary = run(args)
    except InputError as error:  # names the file (and line): one line, exit status 2
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: answers received so far are in the cache; rerun the same command to continue",
              file=sys.stderr)
        return 130
    if summary.fatal:
        return 2
    return 1 if summary.failed_rows else 0

"""How much of a caption set the rules generator covers, and with which rules (the figures of docs/triplets.md).

    python -m training.triplets.measure                    # training/evaluation_data/sugarcrepe_pp_triplets.csv
    python -m training.triplets.measure --input pairs.csv --caption-key caption --examples 20

Prints Markdown: for each (paraphrases, negations) count, the share of distinct captions that get
that many valid texts; which rule produced the first paraphrase and the first negation; and a seeded
random sample of captions with their texts, for reading.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter

from ..paths import SUGARCREPE_PP_CSV
from .pairs import InputError, read_pairs
from .rules import RulesGenerator, negation_candidates, paraphrase_candidates


def rule_of(text: str, candidates: list[tuple[str, str]]) -> str:
    return next(name for name, candidate in candidates if candidate == text)


def measure(captions: list[str], counts: list[tuple[int, int]], examples: int, seed: int) -> str:
    generator = RulesGenerator()
    lines = [f"{len(captions)} distinct captions.", "",
             "| paraphrases, negations asked | captions with all paraphrases | with all negations | with both |",
             "| --- | ---: | ---: | ---: |"]
    for n, m in counts:
        got_p = got_n = both = 0
        for caption in captions:
            paraphrases, negations, _ = generator.generate(caption, n, m)
            got_p += len(paraphrases) == n
            got_n += len(negations) == m
            both += len(paraphrases) == n and len(negations) == m
        lines.append(f"| {n}, {m} | {got_p / len(captions):.1%} | {got_n / len(captions):.1%} | "
                     f"{both / len(captions):.1%} |")
    para_rules: Counter = Counter()
    neg_rules: Counter = Counter()
    for caption in captions:
        paraphrases, negations, _ = generator.generate(caption, 1, 1)
        if paraphrases:
            para_rules[rule_of(paraphrases[0], paraphrase_candidates(caption))] += 1
        if negations:
            neg_rules[rule_of(negations[0], negation_candidates(caption))] += 1
    for title, counter in (("paraphrase", para_rules), ("negation", neg_rules)):
        total = sum(counter.values())
        shares = ", ".join(f"{name} {count / total:.1%}" for name, count in counter.most_common())
        lines += ["", f"Rule of the first {title} ({total} captions): {shares}."]
    lines += ["", f"{examples} random captions (seed {seed}), with `--paraphrases 1 --negations 1`:", "",
              "| caption | paraphrase | negation |", "| --- | --- | --- |"]
    for caption in random.Random(seed).sample(captions, min(examples, len(captions))):
        paraphrases, negations, _ = generator.generate(caption, 1, 1)
        cells = [caption, paraphrases[0] if paraphrases else "*(none)*", negations[0] if negations else "*(none)*"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.triplets.measure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=SUGARCREPE_PP_CSV)
    parser.add_argument("--img-key", default="filename")
    parser.add_argument("--caption-key", default="caption")
    parser.add_argument("--separator", default=None)
    parser.add_argument("--counts", nargs="+", default=["1,1", "2,2", "3,3"],
                        help="paraphrases,negations pairs to measure (default: 1,1 2,2 3,3)")
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = []
    for item in args.counts:
        try:
            n, m = (int(x) for x in item.split(","))
        except ValueError:
            parser.error(f"--counts takes N,M pairs such as 1,1; got {item!r}")
        counts.append((n, m))
    try:
        rows, _ = read_pairs(args.input, args.img_key, args.caption_key, args.separator, bad_rows="skip")
    except InputError as error:  # a missing file or column: one line, exit status 2
        parser.exit(2, f"{parser.prog}: error: --input {error}\n")
    captions = list(dict.fromkeys(row.caption for row in rows))
    print(f"Input: {args.input}\n")
    print(measure(captions, counts, args.examples, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

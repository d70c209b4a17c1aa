"""Triplet generation: from (image, caption) CSVs to SemCLIP triplet CSVs (docs/contract.md §6).

`python -m training.triplets` (cli.py) with `--generator rules` (rules.py: offline, deterministic)
or `--generator llm` (llm.py: any OpenAI-compatible server, cached in cache.py). No torch import:
the tool starts in a fraction of a second. See docs/triplets.md.
"""

from .llm import LLMGenerator, LLMSettings
from .rules import RulesGenerator
from .validate import select_texts, text_problem

__all__ = ["LLMGenerator", "LLMSettings", "RulesGenerator", "select_texts", "text_problem"]

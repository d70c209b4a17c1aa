"""Files that ship with the repository (torch-free: the triplet tool imports it too)."""

from __future__ import annotations

import os

# Evaluation only, never training data; provenance and licences: training/evaluation_data/README.md.
SUGARCREPE_PP_CSV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "evaluation_data", "sugarcrepe_pp_triplets.csv"
)

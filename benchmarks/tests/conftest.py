"""Tests of the benchmark scripts themselves (the package's own tests are in tests/).

They check the scripts' numbers against the project's float64 oracle, which lives in tests/.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # `benchmarks` as a package, from any working directory

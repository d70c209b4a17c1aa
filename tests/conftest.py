"""Shared setup of the test suite (grouped by layer: kernels/, backends/, loss/, distributed/, integrations/,
apps/, repo/): import paths, Triton's interpreter on a machine without a GPU, and the guards for what a build
may lack (`pytestmark = pytest.mark.needs_cpp` / `needs_triton`: skipped, with the reason, where absent).

Helpers that tests import live beside this file: `oracle.py` and `sigmoid_oracle.py` (the float64 truth),
`harness.py` (the repository root, the multi-process harness), `primitive.py`, `property_regimes.py`.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # oracle, harness, ... from every group's folder
# Some test modules reuse another's helpers (`from test_loss import run_backend`): every group on the path.
GROUPS = ("kernels", "backends", "loss", "distributed", "integrations", "apps", "repo")
sys.path[1:1] = [os.path.join(HERE, group) for group in GROUPS]
sys.path.append(os.path.dirname(HERE))  # training/, benchmarks/ from any working directory

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # no GPU: run backend="triton" through Triton's interpreter (before any import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cpp_missing() -> str:
    if os.environ.get("SEMCLIP_SKIP_CPP") == "1":
        return "SEMCLIP_SKIP_CPP=1"
    from semclip_kernels.backends import backend_status

    ok, reason = backend_status("cpp", "cpu")
    return "" if ok else f"the C++ kernel is not built ({reason})"


def _triton_missing() -> str:
    try:
        import semclip_kernels.backends.triton_fused  # noqa: F401
    except ImportError as error:
        return f"Triton is not installed ({error})"
    return ""


_GUARDS = {"needs_cpp": _cpp_missing, "needs_triton": _triton_missing}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_cpp: skipped where the C++ kernel is not built")
    config.addinivalue_line("markers", "needs_triton: skipped where Triton is not installed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons: dict[str, str] = {}
    for item in items:
        for marker, missing in _GUARDS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in reasons:
                reasons[marker] = missing()
            if reasons[marker]:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))
            elif marker == "needs_triton":
                # The interpreter's numpy takes log(0) of masked-out entries on purpose (they are -inf logits).
                item.add_marker(pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"))

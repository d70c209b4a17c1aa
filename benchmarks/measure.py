"""Measurement utilities shared by the benchmark scripts.

One *point* is one loss implementation ("method") on one input shape. For each
point we measure, in the same process and run:

- forward+backward wall time: median of `repeats` calls after warm-up;
- the time of one plain `B×d @ d×K` matrix product on the same device and dtype
  (the "GEMM reference"), so that `time / gemm_time` ("GEMM-equivalents") can be
  compared across machines and across noisy runs of a shared machine;
- the peak memory beyond the inputs: CUDA `max_memory_allocated` minus what was
  allocated before the call; on CPU the growth of the process's peak resident set
  (VmHWM, reset through /proc/self/clear_refs) over the resident set once the
  inputs exist. The first call after the inputs are allocated is the measured one.
  The growth includes the gradients of the inputs (the same for every method).

CPU points run in a fresh subprocess each (`run_point_in_subprocess`), so the
peak of one point never hides the peak of the next, and a point that runs out of
memory kills only its own process. Run one point by hand with

    python -m benchmarks.measure '{"method": "torch", "batch": 4096}'
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import semclip_kernels

LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature, already exponentiated
TRAINED_SCALE = 100.0  # open_clip's cap on the temperature, where a trained model sits
PEERS = ("open_clip", "inf_cl")  # losses a user would pick instead of ours
RESULT_PREFIX = "RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Point:
    """One measurement: a loss implementation on one input shape."""

    method: str  # a semclip backend ("reference", "torch", "cpp", "triton") or a peer in PEERS
    batch: int
    dim: int = 512
    n_paraphrases: int = 1
    n_negations: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    seed: int = 0
    timed: bool = True  # False: peak memory only (no timed calls, no GEMM reference)

    @property
    def n_cols(self) -> int:
        """K: text columns of the logits matrix (captions, paraphrases, negations)."""
        return self.batch * (1 + self.n_paraphrases + self.n_negations)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def available_methods(device: str, backends: Sequence[str] | None = None) -> list[str]:
    """The methods to measure on `device`: semclip backends, then the peers installed for it.

    `backends`: these, whether or not they run here (a report then shows why one fails instead of leaving it
    out); by default, every backend that runs on `device`.
    """
    if backends is None:
        backends = list(semclip_kernels.available_backends(device))
        if torch.device(device).type != "cuda" and "triton" in backends:
            backends.remove("triton")  # on CPU only Triton's interpreter runs it: a test tool, not a contender
    methods = list(backends)
    if importlib.util.find_spec("open_clip") is not None:
        methods.append("open_clip")
    if torch.device(device).type == "cuda" and importlib.util.find_spec("inf_cl") is not None:
        methods.append("inf_cl")
    return methods


def make_inputs(point: Point) -> dict[str, torch.Tensor | None]:
    """Unit-norm features and a learnable logit scale, all leaves requiring grad.

    Deterministic in `point.seed`: the tests rebuild the same inputs to check the
    loss values the benchmark records.
    """
    generator = torch.Generator().manual_seed(point.seed)
    batch, dim = point.batch, point.dim

    def features(*shape: int) -> torch.Tensor:
        x = F.normalize(torch.randn(*shape, dim, generator=generator), dim=-1)
        return x.to(device=point.device, dtype=DTYPES[point.dtype]).requires_grad_()

    return {
        "image": features(batch),
        "text": features(batch),
        "paraphrase": features(batch, point.n_paraphrases) if point.n_paraphrases else None,
        "negation": features(batch, point.n_negations) if point.n_negations else None,
        "logit_scale": torch.tensor(LOGIT_SCALE, device=point.device, requires_grad=True),
    }


def trained_inputs(batch: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit features: caption (cos ≈ 0.94) and paraphrase (≈ 0.91) near their image, negation (≈ 0.78) a
    little farther, everything else random (cos ≈ ±1/√d): at τ = 100 the softmax is peaked."""
    generator = torch.Generator().manual_seed(seed)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def near(center: torch.Tensor, spread: float) -> torch.Tensor:
        return unit(center + spread * unit(torch.randn(center.shape, generator=generator)))

    image = unit(torch.randn(batch, dim, generator=generator))
    features = {
        "image": image,
        "text": near(image, 0.35),
        "paraphrase": near(image, 0.45)[:, None],
        "negation": near(image, 0.8)[:, None],
    }
    inputs = {name: x.requires_grad_() for name, x in features.items()}
    inputs["logit_scale"] = torch.tensor(TRAINED_SCALE, requires_grad=True)
    return inputs


def max_norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def open_clip_negclip_loss(image, text, logit_scale, paraphrase, negation) -> torch.Tensor:
    """The materialized peer: open_clip's `ClipLoss` logits with every extra caption
    concatenated to the text side (the NegCLIP way), then cross-entropies.

    Paraphrases are extra positives of their image (and extra text→image queries),
    negations are extra columns only: with weights 1 this is SemCLIP's loss exactly,
    computed the way an open_clip user would without this package.
    """
    from open_clip.loss import ClipLoss

    batch, dim = image.shape
    n_para = 0 if paraphrase is None else paraphrase.shape[1]
    blocks = [text] + [x.reshape(-1, dim) for x in (paraphrase, negation) if x is not None]
    cols = torch.cat(blocks)  # [T; P; N]
    clip_loss = ClipLoss()
    logits_per_image, logits_per_text = clip_loss.get_logits(image, cols, logit_scale)  # [B, K] and [K, B]
    labels = clip_loss.get_ground_truth(image.device, batch)
    # Image→text: one cross-entropy per positive (caption, then each paraphrase).
    image_log_probs = logits_per_image.float().log_softmax(dim=1)
    positive_cols = [labels] + [batch + labels * n_para + p for p in range(n_para)]
    image_to_text = torch.stack([-image_log_probs.gather(1, c[:, None]).mean() for c in positive_cols]).mean()
    # Text→image: captions and paraphrases are queries, negations are not.
    n_queries = batch * (1 + n_para)
    query_labels = torch.cat([labels, labels.repeat_interleave(n_para)])
    text_to_image = F.cross_entropy(logits_per_text[:n_queries].float(), query_labels)
    return (image_to_text + text_to_image) / 2


def inf_cl_loss(image, text, logit_scale, paraphrase, negation) -> torch.Tensor:
    """Inf-CL (CUDA/Triton), one call per direction over the same columns.

    Inf-CL has one positive per query, so paraphrases only enter as extra columns
    and extra text→image queries (NegCLIP form): the cost is comparable, the value
    is not SemCLIP's when there are paraphrases.
    """
    from inf_cl import cal_inf_loss

    batch, dim = image.shape
    n_para = 0 if paraphrase is None else paraphrase.shape[1]
    head_dim = next(h for h in (256, 128, 64, 32, 16) if dim % h == 0)
    blocks = [text] + [x.reshape(-1, dim) for x in (paraphrase, negation) if x is not None]
    cols = torch.cat(blocks)
    labels = torch.arange(batch, device=image.device)
    # The scale is applied here, not through `scale=`: Inf-CL all-reduces the scale's
    # gradient, which needs an initialized process group.
    image_to_text = cal_inf_loss(logit_scale * image, cols, labels=labels, head_dim=head_dim)
    queries = cols[: batch * (1 + n_para)]
    query_labels = torch.cat([labels, labels.repeat_interleave(n_para)])
    text_to_image = cal_inf_loss(logit_scale * queries, image, labels=query_labels, head_dim=head_dim)
    return (image_to_text + text_to_image) / 2


def loss_function(method: str) -> Callable[..., torch.Tensor]:
    """`f(image, text, logit_scale, paraphrase, negation) -> loss` for a method name."""
    if method == "open_clip":
        return open_clip_negclip_loss
    if method == "inf_cl":
        return inf_cl_loss

    def semclip(image, text, logit_scale, paraphrase, negation) -> torch.Tensor:
        return semclip_kernels.semclip_loss(image, text, logit_scale, paraphrase, negation, backend=method)

    return semclip


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(loss_fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor | None]) -> float:
    """One training-style call: fresh gradients, loss, backward. Returns the loss value."""
    for tensor in inputs.values():
        if tensor is not None:
            tensor.grad = None
    loss = loss_fn(**inputs)
    loss.backward()
    return float(loss.detach())


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `repeats` calls of `run` (already warmed up)."""
    times = []
    for _ in range(max(1, repeats)):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each zero-argument call, after one warm-up each.

    The calls alternate (a, b, a, b, ...) so that the noise of a shared machine
    hits every method alike and their ratios stay meaningful.
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def verdict(value: float, op: str, goal: float) -> str:
    """`goal ≤ 0.7: met`, or by how much it was missed."""
    met = value <= goal if op == "≤" else value >= goal
    missed_by = value / goal if op == "≤" else goal / value
    return f"goal {op} {goal:.3g}: {'met' if met else f'MISSED by {missed_by:.2f}x'}"


def gemm_reference_seconds(point: Point, max_out_bytes: int = 512 * 2**20) -> float:
    """Median time of one `[B, d] @ [d, K]` product in the point's dtype and device.

    When the `B × K` output would exceed `max_out_bytes` the product runs in row
    blocks into one reused output buffer: the same FLOPs without allocating the
    matrix the fused losses avoid.
    """
    device = torch.device(point.device)
    dtype = DTYPES[point.dtype]
    rows = torch.randn(point.batch, point.dim, device=device, dtype=dtype)
    cols_t = torch.randn(point.dim, point.n_cols, device=device, dtype=dtype)
    bytes_per_row = point.n_cols * rows.element_size()
    block = max(1, min(point.batch, max_out_bytes // bytes_per_row))
    out = torch.empty(block, point.n_cols, device=device, dtype=dtype)

    def product() -> None:
        for start in range(0, point.batch, block):
            stop = min(start + block, point.batch)
            torch.mm(rows[start:stop], cols_t, out=out[: stop - start])

    product()  # warm-up
    return median_seconds(product, point.repeats, device)


# --- memory ---------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0). False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak bytes allocated during a `with` block, beyond what was allocated before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
        else:
            if _reset_peak_rss():
                self.base = _proc_status_kib("VmRSS") * 1024
                self.method = "peak RSS growth (VmHWM after clear_refs)"
            else:  # no clear_refs: the peak so far bounds the baseline from above
                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self.method = "ru_maxrss growth"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak_kib = _proc_status_kib("VmHWM") if self.method.startswith("peak RSS") else None
            peak = (peak_kib or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        self.extra_bytes = max(0, peak - self.base)


# --- one point ------------------------------------------------------------------------


def measure_point(point: Point) -> dict:
    """Time, GEMM reference and peak memory of one point, in this process."""
    device = torch.device(point.device)
    loss_fn = loss_function(point.method)
    # Warm-up on a tiny batch: load kernels, thread pools and compiled code before the baseline.
    tiny = dataclasses.replace(point, batch=min(point.batch, 64))
    forward_backward(loss_fn, make_inputs(tiny))

    inputs = make_inputs(point)
    with PeakMemory(device) as memory:
        loss_value = forward_backward(loss_fn, inputs)  # measured, and the warm-up of the timing
    result = {
        **dataclasses.asdict(point),
        "n_cols": point.n_cols,
        "peak_extra_bytes": memory.extra_bytes,
        "memory_method": memory.method,
        "loss": loss_value,
    }
    if point.timed:
        seconds = median_seconds(lambda: forward_backward(loss_fn, inputs), point.repeats, device)
        gemm_seconds = gemm_reference_seconds(point)
        result.update(seconds=seconds, gemm_seconds=gemm_seconds, gemm_equivalents=seconds / gemm_seconds)
    return result


def run_point_in_subprocess(point: Point, timeout: float | None = None) -> dict:
    """`measure_point` in a fresh Python process; failures come back as {"error": ...}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "benchmarks.measure", point.to_json()]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {**dataclasses.asdict(point), "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    if done.returncode < 0:
        reason = f"killed by signal {-done.returncode} (out of memory?)"
    else:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        reason = f"exit code {done.returncode}: {tail}"
    return {**dataclasses.asdict(point), "error": reason}


def run_point(point: Point, timeout: float | None = None) -> dict:
    """Measure a point: CPU in a fresh subprocess, CUDA in this process (OOM caught)."""
    if torch.device(point.device).type != "cuda":
        return run_point_in_subprocess(point, timeout)
    try:
        return measure_point(point)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**dataclasses.asdict(point), "error": "CUDA out of memory"}


def format_bytes(n_bytes: float) -> str:
    if not math.isfinite(n_bytes):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit('usage: python -m benchmarks.measure \'{"method": "torch", "batch": 4096, ...}\'')
    point = Point(**json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(measure_point(point)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

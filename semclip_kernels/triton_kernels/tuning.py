"""Which tile the fused kernels run: pinned by the user, cached, or the fastest candidate timed once on this GPU.

`select_tile` is the one function the launchers ask. In order:

1. `block_rows` / `block_cols` (PartitionOptions): the default tile with those sides; no timing.
2. `SEMCLIP_TRITON_TILE`: `auto` (the default: steps 3-5), `default` (the first candidate, no
   timing), or a tile `MxNxD` / `MxNxD:WARPS:STAGES` (e.g. `128x128x32:8:3`) for every dtype
   (BLOCK_D clipped to d). A pinned tile is the user's choice: it is not checked for spills.
3. Never timed (the default candidate): under Triton's interpreter, on a non-CUDA device, for
   float64, while a CUDA graph is being captured.
4. Chosen before, in this process or in the cache file (`SEMCLIP_TUNING_CACHE`, default
   `$XDG_CACHE_HOME/semclip_kernels/triton_tiles.json`), keyed by (GPU name, d, dtype, Triton version).
5. Otherwise every candidate of `config.TILE_CANDIDATES` runs forward + backward on a fixed
   synthetic problem (`TUNE_ROWS` rows, 3× as many columns, dense backward), the fastest by median
   is kept in memory for the process and written to the cache file (atomically: a temporary file
   renamed over it).

Once chosen, a (GPU, d, dtype) keeps its tile for the whole process: the forward and the
backward's dS panel ask with the same key and get the same tile, so the recompute stays bitwise.
Different processes (e.g. ranks of a distributed job) may time differently on a first run;
pin the tile or warm the cache first when they must agree (docs/gpu.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import torch
import triton

from . import tl_utils
from .backward import partitions_backward
from .config import MAX_BLOCK, MIN_BLOCK, TileConfig, gemm_config, sized_tile, tile_candidates, tile_config
from .lse_forward import lse_forward

TILE_ENV = "SEMCLIP_TRITON_TILE"
CACHE_ENV = "SEMCLIP_TUNING_CACHE"
CACHE_FORMAT = 1
# The synthetic problem candidates are timed on: B rows, 3B columns (one paraphrase, one negation).
TUNE_ROWS = 8192
TUNE_REPEATS = 5
_TILE_PATTERN = re.compile(r"^(\d+)x(\d+)x(\d+)(?::(\d+):(\d+))?$")

# (GPU, d, dtype, Triton version) -> the tile chosen in this process.
_chosen: dict[str, TileConfig] = {}


def tile_name(tile: TileConfig) -> str:
    """`MxNxD:WARPS:STAGES`, the form `SEMCLIP_TRITON_TILE` accepts."""
    return f"{tile.block_m}x{tile.block_n}x{tile.block_d}:{tile.num_warps}:{tile.num_stages}"


def parse_tile(text: str, dim: int, dtype: torch.dtype) -> TileConfig:
    """A tile from `MxNxD` or `MxNxD:WARPS:STAGES` (warps and stages default to the dtype's default tile's)."""
    match = _TILE_PATTERN.match(text.strip())
    if not match:
        raise ValueError(
            f"{TILE_ENV} must be 'auto', 'default' or MxNxD[:WARPS:STAGES] (e.g. 128x64x64:8:3), got {text!r}"
        )
    block_m, block_n, block_d = (int(match.group(i)) for i in (1, 2, 3))
    for name, value in (("M", block_m), ("N", block_n), ("D", block_d)):
        if value & (value - 1) or not MIN_BLOCK <= value <= MAX_BLOCK:
            raise ValueError(f"{TILE_ENV}: {name} must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {value}")
    default = tile_config(dim, dtype)
    warps = int(match.group(4)) if match.group(4) else default.num_warps
    stages = int(match.group(5)) if match.group(5) else default.num_stages
    if warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 8:
        raise ValueError(f"{TILE_ENV}: warps must be one of 1, 2, 4, 8, 16 and stages in [1, 8], got {warps}, {stages}")
    return sized_tile(replace(default, block_m=block_m, block_n=block_n, block_d=block_d, num_warps=warps,
                              num_stages=stages), dim)  # fmt: skip


def cache_path() -> str:
    """The tuning cache file: `SEMCLIP_TUNING_CACHE`, else under `$XDG_CACHE_HOME` (default `~/.cache`)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "semclip_kernels", "triton_tiles.json")


def cache_key(gpu: str, dim: int, dtype: torch.dtype) -> str:
    return f"{gpu}|d={dim}|{str(dtype).removeprefix('torch.')}|triton={triton.__version__}"


def read_cache(path: str) -> dict[str, dict]:
    """The cache's entries; empty when the file is missing or unreadable (it is then rewritten)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring the tile tuning cache {path}: {error}", stacklevel=2)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def write_cache_entry(path: str, key: str, entry: dict) -> None:
    """Add `entry` under `key`: read, update, write a temporary file in the same folder, rename it over."""
    entries = read_cache(path)
    entries[key] = entry
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".triton_tiles.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, out, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def cached_tile(entry: dict | None, candidates: Sequence[TileConfig]) -> TileConfig | None:
    """The cached tile if it is still one of the candidates (a changed candidate table is timed again)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tile"), dict):
        return None
    try:
        tile = TileConfig(**entry["tile"])
    except TypeError:
        return None
    return tile if tile in candidates else None


def fastest(candidates: Sequence[TileConfig], timer: Callable[[TileConfig], float]) -> tuple[TileConfig, dict]:
    """The candidate with the least time (ties: the earlier one) and every candidate's time in ms.

    A candidate that fails to compile or launch on this GPU (e.g. too little shared memory) is skipped.
    """
    times: dict[str, float] = {}
    best, best_ms = candidates[0], math.inf
    for tile in candidates:
        try:
            ms = float(timer(tile))
        except Exception as error:  # noqa: BLE001 (a candidate out of resources here: skip it, say why)
            warnings.warn(f"tile {tile_name(tile)} skipped: {type(error).__name__}: {error}", stacklevel=2)
            continue
        times[tile_name(tile)] = ms
        if ms < best_ms:
            best, best_ms = tile, ms
    return best, times


def time_candidate(tile: TileConfig, dim: int, dtype: torch.dtype, device: torch.device) -> float:
    """Median ms of forward + dense backward with `tile` on the synthetic problem (compiles on the first run)."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(TUNE_ROWS, dim, device=device, generator=gen), dim=1).to(dtype)
    cols = torch.nn.functional.normalize(torch.randn(3 * TUNE_ROWS, dim, device=device, generator=gen), dim=1)
    cols = cols.to(dtype)
    stat = torch.float32
    scale = torch.full((1,), 100.0, dtype=stat, device=device)
    col_bias = torch.zeros(cols.shape[0], dtype=stat, device=device)
    grad_rows = torch.full((TUNE_ROWS,), 1.0 / TUNE_ROWS, dtype=stat, device=device)
    grad_cols = torch.full((TUNE_ROWS,), 1.0 / TUNE_ROWS, dtype=stat, device=device)
    gemm = gemm_config(dim, dtype)

    def step() -> None:
        row_lse, col_lse = lse_forward(rows, cols, scale, col_bias, tile, "ieee")
        no_bounds = col_lse.new_empty(0)  # eps = 0: no filtering, no column-mass bounds needed
        partitions_backward(rows, cols, scale, col_bias, TUNE_ROWS, row_lse, col_lse[:TUNE_ROWS], no_bounds,
                            grad_rows, grad_cols, (True, True, True), "ieee", 0.0, tile, gemm)  # fmt: skip

    with torch.cuda.device(device):  # Triton launches on the current device
        step()  # compile
        torch.cuda.synchronize(device)
        times = []
        for _ in range(TUNE_REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _tunable(device: torch.device, dtype: torch.dtype) -> bool:
    if tl_utils.INTERPRETED or device.type != "cuda" or dtype == torch.float64:
        return False
    return not torch.cuda.is_current_stream_capturing()


def forget_choices() -> None:
    """Forget this process's choices (tests; a changed SEMCLIP_TRITON_TILE is then read again)."""
    _chosen.clear()


def select_tile(
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> TileConfig:
    """The tile of the forward and of the backward's dS panel for `dim`, `dtype` on `device` (see module doc).

    Without `block_rows` / `block_cols`, the first answer for a (GPU, d, dtype) is kept for the process.
    """
    if block_rows is not None or block_cols is not None:
        return tile_config(dim, dtype, block_rows, block_cols)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and not tl_utils.INTERPRETED else device.type
    key = cache_key(gpu, dim, dtype)
    if key not in _chosen:
        _chosen[key] = _resolve(key, dim, dtype, device)
    return _chosen[key]


def _resolve(key: str, dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    setting = os.environ.get(TILE_ENV, "auto").strip() or "auto"
    if setting == "default":
        return tile_config(dim, dtype)
    if setting != "auto":
        return parse_tile(setting, dim, dtype)
    if not _tunable(device, dtype):
        return tile_config(dim, dtype)
    candidates = tile_candidates(dim, dtype)
    path = cache_path()
    tile = cached_tile(read_cache(path).get(key), candidates)
    if tile is not None:
        return tile
    tile, times = fastest(candidates, lambda t: time_candidate(t, dim, dtype, device))
    entry = {"tile": asdict(tile), "ms": times, "problem": f"{TUNE_ROWS}x{3 * TUNE_ROWS}", "torch": torch.__version__}
    try:
        write_cache_entry(path, key, entry)
    except OSError as error:  # a read-only home: keep the choice for this process only
        warnings.warn(f"could not write the tile tuning cache {path}: {error}", stacklevel=2)
    return tile

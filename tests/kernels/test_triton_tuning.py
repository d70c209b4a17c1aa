"""Tile selection (triton_kernels/tuning.py): pinning, the cache file, the choice of the fastest candidate,
and no timing under the interpreter. The timings themselves need a GPU (benchmarks/gpu_report.py --quick);
here a fake timer stands in for them. The candidates' ahead-of-time resources are checked in
benchmarks/tests/test_kernel_resources.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from oracle import make_case, semclip_loss_float64

import semclip_kernels as sk

config = pytest.importorskip("semclip_kernels.triton_kernels.config")
tuning = pytest.importorskip("semclip_kernels.triton_kernels.tuning")
triton_fused = pytest.importorskip("semclip_kernels.backends.triton_fused")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Each test: its own cache file, no pin, no choice remembered from another test."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tiles.json"))
    monkeypatch.delenv(tuning.TILE_ENV, raising=False)
    tuning.forget_choices()
    yield
    tuning.forget_choices()


def no_timing(*args, **kwargs):
    raise AssertionError("a candidate was timed")


def test_candidates_start_with_the_default_and_fit_d():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for dim in (24, 768):
            candidates = config.tile_candidates(dim, dtype)
            assert candidates[0] == config.tile_config(dim, dtype)
            assert len(set(candidates)) == len(candidates)
            for tile in candidates:
                assert tile.block_d <= max(16, 1 << math.ceil(math.log2(dim)))
    assert (
        len(config.tile_candidates(768, torch.bfloat16)) >= 2 and len(config.tile_candidates(768, torch.float32)) >= 2
    )


def test_interpreter_and_cpu_never_time(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "time_candidate", no_timing)
    for device in (CPU, torch.device("cuda")):  # under TRITON_INTERPRET=1 a CUDA device is not timed either
        if not tuning.tl_utils.INTERPRETED and device.type == "cuda":
            continue
        assert tuning.select_tile(768, torch.bfloat16, device) == config.tile_config(768, torch.bfloat16)
    assert not (tmp_path / "tiles.json").exists()


def test_cache_round_trips_atomically(tmp_path):
    path = str(tmp_path / "sub" / "tiles.json")
    tile = config.tile_candidates(768, torch.bfloat16)[-1]
    tuning.write_cache_entry(path, "gpu A|d=768|bfloat16|triton=x", {"tile": {**tile.__dict__}, "ms": {"a": 1.0}})
    tuning.write_cache_entry(path, "gpu B|d=512|float32|triton=x", {"tile": {"block_m": 1}})
    entries = tuning.read_cache(path)
    assert set(entries) == {"gpu A|d=768|bfloat16|triton=x", "gpu B|d=512|float32|triton=x"}
    assert (
        tuning.cached_tile(entries["gpu A|d=768|bfloat16|triton=x"], config.tile_candidates(768, torch.bfloat16))
        == tile
    )
    assert (
        tuning.cached_tile(entries["gpu B|d=512|float32|triton=x"], config.tile_candidates(512, torch.float32)) is None
    )
    assert json.loads((tmp_path / "sub" / "tiles.json").read_text())["format"] == tuning.CACHE_FORMAT
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tiles.json"]  # no temporary file left
    # A tile no longer among the candidates is timed again; a corrupt file reads as empty (with a warning).
    stale = {"tile": {**config.TileConfig(32, 32, 32, 2, 1).__dict__}}
    assert tuning.cached_tile(stale, config.tile_candidates(768, torch.bfloat16)) is None
    (tmp_path / "sub" / "tiles.json").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the tile tuning cache"):
        assert tuning.read_cache(path) == {}


def test_fastest_takes_the_least_time_and_skips_failures():
    a, b = config.tile_candidates(768, torch.bfloat16)[:2]
    c = dataclasses.replace(b, num_stages=b.num_stages - 1)  # a third distinct tile: fastest() only compares
    times = {a: 3.0, b: 1.0, c: 1.0}
    assert tuning.fastest([a, b, c], times.__getitem__) == (b, {tuning.tile_name(t): times[t] for t in (a, b, c)})

    def b_fails(tile):
        if tile == b:
            raise RuntimeError("out of resources")
        return times[tile]

    with pytest.warns(UserWarning, match="skipped"):
        best, measured = tuning.fastest([a, b, c], b_fails)
    assert best == c and tuning.tile_name(b) not in measured


def test_first_use_times_once_then_the_cache_decides(monkeypatch, tmp_path):
    # The GPU path with a fake timer: _tunable says yes, the timer says the last candidate is fastest.
    candidates = config.tile_candidates(768, torch.bfloat16)
    calls = []

    def fake_timer(tile, dim, dtype, device):
        calls.append(tile)
        return 1.0 + candidates[::-1].index(tile)

    monkeypatch.setattr(tuning, "_tunable", lambda device, dtype: True)
    monkeypatch.setattr(tuning, "time_candidate", fake_timer)
    chosen = tuning.select_tile(768, torch.bfloat16, CPU)
    assert chosen == candidates[-1] and calls == list(candidates)
    assert tuning.select_tile(768, torch.bfloat16, CPU) == chosen and len(calls) == len(candidates)  # remembered
    entries = tuning.read_cache(str(tmp_path / "tiles.json"))
    (key,) = entries
    assert key == tuning.cache_key("cpu", 768, torch.bfloat16) and set(entries[key]["ms"]) == {
        tuning.tile_name(t) for t in candidates
    }
    # A new process (choices forgotten) reads the cache instead of timing; it keeps what the file says.
    monkeypatch.setattr(tuning, "time_candidate", no_timing)
    tuning.forget_choices()
    assert tuning.select_tile(768, torch.bfloat16, CPU) == chosen
    entries[key]["tile"] = {**candidates[1].__dict__}
    tuning.write_cache_entry(str(tmp_path / "tiles.json"), key, entries[key])
    tuning.forget_choices()
    assert tuning.select_tile(768, torch.bfloat16, CPU) == candidates[1]
    # Other d: its own key, timed again.
    monkeypatch.setattr(tuning, "time_candidate", fake_timer)
    assert tuning.select_tile(512, torch.bfloat16, CPU) == config.tile_candidates(512, torch.bfloat16)[-1]


def test_pinning(monkeypatch):
    monkeypatch.setattr(tuning, "_tunable", lambda device, dtype: True)
    monkeypatch.setattr(tuning, "time_candidate", no_timing)
    monkeypatch.setenv(tuning.TILE_ENV, "default")
    assert tuning.select_tile(768, torch.float32, CPU) == config.tile_config(768, torch.float32)
    tuning.forget_choices()
    monkeypatch.setenv(tuning.TILE_ENV, "128x128x32:8:4")
    assert tuning.select_tile(768, torch.bfloat16, CPU) == config.TileConfig(128, 128, 32, 8, 4)
    assert tuning.select_tile(20, torch.bfloat16, CPU).block_d == 32  # D clipped to d rounded up
    tuning.forget_choices()
    monkeypatch.setenv(tuning.TILE_ENV, "32x64x16")  # warps and stages: the dtype's default tile's
    default = config.tile_config(768, torch.float32)
    assert tuning.select_tile(768, torch.float32, CPU) == config.TileConfig(32, 64, 16, default.num_warps,
                                                                           default.num_stages)  # fmt: skip
    # block_rows / block_cols pin the sides whatever the environment says.
    assert tuning.select_tile(768, torch.float32, CPU, 16, None) == config.tile_config(768, torch.float32, 16, None)
    for bad in ("fast", "128x64", "100x64x64", "128x64x512", "128x64x64:3:2"):
        tuning.forget_choices()
        monkeypatch.setenv(tuning.TILE_ENV, bad)
        with pytest.raises(ValueError, match=tuning.TILE_ENV):
            tuning.select_tile(768, torch.float32, CPU)


def test_the_first_choice_is_kept_for_the_process(monkeypatch):
    # Deterministic once chosen: a pin changed mid-process does not change the tile (the backward must
    # recompute with the forward's tile) until the choices are forgotten.
    monkeypatch.setenv(tuning.TILE_ENV, "16x32x16:4:2")
    first = tuning.select_tile(24, torch.float32, CPU)
    monkeypatch.setenv(tuning.TILE_ENV, "32x32x16:4:2")
    assert tuning.select_tile(24, torch.float32, CPU) == first == config.TileConfig(16, 32, 16, 4, 2)
    tuning.forget_choices()
    assert tuning.select_tile(24, torch.float32, CPU) == config.TileConfig(32, 32, 16, 4, 2)


@pytest.mark.skipif(not triton_fused.is_available(CPU)[0], reason="Triton interpreter not active")
def test_pinned_tile_runs_in_the_backend(monkeypatch):
    # The loss with a pinned 16x32 tile: the forward and the backward's dS panel both get it, and float64
    # says the result is right.
    from semclip_kernels.triton_kernels import backward as backward_kernels

    monkeypatch.setenv(tuning.TILE_ENV, "16x32x16:4:2")
    seen = []
    real_forward, real_launch = triton_fused.lse_forward, backward_kernels.ds_panel_launch

    def spy_forward(rows, cols, scale, col_bias, tile, *args, **kwargs):
        seen.append(("forward", tile))
        return real_forward(rows, cols, scale, col_bias, tile, *args, **kwargs)

    def spy_launch(tile, *args, **kwargs):
        seen.append(("ds_panel", tile))
        return real_launch(tile, *args, **kwargs)

    monkeypatch.setattr(triton_fused, "lse_forward", spy_forward)
    monkeypatch.setattr(backward_kernels, "ds_panel_launch", spy_launch)
    case = make_case(40, 24, 1, 1, tau=10.0, dtype=torch.float32, seed=3)
    loss = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation, backend="triton")
    loss.backward()
    assert seen == [("forward", config.TileConfig(16, 32, 16, 4, 2)), ("ds_panel", config.TileConfig(16, 32, 16, 4, 2))]
    stats = sk.backends.last_backward_stats("triton", case.image.device)
    assert stats.tiles == math.ceil(40 / 16) * math.ceil(3 * 40 / 32)
    expected = semclip_loss_float64(case.image, case.text, case.logit_scale, case.paraphrase, case.negation).detach()
    assert abs(float(loss.detach()) - float(expected)) <= 1e-5 * abs(float(expected))

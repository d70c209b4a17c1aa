"""benchmarks/tau_gradient_floor.py: its verdict passes on today's backends and fails on a broken τ gradient."""

from __future__ import annotations

from benchmarks import tau_gradient_floor


def test_backends_within_the_floor(capsys):
    assert tau_gradient_floor.main(["--examples", "12", "--backends", "torch", "cpp"]) == 0
    assert "verdict: every backend within" in capsys.readouterr().out


def test_a_gradient_off_by_a_thousandth_is_missed(monkeypatch, capsys):
    exact = tau_gradient_floor.float64_scale_gradient
    monkeypatch.setattr(tau_gradient_floor, "backend_scale_gradient", lambda ex, backend: exact(ex)[1] * (1 + 3e-3))
    assert tau_gradient_floor.main(["--examples", "12", "--backends", "torch"]) == 1
    assert "MISSED" in capsys.readouterr().out

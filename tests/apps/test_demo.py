"""training.demo: the two runs side by side (one process each) train exactly what they train one after the other."""

from __future__ import annotations

import json

import pytest

from training import demo

SMALL = ["--steps", "3", "--train-size", "64", "--val-size", "16", "--batch-size", "16", "--no-progress"]


def test_side_by_side_prints_the_same_table_as_one_after_the_other(tmp_path, capsys):
    serial = demo.main([*SMALL, "--jobs", "1", "--out", str(tmp_path / "serial")])
    table_serial = capsys.readouterr().out.split("\n\n")[1]
    parallel = demo.main([*SMALL, "--jobs", "2", "--out", str(tmp_path / "parallel")])
    table_parallel = capsys.readouterr().out.split("\n\n")[1]
    assert serial == parallel  # bit-identical metrics: one thread per run, whatever runs beside it
    assert table_serial == table_parallel and table_serial.startswith("metric")
    saved = json.loads((tmp_path / "parallel" / "results.json").read_text())
    assert saved["jobs"] == 2 and saved["metrics"] == parallel
    assert (tmp_path / "parallel" / "semclip" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flag, value", [("--threads", "-1"), ("--steps", "0"), ("--jobs", "3")])
def test_bad_settings_fail_with_one_line_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main([*SMALL, flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err.strip().splitlines()[-1]

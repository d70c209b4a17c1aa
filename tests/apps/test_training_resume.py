"""The training loop: exact resume, resume corner cases, atomic checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

# training/ lives at the repository root and is not part of the installed package.
from training.checkpoint import atomic_save, load_checkpoint  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.train import train  # noqa: E402


def tiny_config(out: str, **overrides) -> TrainConfig:
    values = dict(out=out, steps=3, batch_size=8, train_size=20, val_size=12, warmup=1, eval_every=0,
                  checkpoint_every=0, log_every=1, progress=False, synthetic_negations=2, lr=1e-2,
                  backend="torch")  # the loop, not backend selection, is under test here
    values.update(overrides)
    return TrainConfig(**values)


def test_resume_continues_exactly(tmp_path):
    # 20 items / batch 8: step 2 starts epoch 1, so resume must also restore the epoch's order.
    full = tiny_config(str(tmp_path / "full"))
    metrics = train(full)
    assert set(metrics) >= {"negation_accuracy", "paraphrase_r1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
    assert os.path.getsize(tmp_path / "full" / "curves.png") > 0
    final = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert final["negation_accuracy"] == metrics["negation_accuracy"]

    split = tiny_config(str(tmp_path / "split"))
    assert train(split, stop_after=2) == {}
    assert load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))["step"] == 2
    resumed = train(split, resume="auto")

    full_state = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    split_state = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert full_state["step"] == split_state["step"] == 3
    for name, value in full_state["model"].items():
        assert torch.equal(value, split_state["model"][name]), name
    for a, b in zip(full_state["optimizer"]["state"].values(), split_state["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert resumed == metrics
    log = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3]


def test_clip_mode_trains_on_captions_only(tmp_path):
    metrics = train(tiny_config(str(tmp_path / "clip"), loss="clip", steps=2))
    assert 0.0 <= metrics["i2t_r1"] <= 1.0


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"step": 1, "weights": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": 2, "weights": torch.zeros(3), "bad": Unpicklable()}, path)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind




# ----------------------------------------------------------------------------- resume corner cases (issue 17)


def eval_steps(out) -> list[int]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["step"] for record in map(json.loads, lines) if record["kind"] == "eval"]


def test_resume_before_the_first_checkpoint_starts_fresh(tmp_path, capsys):
    # A scheduler that always passes --resume: the first launch finds no checkpoint yet.
    out = tmp_path / "run"
    metrics = train(tiny_config(str(out), steps=1), resume="auto")
    assert f"--resume: no checkpoint at {out / 'checkpoint.pt'} yet: starting a fresh run" in capsys.readouterr().err
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 1 and "i2t_r1" in metrics
    # an explicit path that does not exist is a typo, not a first launch: the error names the flag and the path
    with pytest.raises(FileNotFoundError, match=r"--resume .*elsewhere\.pt: no such checkpoint"):
        train(tiny_config(str(out), steps=1), resume=str(tmp_path / "elsewhere.pt"))


def test_resume_drops_a_torn_last_line_of_the_log(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(str(out), steps=2)
    train(config, stop_after=1)
    log = out / "metrics.jsonl"
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 2, "epoch": 0, "lo')  # killed mid-append
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:2: dropped a torn last line"):
        train(config, resume="auto")
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]


def test_unreadable_log_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(str(out), steps=2)
    train(config, stop_after=1)
    log = out / "metrics.jsonl"
    log.write_text("not json\n" + log.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: not a JSON record"):
        train(config, resume="auto")


def test_resume_removes_temporary_files_of_killed_writes(tmp_path, capsys):
    out = tmp_path / "run"
    config = tiny_config(str(out), steps=2)
    train(config, stop_after=1)
    # what tempfile.mkstemp(prefix=".tmp_checkpoint.pt") etc. leave when the writer is SIGKILLed
    orphans = [".tmp_checkpoint.ptk2j4x9_a", ".tmp_checkpoint.pt0q8vyz1m", ".tmp_metrics.jsonlab12cd34"]
    for name in orphans:
        (out / name).write_bytes(b"partial")
    (out / ".tmp_notes.txt").write_text("not ours", encoding="utf-8")
    train(config, resume="auto")
    assert sorted(os.listdir(out)) == sorted([".tmp_notes.txt", "checkpoint.pt", "curves.png", "metrics.json",
                                              "metrics.jsonl"])
    err = capsys.readouterr().err
    assert all(f"removed {out / name}" in err for name in orphans)


def test_resume_of_a_finished_run_adds_no_second_final_evaluation(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(str(out), steps=2)
    metrics = train(config)
    log_before = (out / "metrics.jsonl").read_text(encoding="utf-8")
    checkpoint_mtime = os.stat(out / "checkpoint.pt").st_mtime_ns
    assert train(config, resume="auto") == metrics
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == log_before
    assert eval_steps(out) == [2]
    assert os.stat(out / "checkpoint.pt").st_mtime_ns == checkpoint_mtime
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["i2t_r1"] == metrics["i2t_r1"]


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    out = str(tmp_path / "run")
    train(tiny_config(out), stop_after=2)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    log = tmp_path / "run" / "metrics.jsonl"
    saved_checkpoint, saved_log = checkpoint.read_bytes(), log.read_text()

    # The case: a SemCLIP run resumed as CLIP with another batch size and seed continued silently.
    with pytest.raises(ValueError) as error:
        train(tiny_config(out, loss="clip", batch_size=4, seed=5), resume="auto")
    message = str(error.value)
    for expected in ("--loss 'semclip' (now 'clip')", "--batch-size 8 (now 4)", "--seed 0 (now 5)",
                     "--resume-override loss,batch_size,seed"):
        assert expected in message, message
    assert "--lr" not in message  # only the settings that differ are named
    assert checkpoint.read_bytes() == saved_checkpoint and log.read_text() == saved_log  # nothing touched

    # Where the run writes, its backend and its logging cadence may change between launches.
    assert train(tiny_config(out, log_every=2, backend="reference"), resume="auto")
    assert load_checkpoint(str(checkpoint))["step"] == 3

    # A finished run's checkpoint is checked too (it used to report its final evaluation whatever was asked).
    with pytest.raises(ValueError, match=r"--steps 3 \(now 4\)"):
        train(tiny_config(out, steps=4), resume="auto")
    # Named in resume_override, a setting may differ: the run continues with the new value.
    train(tiny_config(out, steps=4), resume="auto", resume_override=["steps"])
    assert load_checkpoint(str(checkpoint))["step"] == 4
    with pytest.raises(ValueError, match="--resume-override: colour not among the run-shaping settings"):
        train(tiny_config(out, steps=4), resume="auto", resume_override=["colour"])


def test_resume_override_on_the_command_line(tmp_path, capsys):
    from training.train import main

    out = str(tmp_path / "run")
    common = ["--out", out, "--batch-size", "8", "--train-size", "20", "--val-size", "12", "--warmup", "1",
              "--eval-every", "0", "--checkpoint-every", "0", "--synthetic-negations", "2", "--backend", "torch",
              "--no-progress"]
    main(common + ["--steps", "2"])
    with pytest.raises(ValueError, match=r"--steps 2 \(now 3\)"):
        main(common + ["--steps", "3", "--resume"])
    assert main(common + ["--steps", "3", "--resume", "--resume-override", "steps"])
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a flag mistake: one line, exit status 2, before any model
        main(common + ["--steps", "3", "--resume-override", "steps"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m training.train: error: --resume-override goes with --resume"]

"""Every command-line tool answers a mistake as a Unix tool does: one line on stderr naming the flag and what to
do, exit status 2, before any model is built (training.train, training.evaluate, training.demo, the triplet
generator, the open_clip trainer). Each tool is run once as a subprocess, as a user runs it; the other cases call
its `main(argv)` here with the model builder or the trainer replaced by a failure, so that "before any model is
built" is checked, not assumed."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from harness import REPO_ROOT
from PIL import Image

ROOT = REPO_ROOT


def run_module(module: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def assert_one_line(stderr: str, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def exit_of(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of a `main(argv)` that must exit through SystemExit."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def triplet_csv(folder, rows: int, name: str = "triplets.csv") -> str:
    """A triplet CSV of `rows` rows whose images exist (docs/contract.md §6)."""
    lines = ["filepath,caption,paraphrase,negation"]
    for i in range(rows):
        Image.fromarray(np.full((8, 8, 3), i * 20 % 255, dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append(f"img{i}.png,a red square {i},a square that is red {i},a blue square {i}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------- training.train


@pytest.fixture
def no_model(monkeypatch):
    """training.train with every way to build a model or train replaced by a test failure."""
    import training.config
    import training.train as train_module

    def refuse(*_args, **_kwargs):
        pytest.fail("a model was built (or training started) before the flags were checked")

    monkeypatch.setattr(train_module, "train", refuse)
    monkeypatch.setattr(train_module, "build_model_for", refuse)
    monkeypatch.setattr(training.config, "build_model", refuse)
    return train_module


def test_train_missing_csv_subprocess(tmp_path):
    out = tmp_path / "run"
    done = run_module("training.train", "--data", "csv", "--csv", "missing.csv", "--out", str(out), cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr, "python -m training.train: error:", "--csv missing.csv", "no such file")
    assert not out.exists()  # nothing written either


@pytest.mark.parametrize(
    "case",
    [
        "csv_without_file",
        "unknown_model",
        "missing_resume",
        "override_alone",
        "csv_with_synthetic",
        "train_size_below_batch",
        "zero_steps",
        "missing_pretrained",
        "missing_val_csv",
    ],
)
def test_train_flag_mistakes(case, tmp_path, no_model, capsys):
    out = str(tmp_path / "run")
    argv, fragments = {
        "csv_without_file": (["--data", "csv"], ["--data csv needs --csv"]),
        "unknown_model": (["--model", "ViT-B-3"], ["--model ViT-B-3", "not an open_clip model", "ViT-B-32"]),
        "missing_resume": (["--resume", str(tmp_path / "gone.pt")], ["--resume", "gone.pt", "no such checkpoint"]),
        "override_alone": (["--resume-override", "lr"], ["--resume-override goes with --resume"]),
        "csv_with_synthetic": (["--csv", "x.csv"], ["--csv needs --data csv"]),
        "train_size_below_batch": (
            ["--train-size", "64", "--batch-size", "128"],
            ["--train-size 64", "--batch-size 128"],
        ),
        "zero_steps": (["--steps", "0"], ["--steps must be > 0"]),
        "missing_pretrained": (["--pretrained", "nowhere.pt"], ["--pretrained nowhere.pt", "no such file"]),
        "missing_val_csv": (
            ["--data", "csv", "--csv", triplet_csv(tmp_path, 4), "--batch-size", "4", "--val-csv", "val_gone.csv"],
            ["--val-csv val_gone.csv", "no such file"],
        ),
    }[case]
    status, stderr = exit_of(no_model.main, ["--out", out, *argv], capsys)
    assert status == 2
    assert_one_line(stderr, "python -m training.train: error:", *fragments)


@pytest.mark.parametrize("rows, batch, fails", [(3, 4, True), (4, 4, False), (9, 4, False)])
def test_train_csv_smaller_than_one_batch(rows, batch, fails, tmp_path, no_model, capsys):
    argv = [
        "--out",
        str(tmp_path / "run"),
        "--data",
        "csv",
        "--csv",
        triplet_csv(tmp_path, rows),
        "--batch-size",
        str(batch),
    ]
    if fails:
        status, stderr = exit_of(no_model.main, argv, capsys)
        assert status == 2
        assert_one_line(stderr, f"has {rows} usable row(s), fewer than one batch (--batch-size {batch})")
    else:  # enough rows: the checks pass and training would start (here: the replaced `train` fails the test)
        with pytest.raises(pytest.fail.Exception, match="before the flags were checked"):
            no_model.main(argv)


def test_train_resume_of_its_own_checkpoint_before_it_exists_is_not_an_error(tmp_path, no_model):
    out = tmp_path / "run"  # --resume OUT/checkpoint.pt on the first launch starts fresh (documented)
    with pytest.raises(pytest.fail.Exception, match="before the flags were checked"):
        no_model.main(["--out", str(out), "--resume", str(out / "checkpoint.pt")])


# -------------------------------------------------------------------------------------------- training.evaluate


def test_evaluate_missing_checkpoint_subprocess(tmp_path):
    done = run_module("training.evaluate", "--checkpoint", "nothere.pt", cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr, "python -m training.evaluate: error:", "--checkpoint nothere.pt", "no such")


def test_evaluate_not_a_checkpoint_and_missing_csv(tmp_path, monkeypatch, capsys):
    import training.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "build_model_for", lambda *_: pytest.fail("model built"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    status, stderr = exit_of(evaluate_module.main, ["--checkpoint", str(junk)], capsys)
    assert status == 2
    assert_one_line(stderr, f"--checkpoint {junk}: not a checkpoint written by training.train")
    status, stderr = exit_of(evaluate_module.main, ["--checkpoint", str(junk), "--csv", "gone.csv"], capsys)
    assert status == 2
    assert_one_line(stderr, "--csv gone.csv: no such file")


def test_evaluate_does_not_claim_random_weights_while_loading_a_checkpoint(tmp_path, caplog, capsys):
    from training.checkpoint import atomic_save
    from training.config import TrainConfig
    from training.evaluate import main as evaluate_main
    from training.model import build_model

    torch.manual_seed(0)
    config = TrainConfig(val_size=16, synthetic_negations=1)
    atomic_save(
        {"model": build_model().model.state_dict(), "config": dataclasses.asdict(config), "step": 7},
        str(tmp_path / "checkpoint.pt"),
    )
    caplog.clear()  # building the checkpoint's model above warned, rightly
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--batch-size", "16"])
    assert "negation_accuracy" in metrics
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()], caplog.text
    assert "step 7" in capsys.readouterr().err  # what it loaded instead


# ----------------------------------------------------------------------------------------------- training.demo


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--steps", "0"], ["--steps must be > 0"]),
        (["--train-size", "100", "--batch-size", "128"], ["--train-size 100", "--batch-size 128"]),
        (["--threads", "-1"], ["--threads must be 0 (torch's default) or more"]),
    ],
)
def test_demo_flag_mistakes(argv, fragments, monkeypatch, capsys):
    import training.demo as demo

    monkeypatch.setattr(demo, "train", lambda *_: pytest.fail("training started"))
    status, stderr = exit_of(demo.main, argv, capsys)
    assert status == 2
    assert_one_line(stderr, "python -m training.demo: error:", *fragments)


def test_demo_unknown_backend_names_the_flag(monkeypatch, capsys):
    import training.demo as demo

    monkeypatch.setattr(demo, "train", lambda *_: pytest.fail("training started"))
    status, stderr = exit_of(demo.main, ["--backend", "cuda"], capsys)
    assert status == 2 and "--backend: invalid choice: 'cuda'" in stderr.strip().splitlines()[-1]


def test_pretrained_demo_missing_packages_one_line_with_the_install_command(monkeypatch, capsys):
    import training.pretrained as pretrained
    import training.pretrained_demo as pretrained_demo

    monkeypatch.setitem(pretrained.PRETRAINED_PACKAGES, "semclip_no_such_module", "semclip-no-such-package")
    monkeypatch.setattr(pretrained_demo, "run", lambda *_: pytest.fail("the demo started"))
    status, stderr = exit_of(pretrained_demo.main, [], capsys)
    assert status == 2
    assert_one_line(stderr, "semclip-no-such-package", 'pip install --no-build-isolation -e ".[pretrained]"')


# ------------------------------------------------------------------------------------------- training.triplets


def write_pairs(path, count: int) -> None:
    path.write_text(
        "filepath,caption\n" + "".join(f"img{i}.png,a red square number {i}\n" for i in range(count)), encoding="utf-8"
    )


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "base_url",
    [f"http://127.0.0.1:{closed_port()}/v1", "http://no-such-host.invalid/v1"],
    ids=["connection-refused", "unknown-host"],
)
def test_llm_generator_stops_when_no_server_answers_whatever_the_fallback(base_url, tmp_path, capsys):
    from training.triplets.cli import main

    write_pairs(tmp_path / "pairs.csv", 40)
    out = tmp_path / "t.csv"
    status = main(
        [
            "--input",
            str(tmp_path / "pairs.csv"),
            "--output",
            str(out),
            "--generator",
            "llm",
            "--base-url",
            base_url,
            "--model",
            "m",
            "--fallback",
            "rules",
            "--concurrency",
            "4",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert f"stopped: cannot reach {base_url}/chat/completions" in err and "--base-url" in err
    assert "0 filled by rules" in err and "0 row(s) written" in err  # rules did not pass for the LLM
    requests = int(err.split("requests ")[1].split(";")[0].split(",")[0])
    assert requests <= 4  # the requests already in flight at most, not 40 captions x retries


def test_triplets_missing_input_subprocess(tmp_path):
    done = run_module("training.triplets", "--input", "gone.csv", "--output", "t.csv", cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr, "python -m training.triplets: error:", "gone.csv", "cannot read input")


def test_triplet_measure_missing_input(tmp_path, capsys):
    from training.triplets.measure import main

    status, stderr = exit_of(main, ["--input", str(tmp_path / "gone.csv")], capsys)
    assert status == 2
    assert_one_line(stderr, "python -m training.triplets.measure: error: --input", "gone.csv")


# ------------------------------------------------------------------------------------------ the open_clip trainer


def open_clip_argv(csv_path: str, *extra: str) -> list[str]:
    return [
        "--train-data",
        csv_path,
        "--csv-separator",
        ",",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "caption",
        "--model",
        "ViT-B-32",
        "--workers",
        "0",
        *extra,
    ]


def test_open_clip_dataset_smaller_than_one_batch_subprocess(tmp_path):
    # The reported case: 8 rows with --batch-size 256 trained 0 steps and wrote ten ViT-B-32 checkpoints.
    data = triplet_csv(tmp_path, 8)
    done = run_module(
        "semclip_train.open_clip",
        *open_clip_argv(data, "--batch-size", "256", "--epochs", "10", "--logs", str(tmp_path / "logs")),
        cwd=str(tmp_path),
    )
    assert done.returncode == 2, done.stderr
    assert_one_line(
        done.stderr, "python -m semclip_train.open_clip: error:", "--train-data", "has 8 row(s)", "--batch-size 256"
    )
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "rows, batch, accum, world, fails",
    [
        (8, 9, 1, 1, True),
        (8, 8, 1, 1, False),  # one batch exactly is one step
        (8, 4, 3, 1, True),
        (12, 4, 3, 1, False),  # --accum-freq: a step is accum micro-batches
        (8, 5, 1, 2, True),
        (8, 4, 1, 2, False),  # under torchrun each rank gets ceil(rows / world)
    ],
)
def test_open_clip_steps_per_epoch(rows, batch, accum, world, fails, tmp_path, monkeypatch, capsys):
    import open_clip_train.main as open_clip_main

    import semclip_train.open_clip.cli as command

    started = []
    monkeypatch.setattr(open_clip_main, "main", lambda argv: started.append(argv) or 0)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = open_clip_argv(triplet_csv(tmp_path, rows), "--batch-size", str(batch), "--accum-freq", str(accum))
    if fails:
        status, stderr = exit_of(command.main, argv, capsys)
        assert status == 2 and not started
        assert_one_line(stderr, f"has {rows} row(s), fewer than one optimizer step", f"--batch-size {batch}")
    else:
        assert command.main(argv) == 0 and started


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--model", "ViT-B-3"], ["--model ViT-B-3: not an open_clip model"]),
        (["--model-config", "gone.json"], ["--model-config gone.json: no such file"]),
        (["--paraphrases-per-image", "-1"], ["--paraphrases-per-image must be an integer >= 0"]),
        (["--val-data", "val_gone.csv"], ["--val-data val_gone.csv: no such file"]),
        (["--accum-freq", "0"], ["--accum-freq must be >= 1, got 0"]),
    ],
)
def test_open_clip_flag_mistakes(extra, fragments, tmp_path, monkeypatch, capsys):
    import open_clip_train.main as open_clip_main

    import semclip_train.open_clip.cli as command

    monkeypatch.setattr(open_clip_main, "main", lambda argv: pytest.fail("the trainer started"))
    argv = open_clip_argv(triplet_csv(tmp_path, 8), "--batch-size", "4") + extra
    status, stderr = exit_of(command.main, argv, capsys)
    assert status == 2
    assert_one_line(stderr, "python -m semclip_train.open_clip: error:", *fragments)


def test_open_clip_missing_train_data(tmp_path, monkeypatch, capsys):
    import open_clip_train.main as open_clip_main

    import semclip_train.open_clip.cli as command

    monkeypatch.setattr(open_clip_main, "main", lambda argv: pytest.fail("the trainer started"))
    status, stderr = exit_of(command.main, open_clip_argv(str(tmp_path / "gone.csv")), capsys)
    assert status == 2
    assert_one_line(stderr, "--train-data", "gone.csv: no such file")


def test_old_open_clip_command_names_the_new_one(tmp_path):
    done = run_module("semclip_kernels.open_clip_train", "--train-data", "x.csv", cwd=str(tmp_path))
    assert done.returncode == 2
    assert_one_line(done.stderr, "python -m semclip_train.open_clip")

"""`--semclip-grad-cache` in `python -m semclip_train.open_clip` (open_clip's own trainer).

Runs open_clip_train for a few steps on a tiny model whose vision tower drops patches at random
(`patch_dropout`, drawn from the CPU generator) and a CSV of generated images with paraphrases and
negations. Each optimizer step's gradients are compared with one big batch's: a copy of the model taken at
the step, the same micro-batches in one autograd graph from the same random state, the float64 oracle
of docs/contract.md §1 as the loss.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys

import numpy as np
import open_clip_train.main as open_clip_main
import open_clip_train.train as open_clip_train_loop
import psutil
import pytest
import torch
from harness import REPO_ROOT
from oracle import max_norm_rel_err, semclip_loss_float64
from PIL import Image

import semclip_train.open_clip.cli as command
import semclip_train.open_clip.grad_cache as open_clip_grad_cache
from semclip_kernels import SemCLIPLoss
from semclip_kernels.integrations.open_clip import semclip_forward

ROOT = REPO_ROOT
MODEL = "semclip-oc-tiny-patch-dropout"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                   "patch_dropout": 0.5},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip
BATCH, ACCUM, ROWS = 4, 3, 24  # 6 micro-batches per epoch: 2 optimizer steps of 3 x 4
PN, MN = 2, 1
COLORS = ("red", "green", "blue", "white")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """24 random 32-px images, a docs/contract.md §6 CSV, and the model config."""
    folder = tmp_path_factory.mktemp("gc_data")
    rng = np.random.default_rng(0)
    lines = ["filepath,caption,paraphrase,negation"]
    for i in range(ROWS):
        c = COLORS[i % 4]
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append(f'img{i}.png,a {c} square {i},"a {c} box {i} || {c} block {i}",no {c} square {i}')
    (folder / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / f"{MODEL}.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    return str(folder)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from threads
    yield
    torch.set_num_threads(threads)


def trainer_argv(data_dir: str, logs: str, name: str, *extra: str) -> list[str]:
    return [
        "--train-data", os.path.join(data_dir, "data.csv"), "--csv-separator", ",", "--csv-img-key", "filepath",
        "--csv-caption-key", "caption", "--csv-paraphrase-key", "paraphrase", "--csv-negation-key", "negation",
        "--paraphrases-per-image", str(PN), "--negations-per-image", str(MN),
        "--model-config", os.path.join(data_dir, f"{MODEL}.json"), "--batch-size", str(BATCH),
        "--accum-freq", str(ACCUM), "--epochs", "1", "--workers", "0", "--precision", "fp32", "--device", "cpu",
        "--seed", "0", "--lr", "1e-3", "--warmup", "1", "--logs", logs, "--name", name, "--log-every-n-steps", "1",
        *extra,
    ]  # fmt: skip


def run_in_process(argv: list[str], cwd: str, monkeypatch) -> None:
    """Run the command here, undoing the logging setup open_clip_train installs."""
    handlers = list(logging.root.handlers)
    levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    root_level = logging.root.level
    monkeypatch.chdir(cwd)
    try:
        assert command.main(argv) in (None, 0)
    finally:
        for handler in logging.root.handlers[len(handlers) :]:
            handler.close()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(root_level)
        for name in logging.root.manager.loggerDict:
            logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))


def logged_losses(log_file: str) -> list[float]:
    with open(log_file, encoding="utf-8") as f:
        return [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.eE+-]+)", f.read())]


def oracle_loss(image, text, scale, para, neg) -> torch.Tensor:
    return semclip_loss_float64(image, text, scale, para, neg)


class StepRecorder:
    """Records every loss call, and for every grad-cache step: a copy of the model before it, its
    micro-batches, the random state it started from, and the gradients it left."""

    def __init__(self, monkeypatch) -> None:
        self.loss_calls: list[dict] = []
        self.steps: list[dict] = []
        self.epoch_loops = 0
        recorder = self
        model_of_run: dict = {}
        real_epoch = open_clip_grad_cache.grad_cache_train_one_epoch
        real_backward = open_clip_grad_cache.grad_cache_backward
        loss_forward = SemCLIPLoss.forward

        def epoch(model, *args, **kwargs):
            recorder.epoch_loops += 1
            model_of_run["model"] = model
            return real_epoch(model, *args, **kwargs)

        def backward(micro_batches, encode, loss_fn, **kwargs):
            model = model_of_run["model"]
            step = {"model": copy.deepcopy(model), "micro_batches": [(i.clone(), t.clone()) for i, t in micro_batches],
                    "rng": torch.get_rng_state()}  # fmt: skip
            step["loss"] = real_backward(micro_batches, encode, loss_fn, **kwargs)
            step["grads"] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            recorder.steps.append(step)
            return step["loss"]

        def record_loss(module, image_features, text_features, logit_scale, *args, **kwargs):
            image, text, scale = image_features, text_features, logit_scale
            loss = loss_forward(module, image, text, scale, *args, **kwargs)
            value = loss["contrastive_loss"] if isinstance(loss, dict) else loss
            para, neg = kwargs.get("paraphrase_features"), kwargs.get("negation_features")
            recorder.loss_calls.append({"args": [t.detach().clone() for t in (image, text, scale, para, neg)],
                                        "loss": value.detach().clone()})  # fmt: skip
            return loss

        monkeypatch.setattr(open_clip_grad_cache, "grad_cache_train_one_epoch", epoch)
        monkeypatch.setattr(open_clip_grad_cache, "grad_cache_backward", backward)
        monkeypatch.setattr(SemCLIPLoss, "forward", record_loss)


def big_batch(step: dict, autocast: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """The step's loss and gradients as one autograd graph over all its micro-batches."""
    model = step["model"]
    model.zero_grad()
    torch.set_rng_state(step["rng"])
    context = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        outs = [semclip_forward(model, images, texts, n_paraphrases=PN) for images, texts in step["micro_batches"]]
    cat = {
        key: torch.cat([out[key] for out in outs])
        for key in ("image_features", "text_features", "paraphrase_features", "negation_features")
    }
    loss = oracle_loss(cat["image_features"], cat["text_features"], outs[0]["logit_scale"],
                       cat["paraphrase_features"], cat["negation_features"])  # fmt: skip
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_step_gradients_equal_one_big_batch_and_one_loss_per_step(data_dir, tmp_path, monkeypatch):
    recorder = StepRecorder(monkeypatch)
    run_in_process(trainer_argv(data_dir, str(tmp_path), "gc", "--semclip-grad-cache"), data_dir, monkeypatch)
    steps = ROWS // (BATCH * ACCUM)
    assert recorder.epoch_loops == 1 and len(recorder.steps) == steps
    # The loss once per optimizer step, over the global batch of ACCUM x BATCH images.
    assert len(recorder.loss_calls) == steps
    for call in recorder.loss_calls:
        image, text, scale, para, neg = call["args"]
        assert image.shape == (ACCUM * BATCH, 32) and para.shape == (ACCUM * BATCH, PN, 32)
        expected = float(oracle_loss(image, text, scale, para, neg))
        assert abs(float(call["loss"]) - expected) <= 1e-5 * abs(expected)
    # The log shows each step's global-batch loss (open_clip logs 5 significant digits).
    logged = logged_losses(os.path.join(tmp_path, "gc", "out.log"))
    assert len(logged) == steps
    for value, call in zip(logged, recorder.loss_calls):
        assert abs(value - float(call["loss"])) <= 1e-4 * abs(value)
    for index, step in enumerate(recorder.steps):
        expected_loss, expected = big_batch(step)
        assert abs(float(step["loss"]) - expected_loss) <= 1e-5 * abs(expected_loss), index
        assert set(step["grads"]) == set(expected)
        errors = {name: max_norm_rel_err(step["grads"][name], expected[name]) for name in expected}
        assert max(errors.values()) <= 1e-4, (index, errors)
        assert float(expected["logit_scale"].abs()) > 1e-4  # the temperature's gradient is really compared


def test_sensitivity_without_random_state_restore(data_dir, tmp_path, monkeypatch):
    """The patch dropout matters: second passes that draw other patches give other gradients (seen above)."""
    import semclip_kernels.grad_cache as grad_cache_module

    recorder = StepRecorder(monkeypatch)
    monkeypatch.setattr(grad_cache_module.RandomState, "restore", lambda self: None)
    run_in_process(trainer_argv(data_dir, str(tmp_path), "broken", "--semclip-grad-cache"), data_dir, monkeypatch)
    step = recorder.steps[0]
    _, expected = big_batch(step)
    assert max(max_norm_rel_err(step["grads"][name], expected[name]) for name in expected) > 1e-2


def test_without_the_flag_open_clip_accumulation_runs_unchanged(data_dir, tmp_path, monkeypatch):
    recorder = StepRecorder(monkeypatch)
    seen = []
    real = open_clip_main.train_one_epoch
    monkeypatch.setattr(open_clip_main, "train_one_epoch", lambda *a, **k: seen.append(1) or real(*a, **k))
    run_in_process(trainer_argv(data_dir, str(tmp_path), "plain"), data_dir, monkeypatch)
    assert real is open_clip_train_loop.train_one_epoch and seen == [1] and recorder.epoch_loops == 0
    # open_clip's accumulation: the loss once per micro-batch, each over the whole accumulated batch.
    assert len(recorder.loss_calls) == ROWS // BATCH
    assert all(call["args"][0].shape == (ACCUM * BATCH, 32) for call in recorder.loss_calls)


def test_amp_bf16_grad_checkpointing_and_resume(data_dir, tmp_path, monkeypatch):
    recorder = StepRecorder(monkeypatch)
    argv = trainer_argv(data_dir, str(tmp_path), "bf16", "--semclip-grad-cache", "--grad-checkpointing")
    argv[argv.index("--precision") + 1] = "amp_bf16"
    run_in_process(argv, data_dir, monkeypatch)
    steps = ROWS // (BATCH * ACCUM)
    assert len(recorder.loss_calls) == len(recorder.steps) == steps
    for call in recorder.loss_calls:
        image, text, scale, para, neg = call["args"]
        assert text.dtype == torch.bfloat16 and image.shape[0] == ACCUM * BATCH
        expected = float(oracle_loss(image, text, scale, para, neg))
        assert abs(float(call["loss"]) - expected) <= 1e-5 * abs(expected)
    for step in recorder.steps:
        assert step["model"].visual.transformer.grad_checkpointing
        expected_loss, expected = big_batch(step, autocast=True)
        assert abs(float(step["loss"]) - expected_loss) <= 2e-2 * abs(expected_loss)
        errors = {name: max_norm_rel_err(step["grads"][name], expected[name]) for name in expected}
        assert max(errors.values()) <= 5e-2, errors

    checkpoint = os.path.join(tmp_path, "bf16", "checkpoints", "epoch_1.pt")
    resumed = StepRecorder(monkeypatch)
    argv[argv.index("--name") + 1] = "resumed"
    argv[argv.index("--epochs") + 1] = "2"
    run_in_process(argv + ["--resume", checkpoint], data_dir, monkeypatch)
    with open(os.path.join(tmp_path, "resumed", "out.log"), encoding="utf-8") as f:
        log = f.read()
    assert f"resuming checkpoint '{checkpoint}' (epoch 1)" in log and "Train Epoch: 0" not in log
    assert resumed.epoch_loops == 1 and len(resumed.loss_calls) == steps
    saved = torch.load(checkpoint, map_location="cpu")
    assert torch.allclose(resumed.loss_calls[0]["args"][2].float(), saved["state_dict"]["logit_scale"].exp())
    assert len(logged_losses(os.path.join(tmp_path, "resumed", "out.log"))) == steps


@pytest.mark.parametrize("accum", [None, "1"])
def test_flag_without_accum_freq_names_it(data_dir, tmp_path, monkeypatch, capsys, accum):
    argv = trainer_argv(data_dir, str(tmp_path), "bad", "--semclip-grad-cache")
    index = argv.index("--accum-freq")
    if accum is None:
        del argv[index : index + 2]
    else:
        argv[index + 1] = accum
    monkeypatch.setattr(open_clip_main, "main", lambda *_: pytest.fail("the trainer must not start"))
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(r"--semclip-grad-cache needs --accum-freq N with N >= 2.*got --accum-freq 1", lines[0])


def test_torchrun_two_gloo_ranks_local_loss(data_dir, tmp_path):
    argv = trainer_argv(data_dir, str(tmp_path), "ddp", "--semclip-grad-cache", "--local-loss", "--gather-with-grad")
    argv[argv.index("--batch-size") + 1] = str(BATCH // 2)  # the same global batch: 2 ranks x 3 x 2
    index = argv.index("--logs")  # torchrun rejects "--logs" (ambiguous with its --logs-specs): use ./logs
    del argv[index : index + 2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "SEMCLIP_PROBE_DIR": str(tmp_path)}  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              os.path.join(ROOT, "tests", "fixtures", "open_clip_grad_cache_probe.py"), *argv]  # fmt: skip
    proc = subprocess.Popen(launch, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 300 s:\n" + output[-4000:])
    assert proc.returncode == 0, output[-4000:]
    log_file = os.path.join(tmp_path, "logs", "ddp", "out.log")
    with open(log_file, encoding="utf-8") as f:
        assert "total 2." in f.read()
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    steps = ROWS // (BATCH * ACCUM)
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["local_loss"] and len(rank["calls"]) == steps  # once per step
    logged = logged_losses(log_file)
    assert len(logged) == steps
    for step in range(steps):
        calls = [rank["calls"][step] for rank in ranks]
        assert calls[0]["image"].shape == (ACCUM * BATCH // 2, 32)  # this rank's micro-batches
        merged = [torch.cat([c[key] for c in calls]) for key in ("image", "text")]
        para, neg = (torch.cat([c[key] for c in calls]) for key in ("para", "neg"))
        expected = float(oracle_loss(*merged, calls[0]["scale"], para, neg))
        mean = sum(float(c["loss"]) for c in calls) / 2  # docs/contract.md §5: the ranks' mean is the global loss
        assert abs(mean - expected) <= 1e-5 * abs(expected)
        assert abs(logged[step] - float(calls[0]["loss"])) <= 1e-4 * abs(logged[step])  # rank 0 logs its own

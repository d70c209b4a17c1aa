"""`python -m semclip_train.open_clip`, `semclip_train.open_clip` and `semclip_kernels.integrations.open_clip`.

Runs open_clip's own trainer for a few steps on a tiny model config (tests/fixtures) and a CSV
of generated images. Single-process runs happen in this process (the trainer's `main(argv)`),
with the loss's and the text tower's inputs recorded by wrapping their classes' methods; the
torchrun test launches 2 Gloo processes. Expected values come from open_clip_train itself
(plain `ClipLoss` run), the float64 oracle, and open_clip's tokenizer applied here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys

import numpy as np
import open_clip
import open_clip_train.main as open_clip_main
import psutil
import pytest
import torch
from harness import REPO_ROOT
from oracle import semclip_loss_float64
from PIL import Image

import semclip_train.open_clip.cli as command
from semclip_kernels import SemCLIPLoss
from semclip_kernels.integrations.open_clip import SemCLIPOptions, encode_text_groups
from semclip_train.open_clip.data import read_csv_triplets
from semclip_train.open_clip.patches import CpuFriendlyDDP

ROOT = REPO_ROOT
MODEL_CONFIG = os.path.join(ROOT, "tests", "fixtures", "semclip-oc-tiny.json")
MODEL = "semclip-oc-tiny"
BATCH, ROWS = 8, 24  # 3 steps per epoch
PN, MN = 2, 2
COLORS = ("red", "green", "blue", "white")


def adjacent_views(*blocks: torch.Tensor | None) -> bool:
    """Whether the blocks are contiguous views that lie back to back, in order, in one storage: the layout
    of one text-tower pass `[captions; paraphrases; negations]`."""
    blocks = [b for b in blocks if b is not None]
    if not all(b.is_contiguous() for b in blocks):
        return False
    if len({b.untyped_storage().data_ptr() for b in blocks}) != 1:
        return False
    return all(after.storage_offset() == before.storage_offset() + before.numel()
               for before, after in zip(blocks, blocks[1:]))  # fmt: skip


def paraphrases_of(i: int) -> list[str]:
    c = COLORS[i % 4]
    # Row 5 has a single paraphrase (repeated to fill Pn); the others have 3 (cycled over epochs).
    return [f"a {c} box {i}"] if i == 5 else [f"a {c} box {i}", f"a square of {c} {i}", f"{c} block {i}"]


def negations_of(i: int) -> list[str]:
    c = COLORS[i % 4]
    return [f"no {c} square {i}", f"not a {c} thing {i}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """24 random 32-px images and a docs/contract.md §6 CSV (comma-separated, paths relative to its folder)."""
    folder = tmp_path_factory.mktemp("oc_data")
    rng = np.random.default_rng(0)
    lines = ["filepath,caption,paraphrase,negation"]
    for i in range(ROWS):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append(f'img{i}.png,a {COLORS[i % 4]} square {i},"{" || ".join(paraphrases_of(i))}",'
                     f'"{" || ".join(negations_of(i))}"')
    (folder / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Validation data without the extra columns (open_clip's own loader reads it).
    val = ["filepath,caption"] + [f"img{i}.png,a {COLORS[i % 4]} square {i}" for i in range(BATCH)]
    (folder / "val.csv").write_text("\n".join(val) + "\n", encoding="utf-8")
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
        "--csv-caption-key", "caption", "--model", MODEL, "--batch-size", str(BATCH), "--epochs", "1",
        "--workers", "0", "--precision", "fp32", "--device", "cpu", "--seed", "0", "--lr", "1e-3",
        "--warmup", "1", "--logs", logs, "--name", name, "--log-every-n-steps", "1", *extra,
    ]


def run_in_process(main, argv: list[str], cwd: str, monkeypatch) -> None:
    """Run a trainer `main(argv)` here, undoing the logging setup open_clip_train installs (handlers
    on the root logger, INFO on every logger) so that later tests log as before."""
    handlers = list(logging.root.handlers)
    levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    root_level = logging.root.level
    monkeypatch.chdir(cwd)  # open_clip's own CsvDataset resolves image paths against the cwd
    try:
        assert main(argv) in (None, 0)
    finally:
        for handler in logging.root.handlers[len(handlers):]:
            handler.close()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(root_level)
        for name in logging.root.manager.loggerDict:
            logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))


def logged_losses(log_file: str) -> list[float]:
    with open(log_file, encoding="utf-8") as f:
        return [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.eE+-]+)", f.read())]


class Recorder:
    """Wraps a loss class's forward and the text tower's encode_text to record every call."""

    def __init__(self, monkeypatch, loss_cls) -> None:
        self.losses: list[dict] = []
        self.texts: list[tuple[torch.Tensor, int]] = []  # (tokens, data_ptr of the output)
        loss_forward = loss_cls.forward
        encode_text = open_clip.model.CLIP.encode_text
        recorder = self

        def record_loss(module, image_features, text_features, logit_scale, *args, **kwargs):
            para, neg = kwargs.get("paraphrase_features"), kwargs.get("negation_features")
            loss = loss_forward(module, image_features, text_features, logit_scale, *args, **kwargs)
            value = loss["contrastive_loss"] if isinstance(loss, dict) else loss
            recorder.losses.append({
                "image": image_features.detach().clone(), "text": text_features.detach().clone(),
                "para": None if para is None else para.detach().clone(),
                "neg": None if neg is None else neg.detach().clone(),
                "scale": torch.as_tensor(logit_scale).detach().clone(), "loss": value.detach().clone(),
                "text_ptr": text_features.data_ptr(),
                "joined": adjacent_views(text_features, para, neg),
            })
            return loss

        def record_text(model, text, normalize=False):
            out = encode_text(model, text, normalize=normalize)
            if text.dim() == 2 and model.training:
                recorder.texts.append((text.detach().clone(), out.data_ptr()))
            return out

        monkeypatch.setattr(loss_cls, "forward", record_loss)
        monkeypatch.setattr(open_clip.model.CLIP, "encode_text", record_text)


@pytest.fixture(scope="module", autouse=True)
def _register_model():
    open_clip.add_model_config(MODEL_CONFIG)  # for the plain open_clip_train run


def oracle_loss(call: dict, w: float = 1.0, beta: float = 1.0) -> float:
    return float(semclip_loss_float64(call["image"], call["text"], call["scale"], call["para"], call["neg"], w, beta))


# --------------------------------------------------------------------------------------------- the command


def test_without_extras_equals_plain_open_clip_train(data_dir, tmp_path, monkeypatch):
    logs = str(tmp_path)
    plain = Recorder(monkeypatch, open_clip.loss.ClipLoss)
    run_in_process(open_clip_main.main, trainer_argv(data_dir, logs, "plain"), data_dir, monkeypatch)
    ours = Recorder(monkeypatch, SemCLIPLoss)
    argv = trainer_argv(data_dir, logs, "ours", "--model-config", MODEL_CONFIG)
    run_in_process(command.main, argv, data_dir, monkeypatch)

    assert len(plain.losses) == 3 and ours.losses and len(ours.losses) == len(plain.losses)
    assert plain.losses == [] or all(c["para"] is None and c["neg"] is None for c in ours.losses)
    for step, (mine, theirs) in enumerate(zip(ours.losses, plain.losses)):
        assert torch.allclose(mine["loss"], theirs["loss"], rtol=1e-5, atol=0), (step, mine["loss"], theirs["loss"])
        assert torch.allclose(mine["image"], theirs["image"], rtol=1e-4, atol=1e-6), step  # same trajectory
    assert logged_losses(os.path.join(logs, "ours", "out.log")) == logged_losses(os.path.join(logs, "plain", "out.log"))


@pytest.fixture(scope="module")
def extras_run(data_dir, tmp_path_factory):
    """One epoch with paraphrases and negations; its recordings and checkpoint serve several tests."""
    logs = str(tmp_path_factory.mktemp("oc_logs"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = Recorder(monkeypatch, SemCLIPLoss)
        argv = trainer_argv(data_dir, logs, "extras", "--model-config", MODEL_CONFIG,
                            "--csv-paraphrase-key", "paraphrase", "--csv-negation-key", "negation",
                            "--paraphrases-per-image", str(PN), "--negations-per-image", str(MN))
        val = ["--val-data", os.path.join(data_dir, "val.csv")]
        run_in_process(command.main, argv + val, data_dir, monkeypatch)
    return recorder, logs, argv


def expected_tokens(caption_tokens: torch.Tensor, epoch: int) -> tuple[list[str], list[str], list[str]]:
    """The row of `caption_tokens` and the texts it should show in `epoch`: each kind cycled from `epoch`."""
    tokenizer = open_clip.get_tokenizer(MODEL)
    for i in range(ROWS):
        caption = f"a {COLORS[i % 4]} square {i}"
        if torch.equal(tokenizer([caption])[0], caption_tokens):
            paras, negs = paraphrases_of(i), negations_of(i)
            return ([caption], [paras[(epoch + k) % len(paras)] for k in range(PN)],
                    [negs[(epoch + k) % len(negs)] for k in range(MN)])
    raise AssertionError("caption tokens match no CSV row")


def check_text_pass(tokens: torch.Tensor, epoch: int) -> None:
    """tokens = [captions; paraphrases (image-major); negations (image-major)] of one batch."""
    tokenizer = open_clip.get_tokenizer(MODEL)
    assert tokens.shape[0] == BATCH * (1 + PN + MN)
    for i in range(BATCH):
        caption, paras, negs = expected_tokens(tokens[i], epoch)
        assert torch.equal(tokens[BATCH + i * PN: BATCH + (i + 1) * PN], tokenizer(paras))
        start = BATCH * (1 + PN)
        assert torch.equal(tokens[start + i * MN: start + (i + 1) * MN], tokenizer(negs))


def test_extras_one_text_pass_and_step0_loss_is_the_float64_formula(extras_run):
    recorder, logs, _ = extras_run
    assert len(recorder.losses) == 3
    assert len(recorder.texts) == len(recorder.losses)  # one text-tower pass per step
    first = recorder.losses[0]
    assert first["para"].shape == (BATCH, PN, 32) and first["neg"].shape == (BATCH, MN, 32)
    # The loss got views of the tower's single output, adjacent in [T; P; N] order.
    tokens, out_ptr = recorder.texts[0]
    assert first["text_ptr"] == out_ptr and first["joined"]
    check_text_pass(tokens, epoch=0)
    expected = oracle_loss(first)
    assert abs(float(first["loss"]) - expected) <= 1e-5 * abs(expected)
    logged = logged_losses(os.path.join(logs, "extras", "out.log"))
    assert len(logged) == 3 and abs(logged[0] - expected) <= 1e-4 * abs(expected)  # logged with 5 digits
    assert all(abs(oracle_loss(c) - float(c["loss"])) <= 1e-5 * abs(oracle_loss(c)) for c in recorder.losses)
    # Validation ran on captions only through the model's own forward: [B, L] tokens, open_clip's metrics.
    with open(os.path.join(logs, "extras", "out.log"), encoding="utf-8") as f:
        evals = [line for line in f if "Eval Epoch: 1" in line and "clip_val_loss" in line]
    assert len(evals) == 1 and "image_to_text_R@1" in evals[0]


def test_resume_continues_with_the_next_epochs_texts(extras_run, data_dir, monkeypatch):
    _, logs, argv = extras_run
    checkpoint = os.path.join(logs, "extras", "checkpoints", "epoch_1.pt")
    assert os.path.isfile(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu")
    resumed = Recorder(monkeypatch, SemCLIPLoss)
    argv = [a for a in argv]
    argv[argv.index("--name") + 1] = "resumed"
    argv[argv.index("--epochs") + 1] = "2"
    run_in_process(command.main, argv + ["--resume", checkpoint], data_dir, monkeypatch)
    with open(os.path.join(logs, "resumed", "out.log"), encoding="utf-8") as f:
        log = f.read()
    assert f"resuming checkpoint '{checkpoint}' (epoch 1)" in log
    assert "Train Epoch: 0" not in log and "Train Epoch: 1" in log
    assert len(resumed.losses) == 3
    check_text_pass(resumed.texts[0][0], epoch=1)  # rotation 1: the paraphrases/negations move on
    # The first resumed step starts from the checkpoint's weights: its logit scale is the saved one.
    assert torch.allclose(resumed.losses[0]["scale"], saved["state_dict"]["logit_scale"].exp())
    final = torch.load(os.path.join(logs, "resumed", "checkpoints", "epoch_2.pt"), map_location="cpu")
    assert final["epoch"] == 2


def test_amp_bf16_with_accum_freq(data_dir, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, SemCLIPLoss)
    argv = trainer_argv(data_dir, str(tmp_path), "bf16", "--model-config", MODEL_CONFIG,
                        "--csv-paraphrase-key", "paraphrase", "--csv-negation-key", "negation",
                        "--paraphrases-per-image", "1", "--negations-per-image", str(MN),
                        "--accum-freq", "3", "--hard-negative-weight", "0.5")
    argv[argv.index("--precision") + 1] = "amp_bf16"
    run_in_process(command.main, argv, data_dir, monkeypatch)
    # accum-freq 3 over 3 batches: one optimizer step, the loss evaluated once per batch over all 3B rows.
    assert len(recorder.losses) == 3
    for call in recorder.losses:
        assert call["text"].dtype == torch.bfloat16 and call["para"].shape == (3 * BATCH, 1, 32)
        assert call["neg"].shape == (3 * BATCH, MN, 32)
        expected = oracle_loss(call, beta=0.5)
        assert abs(float(call["loss"]) - expected) <= 2e-2 * abs(expected)


def test_torchrun_two_gloo_processes(data_dir, tmp_path):
    argv = trainer_argv(data_dir, str(tmp_path), "ddp", "--model-config", MODEL_CONFIG,
                        "--csv-paraphrase-key", "paraphrase", "--csv-negation-key", "negation",
                        "--paraphrases-per-image", str(PN), "--local-loss", "--gather-with-grad")
    argv[argv.index("--batch-size") + 1] = str(BATCH // 2)  # the same global batch of 8
    # torchrun's own parser pre-scans every argument and rejects "--logs" as an ambiguous abbreviation
    # of its --logs-specs: leave --logs out, so the run writes to open_clip's default ./logs (cwd = tmp_path).
    index = argv.index("--logs")
    del argv[index:index + 2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free port itself (a fixed port could clash with other test runs).
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    env["SEMCLIP_PROBE_DIR"] = str(probe_dir)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              os.path.join(ROOT, "tests", "fixtures", "open_clip_probe.py"), *argv]
    proc = subprocess.Popen(launch, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: end the launcher's whole process tree by id.
        family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 240 s:\n" + output[-4000:])
    assert proc.returncode == 0, output[-4000:]
    run_dir = os.path.join(tmp_path, "logs", "ddp")
    with open(os.path.join(run_dir, "out.log"), encoding="utf-8") as f:
        log = f.read()
    assert "Running in distributed mode with multiple processes. Device: cpu" in log and "total 2." in log
    losses = logged_losses(os.path.join(run_dir, "out.log"))
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "epoch_1.pt"))
    # docs/contract.md §5 with --local-loss: the mean of the ranks' losses is docs/contract.md §1 on the global batch,
    # every rank's batch concatenated in rank order.
    ranks = [torch.load(probe_dir / f"rank{r}.pt") for r in range(2)]
    assert all(r["world_size"] == 2 and r["local_loss"] for r in ranks)
    assert ranks[0]["para"].shape == (BATCH // 2, PN, 32) and ranks[0]["neg"].shape == (BATCH // 2, 1, 32)
    merged = {key: torch.cat([r[key] for r in ranks]) for key in ("image", "text", "para", "neg")}
    merged["scale"] = ranks[0]["scale"]
    expected = oracle_loss(merged)
    mean = (float(ranks[0]["loss"]) + float(ranks[1]["loss"])) / 2
    assert abs(mean - expected) <= 1e-5 * abs(expected), (mean, expected)
    assert abs(losses[0] - float(ranks[0]["loss"])) <= 1e-4 * abs(losses[0])  # rank 0 logs its own loss


# ------------------------------------------------------------------------------------------- library pieces


def test_encode_text_groups_matches_separate_float64_passes():
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    tokens = torch.randint(1, 400, (3, 1 + PN + MN, 16))
    groups = encode_text_groups(model, tokens, PN)
    reference = model.double()
    with torch.no_grad():
        for key, index in (("text_features", [0]), ("paraphrase_features", [1, 2]), ("negation_features", [3, 4])):
            expected = torch.stack([reference.encode_text(tokens[:, g], normalize=True) for g in index], 1)
            got = groups[key]
            assert torch.allclose(got.double().reshape(expected.shape), expected, atol=1e-5), key
    assert adjacent_views(groups["text_features"], groups["paraphrase_features"], groups["negation_features"])


def test_bad_rows_name_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = tmp_path / "bad.csv"
    path.write_text("\ufefffilepath\tcaption\tpara\tneg\n"
                    "ok.png\tfine\tp\tn\n"
                    "gone.png\tmissing image\tp\tn\n"
                    "ok.png\tno paraphrase\t\tn\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_csv_triplets(str(path), "filepath", "caption", "para", "neg", "\t")
    message = str(error.value)
    assert f"{path}:3: missing image" in message and f"{path}:4: no paraphrase (para)" in message
    assert ":2:" not in message
    good = tmp_path / "good.csv"
    good.write_text("\ufefffilepath,caption,neg\nok.png,fine,\"n1 || n2\"\n", encoding="utf-8")  # BOM tolerated
    rows = read_csv_triplets(str(good), "filepath", "caption", None, "neg", ",")
    assert rows[0].image_path == str(tmp_path / "ok.png") and rows[0].paraphrases == ()
    assert rows[0].negations == ("n1", "n2") and rows[0].line == 2
    with pytest.raises(ValueError, match="--csv-negation-key"):
        read_csv_triplets(str(path), "filepath", "caption", None, "negation", "\t")


@pytest.mark.parametrize("field, value, flag", [
    ("paraphrases_per_image", -1, "--paraphrases-per-image"),
    ("hard_negative_weight", -0.5, "--hard-negative-weight"),
    ("backend", "cuda", "--semclip-backend"),
    ("distributed_mode", "tree", "--distributed-mode"),
])
def test_options_name_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        SemCLIPOptions(**{field: value})


def test_cpu_friendly_ddp_drops_cpu_device_ids(monkeypatch):
    seen = {}

    def fake_init(self, module, device_ids=None, *args, **kwargs):
        seen["device_ids"] = device_ids

    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "__init__", fake_init)
    CpuFriendlyDDP(torch.nn.Linear(2, 2), device_ids=[torch.device("cpu")])
    assert seen["device_ids"] is None
    CpuFriendlyDDP(torch.nn.Linear(2, 2), device_ids=[torch.device("cuda", 1)])
    assert seen["device_ids"] == [torch.device("cuda", 1)]

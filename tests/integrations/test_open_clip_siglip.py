"""`python -m semclip_train.open_clip --siglip`: open_clip's own trainer with SemSigLipLoss
(docs/siglip.md). Without the extra columns the logged losses equal `open_clip_train.main --siglip`'s
(open_clip's SigLipLoss); with them, every step's loss is the float64 sigmoid oracle of what the loss got."""

from __future__ import annotations

import os

import open_clip
import open_clip_train.main as open_clip_main
import torch
from sigmoid_oracle import semsiglip_loss_float64
from test_open_clip_integration import (  # noqa: F401 - fixtures used by name
    MN,
    MODEL_CONFIG,
    PN,
    Recorder,
    _one_thread,
    _register_model,
    data_dir,
    logged_losses,
    run_in_process,
    trainer_argv,
)

import semclip_train.open_clip.cli as command
from semclip_kernels import SemSigLipLoss


class BiasRecorder(Recorder):
    """Recorder that also keeps the logit_bias each call got."""

    def __init__(self, monkeypatch, loss_cls) -> None:
        self.biases: list[torch.Tensor] = []
        forward = loss_cls.forward
        recorder = self

        def keep_bias(module, image_features, text_features, logit_scale, logit_bias, *args, **kwargs):
            recorder.biases.append(torch.as_tensor(logit_bias).detach().clone())
            return forward(module, image_features, text_features, logit_scale, logit_bias, *args, **kwargs)

        monkeypatch.setattr(loss_cls, "forward", keep_bias)
        super().__init__(monkeypatch, loss_cls)


def test_siglip_without_extras_equals_plain_open_clip_train(data_dir, tmp_path, monkeypatch):  # noqa: F811
    logs = str(tmp_path)
    plain = Recorder(monkeypatch, open_clip.loss.SigLipLoss)
    run_in_process(open_clip_main.main, trainer_argv(data_dir, logs, "plain", "--siglip"), data_dir, monkeypatch)
    ours = Recorder(monkeypatch, SemSigLipLoss)
    argv = trainer_argv(data_dir, logs, "ours", "--siglip", "--model-config", MODEL_CONFIG)
    run_in_process(command.main, argv, data_dir, monkeypatch)
    assert len(plain.losses) == 3 and len(ours.losses) == 3
    for step, (mine, theirs) in enumerate(zip(ours.losses, plain.losses)):
        assert torch.allclose(mine["loss"], theirs["loss"], rtol=1e-5, atol=0), (step, mine["loss"], theirs["loss"])
    assert logged_losses(os.path.join(logs, "ours", "out.log")) == logged_losses(os.path.join(logs, "plain", "out.log"))


def test_siglip_with_extras_trains_the_float64_sigmoid_loss(data_dir, tmp_path, monkeypatch):  # noqa: F811
    recorder = BiasRecorder(monkeypatch, SemSigLipLoss)
    argv = trainer_argv(
        data_dir, str(tmp_path), "extras", "--siglip", "--model-config", MODEL_CONFIG,
        "--csv-paraphrase-key", "paraphrase", "--csv-negation-key", "negation",
        "--paraphrases-per-image", str(PN), "--negations-per-image", str(MN),
    )  # fmt: skip
    run_in_process(command.main, argv, data_dir, monkeypatch)
    assert len(recorder.losses) == 3 and len(recorder.biases) == 3
    for call, bias in zip(recorder.losses, recorder.biases):
        assert call["para"].shape[1] == PN and call["neg"].shape[1] == MN
        expected = semsiglip_loss_float64(call["image"], call["text"], call["scale"], bias, call["para"], call["neg"])
        assert abs(float(call["loss"]) - float(expected)) <= 1e-5 * abs(float(expected))
    assert float(recorder.biases[0]) == -10.0  # open_clip_train's --siglip initialisation reached the loss

"""`semclip_kernels.grad_cache`: the loss once per step, gradients equal to one big batch's.

The expected gradients come from "one big batch": the same tiny towers (dropout and stochastic depth on)
applied to the same micro-batches in one autograd graph, seeded alike, with the float64 oracle of
docs/contract.md §1 as the loss; the float32 runs are compared against a float64 copy of the towers.
The checks marked "sensitivity" show that the comparison fails on a deliberately broken grad cache
(random state not restored, temperature gradient once per micro-batch, no `no_sync`).
"""

from __future__ import annotations

import copy
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import free_port
from oracle import max_norm_rel_err, semclip_loss_float64
from torch import nn

import semclip_kernels.grad_cache as grad_cache_module
from semclip_kernels import SemCLIPLoss
from semclip_kernels.grad_cache import grad_cache_backward, grad_cache_forward

D_IN, DIM, PN, MN = 6, 8, 2, 1
MICRO, N = 4, 3  # 3 micro-batches of 4: a global batch of 12


class TinyTowers(nn.Module):
    """Image and text towers with dropout and per-sample stochastic depth (every draw on the CPU generator;
    the stochastic-depth draws are float32 whatever the dtype, so a float64 copy draws the same masks)."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.image = nn.Sequential(nn.Linear(D_IN, 16), nn.GELU(), nn.Dropout(p), nn.Linear(16, DIM))
        self.image_block = nn.Linear(DIM, DIM)
        self.text = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, DIM))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))

    def stochastic_depth(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x + self.image_block(x)
        keep = (torch.rand(x.shape[0], 1) >= self.p).to(x.dtype) / (1 - self.p)
        return x + keep * self.image_block(x)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [b, D_IN], texts [b, 1 + PN + MN, D_IN] -> normalized features and logit_scale.exp()."""
        image = nn.functional.normalize(self.stochastic_depth(self.image(images)), dim=-1)
        text = nn.functional.normalize(self.text(texts), dim=-1)
        return {
            "image_features": image,
            "text_features": text[:, 0],
            "paraphrase_features": text[:, 1 : 1 + PN],
            "negation_features": text[:, 1 + PN :],
            "logit_scale": self.logit_scale.exp(),
        }


def make_micro_batches(count: int = N, rows: int = MICRO, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, D_IN, generator=g, dtype=dtype),
            torch.randn(rows, 1 + PN + MN, D_IN, generator=g, dtype=dtype),
        )
        for _ in range(count)
    ]


def oracle_loss(features: dict[str, torch.Tensor]) -> torch.Tensor:
    return semclip_loss_float64(
        features["image_features"],
        features["text_features"],
        features["logit_scale"],
        features["paraphrase_features"],
        features["negation_features"],
        0.7,
        1.5,
    )


def big_batch_grads(model: nn.Module, micro_batches, seed: int) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """(loss, gradients, random state after) of one autograd graph over all micro-batches, in float64."""
    model = copy.deepcopy(model).double()
    model.zero_grad()
    torch.manual_seed(seed)
    outs = [model(images.double(), texts.double()) for images, texts in micro_batches]
    features = {key: torch.cat([out[key] for out in outs]) for key in outs[0] if key != "logit_scale"}
    features["logit_scale"] = outs[0]["logit_scale"]
    loss = oracle_loss(features)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, torch.get_rng_state()


def cached_grads(model: nn.Module, micro_batches, seed: int, loss_fn=oracle_loss):
    model.zero_grad()
    calls = {"encode": 0, "loss": 0}

    def encode(micro_batch):
        calls["encode"] += 1
        return model(*micro_batch)

    def counted_loss(features):
        calls["loss"] += 1
        return loss_fn(features)

    torch.manual_seed(seed)
    loss = grad_cache_backward(micro_batches, encode, counted_loss)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return float(loss), grads, torch.get_rng_state(), calls


def worst_error(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(max_norm_rel_err(grads[name], expected[name]) for name in expected)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gradients_equal_one_big_batch_with_dropout(dtype, tolerance):
    torch.manual_seed(0)
    model = TinyTowers().to(dtype)
    micro_batches = make_micro_batches(dtype=dtype)
    loss, grads, rng_after, calls = cached_grads(model, micro_batches, seed=7)
    expected_loss, expected, expected_rng = big_batch_grads(model, micro_batches, seed=7)
    assert calls == {"encode": 2 * N, "loss": 1}
    assert abs(loss - expected_loss) <= tolerance * abs(expected_loss)
    for name in expected:
        assert max_norm_rel_err(grads[name], expected[name]) <= tolerance, name
    assert float(expected["logit_scale"].abs()) > 1e-3  # the temperature's gradient is really compared
    # The step consumes randomness like one forward over the micro-batches (the second passes replay it).
    assert torch.equal(rng_after, expected_rng)


def test_float32_with_semclip_loss_and_direct_logit_scale():
    """The float32 towers, SemCLIPLoss (backend "auto") and a loss_fn reading model.logit_scale directly."""
    torch.manual_seed(1)
    model = TinyTowers()
    micro_batches = make_micro_batches(dtype=torch.float32, seed=1)
    semclip = SemCLIPLoss(paraphrase_weight=0.7, hard_negative_weight=1.5)

    def loss_fn(features):
        return semclip(
            features["image_features"],
            features["text_features"],
            model.logit_scale.exp(),
            paraphrase_features=features["paraphrase_features"],
            negation_features=features["negation_features"],
        )

    def encode(micro_batch):
        out = model(*micro_batch)
        del out["logit_scale"]
        return out

    model.zero_grad()
    torch.manual_seed(3)
    loss = grad_cache_backward(micro_batches, encode, loss_fn)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    expected_loss, expected, _ = big_batch_grads(model, micro_batches, seed=3)
    assert abs(float(loss) - expected_loss) <= 1e-5 * abs(expected_loss)
    assert worst_error(grads, expected) <= 1e-4


def test_sensitivity_without_random_state_restore(monkeypatch):
    """A grad cache whose second passes draw fresh dropout masks gives other gradients: the test above sees it."""
    torch.manual_seed(0)
    model = TinyTowers().double()
    micro_batches = make_micro_batches()
    monkeypatch.setattr(grad_cache_module.RandomState, "restore", lambda self: None)
    _, grads, _, _ = cached_grads(model, micro_batches, seed=7)
    _, expected, _ = big_batch_grads(model, micro_batches, seed=7)
    assert worst_error(grads, expected) > 1e-2


def test_sensitivity_temperature_gradient_once_per_micro_batch(monkeypatch):
    """open_clip's accumulation gives logit_scale its gradient once per micro-batch; once per step is right."""
    torch.manual_seed(0)
    model = TinyTowers().double()
    micro_batches = make_micro_batches()
    _, grads, _, _ = cached_grads(model, micro_batches, seed=7)
    _, expected, _ = big_batch_grads(model, micro_batches, seed=7)
    assert max_norm_rel_err(grads["logit_scale"], expected["logit_scale"]) <= 1e-10
    assert max_norm_rel_err(N * grads["logit_scale"], expected["logit_scale"]) > 1  # what N times would give


def test_scale_loss_scales_every_gradient_alike():
    """scale_loss (GradScaler.scale) multiplies the loss before its backward: every gradient comes out scaled."""
    torch.manual_seed(0)
    model = TinyTowers().double()
    micro_batches = make_micro_batches()
    _, expected, _ = big_batch_grads(model, micro_batches, seed=7)
    model.zero_grad()
    torch.manual_seed(7)
    loss = grad_cache_backward(micro_batches, lambda mb: model(*mb), oracle_loss, scale_loss=lambda x: x * 1024.0)
    assert loss.dtype == torch.float64 and not loss.requires_grad
    for name, p in model.named_parameters():
        assert max_norm_rel_err(p.grad / 1024.0, expected[name]) <= 1e-10, name


def test_frozen_tower_and_unused_output():
    """A frozen text tower gets no gradient work; an output the loss ignores is skipped."""
    torch.manual_seed(0)
    model = TinyTowers().double()
    model.text.requires_grad_(False)
    micro_batches = make_micro_batches()

    def encode(micro_batch):
        out = model(*micro_batch)
        out["unused"] = out["image_features"] * 2
        return out

    model.zero_grad()
    torch.manual_seed(5)
    grad_cache_backward(micro_batches, encode, oracle_loss)
    _, expected, _ = big_batch_grads(model, micro_batches, seed=5)
    assert all(p.grad is None for p in model.text.parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert max_norm_rel_err(p.grad, expected[name]) <= 1e-10, name


def test_tensor_and_tuple_outputs():
    torch.manual_seed(0)
    weight = torch.randn(D_IN, DIM, dtype=torch.float64, requires_grad=True)
    batches = [torch.randn(MICRO, D_IN, dtype=torch.float64) for _ in range(N)]

    def loss_of(image, text):
        return semclip_loss_float64(image, text, 10.0)

    grad_cache_backward(batches, lambda x: (x @ weight, (x + 1) @ weight), lambda f: loss_of(*f))
    cached = weight.grad.clone()
    weight.grad = None
    loss_of(torch.cat(batches) @ weight, (torch.cat(batches) + 1) @ weight).backward()
    assert max_norm_rel_err(cached, weight.grad) <= 1e-10
    weight.grad = None
    grad_cache_backward(batches, lambda x: x @ weight, lambda f: loss_of(f, f.flip(0)))
    cached = weight.grad.clone()
    weight.grad = None
    x = torch.cat(batches) @ weight
    loss_of(x, x.flip(0)).backward()
    assert max_norm_rel_err(cached, weight.grad) <= 1e-10


@pytest.mark.parametrize("sizes", [(4, 4, 1), (3, 5, 2, 4), (2, 7)], ids=["last-smaller", "grows", "grows-twice"])
def test_ragged_micro_batches_and_a_scaled_replay(sizes):
    """Micro-batches of different sizes (a later one larger than the first: the features' buffer grows) and a
    replay scaled by the gradient arriving at the loss (as from a trainer's hook): 2.5 × one big batch's
    gradients, the loss equal."""
    torch.manual_seed(0)
    model = TinyTowers().double()
    g = torch.Generator().manual_seed(3)
    micro_batches = [
        (torch.randn(rows, D_IN, generator=g, dtype=torch.float64),
         torch.randn(rows, 1 + PN + MN, D_IN, generator=g, dtype=torch.float64))
        for rows in sizes
    ]  # fmt: skip
    expected_loss, expected, _ = big_batch_grads(model, micro_batches, seed=11)
    model.zero_grad()
    torch.manual_seed(11)
    step = grad_cache_forward(micro_batches, lambda mb: model(*mb), oracle_loss)
    step.replay(torch.tensor(2.5, dtype=torch.float64))
    assert abs(float(step.loss) - expected_loss) <= 1e-12 * abs(expected_loss)
    for name, p in model.named_parameters():
        assert max_norm_rel_err(p.grad / 2.5, expected[name]) <= 1e-10, name


# ------------------------------------------------------------------------------------------------- bad input


def test_micro_batch_of_another_size_names_it():
    model = TinyTowers().double()
    micro_batches = make_micro_batches()
    micro_batches[2] = make_micro_batches(1, rows=MICRO - 1)[0]
    with pytest.raises(ValueError, match=r"micro_batches\[2\] has 3 rows, micro_batches\[0\] has 4"):
        grad_cache_backward(micro_batches, lambda mb: model(*mb), oracle_loss)


@pytest.mark.parametrize(
    "micro_batches, error, message",
    [
        ([], ValueError, "micro_batches must hold at least one"),
        (iter([1]), TypeError, "micro_batches must be a sequence"),
    ],
)
def test_bad_micro_batches(micro_batches, error, message):
    with pytest.raises(error, match=message):
        grad_cache_backward(micro_batches, lambda mb: mb, lambda f: f.sum())


def test_bad_encode_and_loss_outputs():
    batches = [torch.randn(3, 2), torch.randn(3, 2)]
    with pytest.raises(ValueError, match=r"micro_batches\[0\]: encode's per-sample outputs must share"):
        grad_cache_backward(batches, lambda x: {"a": x, "b": x[:2]}, lambda f: f["a"].sum())
    with pytest.raises(TypeError, match=r"micro_batches\[0\]: encode must return a tensor"):
        grad_cache_backward(batches, lambda x: x.numpy(), lambda f: f)
    with pytest.raises(ValueError, match="only 0-dim tensors"):
        grad_cache_backward(batches, lambda x: x.sum(), lambda f: f)
    with pytest.raises(ValueError, match=r"micro_batches\[1\]: encode's output 0 has shape \(3, 3\)"):
        grad_cache_backward([torch.randn(3, 2), torch.randn(3, 3)], lambda x: (x,), lambda f: f[0].sum())
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(6, 2\)"):
        grad_cache_backward(batches, lambda x: x, lambda f: f)


# ------------------------------------------------------------------------------------- DDP, 2 Gloo ranks

WORLD, STEPS, LR = 2, 2, 0.5


def step_seed(step: int, rank: int) -> int:
    return 1000 * step + rank



def _ddp_worker(rank: int, port: int, state: dict, micro_batches: list, out_dir: str, skip_no_sync: bool) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=120),
        )
        model = TinyTowers().double()
        model.load_state_dict(state)
        # Without no_sync the earlier micro-batches' backwards skip logit_scale (it flows back once, in the last):
        # only find_unused_parameters lets that broken variant run far enough to count its all-reduces.
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=skip_no_sync)
        hook_calls = [0]

        def counting_allreduce(_, bucket):
            hook_calls[0] += 1
            tensor = bucket.buffer().div_(WORLD)
            return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        loss_module = SemCLIPLoss(
            local_loss=True,
            gather_with_grad=True,
            rank=rank,
            world_size=WORLD,
            paraphrase_weight=0.7,
            hard_negative_weight=1.5,
            backend="torch",
        )

        def loss_fn(features):
            return loss_module(
                features["image_features"],
                features["text_features"],
                features["logit_scale"],
                paraphrase_features=features["paraphrase_features"],
                negation_features=features["negation_features"],
            )

        mine = micro_batches[rank]
        result = {"grads": [], "hooks": [], "losses": []}
        for step in range(STEPS):
            ddp.zero_grad()
            hook_calls[0] = 0
            torch.manual_seed(step_seed(step, rank))
            loss = grad_cache_backward(mine[step], lambda mb: ddp(*mb), loss_fn, model=None if skip_no_sync else ddp)
            result["losses"].append(float(loss))
            result["hooks"].append(hook_calls[0])
            result["grads"].append({name: p.grad.clone() for name, p in model.named_parameters()})
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
        # One plain (big local batch) forward-backward: how many all-reduce calls one synchronised backward makes.
        hook_calls[0] = 0
        ddp.zero_grad()
        images = torch.cat([mb[0] for mb in mine[0]])
        texts = torch.cat([mb[1] for mb in mine[0]])
        loss_fn(ddp(images, texts)).backward()
        result["plain_hooks"] = hook_calls[0]
        # loss_fn reading a DDP parameter directly: its gradient would not be all-reduced -> a clear error.
        ddp.zero_grad()
        try:
            grad_cache_backward(
                mine[0],
                lambda mb: ddp(*mb),
                lambda f: loss_fn({**f, "logit_scale": model.logit_scale.exp()}),
                model=ddp,
            )
            result["direct_error"] = None
        except ValueError as error:
            result["direct_error"] = str(error)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported by the parent's assertion
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ddp(tmp_path, state, micro_batches, skip_no_sync=False) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, port, state, micro_batches, str(tmp_path), skip_no_sync))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
            pytest.fail("DDP worker did not finish in 240 s")
    results = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(WORLD)]
    for result in results:
        assert "error" not in result, result.get("error")
    return results


def ddp_expected(state, micro_batches) -> list[dict[str, torch.Tensor]]:
    """Single process, one big batch: every rank's micro-batches in rank order, each rank's dropout draws."""
    model = TinyTowers().double()
    model.load_state_dict(state)
    expected = []
    for step in range(STEPS):
        model.zero_grad()
        outs = []
        for rank in range(WORLD):
            torch.manual_seed(step_seed(step, rank))
            outs += [model(*mb) for mb in micro_batches[rank][step]]
        features = {key: torch.cat([out[key] for out in outs]) for key in outs[0] if key != "logit_scale"}
        features["logit_scale"] = outs[0]["logit_scale"]
        oracle_loss(features).backward()
        expected.append({name: p.grad.clone() for name, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return expected


@pytest.fixture(scope="module")
def ddp_setup():
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in TinyTowers().double().state_dict().items()}
    micro_batches = [[make_micro_batches(seed=10 * rank + step) for step in range(STEPS)] for rank in range(WORLD)]
    return state, micro_batches, ddp_expected(state, micro_batches)


def test_ddp_two_gloo_ranks_equal_single_process_big_batch(ddp_setup, tmp_path):
    state, micro_batches, expected = ddp_setup
    results = run_ddp(tmp_path, state, micro_batches)
    for rank, result in enumerate(results):
        for step in range(STEPS):
            assert worst_error(result["grads"][step], expected[step]) <= 1e-10, (rank, step)
        # DDP's all-reduce once per step: as many comm-hook calls as one plain synchronised backward.
        assert result["hooks"] == [result["plain_hooks"]] * STEPS and result["plain_hooks"] >= 1
        assert "logit_scale" in result["direct_error"] and "all-reduced" in result["direct_error"]


def test_sensitivity_ddp_without_no_sync(ddp_setup, tmp_path):
    """Without no_sync every micro-batch's backward all-reduces: the hook count above sees it."""
    state, micro_batches, _ = ddp_setup
    results = run_ddp(tmp_path, state, micro_batches, skip_no_sync=True)
    assert results[0]["hooks"] == [N * results[0]["plain_hooks"]] * STEPS

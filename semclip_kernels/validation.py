"""The user's arguments turned into validated values, once, at the top of the loss (docs/contract.md §2).

`check_inputs` validates the tensors of one call; `LossConfig` the settings of a loss
(weights, backend, tiling), checked when it is made; `check_rank_and_world_size` where a
process sits in a job. Both losses (functions and modules) go through these, so the same
bad argument gets the same error in either. Everything below the API layer
receives these and checks nothing again. Every error names the argument and the
shape or value it expected, so a user who wires the loss into a training loop sees
what is wrong without reading our code.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .backends import check_backend_name
from .backends.dtypes import stat_dtype
from .backends.options import PartitionOptions

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The directions of the softmax loss (docs/contract.md §1): both halves, or image → text alone.
DIRECTIONS = ("both", "image_to_text")


@dataclass(frozen=True)
class SemCLIPInputs:
    """Validated inputs, with the extras brought to a `[B, n, d]` layout."""

    image: torch.Tensor  # [B, d]
    text: torch.Tensor  # [B, d]
    paraphrase: torch.Tensor | None  # [B, Pn, d]
    negation: torch.Tensor | None  # [B, Mn, d]
    logit_scale: torch.Tensor  # 0-dim, float32 (float64 for float64 features)

    @property
    def batch(self) -> int:
        return self.image.shape[0]

    @property
    def n_paraphrases(self) -> int:
        return 0 if self.paraphrase is None else self.paraphrase.shape[1]

    @property
    def n_negations(self) -> int:
        return 0 if self.negation is None else self.negation.shape[1]


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 for checks), got {value.dtype}")
    return value


def _check_extra(name: str, value: object, ref: torch.Tensor) -> torch.Tensor | None:
    """Paraphrases/negations: `[B, d]` (one per image) or `[B, n, d]`; returns `[B, n, d]`."""
    if value is None:
        return None
    value = _check_tensor(name, value)
    batch, dim = ref.shape
    if value.dim() == 2:
        value = value.unsqueeze(1)
    elif value.dim() != 3:
        raise ValueError(
            f"{name} must have shape [B, d] or [B, n, d] = [{batch}, n, {dim}], "
            f"got a {value.dim()}-d tensor of shape {list(value.shape)}"
        )
    if value.shape[0] != batch or value.shape[2] != dim:
        raise ValueError(
            f"{name} must have shape [B, d] or [B, n, d] with B={batch}, d={dim} "
            f"(as image_features), got {list(value.shape)}"
        )
    return value


def _check_scale(logit_scale: object, ref: torch.Tensor, name: str = "logit_scale") -> torch.Tensor:
    """A real scalar (`logit_scale`, `logit_bias`) as a 0-dim statistics-dtype tensor on the features' device."""
    statistics_dtype = stat_dtype(ref.dtype)
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {list(logit_scale.shape)}")
        if not logit_scale.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {logit_scale.dtype}")
        if logit_scale.device != ref.device:
            raise ValueError(f"{name} is on {logit_scale.device} but the features are on {ref.device}")
        _check_finite_scale(logit_scale, statistics_dtype, name)
        return logit_scale.reshape(()).to(statistics_dtype)
    # Any real number: Python int/float, NumPy scalars (np.float32(10.0)), ... but not bool.
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        raise TypeError(
            f"{name} must be a Python float or a 0-dim tensor (any real number: int, float, NumPy scalar), "
            f"got {type(logit_scale).__name__}"
        )
    if not math.isfinite(float(logit_scale)):
        raise ValueError(f"{name} must be finite, got {logit_scale}")
    if abs(float(logit_scale)) > torch.finfo(statistics_dtype).max:
        raise ValueError(_overflow_message(float(logit_scale), statistics_dtype, name))
    return torch.tensor(float(logit_scale), dtype=statistics_dtype, device=ref.device)


def _overflow_message(value: float, statistics_dtype: torch.dtype, name: str = "logit_scale") -> str:
    return (
        f"{name} must be finite in {statistics_dtype} (the dtype of the loss's statistics for these "
        f"features; at most {torch.finfo(statistics_dtype).max:.3g} in magnitude), got {value:g}"
    )


def _check_finite_scale(logit_scale: torch.Tensor, statistics_dtype: torch.dtype, name: str = "logit_scale") -> None:
    """A non-finite tensor `logit_scale` (or `logit_bias`), or one that overflows the statistics' dtype
    (1e300 in float64 is inf in float32), is an error in eager mode.

    Reading the value synchronises with the device, which a compiled graph must not do: under
    `torch.compile` the check is skipped and a non-finite τ gives a NaN loss instead (every logit
    is then ±inf or NaN, and so is every log-sum-exp difference). Meta tensors carry no value.
    """
    if torch.compiler.is_compiling() or logit_scale.device.type == "meta":
        return
    value = logit_scale.detach()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got {value.item()}")
    if not bool(torch.isfinite(value.to(statistics_dtype)).all()):
        raise ValueError(_overflow_message(value.item(), statistics_dtype, name))


def check_weight(name: str, value: object) -> float:
    """A loss weight (`paraphrase_weight`, `hard_negative_weight`): a finite real number ≥ 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {list(value.shape)}")
        if value.requires_grad:
            # The loss reads its weights as numbers: a gradient meant for this tensor would be lost silently.
            raise TypeError(
                f"{name} is a tensor that requires grad, but the loss does not differentiate its weights; "
                f"pass a float (or {name}.detach())"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float is symbolic.
    if not 0 <= value < math.inf:  # NaN fails both comparisons
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class LossConfig:
    """The settings of one SemCLIP loss, validated when made; passed down unchanged.

    paraphrase_weight: `w ≥ 0`; 0 removes the paraphrases (docs/contract.md §1).
    hard_negative_weight: `β ≥ 0`; scales the negations' mass in `Z_i`; 0 removes them.
    backend: `"auto"`, `"triton"`, `"cpp"`, `"torch"` or `"reference"`.
    options: the tiling options of the backends.
    directions: `"both"` (`L = (L_i2t + L_t2i) / 2`) or `"image_to_text"` (`L = L_i2t`).
    """

    paraphrase_weight: float = 1.0
    hard_negative_weight: float = 1.0
    backend: str = "auto"
    options: PartitionOptions = field(default_factory=PartitionOptions)
    directions: str = "both"

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__, once.
        object.__setattr__(self, "paraphrase_weight", check_weight("paraphrase_weight", self.paraphrase_weight))
        object.__setattr__(
            self, "hard_negative_weight", check_weight("hard_negative_weight", self.hard_negative_weight)
        )
        check_backend_name(self.backend)
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {self.directions!r}")

    @staticmethod
    def of(caller: str, options: dict[str, object], directions: object = "both") -> LossConfig:
        """From the keyword arguments every loss takes (`LOSS_OPTIONS`; the one place they are read).

        `options` is the `**options` of `caller` (a function or module decorated with
        `takes_loss_options`): a name outside `LOSS_OPTIONS` is the TypeError Python raises for it.
        """
        for name in options:
            if name not in _LOSS_OPTION_NAMES:
                raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        values = {parameter.name: options.get(parameter.name, parameter.default) for parameter in LOSS_OPTIONS}
        tiling = PartitionOptions(values["block_rows"], values["block_cols"], values["grad_filter_eps"])
        return LossConfig(values["paraphrase_weight"], values["hard_negative_weight"], values["backend"], tiling,
                          directions)  # fmt: skip


# The keyword-only arguments of every loss, functions and modules, both families: (name, default, annotation).
LOSS_OPTIONS: tuple[inspect.Parameter, ...] = tuple(
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, default, annotation in (
        ("paraphrase_weight", 1.0, "float"),
        ("hard_negative_weight", 1.0, "float"),
        ("backend", "auto", "str"),
        ("block_rows", None, "int | None"),
        ("block_cols", None, "int | None"),
        ("grad_filter_eps", None, "float | None"),
    )
)
_LOSS_OPTION_NAMES = frozenset(parameter.name for parameter in LOSS_OPTIONS)

_Function = TypeVar("_Function", bound=Callable[..., object])


def takes_loss_options(function: _Function) -> _Function:
    """Show `LOSS_OPTIONS` in the signature of `function(..., *, own keywords, **options)`.

    `inspect.signature` and `help` then list them as named keyword-only parameters, first after
    the `*` (the loss's own keyword-only parameters follow), in place of `**options`. The function
    itself is unchanged: it hands `options` to `LossConfig.of`, which rejects any other name.
    """
    signature = inspect.signature(function)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    first_keyword = next((i for i, p in enumerate(own) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(own))
    function.__signature__ = signature.replace(parameters=[*own[:first_keyword], *LOSS_OPTIONS, *own[first_keyword:]])
    return function


def check_rank_and_world_size(rank: object, world_size: object) -> None:
    """`world_size` an int >= 1 and `rank` an int in `[0, world_size)` (a bool or a float is a TypeError)."""
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got rank={rank}")


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device` (a no-op where autocast does not exist, e.g. meta tensors): inside
    `torch.autocast` a loss computes exactly what it computes outside (its statistics are float32 by contract)."""
    # Dynamo before torch 2.13 refuses to trace is_autocast_available; compiled code runs on real devices.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def check_inputs(
    image_features: object,
    text_features: object,
    logit_scale: object,
    paraphrase_features: object = None,
    negation_features: object = None,
) -> SemCLIPInputs:
    """Validate the loss's tensors (docs/contract.md §2) and normalize their layout.

    Inside `torch.autocast` features of mixed dtypes are cast to the autocast dtype, as autocast
    casts a matmul's operands (open_clip's ClipLoss accepts them); outside it they are an error.
    """
    image = _check_tensor("image_features", image_features)
    text = _check_tensor("text_features", text_features)
    if image.dim() != 2:
        raise ValueError(f"image_features must have shape [B, d], got {image.dim()}-d shape {list(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("image_features must have shape [B, d] with B >= 1, got B = 0")
    if image.shape[1] == 0:
        raise ValueError("image_features must have shape [B, d] with d >= 1, got d = 0")
    if text.dim() != 2 or text.shape != image.shape:
        raise ValueError(
            f"text_features must have shape [B, d] = {list(image.shape)} (as image_features), got {list(text.shape)}"
        )
    paraphrase = _check_extra("paraphrase_features", paraphrase_features, image)
    negation = _check_extra("negation_features", negation_features, image)

    named = [("text_features", text), ("paraphrase_features", paraphrase), ("negation_features", negation)]
    autocast_dtype = _autocast_dtype(image.device)
    if autocast_dtype is not None and any(t is not None and t.dtype != image.dtype for _, t in named):
        image, text, paraphrase, negation = (
            None if t is None else t.to(autocast_dtype) for t in (image, text, paraphrase, negation)
        )
        named = [("text_features", text), ("paraphrase_features", paraphrase), ("negation_features", negation)]
    for name, tensor in named:
        if tensor is None:
            continue
        if tensor.dtype != image.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but image_features has {image.dtype}: "
                "all features must share one dtype (inside torch.autocast they are cast to its dtype)"
            )
        if tensor.device != image.device:
            raise ValueError(
                f"{name} is on {tensor.device} but image_features is on {image.device}: "
                "all features must be on one device"
            )
    scale = _check_scale(logit_scale, image)
    # `[B, 0, d]` (no extras, e.g. a text-tower output split with Pn = 0) is checked like any extra above,
    # then means "absent".
    paraphrase, negation = (None if t is None or t.shape[1] == 0 else t for t in (paraphrase, negation))
    return SemCLIPInputs(image, text, paraphrase, negation, scale)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would cast a matmul's operands to on `device`, or None outside autocast."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def check_logit_bias(logit_bias: object, ref: torch.Tensor) -> torch.Tensor:
    """The sigmoid loss's `logit_bias` (docs/contract.md §8), checked as `logit_scale` is: a real number or a
    one-element floating-point tensor on the features' device, finite (eager mode)."""
    return _check_scale(logit_bias, ref, "logit_bias")

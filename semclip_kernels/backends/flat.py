"""How the layer's values travel through custom operators: as flat lists of tensors, ints and floats.

A value is a frozen dataclass marked `@flat_value`. Its fields may be tensors, ints, floats, bools, None,
other values, or tuples of these. `flatten` writes the fields in order, each preceded in `ints` by a tag
that says what follows, so `unflatten` rebuilds the value from the lists alone: a field added to a value
travels with no other edit.

An operator's outputs are tensors only, so they carry no tags: `leaves` lists a value's tensors (None as
an empty placeholder, in the shape of a template) and `rebuild` puts tensors back into the structure of
a template (a kernel's `stats_like`, `Grads.like`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

_TENSOR, _NONE, _INT, _FLOAT, _BOOL, _TUPLE, _VALUE = range(7)
T = TypeVar("T")


def source_fingerprint(package: pathlib.Path) -> int:
    """A CRC of the package's Python sources (paths and contents, in a fixed order).

    Every value's key includes it, and the keys are constants of the forward op's call in a compiled graph.
    torch's compile caches (AOTAutograd, Inductor) key a graph on those constants but treat our custom ops as
    opaque: the Python autograd formula an op registers, and the value layouts it bakes into the backward graph,
    are not part of the key. Without the fingerprint, a graph cached under one version of this package would be
    replayed by another (measured: a backward graph cached before `Stats` gained a field failed to unflatten).
    """
    digest = 0
    for path in sorted(package.rglob("*.py")):
        digest = zlib.crc32(path.relative_to(package).as_posix().encode(), digest)
        digest = zlib.crc32(path.read_bytes(), digest)
    return digest


_SOURCE_FINGERPRINT = source_fingerprint(pathlib.Path(__file__).resolve().parents[1])
# Values by a stable key (the qualified name and the sources' fingerprint: the same in every process running the
# same sources, as compiled graphs need).
_VALUES: dict[int, type] = {}


def flat_value(cls: type[T]) -> type[T]:
    """Mark a frozen dataclass as a value that may travel through the layer's operators."""
    key = zlib.crc32(f"{cls.__module__}.{cls.__qualname__}".encode(), _SOURCE_FINGERPRINT)
    assert _VALUES.setdefault(key, cls) is cls, f"two values hash alike: {cls} and {_VALUES[key]}"
    cls._flat_key = key
    return cls


def flatten(value: Any) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """`(tensors, ints, floats)`: `value` with a tag per field (see the module docstring)."""
    tensors: list[torch.Tensor] = []
    ints: list[int] = []
    floats: list[float] = []
    _write(value, tensors, ints, floats)
    return tensors, ints, floats


def _write(x: Any, tensors: list, ints: list, floats: list) -> None:
    if isinstance(x, torch.Tensor):
        ints.append(_TENSOR)
        tensors.append(x)
    elif x is None:
        ints.append(_NONE)
    elif isinstance(x, bool):
        ints += [_BOOL, int(x)]
    elif isinstance(x, (int, torch.SymInt)):
        ints += [_INT, x]
    elif isinstance(x, (float, torch.SymFloat)):
        ints.append(_FLOAT)
        floats.append(x)
    elif isinstance(x, tuple):
        ints += [_TUPLE, len(x)]
        for item in x:
            _write(item, tensors, ints, floats)
    elif hasattr(type(x), "_flat_key"):
        ints += [_VALUE, type(x)._flat_key]
        for field in dataclasses.fields(x):
            _write(getattr(x, field.name), tensors, ints, floats)
    else:
        raise TypeError(f"a value field must be a tensor, number, None, tuple or @flat_value, got {type(x).__name__}")


class _Reader:
    def __init__(self, tensors: list, ints: list, floats: list) -> None:
        self.tensors, self.ints, self.floats = iter(tensors), iter(ints), iter(floats)

    def read(self) -> Any:
        tag = next(self.ints)
        if tag == _TENSOR:
            return next(self.tensors)
        if tag == _NONE:
            return None
        if tag == _BOOL:
            return bool(next(self.ints))
        if tag == _INT:
            return next(self.ints)
        if tag == _FLOAT:
            return next(self.floats)
        if tag == _TUPLE:
            return tuple(self.read() for _ in range(next(self.ints)))
        cls = _VALUES[next(self.ints)]
        return cls(*(self.read() for _ in dataclasses.fields(cls)))


def unflatten(tensors: list[torch.Tensor], ints: list[int], floats: list[float] = ()) -> Any:
    """The value that `flatten` wrote."""
    return _Reader(list(tensors), list(ints), list(floats)).read()


def unflatten_many(tensor_lists: list[list[torch.Tensor]], ints: list[int]) -> list[Any]:
    """Several values written one after another into one `ints` (each with its own tensors, no floats)."""
    int_stream = iter(ints)
    values = []
    for tensors in tensor_lists:
        reader = _Reader(list(tensors), [], [])
        reader.ints = int_stream
        values.append(reader.read())
    return values


def _items(x: Any) -> Iterator[Any]:
    if isinstance(x, tuple):
        yield from x
    elif hasattr(type(x), "_flat_key"):
        yield from (getattr(x, field.name) for field in dataclasses.fields(x))


def leaves(template: Any, value: Any = None, like: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The tensors of `value` in the structure of `template` (default: the value itself); where the template
    has None, an empty placeholder on `like`'s device. Tensors take the template's shape (same elements)."""
    value = template if value is None else value
    out: list[torch.Tensor] = []

    def walk(t: Any, v: Any) -> None:
        if isinstance(t, torch.Tensor):
            out.append(v if v.shape == t.shape else v.reshape(t.shape))
        elif t is None:
            out.append((like if like is not None else torch.empty(0)).new_empty((0,)))
        else:
            for t_item, v_item in zip(_items(t), _items(v)):
                walk(t_item, v_item)

    walk(template, value)
    return out


def rebuild(template: Any, tensors: list[torch.Tensor | None]) -> Any:
    """`template` with its tensors (and its None placeholders) replaced by `tensors`, in order."""
    stream = iter(tensors)

    def walk(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return next(stream)
        if t is None:
            next(stream)  # the placeholder
            return None
        if isinstance(t, tuple):
            return tuple(walk(item) for item in t)
        if hasattr(type(t), "_flat_key"):
            return type(t)(*(walk(getattr(t, field.name)) for field in dataclasses.fields(t)))
        return t

    return walk(template)


def tensor_fields(value: Any) -> list[tuple[str, int]]:
    """For each tensor `flatten(value)` lists: the top-level field it belongs to and its index in that field."""
    fields = []
    for field in dataclasses.fields(value):
        n = len(flatten(getattr(value, field.name))[0])
        fields += [(field.name, index) for index in range(n)]
    return fields

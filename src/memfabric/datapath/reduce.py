"""Gather arithmetic: checking a gather's shape, and element-wise reductions over layouts.

Pure computation over buffers (numpy); where the bytes are and who asks is the server's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgument
from ..limits import MAX_GATHER_INPUTS
from .layout import Layout, read_into

OPERATORS = {"concat": None, "sum": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}

Input = tuple[Layout, int, int]    # (object's layout, offset, length)


def check_request(m: dict[str, Any], reduction_only: bool = False) -> tuple[str, np.dtype, list[dict[str, Any]]]:
    """The operator, dtype and raw inputs of a gather (or of a reduce_part) request."""
    op = m.get("operator")
    allowed = [o for o in OPERATORS if not (reduction_only and o == "concat")]
    if op not in allowed:
        raise InvalidArgument(f"operator must be one of {', '.join(allowed)}, got {op!r}")
    try:
        dtype = np.dtype(m.get("dtype", "uint8"))
    except TypeError:
        raise InvalidArgument(f"unknown dtype {m.get('dtype')!r}") from None
    if dtype.kind not in "iuf":
        raise InvalidArgument(f"dtype must be an integer or float type, got {dtype}")
    inputs = m.get("inputs")
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_GATHER_INPUTS \
            or not all(isinstance(item, dict) for item in inputs):
        raise InvalidArgument(f"a gather takes 1-{MAX_GATHER_INPUTS} inputs, each "
                              "{pool, ns, sec, bm_id, offset, length}")
    return op, dtype, inputs


def result_length(op: str, dtype: np.dtype, inputs: list[Input]) -> int:
    """CONCAT: the sum of the lengths; a reduction: the one length all inputs share."""
    if op == "concat":
        return sum(length for _, _, length in inputs)
    lengths = {length for _, _, length in inputs}
    if len(lengths) != 1 or next(iter(lengths)) % dtype.itemsize:
        raise InvalidArgument(f"a {op} needs inputs of one length, a multiple of {dtype.itemsize} "
                              f"({dtype}); got lengths {sorted(lengths)}")
    return next(iter(lengths))


def values(item: Input, dtype: np.dtype) -> np.ndarray:
    """An input's bytes as an array: in place when one local piece holds them, else gathered."""
    layout, offset, length = item
    spans = list(layout.spans(offset, length))
    if len(spans) == 1 and type(spans[0][0]) is memoryview:
        view, a, b, _ = spans[0]
        return np.frombuffer(view[a:b], dtype=dtype)
    buf = np.empty(length, dtype=np.uint8)
    read_into(layout, offset, memoryview(buf))
    return buf.view(dtype)


def reduce_into(op: str, acc: np.ndarray | None, more: np.ndarray) -> np.ndarray:
    """acc (op)= more, element-wise; the first array starts the accumulator (a copy)."""
    if acc is None:
        return more.copy()
    return OPERATORS[op](acc, more, out=acc)

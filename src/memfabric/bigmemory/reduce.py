"""Gather arithmetic: checking a gather's shape, and element-wise reductions over layouts.

Pure computation over buffers (numpy); where the bytes are and who asks is the server's.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from ..limits import MAX_GATHER_INPUTS
from .layout import Layout, read_into

OPERATORS = {"concat": None, "sum": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}

Input = tuple[Layout, int, int]    # (object's layout, offset, length)

# A reduction's element type is named by a string, as numpy spells plain types: "float32",
# "<i8", "u2", "double". Only such spellings reach numpy's parser, which takes far more
# (structured records, sub-arrays, comma lists, dicts of fields) and fails on much of it
# with exceptions of its own choosing.
_DTYPE_NAME = re.compile(r"[<>=|]?[A-Za-z_]{1,12}[0-9]{0,2}")
MAX_DTYPE_BYTES = 8     # longer floats (float128) are the platform's own: not the same on every server


def check_request(m: dict[str, Any], reduction_only: bool = False) -> tuple[str, np.dtype, list[dict[str, Any]]]:
    """The operator, dtype and raw inputs of a gather (or of a reduce_part) request."""
    op = m.get("operator")
    allowed = [o for o in OPERATORS if not (reduction_only and o == "concat")]
    if op not in allowed:
        raise InvalidArgument(f"operator must be one of {', '.join(allowed)}, got {op!r}")
    dtype = check_dtype(m.get("dtype", "uint8"))
    inputs = m.get("inputs")
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_GATHER_INPUTS \
            or not all(isinstance(item, dict) for item in inputs):
        raise InvalidArgument(f"a gather takes 1-{MAX_GATHER_INPUTS} inputs, each "
                              "{pool, ns, sec, bm_id, offset, length}")
    return op, dtype, inputs


def check_dtype(name: object) -> np.dtype:
    """The numpy dtype a gather names: a plain integer or float type of at most 8 bytes."""
    wrong = f"dtype must name an integer or float type, such as 'float32' or '<i8', got {name!r:.100}"
    if type(name) is not str or not _DTYPE_NAME.fullmatch(name):
        raise InvalidArgument(wrong)
    try:
        dtype = np.dtype(name)
    except TypeError:          # what numpy raises for a name it does not know
        raise InvalidArgument(wrong) from None
    if dtype.kind not in "iuf" or dtype.itemsize > MAX_DTYPE_BYTES:
        raise InvalidArgument(wrong)
    return dtype


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

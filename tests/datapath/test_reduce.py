"""What a gather may name as its dtype (datapath/reduce.py): plain integer and float types only,
and nothing else reaches numpy's parser (which raises errors of its own choosing)."""

from __future__ import annotations

import numpy as np
import pytest

from memfabric.bigmemory.reduce import check_dtype, check_request
from memfabric.errors import InvalidArgument

ACCEPTED = {"uint8": np.uint8, "int32": np.int32, "float32": np.float32, "float64": np.float64,
            "<f4": np.float32, "|u1": np.uint8, "f8": np.float64, "u2": np.uint16, "i8": np.int64,
            "double": np.float64, "int_": np.int64, "half": np.float16}

REFUSED = [
    {"names": ["a", "a"], "formats": ["u1", "u1"]},    # numpy: ValueError (name already used)
    {"names": ["a"], "formats": ["u1"]},
    ["u1", "u1"], [["a", "u1"], ["a", "u1"]], [["a", "u1"]], [],
    "0-0-0", "1-0-01",                                  # numpy: ValueError (format not recognized)
    "u1,u1", "(2,)u1", "u8[3]", "m8[s]", "M8", "O", "object", "S8", "U4", "V8", "c8", "complex64",
    "bool", "b1", "float128", "f16", "longdouble", "", " ", "\x00", "é", "float64 ", "a" * 10_000,
    None, True, 1, -1, 2**64 - 1, 1.5, float("nan"), b"u1", b"\xff", {}, {"a": 1},
]


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_integer_and_float_names_are_taken(name):
    assert check_dtype(name) == np.dtype(ACCEPTED[name])


def test_big_endian_is_taken_as_numpy_spells_it():
    # A server sends its peers dtype.str, which names the byte order.
    assert check_dtype(">i8") == np.dtype(">i8")
    for dtype in (np.uint8, np.int16, np.float32, np.float64, np.dtype(">f8")):
        assert check_dtype(np.dtype(dtype).str) == np.dtype(dtype)


@pytest.mark.parametrize("name", REFUSED, ids=lambda v: repr(v)[:30])
def test_everything_else_is_an_invalid_argument(name):
    with pytest.raises(InvalidArgument, match="dtype must name an integer or float type"):
        check_dtype(name)


def test_a_request_without_a_dtype_reduces_bytes():
    op, dtype, inputs = check_request({"operator": "sum", "inputs": [{}]})
    assert (op, dtype, inputs) == ("sum", np.dtype(np.uint8), [{}])

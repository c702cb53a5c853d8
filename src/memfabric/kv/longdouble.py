"""Numbers as Redis's INCRBYFLOAT reads and writes them: C's long double (x87's 80 bits on
x86-64, numpy.longdouble here), parsed as string2ld parses (strtold, nothing around it, no
NaN, no overflow or underflow) and printed as ld2string's human form ("%.17Lf" without
trailing zeros). A double would print 10.5 + 0.1 as 10.59999999999999964, Redis as 10.6.
Pure: no I/O.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

MAX_LONG_DOUBLE_CHARS = 5 * 1024        # Redis's buffer for one: longer text is no number, longer output ""
_INFINITY = re.compile(r"[+-]?(inf|infinity)", re.IGNORECASE)
_NONZERO_MANTISSA = re.compile(r"[+-]?(0[xX])?[0.]*[1-9a-fA-F]")


def parse(raw: bytes) -> np.longdouble | None:
    """string2ld: the value, or None where Redis says "value is not a valid float"."""
    if not raw or len(raw) >= MAX_LONG_DOUBLE_CHARS or raw[:1].isspace() or not raw.isascii() or b"\0" in raw:
        return None
    text = raw.decode("ascii")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            value = np.longdouble(text)
    except (ValueError, OverflowError):
        return None
    if np.isnan(value):
        return None
    if np.isinf(value) and not _INFINITY.fullmatch(text):
        return None                       # overflow (ERANGE)
    if value == 0 and _NONZERO_MANTISSA.match(text):
        return None                       # underflow to zero (ERANGE)
    return value


def human(value: np.longdouble) -> bytes:
    """ld2string(LD_STR_HUMAN): finite values only."""
    text = np.format_float_positional(value, precision=17, unique=False, fractional=True, trim="k")
    if len(text) + 1 > MAX_LONG_DOUBLE_CHARS:
        return b""
    if "." in text:
        text = text.rstrip("0")
        if text.endswith("."):
            text = text[:-1]
    if text == "-0":
        text = "0"
    return text.encode()

"""Redis's glob patterns (KEYS, SCAN MATCH), as util.c's stringmatchlen reads them, turned
into a regular expression: * ? [abc] [^a-z] and \\ escapes; an unclosed [ runs to the
pattern's end; a reversed range [z-a] is the same as [a-z]. Pure."""

from __future__ import annotations

import functools
import re


def _char(c: int) -> bytes:
    return b"\\x%02x" % c


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: bytes) -> re.Pattern[bytes]:
    out: list[bytes] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x2A:                                   # *
            while i + 1 < n and pattern[i + 1] == 0x2A:
                i += 1
            out.append(b".*")
        elif c == 0x3F:                                 # ?
            out.append(b".")
        elif c == 0x5B:                                 # [
            i += 1
            negate = i < n and pattern[i] == 0x5E
            if negate:
                i += 1
            items: list[bytes] = []
            while True:
                if i < n and pattern[i] == 0x5C and n - i >= 2:
                    i += 1
                    items.append(_char(pattern[i]))
                elif i < n and pattern[i] == 0x5D:
                    break
                elif i >= n:
                    i -= 1                              # the pattern ended inside: as if closed
                    break
                elif n - i >= 3 and pattern[i + 1] == 0x2D:
                    low, high = sorted((pattern[i], pattern[i + 2]))
                    items.append(_char(low) + b"-" + _char(high))
                    i += 2
                else:
                    items.append(_char(pattern[i]))
                i += 1
            if items:
                out.append(b"[" + (b"^" if negate else b"") + b"".join(items) + b"]")
            else:
                out.append(b"." if negate else b"(?!)")
        elif c == 0x5C and n - i >= 2:                  # \x: x itself
            i += 1
            out.append(_char(pattern[i]))
        else:
            out.append(_char(c))
        i += 1
    return re.compile(b"".join(out), re.DOTALL)


def matches(pattern: bytes, key: bytes) -> bool:
    return compile_pattern(pattern).fullmatch(key) is not None

"""The RESP parser and its helpers, pure: properties over many inputs (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memfabric.kv.resp import protocol as p
from memfabric.kv.resp.glob import matches
from memfabric.kv.resp.protocol import RequestParser, RespProtocolError, split_args, string2ll

from .wire import encode

args_st = st.lists(st.binary(max_size=40), min_size=1, max_size=8)


def _all(parser: RequestParser) -> list[list[bytes]]:
    out = []
    while (command := parser.next()) is not None:
        out.append(command)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(args_st, min_size=1, max_size=10), st.data())
def test_commands_come_out_as_they_went_in_however_the_bytes_are_cut(commands, data):
    wire = b"".join(encode(*c) for c in commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    parser = RequestParser()
    got: list[list[bytes]] = []
    at = 0
    for cut in cuts + [len(wire)]:
        parser.feed(wire[at:cut])
        at = cut
        got += _all(parser)
    assert got == commands
    assert parser.buffered_bytes() == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_commands_or_a_protocol_error_never_anything_else(data):
    parser = RequestParser()
    try:
        parser.feed(data)
        for command in iter(parser.next, None):
            assert command and all(isinstance(a, bytes) for a in command)
    except RespProtocolError as exc:
        assert str(exc).startswith("Protocol error: ")


@given(st.integers(-(1 << 63), (1 << 63) - 1))
def test_string2ll_reads_every_64_bit_integer_written_plainly(n):
    assert string2ll(str(n).encode()) == n


def test_string2ll_refuses_what_redis_refuses():
    for raw in (b"", b"+1", b"01", b"-0", b" 1", b"1 ", b"1.0", b"9223372036854775808", b"-9223372036854775809",
                b"0x1", "\u0663".encode(), b"--1", b"-"):
        assert string2ll(raw) is None, raw


@given(st.lists(st.binary(min_size=1, max_size=20).filter(lambda a: b"\0" not in a), min_size=1, max_size=6))
def test_inline_arguments_quoted_as_redis_cli_quotes_them_come_back(args):
    def quote(a: bytes) -> bytes:
        return b'"' + b"".join(b"\\x%02x" % c for c in a) + b'"'
    assert split_args(b" ".join(quote(a) for a in args)) == args


def test_split_args_as_sdssplitargs():
    assert split_args(b'set "a b" \'c\\\'d\' x') == [b"set", b"a b", b"c'd", b"x"]
    assert split_args(b'"\\x41\\n\\q"') == [b"A\nq"]
    assert split_args(b'"a"b') is None and split_args(b"'a'b") is None and split_args(b'"a') is None
    assert split_args(b"a\0b c") == [b"a"]
    assert split_args(b"   ") == []


def test_glob_as_stringmatchlen():
    cases = [(b"*", b"", True), (b"a*", b"abc", True), (b"a?c", b"abc", True), (b"a?c", b"ac", False),
             (b"[abc]", b"b", True), (b"[^abc]", b"b", False), (b"[a-c]", b"b", True), (b"[c-a]", b"b", True),
             (b"\\*", b"*", True), (b"\\*", b"a", False), (b"[\\]]", b"]", True), (b"[abc", b"b", True),
             (b"h[^e]llo", b"hallo", True), (b"h[^e]llo", b"hello", False), (b"*\n*", b"a\nb", True)]
    for pattern, key, want in cases:
        assert matches(pattern, key) is want, (pattern, key)


def test_replies_are_encoded_as_redis_writes_them():
    assert p.bulk(b"ab") == b"$2\r\nab\r\n" and p.bulk(None) == b"$-1\r\n"
    assert p.error("x") == b"-ERR x\r\n" and p.error("-WRONGTYPE y\r\nz") == b"-WRONGTYPE y  z\r\n"
    assert p.mapping([(p.bulk(b"k"), p.integer(1))], 3) == b"%1\r\n$1\r\nk\r\n:1\r\n"
    assert p.mapping([(p.bulk(b"k"), p.integer(1))], 2) == b"*2\r\n$1\r\nk\r\n:1\r\n"
    assert p.value(None, 3) == b"_\r\n" and p.verbatim(b"x", 3) == b"=5\r\ntxt:x\r\n"

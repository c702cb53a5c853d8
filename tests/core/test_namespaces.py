"""Property tests for memfabric.core.namespaces: names, secIds, attributes."""

from __future__ import annotations

import hashlib
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memfabric import errors
from memfabric.core.namespaces import (
    NamespaceRecord,
    check_attribute,
    check_name,
    check_sec_id,
    hash_sec_id,
    sec_id_matches,
)
from memfabric.limits import MAX_NAME_CHARS, MAX_SEC_ID_BYTES, SEC_HASH_SCRYPT_N

# The properties below do not depend on scrypt's cost: they use a cheap one (the stored hash
# names its cost, so the same check verifies it). The real cost has tests of its own.
CHEAP_N = 16

NAME_CHARS = string.ascii_letters + string.digits + "_.:-"


def name_is_valid(value: object) -> bool:
    return (isinstance(value, str) and 1 <= len(value) <= MAX_NAME_CHARS
            and all(c in NAME_CHARS for c in value))


def record_for(sec_id: bytes, salt: bytes | None = None) -> NamespaceRecord:
    salt_hex, hash_hex = hash_sec_id(sec_id, salt, scrypt_n=CHEAP_N)
    return NamespaceRecord(pool="p", ns="n", attribute=0, salt_hex=salt_hex,
                           sec_hash_hex=hash_hex, incarnation=1)


# ---- names -------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.text(max_size=80),
    st.text(alphabet=NAME_CHARS, max_size=80),
    st.text(alphabet=NAME_CHARS + " \n\t/é\x00\u212a", max_size=70),   # \u212a: Kelvin sign
))
def test_check_name_matches_its_rule(value):
    if name_is_valid(value):
        assert check_name("pool", value) == value
    else:
        with pytest.raises(errors.InvalidArgument):
            check_name("pool", value)


@pytest.mark.parametrize("value", [None, 1, b"abc", ["a"], "", "a" * (MAX_NAME_CHARS + 1),
                                   "a b", "a/b", "abc\n", "\nabc", "é", "a\x00"])
def test_check_name_rejects(value):
    with pytest.raises(errors.InvalidArgument):
        check_name("ns", value)


@pytest.mark.parametrize("value", ["a", "A.b:c-d_e", "0", "a" * MAX_NAME_CHARS, "-", "..", ":"])
def test_check_name_accepts(value):
    assert check_name("ns", value) == value


# ---- secIds --------------------------------------------------------------------------


def hmac_sha256_key(key: bytes) -> bytes:
    """The key HMAC-SHA256 (inside PBKDF2) really uses: long keys are hashed, short ones
    zero-padded to the 64-byte block. Keys with the same effective key are
    indistinguishable to any HMAC/PBKDF2-based check."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    return key.ljust(64, b"\x00")


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=MAX_SEC_ID_BYTES), st.binary(max_size=MAX_SEC_ID_BYTES + 8))
def test_sec_id_matches_only_the_right_sec_id(sec_id, other):
    rec = record_for(sec_id)
    assert sec_id_matches(sec_id, rec)
    # Known HMAC key equivalences are covered by the xfail tests below.
    assume(hmac_sha256_key(other) != hmac_sha256_key(sec_id))
    assert not sec_id_matches(other, rec)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 63), st.integers(1, 255))
def test_sec_id_one_byte_changed_does_not_match(sec_id, pos, flip):
    rec = record_for(sec_id)
    pos %= len(sec_id)
    other = bytearray(sec_id)
    other[pos] ^= flip
    assume(hmac_sha256_key(bytes(other)) != hmac_sha256_key(sec_id))
    assert not sec_id_matches(bytes(other), rec)
    if sec_id[-1:] != b"\x00":
        assert not sec_id_matches(sec_id[:-1], rec)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(1, 4))
def test_sec_id_with_trailing_nul_does_not_match(sec_id, pad):
    rec = record_for(sec_id)
    assert not sec_id_matches(sec_id + b"\x00" * pad, rec)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=65, max_size=MAX_SEC_ID_BYTES))
def test_sha256_of_a_long_sec_id_does_not_match(sec_id):
    rec = record_for(sec_id)
    assert not sec_id_matches(hashlib.sha256(sec_id).digest(), rec)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=MAX_SEC_ID_BYTES))
def test_hash_is_salted(sec_id):
    salt1, hash1 = hash_sec_id(sec_id, scrypt_n=CHEAP_N)
    salt2, hash2 = hash_sec_id(sec_id, scrypt_n=CHEAP_N)
    assert salt1 != salt2
    assert hash1 != hash2
    assert len(bytes.fromhex(salt1)) >= 16
    # The stored hash is not a plain unsalted digest of the secId.
    assert hash1 != hashlib.sha256(sec_id).hexdigest()
    # Both records verify the same secId.
    assert sec_id_matches(sec_id, record_for(sec_id))


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.binary(min_size=16, max_size=16))
def test_hash_is_deterministic_for_a_given_salt(sec_id, salt):
    assert hash_sec_id(sec_id, salt, CHEAP_N) == hash_sec_id(sec_id, salt, CHEAP_N)
    salt_hex, _ = hash_sec_id(sec_id, salt, CHEAP_N)
    assert salt_hex == salt.hex()


def test_record_with_other_salt_does_not_match():
    rec = record_for(b"secret", salt=b"\x01" * 16)
    _, hash_hex = hash_sec_id(b"secret", b"\x02" * 16, CHEAP_N)
    swapped = NamespaceRecord("p", "n", 0, rec.salt_hex, hash_hex, 1)
    assert not sec_id_matches(b"secret", swapped)


def test_stored_hash_is_scrypt_at_the_configured_cost():
    salt_hex, stored = hash_sec_id(b"s3cret")
    scheme, n, r, p, digest = stored.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", SEC_HASH_SCRYPT_N, 8, 1)
    assert 128 * int(r) * int(n) >= 16 << 20, "memory-hard: 16 MiB per guess"
    key = hashlib.sha256(len(b"s3cret").to_bytes(4, "big") + b"s3cret").digest()
    assert digest == hashlib.scrypt(key, salt=bytes.fromhex(salt_hex), n=SEC_HASH_SCRYPT_N, r=8, p=1,
                                    maxmem=64 << 20, dklen=32).hex()
    record = NamespaceRecord("p", "n", 0, salt_hex, stored, 1)
    assert sec_id_matches(b"s3cret", record) and not sec_id_matches(b"s3creT", record)


def test_a_record_from_before_scrypt_still_verifies():
    """What earlier versions stored: bare hex of PBKDF2-SHA256, 2,000 rounds, same key."""
    salt = bytes(range(16))
    key = hashlib.sha256(len(b"old").to_bytes(4, "big") + b"old").digest()
    legacy = NamespaceRecord("p", "n", 0, salt.hex(), hashlib.pbkdf2_hmac("sha256", key, salt, 2000).hex(), 1)
    assert sec_id_matches(b"old", legacy)
    assert not sec_id_matches(b"old\x00", legacy) and not sec_id_matches(b"new", legacy)


@pytest.mark.parametrize("stored", [
    "", "zz" * 32, "ab" * 31, "scrypt$", "scrypt$16$8$1", "scrypt$16$8$1$" + "ab" * 31,
    "scrypt$15$8$1$" + "ab" * 32,                 # N not a power of two
    "scrypt$4194304$8$1$" + "ab" * 32,            # 4 GiB: a cost beyond bounds is refused, not run
    "scrypt$16$0$1$" + "ab" * 32, "scrypt$16$8$9$" + "ab" * 32, "scrypt$x$8$1$" + "ab" * 32,
    "bcrypt$16$8$1$" + "ab" * 32,
])
def test_a_hash_in_no_known_form_matches_nothing(stored):
    assert not sec_id_matches(b"k", NamespaceRecord("p", "n", 0, "00" * 16, stored, 1))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=MAX_SEC_ID_BYTES + 20),
                 st.text(max_size=MAX_SEC_ID_BYTES + 20),
                 st.none(), st.integers()))
def test_check_sec_id_bounds(value):
    raw = value.encode() if isinstance(value, str) else value
    if isinstance(raw, bytes) and 1 <= len(raw) <= MAX_SEC_ID_BYTES:
        assert check_sec_id(value) == raw
    else:
        with pytest.raises(errors.InvalidArgument):
            check_sec_id(value)


# ---- attributes ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_check_attribute_bounds(attribute):
    if 0 <= attribute < 2**31:
        assert check_attribute(attribute) == attribute
    else:
        with pytest.raises(errors.InvalidArgument):
            check_attribute(attribute)


@pytest.mark.parametrize("value", [0, 1, 2**31 - 1])
def test_check_attribute_edges_accepted(value):
    assert check_attribute(value) == value


@pytest.mark.parametrize("value", [-1, 2**31, True, False, 1.0, "1", None])
def test_check_attribute_rejects(value):
    with pytest.raises(errors.InvalidArgument):
        check_attribute(value)

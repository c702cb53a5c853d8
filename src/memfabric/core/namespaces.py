"""Namespace rules: names, secIds, attributes. Pure: no I/O.

A namespace is (pool, ns). Its secId is a shared secret presented on every operation;
only a slow, salted, memory-hard hash of it (scrypt) is ever stored, and comparisons are
constant-time. A stored hash names its own scheme and parameters, so records of earlier
versions (bare hex: PBKDF2-SHA256, 2,000 rounds) still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..limits import (MAX_NAME_CHARS, MAX_SEC_ID_BYTES, SEC_HASH_LEGACY_PBKDF2_ROUNDS, SEC_HASH_MAX_MEMORY_BYTES,
                      SEC_HASH_SCRYPT_N, SEC_HASH_SCRYPT_P, SEC_HASH_SCRYPT_R)

_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    pool: str
    ns: str
    attribute: int
    salt_hex: str
    sec_hash_hex: str    # see hash_sec_id: "scrypt$N$r$p$<hex>", or bare hex (PBKDF2) from before
    incarnation: int     # differs each time the name is created, so old grants die with it
    creator: str = ""    # the client that made it, as its server saw it ("" in older catalogs)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.pool, self.ns, self.incarnation)


def check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{kind} name must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_CHARS or not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{kind} name {value!r} must be 1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 _ . : -")
    return value


def check_sec_id(sec_id: object) -> bytes:
    if isinstance(sec_id, str):
        sec_id = sec_id.encode()
    if not isinstance(sec_id, (bytes, bytearray)) or not 1 <= len(sec_id) <= MAX_SEC_ID_BYTES:
        raise InvalidArgument(f"secId must be 1-{MAX_SEC_ID_BYTES} bytes")
    return bytes(sec_id)


def check_attribute(attribute: object) -> int:
    if not isinstance(attribute, int) or isinstance(attribute, bool) or not 0 <= attribute < 2**31:
        raise InvalidArgument(f"attribute must be an int in [0, 2**31), got {attribute!r}")
    return attribute


def _key_of(sec_id: bytes) -> bytes:
    # PBKDF2 and scrypt use the secret as an HMAC key, and HMAC zero-pads short keys and
    # hashes long ones: b"k" and b"k\0" would match, and so would X and sha256(X). A
    # length-prefixed digest first gives every secId one fixed-length key of its own.
    return hashlib.sha256(len(sec_id).to_bytes(4, "big") + sec_id).digest()


def _scrypt(key: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(key, salt=salt, n=n, r=r, p=p, maxmem=2 * SEC_HASH_MAX_MEMORY_BYTES, dklen=32)


def hash_sec_id(sec_id: bytes, salt: bytes | None = None, scrypt_n: int = SEC_HASH_SCRYPT_N) -> tuple[str, str]:
    """(salt hex, stored hash) of a secId: "scrypt$N$r$p$<hex>". `scrypt_n` is for tests
    of the scheme's other properties, which do not depend on its cost."""
    salt = os.urandom(16) if salt is None else salt
    r, p = SEC_HASH_SCRYPT_R, SEC_HASH_SCRYPT_P
    digest = _scrypt(_key_of(sec_id), salt, scrypt_n, r, p)
    return salt.hex(), f"scrypt${scrypt_n}${r}${p}${digest.hex()}"


def sec_id_matches(sec_id: bytes, record: NamespaceRecord) -> bool:
    """Whether the secId is the one the record's hash was made of. A hash in no scheme we
    know, or with a cost beyond our bounds, matches nothing."""
    try:
        salt = bytes.fromhex(record.salt_hex)
        if record.sec_hash_hex.startswith("scrypt$"):
            _, n_text, r_text, p_text, digest_hex = record.sec_hash_hex.split("$")
            n, r, p = int(n_text), int(r_text), int(p_text)
            if not (2 <= n and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 4
                    and 128 * r * n <= SEC_HASH_MAX_MEMORY_BYTES and len(digest_hex) == 64):
                return False
            computed = _scrypt(_key_of(sec_id), salt, n, r, p).hex()
        elif len(record.sec_hash_hex) == 64:
            digest_hex = record.sec_hash_hex
            computed = hashlib.pbkdf2_hmac("sha256", _key_of(sec_id), salt, SEC_HASH_LEGACY_PBKDF2_ROUNDS).hex()
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(computed, digest_hex.lower())

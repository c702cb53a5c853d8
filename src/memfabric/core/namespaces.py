"""Namespace rules: names, secIds, attributes. Pure: no I/O.

A namespace is (pool, ns). Its secId is a shared secret presented on every operation;
only a salted PBKDF2 hash of it is ever stored, and comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..limits import MAX_NAME_CHARS, MAX_SEC_ID_BYTES, SEC_HASH_ITERATIONS

_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    pool: str
    ns: str
    attribute: int
    salt_hex: str
    sec_hash_hex: str
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


def hash_sec_id(sec_id: bytes, salt: bytes | None = None) -> tuple[str, str]:
    salt = os.urandom(16) if salt is None else salt
    # PBKDF2 uses the secret as an HMAC key, and HMAC zero-pads short keys and hashes long
    # ones: b"k" and b"k\0" would match, and so would X and sha256(X). A length-prefixed
    # digest first gives every secId one fixed-length key of its own.
    key = hashlib.sha256(len(sec_id).to_bytes(4, "big") + sec_id).digest()
    digest = hashlib.pbkdf2_hmac("sha256", key, salt, SEC_HASH_ITERATIONS)
    return salt.hex(), digest.hex()


def sec_id_matches(sec_id: bytes, record: NamespaceRecord) -> bool:
    _, digest = hash_sec_id(sec_id, bytes.fromhex(record.salt_hex))
    return hmac.compare_digest(digest, record.sec_hash_hex)

"""Who may use ``vdifs serve``: tokens, and users of an Apache ``htpasswd`` file.

A token travels the ways XAPI's clients send credentials: ``?session_id=TOKEN``
in the URL (XAPI's own URLs carry a session that way), ``Authorization:
Bearer TOKEN``, or as the password of HTTP basic auth.  An htpasswd user
signs in with basic auth; the file may hold bcrypt (``htpasswd -B``), SHA-2
crypt, Apache's MD5 (``$apr1$``, htpasswd's default) or ``{SHA}`` entries.
Secrets are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vdifs.errors import InvalidArgument

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def apr1(password: bytes, salt: bytes) -> str:
    """Apache's MD5 crypt (``$apr1$``), as ``htpasswd -m`` makes it (Apache's
    ``apr_md5_encode``, after Poul-Henning Kamp's md5crypt)."""
    magic = b"$apr1$"
    salt = salt[:8]
    ctx = hashlib.md5(password + magic + salt, usedforsecurity=False)
    alternate = hashlib.md5(password + salt + password, usedforsecurity=False).digest()
    for left in range(len(password), 0, -16):
        ctx.update(alternate[: min(16, left)])
    bits = len(password)
    while bits:
        ctx.update(b"\0" if bits & 1 else password[:1])
        bits >>= 1
    digest = ctx.digest()
    for i in range(1000):
        round_ = hashlib.md5(usedforsecurity=False)
        round_.update(password if i & 1 else digest)
        if i % 3:
            round_.update(salt)
        if i % 7:
            round_.update(password)
        round_.update(digest if i & 1 else password)
        digest = round_.digest()

    def to64(value: int, count: int) -> str:
        out = ""
        for _ in range(count):
            out += _ITOA64[value & 0x3F]
            value >>= 6
        return out

    d = digest
    text = "".join(
        to64(d[a] << 16 | d[b] << 8 | d[c], 4)
        for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5))
    ) + to64(d[11], 2)
    return f"$apr1${salt.decode('ascii', 'replace')}${text}"


def _crypt(password: str, stored: str) -> str | None:
    """The C library's crypt(3) (bcrypt, SHA-2 crypt), where Python still has it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            return None
    try:
        return crypt.crypt(password, stored)
    except (OSError, ValueError):
        return None


def password_matches(password: str, stored: str) -> bool:
    if stored.startswith("{SHA}"):
        digest = base64.b64encode(hashlib.sha1(password.encode(), usedforsecurity=False).digest())
        return hmac.compare_digest(digest.decode(), stored[5:])
    if stored.startswith("$apr1$"):
        salt = stored[6:].partition("$")[0].encode()
        return hmac.compare_digest(apr1(password.encode(), salt), stored)
    if stored.startswith("$"):
        computed = _crypt(password, stored)
        return computed is not None and hmac.compare_digest(computed, stored)
    return False  # plain text and DES crypt are refused


@dataclass(frozen=True)
class Credentials:
    tokens: frozenset[str] = frozenset()
    users: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, token_file: Path | None, htpasswd: Path | None) -> Credentials:
        if token_file is None and htpasswd is None:
            raise InvalidArgument("vdifs serve needs --token-file or --htpasswd: it never serves")
        tokens: set[str] = set()
        users: dict[str, str] = {}
        try:
            if token_file is not None:
                for line in token_file.read_text().splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        tokens.add(line.strip())
            if htpasswd is not None:
                for line in htpasswd.read_text().splitlines():
                    user, colon, stored = line.strip().partition(":")
                    if colon and user and not user.startswith("#"):
                        users[user] = stored
        except OSError as exc:
            raise InvalidArgument(f"cannot read credentials: {exc}") from None
        if not tokens and not users:
            raise InvalidArgument("the credential files hold no token and no user")
        return cls(frozenset(tokens), users)

    def token_ok(self, token: str) -> bool:
        # Compared with every token, in constant time each: no early exit on a match.
        return any([hmac.compare_digest(token, known) for known in self.tokens])

    def allows(self, session_id: str | None, authorization: str | None) -> bool:
        if session_id is not None and self.token_ok(session_id):
            return True
        if authorization is None:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            return self.token_ok(value.strip())
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return False
        stored = self.users.get(user)
        if stored is not None and password_matches(password, stored):
            return True
        return self.token_ok(password)

"""Which backend a ``--sr`` names, and opening it.

``--sr DIR`` (or nothing: ``$VDIFS_SR``, else ``~/.local/share/vdifs/sr``) is
the embedded SR; ``--sr xapi://user@host[:port][/?sr=<sr-uuid>]`` is a pool,
with its password from ``--password-file`` or ``$VDIFS_XAPI_PASSWORD`` (never
from the command line, where ``ps`` would show it) and its certificate
checked against ``--ca`` or the system's CAs.
"""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from vdifs.errors import InvalidArgument
from vdifs.storage.backend import Backend

PASSWORD_VARIABLE = "VDIFS_XAPI_PASSWORD"


@dataclass(frozen=True)
class SrSpec:
    """What ``--sr``, ``--ca`` and ``--password-file`` say."""

    text: str
    ca: Path | None = None
    password_file: Path | None = None

    @property
    def is_pool(self) -> bool:
        return self.text.startswith("xapi://")

    @property
    def log_dir(self) -> Path:
        """Where a mount daemon logs: the SR's directory, or the cache for a pool."""
        if not self.is_pool:
            return Path(self.text)
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return cache / "vdifs"

    def args(self) -> list[str]:
        """The global options that name this SR again (for the mount daemon)."""
        out = ["--sr", self.text]
        if self.ca is not None:
            out += ["--ca", str(self.ca)]
        if self.password_file is not None:
            out += ["--password-file", str(self.password_file)]
        return out

    def password(self) -> str:
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text().splitlines()
            except OSError as exc:
                raise InvalidArgument(f"cannot read the password file: {exc}") from None
            return lines[0] if lines else ""
        password = os.environ.get(PASSWORD_VARIABLE)
        if password is None:
            if not sys.stdin.isatty():
                raise InvalidArgument(
                    f"the pool's password: set ${PASSWORD_VARIABLE} or pass --password-file"
                )
            password = getpass.getpass(f"password for {self.text}: ")
            os.environ[PASSWORD_VARIABLE] = password  # for a mount daemon this starts
        return password

    def open(self) -> Backend:
        if self.is_pool:
            from vdifs.storage.xapi.api import PoolAddress
            from vdifs.storage.xapi.pool import PoolBackend

            return PoolBackend(PoolAddress.parse(self.text), self.password(), ca=self.ca)
        if self.ca is not None or self.password_file is not None:
            raise InvalidArgument("--ca and --password-file are for a pool (--sr xapi://...)")
        from vdifs.storage.local import LocalSR

        return LocalSR(Path(self.text))

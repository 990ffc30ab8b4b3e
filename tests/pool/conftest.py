"""A fake pool (tests/pool/fakepool: XAPI's wire protocol over HTTPS, nbdkit with TLS
for the bytes), the real ``vdifs`` CLI pointed at it, and real mounts of it."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Cli
from tests.pool.fakepool import PoolInfo, running_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolInfo]:
    with running_pool(tmp_path_factory.mktemp("pool")) as info:
        yield info


def address(pool: PoolInfo, sr: str | None = None) -> str:
    port = urlsplit(pool.url).port
    return f"xapi://{pool.user}@127.0.0.1:{port}" + (f"/?sr={sr}" if sr else "")


class PoolCli(Cli):
    """The real ``vdifs`` command against the fake pool."""

    def __init__(
        self,
        pool: PoolInfo,
        *,
        password: str | None = None,
        ca: Path | None = None,
        password_file: Path | None = None,
        sr: str | None = None,
    ) -> None:
        self.pool = pool
        self.sr = sr
        self.password = pool.password if password is None else password
        self.ca = Path(pool.ca) if ca is None else ca
        self.password_file = password_file

    def invocation(self) -> tuple[list[str], dict[str, str] | None]:
        env = {k: v for k, v in os.environ.items() if k != "VDIFS_XAPI_PASSWORD"}
        env["XDG_CACHE_HOME"] = str(Path(self.pool.state_dir) / "cache")  # logs, scratch
        env["XDG_STATE_HOME"] = str(Path(self.pool.state_dir) / "state")  # the import journal
        options = ["--sr", address(self.pool, self.sr), "--ca", str(self.ca)]
        if self.password_file is not None:
            options += ["--password-file", str(self.password_file)]
        else:
            env["VDIFS_XAPI_PASSWORD"] = self.password
        return options, env


@pytest.fixture
def pool_cli(pool: PoolInfo) -> PoolCli:
    return PoolCli(pool)


class Xapi:
    """XenAPI calls as an administrator makes them (xe), straight to the fake."""

    def __init__(self, pool: PoolInfo) -> None:
        context = ssl.create_default_context(cafile=str(pool.ca))
        self.proxy = xmlrpc.client.ServerProxy(pool.url + "/", context=context)
        self.pool = pool
        self.session = self._value(
            self.proxy.session.login_with_password(pool.user, pool.password, "1.0", "tests")
        )

    @staticmethod
    def _value(result: Any) -> Any:
        assert result["Status"] == "Success", result
        return result["Value"]

    def __call__(self, method: str, *args: Any) -> Any:
        result = getattr(self.proxy, method)(self.session, *args)
        if result["Status"] != "Success" and result["ErrorDescription"][0] == "SESSION_INVALID":
            self.session = self._value(
                self.proxy.session.login_with_password(
                    self.pool.user, self.pool.password, "1.0", "tests"
                )
            )
            result = getattr(self.proxy, method)(self.session, *args)
        return self._value(result)

    def ref(self, uuid: str) -> str:
        return str(self("VDI.get_by_uuid", uuid))


@pytest.fixture
def xapi(pool: PoolInfo) -> Xapi:
    return Xapi(pool)


class PoolMount:
    def __init__(self, cli: PoolCli, mountpoint: Path) -> None:
        self.cli = cli
        self.path = mountpoint

    def vdi(self, uuid: str) -> Path:
        return self.path / "vdis" / uuid

    def stop(self) -> None:
        self.cli.run("umount", str(self.path), check=False)
        deadline = time.monotonic() + 10
        while os.path.ismount(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)


@pytest.fixture
def pool_mount(pool_cli: PoolCli, tmp_path: Path) -> Iterator[PoolMount]:
    mountpoint = tmp_path / "pool-mnt"
    mountpoint.mkdir()
    pool_cli("mount", str(mountpoint))  # the daemon, as a user starts it
    mount = PoolMount(pool_cli, mountpoint)
    try:
        yield mount
    finally:
        mount.stop()

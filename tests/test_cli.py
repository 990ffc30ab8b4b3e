"""The CLI's exact forms, as scripts call them."""

from __future__ import annotations

import re
import uuid as uuidlib

from tests.conftest import Cli

UUID_LINE = re.compile(r"^[0-9a-f-]{36}$")


def test_create_prints_the_uuid_alone(cli: Cli) -> None:
    out = cli("vdi", "create", "web", "--size", "1G")
    assert UUID_LINE.match(out)
    uuidlib.UUID(out)
    record = cli.json("vdi", "show", out)
    assert record["virtual_size"] == 1 << 30
    assert record["name_label"] == "web"


def test_list_json_snapshot_clone_destroy(cli: Cli) -> None:
    vdi = cli("vdi", "create", "db", "--size", "64M")
    snap = cli("vdi", "snapshot", vdi, "--name", "nightly")
    clone = cli("vdi", "clone", snap, "--name", "db-copy")
    assert UUID_LINE.match(snap) and UUID_LINE.match(clone)
    records = {r["uuid"]: r for r in cli.json("vdi", "list", "--json")}
    assert records[snap]["is_a_snapshot"] and records[snap]["snapshot_of"] == vdi
    assert records[snap]["read_only"] and records[snap]["snapshot_time"].endswith("Z")
    assert records[vdi]["snapshots"] == [snap]
    assert not records[clone]["is_a_snapshot"] and records[clone]["name_label"] == "db-copy"
    cli("vdi", "destroy", vdi)
    records = {r["uuid"]: r for r in cli.json("vdi", "list", "--json")}
    assert vdi not in records and snap in records
    table = cli("vdi", "list")
    assert "nightly" in table and "db-copy" in table


def test_errors_are_one_line_with_documented_status(cli: Cli) -> None:
    missing = cli.run("vdi", "show", "00000000-0000-0000-0000-000000000000", check=False)
    assert missing.returncode == 3
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    bad = cli.run("vdi", "create", "x", "--size", "lots", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("vdifs: invalid size")
    cli("vdi", "create", "twin", "--size", "1M")
    cli("vdi", "create", "twin", "--size", "1M")
    ambiguous = cli.run("vdi", "show", "twin", check=False)
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr
    helptext = cli("--help")
    assert "exit status" in helptext and "not found" in helptext
    assert cli("--version").startswith("vdifs ")


def test_names_resolve_when_unambiguous(cli: Cli) -> None:
    vdi = cli("vdi", "create", "only-one", "--size", "1M")
    assert cli.json("vdi", "show", "only-one")["uuid"] == vdi


def test_one_exit_status_table() -> None:
    """vdifs --help and docs/errors.md show the table the error classes define."""
    import errno
    import re
    from pathlib import Path

    from vdifs.cli import EXIT_CODES
    from vdifs.errors import exit_statuses

    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \|[^|]*\| (E[A-Z]+) \|", doc, re.M))
    for code, err, meaning in exit_statuses():
        assert getattr(errno, rows[str(code)]) == err, code
        assert f"{code:>3}  {meaning}" in EXIT_CODES
    assert set(rows) == {str(code) for code, _, _ in exit_statuses()}

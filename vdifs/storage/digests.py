"""Digests of a state's files (SHA256SUMS), kept in SQLite beside what a backend
already keeps there: the embedded SR's database, a pool's journal on the backup host."""

from __future__ import annotations

import sqlite3

DIGESTS_TABLE = """
CREATE TABLE IF NOT EXISTS digests(
    vdi TEXT NOT NULL,
    generation INTEGER NOT NULL,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY(vdi, generation, name)
) WITHOUT ROWID;
"""


def stored(db: sqlite3.Connection, uuid: str, generation: int) -> dict[str, str]:
    rows = db.execute(
        "SELECT name, sha256 FROM digests WHERE vdi = ? AND generation = ?", (uuid, generation)
    )
    return dict(rows.fetchall())


def store(db: sqlite3.Connection, uuid: str, generation: int, digests: dict[str, str]) -> None:
    """Inside the caller's transaction."""
    db.executemany(
        "INSERT OR REPLACE INTO digests(vdi, generation, name, sha256) VALUES (?, ?, ?, ?)",
        [(uuid, generation, name, sha) for name, sha in digests.items()],
    )


def forget(db: sqlite3.Connection, uuid: str) -> None:
    db.execute("DELETE FROM digests WHERE vdi = ?", (uuid,))

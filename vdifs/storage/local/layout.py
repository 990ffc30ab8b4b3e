"""What an embedded SR's directory holds: the schema, the packs' geometry, chunk identity."""

from __future__ import annotations

import hashlib

from vdifs.errors import InvalidArgument
from vdifs.model import CHUNK_SIZE, SECTOR_SIZE, ceil_div

SCHEMA_VERSION = 1
ZERO_CHUNK = bytes(CHUNK_SIZE)
PACK_SLOTS = 16384  # 1 GiB per pack: few files, yet a failed import wastes at most that
MAX_VIRTUAL_SIZE = 64 << 40  # 64 TiB: qcow2 serves it; keeps block-map rows within u32 indexes
STALE_PACK_SECONDS = 60  # a pack still without its name this long was left by a crash
IOV_MAX = 1024  # buffers per pwritev (Linux)
DIGEST_BYTES = 16  # SHA-256 prefix: 2^64 birthday bound, half the index size

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vdis(
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    name_label TEXT NOT NULL,
    name_description TEXT NOT NULL DEFAULT '',
    virtual_size INTEGER NOT NULL,
    is_a_snapshot INTEGER NOT NULL DEFAULT 0,
    snapshot_of TEXT,
    snapshot_time TEXT,
    lineage TEXT NOT NULL,
    created TEXT NOT NULL,
    changed_ns INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    allocated_chunks INTEGER NOT NULL DEFAULT 0,
    -- the image most recently imported, so a delta made on top of it applies
    import_identity BLOB,
    import_name TEXT,
    import_generation INTEGER,
    -- the snapshot tree: a snapshot's parent is the VDI's current snapshot when
    -- it was taken; a live VDI's current is the snapshot it descends from
    parent TEXT,
    current TEXT,
    data_destroyed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS vdis_lineage ON vdis(lineage);
CREATE INDEX IF NOT EXISTS vdis_snapshot_of ON vdis(snapshot_of);
CREATE TABLE IF NOT EXISTS blocks(
    vdi INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    mask INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    PRIMARY KEY(vdi, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks(digest BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;
-- a chunk's digest from its id: what checking a chunk read from its pack needs
-- (built once when an SR made before it is opened; also serves gc's range delete)
CREATE INDEX IF NOT EXISTS chunks_id ON chunks(id);
CREATE TABLE IF NOT EXISTS packs(id INTEGER PRIMARY KEY, slots INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vms(
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    name_label TEXT NOT NULL,
    name_description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    is_a_snapshot INTEGER NOT NULL DEFAULT 0,
    snapshot_of TEXT,
    snapshot_time TEXT,
    parent TEXT,
    current TEXT,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vm_disks(
    vm TEXT NOT NULL,
    device TEXT NOT NULL,
    vdi TEXT NOT NULL,
    PRIMARY KEY(vm, device)
) WITHOUT ROWID;
"""


# Columns added since the first schema, for SRs made by an earlier vdifs.
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "vdis": {
        "import_identity": "BLOB",
        "import_name": "TEXT",
        "import_generation": "INTEGER",
        "parent": "TEXT",
        "current": "TEXT",
        "data_destroyed": "INTEGER NOT NULL DEFAULT 0",
    },
    "imports": {"pid": "INTEGER NOT NULL DEFAULT 0", "notes": "TEXT", "sha256": "TEXT"},
}


# Indexes on columns that ADDED_COLUMNS may have just added.
_LATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS vdis_parent ON vdis(parent)",
    "CREATE INDEX IF NOT EXISTS vms_parent ON vms(parent)",
    "CREATE INDEX IF NOT EXISTS vms_snapshot_of ON vms(snapshot_of)",
)


def is_zero_chunk(piece: bytes | bytearray | memoryview) -> bool:
    # Not ``piece == ZERO_CHUNK``: a memoryview compares item by item, which
    # costs 176 µs for a zero chunk here; startswith is one memcmp (3 µs).
    return len(piece) == CHUNK_SIZE and ZERO_CHUNK.startswith(piece)


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


def check_size(size: int) -> int:
    """Validate a virtual size and round it up to whole sectors."""
    if size <= 0:
        raise InvalidArgument("a VDI needs a size above zero")
    if size > MAX_VIRTUAL_SIZE:
        raise InvalidArgument(f"size {size} is above the SR limit of {MAX_VIRTUAL_SIZE} bytes")
    return ceil_div(size, SECTOR_SIZE) * SECTOR_SIZE


# A chunk id is its location: ``pack << 32 | slot``, the chunk at byte
# ``slot * CHUNK_SIZE`` of ``packs/<pack>.pack``; 0 is the zero chunk.
SLOT_BITS = 32
SLOT_MASK = (1 << SLOT_BITS) - 1


def make_chunk_id(pack: int, slot: int) -> int:
    return pack << SLOT_BITS | slot


def pack_of(chunk: int) -> int:
    return chunk >> SLOT_BITS


def slot_of(chunk: int) -> int:
    return chunk & SLOT_MASK


def slot_offset(chunk: int) -> int:
    """Where a chunk's bytes start in its pack."""
    return (chunk & SLOT_MASK) * CHUNK_SIZE

"""The embedded SR: SQLite metadata beside content-addressed chunk packs in one directory.

The only place in vdifs with SQL, packs and staging paths; the layers above
see it as a :class:`vdifs.storage.backend.Backend`.
"""

from vdifs.storage.local.sr import LocalSR, default_sr_path

__all__ = ["LocalSR", "default_sr_path"]

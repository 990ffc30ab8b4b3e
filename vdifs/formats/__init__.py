"""Pure disk-image format code: no I/O, no storage, no FUSE.

Each format has a module of named constants and ``struct.Struct`` objects
(``c_vhd``, ``c_qcow2``) and a module that turns an :class:`Allocation` into a
:class:`Layout` (``vhd``, ``qcow2``).  See ``docs/dev-formats.md``.
"""

"""The mounted tree: a FUSE-free model (``tree``) under a thin pyfuse3 adapter (``ops``)."""

"""Storage backends.  ``local`` is the embedded SR, the default."""

"""Notice a raster that changes on disk while a run reads it.

Why: the resume fingerprint is taken once, when a run starts. A raster overwritten in place during
the run (a re-export, a copy onto the same name) used to finish with tiles read from two rasters
under the old checksum, and nothing could tell them apart afterwards. Hashing the file per batch
would cost a full read each time, so the engines compare a cheap stamp of the local file (size,
modification time in ns, inode) before committing each batch: a batch committed while the stamp
is unchanged was read from the raster the run started with.

A remote object (``/vsicurl/``, ``/vsis3/`` ...) has no local file to stamp and is not watched;
an archive on the local disk (``/vsizip/a.zip/x.tif``) is watched through the archive.
"""

from __future__ import annotations

import os

from .paths import local_file_of


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


class RasterWatch:
    """Take the stamp now (before the fingerprint is hashed, so a change during hashing counts)."""

    def __init__(self, raster_path):
        self.file = local_file_of(raster_path)
        try:
            self._start = _stamp(self.file) if self.file else None
        except OSError:  # not there: opening it fails with its own message
            self.file = self._start = None

    def changed(self) -> bool:
        """True when the file is no longer the one the run started with (or is gone)."""
        if self._start is None:
            return False
        try:
            return _stamp(self.file) != self._start
        except OSError:
            return True

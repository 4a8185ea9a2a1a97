"""Raster locations that are not plain local files: GDAL virtual paths.

Mosaics at national scale are rarely one local file: they are cloud-optimised GeoTIFFs on object
storage (``/vsicurl/https://...``, ``/vsis3/bucket/key.tif``, ``/vsigs/``, ``/vsiaz/``), files
inside archives (``/vsizip/``) or VRTs over thousands of such files. GDAL opens all of them, but
``os.path.exists`` and ``os.stat`` know none of them, so every "is the raster there?" check and
the resume fingerprint go through here instead. A local ``.vrt`` is an ordinary file and needs
nothing special.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

from ..errors import RasterError

VSI_PREFIX = "/vsi"
# A grid of small windows checksummed by GDAL: reads a few blocks of a remote COG (not the file)
# yet changes when the pixels do.
_SAMPLE_GRID = 4
_SAMPLE_PX = 64


def is_gdal_path(path) -> bool:
    """True for GDAL virtual file system paths, which exist only for GDAL."""
    return str(path).startswith(VSI_PREFIX)


def check_raster_path(path) -> None:
    """Refuse a missing local file or a folder in one line; a virtual path is left for GDAL to
    open (it says in one line when it cannot)."""
    path = str(path)
    if is_gdal_path(path):
        return
    if not os.path.exists(path):
        raise RasterError(f"raster not found: {path}")
    if os.path.isdir(path):
        raise RasterError(f"{path} is a directory, not a raster file")


# Handlers whose first path is a file GDAL opens (possibly itself a /vsi path): an archive or a
# compressed file on the local disk when it does not start with "/".
_ARCHIVE_PREFIXES = ("/vsizip/", "/vsitar/", "/vsigzip/", "/vsi7z/", "/vsirar/")


def absolute_path(path) -> str:
    """The path to record and to hand to another process (a Ray worker, a later ``check --repair``
    from another folder): absolute for a local file; for an archive handler the archive made
    absolute (``/vsizip/rel/a.zip/x.tif`` -> ``/vsizip//cwd/rel/a.zip/x.tif``, the braced form
    too); other virtual paths as given (``os.path.abspath`` would mangle ``/vsicurl/https://``)."""
    path = str(path)
    if not is_gdal_path(path):
        return os.path.abspath(path)
    for prefix in _ARCHIVE_PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if rest.startswith("{") and "}" in rest:  # /vsizip/{archive}/inner
                archive, inner = rest[1:].split("}", 1)
                return prefix + "{" + _absolute_archive(archive) + "}" + inner
            return prefix + _absolute_archive(rest)
    return path


def _absolute_archive(rest: str) -> str:
    """``rest`` made absolute where it is a relative local path (a nested /vsi path is absolute)."""
    return rest if rest.startswith("/") or not rest else os.path.join(os.getcwd(), rest)


def local_file_of(path) -> str | None:
    """The local file whose bytes a run reads: the file itself, or the archive behind
    ``/vsizip/...`` (the longest leading part that is a file); None for remote objects."""
    path = absolute_path(path)
    if not is_gdal_path(path):
        return path
    for prefix in _ARCHIVE_PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix):].lstrip("{").replace("}", "")
            parts = rest.split("/")
            for end in range(len(parts), 1, -1):
                candidate = "/".join(parts[:end])
                if os.path.isfile(candidate):
                    return candidate
    return None


def worker_path(path) -> str:
    """The path another process (a Ray worker) should open: :func:`absolute_path`."""
    return absolute_path(path)


def virtual_fingerprint(path: str) -> dict:
    """The resume fingerprint of a raster GDAL reaches through a virtual path: its size, georeferencing
    and band types plus GDAL checksums of a grid of small windows, so a replaced object is noticed
    without downloading it."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.windows import Window

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                desc = {"width": ds.width, "height": ds.height, "count": ds.count, "dtypes": list(ds.dtypes),
                        "crs": ds.crs.to_wkt() if ds.crs else None, "transform": list(ds.transform)[:6],
                        "checksums": []}
                w, h = min(_SAMPLE_PX, ds.width), min(_SAMPLE_PX, ds.height)
                for i in range(_SAMPLE_GRID):
                    for j in range(_SAMPLE_GRID):
                        col = (ds.width - w) * j // max(1, _SAMPLE_GRID - 1)
                        row = (ds.height - h) * i // max(1, _SAMPLE_GRID - 1)
                        desc["checksums"].append([ds.checksum(b, window=Window(col, row, w, h))
                                                  for b in range(1, ds.count + 1)])
    except RasterioError as exc:
        raise RasterError(f"cannot open {path} as a raster: {' '.join(str(exc).split())}") from None
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return {"path": absolute_path(path), "size": None, "mtime": None, "checksum": digest,
            "checksum_method": "gdal-window-checksums"}

"""What an output records about how its tiles were made, and what a resume must agree with.

Why: a resume appends tiles to a file an earlier run made. Options that change the captions (the
beam width, the caption length cap) must be the same, or one file holds captions of two kinds
with nothing to tell them apart: a resume with other values is refused in one line naming the
option, both values and how to resume. What the model computed in (fp32, bf16, fp16 on a GPU) may
differ between runs (a bf16 run that failed, resumed in fp32) and is not a choice a user can
always repeat: every dtype that computed tiles is recorded, before the first tile it computed is
committed, as ``compute_dtypes`` (``compute_dtype`` is its one value, or the values joined by
" + "). Both engines call these, so their files say the same. A raster overwritten during a run
stops it before the next commit (``raster.watch``), so no file mixes two rasters.
"""

from __future__ import annotations

from ..errors import RasterError, StoreError

# option -> how the user names it (the CLI flag where there is one)
CAPTION_OPTIONS = {"beam_size": "--beam-size", "max_new_tokens": "max_new_tokens"}


def claim_caption_options(store, options: dict) -> None:
    """Refuse a resume whose caption options differ from the file's; record them otherwise (a file
    from before this record takes this run's)."""
    old = store.metadata().get("caption_options") or {}
    for key, flag in CAPTION_OPTIONS.items():
        if key in old and key in options and old[key] != options[key]:
            raise StoreError(f"{store.path} was captioned with {flag} {old[key]}, not {options[key]}; "
                             f"resume it with {flag} {old[key]}, or pass --overwrite to caption it again "
                             f"with {flag} {options[key]}")
    store.set_metadata({"caption_options": {**old, **options}})


def record_compute_dtype(store, dtype: str, seen: set) -> None:
    """Add ``dtype`` to the dtypes that computed this file's tiles, before the first tile this run
    commits in it (``seen``: what this run recorded already, so a batch costs nothing more)."""
    if dtype in seen:
        return
    meta = store.metadata()
    used = meta.get("compute_dtypes")
    if not isinstance(used, list):  # a file from before this record: its one value counts if it has tiles
        old = meta.get("compute_dtype")
        used = [old] if isinstance(old, str) and store.count() else []
    if dtype not in used:
        used = sorted({*used, dtype})
        store.set_metadata({"compute_dtypes": used, "compute_dtype": " + ".join(used)})
    seen.add(dtype)


def raster_changed(raster_path: str, store) -> RasterError:
    return RasterError(f"{raster_path} changed on disk during the run: stopped before mixing two rasters in one "
                       f"file; the {store.count()} tile(s) in {store.path} were read before the change. Put the "
                       "raster back as it was and run again to resume, or caption the new one with --overwrite")


def check_raster_unchanged(watch, raster_path: str, store) -> None:
    """Called before each commit: a batch committed while the raster is unchanged was read from it."""
    if watch.changed():
        raise raster_changed(raster_path, store)

"""Newline-delimited JSON spoken between the QGIS plugin and ``rscaption serve``.

Both ends import this module (the plugin without torch, the worker with it), so it stays pure
standard library: one place decides what a valid request or message is, and a malformed line is
rejected with one clear sentence instead of a KeyError deep in a task thread.

Requests (plugin -> worker), one JSON object per line::

    {"cmd": "caption", "raster": ..., "out": ..., "model": ..., "tile_size": ..., ...}
    {"cmd": "search", "gpkg": ..., "query": ..., "k": 10, "model": null, "min_confidence": null,
     "bbox": null, "where": null}                    # or "queries": [...] instead of "query"
    {"cmd": "similar", "gpkg": ..., "tile_id": 7, "k": 10, "min_confidence": null}  (no model needed)
    {"cmd": "change", "before": ..., "after": ..., "out": ..., "model": ..., "tile_size": ..., "k": 10}
    {"cmd": "info", "model": "default"}
    {"cmd": "cancel"}
    {"cmd": "shutdown"}

Messages (worker -> plugin)::

    {"type": "hello", "version", "protocol", "device", "torch", "python"}
    {"type": "progress", "done", "total"}
    {"type": "tiles", "tile_ids": [...]}
    {"type": "heartbeat", "time"}
    {"type": "result", ...}
    {"type": "log", "message"}
    {"type": "error", "message", "kind"}
    {"type": "done", "summary": {...}}

Every request except cancel/shutdown ends with exactly one ``done`` or ``error`` message.
"""

from __future__ import annotations

import json
import math

PROTOCOL_VERSION = 1

# Keys every request/message must carry, with the JSON types they must have. Optional keys are
# passed through untouched so either side can grow without breaking the other.
_NUM = (int, float)
REQUESTS: dict[str, dict[str, tuple]] = {
    "caption": {"raster": (str,), "out": (str,)},
    "search": {"gpkg": (str,)},  # and "query" or "queries" (checked below)
    "similar": {"gpkg": (str,), "tile_id": (int,)},
    "change": {"before": (str,), "after": (str,), "out": (str,)},
    "info": {},
    "cancel": {},
    "shutdown": {},
}
MESSAGES: dict[str, dict[str, tuple]] = {
    "hello": {"version": (str,), "protocol": (int,)},
    "progress": {"done": (int,), "total": (int,)},
    "tiles": {"tile_ids": (list,)},
    "heartbeat": {},
    "result": {},
    "log": {"message": (str,)},
    "error": {"message": (str,)},
    "done": {"summary": (dict,)},
}
# Optional request keys with their types, checked when present (None is always allowed).
_OPTIONAL_REQUEST = {
    "caption": {
        "model": (str,), "tile_size": (int,), "overlap": (int,), "bands": (list,),
        "extent": (list,), "batch_size": (int,), "device": (str,), "beam_size": (int,),
        "resume": (bool,), "overwrite": (bool,), "target_resolution": _NUM, "language": (str,),
        # metres per pixel given for a raster without a CRS (ignored when the raster has one)
        "ground_resolution": _NUM,
        # above run_size.LARGE_RUN_TILES tiles the worker refuses (error kind "large_run", with
        # "tiles" and "seconds") unless this is true: the plugin asks the user, then sends it
        "confirm_large": (bool,),
        # fp32 | bf16 | auto (default: the worker's RSCAPTION_PRECISION, else fp32); bf16 on a CPU that
        # cannot run it is answered with an error (kind "user") before the output is created
        "precision": (str,),
    },
    # "queries": several texts, one model load; the result then carries "results": [{query, hits}].
    # "bbox" [minx, miny, maxx, maxy] in the layer's CRS and "where" (SQLite expression over the
    # layer's columns) keep tiles before ranking, like min_confidence.
    "search": {"query": (str,), "queries": (list,), "k": (int,), "model": (str,), "device": (str,),
               "min_confidence": _NUM, "bbox": (list,), "where": (str,),
               "date": (str,)},  # change files only: before | after | change (else read from the query)
    "similar": {"k": (int,), "min_confidence": _NUM},
    # what changed between two dates (rscaption.change): progress messages carry "phase"
    # (before | after | score); a "result" with "top" (most changed tiles) precedes "done"
    "change": {"model": (str,), "tile_size": (int,), "k": (int,), "batch_size": (int,), "device": (str,),
               "resume": (bool,), "overwrite": (bool,), "confirm_large": (bool,), "precision": (str,)},
    "info": {"model": (str,), "device": (str,), "precision": (str,)},
}
TERMINAL_TYPES = frozenset({"done", "error"})


class ProtocolError(ValueError):
    """A line that is not a valid request or message; the text says what is wrong with it."""


def _check_fields(obj: dict, required: dict, optional: dict, what: str) -> None:
    for key, types in required.items():
        if key not in obj:
            raise ProtocolError(f"{what} is missing '{key}'")
        if not _is_instance(obj[key], types):
            raise ProtocolError(f"{what}: '{key}' must be {_type_names(types)}, got {type(obj[key]).__name__}")
    for key, types in optional.items():
        if obj.get(key) is not None and not _is_instance(obj[key], types):
            raise ProtocolError(f"{what}: '{key}' must be {_type_names(types)}, got {type(obj[key]).__name__}")


def _is_instance(value, types) -> bool:
    # bool is an int subclass in Python; a JSON true where a count is expected is a bug upstream.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in types)


def _loads(line) -> dict:
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line:
        raise ProtocolError("empty line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc.msg} (line starts {line[:60]!r})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def validate_request(obj: dict) -> dict:
    cmd = obj.get("cmd")
    if cmd not in REQUESTS:
        raise ProtocolError(f"unknown command {cmd!r}; expected one of {', '.join(sorted(REQUESTS))}")
    _check_fields(obj, REQUESTS[cmd], _OPTIONAL_REQUEST.get(cmd, {}), f"'{cmd}' request")
    if cmd == "caption":
        for key in ("tile_size", "batch_size", "beam_size"):
            if obj.get(key) is not None and obj[key] < 1:
                raise ProtocolError(f"'caption' request: '{key}' must be at least 1")
        if obj.get("overlap") is not None and obj["overlap"] < 0:
            raise ProtocolError("'caption' request: 'overlap' must not be negative")
        extent = obj.get("extent")
        if extent is not None:
            if len(extent) != 4 or not all(_is_instance(v, _NUM) and math.isfinite(v) for v in extent):
                raise ProtocolError("'caption' request: 'extent' must be 4 finite numbers [xmin, ymin, xmax, ymax], "
                                    f"got {extent}"[:200])
            if extent[0] >= extent[2] or extent[1] >= extent[3]:
                raise ProtocolError("'caption' request: 'extent' is empty (xmin >= xmax or ymin >= ymax)")
        bands = obj.get("bands")
        if bands is not None and not all(_is_instance(b, (int,)) and b >= 1 for b in bands):
            raise ProtocolError("'caption' request: 'bands' must be 1-based band numbers")
        ground = obj.get("ground_resolution")
        if ground is not None and not (math.isfinite(ground) and ground > 0):
            raise ProtocolError("'caption' request: 'ground_resolution' must be a positive number of metres")
    if cmd == "search":
        _check_search(obj)
    if cmd in ("search", "similar") and obj.get("k") is not None and obj["k"] < 1:
        raise ProtocolError(f"'{cmd}' request: 'k' must be at least 1")
    if cmd in ("search", "similar") and obj.get("min_confidence") is not None and not 0 <= obj["min_confidence"] <= 1:
        raise ProtocolError(f"'{cmd}' request: 'min_confidence' must be a number between 0 and 1, "
                            f"got {obj['min_confidence']}")
    return obj


def _check_search(obj: dict) -> None:
    queries = obj.get("queries")
    if obj.get("query") is None and queries is None:
        raise ProtocolError("'search' request is missing 'query' (or 'queries')")
    if queries is not None and (not queries or not all(isinstance(q, str) for q in queries)):
        raise ProtocolError("'search' request: 'queries' must be a non-empty list of strings")
    bbox = obj.get("bbox")
    if bbox is not None:
        if len(bbox) != 4 or not all(_is_instance(v, _NUM) and math.isfinite(v) for v in bbox):
            raise ProtocolError(f"'search' request: 'bbox' must be 4 finite numbers [minx, miny, maxx, maxy], "
                                f"got {bbox}"[:200])
        if bbox[0] > bbox[2] or bbox[1] > bbox[3]:
            raise ProtocolError("'search' request: 'bbox' is empty (minx > maxx or miny > maxy)")


def validate_message(obj: dict) -> dict:
    kind = obj.get("type")
    if kind not in MESSAGES:
        raise ProtocolError(f"unknown message type {kind!r}")
    _check_fields(obj, MESSAGES[kind], {}, f"'{kind}' message")
    return obj


def parse_request(line) -> dict:
    return validate_request(_loads(line))


def parse_message(line) -> dict:
    return validate_message(_loads(line))


def _dumps(obj: dict) -> str:
    # allow_nan=False: NaN/Infinity are not JSON and would break a strict reader on the other end.
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_default)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a "\udcff" escape in a request): \u-escape it
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=_default)
    return text + "\n"


def _default(value):
    # numpy scalars and paths leak into summaries; convert rather than crash the worker mid-run.
    for attr in ("item", "tolist"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_request(cmd: str, /, **fields) -> str:
    obj = {"cmd": cmd, **fields}
    validate_request(obj)
    return _dumps(obj)


def encode_message(msg_type: str, /, **fields) -> str:
    obj = {"type": msg_type, **fields}
    validate_message(obj)
    return _dumps(obj)


def clean_float(value):
    """NaN/inf -> None so a summary or score can always be encoded."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None

"""Cut a raster into fixed-size RGB uint8 tiles with windowed reads.

Only one tile (plus GDAL's bounded block cache, see ``GDAL_CACHE_MB``) is ever in memory, so a
50 GB mosaic costs the same RAM as a thumbnail. Every policy below exists so that a tile's pixels and
its polygon in the output GeoPackage always describe the same ground, for any raster QGIS can show.

Grid and edges
    Windows start at the tiling region's top-left corner (the raster, or ``extent`` snapped outward
    to whole pixels and clipped to the raster) and step by ``tile_size - overlap`` output pixels.
    The last row/column of windows is shifted inward so it ends exactly on the region's edge: no
    content is dropped and nothing is read past the edge (the last windows overlap their
    neighbours a bit more). Such a tile's caption describes its whole window, but its map polygon
    (``Tile.map_polygon``, what the GeoPackage stores) starts where the regular grid would have put
    it, so edge tiles do not stack on their neighbours (a click picks one tile, no doubled lines). If the region is smaller than one tile in a dimension, the whole region
    is read in that dimension and the image is padded at the bottom/right with the fill value; the
    polygon covers only the real data window, never the padding.

Resolution
    ``target_resolution`` (ground units per output pixel, in the raster CRS's units) sets the source
    window to ``round(tile_size * target_resolution / pixel_size)`` pixels, read with
    ``out_shape=(tile_size, tile_size)``: average resampling when shrinking, bilinear when
    enlarging. ``overlap`` is in output pixels.

Bands
    ``bands`` are 1-based. Default: the bands whose colour interpretation is red, green, blue (in
    that order); else a paletted band expanded through its colour table; else the first three
    non-alpha bands; with a single non-alpha band (or two, e.g. grey + NIR) the first one is
    replicated to grey RGB. An alpha band is never used as colour, only as a mask.

Values
    uint8 passes through; every other type is stretched to 0-255 with per-band percentiles computed
    once per raster (``stretch.py``); the stretch is recorded in ``describe()``.

Nodata
    Validity comes from GDAL's masks (nodata value, alpha band, internal/external mask) plus NaN for
    floats; a pixel is valid if any of its colour bands is. ``valid_fraction`` is measured over the
    real data window (padding is not nodata). A tile is skipped when
    ``1 - valid_fraction >= nodata_threshold``, so an all-nodata tile is always skipped. Invalid
    pixels inside kept tiles are set to the fill value 0 (black) after the stretch, the same in
    every tile, so the models see one consistent "no data" colour.

Speed
    Tiled rasters (COGs, most modern GeoTIFFs) read one tile's blocks per tile. Striped rasters
    decode a full-width strip for every tile that touches it, so they read several times slower;
    still small next to captioning, and memory stays bounded either way.

Georeferencing
    A raster without CRS and geotransform is accepted: coordinates are pixel coordinates with y
    negated (x = column, y = -row), which is how QGIS places an ungeoreferenced raster, so the
    polygons still land on the image. ``crs_wkt``/``epsg`` are None and ``describe()`` says
    ``georeferenced: false``. A raster with GCPs and no geotransform is placed by an affine fit to
    its GCPs, in their CRS (``georef.py``). Rotated and geographic transforms need nothing special:
    polygons are the window corners through the geotransform.

Plan
    :meth:`RasterTiler.tiles` makes each tile from its index (row-major), so planning, counting and
    resuming a 10^6-tile mosaic hold no list of tiles: memory does not grow with the raster.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from ..errors import RasterError
from ..limits import MAX_TILE_PX  # the bound of a tile, in limits' one table
from .georef import dataset_georef
from .paths import check_raster_path, worker_path
from .stretch import identity, percentile_stretch, sample_shape

FILL_VALUE = 0
# GDAL's block cache may keep up to 5 % of RAM of decoded blocks for some formats; a row-major scan
# re-uses only a few tile rows of blocks, so reads run under this cap (tests measure peak memory).
GDAL_CACHE_MB = 64

_QGIS_PIXEL_TRANSFORM = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


@dataclass(frozen=True)
class TilingParams:
    tile_size: int = 256
    overlap: int = 0
    bands: tuple[int, ...] | None = None
    extent: tuple[float, float, float, float] | None = None
    target_resolution: float | None = None
    nodata_threshold: float = 0.95
    percentiles: tuple[float, float] = (2.0, 98.0)

    def __post_init__(self):
        # Lists arrive from JSON/CLI; tuples keep the params hashable and comparable on resume.
        for name in ("bands", "extent", "percentiles"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if int(self.tile_size) != self.tile_size or self.tile_size < 1:
            raise RasterError(f"tile size must be a positive integer, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise RasterError(f"overlap must be >= 0 and < tile size {self.tile_size}, got {self.overlap}")
        if self.extent is not None:
            if len(self.extent) != 4 or not all(math.isfinite(v) for v in self.extent):
                raise RasterError(f"extent must be 4 numbers (minx, miny, maxx, maxy), got {self.extent}")
            minx, miny, maxx, maxy = self.extent
            if not (minx < maxx and miny < maxy):
                raise RasterError(f"extent must have minx < maxx and miny < maxy, got {self.extent}")
        if self.target_resolution is not None and not self.target_resolution > 0:
            raise RasterError(f"target resolution must be > 0, got {self.target_resolution}")
        if not 0 < self.nodata_threshold <= 1:
            raise RasterError(f"nodata threshold must be in (0, 1], got {self.nodata_threshold}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise RasterError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "TilingParams":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Tile:
    tile_id: int
    row: int
    col: int
    window: tuple[int, int, int, int]  # col_off, row_off, width, height in source pixels
    polygon: list  # closed ring of 5 (x, y) in the raster CRS
    bounds: tuple[float, float, float, float]  # minx, miny, maxx, maxy
    # the ring drawn on the map when it is less than the window: a last row/column pulled back onto
    # the edge shows only what its neighbour does not (see "Grid and edges"); None: the whole window
    map_polygon: list | None = None


@dataclass(frozen=True)
class TileImage:
    array: np.ndarray  # tile_size x tile_size x 3 uint8
    valid_fraction: float


@dataclass(frozen=True)
class _Axis:
    """Windows along one axis by arithmetic: window ``i`` is ``(offset, length)``; the last one is
    pulled back onto the edge."""

    start: int
    length: int
    size: int
    stride: int

    @property
    def n(self) -> int:
        return 1 if self.length <= self.size else math.ceil((self.length - self.size) / self.stride) + 1

    def window(self, i: int) -> tuple[int, int]:
        if self.length <= self.size:
            return self.start, self.length
        last = i == self.n - 1
        return (self.start + self.length - self.size if last else self.start + i * self.stride), self.size

    def shown(self, i: int) -> tuple[int, int]:
        """The part of window ``i`` the map shows: a window pulled back onto the edge starts where
        the regular grid would have put it, so it overlaps its neighbour no more than others do."""
        offset, size = self.window(i)
        start = max(offset, self.start + i * self.stride) if self.length > self.size else offset
        return start, offset + size - start

    def index(self, offset: int, length: int) -> int | None:
        for i in {min(self.n - 1, max(0, (offset - self.start) // self.stride)), self.n - 1}:
            if self.window(i) == (offset, length):
                return i
        return None


class TilePlan(Sequence):
    """Every tile of a :class:`RasterTiler`, row-major, each made from its index when asked (a
    list of a 15-million-tile mosaic took 2.6 KB a tile before the first was read)."""

    def __init__(self, tiler: "RasterTiler", cols: _Axis, rows: _Axis):
        self._tiler, self._cols, self._rows = tiler, cols, rows
        self.n_cols, self.n_rows = cols.n, rows.n

    def __len__(self) -> int:
        return self.n_cols * self.n_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"tile index {i} out of range")
        ri, ci = divmod(i, self.n_cols)
        (coff, cw), (roff, rh) = self._cols.window(ci), self._rows.window(ri)
        ring = self._tiler._ring(coff, roff, cw, rh)
        xs, ys = [x for x, _ in ring], [y for _, y in ring]
        (sc, sw), (sr, sh) = self._cols.shown(ci), self._rows.shown(ri)
        shown = None if (sc, sr, sw, sh) == (coff, roff, cw, rh) else self._tiler._ring(sc, sr, sw, sh)
        return Tile(i, ri, ci, (coff, roff, cw, rh), ring, (min(xs), min(ys), max(xs), max(ys)), shown)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def index_of(self, window) -> int | None:
        """The index of the tile with this source window, or None when it is not in the plan."""
        coff, roff, cw, rh = window
        ci, ri = self._cols.index(coff, cw), self._rows.index(roff, rh)
        return None if ci is None or ri is None else ri * self.n_cols + ci


def source_tile_px(tile_size: int, scale: tuple[float, float]) -> tuple[int, int]:
    """Source pixels (x, y) one tile is read from, ``scale`` being output pixel / source pixel."""
    return max(1, round(tile_size * scale[0])), max(1, round(tile_size * scale[1]))


def upsample_factor(tile_size: int, src: tuple[int, int]) -> float:
    """How many times a tile's side is enlarged from its source window (1 or less: not enlarged)."""
    return tile_size / math.sqrt(src[0] * src[1])


# Tile-size limits (pixels): a tile is one array in memory, and padding beyond the raster is waste.
TILE_OVER_RASTER = 4        # a tile may be up to this many times the raster's larger side ...
PADDING_FREE_TILE_PX = 2048  # ... and always up to this (tiny rasters with the card's tile size)


class RasterTiler:
    def __init__(self, path, params: TilingParams | None = None):
        self.path = str(path)
        self.params = params or TilingParams()
        check_raster_path(self.path)  # a /vsicurl/, /vsis3/ ... path is GDAL's to open or refuse
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(self.path)
        except RasterioError as exc:
            raise RasterError(f"cannot open {self.path} as a raster: {_one_line(exc)}") from None
        try:
            self._setup()
        except Exception:
            self._ds.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------
    def _setup(self):
        ds, p = self._ds, self.params
        if ds.count < 1 or ds.width < 1 or ds.height < 1:
            raise RasterError(f"{self.path} has no pixels or no bands")
        self.width, self.height = ds.width, ds.height
        geo = dataset_georef(ds)  # a geotransform, else an affine fit to GCPs, else pixel coordinates
        self.georeferenced, self.georef_source = geo.transform is not None, geo.source
        self.transform = geo.transform if self.georeferenced else _QGIS_PIXEL_TRANSFORM
        self.crs_wkt = geo.crs.to_wkt() if geo.crs else None
        try:
            self.epsg = geo.crs.to_epsg() if geo.crs else None
        except Exception:  # odd CRSs can make the authority lookup itself fail
            self.epsg = None
        self.res = (math.hypot(self.transform.a, self.transform.d), math.hypot(self.transform.b, self.transform.e))

        self.region = self._extent_window(p.extent) if p.extent else (0, 0, self.width, self.height)
        self._choose_bands()

        if p.target_resolution:
            scale = (p.target_resolution / self.res[0], p.target_resolution / self.res[1])
        else:
            scale = (1.0, 1.0)
        self._scale = scale
        self._src_size = source_tile_px(p.tile_size, scale)  # (x, y)
        self._stride = tuple(max(1, round((p.tile_size - p.overlap) * s)) for s in scale)
        self.source_px = self._src_size
        self.upsample = upsample_factor(p.tile_size, self._src_size)  # the large-run guard counts it
        self._check_tile_size()
        shrinking = scale[0] * scale[1] > 1
        self._resampling = Resampling.average if shrinking else Resampling.bilinear
        self._stretch = self._compute_stretch()

    def _check_tile_size(self):
        """Refuse, before any allocation, a tile that cannot fit in memory or is mostly padding
        (each tile is read whole: ``--tile-size 100000`` would ask numpy for ~28 GiB)."""
        size = self.params.tile_size
        if size > MAX_TILE_PX:
            raise RasterError(f"tile size {size} px is too large: at most {MAX_TILE_PX} px "
                              "(each tile is read into memory whole)")
        larger = max(self.region[2] / self._scale[0], self.region[3] / self._scale[1])
        if size > max(PADDING_FREE_TILE_PX, TILE_OVER_RASTER * larger):
            raise RasterError(f"tile size {size} px is more than {TILE_OVER_RASTER}x the larger side of "
                              f"{self.path} ({larger:.0f} px to tile); choose a smaller --tile-size")

    def count_tiles(self) -> int:
        """How many tiles :meth:`plan` will make, without making them (a huge raster is checked
        for size before millions of Tile objects exist)."""
        return len(self.tiles())

    def _extent_window(self, extent) -> tuple[int, int, int, int]:
        minx, miny, maxx, maxy = extent
        inverse = ~self.transform
        corners = [_apply(inverse, x, y) for x, y in ((minx, miny), (minx, maxy), (maxx, miny), (maxx, maxy))]
        cols, rows = zip(*corners)
        eps = 1e-6  # an extent drawn exactly on pixel edges must not grab the neighbour pixel
        c0 = max(0, math.floor(min(cols) + eps))
        c1 = min(self.width, math.ceil(max(cols) - eps))
        r0 = max(0, math.floor(min(rows) + eps))
        r1 = min(self.height, math.ceil(max(rows) - eps))
        if c1 <= c0 or r1 <= r0:
            b = self._bounds_of(0, 0, self.width, self.height)
            raise RasterError(
                f"extent {tuple(extent)} does not overlap the raster {os.path.basename(self.path)} "
                f"(its bounds are {tuple(round(v, 6) for v in b)} in the raster CRS)"
            )
        return c0, r0, c1 - c0, r1 - r0

    def _choose_bands(self):
        ds, count = self._ds, self._ds.count
        interp = list(ds.colorinterp)
        self.alpha_bands = tuple(i + 1 for i, c in enumerate(interp) if c == ColorInterp.alpha)
        self._palette = None
        if self.params.bands is not None:
            bands = tuple(int(b) for b in self.params.bands)
            for b in bands:
                if not 1 <= b <= count:
                    raise RasterError(f"band {b} is out of range: {self.path} has {count} band(s) (1-based)")
            if len(bands) == 1:
                bands = bands * 3
            elif len(bands) != 3:
                raise RasterError(f"give 1 or 3 bands (1-based), got {list(bands)}")
            source = "user"
        elif all(c in interp for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
            bands = tuple(interp.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))
            source = "colorinterp"
        else:
            colour = [b for b in range(1, count + 1) if b not in self.alpha_bands] or [1]
            bands = tuple(colour[:3]) if len(colour) >= 3 else (colour[0],) * 3
            source = "default"
            if interp[bands[0] - 1] == ColorInterp.palette and ds.dtypes[bands[0] - 1] == "uint8":
                self._palette = _palette_lut(ds.colormap(bands[0]))
                bands = (bands[0],) * 3
                source = "palette"
        self.bands = bands
        self.band_source = source
        self._read_bands = sorted(set(bands))
        for b in self._read_bands:  # numpy would drop the imaginary part, warning once per read
            if ds.dtypes[b - 1].startswith("complex"):
                raise RasterError(f"band {b} of {self.path} is complex-valued ({ds.dtypes[b - 1]}, e.g. radar "
                                  "SLC): captioning needs real-valued imagery; convert it to amplitude first")
        self._channels = [self._read_bands.index(b) for b in bands]
        self._is_float = any(np.dtype(ds.dtypes[b - 1]).kind == "f" for b in self._read_bands)

    def _compute_stretch(self):
        p, ds = self.params, self._ds
        if self._palette is not None or all(ds.dtypes[b - 1] == "uint8" for b in self._read_bands):
            return identity(tuple(self._read_bands), p.percentiles)
        c0, r0, w, h = self.region
        sh, sw = sample_shape(h, w)
        shape = (len(self._read_bands), sh, sw)
        with self._env():
            sample = ds.read(self._read_bands, window=Window(c0, r0, w, h), out_shape=shape,
                             resampling=Resampling.nearest)
            valid = ds.read_masks(self._read_bands, window=Window(c0, r0, w, h), out_shape=shape,
                                  resampling=Resampling.nearest) > 0
        return percentile_stretch(sample, valid, tuple(self._read_bands), p.percentiles)

    @staticmethod
    def _env():
        return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)

    # -- public API ---------------------------------------------------------------------------------
    def tiles(self) -> TilePlan:
        """Every window as a lazy sequence (len, index, slice, iteration): what runs use."""
        c0, r0, w, h = self.region
        return TilePlan(self, _Axis(c0, w, self._src_size[0], self._stride[0]),
                        _Axis(r0, h, self._src_size[1], self._stride[1]))

    def plan(self) -> list[Tile]:
        """Every window as a list: for small rasters and tests; runs use :meth:`tiles`."""
        return list(self.tiles())

    def read(self, tile: Tile) -> TileImage | None:
        size = self.params.tile_size
        col_off, row_off, w, h = tile.window
        ow, oh = self._out_size(w, 0), self._out_size(h, 1)
        window = Window(col_off, row_off, w, h)
        n = len(self._read_bands)
        resample = (ow, oh) != (w, h)
        kwargs = {"out_shape": (n, oh, ow), "resampling": self._resampling} if resample else {}
        mask_kwargs = {"out_shape": (n, oh, ow), "resampling": Resampling.nearest} if resample else {}
        try:
            with self._env():
                data = self._ds.read(self._read_bands, window=window, **kwargs)
                valid = self._ds.read_masks(self._read_bands, window=window, **mask_kwargs) > 0
        except RasterioError as exc:  # truncated or damaged data: say where, with GDAL's own reason
            raise RasterError(f"cannot read tile {tile.tile_id} of {self.path} (pixel window col {col_off}, "
                              f"row {row_off}, {w} x {h}): {_root_cause(exc)}") from None
        if self._is_float:
            valid &= np.isfinite(data)
        valid = valid.any(axis=0)
        valid_fraction = float(valid.mean())
        if 1.0 - valid_fraction >= self.params.nodata_threshold:
            return None
        if self._palette is not None:
            rgb = self._palette[data[0]]
        else:
            rgb = np.moveaxis(self._stretch.apply(data)[self._channels], 0, -1)
        out = np.full((size, size, 3), FILL_VALUE, dtype=np.uint8)
        out[:oh, :ow] = np.where(valid[..., None], rgb, FILL_VALUE)
        return TileImage(out, valid_fraction)

    def describe(self) -> dict:
        tiles = self.tiles()
        return {
            "raster": worker_path(self.path),
            "width": self.width,
            "height": self.height,
            "georeferenced": self.georeferenced,
            "georef_source": self.georef_source,
            "crs_wkt": self.crs_wkt,
            "epsg": self.epsg,
            "transform": list(self.transform)[:6],
            "resolution": list(self.res),
            "params": self.params.to_dict(),
            "region_window": list(self.region),
            "source_tile_size": list(self._src_size),
            "source_stride": list(self._stride),
            "resampling": self._resampling.name if self.params.target_resolution else "none",
            "n_tiles": len(tiles),
            "n_rows": tiles.n_rows,
            "n_cols": tiles.n_cols,
            "bands": list(self.bands),
            "band_source": self.band_source,
            "alpha_bands": list(self.alpha_bands),
            "dtypes": [self._ds.dtypes[b - 1] for b in self._read_bands],
            "nodata": [_json_number(self._ds.nodatavals[b - 1]) for b in self._read_bands],
            "stretch": self._stretch.to_dict(),
            "fill_value": FILL_VALUE,
            "edge_policy": "last windows shifted inward to the edge; regions smaller than a tile read whole "
                           "and padded bottom/right with the fill value",
        }

    def close(self):
        self._ds.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _out_size(self, length: int, axis: int) -> int:
        size = self.params.tile_size
        if length == self._src_size[axis]:
            return size
        return max(1, min(size, round(length / self._scale[axis])))

    def _ring(self, col, row, w, h):
        # Counter-clockwise in north-up map coordinates: UL, LL, LR, UR, UL.
        corners = ((col, row), (col, row + h), (col + w, row + h), (col + w, row), (col, row))
        return [_apply(self.transform, c, r) for c, r in corners]

    def _bounds_of(self, col, row, w, h):
        ring = self._ring(col, row, w, h)
        xs, ys = [x for x, _ in ring], [y for _, y in ring]
        return min(xs), min(ys), max(xs), max(ys)


def _apply(t: Affine, x: float, y: float) -> tuple[float, float]:
    # Written out: affine's `*` is deprecated in favour of `@`, which older affine lacks.
    return float(t.a * x + t.b * y + t.c), float(t.d * x + t.e * y + t.f)


def _palette_lut(colormap: dict) -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)
    for index, rgba in colormap.items():
        if 0 <= index < 256:
            lut[index] = rgba[:3]
    return lut


def _json_number(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None if value is None else str(value)
    return value


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _root_cause(exc: BaseException) -> str:
    """GDAL's first reason in a chained rasterio error ("Read failed. See previous exception")."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return _one_line(exc)

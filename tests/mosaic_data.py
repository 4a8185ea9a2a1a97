"""Small rasters for the mosaic and Ray tests, written with rasterio in the test's folder: one
GeoTIFF, the same pixels cut into several GeoTIFFs, and a VRT that puts them back together."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

CRS = "EPSG:32633"
ORIGIN = (500000.0, 4600000.0)
PIXEL_M = 2.0


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """3 x H x W uint8 with structure at several scales (tiles differ from each other) and a nodata
    block at the top-left corner (some tiles are skipped)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    bands = []
    for k in range(3):
        fx, fy = rng.uniform(0.01, 0.08, size=2)
        base = 127 + 80 * np.sin(fx * xx + k) * np.cos(fy * yy - k)
        bands.append(base + rng.normal(0, 18, size=(height, width)))
    data = np.clip(np.stack(bands), 1, 255).astype(np.uint8)
    data[:, : height // 3, : width // 4] = 0  # nodata: at least the top-left 32 px tile
    return data


def _write(path: Path, data: np.ndarray, col_off: int = 0, row_off: int = 0) -> None:
    x0, y0 = ORIGIN
    transform = from_origin(x0 + col_off * PIXEL_M, y0 - row_off * PIXEL_M, PIXEL_M, PIXEL_M)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3,
                       dtype="uint8", crs=CRS, transform=transform, nodata=0) as dst:
        dst.write(data)


def write_geotiff(path: Path, width: int, height: int, seed: int = 0) -> Path:
    _write(path, scene(width, height, seed))
    return path


def write_mosaic(folder: Path, width: int, height: int, cols: int = 2, rows: int = 2, seed: int = 0) -> Path:
    """The scene of :func:`write_geotiff` as ``cols x rows`` GeoTIFF pieces of uneven size (cuts that
    do not fall on tile edges) plus ``mosaic.vrt`` over them, written by hand as GDAL's VRT XML."""
    folder.mkdir(parents=True, exist_ok=True)
    data = scene(width, height, seed)
    xcuts = [0] + [width * i // cols + 7 * i for i in range(1, cols)] + [width]
    ycuts = [0] + [height * i // rows + 5 * i for i in range(1, rows)] + [height]
    sources = []
    for r in range(rows):
        for c in range(cols):
            x0, x1, y0, y1 = xcuts[c], xcuts[c + 1], ycuts[r], ycuts[r + 1]
            piece = folder / f"piece_{r}_{c}.tif"
            _write(piece, data[:, y0:y1, x0:x1], x0, y0)
            sources.append((piece.name, x0, y0, x1 - x0, y1 - y0))
    gt = f"{ORIGIN[0]}, {PIXEL_M}, 0, {ORIGIN[1]}, 0, {-PIXEL_M}"
    srs = rasterio.crs.CRS.from_string(CRS).to_wkt()
    bands = []
    for b, interp in ((1, "Red"), (2, "Green"), (3, "Blue")):
        srcs = "".join(
            f'<ComplexSource><SourceFilename relativeToVRT="1">{name}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand>"
            f'<SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="Byte" BlockXSize="{w}" BlockYSize="1"/>'
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/><NODATA>0</NODATA></ComplexSource>'
            for name, x, y, w, h in sources)
        bands.append(f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>0</NoDataValue>'
                     f"<ColorInterp>{interp}</ColorInterp>{srcs}</VRTRasterBand>")
    vrt = folder / "mosaic.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
                   f"<SRS>{_xml_escape(srs)}</SRS><GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>")
    return vrt


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def stored(path) -> dict:
    """tile_id -> (row, col, window, caption, confidence, valid_fraction, embedding) of a GeoPackage."""
    from rscaption.store.gpkg import TileStore

    with TileStore.open(str(path)) as store:
        ids, emb = store.embeddings()
        vectors = dict(zip(ids.tolist(), emb))
        return {t["tile_id"]: (t["row"], t["col"], tuple(t["window"]), t["caption"], t["confidence"],
                               t["valid_fraction"], vectors[t["tile_id"]]) for t in store.tiles()}


def assert_same_tiles(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Same tiles, windows, captions; confidences and embeddings equal within float tolerance."""
    assert sorted(a) == sorted(b)
    for tid in a:
        ra, rb = a[tid], b[tid]
        assert ra[:4] == rb[:4], f"tile {tid}: {ra[:4]} != {rb[:4]}"
        assert abs(ra[4] - rb[4]) <= 1e-4 and abs(ra[5] - rb[5]) <= 1e-9, f"tile {tid}"
        np.testing.assert_allclose(ra[6], rb[6], atol=atol)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

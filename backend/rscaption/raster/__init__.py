"""raster/: a raster becomes tiles: windows, reads, stretch, ground m/px, tile size.

Modules:

- ``tiling.py``: plan tile windows over a raster (size, overlap, extent, resampling), windowed
  reads, band selection, nodata/alpha masks, stretch to uint8
- ``stretch.py``: per-band percentile stretch computed once per raster from an overview/decimated
  read
- ``ground.py``: ground resolution in metres per pixel (projected: CRS unit factor; geographic:
  ellipsoid radii at the raster centre; no CRS: None); its maths imports only ``math``, so the
  plugin uses it too
- ``input_check.py``: warnings before a run: one floating-point band (not imagery), ground
  resolution far from the model card's, tiles upsampled from a few source pixels, GCP placement
- ``georef.py``: where tiles lie: the geotransform, else an affine fit to the raster's GCPs (in
  their CRS), else pixel coordinates; one line for the user when it is not a plain geotransform
- ``tile_size.py``: ``--tile-size auto``: tile pixels from metres per pixel and the model card
  (``tile_size_by_resolution`` anchors, else constant footprint), and the one-line footprint
  sentence; pure Python
- ``paths.py``: GDAL virtual paths (``/vsicurl/``, ``/vsis3/``, ``/vsizip/`` ...) as rasters:
  existence checks that let them through, their resume fingerprint from GDAL window checksums,
  the absolute form a file records (an archive's relative path made absolute)
- ``watch.py``: ``RasterWatch``: a cheap stamp of the raster's local file, compared before each
  batch is committed, so a raster overwritten during a run stops it

Contract (tiling)::

    TilingParams(tile_size=256, overlap=0, bands=None, extent=None, target_resolution=None,
                 nodata_threshold=0.95, percentiles=(2.0, 98.0))
    tiler = RasterTiler(path, params)      # raises RasterError (one clear line) on bad input
    tiler.crs_wkt, tiler.epsg              # epsg may be None
    tiler.tiles() -> TilePlan              # every window, row-major, deterministic tile_id, made
                                           #   from its index (len, [i], [a:b], iter, index_of(window))
    tiler.plan() -> list[Tile]             # the same as a list (small rasters, tests)
    tiler.upsample, tiler.source_px        # tile side / source window side; source pixels per tile
    tiler.read(tile) -> TileImage | None   # HxWx3 uint8 (tile_size x tile_size), None if skipped as nodata
    tiler.describe() -> dict               # tiling + stretch parameters for the metadata table
    Tile(tile_id, row, col, window=(col_off, row_off, width, height), polygon=[(x, y) * 5], bounds)
    TileImage(array, valid_fraction)

Edge policy: the last row/column of windows is shifted inward so it ends on the raster (or extent)
edge; a raster smaller than one tile is read whole and padded with the fill value. No content is
dropped.

Contract (tile size)::

    ground_resolution(path, target_resolution=None) -> GroundResolution(x_m, y_m).m_per_px | None
    choose_tile_size(card, m_per_px, requested=None|"auto"|N) -> TileChoice(tile_px, m_per_px, auto)
    tile_choice_for(cap, raster_path, requested, target_resolution)   # pipeline: what CLI, worker and plugin call
    caption_raster(..., tiling=None)      # auto; worker request / CaptionJob: tile_size None = auto; Processing: 0
"""

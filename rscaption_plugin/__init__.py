"""rscaption QGIS plugin: caption raster tiles with an image-captioning model and search them by text.

Only the plugin class is imported here; everything heavy (torch, the model, rasterio) is loaded
inside background tasks or in a separate backend process.

Modules:

- ``plugin.py``: the object QGIS creates: actions, menu, toolbar, dock, Processing provider
- ``processing_provider.py``: ``rscaption:caption`` and ``rscaption:search`` Processing algorithms
  (and ``rscaption:change``, from ``core/change_algorithm.py``)
"""


def classFactory(iface):  # noqa: N802  (QGIS's name)
    from .plugin import RscaptionPlugin

    return RscaptionPlugin(iface)

"""rscaption: caption remote-sensing imagery tile by tile and search it by text."""

__version__ = "0.1.0"

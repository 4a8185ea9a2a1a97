"""bench/: ``make bench``: decoding, tiling memory, tiles/s, roofline, search, GPU.

Modules:

- ``synthetic_store.py``: synthetic GeoPackages of any size with the real schema (numpy-built
  geometry, bulk inserts, R-tree filled) for the search benchmark and tests
- ``search.py``: ``make bench`` search section: warm/cold latency, peak memory, load times at 10^4,
  10^5, 10^6 tiles (files cached in ``out/bench_cache``)
- ``run.py``: ``make bench``: KV-cache vs ClipCap-loop decoding, tiling peak-memory ratio, pipeline
  tiles/s
- ``roofline.py``: ``make bench``, one machine: matmul peak, FLOPs per tile, stage split, local
  engine vs the earlier loop on a 4096 x 4096 GeoTIFF (docs/performance.md)
- ``gpu.py``: ``make bench`` on a CUDA device: the default model in fp32/fp16/bf16 at batch 8-256
  (model only and end to end, GPU utilisation from nvidia-smi) and the reference ClipCap
  architecture (ViT-B/32 + GPT-2 small, random weights) per image; skipped without CUDA
- ``change.py``: ``make bench`` change section: ``rscaption change`` tiles/s on the NAIP 2009/2020
  pair, end to end and scoring alone (docs/change.md)
- ``__main__.py``: ``python -m rscaption.bench`` runs ``run.py``
- ``sections.py``: How `make bench` runs its sections: each one's figures are printed (and the JSON
  report saved) the moment it ends, a section the CPU cannot run is skipped with its reason in one
  line, and a section that fails records its error and the bench goes on.
"""

"""rscaption: caption remote-sensing imagery tile by tile and search it by text.

Modules:

- ``device.py``: CUDA, then MPS, then CPU; half precision on GPU; the compute dtype on a CPU
  (``precision``: auto = bf16 where the CPU has AMX-BF16, fp32 elsewhere)
- ``protocol.py``, ``worker.py``: NDJSON subprocess protocol and ``rscaption serve``
- ``cli.py``: ``rscaption caption/search/info/train/evaluate/serve``; user errors are one line,
  exit 2
- ``demo.py``: ``make demo``: caption a real GeoTIFF with the default model, then search it
- ``errors.py``: errors a user can cause (one line in the CLI, no traceback); anyone may import it,
  with ``device.py``
- ``bench_gpu.py``: ``python -m rscaption.bench_gpu``, the former name of ``python -m
  rscaption.bench.gpu``
"""

__version__ = "0.1.0"

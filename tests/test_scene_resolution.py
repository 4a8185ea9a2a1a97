"""Resolution is part of the model: the shipped default does not claim a scene on tiles far coarser
than any training image of it (``SceneHead.unseen_at``). Real default model, real 5 m NAIP raster,
real GeoPackage."""

from __future__ import annotations

from rscaption.store.gpkg import TileStore
from rscaption.models.registry import load_model
from rscaption.engine.pipeline import caption_raster


def test_the_default_names_no_golf_course_on_5m_naip_fields(tmp_path, geotiff):
    raster = geotiff("m_4709963_se_14_1_20090818.tif")
    cap = load_model("default", device="cpu")
    limits = dict(zip(cap.scene.phrases, cap.scene.class_max_ground_m))
    assert limits["golf course"] == 0.3  # known only from UC Merced's 0.3 m images
    out = tmp_path / "naip.gpkg"
    summary = caption_raster(str(raster), str(out), model=cap, confirm_large=True)
    with TileStore.open(str(out)) as store:
        captions = [t["caption"] for t in store.tiles()]
        _, emb = store.embeddings()
    assert summary.written == len(captions) == 108
    assert not [c for c in captions if "golf" in c]
    # the rule does the work: the same embeddings captioned without a ground resolution name golf courses
    unaware = [c for c, _ in cap.caption(emb, beam_size=3)]
    assert sum("golf" in c for c in unaware) >= 10
    # most tiles get the beam's next plausible caption (meadow, grassland, farmland, water), not "uncertain"
    uncertain = [c for c in captions if c.startswith("an aerial scene of uncertain type")]
    assert len(uncertain) <= 0.25 * len(captions) and not [c for c in uncertain if "golf" in c]

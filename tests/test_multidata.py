"""Multi-dataset training data: the shared scene vocabulary, the written class-caption sets,
caption / scene-index / image-folder sets, weighted epochs, and coarser-resolution views."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_shared
from rscaption.errors import TrainError
from rscaption.training.contrastive import scene_loss
from rscaption.training.features import coarsen, make_view, scale_factor
from rscaption.training.multidata import load_multiset
from rscaption.data.scene_vocab import SceneVocab


@pytest.fixture(scope="module")
def vocab():
    return SceneVocab.load()


def test_vocabulary_maps_synonyms_to_one_class(vocab):
    parking = vocab.names.index("parking")
    assert vocab.positives("ucm", "parkinglot") == [parking]
    assert vocab.positives("rsicd", "parking") == [parking]
    assert vocab.positives("rsscn7", "Parking") == [parking]
    res = {vocab.names.index(n) for n in ("dense_residential", "medium_residential", "sparse_residential")}
    assert set(vocab.positives("eurosat", "Residential")) == res
    assert set(vocab.positives("rsscn7", "Resident")) == res
    assert vocab.positives("rsicd", "denseresidential") == [vocab.names.index("dense_residential")]
    # a user's folder named after a class or its phrase needs no table
    assert vocab.positives("my_folder", "golf course") == [vocab.names.index("golf_course")]
    assert vocab.positives("my_folder", "Forest") == [vocab.names.index("forest")]
    with pytest.raises(TrainError, match="'volcano' of dataset 'my_folder' is not in the scene vocabulary"):
        vocab.positives("my_folder", "volcano")


def test_every_label_of_the_shipped_datasets_is_mapped(vocab):
    index = json.loads(require_shared("scenes", "index.json").read_text())
    for name in ("eurosat", "rsscn7"):
        for c in index[name]["classes"]:
            assert vocab.positives(name, c)
    rsicd = json.loads(require_shared("rsicd", "dataset.json").read_text())
    for c in {im["class"] for im in rsicd["images"]}:
        assert vocab.positives("rsicd", c)


def test_class_caption_sets_say_only_what_the_label_supports(vocab):
    index = json.loads(require_shared("scenes", "index.json").read_text())
    for name in ("eurosat", "rsscn7"):
        for c in index[name]["classes"]:
            caps = vocab.class_captions(name, c)
            assert len(caps) >= 5 and len(set(caps)) == len(caps), (name, c)
            for t in caps:
                assert t == t.lower() and t.endswith(".") and not t.endswith(" ."), t
                assert not re.search(r"\d", t), f"no counts in class captions: {t}"
    # a class-only set without written captions gets generic ones from the class phrase
    assert vocab.class_captions("my_folder", "airport") == [
        "it is an airport.", "this is an airport.", "there is an airport.", "an aerial image of an airport."]


def _write_sets(tmp):
    """A Karpathy file with a class field, a scene index and a class-folder set, all tiny."""
    rng = np.random.default_rng(0)

    def img(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)

    images = []
    for i, (cls, split) in enumerate([("farmland", "train"), ("farmland", "train"), ("pond", "train"),
                                      ("pond", "val")]):
        img(tmp / "cap" / "imgs" / f"{i:05d}.png")
        images.append({"filename": f"{i:05d}.png", "split": split, "class": cls,
                       "sentences": [{"raw": f"a {cls} here ."}]})
    (tmp / "cap" / "dataset.json").write_text(json.dumps({"dataset": "RSICD", "images": images}))
    scenes = []
    for i, (cls, split) in enumerate([("Forest", "train"), ("Forest", "train"), ("Residential", "train"),
                                      ("Residential", "val")]):
        img(tmp / "sc" / "eurosat" / cls / f"{i}.png")
        scenes.append({"path": f"eurosat/{cls}/{i}.png", "class": cls, "split": split})
    (tmp / "sc" / "index.json").write_text(json.dumps({"eurosat": {"classes": ["Forest", "Residential"],
                                                                    "images": scenes}}))
    for split, cls, n in (("train", "forest", 3), ("train", "parking lot", 1), ("val", "forest", 1)):
        for k in range(n):
            img(tmp / "fold" / split / cls / f"{k}.png")
    return {"sets": [
        {"name": "rsicd", "path": str(tmp / "cap" / "dataset.json"), "weight": 1.0, "views": [0, 22]},
        {"name": "eurosat", "kind": "scenes", "path": str(tmp / "sc" / "index.json"), "subset": "eurosat",
         "weight": 0.5, "ground_m": 10, "tile_px": 64},
        {"name": "mine", "kind": "folder", "path": str(tmp / "fold"), "weight": 2.0, "views": [0, 1]},
    ]}


def test_three_kinds_of_sets_load_as_one(tmp_path, vocab):
    ms = load_multiset(_write_sets(tmp_path), str, [0], vocab)
    assert [len(s.train) for s in ms.sets] == [3, 3, 4] and [len(s.val) for s in ms.sets] == [1, 1, 1]
    # samples: every train image once per view of its set, in set, view, image order
    assert len(ms.train) == 3 * 2 + 3 * 1 + 4 * 2
    assert list(ms.train.sample_view[:6]) == [0, 0, 0, 22, 22, 22]
    # class-only sets get the written caption sets; folder classes map by name
    forest = ms.sets[1].train[0]
    assert forest.captions == vocab.class_captions("eurosat", "Forest")
    assert ms.sets[2].class_names == ["forest", "parking lot"]
    pos, allowed = ms.scene_targets("train")
    k = vocab.names.index
    assert pos[0, k("farmland")] and pos[2, k("lake")] and pos.sum(1).min() >= 1
    # each image's softmax runs over its own set's classes only
    assert allowed[0].sum() == 2 and allowed[3].sum() == len(ms.sets[1].label_space) == 4
    assert not allowed[0, k("forest")]
    # an epoch draws round(weight * images) per set
    order = ms.epoch_order(np.random.default_rng(0))
    sets = ms.train.sample_set[order]
    assert [int((sets == i).sum()) for i in range(3)] == [3, 2, 8]
    assert len(set(order[sets == 2].tolist())) == 8, "no repeats before every sample was drawn once"
    # a stage may draw with other weights (the mapping's mapping.set_weights), by set name
    names = [s.spec.name for s in ms.sets]
    order = ms.epoch_order(np.random.default_rng(0), weights={names[0]: 3.0, names[2]: 0.5})
    assert [int((ms.train.sample_set[order] == i).sum()) for i in range(3)] == [9, 2, 2]
    with pytest.raises(TrainError, match="set weights name unknown sets: nope"):
        ms.epoch_order(np.random.default_rng(0), weights={"nope": 1.0})
    assert ms.footprints()[1] == {"dataset": "eurosat", "train_images": 3, "ground_m_per_px": 10.0,
                                  "tile_px": 64, "footprint_m": 640.0}


def test_bad_set_configs_fail_with_one_line(tmp_path, vocab):
    with pytest.raises(TrainError, match="kind must be captions, scenes or folder"):
        load_multiset({"sets": [{"path": "x", "kind": "tiles"}]}, str, [0], vocab)
    with pytest.raises(TrainError, match="weight must be > 0"):
        load_multiset({"sets": [{"path": "x", "weight": 0}]}, str, [0], vocab)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="has no class sub-folders"):
        load_multiset({"sets": [{"path": str(tmp_path / "empty"), "kind": "folder"}]}, str, [0], vocab)


def test_shipped_recipe_sets_load(vocab):
    from rscaption.training.plan import build_plan
    from rscaption.training.runner import load_config, resolve_path

    require_shared("rsicd", "dataset.json")
    cfg = load_config(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    plan = build_plan(cfg, lambda p: resolve_path(p, cfg))
    assert [s.spec.name for s in plan.sets] == ["ucm", "rsicd", "eurosat", "rsscn7"]
    assert [len(s.train) for s in plan.sets] == [1680, 8733, 9000, 1820]
    assert [len(s.val) for s in plan.sets] == [210, 1094, 1000, 280]
    assert all(r.split == "train" for r in plan.train.records), "val images never train"


def test_coarser_views_remove_detail_but_keep_size_and_layout():
    y, x = np.mgrid[0:64, 0:64]
    checker = (((x + y) % 2) * 255).astype(np.uint8)
    img = np.stack([checker] * 3, -1)
    assert scale_factor(22) == 2.0 and scale_factor(24) == 4.0 and abs(scale_factor(23) - 2 ** 1.5) < 1e-9
    out = coarsen(img, 2.0)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert img.std() > 120 and out.std() < 10, "a 1-pixel pattern is gone 2x coarser"
    # large structures survive: left half dark, right half bright
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, 32:] = 200
    c = coarsen(halves, 4.0)
    assert c[:, :24].mean() < 10 and c[:, 40:].mean() > 190
    # the view is a fixed function of (view, file name), with a seeded dihedral transform
    a = make_view(halves, 24, "/x/a.png")
    assert np.array_equal(a, make_view(halves, 24, "/y/a.png"))
    assert any(not np.array_equal(make_view(halves, 24, f"{k}.png"), a) for k in range(20))


def test_scene_loss_counts_every_right_class_and_ignores_other_sets_classes():
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0]])
    allowed = torch.tensor([[True, True, True, False]])
    one = torch.tensor([[True, False, False, False]])
    # one right class among the allowed ones = cross-entropy over the allowed logits
    ref = torch.nn.functional.cross_entropy(logits[:, :3], torch.tensor([0]))
    assert torch.allclose(scene_loss(logits, (one, allowed), 0.0), ref)
    # two right classes: -log of their summed probability (lower than either alone)
    two = torch.tensor([[True, True, False, False]])
    p = logits[:, :3].softmax(-1)
    assert torch.allclose(scene_loss(logits, (two, allowed), 0.0), -torch.log(p[0, 0] + p[0, 1]))
    # a class outside the set gets no gradient: the other set's "meadow" is not pushed down
    lg = logits.clone().requires_grad_(True)
    scene_loss(lg, (one, allowed), 0.1).backward()
    assert lg.grad[0, 3] == 0 and lg.grad[0, 0] < 0
    # plain class indices still work (the CLIP trainer's path)
    assert torch.allclose(scene_loss(logits, torch.tensor([3]), 0.0),
                          torch.nn.functional.cross_entropy(logits, torch.tensor([3])))


def test_scene_grouped_batches_hold_runs_of_one_scene_and_keep_every_draw():
    from rscaption.training.contrastive import grouped_order

    rng = np.random.default_rng(0)
    keys = np.array([i % 5 for i in range(300)] + [-1] * 100)  # 5 scenes of 60 samples, 100 ungrouped
    order = rng.permutation(400)
    out = grouped_order(order, keys, per_group=8, batch_size=32, rng=np.random.default_rng(1))
    assert len(out) == len(order) and sorted(out) == sorted(order)
    batches = [out[i:i + 32] for i in range(0, len(out), 32)]
    grouped = [b for b in batches if all(len(set(keys[b[j:j + 8]])) == 1 and keys[b[j]] >= 0
                                         for j in range(0, len(b), 8))]
    # 5 scenes x 7 full runs of 8 = 35 runs -> 8 batches of 4 runs; the rest is random batches
    assert len(grouped) == 8
    for b in grouped:
        assert len(set(keys[b])) <= 4  # a grouped batch spans at most 4 scenes: in-scene negatives
    ungrouped = np.concatenate([b for b in batches if not any(b is g for g in grouped)])
    assert set(np.flatnonzero(keys < 0)) <= set(ungrouped)
    # no grouping asked (or a run size that does not divide the batch): the order is untouched
    assert np.array_equal(grouped_order(order, keys, 1, 32, rng), order)
    assert np.array_equal(grouped_order(order, keys, 7, 32, rng), order)


def test_coarser_views_of_fine_detail_scenes_are_never_drawn(tmp_path, vocab):
    """A blurred golf course is a smooth green patch: its coarser views must not teach the model
    that every 5 m field is a golf course (scene_vocab.yaml ``coarse_views: false``)."""
    rng = np.random.default_rng(0)
    for cls, n in (("golf course", 2), ("farmland", 1), ("meadow", 1)):
        for k in range(n):
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "train" / cls / f"{k}.png")
    ms = load_multiset({"sets": [{"name": "mine", "kind": "folder", "path": str(tmp_path), "weight": 3.0,
                                  "views": [0, 1, 23, 26]}]}, str, [0], vocab)
    assert vocab.fine_detail == {vocab.names.index("golf_course")}
    pos, _ = ms.scene_targets("train")
    golf = pos[:, vocab.names.index("golf_course")]
    assert golf.sum() == 2
    coarse_golf = golf[ms.train.sample_record] & (ms.train.sample_view >= 20)
    assert coarse_golf.sum() == 4 and not ms.drawable[coarse_golf].any() and ms.drawable[~coarse_golf].all()
    for seed in range(5):
        order = ms.epoch_order(np.random.default_rng(seed))
        assert len(order) == 12 and not coarse_golf[order].any()
        # golf course images still come in their fine views
        assert golf[ms.train.sample_record[order]].any()


def test_scene_grouping_config_keys_only_the_named_sets(tmp_path, vocab):
    from rscaption.training.lit_stages import epoch_order, scene_keys

    ms = load_multiset(_write_sets(tmp_path), str, [0], vocab)
    pos, _ = ms.scene_targets("train")
    keys = scene_keys(ms, pos, ["rsicd"])
    in_rsicd = ms.train.sample_set == 0
    assert (keys[~in_rsicd] == -1).all() and (keys[in_rsicd] >= 0).all()
    # the two farmland images share a key in both views, the pond image has its own
    assert len(set(keys[in_rsicd].tolist())) == 2
    assert epoch_order(ms, pos, {}) == ms.epoch_order
    grouped = epoch_order(ms, pos, {"group_by_scene": {"sets": ["rsicd"], "per_scene": 2}, "batch_size": 4})
    order = grouped(np.random.default_rng(0))
    assert sorted(order) == sorted(ms.epoch_order(np.random.default_rng(0)))
    with pytest.raises(TrainError, match="unknown sets: nope"):
        epoch_order(ms, pos, {"group_by_scene": {"sets": ["nope"], "per_scene": 2}})


def test_class_ground_limits_are_the_coarsest_drawable_training_view(tmp_path, vocab):
    """Golf courses only at 0.3 m (their coarser views are never drawn), farmland up to 8 x 0.3 m;
    a class that a set without a stated resolution also has is never limited."""
    from rscaption.training.calibrate_stage import class_ground_limits

    rng = np.random.default_rng(0)
    for root, cls in (("a", "golf course"), ("a", "farmland"), ("b", "meadow"), ("a", "meadow")):
        (tmp_path / root / "train" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / root / "train" / cls / "0.png")
    ms = load_multiset({"sets": [
        {"name": "fine", "kind": "folder", "path": str(tmp_path / "a"), "views": [0, 1, 23, 26], "ground_m": 0.3},
        {"name": "unknown", "kind": "folder", "path": str(tmp_path / "b"), "views": [0]}]}, str, [0], vocab)
    limits = dict(zip(vocab.names, class_ground_limits(ms)))
    assert limits["golf_course"] == pytest.approx(0.3)
    assert limits["farmland"] == pytest.approx(0.3 * 8)   # view 26: 2 ** 3 coarser
    assert limits["meadow"] is None                       # also in the set without a resolution
    assert limits["airport"] is None                      # no training image: nothing to judge by

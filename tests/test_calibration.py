"""Confidence calibration: the maths (AUROC, ECE, temperature and logistic fits, k-means) and the
scene head that ships in a checkpoint (save, load, calibrated confidence, honest captions)."""

import numpy as np
import pytest

from rscaption.evaluation.calibration import (auroc, ece, fit_logistic, fit_temperature, reliability,
                                              sigmoid, softmax)
from rscaption.evaluation.scene_eval import split_halves
from rscaption.models.scene import UNSURE_TEMPLATE, SceneHead
from rscaption.training.calibrate_stage import kmeans


def test_auroc_is_the_probability_a_right_case_outranks_a_wrong_one():
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5
    # one wrong case above one of two right ones: 3 of 4 pairs ordered right
    assert auroc([0.9, 0.5, 0.7, 0.1], [1, 1, 0, 0]) == 0.75
    assert np.isnan(auroc([0.3, 0.4], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.random(500), rng.random(500) < 0.5
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert abs(auroc(s, y) - brute) < 1e-12


def test_ece_is_zero_for_calibrated_and_large_for_overconfident():
    rng = np.random.default_rng(1)
    conf = rng.random(200000)
    right = rng.random(200000) < conf
    assert ece(conf, right) < 0.01
    assert abs(ece(np.full(1000, 0.9), np.arange(1000) < 500) - 0.4) < 1e-9
    bins = reliability(np.full(10, 0.95), np.ones(10))
    assert bins == [{"bin": [0.9, 1.0], "n": 10, "confidence": 0.95, "accuracy": 1.0}]


def test_logistic_fit_recovers_the_generating_weights():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 2))
    y = rng.random(20000) < sigmoid(x @ np.array([2.0, -1.0]) + 0.5)
    w, b = fit_logistic(x, y, l2=0.0)
    assert np.allclose(w, [2.0, -1.0], atol=0.1) and abs(b - 0.5) < 0.1
    # the fitted probabilities are calibrated on fresh data from the same source
    x2 = rng.normal(size=(20000, 2))
    y2 = rng.random(20000) < sigmoid(x2 @ np.array([2.0, -1.0]) + 0.5)
    assert ece(sigmoid(x2 @ w + b), y2) < 0.02


def test_temperature_fit_undoes_overconfident_logits():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5000, 6)) * 2
    labels = np.array([rng.choice(6, p=p) for p in softmax(logits)])
    pos = np.eye(6, dtype=bool)[labels]
    t = fit_temperature(logits * 3, pos)  # the same posterior made 3x too sharp
    assert 2.6 < t < 3.4


def test_kmeans_finds_separated_directions_and_halves_are_per_set():
    rng = np.random.default_rng(4)
    centres = np.eye(8)[:3]
    x = np.concatenate([c + 0.05 * rng.normal(size=(200, 8)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = kmeans(x, 3, rng)
    assert sorted((c @ centres.T).argmax(1).tolist()) == [0, 1, 2]
    assert ((c @ centres.T).max(1) > 0.99).all()
    sets = np.array([0] * 10 + [1] * 7)
    calib = split_halves(sets, 0)
    assert calib[:10].sum() == 5 and calib[10:].sum() == 3
    assert np.array_equal(calib, split_halves(sets, 0))


def _head(low=0.0):
    prompts = np.eye(4, 8, dtype=np.float32)
    protos = np.eye(4, 8, dtype=np.float32)
    return SceneHead(phrases=["forest", "river", "farmland", "beach"], prompts=prompts, prototypes=protos,
                     scale=20.0, temperature=2.0, weights=[0.8, 1.0, 4.0, 0.5], bias=-3.0, low_threshold=low)


def test_scene_head_confidence_falls_far_from_the_training_data(tmp_path):
    head = _head(low=0.3)
    near = np.zeros((1, 8), np.float32)
    near[0, 0] = 1.0                       # exactly a training prototype and a class prompt
    far = np.zeros((1, 8), np.float32)
    far[0, 6] = 1.0                        # orthogonal to everything the model knows
    emb = np.concatenate([near, far])
    conf = head.confidence(emb, [0.9, 0.9])
    assert conf[0] > 0.8 and conf[1] < 0.1
    out = head.apply(emb, [("lots of trees in a forest.", 0.9), ("a golf course.", 0.9)])
    assert out[0][0] == "lots of trees in a forest."
    assert out[1][0].startswith("an aerial scene of uncertain type, most like")
    assert out[1][1] == pytest.approx(conf[1])
    # non-English captions keep their text; only the confidence changes
    assert head.apply(emb, [("森林", 0.9), ("高尔夫", 0.9)], rewrite=False)[1][0] == "高尔夫"
    assert UNSURE_TEMPLATE.count("{}") == 2

    cfg = head.save(tmp_path)
    assert (tmp_path / "scene.safetensors").exists()
    back = SceneHead.load(cfg, tmp_path)
    assert back.phrases == head.phrases and back.low_threshold == 0.3
    assert np.allclose(back.confidence(emb, [0.9, 0.9]), conf, atol=1e-6)


def test_a_caption_naming_a_scene_the_image_doubts_gets_a_lower_confidence(tmp_path):
    from rscaption.models.scene import FEATURES

    head = _head()
    head.feature_names = FEATURES[:5]
    head.weights = [0.0, 0.0, 0.0, 0.0, 2.0]
    head.bias = 2.0
    emb = np.zeros((2, 8), np.float32)
    emb[:, 0] = 1.0                               # both images look like "forest"
    says_forest = np.eye(8, dtype=np.float32)[[0, 0]]
    says_beach = np.eye(8, dtype=np.float32)[[3, 3]]
    assert list(head.caption_scenes(says_beach)) == [3, 3]
    right = head.confidence(emb, [0.9, 0.9], says_forest)
    wrong = head.confidence(emb, [0.9, 0.9], says_beach)
    assert (right > 0.8).all() and (wrong < 0.2).all()
    # without caption text (a language the text tower cannot read) the top scene is assumed
    assert np.allclose(head.confidence(emb, [0.9, 0.9]), right)
    back = SceneHead.load(head.save(tmp_path), tmp_path)
    assert back.feature_names == FEATURES[:5] and np.allclose(back.confidence(emb, [0.9, 0.9], says_beach), wrong)
    assert back.class_prototypes is None  # heads saved before the labelled prototypes load as they were


def test_labelled_prototypes_place_an_image_among_each_scenes_training_images(tmp_path):
    from rscaption.models.scene import FEATURES
    from rscaption.training.calibrate_stage import class_prototypes

    rng = np.random.default_rng(0)
    # class 0 ("forest") has two kinds of training image (directions 0 and 4), class 1 one (direction 1)
    x = np.concatenate([np.eye(8)[[0]] + 0.03 * rng.normal(size=(100, 8)),
                        np.eye(8)[[4]] + 0.03 * rng.normal(size=(100, 8)),
                        np.eye(8)[[1]] + 0.03 * rng.normal(size=(100, 8))]).astype(np.float32)
    pos = np.zeros((300, 4), bool)
    pos[:200, 0] = pos[200:, 1] = True
    centres, owner = class_prototypes(x, pos, per_class=2, rng=rng)
    assert sorted(owner.tolist()) == [0, 0, 1, 1]  # classes 2 and 3 have no training images: none
    head = _head()
    head.class_prototypes, head.class_owner = centres, owner
    head.feature_names = FEATURES
    head.weights = [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    head.bias = 2.0
    img = np.eye(8, dtype=np.float32)[[4]]  # like the second kind of forest, unlike forest's prompt
    q = head.prototype_posterior(img)
    assert q[0, 0] > 0.99 and q[0, 2] == 0.0 and q[0, 3] == 0.0
    says_forest, says_river = np.eye(8, dtype=np.float32)[[0]], np.eye(8, dtype=np.float32)[[1]]
    assert head.confidence(img, [0.9], says_forest)[0] > 0.8
    assert head.confidence(img, [0.9], says_river)[0] < 0.2
    back = SceneHead.load(head.save(tmp_path), tmp_path)
    assert back.feature_names == FEATURES and np.array_equal(back.class_owner, owner)
    assert np.allclose(back.confidence(img, [0.9], says_river), head.confidence(img, [0.9], says_river), atol=1e-3)


def test_cross_fitting_scores_every_image_with_the_model_of_the_other_half():
    from rscaption.evaluation.calibration import sigmoid
    from rscaption.training.calibrate_stage import cross_fitted

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(400, 2))
    correct = rng.random(400) < sigmoid(2.0 * feats[:, 0] - 0.5)
    calib = split_halves(np.zeros(400, int), 0)
    conf = cross_fitted(feats, correct, calib, l2=1e-2)
    for fit in (calib, ~calib):
        w, b = fit_logistic(feats[fit], correct[fit], l2=1e-2)
        assert np.allclose(conf[~fit], sigmoid(feats[~fit] @ w + b))
    assert auroc(conf, correct) > 0.75 and ece(conf, correct) < 0.1


def test_a_scene_never_seen_that_coarse_is_not_claimed(tmp_path):
    """"beach" was only seen at 0.3 m: on a 5 m tile the caption falls back to the beam's next
    hypothesis naming a plausible scene, else to an honest uncertain caption without it."""
    head = _head(low=0.3)
    head.feature_names = ("top_logit", "margin", "prototype_sim", "lm_logprob", "caption_scene_logprob")
    head.weights, head.bias = [0.0, 0.0, 0.0, 0.0, 2.0], 2.0
    head.class_max_ground_m = [None, 2.4, None, 0.3]  # forest, river, farmland, beach
    emb = np.zeros((2, 8), np.float32)
    emb[:, 3] = 1.0                                    # both images look like beach
    emb[:, 0] = 0.9                                    # ... and a little like forest
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    text = {"a sandy beach.": 3, "a wide beach.": 3, "some forest.": 0}
    embed = lambda texts: np.eye(8, dtype=np.float32)[[text[t] for t in texts]]  # noqa: E731
    caps = [("a sandy beach.", 0.9), ("a sandy beach.", 0.9)]
    alts = [[("a wide beach.", 0.8), ("some forest.", 0.7)], [("a wide beach.", 0.8)]]
    assert list(head.unseen_at(5.0)) == [False, False, False, True]
    assert not head.unseen_at(1.0).any() and not head.unseen_at(None).any()
    at_5m = head.apply(emb, caps, text_emb=embed([c for c, _ in caps]), ground_m=5.0, alternatives=alts, embed=embed)
    assert at_5m[0][0] == "some forest."               # the first plausible hypothesis
    assert at_5m[0][1] == pytest.approx(head.confidence(emb[:1], [0.7], embed(["some forest."]))[0])
    assert at_5m[1][0].startswith("an aerial scene of uncertain type") and "beach" not in at_5m[1][0]
    assert at_5m[1][1] <= 0.3
    # the same tiles at 0.3 m, or of unknown resolution, keep their caption
    for ground in (0.3, None):
        kept = head.apply(emb, caps, text_emb=embed([c for c, _ in caps]), ground_m=ground, alternatives=alts,
                          embed=embed)
        assert [c for c, _ in kept] == ["a sandy beach.", "a sandy beach."]
    back = SceneHead.load(head.save(tmp_path), tmp_path)
    assert back.class_max_ground_m == head.class_max_ground_m and back.coarser_tolerance == 4.0

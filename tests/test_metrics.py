"""Scorers against values computed by hand on a few sentences."""

import math

import numpy as np
import pytest

from rscaption.evaluation.metrics import (
    classification_accuracy, java_available, python_tokenize, retrieval_recall, score_captions,
)

pytest.importorskip("pycocoevalcap")


def test_python_tokenizer_matches_ptb_rules():
    assert python_tokenize("There is a piece of Farmland .") == "there is a piece of farmland"
    assert python_tokenize("Cars, trucks; and (boats)!") == "cars trucks and boats"


@pytest.mark.parametrize("use_java", [False, True])
def test_bleu1_by_hand_and_identity(use_java):
    if use_java and not java_available():
        pytest.skip("java not installed: PTB tokenizer and METEOR need it")
    # candidate 6 words; clipped unigram matches: the x2, cat, on, mat = 5 -> BLEU-1 = 5/6, BP = 1
    cands = {"a": "the cat sat on the mat", "b": "a plane is parked"}
    refs = {"a": ["the cat is on the mat"], "b": ["a plane is parked"]}
    s = score_captions({"a": cands["a"]}, {"a": refs["a"]}, meteor=False, use_java=use_java)
    assert s["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    # BLEU-2 by hand: bigrams of the candidate: the-cat, cat-sat, sat-on, on-the, the-mat;
    # in the reference: the-cat, on-the, the-mat -> 3/5; BLEU-2 = sqrt(5/6 * 3/5)
    assert s["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    same = score_captions({"b": cands["b"]}, {"b": refs["b"]}, meteor=use_java, use_java=use_java)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    if use_java:
        assert same["METEOR"] > 0.9


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5;
    # P = 5/6, R = 5/6 -> F(beta=1.2) = 5/6
    s = score_captions({"a": "the cat sat on the mat"}, {"a": ["the cat is on the mat"]}, meteor=False, use_java=False)
    assert s["ROUGE-L"] == pytest.approx(5 / 6, abs=1e-6)


def test_cider_d_identical_beats_different():
    refs = {
        "1": ["many buildings and green trees are in a dense residential area"] * 2,
        "2": ["there is a piece of farmland"] * 2,
        "3": ["lots of boats docked in lines at the harbor"] * 2,
    }
    exact = {k: v[0] for k, v in refs.items()}
    s_exact = score_captions(exact, refs, meteor=False, use_java=False)
    # every candidate equal to its (repeated) references: each n-gram vector is identical to the
    # reference vector, so cosine = 1 for n = 1..4, no length penalty -> CIDEr-D = 10 per image
    assert s_exact["CIDEr-D"] == pytest.approx(10.0, rel=1e-6)
    wrong = {"1": refs["2"][0], "2": refs["3"][0], "3": refs["1"][0]}
    s_wrong = score_captions(wrong, refs, meteor=False, use_java=False)
    assert s_wrong["CIDEr-D"] < 0.5


def test_empty_candidate_does_not_crash():
    s = score_captions({"a": ""}, {"a": ["a plane"]}, meteor=False, use_java=False)
    assert s["CIDEr-D"] == pytest.approx(0.0, abs=1e-9)


def test_retrieval_recall_hand_matrix():
    # 3 images, 2 captions each (texts 0,1 -> img 0; 2,3 -> img 1; 4,5 -> img 2)
    owner = [0, 0, 1, 1, 2, 2]
    sim = np.array([
        [0.9, 0.1, 0.0],   # t0 -> img0 rank 0
        [0.2, 0.5, 0.1],   # t1 -> img0 rank 1
        [0.1, 0.8, 0.3],   # t2 -> img1 rank 0
        [0.7, 0.6, 0.1],   # t3 -> img1 rank 1
        [0.3, 0.2, 0.1],   # t4 -> img2 rank 2
        [0.0, 0.4, 0.2],   # t5 -> img2 rank 1
    ])
    r = retrieval_recall(sim, owner, ks=(1, 2, 3))
    assert r["t2i_R@1"] == pytest.approx(100 * 2 / 6)
    assert r["t2i_R@2"] == pytest.approx(100 * 5 / 6)
    assert r["t2i_R@3"] == pytest.approx(100.0)
    # image-to-text: img0 column: t0 best (0.9) -> rank 0; img1: best own 0.8 (t2), higher: none -> 0;
    # img2: best own 0.2 (t5), higher: t2 (0.3) -> rank 1
    assert r["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert r["i2t_R@2"] == pytest.approx(100.0)
    assert r["mR"] == pytest.approx(np.mean([100 * 2 / 6, 100 * 5 / 6, 100, 100 * 2 / 3, 100, 100]))


def test_classification_accuracy():
    a = classification_accuracy([0, 1, 1, 2], [0, 1, 2, 2])
    assert a["accuracy"] == pytest.approx(75.0)
    assert a["per_class"] == {0: 100.0, 1: 100.0, 2: 50.0}

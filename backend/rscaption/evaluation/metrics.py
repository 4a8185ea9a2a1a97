"""Caption, retrieval and classification scores, computed the way published RS-captioning figures are.

Tokenisation (why the numbers compare with papers): candidates and references both go through the
coco-caption **PTB tokenizer** (Stanford CoreNLP ``PTBTokenizer`` run with Java, as in
``pycocoevalcap``): text is lower-cased and split Penn-Treebank style, and punctuation tokens
(``. , ; : ! ? ' " ( ) - ...``) are removed. BLEU-1..4 are corpus-level (coco-caption ``Bleu``,
"closest" reference length), METEOR is Meteor 1.5 (``-l en -norm``), ROUGE-L uses beta 1.2,
and "CIDEr-D" is coco-caption's ``Cider`` scorer, which *is* CIDEr-D (n = 1..4, sigma = 6,
candidate counts clipped by reference counts, x10), with document frequencies from the evaluated
split's references. SPICE is not computed: it needs Stanford CoreNLP models that are downloaded on
first use and this project must run offline.

When Java is missing the same punctuation rules are applied by a small Python tokenizer and METEOR
is skipped; the report's ``tokenizer`` field says which was used.
"""

from __future__ import annotations

import re
import shutil
from typing import Mapping, Sequence

import numpy as np

# coco-caption's PTBTokenizer drops exactly these tokens after tokenising.
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                    ":", "-", "--", "...", ";"}

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def java_available() -> bool:
    return shutil.which("java") is not None


def python_tokenize(text: str) -> str:
    """Fallback with the PTB tokenizer's visible effect: lower case, punctuation removed."""
    toks = _TOKEN_RE.findall(str(text).lower().replace("\n", " "))
    return " ".join(t for t in toks if t not in PTB_PUNCTUATIONS and re.search(r"[a-z0-9]", t))


def tokenize(captions: Mapping[str, Sequence[str]], use_java: bool | None = None) -> tuple[dict, str]:
    """Tokenise ``{id: [captions]}``; returns the tokenised dict and the tokenizer's name."""
    if use_java is None:
        use_java = java_available()
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(data), "ptb"
    return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}, "python"


def score_captions(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   meteor: bool = True, use_java: bool | None = None) -> dict:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L, CIDEr-D of one candidate per id against its refs.

    Ids in ``candidates`` must all have references; the CIDEr-D document frequencies come from the
    references of exactly these ids, so scoring a subset (``--limit``) changes CIDEr-D slightly.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [str(k) for k in candidates]
    missing = [k for k in ids if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} candidates have no references, e.g. {missing[:3]}")
    if use_java is None:
        use_java = java_available()
    res_tok, tok_name = tokenize({k: [candidates[k]] for k in ids}, use_java)
    gts_tok, _ = tokenize({k: list(references[k]) for k in ids}, use_java)
    # an empty candidate would crash the scorers; score it as a single unknown token instead
    res_tok = {k: [v[0] if v and v[0].strip() else "<empty>"] for k, v in res_tok.items()}
    out: dict = {"tokenizer": tok_name, "n": len(ids)}
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    if meteor and use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts_tok, res_tok)[0])
        finally:
            _close_meteor(scorer)
    out["ROUGE-L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    cider, per_image = Cider().compute_score(gts_tok, res_tok)
    out["CIDEr-D"] = float(cider)
    out["_cider_per_image"] = {k: float(s) for k, s in zip(gts_tok.keys(), per_image)}
    return out


def _close_meteor(scorer) -> None:
    """pycocoevalcap keeps a Java subprocess per Meteor(); end it now rather than at interpreter exit."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    try:
        with scorer.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
    except Exception:
        pass
    # its __del__ would try again on a closed pipe
    scorer.meteor_p = None
    try:
        type(scorer).__del__ = lambda self: None
    except Exception:
        pass


def retrieval_recall(sim: np.ndarray, text_to_image: Sequence[int], ks=(1, 5, 10)) -> dict:
    """Recall@K both ways from a text x image similarity matrix.

    ``text_to_image[t]`` is the index of the image caption ``t`` describes (several captions per
    image). Text-to-image: a caption hits if its image is in the top K. Image-to-text: an image
    hits if any of its captions is in the top K (the convention of RSICD/RSITMD papers). Mean
    recall (mR) averages the six numbers; every value is a percentage.
    """
    sim = np.asarray(sim, dtype=np.float64)
    gt = np.asarray(text_to_image, dtype=np.int64)
    n_text, n_img = sim.shape
    if gt.shape != (n_text,):
        raise ValueError("text_to_image must have one image index per text row")
    out: dict = {}
    # rank of the true image for each text: how many images score strictly higher
    true = sim[np.arange(n_text), gt]
    t2i_rank = (sim > true[:, None]).sum(axis=1)
    # image-to-text: best rank among the image's own captions
    simT = sim.T
    i2t_rank = np.full(n_img, n_text, dtype=np.int64)
    for i in range(n_img):
        own = np.flatnonzero(gt == i)
        if own.size == 0:
            continue
        best = simT[i, own].max()
        i2t_rank[i] = (simT[i] > best).sum()
    has_text = np.array([np.any(gt == i) for i in range(n_img)])
    for k in ks:
        out[f"t2i_R@{k}"] = float(100.0 * np.mean(t2i_rank < k))
        out[f"i2t_R@{k}"] = float(100.0 * np.mean(i2t_rank[has_text] < k))
    out["t2i_mR"] = float(np.mean([out[f"t2i_R@{k}"] for k in ks]))
    out["i2t_mR"] = float(np.mean([out[f"i2t_R@{k}"] for k in ks]))
    out["mR"] = float(np.mean([out[f"t2i_R@{k}"] for k in ks] + [out[f"i2t_R@{k}"] for k in ks]))
    return out


def classification_accuracy(pred: Sequence[int], labels: Sequence[int], n_classes: int | None = None) -> dict:
    """Overall accuracy (percent) and per-class accuracy, so a weak class is visible in the report."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape or pred.size == 0:
        raise ValueError("pred and labels must be non-empty and the same length")
    out = {"accuracy": float(100.0 * np.mean(pred == labels))}
    n = n_classes or int(max(pred.max(), labels.max()) + 1)
    per = {}
    for c in range(n):
        m = labels == c
        if m.any():
            per[c] = float(100.0 * np.mean(pred[m] == c))
    out["per_class"] = per
    return out

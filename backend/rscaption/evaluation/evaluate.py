"""``rscaption evaluate``: caption, retrieval and scene-classification scores of a model on a split.

Scene classification is zero-shot through the text tower: each class becomes the prompt
``card["class_prompts"]`` (default "an aerial image of a {}.") and an image takes the class whose
prompt embedding is nearest. This is fair for any CLIP-style model, and for the default model it
is exactly its trained class head (stage 2 trains the image tower against these prompts).

See :mod:`rscaption.evaluation.metrics` for the tokenisation and scorer details.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import RscaptionError

DEFAULT_PROMPT = "an aerial image of a {}."


def _load_images(records, show_progress: bool = True):
    from ..data.images import read_rgb

    return [read_rgb(r.image) for r in records]


def _load_model(model, device):
    try:
        from ..models.registry import load_model
    except ImportError:  # registry not available: a checkpoint directory still works
        from ..models.checkpoint import load_checkpoint as load_model
    return load_model(str(model), device=device)


def evaluate_model(model, data, split: str = "val", images=None, beam_size: int = 3,
                   length_penalty: float | None = None, limit: int | None = None, meteor: bool = True,
                   max_new_tokens: int = 30, batch_size: int = 32, device=None, captions_out: bool = True) -> dict:
    """Evaluate ``model`` (a name/path for ``load_model`` or a ``Captioner``) on ``data``'s split."""
    from ..data.datasets import load_dataset, normalize_caption
    from .metrics import classification_accuracy, retrieval_recall, score_captions

    cap = _load_model(model, device) if isinstance(model, (str, Path)) else model
    ds = load_dataset(data, images_dir=images, split=split, check=True)
    ds = ds.limit(limit)
    recs = ds.records
    if length_penalty is None:
        length_penalty = float((getattr(cap, "card", None) or {}).get("length_penalty", 1.0))
    report: dict = {"model": getattr(cap, "model_id", str(model)), "model_hash": getattr(cap, "model_hash", None),
                    "data": str(data), "split": split, "n_images": len(recs), "beam_size": beam_size,
                    "length_penalty": length_penalty, "max_new_tokens": max_new_tokens}
    t0 = time.time()
    imgs = _load_images(recs)
    t_read = time.time() - t0
    t0 = time.time()
    emb = cap.embed_images(imgs, batch_size=batch_size)
    t_embed = time.time() - t0
    report["timing"] = {"read_s": round(t_read, 2), "embed_s": round(t_embed, 2),
                        "embed_images_per_s": round(len(recs) / max(t_embed, 1e-9), 2)}
    if getattr(cap, "can_caption", True):
        t0 = time.time()
        out = cap.caption(emb, beam_size=beam_size, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
        t_cap = time.time() - t0
        report["timing"].update({"caption_s": round(t_cap, 2),
                                 "caption_per_s": round(len(recs) / max(t_cap, 1e-9), 2),
                                 "tiles_per_s": round(len(recs) / max(t_cap + t_embed, 1e-9), 2)})
        cands = {r.image_id: c for r, (c, _) in zip(recs, out)}
        refs = {r.image_id: r.captions for r in recs}
        scores = score_captions(cands, refs, meteor=meteor)
        per_image = scores.pop("_cider_per_image")
        report["captioning"] = scores
        if captions_out:
            report["captions"] = [
                {"image_id": r.image_id, "caption": c, "confidence": round(conf, 4),
                 "cider_d": round(per_image.get(r.image_id, float("nan")), 4), "references": r.captions}
                for r, (c, conf) in zip(recs, out)]
    # retrieval: every reference caption against every image of the split
    texts, owner = [], []
    for i, r in enumerate(recs):
        for c in r.captions:
            texts.append(normalize_caption(c))
            owner.append(i)
    if texts:
        temb = cap.embed_texts(texts)
        report["retrieval"] = retrieval_recall(temb @ emb.T, owner)
    labels = [r.label for r in recs]
    phrases = ds.class_phrases or ds.classes
    vocab_targets = _vocab_targets(cap, ds, recs)
    if vocab_targets is not None:
        from .scene_eval import scene_accuracy

        template = (getattr(cap, "card", {}) or {}).get("class_prompts") or DEFAULT_PROMPT
        pos, allowed = vocab_targets
        pemb = cap.embed_texts([template.format(p) for p in cap.scene.phrases])
        ok = scene_accuracy(emb, pemb, pos, allowed)
        per_class = {}
        for r, o in zip(recs, ok):
            per_class.setdefault(ds.classes[r.label], []).append(bool(o))
        report["classification"] = {
            "accuracy": round(float(100 * ok.mean()), 2),
            "per_class": {c: round(100 * sum(v) / len(v), 2) for c, v in sorted(per_class.items())},
            "method": f"the model's scene vocabulary ({len(cap.scene.phrases)} classes) through '{template}', "
                      "restricted to the classes this dataset names"}
    elif phrases and all(l is not None for l in labels):
        template = (getattr(cap, "card", {}) or {}).get("class_prompts") or DEFAULT_PROMPT
        pemb = cap.embed_texts([template.format(p) for p in phrases])
        pred = (emb @ pemb.T).argmax(1)
        acc = classification_accuracy(pred, labels, len(phrases))
        acc["per_class"] = {ds.classes[k] if ds.classes else str(k): v for k, v in acc["per_class"].items()}
        acc["method"] = f"zero-shot nearest class prompt '{template}'"
        report["classification"] = acc
    report["scoring"] = ("PTB tokenizer (lower-cased, punctuation removed); BLEU corpus-level; "
                         "CIDEr-D = coco-caption Cider (sigma 6, clipped), IDF from this split's references; "
                         "SPICE not computed (needs a CoreNLP download)")
    return report


def _vocab_targets(cap, ds, recs):
    """``(positives, allowed)`` over the model's scene vocabulary when the model has one and the
    dataset's labels map into it (``data/scene_vocab.yaml``), else None (plain zero-shot)."""
    scene = getattr(cap, "scene", None)
    if scene is None or not ds.classes or any(r.label is None for r in recs):
        return None
    from ..errors import TrainError
    from ..data.scene_vocab import SceneVocab

    vocab = SceneVocab.load()
    if list(vocab.phrases) != list(scene.phrases):
        return None
    try:
        maps = [vocab.positives(ds.name, c) for c in ds.classes]
    except TrainError:
        return None
    pos = np.zeros((len(recs), len(vocab)), bool)
    for i, r in enumerate(recs):
        pos[i, maps[r.label]] = True
    allowed = np.zeros_like(pos)
    allowed[:, sorted({j for m in maps for j in m})] = True
    return pos, allowed


def format_table(report: dict) -> str:
    rows = []
    c = report.get("captioning", {})
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"):
        if k in c:
            rows.append((k, f"{c[k]:.4f}"))
    r = report.get("retrieval", {})
    for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "t2i_mR", "i2t_R@1", "i2t_R@5", "i2t_R@10", "i2t_mR", "mR"):
        if k in r:
            rows.append((k, f"{r[k]:.2f}"))
    if "classification" in report:
        rows.append(("scene accuracy %", f"{report['classification']['accuracy']:.2f}"))
    t = report.get("timing", {})
    if "tiles_per_s" in t:
        rows.append(("tiles/s (embed+caption)", f"{t['tiles_per_s']:.2f}"))
    head = f"{report.get('model')} on {Path(str(report.get('data'))).name} [{report.get('split')}], " \
           f"{report.get('n_images')} images, beam {report.get('beam_size')}"
    w = max(len(k) for k, _ in rows) if rows else 10
    return "\n".join([head] + [f"  {k:<{w}}  {v}" for k, v in rows])


def add_evaluate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="default", help="'default', a checkpoint dir, or a model name")
    parser.add_argument("--data", required=True, help="captions file (Karpathy dataset.json, NWPU, COCO)")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--images", help="image folder (default: imgs/ or images/ beside the captions file)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="beam ranking: sum log-prob / length ** L (default: the model card's, else 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves the Java start-up)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--json", nargs="?", const="-", metavar="OUT",
                        help="write the JSON report to OUT (or print it to stdout when given alone)")
    return parser


def run_evaluate(args) -> int:
    try:
        report = evaluate_model(args.model, args.data, split=args.split, images=args.images,
                                beam_size=args.beam_size, length_penalty=args.length_penalty,
                                limit=args.limit, meteor=not args.no_meteor,
                                max_new_tokens=args.max_new_tokens, device=getattr(args, "device", None))
    except RscaptionError as exc:
        print(f"rscaption: error: {exc}", file=sys.stderr)  # the CLI's prefix, as every subcommand
        return 2
    out = getattr(args, "json", None)
    if out == "-":
        print(json.dumps(report, indent=2))
        print(format_table(report), file=sys.stderr)
    else:
        print(format_table(report))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rscaption evaluate", description=__doc__.splitlines()[0])
    add_evaluate_args(p)
    return run_evaluate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""What a run trains on: its sets, their samples, the scene vocabulary and the class prompts.

One object for the one-dataset configs (``data.captions``) and the multi-dataset ones
(``data.sets``), so the image stages and the mapping stage have a single code path: a lone
caption dataset is a one-set plan whose vocabulary is that dataset's own classes.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TrainError
from .contrastive import PROMPT_TEMPLATE
from .multidata import LoadedSet, MultiSet, SetSpec, load_multiset, load_set
from ..data.scene_vocab import SceneVocab, _norm


def _own_vocab(spec: SetSpec, classes, phrases) -> SceneVocab:
    names = list(classes)
    return SceneVocab(names=names, phrases=list(phrases or names),
                      datasets={_norm(spec.name): {_norm(c): [i] for i, c in enumerate(names)}})


def build_plan(cfg: dict, resolve) -> MultiSet:
    """The run's :class:`MultiSet` (``parts.plan_of`` keeps one per run)."""
    d = cfg["data"]
    enc = cfg.get("encoder", {})
    views = list(enc.get("train_views", [0, 1, 4, 6]))
    if d.get("sets"):
        vocab = SceneVocab.load(resolve(cfg["scene_vocab"]) if cfg.get("scene_vocab") else None)
        return load_multiset(d, resolve, views, vocab)
    from ..data.datasets import load_dataset

    path = resolve(d["captions"])
    ds = load_dataset(path, images_dir=resolve(d.get("images")), check=False)
    spec = SetSpec(name=ds.name, kind="captions", path=path, images=resolve(d.get("images")),
                   weight=float(len(views)), views=views, train_split=d.get("train_split", "train"),
                   val_split=d.get("val_split", "val"), limit_train=d.get("limit_train"),
                   limit_val=d.get("limit_val"))
    vocab = _own_vocab(spec, ds.classes or [], ds.class_phrases)
    loaded: LoadedSet = load_set(spec, vocab)
    return MultiSet([loaded], vocab)


def prompts(cfg: dict, plan: MultiSet) -> list[str]:
    if not len(plan.vocab):
        raise TrainError("the dataset has no scene classes; set contrastive.class_loss_weight: 0")
    return plan.vocab.prompts(cfg.get("contrastive", {}).get("prompt_template", PROMPT_TEMPLATE))


def trunk_dir(cache_dir: Path, plan: MultiSet, set_index: int, split: str, cut: int, preprocess: dict,
              timm: str, weights) -> Path:
    """Activations are keyed by content (set, split, cut, preprocessing) so runs share them."""
    import hashlib
    import json

    s = plan.sets[set_index]
    key = json.dumps({"set": s.spec.key(), "split": split, "cut": cut, "pp": preprocess, "timm": timm,
                      "w": weights}, sort_keys=True, default=str)
    return Path(cache_dir) / f"trunk_{s.spec.name}_{split}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"

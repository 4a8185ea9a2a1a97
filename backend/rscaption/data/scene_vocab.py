"""One scene vocabulary for all training sets (``scene_vocab.yaml``).

Datasets name the same scene differently ("parkinglot", "parking", "Parking") and some lump
classes together (RSSCN7 "Resident" is any housing density). Training several of them against
one class head needs one vocabulary, a map from each dataset's labels to it (a label may map to
several classes: each is right for it), and the set of classes a dataset can name at all: the
scene loss of an image is a softmax over its own dataset's classes, so "meadow" (RSICD) and
"Pasture" (EuroSAT) never compete. At inference the head ranks the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TrainError

DEFAULT_VOCAB = Path(__file__).with_name("scene_vocab.yaml")


def _norm(label: str) -> str:
    return "".join(ch for ch in str(label).lower() if ch.isalnum())


@dataclass
class SceneVocab:
    names: list[str]
    phrases: list[str]
    datasets: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    captions: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    fine_detail: set[int] = field(default_factory=set)  # classes whose coarser views are not drawn

    @classmethod
    def load(cls, path=None) -> "SceneVocab":
        import yaml

        path = Path(path or DEFAULT_VOCAB)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainError(f"scene vocabulary not found: {path}") from None
        classes = raw.get("classes") or {}
        names = list(classes)
        index = {n: i for i, n in enumerate(names)}
        phrases = [str((classes[n] or {}).get("phrase", n.replace("_", " "))) for n in names]
        datasets: dict[str, dict[str, list[int]]] = {}
        for ds, labels in (raw.get("datasets") or {}).items():
            table = {}
            for label, targets in labels.items():
                bad = [t for t in targets if t not in index]
                if bad:
                    raise TrainError(f"{path}: {ds}/{label} maps to unknown class(es) {', '.join(bad)}")
                table[_norm(label)] = [index[t] for t in targets]
            datasets[_norm(ds)] = table
        captions = {_norm(ds): {_norm(lb): [str(c) for c in caps] for lb, caps in labels.items()}
                    for ds, labels in (raw.get("captions") or {}).items()}
        fine = {index[n] for n in names if (classes[n] or {}).get("coarse_views", True) is False}
        return cls(names, phrases, datasets, captions, fine)

    def __len__(self) -> int:
        return len(self.names)

    def positives(self, dataset: str, label: str) -> list[int]:
        """Vocabulary classes that are right for ``label`` of ``dataset``.

        A dataset without a table maps a label by its own name or phrase (so a user's image folder
        named ``forest/`` or ``parking lot/`` needs no table); an unknown label is an error naming
        the dataset, because silently dropping a class would train a worse model without a word."""
        key = _norm(label)
        table = self.datasets.get(_norm(dataset))
        if table is not None and key in table:
            return list(table[key])
        for i, (n, p) in enumerate(zip(self.names, self.phrases)):
            if key in (_norm(n), _norm(p)):
                return [i]
        for table in self.datasets.values():  # a synonym some other dataset uses
            if key in table and len(table[key]) == 1:
                return list(table[key])
        raise TrainError(f"scene label '{label}' of dataset '{dataset}' is not in the scene vocabulary; "
                         "add it to a vocabulary file (training config: scene_vocab)")

    def class_captions(self, dataset: str, label: str) -> list[str]:
        """The written caption set of a class-only dataset's label, else a generic one built from
        the class phrases (still nothing the label does not support)."""
        caps = self.captions.get(_norm(dataset), {}).get(_norm(label))
        if caps:
            return list(caps)
        p = self.phrases[self.positives(dataset, label)[0]]
        a = "an" if p[:1] in "aeiou" else "a"
        return [f"it is {a} {p}.", f"this is {a} {p}.", f"there is {a} {p}.", f"an aerial image of {a} {p}."]

    def prompts(self, template: str) -> list[str]:
        return [template.format(p) for p in self.phrases]

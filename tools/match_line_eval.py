#!/usr/bin/env python3
"""How well a model's "no good match" line (rscaption.models.match_line) separates matches from
the rest, on RSICD val (images the default model was not trained on, ../shared/data/rsicd).

    .venv/bin/python tools/match_line_eval.py [--model default]

Queries: a short name for each RSICD scene ("houses" for the three residential classes, "a pond",
...) and one held-out caption per scene (matching images: the rest of that scene's images).
Printed, averaged over queries:

* matches found: the five best images of the query's scene all reach the line (mean score);
* one-scene sets flagged: for each other scene, its images alone (a file without the query's
  scene, like "houses" on a farm) have no image above the line;
* per image: the share of the scene's images above the line, and of all other images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rsicd"
NAMES = {
    "farmland": ["farmland"], "houses": ["denseresidential", "mediumresidential", "sparseresidential"],
    "a river": ["river"], "a pond": ["pond"], "an airport": ["airport"], "a beach": ["beach"], "a bridge": ["bridge"],
    "a church": ["church"], "a forest": ["forest"], "a desert": ["desert"], "a parking lot": ["parking"],
    "a stadium": ["stadium"], "storage tanks": ["storagetanks"], "a port with boats": ["port"], "a school": ["school"],
    "mountains": ["mountain"], "bare land": ["bareland"], "a baseball field": ["baseballfield"],
    "a playground": ["playground", "playfields"], "a railway station": ["railwaystation"],
    "industrial buildings": ["industrial"], "a square": ["square"], "a park": ["park"], "a meadow": ["meadow"],
    "commercial buildings": ["commercial"], "a resort": ["resort"], "a viaduct": ["viaduct"],
    "the city centre": ["center"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    args = p.parse_args(argv)
    if not (DATA / "dataset.json").is_file():
        print(f"RSICD not found: {DATA} (needs ../shared/data)")
        return 2
    sys.path.insert(0, str(ROOT / "backend"))
    from PIL import Image

    from rscaption.models.match_line import match_line_for
    from rscaption.models.registry import load_model

    cap = load_model(args.model, device="cpu")
    lines = match_line_for(cap)
    if lines is None:
        print(f"model {args.model} has no scene head: no match line")
        return 2
    val = [i for i in json.loads((DATA / "dataset.json").read_text())["images"] if i["split"] == "val"]
    emb = np.concatenate([cap.embed_images([np.asarray(Image.open(DATA / "imgs" / i["filename"]).convert("RGB"))
                                            for i in val[s:s + 32]]) for s in range(0, len(val), 32)])
    cls = np.array([i["class"] for i in val])
    first = np.array([i["sentences"][0]["raw"] for i in val])
    queries = dict(NAMES)
    for c in sorted(set(cls)):
        queries[str(first[np.flatnonzero(cls == c)[0]])] = [c]
    found, flagged, recall, false = [], [], [], []
    for query, scenes in queries.items():
        q = np.asarray(cap.embed_texts([query]), np.float32)[0]
        line, scores = lines.line(q), emb @ q
        match = np.isin(cls, scenes) & (first != query)
        found.append(np.sort(scores[match])[::-1][:5].mean() >= line)
        flagged.append(np.mean([scores[cls == c].max() < line for c in set(cls) if c not in scenes]))
        recall.append((scores[match] >= line).mean())
        false.append((scores[~match] >= line).mean())
    print(f"{len(queries)} queries on {len(val)} RSICD val images, model {args.model}")
    print(f"matches found (top 5 of the scene above the line): {np.mean(found):.0%}")
    print(f"one-scene sets without the query's scene flagged 'no good match': {np.mean(flagged):.0%}")
    print(f"per image: scene images above the line {np.mean(recall):.0%}, other images {np.mean(false):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

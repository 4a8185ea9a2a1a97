"""data/: what training and evaluation share: caption sets, scene vocabulary, images.

Modules:

- ``datasets.py``: Karpathy ``dataset.json`` (a ``class`` field is the scene), NWPU-Captions, COCO
  captions, caption-text jsonl
- ``scene_vocab.py``, ``scene_vocab.yaml``: one scene vocabulary for all sets: classes and their
  prompt phrases, each dataset's labels mapped to it (a label may map to several classes), written
  caption sets for class-only datasets
- ``images.py``: ``read_rgb``: an image file as HxWx3 uint8 (training views, CLIP fine-tuning,
  evaluation)
"""

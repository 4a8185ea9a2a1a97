"""evaluation/: caption metrics, retrieval, scene accuracy, calibration (never training).

Modules:

- ``metrics.py``: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap), R@1/5/10, accuracy
- ``evaluate.py``: ``rscaption evaluate``: JSON report + table
- ``calibration.py``: AUROC, expected calibration error, temperature and logistic fits (numpy)
- ``scene_eval.py``: "does the caption name the right scene?" (the caption read by the text tower
  against the class prompts) and scene accuracy on the shared vocabulary
- ``set_report.py``: one val set's report (captions, retrieval, scene accuracy, confidence
  AUROC/ECE, speed) for the training run's evaluate stage
- ``examples.py``: Example captions for a model card: a few val images and a few tiles of real
  rasters.
- ``scenes.py``: Scene names read off a caption by keywords, in English and Chinese.
"""

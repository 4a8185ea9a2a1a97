"""training/: ``rscaption train CONFIG``: the stages from caption text to a checkpoint.

Modules:

- ``multidata.py``: ``data.sets``: caption sets, scene-index sets (``scenes/index.json``) and
  class-folder sets as one ``MultiSet``; per-set weights (draws per epoch; a stage may override
  them, as ``mapping.set_weights`` does), views, label spaces, footprints; coarser views of fine-
  detail classes (``coarse_views: false``) are never drawn
- ``plan.py``: the run's ``MultiSet`` (a lone ``data.captions`` is a one-set plan with its own
  classes), class prompts, cache keys
- ``features.py``: training views (dihedral 0..7, seeded crop + colour 8..19, coarser ground
  resolution 20+) and a per-view cache of frozen image-tower activations, so CPU training is fast
- ``lm.py``: the BPE tokenizer and a small GPT-2 on caption text
- ``contrastive.py``: LiT-style contrastive training (+ scene loss over each set's own classes) on
  cached activations; the losses both stage-2 variants share; scene-grouped batches (in-scene
  negatives)
- ``clip_trainer.py``: stage 2 with ``encoder.kind: clip``: fine-tune a pretrained open_clip /
  transformers CLIP or train one from scratch, images read per step
- ``mapping_stage.py``: the prefix mapping (LM frozen or fine-tuned) on cached embeddings
- ``crosslingual.py``: decoders for other caption languages (Chinese) trained on translated caption
  text: noisy text embeddings as the prefix
- ``calibrate_stage.py``: the confidence model: temperature, prototypes (unlabelled and per class),
  logistic fit on half of each val set and a cross-fitted report; each class's coarsest training
  resolution
- ``runner.py``: ``rscaption train CONFIG``: the stage list, seeded, resumable; the stages live in
  ``text_stages.py`` (tokenizer, lm), ``image_stages.py`` + ``lit_stages.py`` (features,
  contrastive, embed), ``caption_stages.py`` (mapping, crosslingual, calibrate, export, evaluate);
  shared pieces in ``parts.py``, the run dir in ``rundir.py``, configs (``extends:``) in
  ``config.py``
- ``progress.py``: progress bars that ``--no-progress`` can switch off
"""

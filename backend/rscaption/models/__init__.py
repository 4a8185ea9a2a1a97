"""models/: the captioner: encoders, mapping, decoders, checkpoints, scene head.

Modules:

- ``encoders.py``: image/text encoder adapters: open_clip, transformers CLIP, and ``lit``
  (EfficientNet-Lite image tower + MiniLM text tower)
- ``mapping.py``: image embedding -> LM prefix: ``linear``, ``mlp``, ``transformer``
- ``captioner.py``: ``Captioner``: ``embed_images``, ``embed_texts``, ``caption`` (greedy/beam,
  batched, KV cache)
- ``decoder.py``: ``Decoder`` (mapping + LM + tokenizer of one caption language) and the batched
  greedy/beam loops on the KV cache
- ``fold.py``: an inference copy of a CNN image tower: batch norms folded into the convolutions,
  channels-last; on the CPU each convolution with its bias and activation in one oneDNN call
  (elsewhere 1x1 convolutions as matrix products), and the high-resolution first stages in sub-
  batches whose activations stay under glibc's 32 MB mmap limit (a tenth of the page faults per
  call); checked against the original on a probe batch
- ``inference.py``: the captioner's inference fast paths (``cap.fast_inference``): the folded
  tower, the decoder with the lean GPT-2 forward, both in the compute dtype (bf16 on AMX CPUs), and
  a caption-text embedding cache, all keyed on the weights' storage and version
- ``gpt2_runner.py``: a lean GPT-2 forward for the decoding loops (layer norm, fused qkv, SDPA on a
  plain key/value cache, MLP, tied head) over the LM's own weights
- ``checkpoint.py``: the checkpoint directory format (``config.json`` + ``*.safetensors`` +
  tokenizer files) and reading it: ``load_checkpoint`` builds the ``Captioner``; never unpickles
- ``checkpoint_save.py``: writing a captioner as a checkpoint (atomically) and ``model_hash``;
  needs nothing that imports ``Captioner``, so the two modules form no import loop
- ``scene.py``: ``SceneHead``: the scene posterior and the calibrated confidence (predicted chance
  the caption names the right scene, from prompts and labelled prototypes); honest captions below
  its threshold or naming a scene never seen at the tile's ground resolution
- ``match_line.py``: a text query's "no good match" line: the 99th percentile of its scores on
  the scene head's reference images (class prototypes) of scenes other than the 3 its text is
  nearest; per model and per query, no fixed number
- ``registry.py``: ``load_model(name_or_path)``: ``default``, a checkpoint dir, open_clip tags /
  ``hf-hub:`` ids, transformers ids
- ``hub.py``: hub names without a network: offline mode when the hub cannot be reached (one short
  probe, not 25 s of retries), and the one-line error for a model that is not in the local cache
- ``tiny.py``: builds tiny random models (tests, ``make demo`` before a default exists)
- ``tiny_names.py``: the tiny models' names (``tiny-lit-linear-seed2``) both ways: the registry
  parses them, ``tiny.py`` stamps them; no torch
- ``text_query.py``: the text tower alone for search (LiT checkpoints with a BERT text tower:
  ``tokenizers`` + a plain torch BERT forward, no image tower, decoders or transformers); same
  vectors and hash as the full model
- ``weights.py``: Tensor files: safetensors only, so a checkpoint can never execute code when it is
  opened.

Contract (models)::

    cap = load_model("default" | path | hub-name, device=None)
    cap.embed_images(list_of_HxWx3_uint8) -> np.float32 [N, D], L2-normalised
    cap.embed_texts(list_of_str) -> np.float32 [N, D], L2-normalised
    cap.caption(embeddings [N, D], beam_size=1, max_new_tokens=30, length_penalty=None,
                language="en", calibrated=True, ground_m=None) -> list[(caption, confidence)]
          # confidence: with a scene head (the default has one) the calibrated probability that the
          # caption names the right scene, low ones and scenes never seen at ground_m m/px rewritten
          # honestly (models/scene.py); without one exp(mean token log-probability) in [0, 1].
          # length_penalty None: the model card's. cap.precision: fp32 | bf16 | auto (models/inference.py)
    cap.card -> dict          # encoder, lm, prefix length, embed dim, tile size, ground resolution ...
    cap.model_id, cap.model_hash
    cap.save(dir)
"""

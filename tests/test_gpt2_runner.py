"""The lean GPT-2 decoding forward (models/gpt2_runner.py) against the transformers forward it
replaces: same logits step by step, same captions, and a fallback for GPT-2 variants it does not
cover. Real GPT-2 modules with random weights and the tiny captioner; no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rscaption.models import gpt2_runner
from rscaption.models.inference import fast_decoder
from rscaption.models.tiny import build_tiny_captioner


def _gpt2(**over):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4, **over)
    return GPT2LMHeadModel(cfg).eval()


def test_runner_gives_the_transformers_logits_at_every_step():
    lm = _gpt2()
    runner = gpt2_runner.GPT2Runner(lm)
    prefix = torch.randn(5, 4, 48)
    with torch.inference_mode():
        ref = lm(inputs_embeds=prefix, use_cache=True)
        logits, cache = runner.start(prefix)
        np.testing.assert_allclose(logits.numpy(), ref.logits[:, -1].numpy(), atol=1e-4)
        past = ref.past_key_values
        tokens = torch.randint(0, 97, (5,))
        for _ in range(4):
            ref = lm(input_ids=tokens[:, None], past_key_values=past, use_cache=True)
            logits, cache = runner.step(tokens, cache)
            np.testing.assert_allclose(logits.numpy(), ref.logits[:, -1].numpy(), atol=1e-4)
            past = ref.past_key_values
            tokens = logits.argmax(-1)
        assert cache[0][0].shape == (5, 4, 4 + 4, 12)  # [batch, heads, prefix + steps, head dim]


def test_fast_captions_equal_the_transformers_loop_greedy_and_beam():
    cap = build_tiny_captioner("lit", seed=5)
    cap.precision = "fp32"
    emb = np.random.default_rng(0).standard_normal((7, cap.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert fast_decoder(cap.decoder(), torch.float32).runner is not None
    fast = [cap.caption(emb, beam_size=b, calibrated=False) for b in (1, 3)]
    cap.fast_inference = False
    plain = [cap.caption(emb, beam_size=b, calibrated=False) for b in (1, 3)]
    for f, p in zip(fast, plain):
        assert [c for c, _ in f] == [c for c, _ in p]
        assert np.allclose([s for _, s in f], [s for _, s in p], atol=1e-5)


@pytest.mark.parametrize("over", [{"scale_attn_by_inverse_layer_idx": True}, {"activation_function": "silu"}])
def test_variants_it_does_not_cover_keep_the_transformers_forward(over):
    lm = _gpt2(**over)
    assert not gpt2_runner.supports(lm)
    cap = build_tiny_captioner("lit", seed=5)
    cap.precision = "fp32"
    dec = cap.decoder()
    dec.lm = lm
    assert fast_decoder(dec, torch.float32) is dec  # nothing to gain: the same decoder, no runner

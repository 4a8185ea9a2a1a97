"""The inference copy of a CNN image tower (models/fold.py): batch norms folded, and on the CPU
each convolution fused with its bias and activation in one oneDNN call. Real timm towers with
non-trivial batch-norm statistics, compared with the trained modules they were made from."""

import copy

import pytest
import torch
import torch.nn as nn

from rscaption.models import fold
from rscaption.models.tiny import build_tiny_captioner


def _with_stats(tower: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return tower.eval()


@pytest.fixture(scope="module")
def tower():
    return _with_stats(build_tiny_captioner("lit").encoder.image_tower)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)


def _fused(m: nn.Module) -> list:
    return [x for x in m.modules() if isinstance(x, fold._FusedConv)]


@pytest.mark.skipif(not fold.can_fuse("cpu"), reason="this torch has no oneDNN fused convolution")
def test_fused_copy_computes_what_the_trained_tower_computes(tower, pixels):
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    fused, pairs = fold.folded_copy(tower, probe=pixels[:2])
    plain, pairs_plain = fold.folded_copy(tower, probe=pixels[:2], fuse=False)
    assert pairs == pairs_plain == n_bn > 10
    # every folded convolution carries its activation: no batch norm and no separate ReLU6 is left
    assert len(_fused(fused)) == n_bn and not _fused(plain)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU6)) for m in fused.modules())
    assert {c.attr for c in _fused(fused)} == {"hardtanh", "none"}
    with torch.inference_mode():
        ref = tower(pixels)
        torch.testing.assert_close(fused(pixels), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(plain(pixels), ref, atol=1e-4, rtol=1e-4)
        # a different batch size than the probe's, and channels-first input, give the same numbers
        torch.testing.assert_close(fused(pixels[:1].contiguous()), ref[:1], atol=1e-4, rtol=1e-4)
    # the copy is separate: the trained tower keeps its batch norms and trainable weights
    assert any(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    assert all(p.requires_grad for p in tower.parameters())


@pytest.mark.skipif(not fold.can_fuse("cpu"), reason="this torch has no oneDNN fused convolution")
def test_high_resolution_stages_run_in_sub_batches_with_the_same_result(tower, pixels, monkeypatch):
    """The stem and the blocks at >= 1/4 of the image side run in sub-batches once a batch's widest
    activation there would pass CHUNK_BYTES (glibc maps, and the kernel zero-fills, allocations
    over 32 MB afresh on every call); the numbers do not change."""
    fused, _ = fold.folded_copy(tower, probe=pixels[:2])
    assert isinstance(fused, fold._HighResChunks) and 1 <= fused.split < len(fused.tower.blocks)
    stem = fused.tower.conv_stem
    with torch.inference_mode():
        assert fused.elems_per_image >= stem(pixels[:1]).numel()
    batches = []
    hook = stem.register_forward_hook(lambda m, i, o: batches.append(len(i[0])))
    with torch.inference_mode():
        ref = tower(pixels)
        torch.testing.assert_close(fused(pixels), ref, atol=1e-4, rtol=1e-4)
        assert batches == [3]  # a few small tiles: one pass
        batches.clear()
        monkeypatch.setattr(fold, "CHUNK_BYTES", 2 * fused.elems_per_image * pixels.element_size())
        torch.testing.assert_close(fused(pixels), ref, atol=1e-4, rtol=1e-4)
        assert batches == [2, 1]
        hook.remove()


@pytest.mark.needs_bf16
@pytest.mark.skipif(not fold.can_fuse("cpu"), reason="this torch has no oneDNN fused convolution")
def test_bf16_halves_the_bytes_so_the_same_batch_runs_in_one_pass(tower, pixels, monkeypatch):
    fused, _ = fold.folded_copy(tower, probe=pixels[:2])
    monkeypatch.setattr(fold, "CHUNK_BYTES", 2 * fused.elems_per_image * pixels.element_size())
    low = copy.deepcopy(fused).to(torch.bfloat16)  # half the bytes: the three fit in one pass
    batches = []
    low.tower.conv_stem.register_forward_hook(lambda m, i, o: batches.append(len(i[0])))
    with torch.inference_mode():
        low(pixels.to(torch.bfloat16))
    assert batches == [3]


@pytest.mark.needs_bf16
@pytest.mark.skipif(not fold.can_fuse("cpu"), reason="this torch has no oneDNN fused convolution")
def test_fused_copy_casts_to_bf16(tower, pixels):
    fused, _ = fold.folded_copy(tower, probe=pixels[:2])
    low = copy.deepcopy(fused).to(torch.bfloat16)
    assert all(c.weight.dtype == torch.bfloat16 for c in _fused(low))
    with torch.inference_mode():
        ref = tower(pixels)
        got = low(pixels.to(torch.bfloat16)).float()
    assert got.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.99


def test_an_activation_onednn_cannot_apply_stays_a_module(pixels):
    tower = _with_stats(build_tiny_captioner("lit", seed=2).encoder.image_tower)
    for m in tower.modules():  # GELU has no oneDNN post-op here: it must stay after the convolution
        if hasattr(m, "act") and isinstance(m.act, nn.ReLU6):
            m.act = nn.GELU()
    fused, pairs = fold.folded_copy(tower, probe=pixels[:2])
    assert pairs > 10
    assert sum(isinstance(m, nn.GELU) for m in fused.modules()) == sum(
        isinstance(m, nn.GELU) for m in tower.modules()) > 0
    with torch.inference_mode():
        torch.testing.assert_close(fused(pixels), tower(pixels), atol=fold.FOLD_TOLERANCE, rtol=fold.FOLD_TOLERANCE)


def test_fusion_is_for_the_cpu_only():
    assert fold.can_fuse("cuda:0") is False

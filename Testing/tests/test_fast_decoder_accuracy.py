"""Accuracy of the fast (oneDNN, channels-last) decoder at size: GroupNorm statistics over millions
of voxels, and the released-configuration decoder against the reference path. Not timed."""
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from MedDiffusionLib.models import PatchVolumeAE
from MedDiffusionLib.models.kernels import FastGroupNorm, channel_moments, use_fast_kernels

RELEASED = Path(__file__).resolve().parents[1] / "benchmarks" / "released_configs.json"


def test_fast_group_norm_statistics_stay_exact_over_millions_of_voxels():
    g = torch.Generator().manual_seed(0)
    # 48 channels x 56^3 voxels (8.4 M values) with a non-zero mean, as decoder activations have
    x = (torch.randn(1, 48, 56, 56, 56, generator=g) * 0.7 + 1.5).contiguous(memory_format=torch.channels_last_3d)
    norm = torch.nn.GroupNorm(24, 48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
        truth = F.group_norm(x.double(), 24, norm.weight.double(), norm.bias.double(), 1e-6)
        contiguous = F.group_norm(x.contiguous(), 24, norm.weight, norm.bias, 1e-6)  # PyTorch's accurate kernel
        norm.__class__ = FastGroupNorm
        fast = norm(x)
        s, ss = channel_moments(x)
    assert fast.is_contiguous(memory_format=torch.channels_last_3d)
    err, err_contiguous = ((v.double() - truth).abs().max().item() for v in (fast, contiguous))
    assert err <= 2 * err_contiguous + 1e-6, (err, err_contiguous)  # float32 rounding of the output only
    xd = x.double()
    torch.testing.assert_close(s[0], xd.sum((0, 2, 3, 4)), rtol=1e-7, atol=0)
    torch.testing.assert_close(ss[0], (xd * xd).sum((0, 2, 3, 4)), rtol=1e-7, atol=0)
    # contiguous input and autograd take PyTorch's own kernel (same numbers as nn.GroupNorm)
    y = torch.randn(2, 48, 4, 4, 4, requires_grad=True)
    torch.testing.assert_close(norm(y), F.group_norm(y, 24, norm.weight, norm.bias, 1e-6))


def test_fast_released_decoder_matches_reference_at_64_cubed():
    """Released 8x decoder (random weights), 64^3 output: fast mode within 5e-5 of the reference
    path (measured 2.7e-5; 1.1e-4 with PyTorch's channels-last GroupNorm, 1.7e-3 at 128^3)."""
    cfg = json.loads(RELEASED.read_text())["8x"]["autoencoder"]
    torch.manual_seed(0)
    ae = PatchVolumeAE(**cfg).eval()
    z = torch.randn(1, 8, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = ae.decoder(z)
        fast_dec = use_fast_kernels(copy.deepcopy(ae.decoder)).to(memory_format=torch.channels_last_3d)
        fast = fast_dec(z)
    assert (fast - ref).abs().max().item() < 5e-5

"""Fan-beam CT and k-space operators."""

import pytest
import torch

from MedDiffusionLib.operators import (FanBeamGeometry, FanBeamOperator, attenuation_to_hu, gaussian_column_mask,
                                       hu_to_attenuation, poisson_disc_mask, zero_filled_recon)


def _grid(g):
    h, w = g.image_size
    ys = (torch.arange(h) - (h - 1) / 2) * g.pixel
    xs = (torch.arange(w) - (w - 1) / 2) * g.pixel
    return torch.meshgrid(ys, xs, indexing="ij")


@pytest.fixture(scope="module")
def geo():
    return FanBeamGeometry(image_size=(128, 128), pixel=2.0, views=40, bins=256)


def test_uniform_disk_reconstructs_to_its_value(geo):
    op = FanBeamOperator(geo)
    yy, xx = _grid(geo)
    disk = ((xx ** 2 + yy ** 2) < 80.0 ** 2).float() * 0.02
    rec = op.fbp(op(disk))
    inner = (xx ** 2 + yy ** 2) < 48.0 ** 2
    assert abs(rec[inner].mean().item() / 0.02 - 1) < 0.01


def test_forward_projection_matches_chord_length(geo):
    op = FanBeamOperator(geo)
    yy, xx = _grid(geo)
    r, mu = 80.0, 0.02
    sino = op(((xx ** 2 + yy ** 2) < r ** 2).float() * mu)
    u_iso = (torch.arange(geo.bins) - (geo.bins - 1) / 2) * geo.detector_bin / geo.magnification
    s = geo.source_iso * u_iso / torch.sqrt(geo.source_iso ** 2 + u_iso ** 2)  # ray distance from the isocentre
    chord = 2 * torch.sqrt(torch.clamp(r ** 2 - s ** 2, min=0)) * mu
    inside = s.abs() < 0.8 * r
    for view in (0, 13, 27):
        rel = ((sino[view][inside] - chord[inside]).abs() / chord[inside]).max()
        assert rel < 0.02, (view, rel)
    assert sino[:, s.abs() > 1.05 * r].abs().max() < 1e-6


def test_adjoint_identity(geo):
    op = FanBeamOperator(geo)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *geo.image_size, generator=g)
    y = torch.randn(3, geo.views, geo.bins, generator=g)
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)


def test_error_falls_with_more_views():
    yy, xx = _grid(FanBeamGeometry(image_size=(96, 96), pixel=2.0))
    phantom = ((xx ** 2 + yy ** 2) < 70 ** 2).float() * 0.02 + (((xx - 20) ** 2 + yy ** 2) < 15 ** 2).float() * 0.01
    errs = []
    for views in (40, 120, 360):
        op = FanBeamOperator(FanBeamGeometry(image_size=(96, 96), pixel=2.0, views=views, bins=192))
        rec = op.fbp(op(phantom))
        mask = (xx ** 2 + yy ** 2) < 60 ** 2
        errs.append(((rec - phantom)[mask] ** 2).mean().sqrt().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[0] > 2 * errs[2]


def test_hu_conversion_round_trip():
    hu = torch.tensor([-1000.0, 0.0, 1000.0])
    torch.testing.assert_close(attenuation_to_hu(hu_to_attenuation(hu)), hu)
    assert hu_to_attenuation(torch.tensor(-1000.0)) == 0


def test_gradients_flow_through_forward_and_fbp(geo):
    op = FanBeamOperator(geo)
    x = torch.rand(1, *geo.image_size, requires_grad=True)
    op.fbp(op(x)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: gaussian_column_mask((128, 96), 8.0, seed=1),
                                  lambda: poisson_disc_mask((64, 64), 8.0, seed=1)])
def test_mask_acceleration_and_centre(make):
    m = make()
    acc = m.numel() / m.sum().item()
    assert 8 * 0.9 <= acc <= 8 * 1.1
    h, w = m.shape
    assert m[h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1].all()
    assert torch.equal(make(), m)  # seeded


def test_zero_filled_recon():
    img = torch.rand(2, 32, 48)
    torch.testing.assert_close(zero_filled_recon(img, torch.ones(32, 48, dtype=torch.bool)), img, atol=1e-5, rtol=1e-5)
    rec = zero_filled_recon(img, gaussian_column_mask((32, 48), 4.0, seed=2))
    assert rec.shape == img.shape and not torch.allclose(rec, img, atol=1e-2)
    with pytest.raises(ValueError, match="does not match"):
        zero_filled_recon(img, torch.ones(4, 4, dtype=torch.bool))

"""Samplers: batch > 1 equals per-item runs, progress and cancellation, res broadcasting."""
import pytest
import torch

from MedDiffusionLib.models.biflownet import BiFlowNet
from MedDiffusionLib.schedulers import Cancelled, GaussianDiffusion, ddim_timesteps


@pytest.fixture(scope="module")
def tiny(parity_bf):
    net = BiFlowNet(**parity_bf["config"]).eval()
    net.load_state_dict(parity_bf["state_dict"])
    return net


def test_ddim_batch_matches_single_items(tiny):
    gd = GaussianDiffusion()
    z = torch.randn(2, 8, 8, 8, 16)
    y = torch.tensor([1, 4])
    res = torch.tensor([8, 8, 16]) / 64.0  # 1-D res with batch 2 (official code fails here)
    with torch.no_grad():
        both = gd.sample_ddim(lambda x, t: tiny(x, t, y, res), z, steps=5)
        single = [gd.sample_ddim(lambda x, t, i=i: tiny(x, t, y[i:i + 1], res), z[i:i + 1], steps=5) for i in range(2)]
    assert both.shape == z.shape
    torch.testing.assert_close(both, torch.cat(single), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


def test_ddpm_step_draws_exactly_one_randn_like(tiny):
    gd = GaussianDiffusion(timesteps=1000)
    z = torch.randn(2, 8, 8, 8, 8)
    y = torch.tensor([0, 3])
    res = torch.tensor([0.125] * 3)
    with torch.no_grad():
        for t in (999, 0):
            torch.manual_seed(5)
            gd.ddpm_step(lambda x, tt: tiny(x, tt, y, res), z, t)
            after_step = torch.randn(4)
            torch.manual_seed(5)
            torch.randn_like(z)
            assert torch.equal(after_step, torch.randn(4)), f"RNG use differs at t={t}"


def test_progress_and_cancel():
    gd = GaussianDiffusion()
    seen = []
    out = gd.sample_ddim(lambda x, t: torch.zeros_like(x), torch.randn(1, 1, 2, 2, 2), steps=7,
                         progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 7) for i in range(1, 8)]
    assert torch.isfinite(out).all()
    counter = {"n": 0}

    def cancel():
        counter["n"] += 1
        return counter["n"] > 3

    with pytest.raises(Cancelled):
        gd.sample_ddpm(lambda x, t: torch.zeros_like(x), torch.randn(1, 1, 2, 2, 2), cancel=cancel)
    assert counter["n"] == 4


def test_ddim_timesteps_rules():
    ts = ddim_timesteps(100)
    assert ts[0] == 999 and ts[-1] == 0 and ts[-2] == 10 and len(ts) == 100
    assert ddim_timesteps(1).tolist() == [0]
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    with pytest.raises(ValueError):
        ddim_timesteps(1001)


def test_q_sample_matches_closed_form():
    gd = GaussianDiffusion()
    x0, noise = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = gd.q_sample(x0, t, noise)
    ab = gd.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    # inverting is well conditioned only away from t=999 (1/sqrt(abar_999) ~ 6e4)
    torch.testing.assert_close(gd.predict_start(xt[:2], t[:2], noise[:2]), x0[:2], atol=1e-5, rtol=1e-5)

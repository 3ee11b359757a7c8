"""Steppable samplers and the one loop: batch > 1 equals per-item runs, the official RNG stream,
progress/cancel/callback, sampler+steps resolution, and why the schedulers are our own."""
import math

import pytest
import torch

from MedDiffusionLib.errors import Cancelled, UserError
from MedDiffusionLib.models.biflownet import BiFlowNet
from MedDiffusionLib.pipelines.loop import denoise
from MedDiffusionLib.schedulers import (SCHEDULERS, GaussianDiffusion, SchedulerOutput, cosine_beta_schedule,
                                        ddim_timesteps, draw_noise, make_scheduler, resolve_sampling)


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
        both = denoise(make_scheduler("ddim", gd, 5), lambda x, t: tiny(x, t, y, res), z)
        single = [denoise(make_scheduler("ddim", gd, 5), lambda x, t, i=i: tiny(x, t, y[i:i + 1], res), z[i:i + 1])
                  for i in range(2)]
    assert both.shape == z.shape
    torch.testing.assert_close(both, torch.cat(single), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


def test_ddpm_step_draws_exactly_one_randn_like(tiny):
    sch = make_scheduler("ddpm")
    z = torch.randn(2, 8, 8, 8, 8)
    y = torch.tensor([0, 3])
    res = torch.tensor([0.125] * 3)
    with torch.no_grad():
        for t in (999, 0):
            eps = tiny(z, torch.full((2,), t), y, res)
            torch.manual_seed(5)
            sch.step(eps, t, z)
            after_step = torch.randn(4)
            torch.manual_seed(5)
            torch.randn_like(z)
            assert torch.equal(after_step, torch.randn(4)), f"RNG use differs at t={t}"


def test_ddpm_loop_equals_the_official_update_written_out():
    """The steppable DDPM run equals the official ancestral update written out from the float64
    schedule (posterior mean/variance stored float32), step for step on the same global RNG stream."""
    gd = GaussianDiffusion()
    fake_eps = lambda x, t: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1, 1).float() / 1000  # noqa: E731
    z = torch.randn(1, 2, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    sch = make_scheduler("ddpm", gd)
    assert sch.timesteps.tolist() == list(range(999, -1, -1)) and sch.num_train_timesteps == 1000
    torch.manual_seed(9)
    got = denoise(sch, fake_eps, z)
    torch.manual_seed(9)
    x = z
    for t in range(999, -1, -1):
        tt = torch.full((1,), t)
        x0 = (gd.sqrt_recip_alphas_cumprod[t] * x - gd.sqrt_recipm1_alphas_cumprod[t] * fake_eps(x, tt)).clamp(-1, 1)
        mean = gd.posterior_mean_coef1[t] * x0 + gd.posterior_mean_coef2[t] * x
        noise = torch.randn_like(x)
        x = mean + (0.0 if t == 0 else 1.0) * (0.5 * gd.posterior_log_variance_clipped[t]).exp() * noise
    assert torch.equal(got, x)


def test_progress_cancel_and_callback():
    seen, calls = [], []
    sch = make_scheduler("ddim", steps=7)
    out = denoise(sch, lambda x, t: torch.zeros_like(x), torch.randn(1, 1, 2, 2, 2),
                  progress=lambda i, n: seen.append((i, n)),
                  callback=lambda i, t, lat, x0: calls.append((i, t, lat.shape, float(x0.abs().max()))))
    assert seen == [(i, 7) for i in range(1, 8)]
    assert [c[:2] for c in calls] == list(enumerate(sch.timesteps.tolist()))
    assert all(c[2] == (1, 1, 2, 2, 2) and c[3] <= 1.0 for c in calls)  # latents and clamped x0
    assert torch.isfinite(out).all()
    counter = {"n": 0}

    def cancel():
        counter["n"] += 1
        return counter["n"] > 3

    with pytest.raises(Cancelled):
        denoise(make_scheduler("ddpm"), lambda x, t: torch.zeros_like(x), torch.randn(1, 1, 2, 2, 2), cancel=cancel)
    assert counter["n"] == 4
    from MedDiffusionLib import schedulers
    assert schedulers.Cancelled is Cancelled  # one class for the library and its front ends


def test_step_api_shape():
    x = torch.randn(1, 1, 2, 2, 2)
    for name in SCHEDULERS:
        sch = make_scheduler(name, steps=None)
        out = sch.step(torch.zeros_like(x), int(sch.timesteps[0]), x)
        assert isinstance(out, SchedulerOutput) and out.prev_sample.shape == x.shape
        prev, x0 = out  # unpacks like diffusers' (prev_sample, pred_original_sample)
        assert x0.abs().max() <= 1
        with pytest.raises(ValueError, match="not in this run"):
            sch.step(torch.zeros_like(x), 1234, x)
    sch = make_scheduler("dpm++")
    assert sch.num_inference_steps == 20
    sch.set_timesteps(4)
    assert sch.timesteps.tolist() == ddim_timesteps(4).tolist()


def test_ddim_timesteps_rules():
    ts = ddim_timesteps(100)
    assert ts[0] == 999 and ts[-1] == 0 and ts[-2] == 10 and len(ts) == 100
    assert ddim_timesteps(1).tolist() == [0]
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    with pytest.raises(ValueError):
        ddim_timesteps(1001)


def test_resolve_sampling():
    assert resolve_sampling(None, None) == ("ddpm", 1000)
    assert resolve_sampling("dpm++", None) == ("dpm++", 20)
    assert resolve_sampling("ddim", None) == ("ddim", 100)
    assert resolve_sampling("ddim", 7) == ("ddim", 7)
    defaults = {"sampler": "ddim", "steps": 50}
    assert resolve_sampling(None, None, defaults) == ("ddim", 50)
    assert resolve_sampling("dpm++", None, defaults) == ("dpm++", 20)  # defaults' steps belong to its sampler
    assert resolve_sampling(None, None, {"sampler": "ddpm", "steps": 1000}) == ("ddpm", 1000)
    assert resolve_sampling("ddpm", None, num_train_timesteps=50) == ("ddpm", 50)
    for bad in (("ddpm", 10), ("ddim", 0), ("ddim", 1001), ("euler", None)):
        with pytest.raises(UserError):
            resolve_sampling(*bad)


def test_why_not_diffusers_schedulers():
    """diffusers' DDIM/DPM-Solver schedulers cannot reproduce the official run on the same betas:
    (1) its DDIM 'linspace' spacing rounds where the official list truncates, and its step goes to
    t - T//n, not to the next listed timestep; (2) its schedule clips betas at 0.999 in float32,
    the official one at 0.9999 in float64."""
    official = ddim_timesteps(100).tolist()
    rounded = torch.linspace(0, 999, 100).round().long().flip(0).tolist()  # diffusers timestep_spacing="linspace"
    assert official != rounded and sum(a != b for a, b in zip(official, rounded)) > 40
    stride_prev = [t - 1000 // 100 for t in official[:-1]]
    assert stride_prev != official[1:]  # the official previous timestep is the next list element
    betas = cosine_beta_schedule(1000)
    assert betas.dtype == torch.float64 and math.isclose(float(betas.max()), 0.9999)
    assert float(betas.clamp(max=0.999).max()) != float(betas.max())


def test_q_sample_matches_closed_form():
    gd = GaussianDiffusion()
    x0, noise = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = gd.q_sample(x0, t, noise)
    ab = gd.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    # inverting is well conditioned only away from t=999 (1/sqrt(abar_999) ~ 6e4)
    torch.testing.assert_close(gd.predict_start(xt[:2], t[:2], noise[:2]), x0[:2], atol=1e-5, rtol=1e-5)


def test_per_sample_generators_draw_what_a_batch_of_one_draws(tiny):
    """A list of generators (one per sample): sample i's noise, in the initial latents and in every
    DDPM step, is what a one-sample run seeded with seeds[i] draws, whatever the batch."""
    shape = (3, 8, 8, 8, 8)
    seeds = [7, 11, 7]
    both = draw_noise(shape, [torch.Generator().manual_seed(s) for s in seeds], "cpu")
    for i, s in enumerate(seeds):
        assert torch.equal(both[i:i + 1], draw_noise((1, *shape[1:]), torch.Generator().manual_seed(s), "cpu"))
    assert not torch.equal(both[0], both[1]) and torch.equal(both[0], both[2])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        draw_noise(shape, [torch.Generator(), torch.Generator()], "cpu")
    # the DDPM loop: sample 1 of a seeded pair == a one-sample loop with its own generator
    y, res = torch.tensor([0, 3]), torch.tensor([0.125] * 3)
    z = torch.randn(2, 8, 8, 8, 8)
    def run(zz, yy, gens):
        return denoise(_short_ddpm(), lambda x, t: tiny(x, t, yy, res), zz, gens)

    with torch.no_grad():
        pair = run(z, y, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
        alone = run(z[1:], y[1:], [torch.Generator().manual_seed(2)])
    torch.testing.assert_close(pair[1:], alone, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and not the batch's second draw from one generator
        shared = run(z, y, torch.Generator().manual_seed(2))
    assert (shared[1:] - alone).abs().max() > 1e-2


def _short_ddpm():
    """A DDPM scheduler stepped over the last 4 timesteps only (each step draws noise)."""
    sch = make_scheduler("ddpm")
    sch.timesteps = sch.timesteps[-4:]
    return sch

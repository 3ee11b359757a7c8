"""Accuracy of the fast paths against the reference paths (not timed: see Testing/benchmarks)."""
import copy

import pytest
import torch

from MedDiffusionLib.models import BiFlowNet, PatchVolumeAE
from MedDiffusionLib.pipelines.loop import denoise
from MedDiffusionLib.schedulers import GaussianDiffusion, make_scheduler

AE_ARGS = ("n_hiddens", "downsample", "image_channels", "norm_type", "num_groups", "embedding_dim", "n_codes", "patch_size")


@pytest.fixture(scope="module")
def ae(parity_ae):
    m = PatchVolumeAE(**{k: parity_ae["config"][k] for k in AE_ARGS}).eval()
    m.load_state_dict(parity_ae["state_dict"])
    return m


def test_seamless_tiles_beat_official_tiles(ae):
    from MedDiffusionLib.decoding import decode_official, decode_seamless
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 8, 8, 12, 16, generator=g) * 0.5
    with torch.no_grad():
        whole = ae.decode(lat)
        idx = ae.quantize(lat)
        official = decode_official(ae, idx, 4)
        seamless = decode_seamless(ae, idx, tile=6, overlap=3)
        one_tile = decode_seamless(ae, idx, tile=16, overlap=4)
    torch.testing.assert_close(one_tile, whole, atol=1e-5, rtol=1e-5)  # one tile = whole-volume decode
    err_official = (official - whole).abs().mean().item()
    err_seamless = (seamless - whole).abs().mean().item()
    # random test weights, global mid-block attention: blending removes ~40 % of the tiling error
    # (measured 0.016 vs 0.028); on trained weights see the benchmark
    assert err_seamless < 0.75 * err_official, (err_seamless, err_official)
    # no seam: the jump across the official tile border (image voxel 32 along W) shrinks
    border_official = (official[..., 32] - official[..., 31]).abs().mean()
    border_seamless = (seamless[..., 32] - seamless[..., 31]).abs().mean()
    border_whole = (whole[..., 32] - whole[..., 31]).abs().mean()
    assert abs(border_seamless - border_whole) < abs(border_official - border_whole)


def test_dpm_solver_converges_to_the_ddim_ode_solution():
    """Data ~ N(mu, s^2) per voxel: the optimal noise prediction is known in closed form, so every
    sampler solves the same probability-flow ODE exactly; 1000-step DDIM is the reference."""
    gd = GaussianDiffusion()
    mu, s2 = 0.2, 0.3 ** 2

    def exact_eps(x, t):
        ab = gd.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return (x - ab.sqrt() * mu) * (1 - ab).sqrt() / (ab * s2 + 1 - ab)

    z = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = denoise(make_scheduler("ddim", gd, 1000), exact_eps, z)
    err = {(name, n): (denoise(make_scheduler(sampler, gd, n), exact_eps, z) - ref).abs().mean().item()
           for name, sampler in (("ddim", "ddim"), ("dpm", "dpm++")) for n in (10, 20, 50)}
    assert err[("dpm", 50)] < err[("dpm", 20)] < err[("dpm", 10)], err
    assert err[("ddim", 50)] < err[("ddim", 20)] < err[("ddim", 10)], err
    for n in (10, 20, 50):
        assert err[("dpm", n)] < err[("ddim", n)], err   # second order beats first order
    assert err[("dpm", 50)] < 2e-3, err  # measured 1.0e-3 (DDIM 50: 1.0e-2)


@pytest.fixture()
def fresh_models(parity_ae, parity_bf):
    """A new (autoencoder, BiFlowNet) pair per test: pipelines switch kernels in place."""
    ae = PatchVolumeAE(**{k: parity_ae["config"][k] for k in AE_ARGS})
    ae.load_state_dict(parity_ae["state_dict"])
    net = BiFlowNet(**parity_bf["config"])
    net.load_state_dict(parity_bf["state_dict"])
    return ae, net


def test_bf16_pipeline_close_to_fp32(fresh_models):
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    ae, net = fresh_models
    lat = torch.rand(1, 8, 8, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ref = GenerationPipeline(ae, net, device="cpu").decode(lat)
    fast = GenerationPipeline(ae, net, device="cpu", precision="bf16").decode(lat)
    err = (fast - ref).abs()
    assert err.mean() < 0.01 * ref.abs().mean() + 1e-3 and err.max() < 0.1 * ref.abs().max(), (err.mean(), err.max())
    with pytest.raises(ValueError, match="precision"):
        GenerationPipeline(ae, net, device="cpu", precision="int8")


# -- fast kernels (oneDNN convolutions, channels-last decoder) ------------------------------------------
def _ops_run(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_fast_convolutions_measure_their_kernel_and_every_kernel_agrees():
    """FastConv3d times gemm / oneDNN / oneDNN channels-last (and a matrix product for 1x1x1) once
    per signature; whichever wins, and every candidate forced, equals the reference convolution."""
    from MedDiffusionLib.models.kernels import FastConv3d, kernel_choices, use_fast_kernels, uses_fast_kernels
    model = torch.nn.Sequential(torch.nn.Conv3d(12, 12, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(12, 4, 1)).eval()
    x = torch.randn(1, 12, 16, 16, 16)
    keys = dict(model.state_dict())
    with torch.inference_mode():
        ref = model(x)
        ref_ops = _ops_run(lambda: model[0](x))
        use_fast_kernels(model)
        assert type(model[0]) is FastConv3d and type(model[2]) is FastConv3d
        fast = model(x)
        assert {k[0] for k in kernel_choices()} >= {"conv3d"}
        assert any(k[1] == (1, 12, 16, 16, 16) and k[3] == (12, 12, 3, 3, 3) for k in kernel_choices())
        for conv, inp in ((model[0], x), (model[2], torch.nn.functional.silu(model[0](x))),
                          (model[0], x.contiguous(memory_format=torch.channels_last_3d))):
            want = torch.nn.functional.conv3d(inp, conv.weight, conv.bias, conv.stride, conv.padding)
            for choice in ("gemm", "onednn", "onednn-cl") + (("matmul",) if conv.kernel_size == (1, 1, 1) else ()):
                got = conv._run(conv._plan(inp, choice), inp)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=choice)
    assert "aten::slow_conv3d_forward" in ref_ops  # what PyTorch's size rule picks for this batch-1 map
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == list(keys)
    # training (gradients) takes the usual path, and switching back restores the reference module
    y = torch.randn(1, 12, 8, 8, 8, requires_grad=True)
    model[0](y).sum().backward()
    assert y.grad is not None
    use_fast_kernels(model, False)
    assert not uses_fast_kernels(model) and type(model[0]) is torch.nn.Conv3d and type(model[2]) is torch.nn.Conv3d


def test_fast_convolution_drops_taps_that_only_read_padding():
    """On an axis of one voxel a centred 3-tap kernel only reads zeros beside the centre: the
    cropped convolution (a third of the weight) gives the same result, in every kernel."""
    from MedDiffusionLib.models.kernels import use_fast_kernels
    conv = torch.nn.Conv3d(48, 40, 3, padding=1).eval()
    x = torch.randn(2, 48, 1, 2, 3)
    with torch.inference_mode():
        ref = conv(x)
        use_fast_kernels(conv)
        plan = conv._plan(x, "gemm")
        assert plan[1] == (True, False, False) and plan[2] == [0, 1, 1]
        for choice in ("gemm", "onednn", "onednn-cl"):
            torch.testing.assert_close(conv._run(conv._plan(x, choice), x), ref, atol=1e-5, rtol=1e-5)
        conv.weight.mul_(2)  # a changed parameter rebuilds the cached cropped weight
        torch.testing.assert_close(conv(x), 2 * ref - conv.bias.view(1, -1, 1, 1, 1), atol=1e-5, rtol=1e-5)


def test_fast_attention_paths_equal_the_reference_modules():
    """DiT attention with heads padded to 16 channels, and the fused voxel attention block
    (channels-last tokens, one layer norm, projection and residual in one addmm)."""
    from MedDiffusionLib.models.dit import Attention
    from MedDiffusionLib.models.kernels import FastAttention, FastAttentionResidual, use_fast_kernels
    from MedDiffusionLib.models.unet_blocks import attention_or_identity
    torch.manual_seed(0)
    attn = Attention(72, 8).eval()
    tokens = torch.randn(4, 512, 72)
    block = attention_or_identity(True, 48, 4).eval()
    with torch.no_grad():
        block.fn.norm.gamma.uniform_(0.5, 1.5)
    vox = torch.randn(2, 48, 3, 4, 5)
    with torch.inference_mode():
        ref_a, ref_v = attn(tokens), block(vox)
        use_fast_kernels(attn), use_fast_kernels(block)
        assert type(attn) is FastAttention and type(block) is FastAttentionResidual
        for width in (9, 16):
            torch.testing.assert_close(attn._attend(tokens, width), ref_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn(tokens), ref_a, atol=1e-5, rtol=1e-5)
        for inp in (vox, vox.contiguous(memory_format=torch.channels_last_3d)):
            torch.testing.assert_close(block(inp), ref_v, atol=1e-5, rtol=1e-5)
    use_fast_kernels(attn, False), use_fast_kernels(block, False)
    assert type(attn) is Attention and type(block).__name__ == "Residual"


def test_fast_mode_matches_reference_on_the_bundled_model():
    """Bundled chest-ct-mini: one BiFlowNet forward and a decode agree with the reference kernels
    within the reference README's single-forward tolerance (1e-4), a sampler run within its loop one."""
    from MedDiffusionLib.models.kernels import uses_fast_kernels
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu", mode="reference")
    assert not uses_fast_kernels(pipe.net) and not uses_fast_kernels(pipe.ae)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 16, 16, 16, generator=g)
    lat = torch.rand(1, 8, 16, 16, 16, generator=g) * 2 - 1
    t, y, res = torch.tensor([500]), torch.tensor([1]), torch.full((3,), 0.25)
    with torch.inference_mode():
        ref_eps = pipe.net(x, t, y, res)
        ref_img = pipe.decode(lat)
        ref_lat = pipe.sample_latents(1, (64, 64, 64), seed=0, sampler="dpm++", steps=5)
        pipe.set_mode("fast")
        assert uses_fast_kernels(pipe.net) and uses_fast_kernels(pipe.ae)
        assert pipe.ae.decoder.conv_first.weight.is_contiguous(memory_format=torch.channels_last_3d)
        fast_eps = pipe.net(x, t, y, res)
        fast_img = pipe.decode(lat)
        fast_lat = pipe.sample_latents(1, (64, 64, 64), seed=0, sampler="dpm++", steps=5)
    torch.testing.assert_close(fast_eps, ref_eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_img, ref_img, atol=1e-4, rtol=1e-4)  # what users see
    # a deterministic sampler loop: the reference README's DDIM-loop tolerance (measured 5e-4 after 5 DPM++ steps)
    torch.testing.assert_close(fast_lat, ref_lat, atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        pipe.set_mode("turbo")


def test_inplace_inference_ops_keep_training_gradients(ae):
    """The decoder accumulates residuals in place only without autograd; with gradients it matches."""
    z = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        ref = ae.decoder(z)
    zz = z.clone().requires_grad_(True)
    out = ae.decoder(zz)
    out.mean().backward()
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)
    assert zz.grad is not None and torch.isfinite(zz.grad).all()


# -- torch.compile with graceful fallback ----------------------------------------------------------------
def test_compiled_biflownet_matches_eager_or_falls_back(parity_bf):
    import shutil

    import torch._dynamo
    import torch._inductor.config as inductor_config

    from MedDiffusionLib.models.kernels import CompiledOrEager, use_fast_kernels
    net = BiFlowNet(**parity_bf["config"]).eval()
    net.load_state_dict(parity_bf["state_dict"])
    use_fast_kernels(net)  # what the fast pipeline compiles
    x = torch.randn(1, 8, 8, 8, 16)
    t, y, res = torch.tensor([10]), torch.tensor([0]), torch.tensor([8.0, 8.0, 16.0]) / 64
    with torch.inference_mode():
        ref = net(x, t, y, res)
        # no C++ compiler: a warning, then the eager result
        torch._dynamo.reset()
        with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
            broken = CompiledOrEager(net)
            with pytest.warns(RuntimeWarning, match="torch.compile is not usable"):
                out = broken(x, t, y, res)
        assert broken.compiled is None and "compiler" in broken.error.lower()
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        torch._dynamo.reset()
        compiled = CompiledOrEager(net)
        out = compiled(x, t, y, res)
        out2 = compiled(x, t * 50, y, res)
    if shutil.which("g++") or shutil.which("c++"):
        assert compiled.error is None and compiled.compiled is not None
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(out2, net(x, t * 50, y, res), atol=1e-4, rtol=1e-4)


# -- memory-aware seamless decoding and the estimator ----------------------------------------------------
def test_decode_plan_follows_memory_and_blended_tiles_stay_close_to_whole(fresh_models):
    from MedDiffusionLib.decoding import choose_decode_tile, decode_official, decode_peak_bytes
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    ae, net = fresh_models
    lat = torch.rand(1, 8, 16, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    nh, f = ae.config["n_hiddens"], ae.compression
    whole_need = decode_peak_bytes(nh, f, (16, 16, 16))
    roomy = GenerationPipeline(ae, net, device="cpu", memory_limit_bytes=10 * whole_need)
    tight = GenerationPipeline(ae, net, device="cpu", memory_limit_bytes=0.5 * whole_need)
    # its own module copies: the kernel mode lives in the modules, shared ones would switch roomy/tight too
    reference = GenerationPipeline(copy.deepcopy(ae), copy.deepcopy(net), device="cpu", mode="reference")
    assert roomy.decode_plan((16, 16, 16)).method == "whole"
    plan = tight.decode_plan((16, 16, 16), tiling="seamless")
    assert plan.method == "seamless" and 8 <= plan.tile < 16
    assert decode_peak_bytes(nh, f, (16, 16, 16), plan.tile) <= 0.5 * whole_need
    assert choose_decode_tile(nh, f, (16, 16, 16), None) is None  # unknown budget: whole
    whole = roomy.decode(lat)
    tiled = tight.decode(lat, tiling="seamless")
    official = reference.decode(lat, tiling="official")  # authors' 32^3 tiles cover 16^3 whole
    torch.testing.assert_close(official, whole, atol=1e-4, rtol=1e-4)
    err = (tiled - whole).abs().mean().item()
    assert 0 < err < 0.05, err
    official8 = decode_official(reference.ae, reference.ae.quantize(lat), 8)
    assert err < (official8 - whole).abs().mean().item()  # blended tiles beat the official seams
    with pytest.raises(ValueError, match="memory limit"):
        GenerationPipeline(ae, net, device="cpu", memory_limit_bytes=0)


def test_decode_estimator_shape():
    from MedDiffusionLib.decoding import decode_peak_bytes
    from MedDiffusionLib.estimate import estimate_run
    # the reference path adds slow_conv3d's im2col buffers on small maps; tiles cost less than whole
    assert decode_peak_bytes(8, 4, (16,) * 3, mode="reference") > decode_peak_bytes(8, 4, (16,) * 3, mode="fast")
    assert decode_peak_bytes(48, 8, (64,) * 3, 32) < 0.2 * decode_peak_bytes(48, 8, (64,) * 3)
    # 512^3 with the released 8x decoder in 24 GB: tiles, and the plan fits the budget
    est = estimate_run(None, 8, (512, 512, 512), 1000, "cuda", budget_bytes=24 * 2 ** 30 * 0.8)
    assert est.tile is not None and est.peak_bytes <= 24 * 2 ** 30 * 0.8
    assert "tiles" in est.text("cuda") and "GB GPU memory" in est.text("cuda")


@torch.library.custom_op("meddiffusion_test::oom_if", mutates_args=())
def _oom_if(x: torch.Tensor, fail: bool) -> torch.Tensor:
    if fail:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated inside the compiled graph)")
    return x * 2


@_oom_if.register_fake
def _(x, fail):
    return torch.empty_like(x)


def test_compiled_call_lets_errors_of_the_run_through():
    """Only compilation failures fall back to eager: an out-of-memory or a shape error from the
    compiled call surfaces as itself, and compilation stays on for the next call."""
    import torch._dynamo

    from MedDiffusionLib.models.kernels import CompiledOrEager

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)

        def forward(self, x, fail):
            return _oom_if(self.conv(x), fail)

    net = Net().eval()
    torch._dynamo.reset()
    wrapped = CompiledOrEager(net, backend="eager")  # dynamo tracing without the slow C++ codegen
    x = torch.randn(1, 2, 4, 4, 4)
    with torch.inference_mode():
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            wrapped(x, True)
        assert wrapped.compiled is not None and wrapped.error is None
        with pytest.raises(RuntimeError) as info:  # wrong channel count
            wrapped(torch.randn(1, 3, 4, 4, 4), False)
        assert not isinstance(info.value, torch.OutOfMemoryError)
        assert wrapped.compiled is not None and wrapped.error is None
        torch.testing.assert_close(wrapped(x, False), net(x, False))


def test_kernel_choices_are_recorded_so_every_process_runs_the_same(monkeypatch, tmp_path):
    """The first measurement of a signature is recorded in the cache; a later process (simulated
    by clearing this one's memory) adopts it instead of measuring again, whatever its timings say."""
    import time as _time

    from MedDiffusionLib.models.kernels import choices  # the module whose globals measured_choice reads
    monkeypatch.setenv("MEDDIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(choices, "_CHOICES", {})
    key = ("test-op", (1, 2, 3))
    first = choices.measured_choice(key, {"slow": lambda: _time.sleep(0.003), "quick": lambda: None})
    assert first == "quick"
    assert choices._choices_file().is_file() and tmp_path in choices._choices_file().parents
    monkeypatch.setattr(choices, "_CHOICES", {})
    choices._stored_choices_at.cache_clear()
    calls = []
    again = choices.measured_choice(key, {"slow": lambda: calls.append(1), "quick": lambda: _time.sleep(0.003)})
    assert again == "quick" and not calls  # recorded choice, nothing timed

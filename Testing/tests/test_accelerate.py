"""accelerate(module, plan) returns the fast form as a new module and never changes the reference
module: its classes, weights, layouts and outputs stay as they were (a FLOP count or a parity run on
the reference after accelerating must still see the reference)."""
import pytest
import torch
from torch import nn

from MedDiffusionLib.models.kernels import AccelerationPlan, FastConv3d, accelerate, kernel_mode
from MedDiffusionLib.pipelines.generation import GenerationPipeline


@pytest.fixture(scope="module")
def models():
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu", mode="reference")
    return pipe.net, pipe.ae


def _fingerprint(module: nn.Module):
    return ([type(m) for m in module.modules()],
            [(n, p.data_ptr(), p.stride(), p.clone()) for n, p in module.named_parameters()])


def _same(a, b) -> bool:
    return a[0] == b[0] and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a[1], b[1]))


def test_reference_network_unchanged_and_fast_form_close(models):
    net, _ = models
    x = torch.randn(1, 8, 8, 8, 8)
    t, y, res = torch.tensor([500]), torch.tensor([0]), torch.full((1, 3), 8 / 64)
    with torch.inference_mode():
        before_out = net(x, t, y, res)
    before = _fingerprint(net)
    fast = accelerate(net)
    assert fast.applied == ("kernels",)  # BiFlowNet has no decoder
    assert fast.module is not net and kernel_mode(net) == "reference" and kernel_mode(fast.module) == "fast"
    assert any(type(m) is FastConv3d for m in fast.module.modules())
    with torch.inference_mode():
        fast_out = fast.module(x, t, y, res)
        after_out = net(x, t, y, res)
    assert _same(before, _fingerprint(net))
    assert torch.equal(before_out, after_out)
    torch.testing.assert_close(fast_out, before_out, atol=1e-5, rtol=1e-5)
    # the weights are shared, not copied
    ptrs = {p.data_ptr() for p in net.parameters()}
    assert all(p.data_ptr() in ptrs for p in fast.module.parameters())


def test_reference_decoder_layout_unchanged(models):
    _, ae = models
    before = _fingerprint(ae)
    fast = accelerate(ae, AccelerationPlan())
    assert fast.applied == ("kernels", "channels_last_decoder")
    assert _same(before, _fingerprint(ae))
    conv = fast.module.decoder.conv_first.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    assert ae.decoder.conv_first.weight.is_contiguous()
    idx = torch.randint(0, ae.config["n_codes"], (1, 8, 8, 8))
    with torch.inference_mode():
        torch.testing.assert_close(fast.module.decode(idx, quantize=False), ae.decode(idx, quantize=False),
                                   atol=1e-5, rtol=1e-5)


def test_the_check_can_fail(models):
    """The fingerprint sees an in-place class swap (what the old in-place switch did)."""
    net, _ = models
    before = _fingerprint(net)
    conv = next(m for m in net.modules() if type(m) is nn.Conv3d)
    conv.__class__ = FastConv3d
    try:
        assert not _same(before, _fingerprint(net))
    finally:
        conv.__class__ = nn.Conv3d


def test_flop_efficiency_rows_count_the_reference_and_time_the_fast_form(models):
    """The benchmark's FLOP-efficiency rows (small shapes here, so that they cannot rot): FLOPs are
    counted on the reference modules, which stay reference."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import benchmark

    net, ae = models
    table = benchmark.Table()
    rows = benchmark.flop_efficiency_rows("cpu", net, ae, (8, 8, 8), table, repeat=2)
    assert [r["case"] for r in rows] == ["BiFlowNet forward 8x8x8 latent", "decode 8x8x8 latent"]
    for r in rows:
        assert r["flops"] > 1e6 and r["seconds"] > 0 and 0 < r["share_of_peak"] < 2
    assert kernel_mode(net) == "reference" and kernel_mode(ae) == "reference"
    assert [round(r["speedup"], 6) for r in table.rows] == [round(r["share_of_peak"], 6) for r in rows]


def test_pipelines_on_the_same_modules_keep_their_own_modes(models):
    """The kernel mode is a pipeline's own setting: two pipelines built on the same modules run
    different kernels, and neither changes the modules it was given."""
    net, ae = models
    fast = GenerationPipeline(ae, net, None, "cpu", mode="fast")
    ref = GenerationPipeline(ae, net, None, "cpu", mode="reference")
    assert (fast.mode, ref.mode) == ("fast", "reference")
    assert kernel_mode(fast.net) == kernel_mode(fast.ae) == "fast" and ref.net is net and ref.ae is ae
    fast.set_mode("reference")
    ref.set_mode("fast")
    assert fast.net is net and kernel_mode(ref.net) == "fast" and kernel_mode(net) == kernel_mode(ae) == "reference"
    with pytest.raises(Exception, match="unknown mode"):
        fast.set_mode("turbo")


# -- one reference forward per block; the fused conditioning lives in the fast subclasses ------------
MODEL_FILES = ("biflownet.py", "controlnet.py", "dit.py", "unet_blocks.py")


def test_reference_classes_have_one_plain_forward():
    """The reference blocks take only the reference arguments, and the model modules do not import
    the kernels package (no detection of the fast mode by module type)."""
    import ast
    import inspect
    from pathlib import Path

    from MedDiffusionLib.models import dit, unet_blocks

    def params(fn) -> list[str]:
        return list(inspect.signature(fn).parameters)

    assert params(unet_blocks.ResnetBlock.forward) == ["self", "x", "emb"]
    assert params(unet_blocks.Block.forward) == ["self", "x", "scale_shift"]
    assert not hasattr(unet_blocks.Block, "fused")
    assert params(dit.DiTBlock.forward) == ["self", "x", "c", "skip"]
    assert params(dit.FinalLayer.forward) == ["self", "x", "c"]
    models_dir = Path(unet_blocks.__file__).parent
    for name in MODEL_FILES:
        tree = ast.parse((models_dir / name).read_text(encoding="utf-8"))
        imported = {(n.level, n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any("kernels" in mod for _, mod in imported), name
        assert "FastConv3d" not in (models_dir / name).read_text(encoding="utf-8"), name


def test_fast_form_swaps_the_copy_and_keeps_the_reference(models):
    """accelerate gives the copy the fused-conditioning classes; the reference network keeps its
    plain classes and state dict, and its forward equals the fast form's to the parity tolerance."""
    from MedDiffusionLib.models import BiFlowNet
    from MedDiffusionLib.models.dit import DiTBlock, FinalLayer
    from MedDiffusionLib.models.kernels import FastBiFlowNet, FastDiTBlock, FastFinalLayer, FastResnetBlock
    from MedDiffusionLib.models.unet_blocks import ResnetBlock

    net, _ = models
    plain = {BiFlowNet, ResnetBlock, DiTBlock, FinalLayer}
    before_types = {type(m) for m in net.modules()}
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    fast = accelerate(net).module
    assert type(net) is BiFlowNet and {type(m) for m in net.modules()} == before_types
    assert before_types >= plain and not any(type(m).__name__.startswith("Fast") for m in net.modules())
    assert type(fast) is FastBiFlowNet
    assert {FastResnetBlock, FastDiTBlock, FastFinalLayer} <= {type(m) for m in fast.modules()}
    assert list(fast.state_dict()) == list(before_state)
    after_state = net.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 8, 8, 16, generator=g)
    t, y, res = torch.tensor([10, 700]), torch.tensor([0, 3]), torch.tensor([8.0, 8.0, 16.0]) / 64
    with torch.inference_mode():
        ref = net(x, t, y, res)
        got = fast(x, t, y, res)
        prepared = fast.prepared_conditioning(fast.conditioning(t, y, res))
    assert set(prepared) == {m for m in fast.modules() if isinstance(m, (DiTBlock, FinalLayer))
                             or (isinstance(m, ResnetBlock) and m.mlp is not None)}
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # inference reads the prepared rows; with autograd recording the fast form takes the reference
    # conditioning (and the same result)
    calls = []
    fast.prepared_conditioning = lambda emb: calls.append(1) or type(fast).prepared_conditioning(fast, emb)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, t, y, res), got, atol=0, rtol=0)
    assert calls == [1]
    xg = x.clone().requires_grad_(True)
    out = fast(xg, t, y, res)
    (grad,) = torch.autograd.grad(out.abs().mean(), xg)  # no .grad left on the shared parameters
    assert calls == [1] and torch.isfinite(grad).all()
    torch.testing.assert_close(out.detach(), ref, atol=1e-4, rtol=1e-4)


def test_fused_conditioning_follows_weight_updates_and_switches_back():
    """The stacked projection is rebuilt after an in-place update of a shared weight, and switching
    the form back to reference restores the plain classes and drops the derived caches."""
    from MedDiffusionLib.models import BiFlowNet
    from MedDiffusionLib.models.kernels import use_fast_kernels

    torch.manual_seed(0)
    net = BiFlowNet(dim=12, dim_mults=(1, 1, 2, 3, 4), channels=4, cond_classes=3, attn_heads=1, resnet_groups=4,
                    DiT_num_heads=2, patch_size=2).eval()
    fast = accelerate(net).module
    x = torch.randn(1, 4, 8, 8, 8)
    t, y, res = torch.tensor([5]), torch.tensor([1]), torch.full((3,), 8 / 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, t, y, res), net(x, t, y, res), atol=1e-5, rtol=1e-5)
        net.mid_block1.mlp[1].bias.add_(0.5)  # shared with the fast form
        net.IntraPatchFlow_mid[0].adaLN_modulation[1].weight.mul_(1.5)
        torch.testing.assert_close(fast(x, t, y, res), net(x, t, y, res), atol=1e-5, rtol=1e-5)
    assert "_fused_projection_cache" in fast.__dict__
    use_fast_kernels(fast, False)
    assert type(fast) is BiFlowNet and "_fused_projection_cache" not in fast.__dict__
    assert {type(m) for m in fast.modules()} == {type(m) for m in net.modules()}


@pytest.mark.parametrize("dit_branch", [True, False])
def test_controlnet_fast_form_matches_reference(dit_branch):
    """ControlLDM: the fused conditioning of the base and the ControlNet (with and without its DiT
    input stage) gives the reference noise."""
    from MedDiffusionLib.models.controlnet import ControlLDM, ControlNet
    from MedDiffusionLib.models.kernels import FastBiFlowNet, FastControlNet

    torch.manual_seed(0)
    ldm = ControlLDM(dim=12, dim_mults=(1, 1, 2, 3, 4), channels=4, cond_classes=3, attn_heads=1, resnet_groups=4,
                     DiT_num_heads=2, patch_size=2, hint_channel=3, dit_branch=dit_branch).eval()
    with torch.no_grad():  # the zero convolutions would hide the ControlNet's output
        for p in ldm.controlnet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    fast = accelerate(ldm).module
    assert type(fast.controlnet) is FastControlNet and type(fast.noise_estimator) is FastBiFlowNet
    assert type(ldm.controlnet) is ControlNet
    x, hint = torch.randn(1, 4, 8, 8, 16), torch.randn(1, 3, 8, 8, 16)
    t, y, res = torch.tensor([300]), torch.tensor([2]), torch.tensor([8.0, 8.0, 16.0]) / 64
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, t, hint, y, res), ldm(x, t, hint, y, res), atol=1e-5, rtol=1e-5)
        for a, b in zip(fast.controlnet(x, hint, t, y, res), ldm.controlnet(x, hint, t, y, res)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

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

"""Planners and estimates stay bounded whatever a client asks for; the memory estimate counts every
volume; cancel reaches every phase of a run (decode tiles, cubes and volumes included); the time
estimate uses a measured sampler step."""
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT
from MedDiffusionLib import estimate
from MedDiffusionLib.decoding import (choose_decode_tile, choose_exact_tile, decode_official, decode_peak_bytes,
                                      exact_decode_bytes, plan_decode)
from MedDiffusionLib.errors import Cancelled
from MedDiffusionLib.estimate import estimate_run
from MedDiffusionLib.pipelines.generation import GenerationPipeline

HUGE = 10 ** 29


# -- the tile searches before they were made logarithmic: the oracles ------------------------------------
def old_choose_decode_tile(n_hiddens, compression, latent_dhw, budget_bytes, mode="fast", device="cpu", min_tile=8):
    whole = decode_peak_bytes(n_hiddens, compression, latent_dhw, None, mode, device)
    if budget_bytes is None or whole <= budget_bytes:
        return None
    for t in range(max(latent_dhw) - 1, min_tile - 1, -1):
        if decode_peak_bytes(n_hiddens, compression, latent_dhw, t, mode, device) <= budget_bytes:
            return t
    return min_tile


def old_choose_exact_tile(n_hiddens, compression, latent_dhw, device_budget, store_budget, shared, min_tile=1):
    for t in range(max(int(v) for v in latent_dhw), min_tile - 1, -1):
        dev, store = exact_decode_bytes(n_hiddens, compression, latent_dhw, t)
        if shared:
            if device_budget is None or dev + store <= device_budget:
                return t
        elif (device_budget is None or dev <= device_budget) and (store_budget is None or store <= store_budget):
            return t
    return None


SHAPES = [(1, 1, 1), (2, 3, 5), (8, 8, 8), (1, 40, 128), (16, 16, 16), (13, 24, 7), (32, 32, 32), (24, 64, 40),
          (64, 64, 64), (128, 1, 2), (100, 128, 96), (128, 128, 128)]
MODELS = [(8, 4), (48, 8), (48, 4), (1, 8)]  # (n_hiddens, compression): bundled, released, and degenerate widths


def budgets(whole: float) -> list[float]:
    return [whole * 2.0 ** -k for k in range(0, 16)] + [1e3, 1e6]


def test_seamless_tile_equals_the_linear_scan():
    for nh, f in MODELS:
        for shape in SHAPES:
            for mode in ("fast", "reference"):
                for device in ("cpu", "cuda"):
                    whole = decode_peak_bytes(nh, f, shape, None, mode, device)
                    for b in budgets(whole):
                        assert choose_decode_tile(nh, f, shape, b, mode, device) == \
                            old_choose_decode_tile(nh, f, shape, b, mode, device), (nh, f, shape, mode, device, b)


def test_exact_tile_equals_the_linear_scan():
    for nh, f in MODELS:
        for shape in SHAPES:
            dev, store = exact_decode_bytes(nh, f, shape, max(shape))
            for b in budgets(dev + store):
                for shared, store_budget in ((True, None), (False, None), (False, store), (False, 0.5 * store)):
                    assert choose_exact_tile(nh, f, shape, b, store_budget, shared) == \
                        old_choose_exact_tile(nh, f, shape, b, store_budget, shared), (nh, f, shape, b, shared)


def test_planners_return_at_once_for_absurd_sizes():
    """10**29 latent voxels per side: before, a linear scan that never ended (a worker hung for ever)."""
    for shape in ((HUGE, 8, 8), (HUGE, HUGE, HUGE), (HUGE, 1, 1)):
        assert choose_exact_tile(8, 4, shape, None, None, True) == HUGE  # no budget: the whole side
        assert choose_exact_tile(8, 4, shape, 8e9, None, True) is None  # the stage maps never fit
        assert choose_decode_tile(8, 4, shape, 8e9) == 8  # nothing fits: the smallest tile
        assert choose_decode_tile(8, 4, shape, 8e9, "reference") == 8
        plan = plan_decode(8, 4, shape, 8e9)  # nothing fits: exact in the smallest cubes, maps on disk
        assert plan.method == "exact" and plan.store == "disk" and plan.tile == 1 and plan.device_bytes > 8e9
    # sizes beyond a float: infinite, never an OverflowError
    est = estimate_run(None, 4, (10 ** 200, 10 ** 200, 64), 1000, "cpu", n_hiddens=8, budget_bytes=8e9, net_dim=12)
    assert est.peak_bytes == float("inf") and est.seconds == float("inf")
    assert "unbounded" in est.text("cpu") and "forever" in est.text("cpu")
    est = estimate_run(None, 4, (HUGE * 32, 64, 64), 1000, "cpu", n_hiddens=8, budget_bytes=8e9, net_dim=12,
                       step_seconds=0.01)
    assert est.peak_bytes > 1e30 and est.method == "exact" and est.disk_bytes > 1e30
    # one sampler step of a huge batch is never timed
    assert estimate_run(None, 4, (64, 64, 64), 1000, "cpu", volumes=HUGE, n_hiddens=8).peak_bytes > 1e30


def test_memory_estimate_counts_every_volume():
    out_bytes = 4 * 64 ** 3
    one = estimate_run(None, 4, (64, 64, 64), 3, "cpu", volumes=1, n_hiddens=8, net_dim=12)
    many = estimate_run(None, 4, (64, 64, 64), 3, "cpu", volumes=10000, n_hiddens=8, net_dim=12)
    assert many.peak_bytes >= 10000 * out_bytes and many.output_bytes == 10000 * out_bytes
    assert many.sampling_bytes >= 10000 * one.sampling_bytes * 0.99
    # calibration: the bundled model's sampler (dpm++) measured 2.3-2.85 MB per volume at 64^3
    assert 2.3e6 <= one.sampling_bytes <= 3.5e6
    # on a GPU the outputs go to host RAM
    gpu = estimate_run(None, 4, (64, 64, 64), 3, "cuda", volumes=100, n_hiddens=8, net_dim=12)
    assert gpu.host_bytes >= 100 * out_bytes and "RAM for outputs" in gpu.text("cuda")


# -- the bundled model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    return GenerationPipeline.from_pretrained(device="cpu")


class CancelAfter:
    """``cancel()`` that turns true on its ``n``-th call and counts the calls."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def _latent(d: int, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 8, d, d, d, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_cancel_between_exact_decode_cubes(bundled):
    whole = decode_peak_bytes(bundled.ae.config["n_hiddens"], bundled.compression, (16, 16, 16))
    tight = GenerationPipeline(bundled.ae, bundled.net, bundled.entry, device="cpu", memory_limit_bytes=0.85 * whole)
    plan = tight.decode_plan((16, 16, 16))
    assert plan.method == "exact" and plan.tile < 16  # several cubes
    # calls: before the volume, before the plan runs, before the mid-block, then one per cube
    cancel = CancelAfter(5)
    with pytest.raises(Cancelled):
        tight.decode(_latent(16), cancel=cancel)
    assert cancel.calls == 5  # stopped at the second cube of the first pass
    never = CancelAfter(10 ** 9)
    out = tight.decode(_latent(16), cancel=never)
    assert out.shape == (1, 1, 64, 64, 64) and never.calls > 5 * (16 // plan.tile) ** 3


def test_cancel_between_seamless_and_official_tiles(bundled):
    whole = decode_peak_bytes(bundled.ae.config["n_hiddens"], bundled.compression, (16, 16, 16))
    tight = GenerationPipeline(bundled.ae, bundled.net, bundled.entry, device="cpu", memory_limit_bytes=0.5 * whole)
    assert tight.decode_plan((16, 16, 16), tiling="seamless").method == "seamless"
    cancel = CancelAfter(4)  # before the volume, before the plan runs, first tile, second tile
    with pytest.raises(Cancelled):
        tight.decode(_latent(16), tiling="seamless", cancel=cancel)
    assert cancel.calls == 4
    cancel = CancelAfter(2)
    with pytest.raises(Cancelled):
        decode_official(bundled.ae, bundled.ae.quantize(_latent(8)), 4, cancel=cancel)
    assert cancel.calls == 2


def test_cancel_between_volumes_and_before_sampling(bundled):
    cancel = CancelAfter(3)  # volume 1 (and its plan) decoded whole, then the check before volume 2
    with pytest.raises(Cancelled):
        bundled.decode(_latent(4, batch=2), cancel=cancel)
    assert cancel.calls == 3
    with pytest.raises(Cancelled):
        bundled.generate(size_xyz=(32, 32, 32), sampler="dpm++", steps=2, cancel=lambda: True)


class Sleeper(nn.Module):
    """A noise network whose forward takes a known time."""

    def forward(self, x, t, y, res):
        time.sleep(0.03)
        return torch.zeros_like(x)


def test_time_estimate_uses_a_measured_step(bundled):
    assert bundled.time_forward(Sleeper(), (32, 32, 32), 1) >= 0.03
    est = bundled.estimate((32, 32, 32), 50)
    assert est.step_seconds is not None and est.step_seconds > 0 and "measured" in est.text("cpu")
    assert est.seconds >= 50 * est.step_seconds
    fast = estimate_run(None, 4, (32, 32, 32), 50, "cpu", n_hiddens=8, step_seconds=0.03, decode_s_per_voxel=1e-6)
    slow = estimate_run(None, 4, (32, 32, 32), 500, "cpu", n_hiddens=8, step_seconds=0.03, decode_s_per_voxel=1e-6)
    assert fast.seconds >= 50 * 0.03 and slow.seconds > 9 * fast.seconds
    # no measurement: the registry / FLOP model, still positive and growing with steps
    cheap = bundled.estimate((32, 32, 32), 50, measure=False)
    assert cheap.step_seconds is None and 0 < cheap.seconds < bundled.estimate((32, 32, 32), 500, measure=False).seconds


def test_controlled_estimate_counts_the_controlnet(bundled):
    from MedDiffusionLib.pipelines.conditioned import ControlledPipeline

    path = ROOT / "MedDiffusionLib" / "resources" / "models" / "chest-ct-mini-sparse-view" / "controlnet.safetensors"
    pipe = ControlledPipeline(bundled, *_load_controlnet(Path(path)))
    base = bundled.estimate((32, 32, 32), 10, measure=False)
    ctl = pipe.estimate((32, 32, 32), 10, measure=False)
    assert ctl.peak_bytes > base.peak_bytes and ctl.sampling_bytes > base.sampling_bytes
    assert ctl.seconds > base.seconds
    measured = pipe.estimate((32, 32, 32), 10)
    assert measured.step_seconds is not None and measured.step_seconds > 0
    with pytest.raises(Cancelled):
        from MedDiffusionLib.data.volumes import Volume

        pipe.run(Volume.from_network(torch.zeros(32, 32, 32).numpy(), (4.8, 4.8, 4.3)), cancel=lambda: True)


def _load_controlnet(path: Path):
    from MedDiffusionLib.io.checkpoints import load_model, read_model_config

    return load_model(path, expect="controlnet"), read_model_config(path).get("meta", {})


def test_module_constants_are_sane():
    assert estimate.SAMPLER_STEP_OVERHEAD >= 1.0
    assert estimate.human_seconds(float("inf")) == "forever"

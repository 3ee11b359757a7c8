"""Exact tiled decoding (stage streaming): equal to the whole-volume decode to float rounding, for
several cube sizes, odd sizes, batch > 1, the bundled autoencoder and a released-configuration
decoder (random weights, small size). Not timed: see Testing/benchmarks."""
import json
from pathlib import Path

import pytest
import torch

from MedDiffusionLib.decoding import DecodePlan, decode, decode_seamless
from MedDiffusionLib.models import PatchVolumeAE
from MedDiffusionLib.models.kernels import use_fast_kernels

AE_ARGS = ("n_hiddens", "downsample", "image_channels", "norm_type", "num_groups", "embedding_dim", "n_codes", "patch_size")
RELEASED = Path(__file__).resolve().parents[1] / "benchmarks" / "released_configs.json"
EXACT = 1e-4  # model units (images are in [-1, 1])


@pytest.fixture(scope="module")
def bundled_ae(parity_ae):
    m = PatchVolumeAE(**{k: parity_ae["config"][k] for k in AE_ARGS}).eval()
    m.load_state_dict(parity_ae["state_dict"])
    return m


@pytest.fixture(scope="module")
def released_ae():
    cfg = json.loads(RELEASED.read_text())["8x"]["autoencoder"]
    torch.manual_seed(0)
    return PatchVolumeAE(**cfg).eval()


def _exact(ae, lat, tile):
    """The exact streamed decode of a float latent in ``tile``-cubes (maps in RAM)."""
    return decode(ae, ae.quantize(lat), DecodePlan("exact", tile))


def _max_err(ae, lat, tiles):
    with torch.no_grad():
        whole = ae.decode(lat)
        errs = {t: (_exact(ae, lat, t) - whole).abs().max().item() for t in tiles}
    return whole, errs


def test_exact_tiles_equal_whole_decode_bundled_odd_sizes_batch2(bundled_ae):
    lat = torch.randn(2, 8, 3, 5, 2, generator=torch.Generator().manual_seed(1)) * 0.5
    whole, errs = _max_err(bundled_ae, lat, (1, 2, 3))
    assert whole.shape == (2, 1, 24, 40, 16)
    assert max(errs.values()) <= EXACT, errs
    # the blended tiles of the same size are far from exact: GroupNorm and attention are global
    with torch.no_grad():
        blended = decode_seamless(bundled_ae, bundled_ae.quantize(lat), tile=2, overlap=1)
    assert (blended - whole).abs().max().item() > 100 * max(errs.values())


def test_exact_tiles_equal_whole_decode_released_decoder(released_ae):
    lat = torch.randn(1, 8, 3, 4, 2, generator=torch.Generator().manual_seed(2))
    whole, errs = _max_err(released_ae, lat, (1, 2))
    assert whole.shape == (1, 1, 24, 32, 16)
    assert max(errs.values()) <= EXACT, errs


def test_exact_tiles_on_fast_kernels_and_channels_last(parity_ae):
    ae = PatchVolumeAE(**{k: parity_ae["config"][k] for k in AE_ARGS}).eval()
    ae.load_state_dict(parity_ae["state_dict"])
    lat = torch.randn(1, 8, 4, 3, 5, generator=torch.Generator().manual_seed(3)) * 0.5
    with torch.no_grad():
        ref = ae.decode(lat)
        use_fast_kernels(ae)
        ae.decoder.to(memory_format=torch.channels_last_3d)
        tiled = _exact(ae, lat, 2)
    assert (tiled - ref).abs().max().item() <= EXACT


def test_pipeline_picks_exact_tiles_when_whole_does_not_fit(parity_ae, parity_bf):
    from MedDiffusionLib.decoding import decode_peak_bytes, exact_decode_bytes, plan_decode
    from MedDiffusionLib.models import BiFlowNet
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    ae = PatchVolumeAE(**{k: parity_ae["config"][k] for k in AE_ARGS})
    ae.load_state_dict(parity_ae["state_dict"])
    net = BiFlowNet(**parity_bf["config"])
    dhw = (8, 8, 8)
    nh, f = ae.config["n_hiddens"], ae.compression
    whole_need = decode_peak_bytes(nh, f, dhw)
    tight = GenerationPipeline(ae, net, device="cpu", memory_limit_bytes=0.9 * whole_need)
    plan = tight.decode_plan(dhw)
    assert plan.method == "exact" and 1 <= plan.tile < 8
    dev, store = exact_decode_bytes(nh, f, dhw, plan.tile)
    assert dev + store <= 0.9 * whole_need and dev < 0.5 * whole_need
    lat = torch.rand(1, 8, *dhw, generator=torch.Generator().manual_seed(4)) * 2 - 1
    tiled = tight.decode(lat)
    whole = tight.decode(lat, tiling="whole")
    assert (tiled - whole).abs().max().item() <= EXACT
    # too little memory even for the stage maps: still exact, the maps spill to disk (never blended
    # tiles unless asked for); the reference mode keeps the authors' rule
    spilled = plan_decode(nh, f, dhw, 1e3)
    assert spilled.method == "exact" and spilled.store == "disk" and spilled.tile == 1 and spilled.exact
    tight.set_mode("reference")
    assert tight.decode_plan((64, 64, 64), tiling="official").method == "official"


def test_exact_plan_for_512_cube_fits_24_gb_gpu():
    from MedDiffusionLib.decoding import decode_peak_bytes, exact_decode_bytes
    from MedDiffusionLib.estimate import estimate_run
    budget = 0.8 * 24 * 2 ** 30
    host = 256 * 2 ** 30
    est = estimate_run(None, 8, (512, 512, 512), 1000, "cuda", budget_bytes=budget, host_budget_bytes=host)
    assert est.method == "exact" and est.tile is not None and est.peak_bytes <= budget
    assert "exact decode" in est.text("cuda") and "RAM for decoder maps" in est.text("cuda")
    dev, store = exact_decode_bytes(48, 8, (64,) * 3, est.tile)
    assert store > dev and store < 128 * 2 ** 30
    # on a CPU the device working set is a small fraction of the whole decode at 128^3
    assert exact_decode_bytes(48, 8, (16,) * 3, 4)[0] < 0.25 * decode_peak_bytes(48, 8, (16,) * 3)


def test_stored_maps_peak_matches_the_estimate_and_skips_the_upsampled_maps(released_ae, monkeypatch):
    """The stage maps alive at once, counted as they are made and freed, peak within the estimate
    (exact_decode_bytes) and near it; no map of an up-sampling's width at the higher resolution is
    ever stored (those are recomputed cube by cube)."""
    import weakref

    from MedDiffusionLib.decoding import exact_decode_bytes
    from MedDiffusionLib.models.streaming_decode import StreamingDecoder

    live, peak, shapes = [0], [0], []
    made = StreamingDecoder._new_map

    def counting(self, like, channels, dhw, final=False):
        m = made(self, like, channels, dhw, final)
        n = m.numel() * m.element_size()
        live[0] += n
        peak[0] = max(peak[0], live[0])
        shapes.append((channels, tuple(dhw)))
        weakref.finalize(m, lambda: live.__setitem__(0, live[0] - n))
        return m

    monkeypatch.setattr(StreamingDecoder, "_new_map", counting)
    lat = torch.randn(1, 8, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = _exact(released_ae, lat, 2)
        whole = released_ae.decode(lat)
    assert (out - whole).abs().max().item() <= EXACT
    store = exact_decode_bytes(48, 8, (4, 4, 4), 2)[1]
    assert 0.8 * store <= peak[0] <= store, (peak[0], store)
    # released 8x decoder, latent 4^3: the up-sampled maps would be 192 x 16^3 and 96 x 32^3; the
    # residual blocks after them store their own widths (96, 48) at those sizes instead
    assert (192, (16, 16, 16)) not in shapes and (96, (32, 32, 32)) not in shapes
    assert (96, (16, 16, 16)) in shapes and (48, (32, 32, 32)) in shapes

"""Conditioned pipelines (segmentation -> CT, sparse-view reconstruction) and their error handling."""
import numpy as np
import pytest
import torch

from MedDiffusionLib.conditioning import image_hint, label_hint, one_hot_labels
from MedDiffusionLib.data.volumes import Volume
from MedDiffusionLib.io.checkpoints import CheckpointError, load_model
from MedDiffusionLib.metrics import dice, psnr, ssim
from MedDiffusionLib.models import BiFlowNet
from MedDiffusionLib.pipelines.conditioned import (ControlledPipeline, ct_labels_from_hu, reconstruct_sparse_view,
                                                   simulate_sparse_view, synthesize_from_labels, working_grid)
from MedDiffusionLib.pipelines.generation import GenerationPipeline
from test_controlnet_training import _cfg, _phantom, base_dir, pairs_dir  # noqa: F401  (fixtures)
from MedDiffusionLib.training.controlnet import ControlNetTrainer, find_pairs


@pytest.fixture(scope="module")
def labels_controlnet(base_dir, pairs_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cn")
    ControlNetTrainer(_cfg(base_dir, out, steps=2), log=lambda m: None).fit(find_pairs(pairs_dir), resume=False)
    return out / "controlnet.safetensors"


def _label_volume(shape=(60, 70, 50), spacing=(1.1, 0.9, 1.3)):
    hu = np.full(shape, -1000.0, np.float32)
    hu[10:50, 10:60, 10:40] = 40
    hu[20:30, 20:40, 15:30] = -800
    return Volume(ct_labels_from_hu(hu), np.diag([*spacing, 1.0]))


def test_synthesis_returns_on_input_grid(labels_controlnet, base_dir):  # noqa: F811
    pipe = ControlledPipeline.from_files(labels_controlnet, weights=base_dir, device="cpu")
    assert pipe.task == "labels" and pipe.hint_type == "labels"
    lab = _label_volume()
    fuzzy = lab.with_array(lab.array + 0.3)  # resampled label maps arrive as floats: rounded to labels
    steps = []
    out = pipe.run(fuzzy, seed=1, steps=2, callback=lambda i, t, lat, x0: steps.append((i, t, tuple(lat.shape))))
    assert [s[:2] for s in steps] == [(0, 999), (1, 0)]  # the default sampler is DDIM
    np.testing.assert_array_equal(out.array, synthesize_from_labels(lab, pipe, seed=1, sampler="ddim", steps=2).array)
    assert out.shape == lab.shape
    np.testing.assert_allclose(out.affine, lab.affine)
    lo, hi = pipe.hu_window()
    assert (lo, hi) == (-1000.0, 500.0)  # the window the targets were trained in, not a default
    assert out.array.min() >= lo and out.array.max() <= hi and np.isfinite(out.array).all()


def test_synthesis_bad_inputs(labels_controlnet, base_dir):  # noqa: F811
    pipe = ControlledPipeline.from_files(labels_controlnet, weights=base_dir, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        synthesize_from_labels(Volume(np.zeros((64, 64, 64)), np.eye(4)), pipe, steps=1)
    bad = _label_volume()
    bad.array[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"label values \[9\]"):
        synthesize_from_labels(bad, pipe, steps=1)
    with pytest.raises(ValueError, match="not sparse-view"):
        reconstruct_sparse_view(Volume(np.zeros((64, 64, 64)), np.eye(4)), pipe)


def test_controlnet_for_another_base_is_refused(labels_controlnet, base_dir, parity_bf):  # noqa: F811
    base = GenerationPipeline.from_pretrained(weights=base_dir, device="cpu")
    other = BiFlowNet(**parity_bf["config"])  # same shapes, different (random) weights
    from MedDiffusionLib.io.checkpoints import read_model_config
    meta = read_model_config(labels_controlnet)["meta"]
    with pytest.raises(CheckpointError, match="another base model"):
        ControlledPipeline(GenerationPipeline(base.ae, other, device="cpu"), load_model(labels_controlnet), meta)


def test_controlled_pipeline_composes_its_base(labels_controlnet, base_dir):  # noqa: F811
    """Settings pass through, the controlled pipeline runs in its base's kernel mode (switching it
    switches the base it is composed of), the modules given are never changed, and the noise model
    is one module over the base's own network."""
    from MedDiffusionLib.io.checkpoints import read_model_config
    from MedDiffusionLib.models.controlnet import ControlLDM
    from MedDiffusionLib.models.kernels import kernel_mode
    base = GenerationPipeline.from_pretrained(weights=base_dir, device="cpu", mode="fast", memory_limit_bytes=123e6)
    meta = read_model_config(labels_controlnet)["meta"]
    cp = ControlledPipeline(base, load_model(labels_controlnet), meta)
    assert cp.memory_limit_bytes == 123e6 and cp.mode == base.mode == "fast"
    assert cp.net is base.net and cp.noise_net.base is base.net
    assert "mode" not in vars(cp)  # the base's, never a copy
    assert cp.noise_model() is cp.noise_net  # eager: "compile" is the generation network's AOT package only
    given = [base._net_given, base._ae_given, cp._controlnet_given]
    kinds = [[type(m) for m in g.modules()] for g in given]
    cp.set_mode("reference")  # the composed base runs reference kernels too
    assert base.mode == cp.mode == "reference" and kernel_mode(cp.net) == kernel_mode(cp.controlnet) == "reference"
    base.set_mode("fast")
    assert cp.mode == "fast" and kernel_mode(cp.net) == kernel_mode(cp.noise_net.controlnet) == "fast"
    assert kinds == [[type(m) for m in g.modules()] for g in given]  # no module was switched in place
    # the pipeline's noise equals the official ControlLDM forward on the same weights
    ldm = ControlLDM(**{**base.net.config, "hint_channel": cp.controlnet.hint_channel,
                        "dit_branch": cp.controlnet.dit_branch, "control_scales": meta.get("control_scale", 1.0)})
    ldm.noise_estimator.load_state_dict(base.net.state_dict())
    ldm.controlnet.load_state_dict(cp.controlnet.state_dict())
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 8, 8, 8, 8, generator=g), torch.rand(1, cp.controlnet.hint_channel, 8, 8, 8, generator=g)
    t, y, res = torch.tensor([500]), torch.tensor([1]), torch.full((3,), 0.125)
    with torch.inference_mode():
        torch.testing.assert_close(cp.noise_net(x, t, y, res, hint=hint), ldm.eval()(x, t, hint, y, res),
                                   atol=1e-5, rtol=1e-5)


def test_hint_shape_mismatch_is_reported(labels_controlnet):
    cn = load_model(labels_controlnet)
    x = torch.randn(1, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="hint must be"):
        cn(x, torch.randn(1, 8, 8, 8, 8), torch.tensor([10]), torch.tensor([1]), torch.tensor([0.125] * 3))


def test_label_hints():
    lab = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    lab[0, 4:6, 4:6, 4:6] = 2  # a small structure, 8 voxels
    near = label_hint(lab, [0, 1, 2], (4, 4, 4), "nearest")
    area = label_hint(lab, [0, 1, 2], (4, 4, 4), "area")
    assert near.shape == area.shape == (1, 3, 4, 4, 4)
    torch.testing.assert_close(area.sum(1), torch.ones(1, 4, 4, 4))
    assert area[0, 2].sum() > 0  # area keeps small structures
    with pytest.raises(ValueError, match="not in the training labels"):
        one_hot_labels(lab, [0, 1])


def test_image_hint_rejects_nan(parity_ae):
    from MedDiffusionLib.models import PatchVolumeAE
    ae = PatchVolumeAE(**{k: parity_ae["config"][k] for k in ("n_hiddens", "downsample", "num_groups", "n_codes",
                                                               "patch_size")})
    img = torch.zeros(1, 1, 32, 32, 32)
    img[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        image_hint(ae, img)


def test_simulate_sparse_view_keeps_grid_and_is_close_to_ct():
    hu = _phantom(3)[:, :, :8]
    vol = Volume(hu, np.diag([2.0, 2.0, 3.0, 1.0]))
    fbp = simulate_sparse_view(vol, views=60, bins=192)
    assert fbp.shape == vol.shape
    np.testing.assert_allclose(fbp.affine, vol.affine)
    body = hu > -500
    assert abs(np.median(fbp.array[body]) - np.median(hu[body])) < 60  # soft tissue comes back near 40 HU
    nan = vol.with_array(np.where(body, np.nan, hu))
    with pytest.raises(ValueError, match="NaN"):
        simulate_sparse_view(nan, views=10, bins=64)


def test_working_grid_covers_field_of_view():
    vol = Volume(np.zeros((512, 512, 48)), np.diag([0.57, 0.57, 5.0, 1.0]))
    g = working_grid(vol, (4.8, 4.8, 4.3), 4)
    assert g.shape_dhw == (64, 64, 64)
    assert abs(g.spacing_xyz[0] * 64 - 512 * 0.57) < 1e-6


def test_metrics():
    a = torch.linspace(-1000, 1000, 8000).reshape(20, 20, 20)
    assert psnr(a, a) == float("inf") and abs(ssim(a, a) - 1) < 1e-6
    noisy = a + 100 * torch.randn_like(a)
    assert 15 < psnr(noisy, a) < 40 and ssim(noisy, a) < 0.99
    m = torch.zeros(10, 10, 10, dtype=torch.bool)
    m[2:5] = True
    assert dice(m, m) == 1 and dice(m, ~m) == 0

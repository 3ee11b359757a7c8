"""Generation pipeline and `meddiffusion generate`: results, geometry, and clear errors for bad input."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT
from MedDiffusionLib.cli import main
from MedDiffusionLib.data.volumes import read_volume
from MedDiffusionLib.io.checkpoints import save_model
from MedDiffusionLib.models import BiFlowNet, PatchVolumeAE
from MedDiffusionLib.devices import resolve_device
from MedDiffusionLib.errors import ResourceError, UserError
from MedDiffusionLib.pipelines.generation import GenerationPipeline, legal_size

AE_ARGS = ("n_hiddens", "downsample", "image_channels", "norm_type", "num_groups", "embedding_dim", "n_codes", "patch_size")


@pytest.fixture(scope="module")
def tiny_models(parity_ae, parity_bf):
    ae = PatchVolumeAE(**{k: parity_ae["config"][k] for k in AE_ARGS})
    ae.load_state_dict(parity_ae["state_dict"])
    net = BiFlowNet(**parity_bf["config"])
    net.load_state_dict(parity_bf["state_dict"])
    return ae.eval(), net.eval()


@pytest.fixture(scope="module")
def weights_dir(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    save_model(tiny_models[0], d / "autoencoder")
    save_model(tiny_models[1], d / "biflownet")
    return d


def test_pipeline_batch_and_seed(tiny_models):
    pipe = GenerationPipeline(*tiny_models, device="cpu")
    a = pipe.generate(1, (64, 64, 128), (1.0, 1.0, 2.0), seed=3, sampler="ddim", steps=3, num_volumes=2)
    b = pipe.generate(1, (64, 64, 128), (1.0, 1.0, 2.0), seed=3, sampler="ddim", steps=3, num_volumes=2)
    assert len(a) == 2 and a[0].image.shape == (128, 64, 64)  # (D, H, W) = (Z, X, Y)
    np.testing.assert_array_equal(a[0].image, b[0].image)
    assert not np.allclose(a[0].image, a[1].image)
    vol = a[0].volume()
    assert vol.shape == (64, 64, 128) and vol.spacing == (1.0, 1.0, 2.0)


def test_seeded_noise_matches_official_rng(tiny_models):
    """The official script calls torch.manual_seed(seed) and draws z with torch.randn."""
    pipe = GenerationPipeline(*tiny_models, device="cpu")
    seen = {}

    def capture(x, t, y, res):
        seen.setdefault("z", x.clone())
        return torch.zeros_like(x)

    pipe.sample_latents(1, (64, 64, 64), seed=11, sampler="ddim", steps=1, noise_net=capture)
    torch.manual_seed(11)
    assert torch.equal(seen["z"], torch.randn(1, 8, 8, 8, 8))


def test_legal_sizes():
    assert legal_size((64, 128, 192), 8) == (64, 128, 192)
    with pytest.raises(ValueError, match="96x96x96 or 128x128x128"):
        legal_size((100, 100, 100), 4)
    with pytest.raises(ValueError, match="positive"):
        legal_size((0, 64, 64), 8)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path needs a machine without it")
    with pytest.raises(ResourceError, match="sees no CUDA GPU") as info:
        resolve_device("cuda:1")
    assert info.value.field == "device"  # each front end names it its own way (--device, the panel's control)
    with pytest.raises(UserError, match="unknown device") as info:
        resolve_device("tpu")
    assert info.value.field == "device"
    with pytest.warns(RuntimeWarning, match="CPU"):
        assert resolve_device("auto").type == "cpu"


def test_cli_generate_writes_geometry_and_hu(weights_dir, tmp_path, capsys):
    out = tmp_path / "s.nrrd"
    rc = main(["generate", "--weights", str(weights_dir), "--class", "chest", "--size", "64", "64", "128",
               "--spacing", "0.8", "0.8", "2.5", "--sampler", "ddim", "--steps", "2", "--device", "cpu",
               "--hu-window", "-1000", "1000", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    vol = read_volume(out)
    assert vol.shape == (64, 64, 128)
    np.testing.assert_allclose(vol.affine, np.diag([0.8, 0.8, 2.5, 1.0]), atol=1e-6)
    assert vol.array.min() >= -1000 and vol.array.max() <= 1000 and vol.array.dtype == np.float32


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model id"),
    (["--class", "9"], "unknown class"),
    (["--class", "MR T1"], "does not know class 3"),
    (["--size", "100", "64", "64"], "nearest legal sizes"),
    (["--sampler", "ddim", "--steps", "0"], "positive"),
    (["--sampler", "ddim", "--steps", "-3"], "positive"),
    (["--num-volumes", "0"], "must be positive"),
    (["--hu-window", "100", "-100"], "LO < HI"),
])
def test_cli_bad_input(args, message, tmp_path, capsys):
    out = tmp_path / "x.nii.gz"
    rc = main(["generate", *args, "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_existing_output_and_bad_folder(tmp_path, capsys):
    out = tmp_path / "x.nii.gz"
    out.write_bytes(b"keep me")
    assert main(["generate", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["generate", "--out", str(tmp_path / "no" / "x.nii.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_corrupt_and_wrong_family_weights(weights_dir, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(weights_dir, bad)
    (bad / "biflownet.safetensors").write_bytes(b"\x00" * 100)
    assert main(["generate", "--weights", str(bad), "--size", "64", "64", "64", "--spacing", "1", "1", "1",
                 "--out", str(tmp_path / "a.nii.gz"), "--device", "cpu", "--quiet"]) == 2
    assert "biflownet.safetensors" in capsys.readouterr().err
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(weights_dir / "autoencoder.safetensors", swapped / "biflownet.safetensors")
    shutil.copy(weights_dir / "autoencoder.json", swapped / "biflownet.json")
    shutil.copy(weights_dir / "autoencoder.safetensors", swapped / "autoencoder.safetensors")
    shutil.copy(weights_dir / "autoencoder.json", swapped / "autoencoder.json")
    assert main(["generate", "--weights", str(swapped), "--size", "64", "64", "64", "--spacing", "1", "1", "1",
                 "--out", str(tmp_path / "a.nii.gz"), "--device", "cpu", "--quiet"]) == 2
    assert "biflownet model is needed" in capsys.readouterr().err
    assert not (tmp_path / "a.nii.gz").exists()


def test_cli_out_of_memory_message(weights_dir, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(GenerationPipeline, "generate", boom)
    rc = main(["generate", "--weights", str(weights_dir), "--size", "64", "64", "64", "--spacing", "1", "1", "1",
               "--out", str(tmp_path / "a.nii.gz"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "ran out of memory" in err and "smaller size" in err and "Traceback" not in err


def test_cli_interrupt_leaves_no_file(weights_dir, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(GenerationPipeline, "generate", interrupt)
    out = tmp_path / "a.nii.gz"
    rc = main(["generate", "--weights", str(weights_dir), "--size", "64", "64", "64", "--spacing", "1", "1", "1",
               "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 130 and not out.exists() and "no output file" in capsys.readouterr().err


def test_registry_matches_schema():
    import jsonschema
    reg = json.loads((ROOT / "Resources" / "models.json").read_text())
    jsonschema.validate(reg, json.loads((ROOT / "Resources" / "models.schema.json").read_text()))
    ids = [m["id"] for m in reg["models"]]
    assert reg["default_model"] in ids and len(ids) == len(set(ids))
    for m in reg["models"]:
        step = 8 * int(m["compression"][0])
        for c in m["classes"]:
            for s in c["sizes"]:
                assert all(v % step == 0 for v in s["image_xyz"]), (m["id"], s)


def test_registry_schema_rejects_bad_entry():
    import jsonschema
    reg = json.loads((ROOT / "Resources" / "models.json").read_text())
    reg["models"][0]["compression"] = "16x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(reg, json.loads((ROOT / "Resources" / "models.schema.json").read_text()))


def test_cli_reference_flag_and_memory_cap(weights_dir, tmp_path, capsys):
    """--reference runs the plain kernels; --max-memory-gb makes the fast path decode in exact tiles
    (announced before the run) whose result equals the whole-volume decode to float rounding."""
    common = ["generate", "--weights", str(weights_dir), "--size", "64", "64", "128", "--spacing", "1", "1", "1",
              "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--quiet"]
    assert main(common + ["--reference", "--out", str(tmp_path / "ref.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "whole-volume decode" in err
    assert main(common + ["--max-memory-gb", "0.1", "--out", str(tmp_path / "capped.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "exact decode in" in err and "latent tiles" in err, err
    ref = read_volume(tmp_path / "ref.nii.gz").array
    capped = read_volume(tmp_path / "capped.nii.gz").array
    diff = np.abs(ref - capped)
    assert diff.mean() < 1e-3, diff.mean()  # same volume: fast kernels and exact tiles, 2 DDIM steps
    assert main(common + ["--max-memory-gb", "-1", "--out", str(tmp_path / "bad.nii.gz")]) == 2
    assert "memory limit must be positive" in capsys.readouterr().err


def test_generate_records_the_steps_it_runs_and_feeds_the_callback(tiny_models):
    pipe = GenerationPipeline(*tiny_models, device="cpu")
    seen = []
    out = pipe.generate(1, (64, 64, 64), (1.0, 1.0, 1.0), sampler="dpm++", steps=None,
                        callback=lambda i, t, lat, x0: seen.append(i))
    assert out[0].meta["sampler"] == "dpm++" and out[0].meta["steps"] == 20 == len(seen)


def test_unconditional_model_gives_a_user_error(tiny_models, parity_bf):
    net = BiFlowNet(**{**parity_bf["config"], "cond_classes": None}).eval()
    pipe = GenerationPipeline(tiny_models[0], net, device="cpu")
    with pytest.raises(UserError, match="unconditional"):
        pipe.generate(1, (64, 64, 64), (1.0, 1.0, 1.0), sampler="ddim", steps=1)
    assert pipe.generate(0, (64, 64, 64), (1.0, 1.0, 1.0), sampler="ddim", steps=1)[0].image.shape == (64, 64, 64)

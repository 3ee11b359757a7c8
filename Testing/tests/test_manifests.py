"""Released-size models have exactly the official state-dict keys, shapes and order."""
import json

import pytest
import torch

from conftest import REFERENCE
from MedDiffusionLib.models.autoencoder import PatchVolumeAE
from MedDiffusionLib.models.biflownet import BiFlowNet
from MedDiffusionLib.models.controlnet import ControlNet


def _manifest(name):
    return json.loads((REFERENCE / f"manifest_{name}.json").read_text())


def _build(name):
    m = _manifest(name)
    cfg = m["config"]
    if name.startswith("patchvolume"):
        y = cfg["yaml"]
        kw = {k: y["model"][k] for k in ("n_hiddens", "downsample", "norm_type", "num_groups", "embedding_dim", "n_codes")}
        return PatchVolumeAE(image_channels=y["dataset"]["image_channels"], patch_size=y["dataset"]["patch_size"], **kw), m
    if name.startswith("biflownet"):
        return BiFlowNet(**cfg["constructor"]), m
    c = dict(cfg["constructor_ControlLDM"])
    c.pop("control_scales")
    c.pop("num_mid_DiT")
    return ControlNet(hint_channel=cfg["ControlNet_effective"]["hint_channel"], **c), m


@pytest.mark.parametrize("name", ["patchvolume_8x_autoencoder", "patchvolume_4x_autoencoder", "biflownet_8x",
                                  "biflownet_4x", "controlnet_8x", "controlnet_4x"])
def test_state_dict_matches_manifest(name):
    with torch.device("meta"):
        model, m = _build(name)
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == m["params"]
    n_float = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert n_float == m["n_params"]


@pytest.mark.parametrize("name", ["patchvolume_8x_autoencoder", "biflownet_8x"])
def test_released_size_model_accepts_random_manifest_state_dict(name):
    model, m = _build(name)
    g = torch.Generator().manual_seed(1)
    state = {}
    for key, shape, dtype in m["params"]:
        if dtype == "int64":
            state[key] = torch.randint(0, 10, shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    first_key = m["params"][1][0]
    assert torch.equal(model.state_dict()[first_key], state[first_key])

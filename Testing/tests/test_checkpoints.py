"""Official checkpoint layouts built here (Lightning AE .ckpt with an OmegaConf config,
BiFlowNet .pt with an argparse Namespace), safe loading, clear errors, our safetensors format."""
import argparse
import sys
import types

import pytest
import torch

from MedDiffusionLib.io.checkpoints import (CheckpointError, load_any, load_model, load_official_autoencoder,
                                            load_official_biflownet, save_model)
from MedDiffusionLib.models.autoencoder import PatchVolumeAE
from MedDiffusionLib.models.biflownet import BiFlowNet


# -- stand-ins with the module paths of the real OmegaConf classes, used only to *write* files --
def _fake_omegaconf():
    mods = {}
    for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.listconfig", "omegaconf.base", "omegaconf.nodes"):
        mods[name] = types.ModuleType(name)

    def make(mod, cls_name):
        cls = type(cls_name, (), {"__module__": mod, "__qualname__": cls_name,
                                  "__getstate__": lambda self: dict(self.__dict__),
                                  "__setstate__": lambda self, s: self.__dict__.update(s)})
        setattr(mods[mod], cls_name, cls)
        return cls

    classes = {n: make(m, n) for m, n in (("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
                                         ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"),
                                         ("omegaconf.nodes", "AnyNode"))}
    return mods, classes


def _omega(value, classes, parent=None):
    """Build objects with the same pickled structure as OmegaConf.create(value)."""
    import typing
    if isinstance(value, dict):
        obj = classes["DictConfig"]()
        meta = classes["ContainerMetadata"]()
        meta.__dict__.update(ref_type=typing.Any, object_type=dict, optional=True, key=None, flags={},
                             key_type=typing.Any, element_type=typing.Any)
        obj.__dict__.update(_metadata=meta, _parent=parent, _content={k: _omega(v, classes, obj) for k, v in value.items()})
        return obj
    if isinstance(value, list):
        obj = classes["ListConfig"]()
        obj.__dict__.update(_metadata=None, _parent=parent, _content=[_omega(v, classes, obj) for v in value])
        return obj
    node = classes["AnyNode"]()
    meta = classes["Metadata"]()
    meta.__dict__.update(ref_type=typing.Any, object_type=None, optional=True, key=None, flags={})
    node.__dict__.update(_val=value, _metadata=meta, _parent=parent)
    return node


@pytest.fixture()
def official_ae_file(tmp_path, parity_ae, monkeypatch):
    mods, classes = _fake_omegaconf()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    c = parity_ae["config"]
    yaml = {"model": {"n_hiddens": c["n_hiddens"], "downsample": c["downsample"], "num_groups": c["num_groups"],
                      "embedding_dim": c["embedding_dim"], "n_codes": c["n_codes"], "norm_type": "group", "lr": 3e-5},
            "dataset": {"patch_size": c["patch_size"], "image_channels": 1, "imgtype": "CT"}}
    sd = dict(parity_ae["state_dict"])
    sd["volume_discriminator.model0.0.weight"] = torch.zeros(2, 1, 4, 4, 4)
    sd["perceptual_loss.perceptual_model.net.slice1.0.weight"] = torch.zeros(2, 3, 3, 3)
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.5.0.post0", "state_dict": sd,
            "hyper_parameters": {"cfg": _omega(yaml, classes)}, "loops": {}, "callbacks": {},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-5, "params": [0, 1]}]}], "lr_schedulers": []}
    path = tmp_path / "PatchVolume_8x_s2.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture()
def official_bf_file(tmp_path, parity_bf):
    c = parity_bf["config"]
    args = argparse.Namespace(model_dim=c["dim"], dim_mults=c["dim_mults"], use_attn=c["use_sparse_linear_attn"],
                              patch_size=c["patch_size"], num_dit=1, num_classes=7, vq_size=64, volume_channels=8,
                              resolution=[32, 32, 32], batch_size=16, loss_type="l1", timesteps=1000,
                              # not in the released args (they use the constructor defaults 8 / 24); the
                              # reduced test model needs them, and the loader reads them when present
                              DiT_num_heads=c["DiT_num_heads"], resnet_groups=c["resnet_groups"])
    sd = parity_bf["state_dict"]
    noisy = {k: v + 1.0 if v.is_floating_point() else v for k, v in sd.items()}
    ckpt = {"model": noisy, "ema": dict(sd), "scaler": {"scale": 65536.0}, "opt": {"state": {}, "param_groups": []},
            "args": args, "epoch": 7}
    path = tmp_path / "BiFlowNet_0453500.pt"
    torch.save(ckpt, path)
    return path


def test_official_autoencoder_loads_without_omegaconf(official_ae_file, parity_ae, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("omegaconf")]:
        monkeypatch.delitem(sys.modules, name)
    ae = load_official_autoencoder(official_ae_file)
    assert isinstance(ae, PatchVolumeAE) and not ae.training
    assert ae.config["n_hiddens"] == parity_ae["config"]["n_hiddens"]
    assert ae.config["patch_size"] == parity_ae["config"]["patch_size"]
    x = parity_ae["inputs"]["x"]
    with torch.no_grad():
        torch.testing.assert_close(ae(x), parity_ae["outputs"]["forward_val_recon"], atol=1e-4, rtol=1e-4)


def test_official_biflownet_uses_ema_and_args(official_bf_file, parity_bf):
    net = load_official_biflownet(official_bf_file)
    assert net.config["patch_size"] == parity_bf["config"]["patch_size"]
    assert net.config["dim_mults"] == list(parity_bf["config"]["dim_mults"])
    inp = parity_bf["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(net(inp["x"], inp["time"], inp["y"], inp["res"]), parity_bf["outputs"]["eps"],
                                   atol=1e-4, rtol=1e-4)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_official_autoencoder(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, I am not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_official_biflownet(path)


def test_truncated_checkpoint(tmp_path, official_bf_file):
    data = official_bf_file.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|not a readable"):
        load_official_biflownet(cut)


def test_wrong_family_both_ways(official_ae_file, official_bf_file):
    with pytest.raises(CheckpointError, match="BiFlowNet"):
        load_official_autoencoder(official_bf_file)
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_official_biflownet(official_ae_file)


def test_missing_unexpected_and_shape_errors(tmp_path, parity_bf):
    sd = dict(parity_bf["state_dict"])
    del sd["final_conv.1.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["time_mlp.3.bias"] = torch.zeros(5)
    path = tmp_path / "broken.pt"
    c = parity_bf["config"]
    torch.save({"ema": sd, "args": argparse.Namespace(model_dim=c["dim"], DiT_num_heads=c["DiT_num_heads"],
                                                      resnet_groups=c["resnet_groups"])}, path)
    with pytest.raises(CheckpointError) as err:
        load_official_biflownet(path)
    msg = str(err.value)
    assert "broken.pt" in msg and "final_conv.1.bias" in msg and "extra.weight" in msg and "time_mlp.3.bias" in msg


def test_args_that_contradict_weights(tmp_path, parity_bf):
    path = tmp_path / "mixed.pt"
    torch.save({"ema": parity_bf["state_dict"], "args": argparse.Namespace(patch_size=2)}, path)
    with pytest.raises(CheckpointError, match="patch_size"):
        load_official_biflownet(path)


def test_own_format_round_trip(tmp_path, parity_bf):
    net = BiFlowNet(**parity_bf["config"])
    net.load_state_dict(parity_bf["state_dict"])
    save_model(net, tmp_path / "m" / "biflownet", meta={"note": "test"})
    assert not list((tmp_path / "m").glob("*.part"))
    back = load_model(tmp_path / "m" / "biflownet.safetensors", expect="biflownet")
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_any(tmp_path / "m" / "biflownet.json", "biflownet").config == net.config
    with pytest.raises(CheckpointError, match="needed"):
        load_model(tmp_path / "m" / "biflownet", expect="patchvolume")


def test_own_format_corrupt_weights(tmp_path, parity_bf):
    net = BiFlowNet(**parity_bf["config"])
    path = save_model(net, tmp_path / "biflownet")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(path)


def test_converter_cli(tmp_path, official_ae_file, official_bf_file, monkeypatch):
    from MedDiffusionLib.cli import main
    for name in [m for m in sys.modules if m.startswith("omegaconf")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["convert", str(official_ae_file), str(tmp_path / "out")]) == 0
    assert main(["convert", str(official_bf_file), str(tmp_path / "out")]) == 0
    assert load_model(tmp_path / "out" / "autoencoder", expect="patchvolume")
    assert load_model(tmp_path / "out" / "biflownet", expect="biflownet")
    assert main(["convert", str(tmp_path / "nothing.pt"), str(tmp_path / "out")]) == 2


SMALL = {"patchvolume": dict(n_hiddens=4, downsample=(4, 4, 4), num_groups=2, n_codes=16, patch_size=16),
         "biflownet": dict(dim=12, cond_classes=3, dim_mults=(1, 1, 2, 3, 4), attn_heads=1, resnet_groups=4,
                           DiT_num_heads=2, channels=8),
         "controlnet": dict(dim=12, hint_channel=5, cond_classes=3, dim_mults=(1, 1, 2, 3, 4), attn_heads=1,
                            resnet_groups=4, DiT_num_heads=2, dit_branch=False),
         "controlldm": dict(dim=12, cond_classes=3, dim_mults=(1, 1, 2, 3, 4), attn_heads=1, resnet_groups=4,
                            DiT_num_heads=2, channels=8, control_scales=0.5)}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_every_family_saves_every_constructor_argument(tmp_path, family):
    import inspect
    import json

    from MedDiffusionLib.io.checkpoints import FAMILIES, FAMILY_CLASSES
    assert set(FAMILIES) == set(SMALL)
    cls = FAMILY_CLASSES[family]
    model = cls(**SMALL[family])
    path = save_model(model, tmp_path / family)
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["family"] == family and saved["format_version"] == 1
    wanted = {n for n in inspect.signature(cls.__init__).parameters if n != "self"}
    assert set(saved["config"]) == wanted, f"not saved: {wanted - set(saved['config'])}"
    for k, v in SMALL[family].items():
        assert saved["config"][k] == (list(v) if isinstance(v, tuple) else v), k
    back = load_model(path, expect=family)
    assert type(back) is cls and back.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_bundled_models_load_unchanged():
    from MedDiffusionLib.io.checkpoints import read_model_config
    from MedDiffusionLib.registry import RESOURCES
    files = sorted((RESOURCES / "models").glob("*/*.safetensors"))
    assert len(files) == 4
    for path in files:
        doc = read_model_config(path)
        model = load_model(path)
        assert {k: v for k, v in model.config.items() if k in doc["config"]} == doc["config"]


def test_loader_errors_are_user_errors_that_keep_their_cause(tmp_path):
    from MedDiffusionLib.errors import UserError
    from MedDiffusionLib.registry import RegistryError
    from MedDiffusionLib.training.controlnet import DataError
    from MedDiffusionLib.weights import WeightsError
    assert all(issubclass(c, UserError) for c in (CheckpointError, RegistryError, WeightsError, DataError))
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        load_official_biflownet(path)
    assert info.value.__cause__ is not None  # `from err`, not `from None`
    (tmp_path / "m.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        load_model(tmp_path / "m")
    assert info.value.__cause__ is not None

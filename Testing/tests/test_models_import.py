"""Weights without a terminal-only path: `models import` of a folder in the authors' layout (random
weights written in their checkpoint format) into a fresh MEDDIFFUSION_CACHE, loading it by id,
corrupt and wrong-family folders, `models add` / `remove` with the user registry, refusals."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE, ROOT
from hub_server import FakeHub
from MedDiffusionLib import registry
from MedDiffusionLib.cli import main
from MedDiffusionLib.io.checkpoints import CheckpointError
from MedDiffusionLib.registry import RegistryError, get_model, models, registry_problems, user_registry_path, validate, validate_model
from MedDiffusionLib.weights import (WeightsError, add_user_model, import_weights, imported_dir, remove_user_model,
                                     status)

AE_NAME, BF_NAME = "PatchVolume_8x_s2.ckpt", "BiFlowNet_0453500.pt"  # the names of official-8x's files


def _random_like(state: dict) -> dict:
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny():
    """Random weights at the small parity configs, and the constructor configs they need."""
    ae = torch.load(REFERENCE / "parity_patchvolume.pt", weights_only=True)
    bf = torch.load(REFERENCE / "parity_biflownet.pt", weights_only=True)
    return {"ae": _random_like(ae["state_dict"]), "ae_cfg": ae["config"],
            "bf": _random_like(bf["state_dict"]), "bf_cfg": bf["config"]}


def _write_authors(folder: Path, tiny, ae_name=AE_NAME, bf_name=BF_NAME) -> Path:
    """The authors' formats: a Lightning .ckpt with the YAML config under hyper_parameters, and the
    BiFlowNet .pt with 'ema'/'model' state dicts and the training argparse Namespace."""
    folder.mkdir(parents=True, exist_ok=True)
    c = tiny["ae_cfg"]
    torch.save({"epoch": 1, "global_step": 10, "state_dict": tiny["ae"], "hyper_parameters": {"cfg": {
        "model": {k: c[k] for k in ("n_hiddens", "downsample", "num_groups", "embedding_dim", "n_codes")},
        "dataset": {"patch_size": c["patch_size"], "image_channels": 1}}}}, folder / ae_name)
    b = tiny["bf_cfg"]
    torch.save({"ema": tiny["bf"], "model": tiny["bf"], "step": 10,
                "args": argparse.Namespace(model_dim=b["dim"], patch_size=b["patch_size"], num_classes=7,
                                           DiT_num_heads=b["DiT_num_heads"], resnet_groups=b["resnet_groups"])},
               folder / bf_name)
    return folder


def _tiny_architecture(tiny) -> dict:
    from MedDiffusionLib.io.checkpoints import infer_autoencoder_config
    c = tiny["ae_cfg"]
    ae = infer_autoencoder_config(tiny["ae"], {"model": {k: c[k] for k in ("n_hiddens", "downsample", "num_groups",
                                                                           "embedding_dim", "n_codes")},
                                               "dataset": {"patch_size": c["patch_size"], "image_channels": 1}})
    return {"autoencoder": {k: ae[k] for k in ("n_hiddens", "downsample", "embedding_dim", "n_codes")},
            "biflownet": {k: tiny["bf_cfg"][k] for k in ("dim", "dim_mults", "channels", "patch_size", "cond_classes")}}


RELEASED_8X = {"autoencoder": {"n_hiddens": 48, "downsample": [8, 8, 8], "embedding_dim": 8, "n_codes": 8192},
               "biflownet": {"dim": 72, "dim_mults": [1, 1, 2, 4, 8], "channels": 8, "patch_size": 1, "cond_classes": 7}}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A fresh MedDiffusion cache (imports, user registry) per test."""
    root = tmp_path / "md-cache"
    monkeypatch.setenv("MEDDIFFUSION_CACHE", str(root))
    return root


def _use_registry(tmp_path, monkeypatch, architecture: dict | None) -> Path:
    """The built-in registry with official-8x's architecture set (the tiny one, or the released one)."""
    doc = json.loads((ROOT / "MedDiffusionLib" / "resources" / "models.json").read_text())
    for m in doc["models"]:
        if m["id"] == "official-8x":
            m["architecture"] = architecture
    assert validate(doc) == []
    path = tmp_path / "models.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("MEDDIFFUSION_REGISTRY", str(path))
    return path


def _leftovers(cache: Path) -> list[str]:
    """Anything in the imports folder but lock files."""
    root = cache / "models"
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_import_authors_folder_then_load_by_id(tmp_path, monkeypatch, cache, tiny, capsys):
    _use_registry(tmp_path, monkeypatch, _tiny_architecture(tiny))
    folder = _write_authors(tmp_path / "drive", tiny)
    entry = get_model("official-8x")
    assert {v["state"] for v in status(entry).values()} == {"missing"}

    assert main(["models", "import", str(folder)]) == 0  # no --as: the files fit official-8x only
    out, err = capsys.readouterr()
    assert "[1/2] autoencoder" in err and AE_NAME in err and "[2/2] biflownet" in err and BF_NAME in err
    assert "official-8x: imported into" in out
    assert sorted(p.name for p in imported_dir("official-8x").iterdir()) == [
        "IMPORTED.json", "autoencoder.json", "autoencoder.safetensors", "biflownet.json", "biflownet.safetensors"]
    assert _leftovers(cache) == ["official-8x"]
    st = status(entry)
    assert {v["state"] for v in st.values()} == {"cached"} and all(v["imported"] for v in st.values())
    assert main(["models", "list"]) == 0
    assert any(line.split()[:2] == ["official-8x", "downloaded"] for line in capsys.readouterr().out.splitlines())
    assert main(["models", "verify", "official-8x"]) == 0
    assert capsys.readouterr().out.count("unverified") == 2  # the registry has no sha256 for the released files

    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    pipe = GenerationPipeline.from_pretrained(model="official-8x", device="cpu")
    assert pipe.entry.id == "official-8x" and pipe.compression == 8
    key = next(iter(tiny["bf"]))
    assert torch.equal(pipe.net.state_dict()[key].cpu(), tiny["bf"][key])  # the EMA weights of the file
    key = "encoder.conv_first.weight"
    assert torch.equal(pipe.ae.state_dict()[key].cpu(), tiny["ae"][key])


def test_import_checks_architecture_and_names_the_mismatch(tmp_path, monkeypatch, cache, tiny, capsys):
    _use_registry(tmp_path, monkeypatch, RELEASED_8X)
    folder = _write_authors(tmp_path / "drive", tiny)
    assert main(["models", "import", str(folder), "--as", "official-8x"]) == 2
    err = capsys.readouterr().err
    assert "not weights of model 'official-8x'" in err and "n_hiddens is 8, the registry says 48" in err
    assert "Traceback" not in err and _leftovers(cache) == []
    assert main(["models", "import", str(folder)]) == 2  # nothing fits: a clear line, and what to do
    err = capsys.readouterr().err
    assert "match no registry model" in err and "official-4x: the autoencoder compresses 8x" in err
    assert "models add" in err and _leftovers(cache) == []
    assert {v["state"] for v in status(get_model("official-8x")).values()} == {"missing"}


def test_corrupt_or_wrong_family_folder_imports_nothing(tmp_path, monkeypatch, cache, tiny, capsys):
    _use_registry(tmp_path, monkeypatch, _tiny_architecture(tiny))
    good = _write_authors(tmp_path / "good", tiny)
    # truncated checkpoint (a download cut short)
    bad = _write_authors(tmp_path / "truncated", tiny)
    data = (bad / AE_NAME).read_bytes()
    (bad / AE_NAME).write_bytes(data[: len(data) // 2])
    assert main(["models", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert AE_NAME in err and "truncated" in err and "Traceback" not in err
    assert _leftovers(cache) == []
    # wrong family: the two files swapped
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / AE_NAME).write_bytes((good / BF_NAME).read_bytes())
    (swapped / BF_NAME).write_bytes((good / AE_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="BiFlowNet .diffusion model. checkpoint, not a Patch-Volume autoencoder"):
        import_weights(swapped, "official-8x")
    assert _leftovers(cache) == []
    # an empty folder and a missing folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no autoencoder and no biflownet weights found"):
        import_weights(tmp_path / "empty")
    with pytest.raises(WeightsError, match="weights folder not found"):
        import_weights(tmp_path / "nowhere")
    assert {v["state"] for v in status(get_model("official-8x")).values()} == {"missing"}
    # an earlier good import survives a failed one
    assert import_weights(good).id == "official-8x"
    before = (imported_dir("official-8x") / "IMPORTED.json").read_text()
    with pytest.raises(CheckpointError, match="truncated"):
        import_weights(bad, "official-8x")
    assert (imported_dir("official-8x") / "IMPORTED.json").read_text() == before
    assert _leftovers(cache) == ["official-8x"]
    # a bundled model takes no import
    with pytest.raises(WeightsError, match="bundled"):
        import_weights(good, "chest-ct-mini")


def test_add_import_remove_user_model(tmp_path, cache, tiny, capsys):
    folder = _write_authors(tmp_path / "mine", tiny, "PatchVolume_mine.ckpt", "BiFlowNet_mine.pt")
    lines = []
    entry = add_user_model("my-ct", weights=folder, title="My CT", classes=[1], size=[64, 64, 64],
                           spacing=[1.5, 1.5, 2], progress=lambda line, frac: lines.append((line, frac)))
    assert entry.user and entry.id == "my-ct" and entry.compression == 8 and entry.class_indices == [1]
    assert entry.source == {"kind": "local", "folder": str(folder.resolve())}
    assert entry.architecture["autoencoder"]["n_hiddens"] == tiny["ae_cfg"]["n_hiddens"]
    assert len(lines) == 4 and lines[-1][1] == 1.0
    doc = json.loads(user_registry_path().read_text())
    assert [m["id"] for m in doc["models"]] == ["my-ct"] and validate_model(doc["models"][0]) == []
    assert {v["state"] for v in status(entry).values()} == {"cached"}
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["my-ct", "downloaded"] and "[user model]" in line for line in out.splitlines())

    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    pipe = GenerationPipeline.from_pretrained(model="my-ct", device="cpu")
    assert pipe.entry.id == "my-ct"
    # import again by id (same files: they match the registered sha256) ...
    assert import_weights(folder, "my-ct").id == "my-ct"
    # ... but other files are refused against the registered sha256 and the architecture
    other = dict(tiny, bf={k: v + 1 if v.is_floating_point() else v for k, v in tiny["bf"].items()})
    changed = _write_authors(tmp_path / "changed", other, "PatchVolume_mine.ckpt", "BiFlowNet_mine.pt")
    with pytest.raises(WeightsError, match="does not match the registered sha256 of the biflownet"):
        import_weights(changed, "my-ct")
    assert main(["models", "verify", "my-ct"]) == 0 and capsys.readouterr().out.count(" ok ") == 2

    # refusals: an id in use, a built-in id, a bad id, a class the network lacks, an illegal size
    for argv, message in ((["models", "add", "my-ct", "--weights", str(folder)], "registered already"),
                          (["models", "add", "official-8x", "--weights", str(folder)], "built-in model id"),
                          (["models", "add", "My_CT", "--weights", str(folder)], "is not allowed"),
                          (["models", "add", "x", "--repo", "a/b", "--compression", "8x", "--files", "a.ckpt", "b.pt",
                            "--size", "96", "96", "96"], "not a multiple of 64"),
                          (["models", "add", "x", "--repo", "a/b", "--files", "a.ckpt", "b.pt"], "--compression"),
                          (["models", "remove", "official-8x"], "built-in model: it cannot be removed"),
                          (["models", "remove", "chest-ct-mini"], "built-in model"),
                          (["models", "remove", "nope"], "no user model 'nope'")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    with pytest.raises(RegistryError, match="knows classes"):
        add_user_model("x", weights=folder, classes=[9])
    assert [m["id"] for m in json.loads(user_registry_path().read_text())["models"]] == ["my-ct"]
    assert _leftovers(cache) == ["my-ct"]

    # remove: the entry goes, the files stay until --files
    assert main(["models", "remove", "my-ct"]) == 0
    assert "my-ct" not in [m.id for m in models()] and imported_dir("my-ct").exists()
    add_user_model("my-ct", weights=folder)
    assert remove_user_model("my-ct", files=True) == [imported_dir("my-ct")]
    assert not imported_dir("my-ct").exists() and json.loads(user_registry_path().read_text())["models"] == []
    # --files on a built-in id deletes only what was imported for it
    assert main(["models", "remove", "official-8x", "--files"]) == 0
    assert "stays registered" in capsys.readouterr().out and "official-8x" in [m.id for m in models()]


def test_import_picks_among_user_models_and_refuses_ambiguity(tmp_path, cache, tiny, capsys):
    """Without --as: the registered file names (or a declared architecture) decide; a tie is refused."""
    folder = _write_authors(tmp_path / "mine", tiny, "PatchVolume_mine.ckpt", "BiFlowNet_mine.pt")
    add_user_model("mine", weights=folder, size=[64, 64, 64])
    assert import_weights(folder).id == "mine"  # official-8x (no architecture in the registry) fits too; names decide
    add_user_model("mine-too", weights=folder, size=[64, 64, 64])
    assert main(["models", "import", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "several models (mine, mine-too)" in err and "--as" in err
    two = _write_authors(tmp_path / "two", tiny, "PatchVolume_a.ckpt", "BiFlowNet_a.pt")
    _write_authors(two, tiny, "PatchVolume_b.ckpt", "BiFlowNet_b.pt")
    with pytest.raises(WeightsError, match="several autoencoder files"):
        import_weights(two)


def test_user_registry_is_schema_checked_and_reread(tmp_path, cache, tiny):
    assert [m.id for m in models()] == ["chest-ct-mini", "official-8x", "official-4x"]
    base = json.loads((ROOT / "MedDiffusionLib" / "resources" / "models.json").read_text())["models"]
    hub = dict(base[1], id="lab-8x", title="lab model", source={"kind": "hub", "repo_id": "lab/x", "revision": "main"})
    broken = dict(hub, id="broken", compression="16x")
    taken = dict(hub, id="official-8x")
    user_registry_path().parent.mkdir(parents=True, exist_ok=True)
    user_registry_path().write_text(json.dumps({"schema_version": 1, "models": [hub, broken, taken]}))
    # re-read without an explicit reload: the file changed
    ids = [m.id for m in models()]
    assert ids == ["chest-ct-mini", "official-8x", "official-4x", "lab-8x"]
    assert get_model("official-8x").origin == "builtin" and get_model("lab-8x").user
    problems = registry_problems()
    assert len(problems) == 2 and "broken" in problems[0] and "16x" in problems[0]
    assert "'official-8x' left out: the id is taken by a built-in model" in problems[1]
    user_registry_path().write_text("{not json")
    registry.reload()
    assert [m.id for m in models()] == ["chest-ct-mini", "official-8x", "official-4x"]
    assert "not readable JSON" in registry_problems()[0]
    with pytest.raises(RegistryError, match="not readable JSON"):
        add_user_model("x", repo="a/b", compression="8x", files=["a.ckpt", "b.pt"])


def test_validator_agrees_with_jsonschema():
    import jsonschema
    doc = json.loads((ROOT / "MedDiffusionLib" / "resources" / "models.json").read_text())
    sch = registry.schema()
    jsonschema.validate(doc, sch)
    assert validate(doc) == []
    edits = [lambda m: m.update(compression="16x"), lambda m: m.update(id="Bad id"), lambda m: m.pop("files"),
             lambda m: m.update(extra=1), lambda m: m["files"][0].pop("filename"),
             lambda m: m["files"][0].update(path="x"), lambda m: m["classes"][0].update(index=9),
             lambda m: m["classes"][0]["sizes"][0].update(spacing_xyz=[1, 0, 1]),
             lambda m: m["defaults"].update(steps=True), lambda m: m.update(architecture={"vae": {}}),
             lambda m: m["source"].update(kind="ftp"), lambda m: m["files"][0].update(sha256="abc")]
    for edit in edits:
        bad = json.loads(json.dumps(doc))
        edit(bad["models"][1])
        ours = validate(bad)
        assert ours, edit
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, sch)


def test_hub_user_model_downloads_with_its_config(tmp_path, tiny):
    """`models add --repo` for converted files on a hub: `models download` fetches each .safetensors
    with its .json, and the model reads "downloaded" (real HTTP on 127.0.0.1)."""
    from MedDiffusionLib.io.checkpoints import load_official, save_model
    folder = _write_authors(tmp_path / "src", tiny)
    conv = tmp_path / "conv"
    for name in (AE_NAME, BF_NAME):
        family, model = load_official(folder / name)
        save_model(model, conv / ("autoencoder" if family == "patchvolume" else "biflownet"))
    files = {p.name: p.read_bytes() for p in conv.iterdir()}
    env = dict(os.environ, MEDDIFFUSION_CACHE=str(tmp_path / "md"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3", PYTHONPATH=str(ROOT))
    env.pop("MEDDIFFUSION_REGISTRY", None)
    script = ("import sys\nfrom MedDiffusionLib.cli import main\nfor argv in ([\"models\", \"add\", \"lab-8x\", "
              "\"--repo\", \"lab/tiny\", \"--compression\", \"8x\", \"--size\", \"64\", \"64\", \"64\"], "
              "[\"models\", \"download\", \"lab-8x\"], [\"models\", \"list\"]):\n"
              "    rc = main(argv)\n    print('RC', rc, flush=True)\n    if rc: sys.exit(rc)\n"
              "from MedDiffusionLib.pipelines.generation import GenerationPipeline\n"
              "print('LOADED', GenerationPipeline.from_pretrained(model='lab-8x', device='cpu').entry.id)\n")
    with FakeHub("lab/tiny", files) as hub:
        env["HF_ENDPOINT"] = hub.url
        # the hub's file list is not served by the stand-in: name the files
        r = subprocess.run([sys.executable, "-c", script.replace('"8x", "--size"', '"8x", "--files", '
                                                                 '"autoencoder.safetensors", "biflownet.safetensors", '
                                                                 '"--size"')],
                           env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("RC 0") == 3 and "LOADED lab-8x" in r.stdout
    assert any(line.split()[:2] == ["lab-8x", "downloaded"] for line in r.stdout.splitlines())
    assert {p.name for p in (tmp_path / "hf").rglob("snapshots/*/*")} == set(files)

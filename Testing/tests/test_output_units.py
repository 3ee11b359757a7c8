"""CT classes come out in Hounsfield units by default (the model's window for the class, recorded
with the result); --model-units / hu=false keeps model units [-1, 1]."""
import numpy as np
import pytest

from MedDiffusionLib.cli import main
from MedDiffusionLib.data.volumes import read_volume
from MedDiffusionLib.errors import UserError
from MedDiffusionLib.jobs import resolve
from MedDiffusionLib.registry import get_model

WINDOW = list(get_model("chest-ct-mini").hu_window(1))


@pytest.mark.parametrize("params, hu, window", [
    ({}, True, WINDOW),
    ({"hu": True}, True, WINDOW),
    ({"hu": False}, False, None),
    ({"hu_window": [-500, 500]}, True, [-500.0, 500.0]),
    ({"hu": False, "hu_window": [-500, 500]}, True, [-500.0, 500.0]),
])
def test_resolution_of_the_units(params, hu, window):
    p = resolve({"task": "generate", "model": "chest-ct-mini", "params": params}).params
    assert p["hu"] is hu and p["hu_window"] == window


def test_a_window_on_a_class_that_is_not_ct_is_refused(tmp_path):
    """A weights folder (no registry entry) of an MR class: no default window, an explicit one is refused."""
    spec = {"task": "generate", "weights": str(tmp_path), "params": {"class": 3, "size": [64, 64, 64],
                                                                     "spacing": [1, 1, 1]}}
    assert resolve(spec).params["hu"] is False
    spec["params"]["hu_window"] = [-1, 1]
    with pytest.raises(UserError, match="hu_window: an HU window applies to CT classes only"):
        resolve(spec)


@pytest.mark.parametrize("flag, in_hu", [([], True), (["--model-units"], False)])
def test_cli_default_is_hu(tmp_path, capsys, flag, in_hu):
    out = tmp_path / "s.nii.gz"
    rc = main(["generate", "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--out", str(out), "--quiet", *flag])
    assert rc == 0, capsys.readouterr().err
    a = read_volume(out).array
    if in_hu:
        assert a.min() >= WINDOW[0] - 1e-3 and a.max() <= WINDOW[1] + 1e-3 and a.max() - a.min() > 2
    else:
        assert np.abs(a).max() <= 1.1 and not np.allclose(a, 0)  # the decoder is not clamped


def test_cli_refuses_hu_with_model_units(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--hu", "--model-units", "--out", "x.nii.gz"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

"""Errors about one request field name the field; each front end words it its own way: the CLI as
its flag, the job service as a leading "field: ", the Slicer panel as its control."""
import json
import sys
from pathlib import Path

import pytest

from MedDiffusionLib.cli import main
from MedDiffusionLib.errors import UserError, fielded, message_field
from MedDiffusionLib.jobs import resolve
from MedDiffusionLib.schema import parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedDiffusion"))
from MedDiffusionGlue.service import panel_message  # noqa: E402

CASES = [({"steps": 0}, "steps"), ({"size": [63, 64, 64]}, "size"), ({"sampler": "x"}, "sampler"),
         ({"seed": "a"}, "seed"), ({"device": "gpu"}, "device"), ({"spacing": [1, 1]}, "spacing"),
         ({"sampler": "ddpm", "steps": 5}, "steps")]


@pytest.mark.parametrize("params, field", CASES)
def test_resolver_and_service_door_name_the_field(params, field):
    with pytest.raises(UserError) as e:
        resolve({"task": "generate", "params": params})
    assert e.value.field == field
    with pytest.raises(UserError) as e:
        parse_spec(json.dumps({"task": "generate", "params": params}).encode(), None)
    assert e.value.field == field and message_field(fielded(e.value))[0] == field


@pytest.mark.parametrize("argv, flag", [(["--size", "63", "64", "64"], "(--size X Y Z)"),
                                        (["--sampler", "ddpm", "--steps", "5"], "(--steps)")])
def test_cli_words_the_field_as_its_flag(tmp_path, capsys, argv, flag):
    assert main(["generate", *argv, "--out", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith(flag) and not (tmp_path / "x.nii.gz").exists()


def test_panel_words_the_field_as_its_control():
    with pytest.raises(UserError) as e:
        parse_spec(json.dumps({"task": "generate", "params": {"size": [63, 64, 64]}}).encode(), None)
    assert panel_message(fielded(e.value)).startswith("Size X, Y, Z: size 63x64x64 is not possible")

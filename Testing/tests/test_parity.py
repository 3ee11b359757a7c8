"""Parity with the authors' code: Testing/parity.py on the reference files (copied from
shared/reference), plus checks that the parity tool itself fails when it should."""
import copy
import importlib.util

import pytest
import torch

from conftest import REFERENCE, ROOT


def _parity_module():
    spec = importlib.util.spec_from_file_location("parity_tool", ROOT / "Testing" / "parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("family", ["patchvolume", "biflownet", "controlnet"])
def test_parity_file_passes(family, mode, capsys):
    """Both kernel modes meet the reference README's tolerances (fast: oneDNN convolutions and a
    channels-last decoder; measured max errors equal the reference mode's, e.g. DDPM 1000 5.3e-6)."""
    rc = _parity_module().main(["--mode", mode, str(REFERENCE / f"parity_{family}.pt")])
    out = capsys.readouterr().out
    assert f"kernels: {mode}" in out
    assert rc == 0, out
    assert "FAIL" not in out and "NOT COMPARED" not in out
    # every output key produced a line
    data = torch.load(REFERENCE / f"parity_{family}.pt", weights_only=True)
    assert sum(line.startswith("ok ") for line in out.splitlines()) >= len(data["outputs"])


def test_parity_tool_detects_wrong_output(tmp_path, parity_ae, capsys):
    bad = copy.deepcopy(parity_ae)
    bad["outputs"]["decoded"] = bad["outputs"]["decoded"] + 1e-3
    bad["extra_cases"] = []
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    assert _parity_module().main([str(path)]) == 1
    assert "FAIL [patchvolume:main] decoded " in capsys.readouterr().out


def test_parity_tool_reports_unknown_output_key(tmp_path, parity_ae, capsys):
    bad = copy.deepcopy(parity_ae)
    bad["outputs"]["something_new"] = torch.zeros(3)
    bad["extra_cases"] = []
    path = tmp_path / "unknown.pt"
    torch.save(bad, path)
    assert _parity_module().main([str(path)]) == 1
    assert "something_new" in capsys.readouterr().out

"""The bundled demo model: registered checksums, and samples that look like chest CT
(air around a body, lungs darker than soft tissue) rather than noise."""
import json

import numpy as np
import pytest

from MedDiffusionLib.registry import RESOURCES, get_model
from MedDiffusionLib.weights import resolve_weights, sha256_file


def test_bundled_files_match_registry():
    entry = get_model("chest-ct-mini")
    _, paths = resolve_weights("chest-ct-mini")  # raises on a sha256 mismatch
    for f in entry.files:
        p = (RESOURCES / f["path"]).with_suffix(".safetensors")
        assert f["sha256"] == sha256_file(p) and f["size"] == p.stat().st_size
    prov = json.loads((RESOURCES / "models" / "chest-ct-mini" / "PROVENANCE.json").read_text())
    curve = prov["biflownet"]["loss_curve_per_250_steps"]
    assert curve[-1] < curve[0]


def _anatomy_fractions(hu):
    d, h, w = hu.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ring = ((yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2) > (0.48 * h) ** 2
    mid = hu[d // 4: 3 * d // 4]
    return {
        "air_outside": float((mid[:, ring] < -850).mean()),
        "lung": float(((mid > -950) & (mid < -500)).mean()),
        "soft": float(((mid > -200) & (mid < 250)).mean()),
        "centre_hu": float(np.median(mid[:, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4])),
    }


@pytest.fixture(scope="module")
def sample():
    from MedDiffusionLib.pipelines import GenerationPipeline
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu")
    res = pipe.generate(seed=0, sampler="ddim", steps=50)[0]
    return res.volume(pipe.entry.class_info(1)["hu_window"])


def test_sample_looks_like_chest_ct(sample):
    assert sample.shape == (64, 64, 64)
    f = _anatomy_fractions(sample.to_network())
    assert f["air_outside"] > 0.6, f       # air around the body
    assert f["lung"] > 0.03, f             # lungs present
    assert f["soft"] > 0.05, f             # soft tissue present
    assert f["centre_hu"] > -500, f        # mediastinum/heart in the centre, not air


def test_noise_fails_the_same_checks():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1022, 525, (64, 64, 64))
    f = _anatomy_fractions(noise)
    assert not (f["air_outside"] > 0.6 and f["lung"] > 0.03 and f["soft"] > 0.05 and f["centre_hu"] > -500)

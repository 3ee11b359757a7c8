"""The benchmark's GPU rows (Testing/benchmarks/gpu_rows.py) run on the CPU at tiny shapes, so that
they cannot rot: the tensor-function DDPM step equals DDPMScheduler.step, the static-buffer and the
compiled (backend="eager") loops end on the eager loop's latents, and the SDPA rows are exact in
float32, zero-padded heads included."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchmark  # noqa: E402
import gpu_rows  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    return GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ddpm_step_with_noise_equals_scheduler(pipe):
    assert gpu_rows.check_ddpm_step(pipe.diffusion, "cpu", timesteps=(999, 700, 2, 1, 0)) <= 1e-6
    # the noise really enters (t > 0) and is switched off at t = 0
    coefs = gpu_rows.ddpm_coefficients(pipe.diffusion, "cpu")
    x, eps, noise = (torch.randn(1, 8, 2, 2, 2) for _ in range(3))
    for t, changes in ((5, True), (0, False)):
        tt = torch.full((1,), t, dtype=torch.long)
        a, _ = gpu_rows.ddpm_step_with_noise(coefs, eps, tt, x, noise)
        b, _ = gpu_rows.ddpm_step_with_noise(coefs, eps, tt, x, torch.zeros_like(noise))
        assert bool((a != b).any()) == changes


def test_sampler_graph_rows_match_eager_loop(pipe):
    table, report = benchmark.Table(), {}
    records = gpu_rows.sampler_graph_rows(pipe.net, pipe.diffusion, "cpu", (8, 8, 8, 8), 3, table, report)
    assert "cuda_errors" not in report, report.get("cuda_errors")
    by_variant = {r["variant"]: r for r in records}
    assert set(by_variant) == {"eager", "static_step", "compile"}
    for variant in ("static_step", "compile"):
        assert by_variant[variant]["max_abs_err_vs_eager"] <= 1e-5, by_variant[variant]
        assert by_variant[variant]["steps_per_s"] > 0
    assert by_variant["eager"]["ddpm_step_check_err"] <= 1e-6
    assert [r["case"].split(": ")[1] for r in table.rows] == ["eager vs static step", "eager vs compile"]
    assert all(r["max_abs_err"] <= 1e-5 and r["fast_s"] > 0 for r in table.rows)


def test_sampler_graph_rows_see_a_wrong_step(pipe, monkeypatch):
    """The error column can fail: a step whose noise is scaled differently is caught."""
    right = gpu_rows.ddpm_step_with_noise

    def wrong(coefs, eps, t, x, noise):
        return right(coefs, eps, t, x, 1.5 * noise)

    monkeypatch.setattr(gpu_rows, "ddpm_step_with_noise", wrong)
    with pytest.raises(AssertionError):
        gpu_rows.check_ddpm_step(pipe.diffusion, "cpu")


def test_sdpa_rows_fp32_exact_and_padded(pipe):
    cfg = pipe.net.config
    shapes = gpu_rows.released_attention_shapes(cfg, 8)
    assert shapes[0][1] == (1, cfg["DiT_num_heads"], (8 // cfg["patch_size"]) ** 3, cfg["dim"] // cfg["DiT_num_heads"])
    # the released DiT: 512 tokens, 8 heads of 9 channels (zero-padded to 16 on the CPU fast path)
    released = {"sub_volume_size": [8, 8, 8], "patch_size": 1, "dim": 72, "DiT_num_heads": 8, "attn_heads": 8,
                "use_sparse_linear_attn": [0, 0, 0, 1, 1]}
    big = gpu_rows.released_attention_shapes(released, 32)
    assert [s for _, s in big] == [(64, 8, 512, 9), (1, 8, 512, 32), (1, 8, 64, 32)]
    small = [("DiT", (2, 8, 64, 9)), ("U-Net", (1, 8, 27, 32))]
    table, report = benchmark.Table(), {}
    records = gpu_rows.sdpa_rows("cpu", small, table, report, repeat=1)
    assert len(records) == len(table.rows) == 3 * 2 * 3  # (DiT, DiT padded, U-Net) x dtypes x backends
    ran = [r for r in records if r["available"]]
    assert {r["backend"] for r in ran} >= {"MATH"}
    assert any(r["padded_to"] == 16 for r in ran)
    for r in ran:
        assert r["max_abs_err"] < (1e-5 if r["dtype"] == "float32" else 5e-2), r
    for rec, row in zip(records, table.rows):
        assert (row["fast_s"] is None) == (not rec["available"])
        if not rec["available"]:
            assert row["note"] == "not available on this device" and rec["error"]

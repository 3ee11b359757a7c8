"""CUDA: the bundled model on a GPU against the same arithmetic on the CPU. These need a CUDA
device (CI has none; `Testing/benchmarks/gpu_check.sh` runs them on a lent GPU) and import only
torch and the library, so that they run on a bare GPU image.

torch's own TF32 default is left as it is: the pipelines' fp32 precision must switch TF32 off
itself, so that float32 on the GPU stays within the parity tolerance of the CPU.
"""
import pytest
import torch

from MedDiffusionLib.decoding import DecodePlan, decode
from MedDiffusionLib.pipelines.generation import GenerationPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SINGLE = dict(atol=1e-4, rtol=1e-4)  # the parity tolerance of one forward (reference README, section 3)


@pytest.fixture(scope="module")
def pipes():
    return {d: GenerationPipeline.from_pretrained("chest-ct-mini", device=d) for d in ("cpu", "cuda")}


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_forward_matches_cpu(pipes, mode):
    cpu, gpu = pipes["cpu"], pipes["cuda"]
    for p in (cpu, gpu):
        p.set_mode(mode)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 16, 16, 16, generator=g)
    t, y = torch.tensor([999, 10]), torch.tensor([0, 0])
    res = torch.full((2, 3), 16 / 64)
    with torch.inference_mode(), gpu.autocast():
        a = cpu.net(x, t, y, res)
        b = gpu.net(x.cuda(), t.cuda(), y.cuda(), res.cuda()).cpu()
    torch.testing.assert_close(b, a, **SINGLE)


def test_decode_whole_and_exact_tiles_match_cpu(pipes):
    cpu, gpu = pipes["cpu"], pipes["cuda"]
    idx = torch.randint(0, cpu.ae.config["n_codes"], (1, 24, 24, 24), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), gpu.autocast():
        ref = cpu.ae.decode(idx, quantize=False)
        whole = gpu.ae.decode(idx.cuda(), quantize=False).cpu()
        tiled = decode(gpu.ae, idx.cuda(), DecodePlan("exact", 8, store="ram"))
    assert tiled.device.type == "cpu"
    torch.testing.assert_close(whole, ref, **SINGLE)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("dpm++", 5)])
def test_generation_on_cuda_matches_a_cpu_loop_from_its_noise(pipes, sampler, steps):
    """The GPU run's starting noise is captured, the CPU runs the same deterministic sampler from it:
    the final latents agree to the DDIM-loop parity tolerance, and the decoded volume is finite."""
    cpu, gpu = pipes["cpu"], pipes["cuda"]
    seen = {}

    def capture(x, t, y, res):
        seen.setdefault("z", x.detach().cpu().clone())
        seen.setdefault("y", y.cpu())
        seen.setdefault("res", res.cpu())
        return gpu.net(x, t, y, res)

    zg = gpu.sample_latents(1, (64, 64, 64), seed=5, sampler=sampler, steps=steps, noise_net=capture)
    assert zg.device.type == "cuda" and bool(torch.isfinite(zg).all())
    from MedDiffusionLib.pipelines.loop import denoise
    from MedDiffusionLib.schedulers import make_scheduler
    with torch.inference_mode():
        zc = denoise(make_scheduler(sampler, cpu.diffusion, steps),
                     lambda x, t: cpu.net(x, t, seen["y"], seen["res"]), seen["z"])
    torch.testing.assert_close(zg.cpu(), zc, atol=5e-3, rtol=0.0)
    vol = gpu.decode(zg)
    assert vol.shape == (1, 1, 64, 64, 64) and bool(torch.isfinite(vol).all())

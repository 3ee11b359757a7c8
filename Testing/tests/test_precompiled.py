"""The ahead-of-time compiled noise network (AOTInductor package in the cache): used only when
shape, weights and mode match, same results as the eager network, clean fallbacks."""
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from conftest import USER_CACHE
from MedDiffusionLib.models import precompiled
from MedDiffusionLib.pipelines.generation import GenerationPipeline

SIZE = (64, 64, 64)  # the bundled model's default size: scripts/setup.sh compiles it


@pytest.fixture(scope="module")
def pipe_with_package() -> GenerationPipeline:
    """The bundled pipeline with its package in this test's cache: copied from the package
    scripts/setup.sh built in the user's cache when there is one, else compiled here (~1 min)."""
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu")
    path = precompiled.package_path(pipe.net, pipe._noise_args(SIZE, 1))
    built = Path(USER_CACHE) / "compiled" / path.name
    if built.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(built, path)
    else:
        assert pipe.precompiled_network(SIZE, 1, build=True) is not None
    assert path.is_file()
    return pipe


def test_package_runs_the_same_network(pipe_with_package):
    pipe = pipe_with_package
    package = pipe.precompiled_network(SIZE, 1)
    assert isinstance(package, precompiled.PrecompiledNoise)
    x, y = torch.randn(1, 8, 16, 16, 16), torch.tensor([1])
    res = torch.tensor([16.0, 16.0, 16.0]) / 64
    with torch.inference_mode():
        for t in (999, 500, 0):
            tt = torch.tensor([t])
            torch.testing.assert_close(package(x, tt, y, res), pipe.net(x, tt, y, res), atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="compiled for inputs"):
            package(torch.randn(1, 8, 8, 16, 16), tt, y, res)
    # sampling uses it; 3 DDIM steps agree with the eager network (the loop tolerance of test_fast_paths)
    compiled = pipe.sample_latents(1, SIZE, seed=0, sampler="ddim", steps=3)
    eager = GenerationPipeline(pipe.ae, pipe.net, pipe.entry, "cpu", precompiled=False).sample_latents(
        1, SIZE, seed=0, sampler="ddim", steps=3)
    torch.testing.assert_close(compiled, eager, atol=5e-3, rtol=0)


def test_package_is_used_only_when_everything_matches(pipe_with_package):
    pipe = pipe_with_package
    ae, net, entry = pipe.ae, pipe.net, pipe.entry
    assert pipe.precompiled_network((64, 64, 32), 1) is None  # another size: eager
    assert pipe.precompiled_network(SIZE, 2) is None  # another batch: eager
    assert GenerationPipeline(ae, net, entry, "cpu", precompiled=False).precompiled_network(SIZE, 1) is None
    assert GenerationPipeline(ae, net, entry, "cpu", precision="bf16").precompiled_network(SIZE, 1) is None
    ref = GenerationPipeline(ae, net, entry, "cpu", mode="reference")
    try:
        assert ref.precompiled_network(SIZE, 1) is None  # the reference kernels never run compiled code
    finally:
        ref.set_mode("fast")
    # other weights: another package name, so the frozen old weights are never run
    other = GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu")
    with torch.no_grad():
        other.net.final_conv[1].bias.add_(0.1)
    assert other.precompiled_network(SIZE, 1) is None
    assert precompiled.package_path(other.net, other._noise_args(SIZE, 1)) != \
        precompiled.package_path(net, pipe._noise_args(SIZE, 1))


def test_a_failed_compile_warns_and_runs_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDDIFFUSION_CACHE", str(tmp_path))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(precompiled, "build", no_compiler)
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu", compile=True)
    with pytest.warns(RuntimeWarning, match="no C.. compiler found"):
        assert pipe.precompiled_network(SIZE, 1) is None
    assert not list(tmp_path.rglob("*.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lat = pipe.sample_latents(1, SIZE, sampler="ddim", steps=2)
    assert lat.shape == (1, 8, 16, 16, 16) and torch.isfinite(lat).all()

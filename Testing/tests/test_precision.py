"""The fp32 precision is float32 arithmetic on CUDA too: TF32 (torch's default for cuDNN
convolutions) is switched off while the networks run, and switched on only for ``tf32``. Measured on
an H200: with TF32 the parity outputs moved by up to 1e-2 against a 1e-4 tolerance."""
import pytest
import torch

from MedDiffusionLib.pipelines.generation import GenerationPipeline, tf32_allowed


@pytest.fixture
def flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("allowed", [False, True])
def test_tf32_flags_set_inside_and_restored_after(flags, allowed):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = (not allowed), (not allowed)
    with tf32_allowed(torch.device("cuda"), allowed):
        assert torch.backends.cudnn.allow_tf32 is allowed and torch.backends.cuda.matmul.allow_tf32 is allowed
    assert torch.backends.cudnn.allow_tf32 is (not allowed) and torch.backends.cuda.matmul.allow_tf32 is (not allowed)


def test_tf32_flags_restored_after_an_error(flags):
    torch.backends.cudnn.allow_tf32 = True
    with pytest.raises(RuntimeError), tf32_allowed(torch.device("cuda"), False):
        raise RuntimeError("boom")
    assert torch.backends.cudnn.allow_tf32 is True


def test_cpu_leaves_the_flags_alone(flags):
    torch.backends.cudnn.allow_tf32 = True
    with tf32_allowed(torch.device("cpu"), False):
        assert torch.backends.cudnn.allow_tf32 is True


def test_tf32_precision_is_accepted_and_float32_on_the_cpu():
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device="cpu", precision="tf32")
    x = torch.randn(1, 8, 8, 8, 8)
    t, y, res = torch.tensor([500]), torch.tensor([0]), torch.full((1, 3), 8 / 64)
    with torch.inference_mode():
        with pipe.autocast():
            a = pipe.net(x, t, y, res)
        b = pipe.net(x, t, y, res)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_an_exact_block_keeps_tf32_off_for_an_overlapping_tf32_block(flags):
    """Two GPU workers: a tf32 job's block opened inside an fp32 job's block runs without TF32, and
    the process's flags come back when both end (in either order)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    exact = tf32_allowed(dev, False)
    loose = tf32_allowed(dev, True)
    exact.__enter__()
    loose.__enter__()
    assert torch.backends.cudnn.allow_tf32 is False
    exact.__exit__(None, None, None)
    assert torch.backends.cudnn.allow_tf32 is True  # only the tf32 block is left
    loose.__exit__(None, None, None)
    assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cuda.matmul.allow_tf32 is True

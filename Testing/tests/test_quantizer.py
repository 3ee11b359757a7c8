import torch

from MedDiffusionLib.models.quantizer import lookup_codes, nearest_code_indices


def _dense_reference(z, emb):
    flat = z.movedim(1, -1).reshape(-1, z.shape[1])
    d = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ emb.t() + (emb.t() ** 2).sum(0, keepdim=True)
    return d.argmin(1).view(z.shape[0], *z.shape[2:])


def test_chunked_equals_dense():
    emb = torch.randn(300, 8)
    z = torch.randn(2, 8, 6, 5, 7)
    for chunk in (1, 7, 64, 10_000):
        assert torch.equal(nearest_code_indices(z, emb, chunk=chunk), _dense_reference(z, emb))


def test_first_index_wins_ties():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # codes 0 and 2 identical
    z = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).t().reshape(1, 2, 2, 1, 1)
    idx = nearest_code_indices(z, emb)
    assert idx.flatten().tolist() == [0, 0]  # exact duplicate -> 0; equidistant 0/1 -> 0


def test_lookup_is_inverse_of_exact_codes():
    emb = torch.randn(50, 8)
    idx = torch.randint(0, 50, (2, 3, 4, 5))
    z = lookup_codes(idx, emb)
    assert z.shape == (2, 8, 3, 4, 5)
    assert torch.equal(nearest_code_indices(z, emb), idx)


def test_channel_mismatch_is_reported():
    import pytest
    with pytest.raises(ValueError, match="channels"):
        nearest_code_indices(torch.randn(1, 4, 2, 2, 2), torch.randn(10, 8))

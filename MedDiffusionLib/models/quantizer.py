"""Nearest-code vector quantisation against a fixed codebook (inference only)."""
from __future__ import annotations

import torch

# Rows of the flattened latent processed per chunk: keeps the distance matrix at
# chunk x n_codes floats (64 MB for 8192 codes) instead of M x n_codes.
DEFAULT_CHUNK = 2048


def nearest_code_indices(z: torch.Tensor, codebook: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Index of the nearest codebook row for every latent vector.

    z: ``(B, C, *spatial)`` latent; codebook: ``(K, C)``. Returns int64 ``(B, *spatial)``.
    Distances are ``|z|^2 - 2 z.e + |e|^2`` (the official formula, so ties and
    rounding behave the same); ``argmin`` keeps the first index on ties. No one-hot
    and no full ``M x K`` matrix is built.
    """
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"latent has {z.shape[1]} channels but the codebook vectors have {codebook.shape[1]}")
    b, c = z.shape[:2]
    spatial = z.shape[2:]
    flat = z.movedim(1, -1).reshape(-1, c)
    emb_t = codebook.t().to(flat.dtype)
    emb_sq = (emb_t ** 2).sum(dim=0, keepdim=True)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start:start + chunk]
        dist = (rows ** 2).sum(dim=1, keepdim=True) - 2 * rows @ emb_t + emb_sq
        out[start:start + chunk] = dist.argmin(dim=1)
    return out.view(b, *spatial)


def lookup_codes(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Code vectors for integer indices: ``(B, *spatial)`` -> ``(B, C, *spatial)``."""
    return torch.nn.functional.embedding(indices, codebook).movedim(-1, 1).contiguous()

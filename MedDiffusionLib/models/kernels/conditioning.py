"""Fused conditioning for inference: a fast BiFlowNet / ControlNet computes every block's
conditioning projection (``SiLU -> Linear`` of the embedding) in one matrix product, and its fast
U-Net and DiT blocks apply the result with ``addcmul``. Same parameters and state-dict keys; the
reference classes keep the plain per-block arithmetic."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..biflownet import BiFlowNet, BlockConditioning
from ..controlnet import ControlNet
from ..dit import DiTBlock, FinalLayer
from ..unet_blocks import Block, ResnetBlock
from .derived import param_tag


class Prepared(NamedTuple):
    """One block's conditioning projection computed ahead: ``rows`` ``(B, k, C)`` with 1 already
    added to every scale row: ``(scale + 1, shift)`` for a U-Net block, ``(shift, scale + 1, gate)``
    for attention then MLP for a DiT block, ``(shift, scale + 1)`` for a final layer."""

    rows: torch.Tensor


def _projection_chunks(block: nn.Module) -> tuple[int, tuple[int, ...]]:
    """How a block's conditioning projection splits: (chunks, indices of the scale chunks)."""
    if isinstance(block, ResnetBlock):
        return 2, (0,)  # scale, shift
    if isinstance(block, DiTBlock):
        return 6, (1, 4)  # shift, scale, gate for attention, then for the MLP
    return 2, (1,)  # final layer: shift, scale


def _film_block(block: Block, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """``block`` (conv, GroupNorm, FiLM, SiLU) with a prepared FiLM ``(scale + 1, shift)``: one
    ``addcmul``, SiLU in place."""
    x = block.norm(block.proj(x))
    if film is not None:
        x = torch.addcmul(film[1], x, film[0])
    return F.silu(x, inplace=True)


class FastResnetBlock(ResnetBlock):
    """:class:`ResnetBlock` that also takes its FiLM :class:`Prepared` (inference of a fast network);
    an embedding takes the reference path."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | Prepared | None = None) -> torch.Tensor:
        if not isinstance(emb, Prepared):
            return super().forward(x, emb)
        film = emb.rows.view(emb.rows.shape[0], 2, -1, 1, 1, 1)
        return _film_block(self.block2, _film_block(self.block1, x, (film[:, 0], film[:, 1]))).add_(self.res_conv(x))


class FastDiTBlock(DiTBlock):
    """:class:`DiTBlock` that also takes its adaLN rows :class:`Prepared` per batch item: every
    sub-volume of a batch item shares them, so ``(B, S*T, C)`` views are modulated by ``(B, 1, C)``."""

    def forward(self, x: torch.Tensor, c: torch.Tensor | Prepared, skip: torch.Tensor | None = None
                ) -> torch.Tensor:
        if not isinstance(c, Prepared):
            return super().forward(x, c, skip)
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        n, t, ch = x.shape
        xb = x.reshape(c.rows.shape[0], -1, ch)
        m = c.rows.unsqueeze(2).unbind(1)  # six (B, 1, C)
        h = torch.addcmul(m[0], F.layer_norm(xb, (ch,), eps=self.norm1.eps), m[1])
        xb = torch.addcmul(xb, m[2], self.attn(h.view(n, t, ch)).view_as(xb))
        h = torch.addcmul(m[3], F.layer_norm(xb, (ch,), eps=self.norm2.eps), m[4])
        return torch.addcmul(xb, m[5], self.mlp(h)).view(n, t, ch)


class FastFinalLayer(FinalLayer):
    """:class:`FinalLayer` that also takes its adaLN rows :class:`Prepared` per batch item."""

    def forward(self, x: torch.Tensor, c: torch.Tensor | Prepared) -> torch.Tensor:
        if not isinstance(c, Prepared):
            return super().forward(x, c)
        n, t, ch = x.shape
        xb = x.reshape(c.rows.shape[0], -1, ch)
        h = torch.addcmul(c.rows[:, 0, None], F.layer_norm(xb, (ch,), eps=self.norm_final.eps), c.rows[:, 1, None])
        return self.linear(h).view(n, t, -1)


class FusedConditioning:
    """Network mixin: in inference every block reads a :class:`Prepared` projection, all of them
    computed in one ``addmm`` from a cached stacked weight. When autograd is recording, and under
    ``torch.compile`` / ``torch.export`` (the compiler fuses the projections itself), the blocks
    read the reference conditioning."""

    def block_conditioning(self, emb: torch.Tensor, subvolumes: int) -> BlockConditioning:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().block_conditioning(emb, subvolumes)  # type: ignore[misc]
        return self.prepared_conditioning(emb).__getitem__

    def prepared_conditioning(self, emb: torch.Tensor) -> dict[nn.Module, Prepared]:
        """``{block: Prepared}`` for every conditioned block, from the embedding ``emb`` ``(B, E)``."""
        blocks, weight, bias, sizes = self._fused_projection()
        out = torch.addmm(bias.to(emb.dtype), F.silu(emb), weight.to(emb.dtype).t())
        b = emb.shape[0]
        return {block: Prepared(part.view(b, _projection_chunks(block)[0], -1))
                for block, part in zip(blocks, out.split(sizes, dim=1))}

    def _fused_projection(self) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor, list[int]]:
        """The conditioning projections of every block stacked into one weight and bias, with 1 added
        to the bias rows of each FiLM / adaLN scale; rebuilt when a parameter changes."""
        cache: dict[str, Any] = self.__dict__.setdefault("_fused_projection_cache", {})
        if "blocks" not in cache:
            cache["blocks"] = [m for m in self.modules()  # type: ignore[attr-defined]
                               if (isinstance(m, ResnetBlock) and m.mlp is not None)
                               or isinstance(m, (DiTBlock, FinalLayer))]
            cache["linears"] = [b.mlp[1] if isinstance(b, ResnetBlock) else b.adaLN_modulation[1]
                                for b in cache["blocks"]]
        linears = cache["linears"]
        tag = [param_tag(p) for lin in linears for p in (lin.weight, lin.bias)]
        if cache.get("tag") != tag:
            biases = []
            for block, lin in zip(cache["blocks"], linears):
                bias = lin.bias.detach().clone()
                chunks, scale_chunks = _projection_chunks(block)
                width = bias.numel() // chunks
                for k in scale_chunks:
                    bias[k * width:(k + 1) * width] += 1
                biases.append(bias)
            cache.update(tag=tag, weight=torch.cat([lin.weight.detach() for lin in linears]), bias=torch.cat(biases),
                         sizes=[lin.out_features for lin in linears])
        return cache["blocks"], cache["weight"], cache["bias"], cache["sizes"]


class FastBiFlowNet(FusedConditioning, BiFlowNet):
    """:class:`BiFlowNet` with fused conditioning (:class:`FusedConditioning`)."""


class FastControlNet(FusedConditioning, ControlNet):
    """:class:`ControlNet` with fused conditioning (:class:`FusedConditioning`)."""


# reference class -> fast class, swapped by ``use_fast_kernels``
FAST_CONDITIONING = {BiFlowNet: FastBiFlowNet, ControlNet: FastControlNet, ResnetBlock: FastResnetBlock,
                     DiTBlock: FastDiTBlock, FinalLayer: FastFinalLayer}

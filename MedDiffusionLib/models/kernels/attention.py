"""Fast attention: DiT attention with heads padded to a measured width (:class:`FastAttention`) and
the voxel attention block as a few fused operations on channels-last tokens
(:class:`FastAttentionResidual`)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..dit import Attention
from ..unet_blocks import Residual
from .choices import measured_choice
from .derived import derived_tensor


class FastAttention(Attention):
    """DiT attention whose inference pads each head to a width the CPU kernels handle well.

    PyTorch's CPU flash-attention kernel is ~2x slower for the released model's 9-channel heads
    than for 16-channel ones; zero channels change no dot product and no output, so the ``qkv``
    projection is run with zero rows appended per head (cached weights) and the padding sliced
    off. The head width (as is, or rounded up to 8 or 16) is measured once per shape."""

    def _padded(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self.qkv.weight, self.qkv.bias
        hd = w.shape[1] // self.num_heads

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            pw = w.new_zeros(3, self.num_heads, width, w.shape[1])
            pw[:, :, :hd] = w.detach().view(3, self.num_heads, hd, -1)
            pb = b.new_zeros(3, self.num_heads, width)
            pb[:, :, :hd] = b.detach().view(3, self.num_heads, hd)
            return pw.view(-1, w.shape[1]), pb.view(-1)

        return derived_tensor(self, width, (w, b), build)

    def _attend(self, x: torch.Tensor, width: int) -> torch.Tensor:
        n, t, c = x.shape
        hd = c // self.num_heads
        if width == hd:
            return super().forward(x)
        qkv = F.linear(x, *self._padded(width)).view(n, t, 3, self.num_heads, width).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=hd ** -0.5)[..., :hd]
        return self.proj(out.transpose(1, 2).reshape(n, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hd = x.shape[-1] // self.num_heads
        if torch.is_grad_enabled() or x.device.type != "cpu" or hd % 8 == 0 or torch.compiler.is_compiling():
            return super().forward(x)
        widths = dict.fromkeys((hd, -(-hd // 8) * 8, -(-hd // 16) * 16))
        key = ("dit-attention", tuple(x.shape), self.num_heads, x.dtype, torch.get_num_threads())
        width = int(measured_choice(key, {str(wd): functools.partial(self._attend, x, wd) for wd in widths}))
        return self._attend(x, width)


class FastAttentionResidual(Residual):
    """``x + attention(layer_norm(x))`` over voxels, computed on the channels-last token view: one
    ``layer_norm``, the ``qkv`` product, SDPA and the output projection plus residual as one
    ``addmm`` (the reference runs ~25 operations). The output is channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        norm, attn = self.fn.norm, self.fn.fn
        b, c, d, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # a view when x is channels-last
        n = tokens.shape[1]
        normed = F.layer_norm(tokens, (c,), norm.gamma.view(c), None, norm.eps)
        qkv = attn.to_qkv(normed).view(b, n, 3, attn.heads, attn.dim_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b * n, -1)
        proj = attn.to_out.weight.view(c, -1)
        res = torch.addmm(tokens.reshape(b * n, c), out, proj.t())
        if attn.to_out.bias is not None:
            res += attn.to_out.bias
        return res.view(b, d, h, w, c).permute(0, 4, 1, 2, 3)

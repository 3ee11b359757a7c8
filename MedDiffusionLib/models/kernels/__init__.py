"""Fast forms of the reference networks: the same float32 arithmetic on faster kernels, behind one
seam, :func:`accelerate` (a new module in the fast or reference form; the module given is never
changed in place).

* :mod:`.choices`: kernel choices measured once per machine and recorded on disk;
* :mod:`.derived`: inference copies of weights, cached while the parameters are unchanged;
* :mod:`.conv`: :class:`FastConv3d` (measured gemm / oneDNN / channels-last oneDNN kernel);
* :mod:`.norm`: :class:`FastGroupNorm` (accurate channels-last statistics);
* :mod:`.attention`: :class:`FastAttention`, :class:`FastAttentionResidual`;
* :mod:`.conditioning`: fast BiFlowNet / ControlNet whose blocks' conditioning is one matrix product;
* :mod:`.compiled`: :class:`CompiledOrEager` (``torch.compile`` with an eager fallback);
* :mod:`.accelerate`: :func:`accelerate`, :func:`form_for`, :func:`kernel_mode` and the class swap.

State-dict keys stay the same in every form; results agree to float32 rounding (~1e-6).
"""
from .accelerate import (KERNEL_MODES, AccelerationPlan, Accelerated, accelerate, form_for, kernel_mode, mode_plan,
                         use_fast_kernels, uses_fast_kernels)
from .attention import FastAttention, FastAttentionResidual
from .choices import (TUNE_MAX_FLOP, TUNE_MAX_VOXELS, TUNE_ROUNDS, kernel_choices, kernel_choices_recorded,
                      measured_choice)
from .compiled import CompiledOrEager
from .conditioning import (FastBiFlowNet, FastControlNet, FastDiTBlock, FastFinalLayer, FastResnetBlock,
                           FusedConditioning, Prepared)
from .conv import FastConv3d, fast_kernels_available
from .derived import derived_tensor, param_tag
from .norm import ACCURATE_GROUP_NORM_VOXELS, GROUP_NORM_BLOCK, FastGroupNorm, channel_moments, group_norm_affine

__all__ = [
    "ACCURATE_GROUP_NORM_VOXELS", "GROUP_NORM_BLOCK", "KERNEL_MODES", "TUNE_MAX_FLOP", "TUNE_MAX_VOXELS", "TUNE_ROUNDS",
    "AccelerationPlan", "Accelerated", "CompiledOrEager", "FastAttention", "FastAttentionResidual", "FastBiFlowNet",
    "FastControlNet", "FastConv3d", "FastDiTBlock", "FastFinalLayer", "FastGroupNorm", "FastResnetBlock",
    "FusedConditioning", "Prepared", "accelerate", "channel_moments", "derived_tensor", "fast_kernels_available",
    "form_for", "group_norm_affine", "kernel_choices", "kernel_choices_recorded", "kernel_mode", "measured_choice",
    "mode_plan", "param_tag", "use_fast_kernels", "uses_fast_kernels",
]

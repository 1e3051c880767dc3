"""Which traced ops count as FLOPs: fvcore's handles, the contractions it lacks, and the ops left out.

Convention (fvcore's, kept everywhere in gatedmtl): **one multiply-add = one FLOP**, so a
"FLOP" here is what timm and most papers call a MAC (``GMACs``); ``torch.utils.flop_counter``
counts 2 per multiply-add and reports twice these numbers. Norms are counted as fvcore does
(batch norm in eval mode: 1 or 2 per element, layer/group norm: 5 per element).

fvcore has handles for convolutions, linear layers, matmul / bmm / einsum, norms, adaptive
average pooling and upsampling. :data:`EXTRA_HANDLES` adds the contractions it lacks, in the
same convention:

* ``aten::scaled_dot_product_attention`` (and the ``aten::_scaled_dot_product_*`` kernels):
  ``batch * L * S * (E + Ev)`` for ``Q[..., L, E]``, ``K[..., S, E]``, ``V[..., S, Ev]``: the
  ``Q K^T`` and ``attn V`` products that explicit attention spells as two matmuls, so a model
  counts the same whichever attention kernel it picks. The softmax is not counted (as
  fvcore does not count the explicit one).
* ``aten::baddbmm`` / ``aten::addbmm`` (``b * n * m * p``), ``aten::addmv`` / ``aten::mv``
  (``n * m``), ``aten::dot`` / ``aten::vdot`` (``n``).
* convolutions that fvcore's ``aten::_convolution`` handle does not see: ``aten::_convolution_mode``
  (string padding such as ``"same"``), ``aten::conv{1,2,3}d`` and ``aten::conv_transpose{1,2,3}d``.
* recurrent layers (``aten::lstm``, ``aten::gru``, ``aten::rnn_tanh``, ``aten::rnn_relu``): the
  input and hidden projections, ``G * H * (I + H)`` per step, sample, layer and direction
  (``G`` = 4 gates for an LSTM, 3 for a GRU, 1 for a plain RNN), plus the output projection of
  an LSTM with ``proj_size``; the gate nonlinearities are elementwise and not counted.
* ``aten::rms_norm`` as fvcore counts ``aten::layer_norm`` (5 per element, 4 without a weight).
* the upsampling modes that fvcore lacks, one per interpolation tap and output element as fvcore
  counts nearest (1) and bilinear (4) 2-D upsampling: nearest 1-D / 3-D (1), linear 1-D (2),
  bicubic (16), trilinear (8); 1-D and 3-D adaptive average pooling as fvcore counts the 2-D one
  (1 per input element).

:data:`NOT_COUNTED` lists the ops that fvcore leaves out on purpose and gatedmtl leaves out
too: elementwise arithmetic, activations, softmax, reductions, pooling other than adaptive
average pooling, and data movement. They cost no multiply-add of a contraction; they are
listed (:attr:`gatedmtl.cost.FlopCount.uncounted`) but never counted. Any other op that fvcore
meets without a handle is real compute missing from the count:
:attr:`~gatedmtl.cost.FlopCount.uncounted_compute` names it, :func:`gatedmtl.count_flops`
warns (:class:`gatedmtl.cost.UncountedFlopsWarning`) and ``gatedmtl verify`` fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import zip_longest
from math import prod
from typing import Any

from fvcore.nn.jit_handles import Handle, conv_flop_count, elementwise_flop_counter, get_shape, norm_flop_counter

__all__ = ["EXTRA_HANDLES", "NOT_COUNTED", "uncounted_compute", "sdpa_flops"]


def sdpa_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    """Multiply-adds of ``softmax(Q K^T) V`` for ``Q[..., L, E]``, ``K[..., S, E]``, ``V[..., S, Ev]``.

    ``prod(batch) * L * S * (E + Ev)``, where ``batch`` is the leading (batch, head) dims of the
    output: the larger of each aligned pair of leading dims (broadcast dims of size 1, and the
    key/value heads that grouped-query attention repeats up to the query heads).
    """
    lead = [max(dims) for dims in zip_longest(*(reversed(t[:-2]) for t in (query, key, value)), fillvalue=1)]
    return int(prod(lead)) * query[-2] * key[-2] * (query[-1] + value[-1])


def _sdpa(inputs: list[Any], outputs: list[Any]) -> int:
    q, k, v = (get_shape(x) for x in inputs[:3])
    return sdpa_flops(q, k, v)


def _baddbmm(inputs: list[Any], outputs: list[Any]) -> int:
    b, n, m = get_shape(inputs[1])
    return b * n * m * get_shape(inputs[2])[-1]


def _addmv(inputs: list[Any], outputs: list[Any]) -> int:
    return prod(get_shape(inputs[1]))


def _mv(inputs: list[Any], outputs: list[Any]) -> int:
    return prod(get_shape(inputs[0]))


def _dot(inputs: list[Any], outputs: list[Any]) -> int:
    return get_shape(inputs[0])[0]


def _conv(transposed: bool) -> Handle:
    def count(inputs: list[Any], outputs: list[Any]) -> int:
        x, w, out = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
        if len(x) == len(w) - 1:  # unbatched input [C, *spatial]
            x, out = [1, *x], [1, *out]
        return int(conv_flop_count(x, w, out, transposed=transposed))

    return count


def _rnn(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::lstm / gru / rnn_tanh / rnn_relu(input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)``: ``params`` holds ``w_ih [G*H, I], w_hh [G*H, P]`` (+ biases, + ``w_hr [P, H]``
    for a projected LSTM) per layer and direction; each matrix is applied once per step and sample."""
    x = get_shape(inputs[0])
    batch_first = inputs[8].toIValue()
    if len(x) == 2:  # unbatched [L, I]
        steps, batch = x[0], 1
    else:
        steps, batch = (x[1], x[0]) if batch_first else (x[0], x[1])
    matrices = [get_shape(w) for w in inputs[2].node().inputs()]
    return int(sum(prod(w) for w in matrices if len(w) == 2) * steps * batch)


EXTRA_HANDLES: Mapping[str, Handle] = {
    "aten::scaled_dot_product_attention": _sdpa,
    "aten::_scaled_dot_product_attention_math": _sdpa,
    "aten::_scaled_dot_product_flash_attention": _sdpa,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "aten::_scaled_dot_product_efficient_attention": _sdpa,
    "aten::_scaled_dot_product_cudnn_attention": _sdpa,
    "aten::baddbmm": _baddbmm,
    "aten::addbmm": _baddbmm,
    "aten::addmv": _addmv,
    "aten::mv": _mv,
    "aten::dot": _dot,
    "aten::vdot": _dot,
    "aten::_convolution_mode": _conv(False),
    "aten::conv1d": _conv(False),
    "aten::conv2d": _conv(False),
    "aten::conv3d": _conv(False),
    "aten::conv_transpose1d": _conv(True),
    "aten::conv_transpose2d": _conv(True),
    "aten::conv_transpose3d": _conv(True),
    "aten::rms_norm": norm_flop_counter(2),  # as fvcore counts aten::layer_norm: 5 per element (4 without weight)
    "aten::lstm": _rnn,
    "aten::gru": _rnn,
    "aten::rnn_tanh": _rnn,
    "aten::rnn_relu": _rnn,
    # fvcore counts nearest / bilinear 2-D upsampling as 1 / 4 per output element (one per tap): the same here
    # ... and adaptive average pooling as 1 per input element
    "aten::adaptive_avg_pool1d": elementwise_flop_counter(1, 0),
    "aten::adaptive_avg_pool3d": elementwise_flop_counter(1, 0),
    "aten::upsample_nearest1d": elementwise_flop_counter(0, 1),
    "aten::upsample_nearest3d": elementwise_flop_counter(0, 1),
    "aten::upsample_linear1d": elementwise_flop_counter(0, 2),
    "aten::upsample_bicubic2d": elementwise_flop_counter(0, 16),
    "aten::upsample_trilinear3d": elementwise_flop_counter(0, 8),
}
"""Handles that gatedmtl adds to fvcore's defaults (same convention: one multiply-add = one FLOP)."""

_ELEMENTWISE = """
    abs add add_ addcdiv addcmul bitwise_and bitwise_or ceil clamp_min clamp_max clamp_min_ div div_ exp exp_
    expm1 floor_divide fmod lerp log log1p log_ log2 maximum minimum mul mul_ ne neg pow reciprocal round rsqrt
    rsub sign sqrt square sub sub_ true_divide where lt le logical_and logical_not logical_or isnan isinf
    masked_fill_ nan_to_num fill_ zero_ bernoulli_ rand rand_like randn randn_like uniform_ normal_ atan2
    sin cos tan
"""
_ACTIVATIONS = """
    celu elu elu_ gelu gelu_ glu hardsigmoid hardsigmoid_ hardswish hardswish_ hardtanh hardtanh_ leaky_relu
    leaky_relu_ log_sigmoid mish mish_ prelu relu6 rrelu selu selu_ sigmoid sigmoid_ silu silu_ softplus
    softshrink tanh tanh_ threshold erf erf_ _softmax softmax log_softmax
"""
_REDUCTIONS = """
    all amax amin any argmax argmin cumprod cumsum frobenius_norm linalg_norm linalg_vector_norm logsumexp mean
    min norm prod std std_mean sum topk sort var var_mean
"""
_POOLING = """
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d max_pool2d_with_indices
"""
_DATA_MOVEMENT = """
    alias as_strided channel_shuffle clone col2im diag_embed diagonal embedding empty_like expand_as flip
    im2col index_select linspace masked_select meshgrid movedim new_ones ones_like pad pixel_shuffle
    pixel_unshuffle reflection_pad2d repeat repeat_interleave replication_pad2d resize_ scatter scatter_add
    tile tril triu one_hot reshape_as dropout_ feature_dropout alpha_dropout unflatten unfold unsafe_split
    unsafe_chunk view_as zero_pad2d _unsafe_view _reshape_alias lift_fresh numpy_T mT
"""

# autograd functions of gatedmtl itself: the gated model's channel mix (elementwise, training only)
_OWN = ("prim::PythonOp._GateMix",)

NOT_COUNTED: frozenset[str] = frozenset(
    [f"aten::{op}" for block in (_ELEMENTWISE, _ACTIVATIONS, _REDUCTIONS, _POOLING, _DATA_MOVEMENT)
     for op in block.split()] + list(_OWN)
)
"""Ops that neither fvcore nor gatedmtl counts (elementwise, activations, softmax, reductions,
pooling other than adaptive average pooling, data movement, and the gated model's channel mix):
fvcore's convention counts the multiply-adds of contractions and norms only."""


def uncounted_compute(uncounted: Mapping[str, int]) -> dict[str, int]:
    """The entries of ``{op: calls}`` (ops fvcore did not count) that are not in :data:`NOT_COUNTED`."""
    return {op: n for op, n in uncounted.items() if op not in NOT_COUNTED}

"""Layers of an ensemble of networks evaluated together (the critics of QC), and a fused Linear+GELU for sampling."""

import math
from collections.abc import Callable
from typing import Any

import torch as th
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as module_internals
from torch.utils.flop_counter import register_flop_formula

from sb3_qchunk.common.precision import has_usable_amx, onednn_allows

# nn.Module.__call__ runs a module's forward hooks and backward hooks from these registries besides the module's own.
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def direct_call(module: nn.Module, dtype: th.dtype | None = None) -> Callable[[th.Tensor], th.Tensor]:
    """
    ``module`` as a function of its input, for layers called many times in a row (the flow's Euler steps, the
    critic's layers): its ``forward`` without ``nn.Module.__call__``'s dispatch (a few microseconds a call, tens of
    calls when choosing a chunk), and for an ``nn.Linear`` a call of ``F.linear`` on its weight and bias as they are
    now. Only where no hook can run on the module (none registered on it, none registered globally), the module was
    not compiled in place (``Module.compile``) and outside ``torch.compile``'s tracing; the module itself otherwise,
    so hooks always run.

    With ``dtype`` (the precision autocast computes matmuls in, e.g. bf16), an ``nn.Linear`` with float32 weights is
    called with its weight and bias cast to ``dtype`` now, once, inside ``torch.compile``'s tracing too: the same
    numbers as autocast's own casts, which it would redo at every call where its cache of casts is off (in
    ``torch.inference_mode``, where the chunk choice runs, and in compiled code).

    While ``torch.compile`` traces code without gradient where ``RATIONAL_GELU`` is set (x86 CPUs without AMX,
    :func:`default_rational_gelu`), an erf ``nn.GELU`` becomes :func:`rational_gelu` on CPU tensors.

    :param module: the layer
    :param dtype: the precision of autocast's matmuls, None where autocast is off
    """
    hooks = [module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks]
    hooks += [getattr(module_internals, name, True) for name in _GLOBAL_HOOKS]  # a registry torch lacks: as if hooked
    if any(hooks) or getattr(module, "_compiled_call_impl", None) is not None:
        return module
    if type(module) is nn.Linear and dtype is not None and module.weight.dtype != dtype:
        weight = module.weight.to(dtype)
        bias = None if module.bias is None else module.bias.to(dtype)
        return lambda x: F.linear(x, weight, bias)
    if th.compiler.is_compiling():
        if RATIONAL_GELU and type(module) is nn.GELU and module.approximate == "none" and not th.is_grad_enabled():
            return lambda x: rational_gelu(x) if x.device.type == "cpu" else module(x)
        return module
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module.forward


# erf(z) ~ z P(z^2) / Q(z^2) on |z| <= 3.9 (erf(3.9) = 1 - 3.5e-8), fitted by Lawson-weighted least squares for the
# least maximum error: 1.5e-8 in float64; evaluated in float32, GELU within 1.1e-6 of the exact one on [-12, 12]
# (ATen's eager GELU: 1.2e-6, inductor's: 4.7e-7).
ERF_P = (1.12837903e00, 1.91916300e-01, 5.29636867e-02, 3.83581339e-03, 2.87432674e-04, 2.05057618e-06)
ERF_Q = (1.0, 5.03413181e-01, 1.14748011e-01, 1.51070963e-02, 1.18147433e-03, 3.82313960e-05)
ERF_LIMIT = 3.9
# GELU(x) = x (1/2 + x' A(x'^2) / B(x'^2)) with x' = x clamped to sqrt(2) ERF_LIMIT: P and Q with z = x / sqrt(2) folded in.
_GELU_A = [0.5 * p * 0.5**k / 2**0.5 for k, p in enumerate(ERF_P)]
_GELU_B = [q * 0.5**k for k, q in enumerate(ERF_Q)]
_GELU_A_DERIVATIVE = [k * a for k, a in enumerate(_GELU_A)][1:]  # A'(v), B'(v)
_GELU_B_DERIVATIVE = [k * b for k, b in enumerate(_GELU_B)][1:]


def _horner(coefficients: list[float], v: th.Tensor) -> th.Tensor:
    """``sum_k coefficients[k] v^k`` by Horner's rule (at least two coefficients)."""
    result = coefficients[-1] * v + coefficients[-2]
    for c in coefficients[-3::-1]:
        result = result * v + c
    return result


def rational_gelu(x: th.Tensor) -> th.Tensor:
    """
    erf GELU, ``x Phi(x)``, with erf as a rational function: multiply-adds and one division, no exponential (inductor's
    CPU erf computes one). Within float32 rounding of ``F.gelu`` (1.1e-6 on [-12, 12]); saturates to 0 and x exactly.
    """
    w = x.clamp(-(2**0.5) * ERF_LIMIT, 2**0.5 * ERF_LIMIT)
    v = w * w
    return x * (0.5 + w * _horner(_GELU_A, v) / _horner(_GELU_B, v))


def rational_gelu_derivative(x: th.Tensor) -> th.Tensor:
    """
    The derivative of :func:`rational_gelu` written out (multiply-adds and divisions, no exponential), from ``x``
    alone: ``1/2 + w R(w^2)``, plus ``w (R + 2 w^2 R')`` where the clamp lets ``w`` follow ``x`` (``R = A / B``, ``w``
    the clamped ``x``). Within 2.2e-6 of the exact GELU's derivative in float32.
    """
    limit = 2**0.5 * ERF_LIMIT
    w = x.clamp(-limit, limit)
    v = w * w
    denominator = _horner(_GELU_B, v)
    ratio = _horner(_GELU_A, v) / denominator
    slope = (_horner(_GELU_A_DERIVATIVE, v) - ratio * _horner(_GELU_B_DERIVATIVE, v)) / denominator  # R'(v)
    inside = (x.abs() < limit).to(x.dtype)
    return 0.5 + w * ratio + inside * w * (ratio + 2 * v * slope)


def default_rational_gelu() -> bool:
    """
    Whether compiled no-gradient code (the sampling path: the flow's Euler steps, the critic's scoring of candidates)
    computes its erf GELUs as :func:`rational_gelu`: on x86 CPUs whose ATen kernels, and so inductor's generated code,
    are AVX2 or AVX-512, except where oneDNN runs bf16 matmuls on AMX. Measured with the compiled updates, paired (in
    turns), best-of-N small's updates/s: 1.09-1.11x on a Xeon held to AVX2 (AVX2 code, whose 8-float vectors make
    inductor's erf, an exponential and a division, cost the most), 1.06-1.07x on an AMD Zen 4, 1.03-1.04x on a Zen 5
    and on a Xeon without AMX; QC-FQL's 1.04-1.12x with AVX2 code (less sure), within the noise elsewhere (1.00-1.02x).
    With AMX, 0.95x: there inductor's erf stays. The longer graph costs cold compilation a few seconds more, once per
    machine (inductor's on-disk cache keeps it): ~4 s each for a tiny best-of-N model's first updates and first action
    on a Zen 4.
    """
    capability = th.backends.cpu.get_cpu_capability()
    return capability == "AVX2" or (capability == "AVX512" and not has_usable_amx())


# Read while torch.compile traces (a plain value: dynamo guards on it, so changing it recompiles).
RATIONAL_GELU = default_rational_gelu()


class EnsembleLinear(nn.Module):
    """
    ``n_members`` independent linear layers evaluated with one batched matmul.

    :param n_members: number of ensemble members (K)
    :param in_features: input size
    :param out_features: output size
    :param bias: whether to add a bias
    """

    def __init__(self, n_members: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(th.empty(n_members, in_features, out_features))
        self.bias = nn.Parameter(th.empty(n_members, 1, out_features)) if bias else None
        # Same initialisation as nn.Linear, member by member.
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: th.Tensor) -> th.Tensor:
        """
        :param x: (K, B, in) or (B, in) (the same input for every member)
        :return: (K, B, out)
        """
        if x.dim() == 2:
            out = th.matmul(x, self.weight)
        else:
            out = th.bmm(x, self.weight)
        return out if self.bias is None else out + self.bias


class EnsembleLayerNorm(nn.Module):
    """
    LayerNorm over the last dimension with a separate affine transform per ensemble member.

    :param n_members: number of ensemble members (K)
    :param features: size of the normalised dimension
    """

    def __init__(self, n_members: int, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(th.ones(n_members, 1, features))
        self.bias = nn.Parameter(th.zeros(n_members, 1, features))

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)  # one pass for the affine part


# The fused Linear+GELU's threshold on CPUs whose ATen kernels run AVX-512 (see default_fused_linear_gelu_min_macs).
AVX512_FUSED_LINEAR_GELU_MIN_MACS = 2**30


def default_fused_linear_gelu_min_macs() -> int | None:
    """
    From how many multiply-adds per call (rows x in x out) a no-gradient Linear followed by an erf GELU runs as one
    oneDNN matmul with a GELU post-op (:func:`linear_gelu`) instead of ATen's matmul (MKL's on x86) and a GELU kernel;
    None: never. Measured with the compiled best-of-N update, float32 sampling, on 2-core AMD EPYCs:

    - CPUs whose ATen kernels run AVX-512 (Zen 4): 8192 x 512 x 512 (the paper config's candidates) 1.21x the
      updates/s, 2048 x 256 x 256 (the small config's) 0.87x: from 2^30, between them;
    - AVX2-only CPUs (Zen 3): 0.89x at the paper's size and 0.82x at the small one, as oneDNN's GELU post-op costs
      three times a separate GELU kernel there (8192 x 512 x 512: 43.6 ms fused against 33.5 + 3.1 ms): never, nor
      where ``ONEDNN_MAX_CPU_ISA`` keeps oneDNN below AVX-512 (:func:`~sb3_qchunk.common.precision.onednn_allows`).
    """
    avx512 = th.backends.cpu.get_cpu_capability() == "AVX512" and onednn_allows("AVX512_CORE")
    return AVX512_FUSED_LINEAR_GELU_MIN_MACS if avx512 else None


FUSED_LINEAR_GELU_MIN_MACS = default_fused_linear_gelu_min_macs()
HAS_ONEDNN = th.backends.mkldnn.is_available()
# oneDNN's bf16 matmuls need AVX512-BF16 or AMX (elsewhere it has no bf16 primitive and the call would fail).
ONEDNN_BF16 = HAS_ONEDNN and th.ops.mkldnn._is_mkldnn_bf16_supported()


@th.library.custom_op("sb3_qchunk::linear_gelu", mutates_args=())
def linear_gelu(x: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """``gelu(x @ weight.T + bias)`` (erf GELU) as one oneDNN matmul with a GELU post-op; an opaque op to inductor."""
    return th.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")


@linear_gelu.register_fake
def _(x: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(th.ops.sb3_qchunk.linear_gelu)
def _linear_gelu_flops(x_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
    """The matmul's FLOPs, so that ``torch.utils.flop_counter`` counts the fused layer like ``nn.Linear``."""
    return 2 * math.prod(x_shape) * weight_shape[0]


def fused_linear_gelu_dtype(rows: int, dtype: th.dtype, device: th.device, linear: nn.Module, activation: nn.Module) -> th.dtype | None:
    """
    The precision in which ``activation(linear(x))`` runs as :func:`linear_gelu`, or None where it runs as the two
    modules, for an input ``x`` of ``rows`` rows, ``dtype`` and ``device``. Fused: no gradient taken, on a CPU, torch
    built with oneDNN, an ``nn.Linear`` with bias and an erf ``nn.GELU``, at least ``FUSED_LINEAR_GELU_MIN_MACS``
    multiply-adds (never where it is None); in float32 for a float32 ``x`` outside autocast, in bf16 under bf16
    autocast where oneDNN has bf16 matmuls (as autocast would run the Linear). The result equals the unfused one up to
    float rounding.
    """
    fusable = (  # the checks that fail while acting (small batches) first
        not th.is_grad_enabled()
        and type(linear) is nn.Linear
        and FUSED_LINEAR_GELU_MIN_MACS is not None
        and rows * linear.in_features * linear.out_features >= FUSED_LINEAR_GELU_MIN_MACS
        and linear.bias is not None
        and type(activation) is nn.GELU
        and activation.approximate == "none"
        and device.type == "cpu"
        and HAS_ONEDNN
        and (th.compiler.is_compiling() or th.backends.mkldnn.enabled)  # not inside precision.onednn_disabled
    )
    if not fusable:
        return None
    if th.is_autocast_enabled("cpu"):
        return th.bfloat16 if th.get_autocast_dtype("cpu") == th.bfloat16 and ONEDNN_BF16 else None
    return th.float32 if dtype == th.float32 else None

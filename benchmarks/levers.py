"""
Speed levers for the compiled fast path, measured one against the other in one process (measure each,
keep what pays). The baseline is the shipped fast path (``compile_update``, ``compile_sampling``,
``sampling_precision="auto"``, inductor options from :func:`sb3_qchunk.common.precision.compile_options`); each lever
changes one thing on top of it: an inductor option taken back or set otherwise (what the shipped options gain),
a kernel swapped in the no-gradient path, a global torch switch, the sampling precision, the way the update is
compiled (``one-graph-update``, ``two-graph-update``), how ``train()`` draws its batches (``per-update-draws``),
another form of the same function (``rational-gelu``), or, measured for speed only, a model change (``tanh-gelu``).
A later session can re-check a lever on another machine, or add one, here without touching the library.

Method: every lever gets its own model (same seed, same synthetic buffer as ``throughput.py``); the models take
turns in timed blocks of updates, and each block's rate is divided by the baseline's rate in the same round. The
table reports the median of those paired ratios and their quartiles, so a slow moment of the machine hits both
sides of a ratio; then the same for the action choice's latency (``predict`` on one observation).
``baseline-again`` is a second, identical baseline model: its spread is the noise floor.

    python benchmarks/levers.py --out benchmarks/results/levers_<machine>.md        # both actors, 1 and 2 threads
    python benchmarks/levers.py --actors distill --threads 2 --rounds 8     # a part
    python benchmarks/levers.py --smoke --out /tmp/levers.md                # tiny, for the tests
"""

import argparse
import contextlib
import functools
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch as th
import torch.nn.functional as F
from torch import nn

from throughput import (  # benchmarks/ is the script's directory
    ACTORS,
    CONFIGS,
    SMOKE_CONFIG,
    make_qc,
    onednn_pass,
    report_header,
    retain_freed_memory,
    write_report,
)

from sb3_qchunk import QC
from sb3_qchunk.common import torch_layers
from sb3_qchunk.common.compile_passes import ChainedPasses, OneDNNMatmuls, UnfuseBiasAdd
from sb3_qchunk.common.precision import compile_options


# --------------------------------------------------------------------------------------------------------------
# The candidates
# --------------------------------------------------------------------------------------------------------------
@th.library.custom_op("sb3_qchunk_levers::gelu", mutates_args=())
def aten_gelu(x: th.Tensor) -> th.Tensor:
    """ATen's erf GELU (oneDNN eltwise on CPU) as an op inductor cannot see into, so it is called, not generated."""
    return F.gelu(x)


@aten_gelu.register_fake
def _(x: th.Tensor) -> th.Tensor:
    return th.empty_like(x)


class SamplingGELU(nn.GELU):
    """erf GELU; in no-gradient code (the sampling path) through :func:`aten_gelu`."""

    def forward(self, x: th.Tensor) -> th.Tensor:
        return super().forward(x) if th.is_grad_enabled() else aten_gelu(x)


class SamplingLinearGELU(nn.Module):
    """gelu(linear(x)) with the same Linear; in no-gradient code through the library's oneDNN ``linear_gelu`` at any size."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: th.Tensor) -> th.Tensor:
        if th.is_grad_enabled():
            return F.gelu(self.linear(x))
        return torch_layers.linear_gelu(x, self.linear.weight.to(x.dtype), self.linear.bias.to(x.dtype))


def replace_erf_gelus(model: QC, make: Callable[[], nn.Module]) -> None:
    """Every erf GELU module of the policy (flow, one-step actor, critics) becomes ``make()``."""
    for module in model.policy.modules():
        for name, child in module.named_children():
            if type(child) is nn.GELU and child.approximate == "none":
                setattr(module, name, make())


def use_aten_gelu(model: QC) -> None:
    """Every GELU of the policy calls ATen's kernel when no gradient is taken."""
    replace_erf_gelus(model, SamplingGELU)


def fuse_flow_linear_gelu(model: QC) -> None:
    """The flow's hidden Linear+GELU pairs become one oneDNN matmul with a GELU post-op when no gradient is taken."""
    body = model.actor.flow.body
    for i in range(len(body) - 1):
        if isinstance(body[i], nn.Linear) and type(body[i + 1]) is nn.GELU:
            body[i], body[i + 1] = SamplingLinearGELU(body[i]), nn.Identity()


class RationalGELU(nn.GELU):
    """erf GELU as :func:`~sb3_qchunk.common.torch_layers.rational_gelu` everywhere, the gradient path too (autograd
    differentiates the rational form: no exponential in the backward either)."""

    def forward(self, x: th.Tensor) -> th.Tensor:
        return torch_layers.rational_gelu(x)


def use_rational_gelu_everywhere(model: QC) -> None:
    """Every erf GELU of the policy, with and without gradient, becomes :class:`RationalGELU`."""
    replace_erf_gelus(model, RationalGELU)


class _RationalGELUFunction(th.autograd.Function):
    """:func:`~sb3_qchunk.common.torch_layers.rational_gelu` with its derivative written out
    (:func:`~sb3_qchunk.common.torch_layers.rational_gelu_derivative`): the backward saves the input only, not
    autograd's intermediates of the rational form."""

    @staticmethod
    def forward(x: th.Tensor) -> th.Tensor:
        return torch_layers.rational_gelu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[th.Tensor], output: th.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> th.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch_layers.rational_gelu_derivative(x)


class RationalGELUFunction(nn.GELU):
    """erf GELU as :class:`_RationalGELUFunction` everywhere, the gradient path too."""

    def forward(self, x: th.Tensor) -> th.Tensor:
        return _RationalGELUFunction.apply(x)


def use_rational_gelu_function(model: QC) -> None:
    """Every erf GELU of the policy, with and without gradient, becomes :class:`RationalGELUFunction`."""
    replace_erf_gelus(model, RationalGELUFunction)


def use_tanh_gelu(model: QC) -> None:
    """Every erf GELU of the policy becomes the tanh approximation (``jax.nn.gelu``'s default, the reference's)."""
    replace_erf_gelus(model, functools.partial(nn.GELU, approximate="tanh"))


@contextlib.contextmanager
def setting(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` set to ``value`` inside the block and put back after it (a module's setting, a torch flag)."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


@dataclass
class Lever:
    """
    One candidate change to the fast path.

    :param description: what it changes (printed under the table)
    :param compile_update: the model's ``compile_update`` setting (True: the shipped choice per actor)
    :param policy_kwargs: ``policy_kwargs`` settings of the model besides the shipped fast path's
    :param apply: changes a freshly built model before its first update (module swaps through its public attributes)
    :param context: entered around each of the lever's timed blocks (global switches)
    :param needs_mkldnn: skipped where torch has no oneDNN
    """

    description: str
    compile_update: bool | str = True
    policy_kwargs: dict = field(default_factory=dict)
    apply: Callable[[QC], None] = lambda model: None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    needs_mkldnn: bool = False


SHIPPED = compile_options(th.device("cpu"))


class OneDNNMatmulsNoBmm(OneDNNMatmuls):
    """:class:`OneDNNMatmuls` for ``mm`` and ``addmm`` only: batched matmuls (the critic ensemble's) stay ATen's."""

    def rewrites(self, target: Any, args: Any, kwargs: dict[str, Any]) -> bool:
        return target is not th.ops.aten.bmm.default and super().rewrites(target, args, kwargs)

    def __repr__(self) -> str:  # also inductor's cache key (``uuid``): not the full pass's
        return f"OneDNNMatmulsNoBmm(min_dim={self.min_dim})"


def without(option: str) -> dict:
    """The shipped inductor options less one."""
    return {key: value for key, value in SHIPPED.items() if key != option}


LEVERS = {
    "baseline": Lever(f"the shipped fast path: compile_update + compile_sampling (inductor options {SHIPPED}), `sampling_precision='auto'` (bf16 where `has_fast_bf16`)"),
    "baseline-again": Lever("a second, identical model (the noise floor)"),
    "inductor-defaults": Lever("compiled with inductor's default options (`compile_options={}`)", policy_kwargs=dict(compile_options={})),
    "no-cpp-wrapper": Lever("the shipped inductor options without `cpp_wrapper`", policy_kwargs=dict(compile_options=without("cpp_wrapper"))),
    "no-realize": Lever(
        "the shipped inductor options without `realize_cpu_opcount_threshold` (inductor's default)",
        policy_kwargs=dict(compile_options=without("realize_cpu_opcount_threshold")),
    ),
    **{
        f"realize-{threshold}": Lever(
            f"the shipped inductor options with `realize_cpu_opcount_threshold={threshold}`",
            policy_kwargs=dict(compile_options=dict(SHIPPED, realize_cpu_opcount_threshold=threshold)),
        )
        for threshold in (2, 8)
    },
    "no-unfuse-bias": Lever(
        "the shipped inductor options without `UnfuseBiasAdd` (dense layers' bias added inside ATen's `addmm` instead of "
        "in the activation's kernel; `OneDNNMatmuls` kept where shipped)",
        policy_kwargs=dict(
            compile_options=dict(SHIPPED, post_grad_custom_post_pass=onednn_pass(SHIPPED))
            if onednn_pass(SHIPPED) is not None
            else without("post_grad_custom_post_pass")
        ),
    ),
    "no-input-asserts": Lever(
        "the shipped inductor options with `size_asserts`, `alignment_asserts` and `scalar_asserts` off: the compiled "
        "graph does not re-check its inputs' sizes, strides, alignment and scalars at each call (dynamo's guards check "
        "sizes and strides before it runs)",
        policy_kwargs=dict(compile_options=dict(SHIPPED, size_asserts=False, alignment_asserts=False, scalar_asserts=False)),
    ),
    "kernels-1-thread": Lever(
        "the shipped inductor options with `cpp.threads=1`: inductor's generated kernels run on one thread (no OpenMP "
        "fork and join around each); the matmuls they call share OpenMP's pool, so they may run on one thread too",
        policy_kwargs=dict(compile_options={**SHIPPED, "cpp.threads": 1}),
    ),
    **{
        f"min-chunk-{size}": Lever(
            f"the shipped inductor options with `cpp.min_chunk_size={size}`: a generated kernel runs on several threads only "
            f"where each gets at least {size} elements (inductor's default: 512), so small kernels skip OpenMP's fork and join",
            policy_kwargs=dict(compile_options={**SHIPPED, "cpp.min_chunk_size": size}),
        )
        for size in (64, 4096, 16384, 65536)
    },
    "aggressive-fusion": Lever(
        "the shipped inductor options with `aggressive_fusion=True`: inductor fuses kernels that share no memory access too",
        policy_kwargs=dict(compile_options={**SHIPPED, "aggressive_fusion": True}),
    ),
    "dynamic-threads": Lever(
        "the shipped inductor options with `cpp.dynamic_threads=True`: each generated kernel picks its thread count at run "
        "time from its amount of work",
        policy_kwargs=dict(compile_options={**SHIPPED, "cpp.dynamic_threads": True}),
    ),
    "simdlen-256": Lever(
        "the shipped inductor options with `cpp.simdlen=256`: inductor's generated kernels use 256-bit vectors (AVX2) "
        "on a CPU whose ATen kernels run AVX-512 (Zen 4 executes 512-bit instructions as two 256-bit halves); ATen's "
        "and oneDNN's kernels as shipped",
        policy_kwargs=dict(compile_options={**SHIPPED, "cpp.simdlen": 256}),
    ),
    "skip-guards": Lever(
        "dynamo's guards skipped while the compiled code runs (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`): "
        "for measurement only, what checking the compiled functions' inputs costs at each call (unsafe: a changed input "
        "would run stale code)",
        context=lambda: th.compiler.set_stance("default", skip_guard_eval_unsafe=True),
    ),
    "per-update-draws": Lever(
        "`train()` draws each update's batch and noise on its own (`QC.UPDATES_PER_DRAW = 1`) instead of those of up to 32 "
        "updates at once",
        apply=lambda model: setattr(model, "UPDATES_PER_DRAW", 1),
    ),
    "max-autotune": Lever(
        "inductor's `max_autotune` with its C++ GEMM template as a candidate beside ATen's (`max_autotune_gemm_backends="
        "'CPP,ATEN'`): matmuls generated for the shapes where they beat ATen's; without epilogue fusion (with it, torch 2.13 "
        "fails to compile either update: assertions in the GEMM template's epilogue code)",
        policy_kwargs=dict(compile_options=dict(SHIPPED, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", epilogue_fusion=False)),
    ),
    "aten-gelu": Lever("no-gradient GELUs call ATen's kernel instead of inductor's generated one", apply=use_aten_gelu),
    "onednn-linear-gelu": Lever(
        "the flow's hidden Linear+GELU pairs as one oneDNN matmul with a GELU post-op (no-gradient path)",
        apply=fuse_flow_linear_gelu,
        needs_mkldnn=True,
    ),
    "fp32-sampling": Lever(
        "`sampling_precision='float32'`: the sampling path (critic target, distillation target) without bf16",
        policy_kwargs=dict(sampling_precision="float32"),
    ),
    "bf16-sampling": Lever(
        "`sampling_precision='bfloat16'`: the sampling path in bf16 at every size (what \"auto\" chooses only where one "
        "call of the widest layer is large enough)",
        policy_kwargs=dict(sampling_precision="bfloat16"),
    ),
    "fp32-sampling-onednn-linear-gelu": Lever(
        "`sampling_precision='float32'` with the flow's hidden Linear+GELU pairs as one oneDNN float32 matmul with a "
        "GELU post-op (no-gradient path; compare with `fp32-sampling` as the baseline)",
        policy_kwargs=dict(sampling_precision="float32"),
        apply=fuse_flow_linear_gelu,
        needs_mkldnn=True,
    ),
    "fp32-sampling-unfused": Lever(
        "`sampling_precision='float32'` with the flow's Linear+GELU pairs never fused into one oneDNN call (what "
        "`fused_linear_gelu_dtype` does for large batches on AVX-512 CPUs)",
        policy_kwargs=dict(sampling_precision="float32"),
        context=functools.partial(setting, torch_layers, "FUSED_LINEAR_GELU_MIN_MACS", None),
    ),
    "unfused": Lever(
        "the flow's Linear+GELU pairs never fused into one oneDNN call (the shipped sampling path fuses large batches "
        "on AVX-512 CPUs)",
        context=functools.partial(setting, torch_layers, "FUSED_LINEAR_GELU_MIN_MACS", None),
    ),
    "fused-large": Lever(
        "the flow's Linear+GELU pairs fused into one oneDNN call from 2^30 multiply-adds, what AVX-512 CPUs ship (AVX2-only "
        "CPUs never fuse)",
        context=functools.partial(setting, torch_layers, "FUSED_LINEAR_GELU_MIN_MACS", torch_layers.AVX512_FUSED_LINEAR_GELU_MIN_MACS),
    ),
    "one-graph-update": Lever("`compile_update='one_graph'`: the whole update as one compiled graph, for either actor", "one_graph"),
    "two-graph-update": Lever(
        "`compile_update='two_graphs'`: the losses as a forward and a backward graph, `Optimizer.step` and Polyak update "
        "in Python, for either actor",
        "two_graphs",
    ),
    "onednn-matmuls": Lever(
        "large float32 matmuls of the compiled graphs (forward and backward; every dimension >= 128) by oneDNN instead of "
        "ATen's (MKL's): `compile_options(cpu, onednn_matmuls=True)` (`OneDNNMatmuls` after `UnfuseBiasAdd`; the "
        "default where `prefers_onednn_float32_matmuls()`)",
        policy_kwargs=dict(compile_options=compile_options(th.device("cpu"), onednn_matmuls=True)),
        needs_mkldnn=True,
    ),
    "onednn-matmuls-no-bmm": Lever(
        "`onednn-matmuls` for the compiled graphs' `mm` and `addmm` only: the critic ensemble's batched matmuls stay "
        "ATen's (the full pass runs each batch member as its own oneDNN call and concatenates them)",
        policy_kwargs=dict(compile_options=dict(SHIPPED, post_grad_custom_post_pass=ChainedPasses(UnfuseBiasAdd(), OneDNNMatmulsNoBmm()))),
        needs_mkldnn=True,
    ),
    "no-onednn-matmuls": Lever(
        "float32 matmuls all ATen's (MKL's): `compile_options(cpu, onednn_matmuls=False)` (the default where not "
        "`prefers_onednn_float32_matmuls()`)",
        policy_kwargs=dict(compile_options=compile_options(th.device("cpu"), onednn_matmuls=False)),
    ),
    "tanh-gelu": Lever("tanh-approximated GELU (the reference's activation, `jax.nn.gelu`) instead of erf GELU", apply=use_tanh_gelu),
    "rational-gelu": Lever(
        "the flow's and critics' compiled no-gradient GELUs compute erf as a rational function (multiply-adds and a "
        "division, `rational_gelu`) on any CPU (shipped on x86 CPUs without AMX); the same function within "
        "float32 rounding",
        context=functools.partial(setting, torch_layers, "RATIONAL_GELU", True),
    ),
    "rational-gelu-function": Lever(
        "every erf GELU of the policy as `rational_gelu` with and without gradient, its derivative written out in a "
        "`torch.autograd.Function` (the backward keeps the input only)",
        apply=use_rational_gelu_function,
    ),
    "rational-gelu-everywhere": Lever(
        "every erf GELU of the policy computes erf as a rational function (`rational_gelu`), with and without gradient: "
        "the gradient path's GELUs and their backward (autograd through the rational form) too",
        apply=use_rational_gelu_everywhere,
    ),
    "inductor-erf-gelu": Lever(
        "the flow's and critics' compiled no-gradient GELUs with inductor's erf (exponential and division) on any CPU "
        "(shipped: `rational_gelu` on x86 CPUs without AMX)",
        context=functools.partial(setting, torch_layers, "RATIONAL_GELU", False),
    ),
    "bf16-fpmath": Lever(
        "`torch.backends.mkldnn.matmul.fp32_precision = 'bf16'` around the updates (gradient path's matmuls included)",
        context=functools.partial(setting, th.backends.mkldnn.matmul, "fp32_precision", "bf16"),
        needs_mkldnn=True,
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------
def measure(actor: str, config: dict, levers: list[str], threads: int, rounds: int, block: int, batch_size: int) -> list[str]:
    """The table rows of one (actor, thread count): each lever's median rate and paired ratio to the baseline."""
    retain_freed_memory()
    th.set_num_threads(threads)
    models: dict[str, QC] = {}
    for name in levers:
        lever = LEVERS[name]
        settings = dict(lever.policy_kwargs)
        precision = settings.pop("sampling_precision", "auto")
        model = make_qc(actor, config["net_arch"], config["num_samples"], batch_size, precision, "cpu", lever.compile_update, **settings)
        lever.apply(model)
        with LEVERS[name].context():
            model.train(2, batch_size)  # compilation
        models[name] = model
    rates: dict[str, list[float]] = {name: [] for name in levers}
    for _ in range(rounds):
        for name, model in models.items():
            with LEVERS[name].context():
                start = time.perf_counter()
                model.train(block, batch_size)
                rates[name].append(block / (time.perf_counter() - start))
    # Acting: the chunk choice for one observation (compiled where the lever keeps compile_sampling), in turns too.
    observation = next(iter(models.values())).observation_space.sample()
    act_ms: dict[str, list[float]] = {name: [] for name in levers}
    for name, model in models.items():
        with LEVERS[name].context():
            model.predict(observation, deterministic=True)  # compilation
    for _ in range(rounds):
        for name, model in models.items():
            with LEVERS[name].context():
                start = time.perf_counter()
                for _ in range(4 * block):
                    model.predict(observation, deterministic=True)
                act_ms[name].append((time.perf_counter() - start) / (4 * block) * 1e3)
    rows = []
    for name in levers:
        paired = [rate / base for rate, base in zip(rates[name], rates[levers[0]])]
        q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
        act_paired = statistics.median([ms / base for ms, base in zip(act_ms[name], act_ms[levers[0]])])
        rows.append(
            f"| {actor} | {threads} | {name} | {statistics.median(rates[name]):.2f} | {statistics.median(paired):.3f} | "
            f"{q1:.3f} | {q3:.3f} | {statistics.median(act_ms[name]):.3f} | {act_paired:.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", nargs="+", default=list(ACTORS), choices=list(ACTORS))
    parser.add_argument("--threads", nargs="+", type=int, default=[2, 1], help="torch threads, one process each")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS), help="the first is the baseline")
    parser.add_argument("--rounds", type=int, default=16, help="timed blocks per lever")
    parser.add_argument("--config", default="small", choices=list(CONFIGS), help="network sizes and N (throughput.py's configs)")
    parser.add_argument("--block", type=int, default=25, help="updates per timed block")
    parser.add_argument("--smoke", action="store_true", help="tiny networks, a few updates (for the tests)")
    parser.add_argument("--out", type=str, default=None, help="write the markdown report to this file")
    args = parser.parse_args()

    config, block, batch_size = CONFIGS[args.config], args.block, 256
    if args.smoke:
        config, block, batch_size, args.rounds = SMOKE_CONFIG["smoke"], 2, 8, 2
    levers = [name for name in args.levers if th.backends.mkldnn.is_available() or not LEVERS[name].needs_mkldnn]
    context = multiprocessing.get_context("spawn")
    rows: list[str] = []
    for actor in args.actors:
        for threads in args.threads:
            # A process each: the thread count is set before anything is compiled, and compiled code stays per process.
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                rows += pool.submit(measure, actor, config, levers, threads, args.rounds, block, batch_size).result()

    report = [
        *report_header("Speed levers of the compiled fast path, one against the other", "cpu", retain_freed_memory()),  # as in measure()
        f"Config: {'smoke' if args.smoke else args.config} ({config['net_arch']}, N={config['num_samples']}, batch {batch_size}); "
        f"{args.rounds} rounds of {block} updates per lever, the levers taking turns; then {args.rounds} rounds of "
        f"{4 * block} action choices (`predict`, one observation, deterministic) per lever, in turns too.",
        "",
        "| actor | threads | lever | updates/s (median) | / baseline (median of paired ratios) | q1 | q3 | predict ms (median) | / baseline |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Levers:",
        "",
        *[f"- `{name}`: {LEVERS[name].description}" for name in levers],
        "",
    ]
    write_report(report, args.out)


if __name__ == "__main__":
    main()

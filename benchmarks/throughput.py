"""
Throughput of sb3-qchunk on this machine, in one run:

1. Gradient updates per second of QC (best-of-N and QC-FQL) against SB3's SAC with the same networks (as a
   ratio), for the plain float32 path and the fast path (``sampling_precision="auto"``: bf16 sampling on devices
   where bf16 is faster than fp32, for layers whose calls are large enough to pay for the casts), and the latency of
   choosing one chunk. Small config: 256x256, N=8; paper config: 4x512, N=32; both batch 256, h=5, obs 28, action 5
   (OGBench cube-single's sizes), flow_steps 10, 2 critics.
   With ``--reference FILE`` (a JSON of the authors' JAX code's rates measured on this machine, e.g.
   ``benchmarks/results/reference_amd_epyc.json``), each row also gets its ratio to the reference's rate for the
   same config and actor, and the goals are checked against it (1.5x the reference for small, 2x for paper).
   With ``--reference-src DIR --reference-python PY`` the authors' code itself is measured in the same run, its
   blocks interleaved with ours (``benchmarks/reference.py`` says how to set it up), and its action latency too.
2. Two bounds. The FLOPs of one update (``torch.utils.flop_counter``) against the measured matmul throughput of
   torch on this device (fp32, and bf16 for the sampling path when it runs in bf16): the fraction of that bound
   reached. And the matmul floor: the update's own matmuls (the shapes, layouts and precisions one eager update of
   the same settings calls) replayed alone on random data, each several times in a row (inputs in cache), timed in
   the same interleaved blocks: a lower bound of the update's time if everything but its matmuls were free, and so
   the highest QC / reference ratio that path can reach.
3. Chunk-wrapper overhead: primitive steps per second of a raw env against the same env inside
   ``ChunkedActionWrapper`` (h=5), on OGBench cube-single and on Pendulum-v1 (a cheap env).
4. Dataset load time and replay-buffer memory for 1M OGBench transitions against the raw arrays' size.
5. A torch.profiler breakdown of an update (the first config), plain and fast path: matmuls, inductor-generated
   kernels (by name: compiled rows are profiled without ``cpp_wrapper``) and everything else.
6. One dense layer at the update's shapes, GFLOP/s: torch's float32 and bf16 matmul, oneDNN's float32 linear, and,
   paired, the reference's (XLA) float32 layer: what sets the matmul floor of each precision on this machine.

Buffers for (1) hold synthetic transitions, so those numbers measure the update itself, not env stepping. The run
keeps freed memory in the process (:func:`retain_freed_memory`; the reference's worker likewise), as a training run
with a dataset loaded has it: no update faults fresh pages in.
Each rate is the median of ``--repeats`` timed blocks, the algorithms interleaved block by block, so that a
slower moment of the machine does not favour one of them.

    python benchmarks/throughput.py --out benchmarks/results/throughput_<machine>.md   # everything (~10 min on 2 cores)
    python benchmarks/throughput.py --sections updates --configs small        # a part
    python benchmarks/throughput.py --device cuda --sections updates          # on a GPU
    python benchmarks/throughput.py --reference benchmarks/results/reference_amd_epyc.json    # with QC / reference
    python benchmarks/throughput.py --sections updates --reference-src ../qc --reference-python ../qc-venv/bin/python  # paired
    python benchmarks/throughput.py --sections updates --cores 1 --reference-src ../qc --reference-python ../qc-venv/bin/python  # one core each
    python benchmarks/throughput.py --smoke --out /tmp/throughput.md          # tiny, for the tests
"""

import argparse
import ctypes
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.logger import configure
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from sb3_qchunk import QC, ChunkedActionWrapper
from sb3_qchunk.common.compile_passes import ChainedPasses, OneDNNMatmuls
from sb3_qchunk.common.precision import compile_options, has_fast_bf16
from sb3_qchunk.datasets import load_ogbench_npz

OBS_DIM, ACTION_DIM, CHUNK = 28, 5, 5
CONFIGS = {
    "small": dict(net_arch=[256, 256], num_samples=8, n_updates=50, sac_updates=200),
    "paper": dict(net_arch=[512, 512, 512, 512], num_samples=32, n_updates=5, sac_updates=50),
}
ACTORS = ("best_of_n", "distill")  # QC's actor types, in the order of every table
SMOKE_CONFIG = {"smoke": dict(net_arch=[16, 16], num_samples=2, n_updates=3, sac_updates=3)}
# The authors' JAX code as recorded once on a 2-core CPU, in updates/s: (best-of-N, QC-FQL); the `reference / SAC` column
# of runs that do not time the reference themselves (`--reference-src` measures both in the same blocks).
REFERENCE = {"small": (49.0, 139.0)}
REFERENCE_SAC_SMALL = 147.0  # SB3 SAC in the same session as the reference's small numbers
# The goals as multiples of the reference's rate on the same machine (``--reference`` or ``--reference-src``).
REFERENCE_GOALS = {"small": 1.5, "paper": 2.0}


def load_reference(path: Path) -> dict[str, dict[str, float]]:
    """
    The reference's updates/s measured on this machine: ``{config: {actor: rate}}`` from the ``updates_per_s``
    entry of a JSON file (actors named as QC's ``actor_type``), checked so that a typo cannot pass silently.
    """
    data = json.loads(Path(path).read_text())
    rates = data.get("updates_per_s")
    if not isinstance(rates, dict):
        raise ValueError(f"{path}: expected an 'updates_per_s' object of {{config: {{actor: rate}}}}")
    for config, by_actor in rates.items():
        if config not in {**CONFIGS, **SMOKE_CONFIG} or not isinstance(by_actor, dict) or not set(by_actor) <= {"best_of_n", "distill"}:
            raise ValueError(f"{path}: unknown config or actor in updates_per_s[{config!r}]: {by_actor!r}")
        if not all(isinstance(rate, (int, float)) and rate > 0 for rate in by_actor.values()):
            raise ValueError(f"{path}: rates must be positive numbers, got {by_actor!r}")
    return rates


class ReferenceProcess:
    """
    The authors' JAX code in its own Python (``benchmarks/reference.py``, a worker driven over stdin/stdout), so that
    its blocks take turns with ours in one run. See reference.py for the set-up.

    :param python: the reference venv's Python
    :param src: a checkout of github ColinQiyangLi/qc
    """

    def __init__(self, python: str, src: Path) -> None:
        worker = Path(__file__).with_name("reference.py")
        # glibc's malloc as ours (retain_freed_memory), unless the user set it: set before its Python starts.
        env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES") or RETAIN_FREED_TUNABLES}
        self.process = subprocess.Popen(
            [python, str(worker), "--src", str(src)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        )
        self.read()  # {"ready": true} once jax and the reference are imported

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                answer = json.loads(line[len("RESULT "):])
                if "error" in answer:
                    raise RuntimeError(f"the reference worker failed: {answer['error']}")
                return answer
        raise RuntimeError(f"the reference worker exited (code {self.process.wait()}); its stderr is above")

    def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        return self.read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


class SyntheticEnv(gym.Env):
    """Random observations, never terminates on its own: only its spaces matter here."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-10.0, 10.0, (OBS_DIM,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def fill_qc_buffer(model: QC, n: int, rng: np.random.Generator) -> None:
    episode_ends = np.zeros(n, dtype=bool)
    episode_ends[999::1000] = True
    model.replay_buffer.add(
        {
            "obs": rng.standard_normal((n, OBS_DIM), dtype=np.float32),
            "next_obs": rng.standard_normal((n, OBS_DIM), dtype=np.float32),
            "action": rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
            "reward": -(rng.random(n) < 0.9).astype(np.float32),
            "terminated": np.zeros(n, dtype=bool),
            "truncated": episode_ends,
        }
    )


def fill_sac_buffer(model: SAC, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        model.replay_buffer.add(
            rng.standard_normal((1, OBS_DIM), dtype=np.float32),
            rng.standard_normal((1, OBS_DIM), dtype=np.float32),
            rng.uniform(-1, 1, (1, ACTION_DIM)).astype(np.float32),
            np.array([-1.0]),
            np.array([False]),
            [{}],
        )


def make_qc(
    actor_type: str,
    net_arch: list[int],
    num_samples: int,
    batch_size: int,
    precision: str,
    device: str,
    compiled: bool | str = False,
    training_precision: str = "float32",
    dataset: tuple[str, str] | None = None,
    **policy_settings: Any,
) -> QC:
    """
    A QC model on :class:`SyntheticEnv` with 10k synthetic transitions. ``precision``: ``sampling_precision``;
    ``compiled``: ``compile_update`` (True, or a compile mode) and ``compile_sampling``; ``dataset``: (OGBench npz,
    single-task env id) to build the model on that env with the dataset loaded instead, as a training run holds it;
    ``policy_settings``: more ``policy_kwargs`` (e.g. ``compile_options``).
    """
    if dataset is not None:
        import ogbench  # noqa: F401  (registers the OGBench envs)
    th.manual_seed(0)
    model = QC(
        "MlpPolicy",
        SyntheticEnv() if dataset is None else dataset[1],
        chunk_size=CHUNK,
        actor_type=actor_type,
        num_samples=num_samples,
        flow_steps=10,
        batch_size=batch_size,
        buffer_size=20_000 if dataset is None else 1_000,  # with a dataset: the online ring only (the dataset has its own block)
        compile_update=compiled,
        policy_kwargs=dict(
            net_arch=net_arch,
            sampling_precision=precision,
            training_precision=training_precision,
            compile_sampling=bool(compiled),
            **policy_settings,
        ),
        seed=0,
        device=device,
    )
    model.set_logger(configure(None, []))
    if dataset is None:
        fill_qc_buffer(model, 10_000, np.random.default_rng(0))
    else:
        model.load_dataset(load_ogbench_npz(dataset[0], env=dataset[1]))
    return model


def make_sac(net_arch: list[int], batch_size: int, device: str) -> SAC:
    th.manual_seed(0)
    model = SAC("MlpPolicy", SyntheticEnv(), batch_size=batch_size, buffer_size=20_000, policy_kwargs=dict(net_arch=net_arch), seed=0, device=device)
    model.set_logger(configure(None, []))
    fill_sac_buffer(model, 2_000, np.random.default_rng(0))
    return model


def interleaved_blocks(jobs: dict[str, tuple[Callable[[int], Any], int]], repeats: int) -> dict[str, list[float]]:
    """
    The rate (units per second) of each ``fn(n)`` in each of ``repeats`` rounds, the jobs taking turns within a round.

    :param jobs: name -> (fn, n): ``fn(n)`` does n units of work (one warm-up call of ``max(1, n // 5)`` first)
    """
    for fn, n in jobs.values():
        fn(max(1, n // 5))
    rates: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, (fn, n) in jobs.items():
            start = time.perf_counter()
            fn(n)
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def interleaved_rates(jobs: dict[str, tuple[Callable[[int], Any], int]], repeats: int) -> dict[str, float]:
    """Median rate (units per second) of each ``fn(n)`` over ``repeats`` timed blocks, the jobs taking turns."""
    return {name: statistics.median(values) for name, values in interleaved_blocks(jobs, repeats).items()}


def update_flops(model: QC) -> tuple[float, float]:
    """FLOPs of one gradient update, and those of its no-gradient sampling part (what bf16 autocast covers)."""
    data = model.replay_buffer.sample(model.batch_size)
    with FlopCounterMode(display=False) as total:
        model.train(1, model.batch_size)
    policy = model.policy
    with FlopCounterMode(display=False) as sampling, th.no_grad():
        if model.actor_type == "best_of_n":
            policy.sample_chunks(data.next_observations)
        else:
            features = model.actor.extract_features(data.observations, model.actor.features_extractor)
            model.actor.flow_actions(features, th.zeros_like(data.actions.flatten(1)))  # the distillation target
    return float(total.get_total_flops()), float(sampling.get_total_flops())


MATMUL_FUNCTIONS = (
    th.ops.aten.mm.default,
    th.ops.aten.addmm.default,
    th.ops.aten.bmm.default,
    th.ops.aten.baddbmm.default,
    th.ops.sb3_qchunk.linear_gelu.default,  # large float32 sampling batches (sb3_qchunk.common.torch_layers)
)


class _MatmulRecorder(TorchDispatchMode):
    """Records each matmul that runs inside it: the op, and per tensor argument its shape, strides and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in MATMUL_FUNCTIONS:
            layouts = [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, th.Tensor) else a for a in args]
            self.calls.append((func, layouts, dict(kwargs)))
        return func(*args, **kwargs)


class MatmulFloor:
    """
    The matmuls of one gradient update of ``model``, replayed on random data: calling it with n runs each of them n
    times in a row (so its inputs are in cache, as they may be in the update: the floor is a lower bound).
    They are recorded in one eager update of ``model`` (which it changes by that update): pass an eager model with
    the settings (actor, sampling and training precision) of the path whose floor is wanted. Compiled code calls the
    same matmuls (inductor may fold a thin one into a generated kernel), so an eager twin stands for a compiled row;
    ``onednn``: the compiled row's :class:`OneDNNMatmuls` pass, whose matmuls are replayed as it runs them (oneDNN's
    linear, one call per ``bmm`` member).

    :param model: an eager QC model with data in its buffer
    :param onednn: the pass of the compiled code the floor stands for, or None
    """

    def __init__(self, model: QC, onednn: OneDNNMatmuls | None = None) -> None:
        recorder = _MatmulRecorder()
        with recorder:
            model.train(1, model.batch_size)
        device = model.device
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []
        for func, layouts, kwargs in recorder.calls:
            args = [self._tensor(a, device) for a in layouts]
            rewritten = onednn is not None and onednn.rewrites(func, args, kwargs)
            self.calls.append(self._onednn_call(func, args) if rewritten else (func, args, kwargs))
        self.device = device

    @staticmethod
    def _onednn_call(func: Any, args: list[Any]) -> tuple[Any, list[Any], dict[str, Any]]:
        linear = th.ops.sb3_qchunk.onednn_linear.default
        if func is th.ops.aten.bmm.default:
            a, b = args
            return (lambda a, b: [linear(a[i], b[i].t(), None) for i in range(a.shape[0])]), [a, b], {}
        bias, (a, b) = (args[0] if func is th.ops.aten.addmm.default else None), args[-2:]
        return linear, [a, b.t(), bias], {}

    @staticmethod
    def _tensor(layout: Any, device: th.device) -> Any:
        if not isinstance(layout, tuple):
            return layout
        shape, stride, dtype = layout
        storage = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
        return th.randn(storage, device=device).to(dtype).as_strided(shape, stride)

    def __call__(self, n: int) -> None:
        for func, args, kwargs in self.calls:  # each matmul n times in a row: its inputs stay in cache, a lower bound
            for _ in range(n):
                func(*args, **kwargs)
        if self.device.type == "cuda":
            th.cuda.synchronize()


# (rows, inputs, outputs) of the dense layers that dominate an update: the gradient path's (batch 256) and the
# sampling path's (256 x N candidates) hidden layers, small and paper config.
MATMUL_SHAPES = [(256, 256, 256), (2048, 256, 256), (256, 512, 512), (8192, 512, 512)]


def repeated(fn: Callable[..., Any], *args: Any) -> Callable[[int], None]:
    """A job of :func:`interleaved_rates`: ``fn(*args)`` r times, each result dropped before the next call."""

    def run(r: int) -> None:
        for _ in range(r):
            fn(*args)
        if any(isinstance(a, th.Tensor) and a.is_cuda for a in args):
            th.cuda.synchronize()

    return run


def bench_matmuls(device: str, repeats: int, paired: tuple[str, Path] | None, shapes: list[tuple[int, int, int]]) -> list[str]:
    """
    Section 6: GFLOP/s of one dense layer ``x @ W.T + b`` at the update's shapes, the ways torch can run it on this
    device (ATen's ``addmm``: MKL on x86 CPUs for float32, oneDNN for bf16; oneDNN's float32 linear where torch has
    it) against the reference's (a jitted XLA layer, float32, ``paired`` only), all in turns.
    """
    jobs: dict[str, tuple[Callable[[int], Any], int]] = {}
    worker = ReferenceProcess(*paired) if paired else None
    for m, k, n in shapes:
        x, weight, bias = th.randn(m, k, device=device), th.randn(n, k, device=device), th.randn(n, device=device)
        low = [t.bfloat16() for t in (x, weight, bias)]
        reps = max(2, min(1000, int(2e9 / (2 * m * k * n))))  # ~2 GFLOP a block (at most 1000 calls)
        jobs[f"{m}x{k}x{n} torch fp32"] = (repeated(th.addmm, bias, x, weight.t()), reps)
        jobs[f"{m}x{k}x{n} torch bf16"] = (repeated(th.addmm, low[2], low[0], low[1].t()), reps)
        if device == "cpu" and th.backends.mkldnn.is_available():
            jobs[f"{m}x{k}x{n} onednn fp32"] = (repeated(th.ops.mkldnn._linear_pointwise, x, weight, bias, "none", [], ""), reps)
        if worker is not None:
            jobs[f"{m}x{k}x{n} reference fp32"] = (lambda r, mkn=(m, k, n): worker.request("matmul", m=mkn[0], k=mkn[1], n=mkn[2], reps=r), reps)
    rates = interleaved_rates(jobs, repeats)
    if worker is not None:
        worker.close()
    lines = [
        "| rows x in x out | torch fp32 (ATen addmm) | oneDNN fp32 linear | torch bf16 (ATen addmm) | reference fp32 (XLA) |",
        "|---|---|---|---|---|",
    ]
    ways = ("torch fp32", "onednn fp32", "torch bf16", "reference fp32")
    for m, k, n in shapes:
        gflops = {way: rates[f"{m}x{k}x{n} {way}"] * 2 * m * k * n / 1e9 for way in ways if f"{m}x{k}x{n} {way}" in rates}
        cells = [(f"{gflops[way]:.0f}" if gflops[way] >= 10 else f"{gflops[way]:.3f}") if way in gflops else "-" for way in ways]
        lines.append(f"| {m} x {k} x {n} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    return lines


def matmul_peak(dtype: th.dtype, device: str, size: int = 1024, repeats: int = 20, onednn: bool = False) -> float:
    """Measured GFLOP/s of a square matmul in ``dtype`` (the best of a few timed blocks): ATen's, or with ``onednn``
    oneDNN's linear as :class:`OneDNNMatmuls` runs it (CPU, float32)."""
    a = th.randn(size, size, device=device, dtype=dtype)
    b = th.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            c = th.ops.sb3_qchunk.onednn_linear(a, b.t(), None) if onednn else a @ b
        float(c[0, 0])  # waits for the device
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def bench_updates(
    configs: dict[str, dict[str, Any]],
    batch_size: int,
    repeats: int,
    device: str,
    with_compile: bool = True,
    reference: dict[str, dict[str, float]] | None = None,
    paired: tuple[str, Path] | None = None,
) -> tuple[list[str], list[str]]:
    """
    Section 1 and 2: updates/s, ratios to SAC, predict latency, start-up time (compilation), FLOPs and the
    fraction of the matmul bound, for the plain path, the fast path and (``with_compile``) the compiled fast path.
    Each config runs in a fresh process, so that compiled code of one config never stands in the way of the next
    (dynamo's caches and recompile limits are per process). ``paired``: (Python, checkout) of the authors' code,
    measured in the same interleaved blocks (:class:`ReferenceProcess`); its rates replace ``reference``'s.
    """
    peak32 = matmul_peak(th.float32, device)
    peak16 = matmul_peak(th.bfloat16, device)
    # oneDNN's float32 rate: the bound of compiled rows whose compile options run large float32 matmuls by oneDNN.
    onednn = device == "cpu" and th.backends.mkldnn.is_available()
    peak32_onednn = matmul_peak(th.float32, device, onednn=True) if onednn else peak32
    fast = has_fast_bf16(th.device(device).type)
    onednn_text = (
        f", fp32 by oneDNN's linear {peak32_onednn:.0f} GFLOP/s (the bound's float32 rate for compiled rows that run large "
        f"float32 matmuls by oneDNN: here {'yes' if onednn_pass(compile_options(th.device(device))) is not None else 'no'} by default, `OneDNNMatmuls`)"
        if onednn
        else ""
    )
    lines = [
        f"Measured matmul throughput (1024^3, best of 5 blocks): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s{onednn_text}; "
        f"bf16 faster than fp32 on this device (`has_fast_bf16`): {fast} (so `sampling_precision='auto'` = {'bf16' if fast else 'fp32'} where one call of the widest layer has >= 2^23 multiply-adds and is >= 512 wide, or has >= 2^25 multiply-adds: the updates' sampling except QC-FQL's in the small config, and the paper config's best-of-N acting; the row's label says which the update's sampling ran in). "
        "`compile`: `compile_update=True` (the whole loss, forward and backward, one graph) and `compile_sampling=True` (acting). "
        "`bf16 training`: `training_precision='bfloat16'` (opt-in mixed precision of the gradient path; all other rows "
        "keep it in float32). `start-up s`: the first update and first action choice, each config in a fresh process "
        "with an empty inductor cache (the first compiled row of an actor pays the cold compilation; later runs on the "
        "same machine reuse the on-disk cache).",
        "",
        "| config | actor | path | QC updates/s | SAC updates/s | QC / SAC | reference / SAC | QC / reference | "
        "predict ms/chunk | reference act ms | start-up s | GFLOP/update | reference GFLOP/update | GFLOP/s | "
        "fraction of bound | matmul floor ms | QC / reference at the floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    goals: list[str] = []
    context = multiprocessing.get_context("spawn")
    for name, config in configs.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            rows, config_goals = pool.submit(
                with_empty_inductor_cache,
                bench_config,
                name,
                config,
                batch_size,
                repeats,
                device,
                with_compile,
                peak32,
                peak16,
                peak32_onednn,
                (reference or {}).get(name, {}),
                paired,
            ).result()
        lines += rows
        goals += config_goals
    return lines, goals


def with_empty_inductor_cache(function: Callable[..., Any], *args: Any) -> Any:
    """
    ``function(*args)`` with an empty inductor cache, so the start-up of the first compiled model is what a first run
    on a machine pays (later runs find the compiled kernels in the on-disk cache and start in a few seconds).
    """
    with tempfile.TemporaryDirectory(prefix="throughput-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        return function(*args)


def onednn_pass(options: dict[str, Any]) -> OneDNNMatmuls | None:
    """The :class:`OneDNNMatmuls` pass among inductor ``options``' custom post-grad passes, if any."""
    graph_pass = options.get("post_grad_custom_post_pass")
    passes = graph_pass.passes if isinstance(graph_pass, ChainedPasses) else (graph_pass,)
    return next((p for p in passes if isinstance(p, OneDNNMatmuls)), None)


def bench_config(
    name: str,
    config: dict[str, Any],
    batch_size: int,
    repeats: int,
    device: str,
    with_compile: bool,
    peak32: float,
    peak16: float,
    peak32_onednn: float,
    reference: dict[str, float],
    paired: tuple[str, Path] | None = None,
) -> tuple[list[str], list[str]]:
    """The table rows and goal lines of one config (see :func:`bench_updates`)."""
    fast = has_fast_bf16(th.device(device).type)
    lines: list[str] = []
    goals: list[str] = []
    # (sampling precision, compile, training precision). Models of one setting share their compiled code; each
    # compiled (actor, precisions) compiles it again: up to 6 per config process, under dynamo's default limit of 8.
    variants = [("float32", False, "float32"), ("auto", False, "float32")]
    if with_compile:
        # Compiled float32 too where "auto" samples in bf16: the fast path of CPUs without fast bf16 (AVX2-only ones).
        variants += [("float32", True, "float32")] if fast else []
        variants += [("auto", True, "float32"), ("auto", True, "bfloat16")]
    else:
        variants += [("auto", False, "bfloat16")]
    sac = make_sac(config["net_arch"], batch_size, device)
    models, startup = {}, {}
    for actor in ACTORS:
        for precision, compiled, training in variants:
            model = make_qc(actor, config["net_arch"], config["num_samples"], batch_size, precision, device, compiled, training)
            start = time.perf_counter()  # the first update and the first action choice: compilation, if any
            model.train(1, batch_size)
            model.predict(np.zeros(OBS_DIM, dtype=np.float32))
            key = (actor, precision, compiled, training)
            models[key], startup[key] = model, time.perf_counter() - start
    # The matmul floor of each (actor, sampling precision, training precision, oneDNN pass), recorded on an eager model
    # of those settings (the row's own, or a twin for compiled rows); compiled rows whose compile options run large
    # float32 matmuls by oneDNN (OneDNNMatmuls) get a floor of their own that replays them so.
    floors: dict[tuple[str, str, str, bool], MatmulFloor] = {}
    for actor, precision, compiled, training in sorted(models, key=lambda key: key[2]):  # eager models first
        onednn = onednn_pass(models[actor, precision, compiled, training].policy.inductor_options()) if compiled else None
        if (actor, precision, training, onednn is not None) not in floors:
            twin = models[actor, precision, compiled, training] if not compiled else make_qc(
                actor, config["net_arch"], config["num_samples"], batch_size, precision, device, False, training
            )
            floors[actor, precision, training, onednn is not None] = MatmulFloor(twin, onednn)
    jobs: dict[str, tuple[Callable[[int], Any], int]] = {"sac": (lambda n, m=sac: m.train(n, batch_size), config["sac_updates"])}
    for key, model in models.items():
        jobs[str(key)] = (lambda n, m=model: m.train(n, batch_size), config["n_updates"])
    for key, floor in floors.items():
        jobs[f"floor {key}"] = (floor, config["n_updates"])
    obs = np.zeros(OBS_DIM, dtype=np.float32)
    act_jobs = {str(key): (lambda n, m=model: [m.predict(obs) for _ in range(n)], 20) for key, model in models.items()}
    worker = ReferenceProcess(*paired) if paired else None
    reference_flops: dict[str, float] = {}
    if worker is not None:
        for actor in ACTORS:
            worker.request("build", key=actor, actor=actor, hidden=config["net_arch"], num_samples=config["num_samples"],
                           batch_size=batch_size, obs_dim=OBS_DIM, action_dim=ACTION_DIM, chunk=CHUNK)
            jobs[f"reference {actor}"] = (lambda n, a=actor: worker.request("update", key=a, n=n), config["n_updates"])
            act_jobs[f"reference {actor}"] = (lambda n, a=actor: worker.request("act", key=a, n=n), 20)
        try:
            reference_flops = {actor: worker.request("flops", key=actor)["flops"] for actor in ACTORS}
        except RuntimeError as error:  # e.g. a checkout whose update is not a jitted function
            print(f"The reference's FLOPs are not available: {error}", flush=True)
    rates = interleaved_rates(jobs, repeats)
    act_rates = interleaved_rates(act_jobs, repeats)  # chunks per second, the same models and the reference in turns
    if worker is not None:
        worker.close()
        reference = {actor: rates[f"reference {actor}"] for actor in ACTORS}
    sac_rate = rates["sac"]
    # The same FLOPs on every path: counted on the eager float32 model (a counting mode would recompile compiled code).
    counted = {actor: update_flops(models[actor, "float32", False, "float32"]) for actor in ACTORS}
    for (actor, precision, compiled, training), model in models.items():
        rate = rates[str((actor, precision, compiled, training))]
        latency = 1000 / act_rates[str((actor, precision, compiled, training))]
        reference_latency = 1000 / act_rates[f"reference {actor}"] if worker is not None else None
        flops, sampling_flops = counted[actor]
        with_onednn = compiled and onednn_pass(model.policy.inductor_options()) is not None
        float32_peak = peak32_onednn if with_onednn else peak32
        sampling_in_bf16 = model.policy.sampling_bf16(batch_size)  # "auto" decides by the networks and the batch
        sampling_peak = peak16 if sampling_in_bf16 else float32_peak
        training_peak = peak16 if training == "bfloat16" else float32_peak
        bound_s = (flops - sampling_flops) / (training_peak * 1e9) + sampling_flops / (sampling_peak * 1e9)
        here = reference.get(actor)  # the reference measured on this machine (--reference or --reference-src), if given
        if worker is not None:  # the reference and SAC timed in the same interleaved blocks
            ref_ratio = f"{here / sac_rate:.2f}"
        elif name in REFERENCE:
            ref_ratio = f"{REFERENCE[name][actor == 'distill'] / REFERENCE_SAC_SMALL:.2f}"
        else:
            ref_ratio = "-"
        floor_key = (actor, precision, training, with_onednn)
        floor_rate = rates[f"floor {floor_key}"]  # matmul-only updates per second
        label = "fp32" if precision == "float32" else ("auto: bf16" if sampling_in_bf16 else "auto: fp32")
        label += " + compile" if compiled else ""
        label += " + bf16 training" if training == "bfloat16" else ""
        lines.append(
            f"| {name} | {actor} | {label} | {rate:.2f} | {sac_rate:.1f} | {rate / sac_rate:.2f} | {ref_ratio} | "
            f"{f'{rate / here:.2f}' if here else '-'} | "
            f"{latency:.2f} | {f'{reference_latency:.2f}' if reference_latency else '-'} | {startup[actor, precision, compiled, training]:.1f} | {flops / 1e9:.2f} | "
            f"{f'{reference_flops[actor] / 1e9:.2f}' if actor in reference_flops else '-'} | {flops * rate / 1e9:.0f} | "
            f"{bound_s * rate:.2f} | {1000 / floor_rate:.2f} | {f'{floor_rate / here:.2f}' if here else '-'} |"
        )
        print(lines[-1], flush=True)
        if precision == "auto":
            goals += goal_lines(name, actor, label, rate, sac_rate, latency, here, reference_latency, floor_rate)
    return lines, goals


def goal_lines(
    config: str,
    actor: str,
    label: str,
    rate: float,
    sac_rate: float,
    latency: float,
    reference: float | None = None,
    reference_latency: float | None = None,
    floor_rate: float | None = None,
) -> list[str]:
    """
    The speed goals for the fast path, checked against what was measured: against SAC, and with ``reference`` (the
    reference's updates/s on this machine) "x the reference" for both actors (1.5x small, 2x paper); with
    ``reference_latency`` (its act ms, measured in the same run) a chunk choice no slower than the reference's.
    ``floor_rate``: the path's matmul floor in updates/s (:class:`MatmulFloor`): an unmet reference goal says what
    ratio the floor allows.
    """
    checks = []  # (what, measured, goal, higher is better)
    if config == "small":
        checks.append(("QC / SAC", rate / sac_rate, 0.5 if actor == "best_of_n" else 1.4, True))
    if config == "paper" and actor == "best_of_n":
        checks.append(("updates/s", rate, 3.0, True))
    if reference and config in REFERENCE_GOALS:
        checks.append(("QC / reference (this machine)", rate / reference, REFERENCE_GOALS[config], True))
    if config in ("small", "paper") and actor == "best_of_n":
        checks.append(("predict ms/chunk", latency, 2.0 if config == "small" else 5.0, False))
    if reference_latency is not None:
        checks.append(("predict ms/chunk against the reference's act ms (paired)", latency, round(reference_latency, 3), False))
    out = []
    for what, value, goal, higher in checks:
        met = value >= goal if higher else value <= goal
        line = f"- {config} {actor} ({label}): {what} {value:.3f} (goal {'>=' if higher else '<='} {goal}): {'met' if met else 'NOT met'}"
        if not met and what.startswith("QC / reference") and floor_rate and reference:
            at_floor = floor_rate / reference
            line += f"; its matmuls alone allow at most {at_floor:.2f}" + (" (the goal is beyond this path's matmul floor)" if at_floor < goal else "")
        out.append(line)
    return out


# (oneDNN's linear: the calls of `OneDNNMatmuls` and of the fused Linear+GELU, whose GELU it counts as matmul time)
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "mkldnn::_linear_pointwise"}


def profile_updates(
    config: dict[str, Any],
    batch_size: int,
    device: str,
    n_updates: int = 10,
    rows: int = 12,
    actors: tuple[str, ...] = ACTORS,
) -> list[str]:
    """Section 5: where an update's time goes (torch.profiler, self time per op), fp32 and fast path, per actor."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for actor in actors:
        for precision, compiled in (("float32", False), ("auto", False), ("auto", True)):
            settings = {}
            if compiled and th.device(device).type == "cpu":
                # Name each generated kernel in the profile (with cpp_wrapper a compiled graph is one opaque entry, and
                # the two options do not work together in torch 2.13): the profiled path is the shipped one without
                # cpp_wrapper.
                settings["compile_options"] = {**compile_options(th.device(device)), "cpp_wrapper": False, "cpp.enable_kernel_profile": True}
            model = make_qc(actor, config["net_arch"], config["num_samples"], batch_size, precision, device, compiled, **settings)
            model.train(2, batch_size)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.train(n_updates, batch_size)
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / n_updates
            top = ", ".join(f"{e.key} {e.self_cpu_time_total / 1000 / n_updates:.2f}" for e in events[:rows])
            matmul_ms = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1000 / n_updates
            kernel_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("graph_")) / 1000 / n_updates
            lines.append(f"- {actor}, sampling {precision}{' + compile' if compiled else ''}: {total_ms:.1f} ms of CPU self time per update (profiled): "
                         f"matmuls {matmul_ms:.1f}, inductor-generated kernels {kernel_ms:.1f}, everything else {total_ms - matmul_ms - kernel_ms:.1f}; "
                         f"top ops, ms per update: {top}")
            print(lines[-1], flush=True)
    return lines


def steps_per_second(env: gym.Env, actions: np.ndarray, chunk: int) -> float:
    """Primitive steps per second of ``env`` fed ``actions`` (pre-drawn, so the loops differ only in the wrapper)."""
    env.reset(seed=0)
    done_steps = 0
    start = time.perf_counter()
    while done_steps < len(actions) - chunk:
        action = actions[done_steps] if chunk == 1 else actions[done_steps : done_steps + chunk]
        _, _, terminated, truncated, info = env.step(action)
        done_steps += info["chunk_steps"] if chunk > 1 else 1
        if terminated or truncated:
            env.reset()
    return done_steps / (time.perf_counter() - start)


def bench_wrapper(env_ids: list[str], n_steps: int, repeats: int) -> list[str]:
    """Section 3: primitive steps/s of the raw env and of the chunk-wrapped env (h=5)."""
    import ogbench  # noqa: F401  (registers the OGBench envs)

    lines = [
        "| env | raw env steps/s | wrapped (h=5) primitive steps/s | wrapped / raw time per step |",
        "|---|---|---|---|",
    ]
    for env_id in env_ids:
        raw = gym.make(env_id)
        wrapped = ChunkedActionWrapper(gym.make(env_id), chunk_size=CHUNK)
        space = raw.action_space
        actions = np.random.default_rng(0).uniform(space.low, space.high, (n_steps + CHUNK, *space.shape)).astype(space.dtype)
        rates = interleaved_rates(
            {
                "raw": (lambda n, e=raw: steps_per_second(e, actions[:n], 1), n_steps),
                "wrapped": (lambda n, e=wrapped: steps_per_second(e, actions[:n], CHUNK), n_steps),
            },
            repeats,
        )
        lines.append(f"| {env_id} | {rates['raw']:.0f} | {rates['wrapped']:.0f} | {rates['raw'] / rates['wrapped']:.3f} |")
        print(lines[-1], flush=True)
    return lines


def bench_dataset(source: Path, source_size: int, n_transitions: int) -> list[str]:
    """
    Section 4: time to load ``n_transitions`` OGBench transitions into QC's replay buffer, and the memory they
    take. The file is ``source`` (generated with ``source_size`` transitions if missing) repeated end to end.
    """
    from sb3_qchunk.datasets import cached_play_dataset

    env_id = "cube-single-singletask-task1-v0"
    with np.load(cached_play_dataset(source, "cube-single", source_size, seed=0, progress_bar=False)) as file:
        raw = {key: file[key] for key in file.files}
    # An episode of T + 1 rows gives T transitions.
    copies = -(-n_transitions // (len(raw["terminals"]) - int(raw["terminals"].sum())))
    tiled = {key: np.concatenate([value] * copies) for key, value in raw.items()}
    raw_bytes = sum(value.nbytes for value in tiled.values())
    used_bytes = sum(tiled[key].nbytes for key in ("observations", "actions", "terminals"))
    model = QC("MlpPolicy", gym.make(env_id), buffer_size=1_000, policy_kwargs=dict(net_arch=[16, 16]), learning_starts=0)
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        path = Path(tmp) / "tiled.npz"
        np.savez(path, **tiled)
        del tiled
        start = time.perf_counter()
        model.load_dataset(str(path), env=env_id)
        load_s = time.perf_counter() - start
        model.replay_buffer.offline = None
        tracemalloc.start()  # numpy reports its allocations to tracemalloc: the peak of the second load
        model.load_dataset(str(path), env=env_id)
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    offline = model.replay_buffer.offline
    assert offline is not None
    buffer_bytes = sum(v.nbytes for value in offline.values() for v in (value.values() if isinstance(value, dict) else [value]))
    start = time.perf_counter()
    for _ in range(100):
        model.replay_buffer.sample(256)
    sample_ms = 1000 * (time.perf_counter() - start) / 100
    mib = 2**20
    lines = [
        f"Source: {copies} copies of `{source}` (OGBench cube-single play data generated with the official recipe) "
        f"saved as one npz, loaded with `QC.load_dataset(path, env='{env_id}')`: read, build next observations, "
        "relabel rewards for task 1 with `ogbench.relabel_utils`, validate, store. Raw arrays: all keys of the file "
        "(with `qpos`, `qvel`) / those the buffer uses (`observations`, `actions`, `terminals`). The buffer keeps "
        "next observations as their own array (so windows never look across an episode end).",
        "",
        "| transitions | load time s | buffer MiB | raw arrays MiB (all / used) | buffer / used | peak allocation during load MiB | sample(256) ms |",
        "|---|---|---|---|---|---|---|",
        f"| {model.replay_buffer.offline_size} | {load_s:.2f} | {buffer_bytes / mib:.0f} | {raw_bytes / mib:.0f} / "
        f"{used_bytes / mib:.0f} | {buffer_bytes / used_bytes:.2f} | {peak_bytes / mib:.0f} | {sample_ms:.2f} |",
    ]
    print("\n".join(lines[-3:]), flush=True)
    return lines


# glibc's malloc settings that keep freed memory in the process: blocks up to 32 MiB (its largest mmap threshold) come
# from the heap, and the heap is trimmed only when 1 GiB lies free at its top. Setting both matters: setting either one
# switches off glibc's dynamic adjustment of the other, which then stays at its 128 KiB default.
RETAINED_MMAP_THRESHOLD, RETAINED_TRIM_THRESHOLD = 32 * 2**20, 2**30
RETAIN_FREED_TUNABLES = f"glibc.malloc.mmap_threshold={RETAINED_MMAP_THRESHOLD}:glibc.malloc.trim_threshold={RETAINED_TRIM_THRESHOLD}"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (<malloc.h>)
RETAINED_MEMORY_NOTE = (
    "Memory: freed memory kept in the benchmark's processes and the reference's worker where one runs (glibc's malloc "
    f"set as `GLIBC_TUNABLES={RETAIN_FREED_TUNABLES}`), the state of a training run with a dataset loaded: no page "
    "faulted in afresh per update (`allocator.py` measures the difference)."
)


def retain_freed_memory() -> bool:
    """
    Set this process's glibc malloc as :data:`RETAIN_FREED_TUNABLES` (``mallopt``), so that the memory an update frees
    stays in the process for the next one. A benchmark then measures every update in the heap state of a training run
    with a dataset loaded, which faults no fresh pages in per update; with glibc's defaults, whether a benchmark process
    faults thousands of them per update (compiled QC-FQL small: a fifth of its time) depends on what it happened to
    allocate and free before. The reference's worker (:class:`ReferenceProcess`) gets the same settings.

    :return: whether both were set: False where the C library is not glibc, and where ``GLIBC_TUNABLES`` is set (the
        user's own malloc settings, which the report's machine line names, are left as they are)
    """
    if os.environ.get("GLIBC_TUNABLES"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, RETAINED_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD) == 1


def use_cores(n_cores: int) -> None:
    """
    Run this process on the first ``n_cores`` of the cores it may use (CPU affinity), with as many torch threads. The
    processes it starts afterwards inherit the affinity: the reference's worker (XLA sizes its thread pool by the cores
    a process may use) and the fresh processes of the start-up times. Paired rates then compare both codes as a
    training run that has one core of its own (e.g. one run per core) has them.

    :param n_cores: between 1 and the number of cores this process may use
    """
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cores needs CPU affinity (os.sched_setaffinity), which this platform does not have")
    usable = sorted(os.sched_getaffinity(0))
    if not 1 <= n_cores <= len(usable):
        raise ValueError(f"--cores must be between 1 and the {len(usable)} cores this process may use, got {n_cores}")
    os.sched_setaffinity(0, usable[:n_cores])
    th.set_num_threads(n_cores)


# Environment variables that change the rates, named in every report where set: malloc's settings (allocator.py), and
# the instruction-set limits of ATen's kernels and inductor's code (ATEN_CPU_CAPABILITY), oneDNN, MKL and the
# reference's XLA, with which a run on one CPU takes the code paths of an older one (e.g. AVX2 only).
MACHINE_SETTINGS = (
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "XLA_FLAGS",
)


def machine_line(device: str, threads: int | None = None) -> str:
    """The CPU (model name, family and model, the instruction sets precisions depend on, ATen's vector width), cores
    (and how many of them this process may use where that is fewer), torch and its threads (``threads``, or this
    process's), device and the settings of :data:`MACHINE_SETTINGS` set."""
    cpu = platform.processor() or platform.machine()
    facts: list[str] = []
    try:
        with open("/proc/cpuinfo") as file:
            fields: dict[str, str] = {}
            for line in file.read().splitlines():
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields and "model" in fields:  # tells generations apart where a hypervisor masks the name
            facts.append(f"family {fields['cpu family']} model {fields['model']}")
        flags = set(fields.get("flags", "").split())
        if flags:
            shown = [flag for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if flag in flags]
            facts.append(f"flags: {' '.join(shown) or 'none of avx2/avx512/amx'}")
    except OSError:
        pass
    if device == "cpu":  # the vector width of ATen's kernels, which decides the fused Linear+GELU
        facts.append(f"ATen {th.backends.cpu.get_cpu_capability()}")
    if facts:
        cpu += f" ({'; '.join(facts)})"
    if device.startswith("cuda") and th.cuda.is_available():
        cpu += f"; GPU {th.cuda.get_device_name()}"
    settings = [f"{name}={os.environ[name]}" for name in MACHINE_SETTINGS if os.environ.get(name)]
    settings_text = f", {' '.join(settings)}" if settings else ""
    total = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    cores = f"{total} cores" + (f" ({usable} used by this run: CPU affinity)" if usable < total else "")
    return f"{cpu}, {cores}, torch {th.__version__} ({threads or th.get_num_threads()} threads), device {device}{settings_text}"


def report_header(title: str, device: str, retained_memory: bool = False) -> list[str]:
    """The first lines of a benchmark report: title, the command that made it, date and machine; with
    ``retained_memory`` (:func:`retain_freed_memory` in effect) the malloc settings of the run."""
    return [
        f"# {title}",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine_line(device)}.",
        *([RETAINED_MEMORY_NOTE] if retained_memory else []),
    ]


def write_report(lines: list[str], out: str | None) -> None:
    """Print a markdown report and, with ``out``, write it to that file."""
    text = "\n".join(lines)
    print()
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configs, a few updates (for the tests)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    sections = ["updates", "profile", "wrapper", "dataset", "matmul"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=sections)
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per measurement (the median is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset-source", type=Path, default=None, help="OGBench npz repeated for section 4 "
                        "(default: data/cube-single-play-100000-seed0.npz, generated if missing)")
    parser.add_argument("--dataset-transitions", type=int, default=1_000_000)
    parser.add_argument("--reference", type=Path, default=None, help="JSON of the reference's updates/s measured on "
                        "this machine (see benchmarks/results/reference_amd_epyc.json): adds QC / reference")
    parser.add_argument("--reference-src", type=Path, default=None, help="a checkout of the authors' code (github "
                        "ColinQiyangLi/qc): measure it in the same interleaved blocks (needs --reference-python; see benchmarks/reference.py)")
    parser.add_argument("--reference-python", type=str, default=None, help="the Python of a venv with the reference's "
                        "requirements (jax, flax, optax, ...)")
    parser.add_argument("--cores", type=int, default=None, help="run on this many of the machine's cores (CPU affinity), "
                        "with as many torch threads; the reference's worker too (default: all, torch's default threads)")
    parser.add_argument("--out", type=str, default=None, help="write the markdown report to this file")
    args = parser.parse_args()
    if (args.reference_src is None) != (args.reference_python is None):
        parser.error("--reference-src and --reference-python go together")
    if args.cores is not None:
        try:
            use_cores(args.cores)
        except ValueError as error:
            parser.error(str(error))
    paired = (args.reference_python, args.reference_src) if args.reference_src is not None else None
    reference = load_reference(args.reference) if args.reference else None

    batch_size, configs, wrapper_steps, source_size = 256, {name: CONFIGS[name] for name in args.configs}, 5_000, 100_000
    if args.smoke:
        batch_size, configs, wrapper_steps, args.repeats = 8, SMOKE_CONFIG, 50, 2
        source_size, args.dataset_transitions = 1_000, min(args.dataset_transitions, 3_000)
    if args.dataset_source is None:
        data_dir = Path(args.out).parent / "data" if args.smoke and args.out else Path("data")
        args.dataset_source = data_dir / f"cube-single-play-{source_size}-seed0.npz"

    retained = retain_freed_memory()
    report = [*report_header("Throughput", args.device, retained), ""]
    goals: list[str] = []
    # The dense layers first, in a process that has not yet built and trained the other sections' models: measured
    # after them in one run (AMD EPYC Zen 5), every library's layer ran 1.3-3.5x slower than in a process of its own.
    shapes = [(8, 16, 16), (16, 16, 16)] if args.smoke else MATMUL_SHAPES
    matmul_lines = bench_matmuls(args.device, args.repeats, paired, shapes) if "matmul" in args.sections else []
    if "updates" in args.sections:
        lines, goals = bench_updates(configs, batch_size, args.repeats, args.device, with_compile=not args.smoke, reference=reference, paired=paired)
        report += [
            f"## Gradient updates per second (batch {batch_size}, h={CHUNK}, obs {OBS_DIM}, action {ACTION_DIM}, "
            f"flow_steps 10, 2 critics; median of {args.repeats} interleaved blocks)",
            "",
            *lines,
            "",
            "`reference / SAC`: the authors' JAX code over SB3 SAC, "
            + (
                "both timed in this run's interleaved blocks. "
                if paired
                else f"as recorded once on a 2-core CPU ({REFERENCE['small'][0]:.0f} and {REFERENCE['small'][1]:.0f} updates/s "
                f"against SAC's {REFERENCE_SAC_SMALL:.0f}, small config only). "
            )
            + "`QC / reference`: over the reference's rate measured on this "
            f"machine ({'measured in the same interleaved blocks: `--reference-src`' if paired else (f'`{args.reference}`' if reference else 'not given: `--reference` or `--reference-src`')}); "
            "`reference act ms`: its `sample_actions` on one observation, in turns with our `predict` (paired runs only). "
            "`GFLOP/update`: ours, by `torch.utils.flop_counter` (matmuls); `reference GFLOP/update`: XLA's cost analysis of "
            "the reference's jitted update (paired runs only; it counts elementwise work too). `fraction of bound`: time one update would take at the "
            "measured matmul throughput (the gradient path's precision for its FLOPs, the sampling path's for its own) "
            "over the time it took. `matmul floor ms`: the update's own matmuls (shapes, layouts and precisions recorded "
            "in one eager update of the row's actor and precisions) replayed alone on random data, each one several times "
            "in a row with its inputs in cache, in the same interleaved blocks (for compiled rows whose compile options "
            "run large float32 matmuls by oneDNN, `OneDNNMatmuls`, those replayed by oneDNN): a lower bound of the update's time if "
            "everything else were free. `QC / reference at the floor`: the "
            "reference's time per update over that floor, the highest ratio the path can reach with these matmuls.",
            "",
        ]
        if goals:
            report += ["Speed goals (fast path):", "", *goals, ""]
    if "profile" in args.sections:
        name, config = next(iter(configs.items()))
        # The smoke run profiles one actor: the section's code is the same for both, and each compiled row costs a
        # cold compilation.
        profiled = profile_updates(config, batch_size, args.device, actors=("distill",) if args.smoke else ACTORS)
        report += [f"## Where an update's time goes ({name} config, torch.profiler)", "", *profiled, ""]
    if "wrapper" in args.sections:
        envs = ["Pendulum-v1"] if args.smoke else ["cube-single-singletask-task1-v0", "Pendulum-v1"]
        report += ["## Chunk-wrapper overhead (random actions, primitive steps per second)", "", *bench_wrapper(envs, wrapper_steps, args.repeats), ""]
    if "dataset" in args.sections:
        dataset_lines = bench_dataset(args.dataset_source, source_size, args.dataset_transitions)
        report += ["## Offline dataset: load time and replay-buffer memory", "", *dataset_lines, ""]
    if "matmul" in args.sections:
        report += [
            "## One dense layer at the update's shapes, GFLOP/s (the libraries in turns; measured first)",
            "",
            *matmul_lines,
            "",
            "Rows: 256 is the gradient path (batch 256), 2048 and 8192 the sampling path (256 observations x N "
            "candidates); 256 and 512 wide: small and paper config. Median of interleaved blocks of ~2 GFLOP each.",
            "",
        ]
    write_report(report, args.out)


if __name__ == "__main__":
    main()

"""Numeric precision and compilation settings shared by the chunked algorithms: where bf16 pays, how to compile."""

import contextlib
import functools
import os
import platform
import re
from collections.abc import Iterator
from typing import Any

import torch as th

SAMPLING_PRECISIONS = ("auto", "float32", "bfloat16")
TRAINING_PRECISIONS = ("float32", "bfloat16")
# "auto" samples in bf16 where one call of the networks' widest layer has at least AUTO_BF16_MIN_MACS multiply-adds
# (rows x width x width; rows = observations x candidates) and the layer is AUTO_BF16_WIDE wide or more, or at least
# AUTO_BF16_MIN_MACS_NARROW multiply-adds however wide. Below, the casts cost more than the matmuls save: best-of-8 for
# one observation over 256x256 (2^19) took 2.1x the time in bf16 (eager 1.9x) on a 2-core AMD EPYC Zen 5, and QC-FQL's
# distillation target over 256x256 for a batch of 256 (2^24) ran 1.03-1.13x the updates/s in float32 on a 2-core Xeon
# with AMX (even on the AMD CPUs); acting with best-of-32 over 4x512 (32 x 512 x 512 = 2^23) took 0.68x the time in bf16
# (compiled; eager 0.73x) on the Zen 5, and best-of-8's critic target over 256x256 for a batch of 256 (2^27) ran
# 1.4-1.6x the updates/s in bf16 on the Xeon with AMX.
AUTO_BF16_MIN_MACS = 2**23
AUTO_BF16_WIDE = 512
AUTO_BF16_MIN_MACS_NARROW = 2**25
# Below this many rows per layer, eager float32 sampling on a CPU runs with oneDNN off: torch's CPU GELU goes through
# a oneDNN primitive whose set-up dominates small tensors (measured on a 2-core AMD EPYC Zen 4, torch 2.13: an
# (8, 256) GELU 21-73 us with oneDNN against 4 us without; (256, 256) about even; (2048, 256) oneDNN faster), and
# float32 matmuls do not use oneDNN.
ONEDNN_MIN_ROWS = 256


# oneDNN's x86 instruction sets in rising order, by the names its ONEDNN_MAX_CPU_ISA environment variable takes (older
# names of the same sets in ONEDNN_ISA_ALIASES). torch's CPU bf16 matmuls run on oneDNN, which uses no instruction
# set above that limit.
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
)
ONEDNN_ISA_ALIASES = {
    "AVX512_CORE_FP16": "AVX10_1_512",
    "AVX512_CORE_AMX": "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16",
}


def onednn_allows(isa: str) -> bool:
    """
    Whether oneDNN may use the instruction set ``isa`` (a name of :data:`ONEDNN_ISAS`) under the limit set by the
    ``ONEDNN_MAX_CPU_ISA`` environment variable (or its older name ``DNNL_MAX_CPU_ISA``), which oneDNN reads once, at
    its first use in the process. No limit where neither is set, or set to ``DEFAULT``, ``ALL`` or a name oneDNN knows
    and this list does not (a newer instruction set).

    :param isa: the instruction set, e.g. ``"AVX512_CORE_BF16"``
    """
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if limit is None:
        return True
    limit = limit.strip().upper()
    limit = ONEDNN_ISA_ALIASES.get(limit, limit)
    if limit not in ONEDNN_ISAS:
        return True
    return ONEDNN_ISAS.index(ONEDNN_ISA_ALIASES.get(isa, isa)) <= ONEDNN_ISAS.index(limit)


@functools.cache
def has_native_bf16(device_type: str) -> bool:
    """
    Whether this kind of device has bfloat16 matmul instructions (not emulated): CUDA GPUs with bf16 support
    (Ampere and later; ROCm GPUs), CPUs with AVX512-BF16 or AMX where oneDNN may use them (:func:`onednn_allows`;
    with ``ONEDNN_MAX_CPU_ISA=AVX2`` bf16 is emulated on any CPU). Native is not always faster than float32: see
    :func:`has_fast_bf16`.

    :param device_type: ``"cpu"``, ``"cuda"``, ...
    """
    if device_type == "cuda":  # not counting emulation (torch's default counts it: GPUs before Ampere, e.g. a T4)
        return th.cuda.is_available() and th.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":  # private probes of torch.cpu (torch >= 2.3); absent ones count as "no"
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(th.cpu, probe, lambda: False)() for probe in probes) and onednn_allows("AVX512_CORE_BF16")
    return False


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in Linux's /proc/cpuinfo, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str:
    """The CPU's vendor string (``"GenuineIntel"``, ``"AuthenticAMD"``, ...), or ``""`` where it cannot be read."""
    vendor = _cpuinfo("vendor_id")
    if vendor is not None:
        return vendor
    processor = platform.processor()  # e.g. "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD" on Windows
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        if vendor in processor:
            return vendor
    return ""


def cpu_family() -> int | None:
    """The CPU's family number (x86: 6 for Intel's cores, 25 for AMD Zen 3 and Zen 4, 26 for Zen 5), or None."""
    family = _cpuinfo("cpu family")
    if family is not None and family.isdigit():
        return int(family)
    match = re.search(r"Family (\d+)", platform.processor())  # e.g. "AMD64 Family 26 Model 2 Stepping 0, AuthenticAMD"
    return int(match.group(1)) if match else None


@functools.cache
def prefers_onednn_float32_matmuls() -> bool:
    """
    Whether compiled code on this CPU runs its large float32 matmuls by oneDNN instead of ATen's (MKL's)
    (:class:`sb3_qchunk.common.compile_passes.OneDNNMatmuls`, in :func:`compile_options`): on AMD CPUs from Zen 5
    (family 26) whose ATen kernels run AVX-512. MKL runs its AVX2 kernels on AMD CPUs; Zen 5 executes AVX-512 at full
    width, and oneDNN's AVX-512 float32 matmul ran twice MKL's rate there (2-core AMD EPYC Zen 5, torch 2.13: a
    256 x 512 x 512 matmul 480 GFLOP/s against 205). On Zen 4, which splits AVX-512 into two halves, oneDNN's layer
    alone ran 1.1-1.4x MKL's, but the compiled update lost by it (QC-FQL small 0.91x the updates/s, paired; the paper
    config within the noise); Intel CPUs run MKL's AVX-512 kernels. Not where ``ONEDNN_MAX_CPU_ISA`` keeps oneDNN
    below AVX-512 (:func:`onednn_allows`).
    """
    avx512 = th.backends.cpu.get_cpu_capability() == "AVX512" and onednn_allows("AVX512_CORE")
    if cpu_vendor() != "AuthenticAMD" or not avx512:
        return False
    family = cpu_family()
    return family is not None and family >= 26 and th.backends.mkldnn.is_available()


def has_usable_amx() -> bool:
    """Whether this CPU has AMX tiles and oneDNN may use them (not kept below AMX by ``ONEDNN_MAX_CPU_ISA``)."""
    return getattr(th.cpu, "_is_amx_tile_supported", lambda: False)() and onednn_allows("AVX10_1_512_AMX")


@functools.cache
def has_fast_bf16(device_type: str) -> bool:
    """
    Whether bfloat16 matmuls are faster than float32 on this kind of device, which decides
    ``sampling_precision="auto"``: CUDA GPUs with bf16 support; CPUs with AMX; AMD CPUs with AVX512-BF16
    (Zen 4 and later run bf16 dot products at twice the float32 FMA rate). Intel CPUs with AVX512-BF16 but no
    AMX (older Xeons, AMX hidden by a hypervisor, or kept from oneDNN by ``ONEDNN_MAX_CPU_ISA``) run bf16 dot products
    at the float32 FMA rate, so the casts make bf16 slower there (measured on such a Xeon, one thread: a 2048x256 @
    256x256 matmul 70 GFLOP/s in bf16 against 122 in float32): float32. Elsewhere bf16 is emulated: float32.

    :param device_type: ``"cpu"``, ``"cuda"``, ...
    """
    if not has_native_bf16(device_type):
        return False
    if device_type == "cpu":
        return has_usable_amx() or cpu_vendor() == "AuthenticAMD"
    return True


def bf16_autocast(device_type: str, enabled: bool) -> contextlib.AbstractContextManager:
    """
    :param device_type: the device the code runs on
    :param enabled: bfloat16 autocast if True, else a disabled autocast (float32 stays float32); where autocast is
        off already, a context that does nothing (entering and leaving ``torch.autocast`` costs tens of microseconds,
        a few percent of choosing a chunk)
    """
    if not enabled and not th.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return th.autocast(device_type, dtype=th.bfloat16, enabled=enabled)


def autocast_matmul_dtype(device_type: str) -> th.dtype | None:
    """The precision autocast runs matmuls in on ``device_type`` at this point of the code, or None where it is off."""
    return th.get_autocast_dtype(device_type) if th.is_autocast_enabled(device_type) else None


@contextlib.contextmanager
def onednn_disabled(disable: bool = True) -> Iterator[None]:
    """
    Turn torch's oneDNN (mkldnn) backend off inside the block (for the whole process, as torch's flag is global), and
    back to what it was after; nothing with ``disable=False``. The other flags of ``torch.backends.mkldnn`` are left
    as they are.

    :param disable: whether to turn oneDNN off
    """
    if not disable:
        yield
        return
    previous = th.backends.mkldnn.set_flags(_enabled=False, _fp32_precision=None)[0]
    try:
        yield
    finally:
        th.backends.mkldnn.set_flags(_enabled=previous, _fp32_precision=None)


def inductor_cpu_simdlen() -> int:
    """
    The vector width in bits (512, 256; 0: none) of the CPU code inductor generates in this process: the widest its
    CPU has, or the one ``ATEN_CPU_CAPABILITY`` names. Compiled code states it as ``cpp.simdlen``
    (:meth:`sb3_qchunk.qc.policies.QCPolicy.inductor_options`), because inductor's settings are part of the key of its
    on-disk cache of compiled graphs and nothing else there tells instruction sets apart: without it, code generated
    for one width (AVX-512's 16 floats) was loaded where inductor compiles its kernels for another (AVX2's 8, under
    ``ATEN_CPU_CAPABILITY=avx2`` or on another CPU sharing the cache directory), with wrong results or writes out of
    bounds (torch 2.13).
    """
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return pick_vec_isa().bit_width()


def compile_options(device: th.device, onednn_matmuls: bool | None = None) -> dict[str, Any]:
    """
    The default inductor options of QC's compiled code (``compile_update``, ``compile_sampling``). On CPU:
    ``realize_cpu_opcount_threshold=4`` stores a pointwise result that several kernels read instead of recomputing
    it in each (inductor's CPU default, 50, recomputes e.g. the erf-GELU that a LayerNorm reads three times: mean,
    variance, normalisation), and ``cpp_wrapper`` calls a compiled graph's kernels from C++ instead of Python. On a
    2-core CPU (small config) they gave QC-FQL +11% (2 threads) and +13% (1 thread) over inductor's defaults, and
    best-of-N +9% on 1 thread, -4% to 0% on 2. ``post_grad_custom_post_pass``:
    :class:`sb3_qchunk.common.compile_passes.UnfuseBiasAdd` adds a dense layer's bias in its activation's kernel
    instead of inside the matmul (on a 2-core Intel Xeon, small config: acting 8% faster for best-of-N and 5% for
    QC-FQL, best-of-N's updates 2-3% faster, QC-FQL's within the noise); then, with ``onednn_matmuls``,
    :class:`sb3_qchunk.common.compile_passes.OneDNNMatmuls` runs the large float32 matmuls by oneDNN. Elsewhere,
    inductor's defaults.

    :param device: the device the compiled code runs on
    :param onednn_matmuls: large float32 matmuls by oneDNN (CPU only); None: where
        :func:`prefers_onednn_float32_matmuls` (on a 2-core AMD EPYC Zen 5, paper config: QC-FQL's updates 1.3-1.5x as
        fast)
    """
    if device.type != "cpu":
        return {}
    from torch._inductor import config as inductor_config

    options: dict[str, Any] = {"cpp_wrapper": True}
    if hasattr(inductor_config, "realize_cpu_opcount_threshold"):  # not in every torch version: then the default
        options["realize_cpu_opcount_threshold"] = 4
    try:  # inductor's custom passes are not in every torch version: then without
        from sb3_qchunk.common.compile_passes import ChainedPasses, OneDNNMatmuls, UnfuseBiasAdd
    except ImportError:
        return options
    if onednn_matmuls is None:
        onednn_matmuls = prefers_onednn_float32_matmuls()
    if onednn_matmuls and not th.backends.mkldnn.is_available():
        raise ValueError("onednn_matmuls=True needs torch built with oneDNN (torch.backends.mkldnn.is_available())")
    graph_pass = ChainedPasses(UnfuseBiasAdd(), OneDNNMatmuls()) if onednn_matmuls else UnfuseBiasAdd()
    options["post_grad_custom_post_pass"] = graph_pass
    return options

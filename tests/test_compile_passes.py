import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from sb3_qchunk.common import precision
from sb3_qchunk.common.compile_passes import ChainedPasses, OneDNNMatmuls, UnfuseBiasAdd
from sb3_qchunk.common.precision import compile_options

aten = th.ops.aten


def targets(graph):
    return [node.target for node in graph.nodes if node.op == "call_function"]


def test_unfuse_bias_add_splits_only_addmms_read_by_pointwise_ops():
    """An addmm that a GELU reads (through a view) becomes mm + add; one that a LayerNorm or the output reads stays."""

    def layers(x, w1, b1, w2, b2, w3, b3):
        hidden = th.nn.functional.gelu(th.addmm(b1, x, w1).view(4, 16))  # pointwise, through a view
        normed = th.nn.functional.layer_norm(th.addmm(b2, hidden, w2), (16,))  # not pointwise
        return normed, th.addmm(b3, normed, w3)  # the graph's output

    args = (th.randn(4, 8), th.randn(8, 16), th.randn(16), th.randn(16, 16), th.randn(16), th.randn(16, 3), th.randn(3))
    graph_module = make_fx(layers, tracing_mode="fake")(*args)
    assert targets(graph_module.graph).count(aten.addmm.default) == 3
    UnfuseBiasAdd()(graph_module.graph)
    graph_module.recompile()
    assert targets(graph_module.graph).count(aten.addmm.default) == 2
    assert aten.mm.default in targets(graph_module.graph)
    for got, want in zip(graph_module(*args), layers(*args)):
        th.testing.assert_close(got, want)


@pytest.mark.parametrize("grad", [False, True])
def test_compiled_layers_with_the_pass_agree_with_eager(grad):
    """The shipped CPU compile options (the pass included) give the eager MLP's outputs and gradients."""
    options = compile_options(th.device("cpu"))
    graph_pass = options["post_grad_custom_post_pass"]
    assert isinstance(graph_pass, ChainedPasses if precision.prefers_onednn_float32_matmuls() else UnfuseBiasAdd)
    assert compile_options(th.device("cpu")) == options  # equal options: models share one backend's compiled code
    th.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    x = th.randn(64, 12)
    compiled = th.compile(net, options=options)
    with th.set_grad_enabled(grad):
        got, want = compiled(x), net(x)
    th.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if grad:
        got_grads = th.autograd.grad(got.square().sum(), list(net.parameters()))
        want_grads = th.autograd.grad(want.square().sum(), list(net.parameters()))
        for g, w in zip(got_grads, want_grads):
            th.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


needs_onednn = pytest.mark.skipif(not th.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
def test_onednn_matmuls_rewrites_the_large_float32_matmuls_only():
    """Large float32 mm, addmm (1-d bias) and bmm become oneDNN linears (one per bmm member); a thin matmul, a bf16 one
    and an addmm with a 2-d bias stay ATen's; the graph computes the same values."""

    def layers(x, w, b, e, thin, xb, wb, b2):
        hidden = th.mm(x, w)  # 128 x 160 x 144
        biased = th.addmm(b, x, w)
        members = th.bmm(hidden.expand(2, -1, -1), e)  # 2 x (128 x 144 x 136)
        narrow = th.mm(hidden, thin)  # 144 -> 5: stays
        low = th.mm(xb, wb)  # bf16: stays
        full_bias = th.addmm(b2, x, w)  # (128, 144) bias: stays
        return hidden, biased, members, narrow, low, full_bias

    x, w, b, e = th.randn(128, 160), th.randn(160, 144), th.randn(144), th.randn(2, 144, 136)
    args = (x, w, b, e, th.randn(144, 5), x.bfloat16(), w.bfloat16(), th.randn(128, 144))
    graph_module = make_fx(layers, tracing_mode="fake")(*args)
    OneDNNMatmuls()(graph_module.graph)
    graph_module.recompile()
    found = targets(graph_module.graph)
    assert found.count(th.ops.sb3_qchunk.onednn_linear.default) == 4
    assert found.count(aten.mm.default) == 2 and found.count(aten.addmm.default) == 1 and aten.bmm.default not in found
    for got, want in zip(graph_module(*args), layers(*args)):
        th.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 if got.dtype == th.bfloat16 else 1e-4)


def test_onednn_matmuls_setting_and_rule(monkeypatch):
    """``onednn_matmuls`` chains the oneDNN pass after UnfuseBiasAdd; by default only AMD CPUs from Zen 5 (family 26)
    whose ATen kernels run AVX-512 get it; options compare equal (one compiled backend for equal settings)."""
    if th.backends.mkldnn.is_available():
        options = compile_options(th.device("cpu"), onednn_matmuls=True)
        assert options["post_grad_custom_post_pass"] == ChainedPasses(UnfuseBiasAdd(), OneDNNMatmuls())
        assert options == compile_options(th.device("cpu"), onednn_matmuls=True)
    assert compile_options(th.device("cpu"), onednn_matmuls=False)["post_grad_custom_post_pass"] == UnfuseBiasAdd()
    cases = [
        ("AuthenticAMD", 26, "AVX512", None, True),  # Zen 5
        ("AuthenticAMD", 25, "AVX512", None, False),  # Zen 4
        ("AuthenticAMD", 26, "AVX2", None, False),
        ("GenuineIntel", 6, "AVX512", None, False),
        ("AuthenticAMD", None, "AVX512", None, False),  # family unknown
        ("AuthenticAMD", 26, "AVX512", "AVX2", False),  # oneDNN kept to AVX2
        ("AuthenticAMD", 26, "AVX512", "AVX512_CORE_BF16", True),
    ]
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for vendor, family, capability, onednn_limit, expected in cases:
        if onednn_limit is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_limit)
        monkeypatch.setattr(precision, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(precision, "cpu_family", lambda: family)
        monkeypatch.setattr(th.backends.cpu, "get_cpu_capability", lambda: capability)
        precision.prefers_onednn_float32_matmuls.cache_clear()
        assert precision.prefers_onednn_float32_matmuls() == (expected and th.backends.mkldnn.is_available())
    monkeypatch.undo()
    precision.prefers_onednn_float32_matmuls.cache_clear()


CHOICE_AGAINST_EAGER = """
import numpy as np
import torch as th
from gymnasium import spaces
from sb3_qchunk import QC
from scripted_envs import ScriptedEnv

th.manual_seed(0)
env = ScriptedEnv(action_space=spaces.Box(-1.0, 1.0, (5,), np.float32))
model = QC("MlpPolicy", env, chunk_size=5, num_samples=3, flow_steps=2, policy_kwargs=dict(net_arch=[24, 40], compile_sampling=True), seed=0)
obs, noise = th.randn(7, 1), th.randn(7, 3, 25)
with th.no_grad():
    compiled = model.policy._sampling_fn()(obs, noise)
    eager = model.policy.sample_chunks_from_noise(obs, noise)
print(model.policy.inductor_options()["cpp.simdlen"], (compiled - eager).abs().max().item())
"""


def test_compiled_code_of_one_vector_width_is_never_loaded_for_another(tmp_path):
    """
    Inductor's on-disk cache does not tell instruction sets apart: a graph compiled for AVX-512 and loaded in a process
    whose inductor compiles kernels for AVX2 (``ATEN_CPU_CAPABILITY=avx2``, or another CPU sharing the cache) computed
    garbage. The policy's options state the width (``cpp.simdlen``), so each width compiles and caches its own code.
    """
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    widths = {isa.bit_width() for isa in valid_vec_isa_list()}
    if not (256 in widths and max(widths) > 256):
        pytest.skip("needs a CPU with vector widths beyond AVX2's (AVX-512) to compile for two widths")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    runs = []
    for capability in (None, "avx2", None):  # compile (and cache) for the widest, then for AVX2, then load the first
        run_env = env if capability is None else {**env, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, "-c", CHOICE_AGAINST_EAGER], env=run_env, capture_output=True, text=True, check=True)
        width, difference = out.stdout.split()
        runs.append((int(width), float(difference)))
    assert [width for width, _ in runs] == [max(widths), 256, max(widths)]
    assert all(difference < 1e-5 for _, difference in runs), runs

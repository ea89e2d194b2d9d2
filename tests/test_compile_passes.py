import pytest
import torch as th
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from sb3_qchunk.common.compile_passes import UnfuseBiasAdd
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
    assert isinstance(options["post_grad_custom_post_pass"], UnfuseBiasAdd)
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

"""
Graph passes for QC's compiled code on CPU (inductor's ``post_grad_custom_post_pass``, set by
:func:`sb3_qchunk.common.precision.compile_options`). They rewrite the graph after differentiation, so they change
forward and backward alike, in either compiled update.

A dense layer with a bias lowers to ATen's ``addmm``. On CPU, ``addmm`` first copies the broadcast bias into its
output and then runs the matmul with ``beta=1``, which reads that output back. Inductor splits ``addmm`` into
``mm`` + ``add`` only on GPUs (its ``unfuse_bias_add_to_pointwise``), where the add then runs inside the pointwise
kernel that follows (the activation). :class:`UnfuseBiasAdd` does the same on CPU: the matmul writes its output
once and the bias is added in the activation's kernel.

ATen's float32 matmuls are MKL's on x86. On some CPUs oneDNN's float32 matmul is much faster (on AMD Zen 5, where MKL
runs its AVX2 kernels, about twice); :class:`OneDNNMatmuls` then sends the large float32 matmuls of the graph to it.
:class:`ChainedPasses` runs several passes as inductor's one custom pass.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch as th
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.flop_counter import register_flop_formula

aten = th.ops.aten

# ``x @ weight.T (+ bias)`` in float32 by oneDNN, as an op of its own: inductor's lowering of oneDNN's linear takes
# only constant (frozen) weights, so compiled code calls this op instead. It has no autograd formula: the pass inserts
# it after differentiation. Defined with ``torch.library.Library`` (about 5 us less per call than
# ``torch.library.custom_op``).
_LIBRARY = th.library.Library("sb3_qchunk", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _onednn_linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None) -> th.Tensor:
    return th.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_LIBRARY.impl("onednn_linear", _onednn_linear, "CPU")


@th.library.register_fake("sb3_qchunk::onednn_linear")
def _(x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None) -> th.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@register_flop_formula(th.ops.sb3_qchunk.onednn_linear)
def _onednn_linear_flops(x_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * math.prod(x_shape) * weight_shape[0]


def _pointwise_uses(node: th.fx.Node) -> bool:
    """Whether every use of ``node`` is a pointwise op (through views), so the bias add can run inside its kernel."""
    for user in node.users:
        if user.op != "call_function" or not isinstance(user.target, th._ops.OpOverload):
            return False
        if user.target.is_view:
            if not _pointwise_uses(user):
                return False
        elif th.Tag.pointwise not in user.target.tags:
            return False
    return True


class _SettingsPass(CustomGraphPass):
    """
    A custom pass equal to another of its type with the same ``repr`` (its settings): equal options are one inductor
    backend, so models that each call ``compile_options`` share their compiled code instead of compiling it again.
    """

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))


class UnfuseBiasAdd(_SettingsPass):
    """
    Replace each CPU ``addmm(bias, x, w)`` (``alpha = beta = 1``) whose output only pointwise ops read (an
    activation, a residual add) by ``mm(x, w) + bias``, as inductor does on GPUs. Where something else reads it (a
    LayerNorm, the graph's outputs) it stays ``addmm``. The same function: one float32 rounding of the bias add
    moves from inside the matmul to after it.
    """

    def __call__(self, graph: th.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.addmm.default or len(node.args) != 3:
                continue
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, mat1, mat2 = node.args
            value = node.meta.get("val")
            if not isinstance(value, th.Tensor) or value.device.type != "cpu" or not _pointwise_uses(node):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(aten.mm.default, (mat1, mat2))
                product.meta = {**node.meta, "val": aten.mm.default(mat1.meta["val"], mat2.meta["val"])}
                total = graph.call_function(aten.add.Tensor, (product, bias))
                total.meta = dict(node.meta)
            node.replace_all_uses_with(total)
            graph.erase_node(node)

    def __repr__(self) -> str:
        return "UnfuseBiasAdd()"

    def uuid(self) -> Any:
        """Identifies the pass for inductor's cache (this file's contents)."""
        return get_hash_for_files((__file__,))


class OneDNNMatmuls(_SettingsPass):
    """
    Run each CPU float32 ``mm``, ``addmm`` (1-d bias, ``alpha = beta = 1``) and ``bmm`` whose rows, inner and output
    dimensions are all at least ``min_dim`` by oneDNN's float32 linear (``sb3_qchunk::onednn_linear``) instead of
    ATen's matmul: ``mm(a, b)`` as ``onednn_linear(a, b.T)``, a ``bmm`` as one call per batch member, concatenated.
    Thinner matmuls stay ATen's (oneDNN ran them no faster, some slower). The same function up to float32 rounding.

    :param min_dim: the smallest dimension a matmul needs to be rewritten
    """

    def __init__(self, min_dim: int = 128) -> None:
        self.min_dim = min_dim

    def rewrites(self, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """
        Whether the pass runs this call by oneDNN: an ATen overload with its arguments, tensors real or fake (the
        graph's values). Used by the pass on each node, and by benchmarks that replay an update's matmuls as it runs them.
        """
        if target is aten.addmm.default:
            plain = len(args) == 3 and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
            if not plain or not (isinstance(args[0], th.Tensor) and args[0].dim() == 1):
                return False
        elif target not in (aten.mm.default, aten.bmm.default):
            return False
        a, b = args[-2:]
        if not all(isinstance(v, th.Tensor) and v.dtype == th.float32 and v.device.type == "cpu" for v in (a, b)):
            return False
        return min(a.shape[-2], a.shape[-1], b.shape[-1]) >= self.min_dim

    def __call__(self, graph: th.fx.Graph) -> None:
        def add(target: Any, args: tuple[Any, ...], value: th.Tensor) -> th.fx.Node:
            new = graph.call_function(target, args)
            new.meta = {"val": value}
            return new

        def linear(a: th.fx.Node, b: th.fx.Node, bias: th.fx.Node | None, value: th.Tensor) -> th.fx.Node:
            weight = add(aten.permute.default, (b, [1, 0]), b.meta["val"].t())
            return add(th.ops.sb3_qchunk.onednn_linear.default, (a, weight, bias), value)

        for node in list(graph.nodes):
            values = [arg.meta.get("val") if isinstance(arg, th.fx.Node) else arg for arg in node.args]
            if node.op != "call_function" or not self.rewrites(node.target, values, node.kwargs):
                continue
            a, b = node.args[-2:]
            bias = node.args[0] if node.target is aten.addmm.default else None
            value = node.meta["val"]
            with graph.inserting_before(node):
                if node.target is aten.bmm.default:
                    members = []
                    for i in range(value.shape[0]):
                        a_i = add(aten.select.int, (a, 0, i), a.meta["val"][i])
                        b_i = add(aten.select.int, (b, 0, i), b.meta["val"][i])
                        out_i = linear(a_i, b_i, None, value[i])
                        members.append(add(aten.unsqueeze.default, (out_i, 0), value[i].unsqueeze(0)))
                    replacement = add(aten.cat.default, (members,), value)
                else:
                    replacement = linear(a, b, bias, value)
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)

    def __repr__(self) -> str:
        return f"OneDNNMatmuls(min_dim={self.min_dim})"

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,)) + repr(self).encode()


class ChainedPasses(_SettingsPass):
    """
    Several custom passes run in turn as inductor's one ``post_grad_custom_post_pass``.

    :param passes: the passes, in the order they run
    """

    def __init__(self, *passes: CustomGraphPass) -> None:
        self.passes = passes

    def __call__(self, graph: th.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def __repr__(self) -> str:
        return f"ChainedPasses({', '.join(map(repr, self.passes))})"

    def uuid(self) -> Any:
        return b"".join(graph_pass.uuid() for graph_pass in self.passes)

"""
A graph pass for QC's compiled code on CPU (inductor's ``post_grad_custom_post_pass``, set by
:func:`sb3_qchunk.common.precision.compile_options`).

A dense layer with a bias lowers to ATen's ``addmm``. On CPU, ``addmm`` first copies the broadcast bias into its
output and then runs the matmul with ``beta=1``, which reads that output back. Inductor splits ``addmm`` into
``mm`` + ``add`` only on GPUs (its ``unfuse_bias_add_to_pointwise``), where the add then runs inside the pointwise
kernel that follows (the activation). :class:`UnfuseBiasAdd` does the same on CPU: the matmul writes its output
once and the bias is added in the activation's kernel.
"""

from typing import Any

import torch as th
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = th.ops.aten


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


class UnfuseBiasAdd(CustomGraphPass):
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

    # Every instance is the same pass: equal options are one inductor backend, so models that each call
    # ``compile_options`` share their compiled code instead of compiling it again.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnfuseBiasAdd)

    def __hash__(self) -> int:
        return hash(UnfuseBiasAdd)

    def uuid(self) -> Any:
        """Identifies the pass for inductor's cache (this file's contents)."""
        return get_hash_for_files((__file__,))

"""
QC's gradient update compiled with ``torch.compile`` (``QC(compile_update=...)``): the same steps as the eager update
in :meth:`sb3_qchunk.qc.QC._update`, as fewer, fused kernels.

Two ways to compile it:

- ``"two_graphs"``: :meth:`QC._losses` (critic target with its sampling, both losses) as one forward and one
  backward graph; ``Optimizer.step`` and the Polyak update run as in the eager update.
- ``"one_graph"``: the whole update as one function, as the reference implementation jits its update: the gradient
  of :meth:`QC._losses` by ``torch.func.grad``, torch's functional Adam (``torch.optim.adam.adam``) on the
  optimizers' own state, and the Polyak update. ``Optimizer.step`` cannot be part of a compiled graph (it
  graph-breaks by design), hence the functional call; Adam and AdamW without AMSGrad only. The first update runs
  eagerly: it creates Adam's state, which the compiled function then updates in place.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch as th
from torch import nn
from torch.optim.adam import adam

if TYPE_CHECKING:
    from sb3_qchunk.qc.qc import QC

COMPILE_MODES = ("one_graph", "two_graphs")


class _LossesModule(nn.Module):
    """
    :meth:`QC._losses` as the forward of a module that holds the policy, so that ``torch.func.functional_call`` can
    evaluate the losses at other values of the policy's parameters (what ``torch.func.grad`` differentiates).
    """

    def __init__(self, model: "QC") -> None:
        super().__init__()
        self.policy = model.policy
        self.losses = model._losses  # a bound method: neither a submodule nor a parameter

    def forward(self, *inputs: Any) -> tuple[th.Tensor, th.Tensor]:
        return self.losses(*inputs)


def supports_one_graph(model: "QC") -> bool:
    """Whether both optimizers are Adam or AdamW without AMSGrad (what the one-graph update steps functionally)."""
    return all(
        isinstance(optimizer, th.optim.Adam)
        and not any(group["amsgrad"] or group["differentiable"] for group in optimizer.param_groups)
        for optimizer in (model.critic.optimizer, model.actor.optimizer)
    )


class CompiledUpdate:
    """
    One compiled gradient update of a QC model (see the module docstring).

    :param model: the QC model (its policy, optimizers and losses are read at each call, never copied)
    :param mode: ``"one_graph"`` or ``"two_graphs"``
    :param options: inductor options for ``torch.compile``
    """

    def __init__(self, model: "QC", mode: str, options: dict[str, Any]) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        if mode == "one_graph" and not supports_one_graph(model):
            raise ValueError("compile_update='one_graph' needs Adam or AdamW optimizers without AMSGrad")
        self.model, self.mode, self.options = model, mode, options
        self.losses: Callable[..., tuple[th.Tensor, th.Tensor]] | None = None
        self.step: Callable[..., th.Tensor] | None = None
        self._losses_module: _LossesModule | None = None
        self._name_of: dict[th.Tensor, str] = {}  # the policy's parameters' names (built when one is missing)
        self._learning_rates: dict[int, tuple[float, th.Tensor]] = {}  # per parameter group: (value, 0-d tensor)

    def __call__(self, inputs: tuple[Any, ...]) -> th.Tensor:
        """
        :param inputs: the arguments of :meth:`QC._losses`
        :return: the update's statistics (:attr:`QC.STATS`)
        """
        model = self.model
        if self.mode == "one_graph" and self._optimizers_have_state():
            if self.step is None:
                self._losses_module = _LossesModule(model)
                self.step = th.compile(self._one_graph_step, options=self.options)
            with model.policy.training_autocast():
                return self.step(inputs, *self._optimizer_arguments())
        if self.mode == "one_graph":  # the first update, eager: it creates Adam's state
            losses = model._losses
        else:
            if self.losses is None:
                self.losses = th.compile(model._losses, options=self.options)
            losses = self.losses
        with model.policy.training_autocast():
            loss, stats = losses(*inputs)
        model._optimizer_step(loss)
        return stats

    def _optimizers_have_state(self) -> bool:
        """Whether both optimizers hold the state of every parameter (they create it at their first step)."""
        return all(
            len(optimizer.state) == sum(len(group["params"]) for group in optimizer.param_groups)
            for optimizer in (self.model.critic.optimizer, self.model.actor.optimizer)
        )

    def _optimizer_arguments(self) -> tuple[list[str], list[tuple[list[th.Tensor], ...]], list[dict[str, Any]]]:
        """
        What :meth:`_one_graph_step` needs of the optimizers, read anew at each update (``load_state_dict`` replaces
        state tensors, schedules change the learning rate) and passed as plain lists: compiled code that touched the
        optimizer objects themselves would be specialised to them (one compilation per model).

        :return: the parameter names in the optimizers' order; per parameter group its parameters, ``exp_avg``,
            ``exp_avg_sq`` and ``step`` tensors; per group its Adam settings (the learning rate as a 0-d tensor)
        """
        model = self.model
        names, tensors, settings = [], [], []
        for optimizer in (model.critic.optimizer, model.actor.optimizer):
            for group in optimizer.param_groups:
                index = len(settings)
                state = [optimizer.state[param] for param in group["params"]]
                if any(param not in self._name_of for param in group["params"]):
                    self._name_of = {param: name for name, param in model.policy.named_parameters()}
                names += [self._name_of[param] for param in group["params"]]
                tensors.append(
                    (group["params"], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [s["step"] for s in state])
                )
                settings.append(
                    dict(
                        beta1=group["betas"][0],
                        beta2=group["betas"][1],
                        lr=self._learning_rate(index, group),
                        weight_decay=group["weight_decay"],
                        eps=group["eps"],
                        maximize=group["maximize"],
                        decoupled_weight_decay=group.get("decoupled_weight_decay", False),
                    )
                )
        return names, tensors, settings

    def _learning_rate(self, index: int, group: dict[str, Any]) -> th.Tensor:
        """
        The learning rate of the optimizers' ``index``-th parameter group as a 0-d tensor on its parameters' device,
        which the compiled code reads at each call: a Python float would be compiled in as a constant, so that a
        learning-rate schedule recompiled the update at every change (and dynamo gave up on it after 8). One tensor
        per group, refilled when the value changes (a new one at each update would be a copy to the device, which
        waits for the GPU's queued work).
        """
        value, device = float(group["lr"]), group["params"][0].device
        cached = self._learning_rates.get(index)
        if cached is None or cached[1].device != device:
            cached = (value, th.tensor(value, dtype=th.float32, device=device))
        elif cached[0] != value:
            cached = (value, cached[1].fill_(value))
        self._learning_rates[index] = cached
        return cached[1]

    def _one_graph_step(
        self, inputs: tuple[Any, ...], names: list[str], tensors: list[tuple[list[th.Tensor], ...]], settings: list[dict[str, Any]]
    ) -> th.Tensor:
        """
        The whole update as one function: the same steps as :meth:`QC._losses` + ``backward`` + ``Optimizer.step``
        + the Polyak update (tested).

        :param inputs: the arguments of :meth:`QC._losses`
        :param names, tensors, settings: see :meth:`_optimizer_arguments`
        :return: the statistics of :attr:`QC.STATS`
        """
        model = self.model
        params = [param for group_tensors in tensors for param in group_tensors[0]]

        def losses_of(values: list[th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
            swapped = {f"policy.{name}": value for name, value in zip(names, values)}
            return th.func.functional_call(self._losses_module, swapped, inputs, strict=False)

        grads, stats = th.func.grad(losses_of, has_aux=True)(params)
        # Compiled, Adam takes its step counts and learning rate as tensors: no host sync inside the graph. Where dynamo
        # runs this function as plain Python instead (after `torch._dynamo.config.recompile_limit` compilations of it,
        # e.g. a hyperparameter search that builds many configurations in one process), Adam's CPU code needs them as
        # numbers (capturable=False).
        compiling = th.compiler.is_compiling()
        start = 0
        with th.no_grad():
            for (group_params, exp_avgs, exp_avg_sqs, steps), group_settings in zip(tensors, settings):
                end = start + len(group_params)
                adam(
                    group_params,
                    grads[start:end],
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    amsgrad=False,
                    foreach=True,
                    capturable=compiling,
                    **(group_settings if compiling else {**group_settings, "lr": float(group_settings["lr"])}),
                )
                start = end
            th._foreach_lerp_(model._target_params, model._online_params, model.tau)
        return stats

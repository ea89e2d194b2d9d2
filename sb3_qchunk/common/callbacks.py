"""Callbacks and logging shared by the chunked algorithms, and the clocks their frequencies and steps count."""

from collections.abc import Callable
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback, EvalCallback, ProgressBarCallback
from stable_baselines3.common.logger import Logger

#: SB3 callbacks that act every ``n`` calls of ``on_step``, and the attribute that holds ``n``
FREQUENCY_ATTRIBUTES: tuple[tuple[type[BaseCallback], str], ...] = ((EvalCallback, "eval_freq"), (CheckpointCallback, "save_freq"))


def primitive_steps_clock(model: BaseAlgorithm) -> int:
    """The clock of callback frequencies in ``learn``: primitive env steps of one env (``num_timesteps // n_envs``)."""
    return model.num_timesteps // model.n_envs


def offline_updates_clock(model: BaseAlgorithm) -> int:
    """The clock of callback frequencies in ``pretrain``: offline gradient updates done (``offline_updates_done``)."""
    return model.offline_updates_done  # type: ignore[attr-defined]


class ChunkProgressBarCallback(ProgressBarCallback):
    """
    SB3's progress bar, advanced by the primitive env steps each chunk really ran
    (``model.num_timesteps``), not by one per ``env.step`` call.
    """

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._last_timesteps = self.model.num_timesteps

    def _on_step(self) -> bool:
        self.pbar.update(self.model.num_timesteps - self._last_timesteps)
        self._last_timesteps = self.model.num_timesteps
        return True


class EveryClockTicks(BaseCallback):
    """
    Runs an SB3 callback that acts every ``n`` calls of ``on_step`` (``EvalCallback``'s ``eval_freq``,
    ``CheckpointCallback``'s ``save_freq``) every ``n`` ticks of a clock instead: when the clock has passed a new
    multiple of ``n``, the callback's ``n_calls`` is set to that multiple and its ``on_step`` is called, so it acts
    there (at most once per call of this callback's ``on_step``, i.e. once per chunk or update block). Between two
    multiples it is not called. Its other events (training and rollout start and end, locals) are passed on.

    QC uses it with the primitive steps of one env (``num_timesteps // n_envs``) as the clock in ``learn`` and with
    the offline updates done in ``pretrain``.

    :param callback: the callback to run
    :param frequency_attribute: its attribute holding ``n`` (read at each call; ``n <= 0`` never acts, as in SB3)
    :param clock: the clock, read from the model
    """

    def __init__(self, callback: BaseCallback, frequency_attribute: str, clock: Callable[[BaseAlgorithm], int]) -> None:
        super().__init__(verbose=callback.verbose)
        self.callback, self.frequency_attribute, self.clock = callback, frequency_attribute, clock
        self._passed = 0

    def init_callback(self, model: BaseAlgorithm) -> None:
        super().init_callback(model)
        self.callback.init_callback(model)

    def _on_training_start(self) -> None:
        frequency = getattr(self.callback, self.frequency_attribute)
        self._passed = self.clock(self.model) // frequency if frequency > 0 else 0
        self.callback.on_training_start(self.locals, self.globals)

    def _on_rollout_start(self) -> None:
        self.callback.on_rollout_start()

    def _on_rollout_end(self) -> None:
        self.callback.on_rollout_end()

    def _on_training_end(self) -> None:
        self.callback.on_training_end()

    def update_child_locals(self, locals_: dict[str, Any]) -> None:
        self.callback.update_locals(locals_)

    def _on_step(self) -> bool:
        frequency = getattr(self.callback, self.frequency_attribute)
        if frequency <= 0:
            return True
        passed = self.clock(self.model) // frequency
        if passed <= self._passed:
            return True
        self._passed = passed
        self.callback.n_calls = passed * frequency - 1  # on_step adds one: a multiple of the frequency
        return self.callback.on_step()


def frequency_attribute(callback: BaseCallback) -> str | None:
    """The attribute holding how often ``callback`` acts, in calls of ``on_step``, if it is one of :data:`FREQUENCY_ATTRIBUTES`."""
    return next((attribute for cls, attribute in FREQUENCY_ATTRIBUTES if isinstance(callback, cls)), None)


def on_clock(callback: BaseCallback, clock: Callable[[BaseAlgorithm], int]) -> BaseCallback:
    """
    ``callback`` with every callback of :data:`FREQUENCY_ATTRIBUTES` in it (itself, or members of ``CallbackList``\\ s)
    run by :class:`EveryClockTicks` on ``clock``. The callbacks themselves are not changed; lists are rebuilt.

    :param callback: what the user passed, as a ``BaseCallback``
    :param clock: the clock their frequencies count
    """
    if isinstance(callback, CallbackList):
        return CallbackList([on_clock(member, clock) for member in callback.callbacks])
    attribute = frequency_attribute(callback)
    return callback if attribute is None else EveryClockTicks(callback, attribute, clock)


def eval_callbacks(callback: BaseCallback) -> list[EvalCallback]:
    """The ``EvalCallback``\\ s in ``callback`` (itself, members of ``CallbackList``\\ s, callbacks run by :class:`EveryClockTicks`)."""
    if isinstance(callback, CallbackList):
        return [found for member in callback.callbacks for found in eval_callbacks(member)]
    if isinstance(callback, EveryClockTicks):
        return eval_callbacks(callback.callback)
    return [callback] if isinstance(callback, EvalCallback) else []


class ClockLogger(Logger):
    """
    SB3's ``Logger`` whose dumps are all written at the step a clock gives, whatever step the caller passes: in
    ``pretrain`` the clock is the offline updates, so the offline run's points (the losses, and what an
    ``EvalCallback`` records, which SB3 dumps at ``num_timesteps``) share one x-axis. It writes to the outputs of
    the logger it is made from.

    :param logger: the logger whose outputs to write to
    :param clock: the step of every dump
    """

    def __init__(self, logger: Logger, clock: Callable[[], int]) -> None:
        super().__init__(logger.dir, logger.output_formats)
        self.level = logger.level
        self.clock = clock

    def dump(self, step: int = 0) -> None:
        super().dump(step=self.clock())

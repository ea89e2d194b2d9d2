"""Callbacks shared by the chunked algorithms."""

from stable_baselines3.common.callbacks import ProgressBarCallback


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

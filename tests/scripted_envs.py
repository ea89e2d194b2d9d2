"""Small environments whose every number a test can compute by hand."""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class ScriptedEnv(gym.Env):
    """
    The observation is the step counter (Box(1,)); the reward of step i (0-based) is ``rewards[i]``.
    Terminates after step ``terminate_at`` (1-based count of steps), truncates after ``truncate_at``.
    Every info carries the step counter and, if ``success_at`` is set, ``success`` = (count >= success_at).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        rewards: list[float] | None = None,
        terminate_at: int | None = None,
        truncate_at: int | None = None,
        success_at: int | None = None,
        action_space: spaces.Space | None = None,
        dict_obs: bool = False,
        render_mode: str | None = None,
    ) -> None:
        self.rewards = rewards if rewards is not None else [float(i + 1) for i in range(100)]
        self.terminate_at, self.truncate_at, self.success_at = terminate_at, truncate_at, success_at
        self.action_space = action_space if action_space is not None else spaces.Box(-1.0, 1.0, (2,), np.float32)
        box = spaces.Box(0.0, 1000.0, (1,), np.float32)
        self.dict_obs = dict_obs
        self.observation_space = spaces.Dict({"count": box, "twice": box}) if dict_obs else box
        self.render_mode = render_mode
        self.count = 0
        self.actions_seen: list[Any] = []

    def _obs(self) -> Any:
        value = np.array([self.count], dtype=np.float32)
        return {"count": value, "twice": 2 * value} if self.dict_obs else value

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"count": self.count}
        if self.success_at is not None:
            info["success"] = float(self.count >= self.success_at)
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        self.count = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.actions_seen.append(action)
        reward = float(self.rewards[self.count])
        self.count += 1
        terminated = self.terminate_at is not None and self.count >= self.terminate_at
        truncated = self.truncate_at is not None and self.count >= self.truncate_at
        return self._obs(), reward, terminated, truncated, self._info()

    def render(self) -> np.ndarray:
        return np.zeros((4, 4, 3), dtype=np.uint8)


class SparseChainEnv(gym.Env):
    """
    Sparse-reward reaching task where temporally coherent actions matter: a point on a line starts at 0
    and must reach ``goal`` within ``max_steps`` steps; each step moves it by ``0.25 * a``, a in [-1, 1].
    Reward -1 per step until the goal (then 0, and the episode terminates), so a random walk rarely
    gets there. ``info["success"]`` says whether the goal was reached.
    """

    def __init__(self, goal: float = 2.0, max_steps: int = 40) -> None:
        self.goal, self.max_steps = goal, max_steps
        self.observation_space = spaces.Box(-20.0, 20.0, (2,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.x, self.t = 0.0, 0

    def _obs(self) -> np.ndarray:
        return np.array([self.x, self.t / self.max_steps], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.x, self.t = 0.0, 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.x += 0.25 * float(np.clip(action, -1.0, 1.0)[0])
        self.t += 1
        success = self.x >= self.goal
        return self._obs(), 0.0 if success else -1.0, success, self.t >= self.max_steps, {"success": float(success)}


class FaultyEnv(ScriptedEnv):
    """
    A ScriptedEnv that misbehaves at chosen primitive steps, counted over the env's whole life (1-based, across
    episodes): a NaN reward, a NaN observation, or an exception raised by ``step``.
    """

    def __init__(
        self,
        nan_reward_at: int | None = None,
        nan_obs_at: int | None = None,
        raise_at: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.nan_reward_at, self.nan_obs_at, self.raise_at = nan_reward_at, nan_obs_at, raise_at
        self.total_steps = 0

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self.total_steps + 1 == self.raise_at:
            raise RuntimeError(f"scripted failure at step {self.raise_at}")
        self.total_steps += 1
        obs, reward, terminated, truncated, info = super().step(action)
        if self.total_steps == self.nan_reward_at:
            reward = float("nan")
        if self.total_steps == self.nan_obs_at:
            obs = {key: np.full_like(value, np.nan) for key, value in obs.items()} if self.dict_obs else np.full_like(obs, np.nan)
        return obs, reward, terminated, truncated, info


def episodes_dataset(lengths: list[int], obs_dim: int = 3, action_dim: int = 1) -> dict[str, np.ndarray]:
    """An offline dataset of zeros in the common form, with episodes of the given lengths (``terminals`` at their ends)."""
    n = sum(lengths)
    terminals = np.zeros(n, np.float32)
    terminals[np.cumsum(lengths) - 1] = 1.0
    return dict(
        observations=np.zeros((n, obs_dim), np.float32),
        next_observations=np.zeros((n, obs_dim), np.float32),
        actions=np.zeros((n, action_dim), np.float32),
        rewards=np.zeros(n, np.float32),
        terminals=terminals,
        terminated=np.zeros(n, np.float32),
    )

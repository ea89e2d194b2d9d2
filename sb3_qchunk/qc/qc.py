import io
import math
import pathlib
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common import utils
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_pkl, load_from_zip_file
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, RolloutReturn, Schedule, TrainFreq
from stable_baselines3.common.utils import should_collect_more_steps
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from sb3_qchunk.common.buffers import ChunkReplayBuffer, ChunkReplayBufferSamples, usable_windows
from sb3_qchunk.common.callbacks import (
    ChunkProgressBarCallback,
    ClockLogger,
    eval_callbacks,
    offline_updates_clock,
    on_clock,
    primitive_steps_clock,
)
from sb3_qchunk.common.env_util import check_eval_env, check_finite_observations, check_finite_transitions, wrap_chunked
from sb3_qchunk.common.precision import has_native_bf16
from sb3_qchunk.datasets import load_dataset
from sb3_qchunk.qc.compiled_update import COMPILE_MODES, CompiledUpdate, supports_one_graph
from sb3_qchunk.qc.policies import (
    ACTOR_TYPES,
    Q_AGGREGATIONS,
    EnsembleCritic,
    FlowActor,
    MlpPolicy,
    MultiInputPolicy,
    QCPolicy,
    aggregate_q,
)
from sb3_qchunk.wrappers import check_chunk_size

SelfQC = TypeVar("SelfQC", bound="QC")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def expectile_loss(diff: th.Tensor, expectile: float) -> th.Tensor:
    """
    The asymmetric square |expectile - 1(diff < 0)| * diff^2, elementwise: minimised by the ``expectile``-expectile of
    the targets (0.5: their mean; towards 1: their maximum).

    :param diff: target - prediction
    :param expectile: kappa in (0, 1)
    """
    weight = th.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff**2


def chunked_critic_target(
    rewards: th.Tensor, masks: th.Tensor, next_q: th.Tensor, gamma: float, chunk_size: int
) -> th.Tensor:
    """
    y = R_t + gamma^h * mask * Qbar(s'_{t+h-1}, a'): the h-step backup of a chunk (unbiased for an
    executed chunk; the biased n-step target when the critic sees only the first action).

    :param rewards: R_t = sum_{i<h} gamma^i r_{t+i}, (B,)
    :param masks: min_i (1 - terminated_{t+i}), (B,)
    :param next_q: aggregated target-critic value of the next chunk, (B,)
    :param gamma: discount factor
    :param chunk_size: h
    """
    return rewards + gamma**chunk_size * masks * next_q


class QC(OffPolicyAlgorithm):
    """
    Q-chunking (QC): off-policy RL in the space of action chunks.
    Paper: "Reinforcement Learning with Action Chunking", Q. Li, Z. Zhou, S. Levine, NeurIPS 2025.
    Reference implementation (JAX): https://github.com/ColinQiyangLi/qc (``agents/acfql.py``).

    The agent emits chunks of ``chunk_size`` (h) actions that the env runs open-loop
    (:class:`~sb3_qchunk.ChunkedActionWrapper`, applied automatically). The critic scores whole chunks and is
    trained with the h-step backup y = R_t + gamma^h * mask * Qbar(s'_{t+h-1}, a'), which is unbiased because
    the chunk really was executed as chosen. The actor is a flow-matching behaviour-cloning model over
    chunks; "best_of_n" (QC) acts with the best of ``num_samples`` flow samples under the critic, "distill"
    (QC-FQL) distils a one-step actor that maximises Q with a distillation penalty ``alpha``.

    The paper's methods are settings of this class:

    ===========  ============================================================
    paper        settings
    ===========  ============================================================
    QC           ``chunk_size=5, actor_type="best_of_n"``
    QC-FQL       ``chunk_size=5, actor_type="distill"``
    BFN          ``chunk_size=1, actor_type="best_of_n"``
    FQL          ``chunk_size=1, actor_type="distill"``
    BFN-n        ``chunk_size=5, action_chunking=False, actor_type="best_of_n"``
    FQL-n        ``chunk_size=5, action_chunking=False, actor_type="distill"``
    ===========  ============================================================

    With ``action_chunking=False`` the agent acts one action at a time and the critic and actor see only the
    first action of each window, with the (biased) n-step target built from the same window of h steps.

    Decoupled chunk lengths (``critic_chunk_size`` H > ``chunk_size`` h; Decoupled Q-chunking, Q. Li, S. Park,
    S. Levine, arXiv 2512.10926): the policy emits and the env runs chunks of h actions, while a long-chunk critic
    Q_H scores windows of H actions with the H-step backup over them. The policy cannot choose H actions, so it is
    ranked (best-of-N) or trained (distill) by a partial-chunk critic Q_h(s, a_{0:h}) distilled from Q_H: an
    expectile regression (``partial_critic_expectile`` kappa) of Q_h(s_t, a_{t:t+h}) onto Q_H(s_t, a_{t:t+H}) over
    the data's completions a_{t+h:t+H}, so that kappa > 0.5 leans towards the best completion seen. Per window:

        L_H = (Q_H(s_t, a_{t:t+H}) - [R^H_t + gamma^H * mask * Qbar_h(s'_{t+H-1}, a')])^2,  a' = pi(s'_{t+H-1})
        L_h = |kappa - 1(u < 0)| u^2,  u = agg Q_H(s_t, a_{t:t+H}) (no gradient) - Q_h(s_t, a_{t:t+h})

    with ``Qbar_h`` the Polyak target of Q_h (Q_H has none) and a' the policy's h-chunk (best of N under Q_h).
    Windows are H steps long (the replay buffer's ``chunk_size``); the flow BC loss sees their first h actions.
    H = h (the default) is QC, the same computation and the same numbers.

    Counting: ``total_timesteps``, ``learning_starts``, ``train_freq`` and ``num_timesteps`` are in primitive
    env steps (the paper's x-axis). With ``gradient_steps=-1`` the agent does one gradient step per
    primitive step collected (the paper's update-to-data ratio of 1).

    :param policy: the policy model to use (MlpPolicy, MultiInputPolicy, ...)
    :param env: the environment to learn from (if registered in Gym, can be str); wrapped into chunks
        automatically, or already chunked with a matching chunk size
    :param chunk_size: h, the number of actions per chunk and the length of the backup
    :param actor_type: "best_of_n" (QC) or "distill" (QC-FQL)
    :param num_samples: N, flow samples per observation for best-of-N
    :param flow_steps: Euler steps of the flow actor
    :param alpha: weight of the distillation loss (``actor_type="distill"`` only; per task in the paper)
    :param n_critics: size K of the critic ensemble
    :param q_aggregation: "mean" (paper default) or "min" over the critic ensemble
    :param action_chunking: False for the n-step ablations (BFN-n / FQL-n)
    :param critic_chunk_size: H, the chunk length of the long-chunk critic and of the backup (decoupled chunk
        lengths, see above); None (default) or ``chunk_size``: QC's single critic over the policy's chunks
    :param partial_critic_expectile: kappa of the distillation of the partial-chunk critic from the long-chunk one
        (``critic_chunk_size > chunk_size`` only): 0.5 regresses onto the mean over the data's completions, larger
        values lean towards the best; DQC used 0.8 on cube tasks, 0.5 on puzzles
    :param compile_update: ``torch.compile`` each gradient update (:mod:`sb3_qchunk.qc.compiled_update`). ``"auto"``
        (default): compile from the first :meth:`pretrain` or :meth:`learn` call that plans at least
        ``AUTO_COMPILE_UPDATES`` gradient steps, where the 20-40 s of compilation at the first compiled update pay
        off (on a 2-core CPU the compiled update ran best-of-N at 1.6-1.8x and QC-FQL at 1.1-1.5x the eager
        updates/s: compilation is repaid after about 3000-7000 updates at 256x256, a few hundred at 4x512), and
        run eagerly before, so short runs do not wait for the compiler (a long run split into shorter calls, e.g.
        ``pretrain`` in blocks between evaluations, stays eager: pass True). True or False to decide yourself;
        ``"one_graph"`` / ``"two_graphs"`` to choose how (True: the whole update as one graph for
        ``actor_type="distill"`` with Adam/AdamW, the losses' forward and backward graphs for best-of-N). Compiled
        and eager updates draw the same random numbers and agree to float rounding. Inductor options:
        ``policy_kwargs=dict(compile_options=...)``
    :param learning_rate: learning rate for Adam, constant or a function of the remaining progress
    :param buffer_size: size of the (online) replay buffer, in primitive transitions over all parallel envs
        (each env's ring holds ``buffer_size // n_envs``, as in SB3)
    :param learning_starts: primitive steps to collect before learning starts (random actions before that,
        unless the policy was already trained, e.g. by :meth:`pretrain`); the paper's offline-to-online runs
        start updating after 5000 online steps. A ``learn`` call that ends before it warns that it will not train
    :param batch_size: minibatch size (windows) per gradient update
    :param tau: Polyak coefficient of the target critic
    :param gamma: discount factor
    :param train_freq: update the model every ``train_freq`` primitive steps (int or ``(n, "step")``); a chunk
        is never split, so updates happen after the chunk that reaches the count
    :param gradient_steps: gradient steps after each rollout; -1 for as many as primitive steps collected
    :param offline_fraction: None to sample windows uniformly over offline and online data (the paper), or
        the fraction of each batch drawn from the offline data (RLPD-style symmetric sampling)
    :param offline_dataset: an offline dataset (path or dict, see :meth:`load_dataset`) to put in the replay
        buffer when the model is built
    :param offline_dataset_kwargs: keyword arguments for the loader of ``offline_dataset`` (e.g.
        ``dict(task_id=1, env="cube-single-singletask-task1-v0", sparse=True)`` for an OGBench file)
    :param offline_updates: offline gradient steps that the first :meth:`learn` call runs (see :meth:`pretrain`)
        before it collects online data; lets an RL Zoo hyperparameter file express offline-to-online
    :param replay_buffer_class: :class:`~sb3_qchunk.ChunkReplayBuffer` or a subclass of it (None: the former);
        QC samples windows of ``chunk_size`` primitive steps, which SB3's buffers do not hold
    :param replay_buffer_kwargs: more keyword arguments for the replay buffer (the window length, ``gamma`` and
        ``offline_fraction`` come from QC's own settings)
    :param action_noise: not supported (must be None): QC explores by sampling its flow policy, as in the paper
    :param optimize_memory_usage: not supported (must be False): the buffer's windows read each step's own next
        observation, which SB3's memory optimisation drops
    :param policy_kwargs: additional arguments for the policy (``net_arch``, ``critic_layer_norm``, ...)
    :param stats_window_size: window size for the rollout logging
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param verbose: 0 no output, 1 info messages, 2 debug messages
    :param seed: seed for the pseudo random generators
    :param device: device (cpu, cuda, ...) on which the code should be run
    :param _init_setup_model: whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: QCPolicy
    actor: FlowActor
    critic: EnsembleCritic
    critic_target: EnsembleCritic
    replay_buffer: ChunkReplayBuffer  # type: ignore[assignment]
    long_critic: EnsembleCritic | None
    #: with ``compile_update="auto"``, the planned gradient steps of one run from which the update is compiled
    AUTO_COMPILE_UPDATES: ClassVar[int] = 10_000
    #: :meth:`train` draws the batches and noise of this many updates at once (at most ``DRAW_BYTES`` of windows)
    UPDATES_PER_DRAW: ClassVar[int] = 32
    DRAW_BYTES: ClassVar[int] = 64 * 2**20
    #: the statistics :meth:`_losses` returns, in order (logged as ``train/<name>``; see :attr:`stat_names`)
    STATS: ClassVar[tuple[str, ...]] = ("critic_loss", "actor_loss", "bc_flow_loss", "distill_loss", "q_mean", "q_max", "q_min")

    def __init__(
        self,
        policy: str | type[QCPolicy],
        env: GymEnv | str | None,
        chunk_size: int = 5,
        actor_type: str = "best_of_n",
        num_samples: int = 32,
        flow_steps: int = 10,
        alpha: float = 100.0,
        n_critics: int = 2,
        q_aggregation: str = "mean",
        action_chunking: bool = True,
        critic_chunk_size: int | None = None,
        partial_critic_expectile: float = 0.8,
        compile_update: bool | str = "auto",
        learning_rate: float | Schedule = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 5000,
        batch_size: int = 256,
        tau: float = 0.005,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = -1,
        offline_fraction: float | None = None,
        offline_dataset: str | dict[str, Any] | None = None,
        offline_dataset_kwargs: dict[str, Any] | None = None,
        offline_updates: int = 0,
        replay_buffer_class: type[ChunkReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        action_noise: ActionNoise | None = None,
        optimize_memory_usage: bool = False,
        policy_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if actor_type not in ACTOR_TYPES:
            raise ValueError(f"actor_type must be one of {ACTOR_TYPES}, got {actor_type!r}")
        if q_aggregation not in Q_AGGREGATIONS:
            raise ValueError(f"q_aggregation must be one of {Q_AGGREGATIONS}, got {q_aggregation!r}")
        if not _is_real(alpha) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not _is_real(gamma) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
        if not _is_real(tau) or not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
        for name, value, minimum in (("batch_size", batch_size, 1), ("buffer_size", buffer_size, 1), ("learning_starts", learning_starts, 0)):
            if not _is_integer(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if action_noise is not None:
            raise ValueError("QC does not take action_noise: it explores by sampling its flow policy (best-of-N or one-step noise)")
        if optimize_memory_usage:
            raise ValueError("QC does not support optimize_memory_usage: its windows read each step's own next observation")
        if isinstance(replay_buffer_class, type) and issubclass(replay_buffer_class, HerReplayBuffer):
            raise ValueError(
                "QC does not offer HER relabelling: a relabelled chunk window needs every step's reward recomputed for "
                "the new goal (env.compute_reward), terminations and episode ends included, which SB3's HerReplayBuffer "
                "does for single transitions only. Goal-conditioned envs with Dict observations train without it "
                "(the goal is part of the observation); for sparse goals, offline data or a shaped reward"
            )
        if replay_buffer_class is not None and not (isinstance(replay_buffer_class, type) and issubclass(replay_buffer_class, ChunkReplayBuffer)):
            raise ValueError(
                f"replay_buffer_class must be ChunkReplayBuffer or a subclass (QC samples windows of chunk_size primitive "
                f"steps), got {replay_buffer_class!r}"
            )
        reserved = {"chunk_size", "gamma", "offline_fraction", "n_envs"} & set(replay_buffer_kwargs or {})
        if reserved:
            raise ValueError(f"replay_buffer_kwargs {sorted(reserved)} come from QC's own settings: set them on QC instead")
        if isinstance(train_freq, tuple) and train_freq[1] != "step":
            raise ValueError(f"QC counts train_freq in primitive steps only, got {train_freq}")
        self.chunk_size = check_chunk_size(chunk_size)
        self.action_chunking = action_chunking
        self.critic_chunk_size = self.chunk_size if critic_chunk_size is None else check_chunk_size(critic_chunk_size)
        if self.critic_chunk_size < self.chunk_size:
            raise ValueError(
                f"critic_chunk_size={critic_chunk_size} is shorter than chunk_size={chunk_size}: the critic's chunk must "
                "hold the policy's (equal lengths for QC, longer for decoupled chunk lengths)"
            )
        if self.decoupled and not action_chunking:
            raise ValueError(
                "critic_chunk_size > chunk_size needs action_chunking=True: the n-step ablations have no policy chunk "
                "for a partial-chunk critic to score"
            )
        if not _is_real(partial_critic_expectile) or not 0.0 < partial_critic_expectile < 1.0:
            raise ValueError(f"partial_critic_expectile must be a number in (0, 1), got {partial_critic_expectile!r}")
        self.partial_critic_expectile = float(partial_critic_expectile)
        if not isinstance(compile_update, bool) and compile_update not in ("auto", *COMPILE_MODES):
            raise ValueError(f"compile_update must be 'auto', True, False or one of {COMPILE_MODES}, got {compile_update!r}")
        self.compile_update = compile_update
        self._compiling = compile_update not in (False, "auto")  # "auto": decided by the first long enough run
        self._compiled_update: CompiledUpdate | None = None
        self._snapshot: list[th.Tensor] = []  # the buffers of _training_state
        if _init_setup_model:
            # (``load`` wraps the env itself, with the saved chunk size, before it builds the model.)
            env = wrap_chunked(env, self.env_chunk_size, gamma)
        super().__init__(
            policy,
            env,  # type: ignore[arg-type]
            learning_rate,
            buffer_size,
            learning_starts,
            batch_size,
            tau,
            gamma,
            train_freq,
            gradient_steps,
            action_noise=None,
            replay_buffer_class=replay_buffer_class or ChunkReplayBuffer,  # type: ignore[arg-type]
            replay_buffer_kwargs=replay_buffer_kwargs,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            sde_support=False,
            support_multi_env=True,
            supported_action_spaces=(spaces.Box,),
        )
        self.actor_type = actor_type
        self.num_samples = num_samples
        self.flow_steps = flow_steps
        self.alpha = alpha
        self.n_critics = n_critics
        self.q_aggregation = q_aggregation
        self.offline_fraction = offline_fraction
        self.offline_dataset = offline_dataset
        self.offline_dataset_kwargs = offline_dataset_kwargs or {}
        self.offline_updates = offline_updates
        self.offline_updates_done = 0
        self._chunks_returned = np.zeros(0, dtype=np.int64)
        self._online_windows_checked = False
        if _init_setup_model:
            self._setup_model()
            if offline_dataset is not None:
                self.load_dataset(offline_dataset, **self.offline_dataset_kwargs)

    @property
    def decoupled(self) -> bool:
        """Whether the critic's chunk is longer than the policy's (``critic_chunk_size > chunk_size``)."""
        return self.critic_chunk_size > self.chunk_size

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The statistics of an update (logged as ``train/<name>``): :attr:`STATS`, and ``partial_critic_loss`` when decoupled."""
        return (*self.STATS, "partial_critic_loss") if self.decoupled else self.STATS

    @property
    def env_chunk_size(self) -> int:
        """Actions per env step: ``chunk_size``, or 1 for the n-step ablations (``action_chunking=False``)."""
        return self.chunk_size if self.action_chunking else 1

    def _setup_model(self) -> None:
        # (after load(), the saved compile_update decides too)
        self._compiling = self._compiling or self.compile_update not in (False, "auto")
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        assert isinstance(self.action_space, spaces.Box)
        if self.env is not None:  # (without an env, load() restored it with the model's other attributes)
            self.primitive_action_space = self.env.get_attr("primitive_action_space")[0]
        if self.replay_buffer is None:
            self.replay_buffer = self.replay_buffer_class(  # type: ignore[assignment]
                self.buffer_size,
                self.observation_space,
                self.primitive_action_space,
                device=self.device,
                n_envs=self.n_envs,
                chunk_size=self.critic_chunk_size,
                gamma=self.gamma,
                offline_fraction=self.offline_fraction,
                **self.replay_buffer_kwargs,
            )
        long_critic_space = None
        if self.decoupled:  # the long critic scores windows of critic_chunk_size primitive actions, in [-1, 1]
            action_dim = int(np.prod(self.primitive_action_space.shape))
            long_critic_space = spaces.Box(-1.0, 1.0, (self.critic_chunk_size * action_dim,), dtype=np.float32)
        self.policy = self.policy_class(
            self.observation_space,
            self.action_space,
            self.lr_schedule,
            actor_type=self.actor_type,
            num_samples=self.num_samples,
            flow_steps=self.flow_steps,
            q_aggregation=self.q_aggregation,
            n_critics=self.n_critics,
            long_critic_action_space=long_critic_space,
            **self.policy_kwargs,
        ).to(self.device)
        self._warn_emulated_bf16()
        self._convert_train_freq()
        self._create_aliases()

    def _warn_emulated_bf16(self) -> None:
        """Warn where the policy is asked for bf16 that the device only emulates (many times slower than float32)."""
        asked = [
            f"{name}='bfloat16'"
            for name, value in (
                ("training_precision", self.policy.training_precision),
                ("sampling_precision", self.policy.sampling_precision),
            )
            if value == "bfloat16"
        ]
        if asked and self.device.type in ("cpu", "cuda") and not has_native_bf16(self.device.type):  # (others: unknown)
            warnings.warn(
                f"{' and '.join(asked)} on a {self.device.type} without native bfloat16 (no AVX512-BF16 or AMX on a "
                "CPU): bf16 is emulated there and runs several times slower than float32 (a 2-core AVX2 CPU: 0.04-0.44x "
                "the updates/s). sampling_precision='auto' and training_precision='float32' pick float32 there.",
                stacklevel=3,
            )

    def _create_aliases(self) -> None:
        self.actor = self.policy.actor
        self.critic = self.policy.critic
        self.critic_target = self.policy.critic_target
        self.long_critic = self.policy.long_critic
        self._online_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())

    def _window_name(self) -> str:
        """The setting that sets the window length, for messages."""
        return "critic_chunk_size" if self.decoupled else "chunk_size"

    def scale_primitive_action(self, actions: np.ndarray) -> np.ndarray:
        """Rescale primitive actions from the env's bounds to [-1, 1] (what the buffer stores)."""
        low, high = self.primitive_action_space.low, self.primitive_action_space.high
        # Same map as SB3's scale_action, written so that bounds of [-1, 1] leave actions bit-for-bit unchanged.
        center, half_range = (high + low) / 2.0, (high - low) / 2.0
        return (np.asarray(actions).reshape(-1, len(low)) - center) / half_range

    # ----------------------------------------------------------------------------------------------
    # Offline data
    # ----------------------------------------------------------------------------------------------
    def load_dataset(self, dataset: str | dict[str, Any], replace: bool = False, **load_kwargs: Any) -> None:
        """
        Put an offline dataset into the replay buffer, beside the online data (validated first; the user's
        arrays and files are never modified). A second call appends its dataset to the offline data already
        loaded (no window bridges the two), unless ``replace=True``.

        A dataset in which no window of ``chunk_size`` steps stays inside one episode (every episode is shorter
        than the chunk) is refused: the critic could never be trained on it. One in which fewer than half of the
        windows do gives a warning with the fraction.

        :param dataset: a dict of arrays in the common form of :mod:`sb3_qchunk.datasets` (``observations``,
            ``actions``, ``rewards``, ``terminals`` = episode ends, ``terminated`` = true terminals,
            ``next_observations``), or anything :func:`sb3_qchunk.datasets.load_dataset` reads (an OGBench or
            plain ``.npz`` path, ``"minari:<id>"``)
        :param replace: drop the offline data loaded before instead of appending to it
        :param load_kwargs: passed to :func:`sb3_qchunk.datasets.load_dataset` (e.g. ``task_id``, ``sparse``)
        """
        data = load_dataset(dataset, self.observation_space, self.primitive_action_space, **load_kwargs)
        scaled = dict(data)
        scaled["actions"] = self.scale_primitive_action(data["actions"])
        window = self.critic_chunk_size
        usable, total = usable_windows(np.asarray(data["terminals"]), window)
        if usable == 0:
            raise ValueError(
                f"No window of {self._window_name()}={window} steps in this dataset ({len(data['rewards'])} transitions, "
                f"{total} windows) stays inside one episode: every episode is shorter than the chunk, so the critic "
                f"could never be trained on it. Use a smaller {self._window_name()}."
            )
        if usable < 0.5 * total:
            warnings.warn(
                f"Only {usable} of the {total} windows of {self._window_name()}={window} steps ({usable / total:.0%}) in "
                "this dataset stay inside one episode; the others have no bootstrap target and do not train the critic.",
                stacklevel=2,
            )
        self.replay_buffer.add_offline(scaled, replace=replace)
        if self.verbose >= 1:
            verb = "Appended" if self.replay_buffer.offline_size > len(data["rewards"]) else "Loaded"
            print(
                f"{verb} {len(data['rewards'])} offline transitions ({usable / total:.1%} of the windows usable by the "
                f"critic); the replay buffer holds {self.replay_buffer.offline_size} offline transitions"
            )

    def pretrain(
        self: SelfQC,
        n_updates: int,
        callback: MaybeCallback = None,
        log_interval: int = 1000,
        tb_log_name: str = "QC",
        progress_bar: bool = False,
    ) -> SelfQC:
        """
        Offline gradient steps on the replay buffer (the offline phase of offline-to-online learning).

        Callbacks are called once every ``log_interval`` updates (``n_calls`` counts those blocks; the env is not
        stepped, so ``num_timesteps`` stays where it is); the frequencies of ``EvalCallback`` and
        ``CheckpointCallback`` count offline updates (``offline_updates_done``), checked at those calls. The logger
        dumps at the same rate. Everything logged here (also by callbacks) has the offline updates done as its step,
        in one TensorBoard run ``<tb_log_name>_offline_<k>`` for the whole offline phase; ``learn``'s run
        ``<tb_log_name>_<k>`` has the primitive env steps (``num_timesteps``), as in SB3.

        :param n_updates: number of gradient steps
        :param callback: callback(s) called every ``log_interval`` updates (e.g. an ``EvalCallback``)
        :param log_interval: updates between two logger dumps and callback calls
        :param tb_log_name: name of the TensorBoard run
        :param progress_bar: show a progress bar of the updates
        :return: the trained model
        """
        if self.replay_buffer.num_windows() == 0:
            raise RuntimeError("pretrain() needs data in the replay buffer: call load_dataset() first")
        self._plan_updates(n_updates)
        if not self._custom_logger:
            # one TensorBoard run for the whole offline phase, also when it is split into several calls
            self._logger = utils.configure_logger(
                self.verbose, self.tensorboard_log, tb_log_name + "_offline", reset_num_timesteps=self.offline_updates_done == 0
            )
        logger = self._logger
        self._logger = ClockLogger(logger, lambda: self.offline_updates_done)  # x-axis: offline updates
        try:
            callback = self._init_callback(callback, progress_bar=False, clock=offline_updates_clock)
            callback.on_training_start(locals(), globals())
            done = 0
            with tqdm(total=n_updates, disable=not progress_bar, desc="offline updates", unit="update") as pbar:
                while done < n_updates:
                    block = min(log_interval, n_updates - done)
                    self.train(block, self.batch_size)
                    done += block
                    self.offline_updates_done += block
                    pbar.update(block)
                    self.logger.record("time/offline_updates", self.offline_updates_done)
                    self.logger.dump()
                    callback.update_locals(locals())
                    if not callback.on_step():
                        break
            callback.on_training_end()
        finally:
            self._logger = logger
        return self

    # ----------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------
    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        if self.replay_buffer.num_windows() == 0:
            return
        self.policy.set_training_mode(True)
        self._update_learning_rate([self.actor.optimizer, self.critic.optimizer])
        before = self._training_state()
        # The batches and the noise of several updates are drawn at once (cheaper than one draw per update).
        group = self._updates_per_draw(batch_size)
        update_stats = []
        for first in range(0, gradient_steps, group):
            n_updates = min(group, gradient_steps - first)
            batches = self.replay_buffer.sample_batches(batch_size, n_updates)
            update_stats += [self._update(*inputs) for inputs in zip(batches, self._update_noise(batch_size, n_updates))]
        stats = th.stack(update_stats)
        # One host sync per train() call, not per gradient step.
        values = stats.cpu().numpy()
        if not np.isfinite(values).all():
            self._restore_training_state(before)
            step, column = np.argwhere(~np.isfinite(values))[0]
            raise FloatingPointError(
                f"train/{self.stat_names[column]} became {values[step, column]} at gradient step {self._n_updates + step + 1} "
                f"(update {step + 1} of this train() call). The networks and optimizers were restored to their state "
                f"before the call ({self._n_updates} updates). Check the data (rewards, observations) and the learning rate."
            )
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        for key, value in zip(self.stat_names, values.mean(axis=0)):
            self.logger.record(f"train/{key}", float(value))

    def _training_state(self) -> tuple[list[th.Tensor], list[dict[th.Tensor, dict[str, Any]]]]:
        """
        Copies of every weight of the policy and of both optimizers' state, taken before each ``train`` call so that a
        non-finite statistic can put them back. They go into the buffers of the previous call (one ``_foreach_copy_``,
        no allocation) while the tensors keep their shapes; into new buffers otherwise.
        """
        optimizers = (self.critic.optimizer, self.actor.optimizer)
        with th.no_grad():
            params = [param.detach() for param in self.policy.parameters()]
            sources = params + [
                value for optimizer in optimizers for state in optimizer.state.values() for value in state.values() if isinstance(value, th.Tensor)
            ]
            reusable = len(self._snapshot) == len(sources) and all(
                (buffer.shape, buffer.dtype, buffer.device) == (source.shape, source.dtype, source.device)
                for buffer, source in zip(self._snapshot, sources)
            )
            if reusable:
                th._foreach_copy_(self._snapshot, sources)
            else:
                self._snapshot = [source.clone() for source in sources]
        copies = self._snapshot
        saved = iter(copies[len(params) :])  # in the order the optimizer states were read above
        optimizer_states = [
            {
                param: {key: next(saved) if isinstance(value, th.Tensor) else value for key, value in state.items()}
                for param, state in optimizer.state.items()
            }
            for optimizer in optimizers
        ]
        return copies[: len(params)], optimizer_states

    def _restore_training_state(self, saved: tuple[list[th.Tensor], list[dict[th.Tensor, dict[str, Any]]]]) -> None:
        """Put back what :meth:`_training_state` copied (in place: compiled code keeps seeing the same tensors)."""
        weights, optimizer_states = saved
        with th.no_grad():
            for param, value in zip(self.policy.parameters(), weights):
                param.copy_(value)
            for optimizer, states in zip((self.critic.optimizer, self.actor.optimizer), optimizer_states):
                for param in list(optimizer.state):
                    if param not in states:
                        del optimizer.state[param]
                for param, state in states.items():
                    current = optimizer.state[param]
                    for key, value in state.items():
                        if isinstance(value, th.Tensor) and isinstance(current.get(key), th.Tensor):
                            current[key].copy_(value)
                        else:  # (a copy: the snapshot's buffers are reused by the next call)
                            current[key] = value.clone() if isinstance(value, th.Tensor) else value

    def _chunks(self, replay_data: ChunkReplayBufferSamples) -> th.Tensor:
        """
        The actions the critic sees: the whole window (flattened), or its first action for the n-step ablations.
        The actor and a partial-chunk critic see its first ``chunk_size`` actions.
        """
        if self.action_chunking:
            return replay_data.actions.flatten(1)
        return replay_data.actions[:, 0]

    def _updates_per_draw(self, batch_size: int) -> int:
        """How many updates :meth:`train` draws the batches of at once: up to ``UPDATES_PER_DRAW`` and ``DRAW_BYTES``."""
        return max(1, min(self.UPDATES_PER_DRAW, self.DRAW_BYTES // (batch_size * self.replay_buffer.window_nbytes())))

    def _update_noise(self, batch_size: int, n_updates: int = 1) -> list[tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]]:
        """
        All the randomness of ``n_updates`` updates (one draw of each kind for all of them), drawn eagerly so that
        the compiled and the eager loss see the same numbers (and inductor's slow CPU randn stays out of the
        graph): per update, the critic target's sampling noise, the flow-matching noise x0 and times t, and the
        distillation noise.
        """
        chunk_dim, n_rows = self.policy.chunk_dim, n_updates * batch_size
        target_noise = self.policy.sampling_noise(n_rows)
        x0 = th.randn(n_rows, chunk_dim, device=self.device)
        t = th.rand(n_rows, 1, device=self.device)
        distill_noise = th.randn(n_rows, chunk_dim, device=self.device)
        return list(zip(*(noise.chunk(n_updates) for noise in (target_noise, x0, t, distill_noise))))

    def _losses(
        self,
        observations: th.Tensor,
        next_observations: th.Tensor,
        chunks: th.Tensor,
        rewards: th.Tensor,
        masks: th.Tensor,
        valid: th.Tensor,
        target_noise: th.Tensor,
        x0: th.Tensor,
        t: th.Tensor,
        distill_noise: th.Tensor,
        sampling_bf16: bool,
    ) -> tuple[th.Tensor, th.Tensor]:
        """
        The critic and actor losses of one update, as one differentiable sum, and their statistics. A pure
        function of the networks and its inputs (no optimizer, no in-place change), so ``compile_update`` can
        compile its forward and backward as one graph.

        Like the reference implementation, both losses use the networks as they are before this update: the
        actor's Q term sees the critic before its step, and reaches only the actor's weights (the critic's enter
        it detached), so the gradient of the sum is each network's own gradient.

        :param sampling_bf16: run the no-gradient sampling in bf16 autocast (``policy.sampling_bf16``; decided
            outside, where the device can be probed)
        :return: (the sum of the losses, the stacked statistics of :attr:`stat_names`)
        """
        policy = self.policy
        batch_size = chunks.shape[0]
        # Critic: backup over the window (h steps; H with decoupled lengths). Best-of-N picks a' with the online
        # (partial-chunk) critic, its target network values it.
        with th.no_grad():
            with policy.bf16_autocast(sampling_bf16):
                next_chunks = policy.sample_chunks_from_noise(next_observations, target_noise).float()
            next_q = aggregate_q(self.critic_target(next_observations, next_chunks), self.q_aggregation)
            target_q = chunked_critic_target(rewards, masks, next_q, self.gamma, self.critic_chunk_size)
        td_critic = self.long_critic if self.long_critic is not None else self.critic
        q_values = td_critic(observations, chunks)  # (K, B)
        # Windows whose episode ended before their last step have no valid bootstrap: they do not train the critic.
        critic_loss = ((q_values - target_q) ** 2 * valid[:, -1]).mean()
        partial_critic_loss = None
        if self.long_critic is not None:
            # The policy's part of each window; the partial-chunk critic is distilled from the long one on it.
            chunks = chunks[:, : self.policy.chunk_dim]
            valid_window, valid = valid[:, -1], valid[:, : self.chunk_size]
            distill_target = aggregate_q(q_values.detach(), self.q_aggregation)
            partial_q = self.critic(observations, chunks)
            partial_critic_loss = (expectile_loss(distill_target - partial_q, self.partial_critic_expectile) * valid_window).mean()

        # Actor: flow-matching BC on the data's chunks, masked after an episode's end.
        actor_features = self.actor.extract_features(observations, self.actor.features_extractor)
        x_t = (1.0 - t) * x0 + t * chunks
        # (.float(): network outputs are bf16 under training_precision="bfloat16"; the loss arithmetic stays float32)
        flow_error = (self.actor.flow(actor_features, x_t, t).float() - (chunks - x0)) ** 2
        if self.action_chunking:
            bc_flow_loss = (flow_error.view(batch_size, self.chunk_size, -1) * valid.unsqueeze(-1)).mean()
        else:
            bc_flow_loss = flow_error.mean()
        actor_loss = bc_flow_loss
        distill_loss = th.zeros((), device=chunks.device)
        if self.actor_type == "distill":
            with th.no_grad(), policy.bf16_autocast(sampling_bf16):
                target_flow_chunks = self.actor.flow_actions(actor_features, distill_noise).float()
            onestep_chunks = self.actor.onestep_actions(actor_features, distill_noise).float()
            distill_loss = ((onestep_chunks - target_flow_chunks) ** 2).mean()
            frozen_critic = {name: param.detach() for name, param in self.critic.named_parameters()}
            q_actor = th.func.functional_call(self.critic, frozen_critic, (observations, onestep_chunks.clamp(-1.0, 1.0)))
            actor_loss = bc_flow_loss + self.alpha * distill_loss - q_actor.mean()
        q_detached = q_values.detach()
        stats = [
            critic_loss.detach(),
            actor_loss.detach(),
            bc_flow_loss.detach(),
            distill_loss.detach(),
            q_detached.mean(),
            q_detached.max(),
            q_detached.min(),
        ]
        if partial_critic_loss is None:
            return critic_loss + actor_loss, th.stack(stats)
        return critic_loss + partial_critic_loss + actor_loss, th.stack([*stats, partial_critic_loss.detach()])

    def _train_step(self, replay_data: ChunkReplayBufferSamples) -> dict[str, th.Tensor]:
        """One gradient step of the critic and the actor on ``replay_data``; its statistics by name."""
        return dict(zip(self.stat_names, self._update(replay_data)))

    def _update(
        self, replay_data: ChunkReplayBufferSamples, noise: tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor] | None = None
    ) -> th.Tensor:
        """
        One gradient step of the critic and the actor, then the Polyak update of the target critic.

        :param replay_data: the batch
        :param noise: the update's randomness (:meth:`_update_noise`); None: drawn here
        """
        batch_size = replay_data.rewards.shape[0]
        inputs = (
            replay_data.observations,
            replay_data.next_observations,
            self._chunks(replay_data),
            replay_data.rewards,
            replay_data.masks,
            replay_data.valid,
            *(noise if noise is not None else self._update_noise(batch_size)[0]),
            self.policy.sampling_bf16(batch_size),
        )
        if self._compiling:
            if self._compiled_update is None:
                self._compiled_update = CompiledUpdate(self, self._compile_mode(), self.policy.inductor_options())
            return self._compiled_update(inputs)
        with self.policy.training_autocast():
            loss, stats = self._losses(*inputs)
        self._optimizer_step(loss)
        return stats

    def _optimizer_step(self, loss: th.Tensor) -> None:
        """Back-propagate the summed losses, step both optimizers, then Polyak-average the target critic."""
        self.critic.optimizer.zero_grad()
        self.actor.optimizer.zero_grad()
        loss.backward()
        self.critic.optimizer.step()
        self.actor.optimizer.step()
        with th.no_grad():  # all tensors at once
            th._foreach_lerp_(self._target_params, self._online_params, self.tau)

    def _compile_mode(self) -> str:
        """
        How ``compile_update=True`` compiles: QC-FQL's whole update as one graph where its optimizers allow it (it ran
        1.05-1.09x the updates/s of two graphs on a 2-core CPU), best-of-N's losses as two graphs (one graph ran
        0.90-0.97x as fast for it).
        """
        if self.compile_update in COMPILE_MODES:
            return self.compile_update  # type: ignore[return-value]
        return "one_graph" if self.actor_type == "distill" and supports_one_graph(self) else "two_graphs"

    def _plan_updates(self, n_updates: int) -> None:
        """With ``compile_update="auto"``: compile from now on if a run plans ``AUTO_COMPILE_UPDATES`` updates or more."""
        if self.compile_update == "auto" and n_updates >= self.AUTO_COMPILE_UPDATES:
            self._compiling = True

    # ----------------------------------------------------------------------------------------------
    # Collecting experience
    # ----------------------------------------------------------------------------------------------
    def _sample_action(
        self,
        learning_starts: int,
        action_noise: ActionNoise | None = None,
        n_envs: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Warm-up with random chunks, unless the policy was already trained (e.g. offline pre-training).
        if self.num_timesteps < learning_starts and self._n_updates == 0:
            action = np.array([self.action_space.sample() for _ in range(n_envs)])
        else:
            assert self._last_obs is not None, "self._last_obs was not set"
            action, _ = self.predict(self._last_obs, deterministic=False)
        return action, self.policy.scale_action(action)

    def collect_rollouts(  # type: ignore[override]
        self,
        env: VecEnv,
        callback: BaseCallback,
        train_freq: TrainFreq,
        replay_buffer: ReplayBuffer,
        action_noise: ActionNoise | None = None,
        learning_starts: int = 0,
        log_interval: int | None = None,
    ) -> RolloutReturn:
        """
        Run chunks in the env until ``train_freq`` primitive steps are collected, storing every primitive
        transition the chunks really ran (from the wrapper's ``info["transitions"]``).

        What ran is stored before the callback is called, so a callback that stops training leaves the buffer,
        ``num_timesteps`` and the last observation in step with the env (``learn(..., reset_num_timesteps=False)``
        goes on from there). If the env raises, the steps that ran are stored as far as the wrapper kept them,
        every stored episode is ended and the next ``learn`` resets the env. NaN/inf rewards or observations
        raise a ``ValueError`` before they are stored.

        :return: primitive steps and episodes collected, and whether to continue training
        """
        self.policy.set_training_mode(False)
        num_collected_steps, num_collected_episodes = 0, 0
        assert isinstance(env, VecEnv), "You must pass a VecEnv"
        callback.on_rollout_start()
        while should_collect_more_steps(train_freq, num_collected_steps, num_collected_episodes):
            actions, _ = self._sample_action(learning_starts, None, env.num_envs)
            try:
                new_obs, rewards, dones, infos = env.step(actions)
            except BaseException:
                self._store_interrupted_step(env)
                raise
            self._chunks_returned += 1
            try:
                for env_idx, info in enumerate(infos):
                    check_finite_transitions(info["transitions"], env_idx, self.num_timesteps + 1)
                check_finite_observations(new_obs, f"after primitive step {self.num_timesteps + 1} (a reset observation)")
            except ValueError:
                self._end_stored_episodes()
                raise
            for env_idx, info in enumerate(infos):
                self._store_transitions(info["transitions"], env_idx)
            steps = int(sum(info["chunk_steps"] for info in infos))
            num_collected_steps += steps
            self._last_obs = new_obs
            self._update_info_buffer(infos, dones)
            self._update_current_progress_remaining(self.num_timesteps, self._total_timesteps)
            self._on_step()
            for done in dones:
                if done:
                    num_collected_episodes += 1
                    self._episode_num += 1
                    if log_interval is not None and self._episode_num % log_interval == 0:
                        self.dump_logs()
            if num_collected_episodes > 0:
                self._check_online_windows()

            callback.update_locals(locals())
            if not callback.on_step():
                return RolloutReturn(num_collected_steps, num_collected_episodes, continue_training=False)
        callback.on_rollout_end()
        return RolloutReturn(num_collected_steps, num_collected_episodes, continue_training=True)

    def _store_transitions(self, transitions: dict[str, Any], env_idx: int) -> None:
        """Store the primitive transitions of one chunk (actions scaled to [-1, 1]) and count them."""
        transitions = dict(transitions)
        transitions["action"] = self.scale_primitive_action(transitions["action"])
        self.replay_buffer.add(transitions, env_idx)
        self.num_timesteps += len(transitions["reward"])

    def _store_interrupted_step(self, env: VecEnv) -> None:
        """
        ``env.step`` raised: store what ran without being returned (the whole chunk of an env that finished its
        chunk before another one raised, the first steps of the chunk that was interrupted), then end every stored
        episode: the envs are reset at the next ``learn``.
        """
        try:
            completed = env.get_attr("chunks_completed")
            last = env.get_attr("last_transitions")
            partial = env.get_attr("interrupted_transitions")
        except Exception:  # e.g. a subprocess that died with the exception: nothing can be read back from it
            completed = None
        if completed is not None:
            for env_idx in range(env.num_envs):
                ran = last[env_idx] if completed[env_idx] > self._chunks_returned[env_idx] else partial[env_idx]
                if ran is not None and len(ran["reward"]) > 0:
                    try:
                        check_finite_transitions(ran, env_idx, self.num_timesteps + 1)
                    except ValueError:
                        continue
                    self._store_transitions(ran, env_idx)
        self._end_stored_episodes()

    def _end_stored_episodes(self) -> None:
        """Mark the last stored step of every env as an episode end; the next ``learn`` resets the envs."""
        self.replay_buffer.mark_episode_ends()
        self._last_obs = None  # type: ignore[assignment]

    def _check_online_windows(self) -> None:
        """Once, when online episodes have ended: warn if most online windows cannot train the critic."""
        if self._online_windows_checked or self.replay_buffer.online_window_count() == 0:
            return
        self._online_windows_checked = True
        usable, total = self.replay_buffer.usable_windows(online=True)
        if usable < 0.5 * total:
            warnings.warn(
                f"Only {usable} of the {total} online windows of {self.critic_chunk_size} steps ({usable / total:.0%}) "
                "stay inside one episode: the others have no bootstrap target and do not train the critic. "
                f"The episodes are shorter than {self._window_name()}={self.critic_chunk_size}; use a smaller "
                f"{self._window_name()}.",
                stacklevel=3,
            )

    def _init_callback(
        self,
        callback: MaybeCallback,
        progress_bar: bool = False,
        clock: Callable[[BaseAlgorithm], int] = primitive_steps_clock,
    ) -> BaseCallback:
        """
        SB3's callback setup, with the frequencies of ``EvalCallback`` (``eval_freq``) and ``CheckpointCallback``
        (``save_freq``) counted on ``clock`` (primitive steps of one env in ``learn``, offline updates in
        ``pretrain``) instead of calls, and the progress bar advanced by primitive steps. An ``EvalCallback``'s env
        must be chunk-level with ``Monitor`` inside (see :func:`~sb3_qchunk.common.env_util.check_eval_env`).
        """
        if isinstance(callback, list):
            callback = CallbackList(callback)
        if not isinstance(callback, BaseCallback):
            callback = ConvertCallback(callback)
        callback = on_clock(callback, clock)
        for eval_callback in eval_callbacks(callback):
            check_eval_env(eval_callback.eval_env, self.env_chunk_size)
        if progress_bar:
            callback = CallbackList([callback, ChunkProgressBarCallback()])
        callback.init_callback(self)
        return callback

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        # The env is about to be reset: end the stored episodes so no window bridges the two.
        if self.replay_buffer is not None and (reset_num_timesteps or self._last_obs is None):
            self.replay_buffer.mark_episode_ends()
        total_timesteps, callback = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        assert self.env is not None
        check_finite_observations(self._last_obs, "at reset")
        # Chunks each env has run: what env.step returned is counted from here (see _store_interrupted_step).
        self._chunks_returned = np.array(self.env.get_attr("chunks_completed"))
        # A rollout runs whole chunks: max(train_freq, chunk) steps, then gradient_steps updates (-1: one per step).
        steps_per_update = max(self.train_freq.frequency, self.env_chunk_size) / self.gradient_steps if self.gradient_steps > 0 else 1
        self._plan_updates(int((total_timesteps - max(self.num_timesteps, self.learning_starts)) / steps_per_update))
        if total_timesteps <= self.learning_starts:
            warnings.warn(
                f"This learn() call ends at {total_timesteps} primitive steps but training starts after "
                f"learning_starts={self.learning_starts} steps: it will do no gradient step. Lower learning_starts "
                "(e.g. after pretrain(), or for short runs) or ask for more steps.",
                stacklevel=4,
            )
        return total_timesteps, callback

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        The chunk to run from ``observation``: ``chunk_size`` primitive actions flattened, shape ``(h * A,)``
        (``(n_envs, h * A)`` for a batch), in the env's action bounds, for a chunk-level env
        (:class:`~sb3_qchunk.ChunkedActionWrapper`) to execute open-loop. A primitive-step env would read only
        part of it: step such an env through the wrapper (``sb3_qchunk.common.env_util.wrap_chunked``), evaluate
        with :func:`~sb3_qchunk.common.evaluation.evaluate_success`, which wraps a plain env itself, or use
        :class:`~sb3_qchunk.common.execution.ChunkExecutor`, a primitive-step policy made of this one. SB3's
        ``evaluate_policy`` needs the chunk-level env or the executor: it gives ``predict`` no access to the env,
        so it cannot tell the two apart (``learn`` checks an ``EvalCallback``'s env). With ``action_chunking=False`` a chunk has one action.

        :param observation: the observation(s)
        :param state: unused (no recurrent state), kept for SB3's signature
        :param episode_start: unused, kept for SB3's signature
        :param deterministic: False (as in training and in the paper's evaluations): chunks from fresh flow noise (best-of-N
            or the one-step actor), drawn from torch's global RNG. True: from a fixed noise draw (the same for every
            observation and call, its own generator), so the same observation gives the same chunk, before and after
            save/load, and the global RNG is not used
        :return: the chunk(s) and None
        """
        return super().predict(observation, state, episode_start, deterministic)

    def learn(
        self: SelfQC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "QC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfQC:
        """
        Learn online for ``total_timesteps`` primitive env steps (chunks run open-loop, every primitive transition
        stored), after the ``offline_updates`` still to do (:meth:`pretrain`).

        Callbacks: ``on_step`` is called once per chunk (``n_calls`` counts chunks, ``num_timesteps`` primitive
        steps). The frequencies of SB3's ``EvalCallback`` (``eval_freq``) and ``CheckpointCallback`` (``save_freq``)
        count primitive steps of one env, as SB3's count ``env.step`` calls of one env: they act at the first
        chunk end at or after each multiple (at most once per chunk). An ``EvalCallback``'s env must be chunk-level
        with ``Monitor`` inside (:func:`~sb3_qchunk.common.env_util.wrap_chunked` makes it so), so that it reports
        primitive episode lengths and undiscounted returns.

        :param total_timesteps: primitive env steps to run (all envs together)
        :param callback: callback(s) called after every chunk
        :param log_interval: episodes between two logger dumps
        :param tb_log_name: name of the TensorBoard run
        :param reset_num_timesteps: start the step count (and the envs) anew; False goes on from the last call
        :param progress_bar: show a progress bar of the primitive steps
        :return: the trained model
        """
        remaining = self.offline_updates - self.offline_updates_done
        if remaining > 0:
            self.pretrain(remaining, tb_log_name=tb_log_name, progress_bar=progress_bar)
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    # ----------------------------------------------------------------------------------------------
    # Saving and loading
    # ----------------------------------------------------------------------------------------------
    def load_replay_buffer(self, path: Any, truncate_last_traj: bool = True) -> None:
        """
        Load a replay buffer saved with :meth:`save_replay_buffer`. It must fit the model: the same observation
        space, primitive action space (bounds included: the buffer stores actions scaled to them), number of envs
        and chunk size; this model's ``gamma`` and ``offline_fraction`` govern the sampling from then on.

        :param path: path to the pickled replay buffer
        :param truncate_last_traj: mark the last stored step of every env as an episode end
            (the next ``learn`` starts a new episode)
        :raises ValueError: naming what does not fit
        """
        buffer = load_from_pkl(path, self.verbose)
        if not isinstance(buffer, ChunkReplayBuffer):
            raise TypeError(f"Expected a ChunkReplayBuffer, got {type(buffer).__name__}")
        checks = (
            ("chunk_size (window length)", buffer.chunk_size, self.critic_chunk_size),
            ("observation space", buffer.observation_space, self.observation_space),
            ("primitive action space", buffer.action_space, self.primitive_action_space),
            ("n_envs", buffer.n_envs, self.n_envs),
        )
        for name, found, expected in checks:
            if found != expected:
                raise ValueError(f"The replay buffer in {path} does not fit this model: its {name} is {found}, the model's is {expected}")
        buffer.gamma = self.gamma
        buffer.offline_fraction = self.offline_fraction
        if truncate_last_traj:
            buffer.mark_episode_ends()
        buffer.device = self.device
        self.replay_buffer = buffer

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfQC],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | str | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfQC:
        """
        Load a QC model saved with ``save``; a plain ``env`` is wrapped into chunks of the saved size.
        See ``BaseAlgorithm.load`` for the arguments.
        """
        if env is not None:
            data, _, _ = load_from_zip_file(path, device="cpu", custom_objects=custom_objects)
            assert data is not None, "No data found in the saved file"
            chunk = data["chunk_size"] if data.get("action_chunking", True) else 1
            env = wrap_chunked(env, chunk, data["gamma"])
        return super().load(
            path,
            env=env,  # type: ignore[arg-type]
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )

    def _excluded_save_params(self) -> list[str]:
        # The offline dataset lives in the replay buffer (see save_replay_buffer), not in the model file.
        return super()._excluded_save_params() + [
            "actor",
            "critic",
            "critic_target",
            "long_critic",
            "offline_dataset",
            "_online_params",
            "_target_params",
            "_compiled_update",
            "_chunks_returned",
            "_snapshot",
        ]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "actor.optimizer", "critic.optimizer"], []

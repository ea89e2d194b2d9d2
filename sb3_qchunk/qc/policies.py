"""Policies for QC: a flow-matching actor over action chunks, an ensemble of chunk critics, and an
optional one-step (distilled) actor."""

import contextlib
from collections.abc import Callable
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BaseModel, BasePolicy
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    create_mlp,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from torch.nn import functional as F

from sb3_qchunk.common.precision import (
    AUTO_BF16_MIN_MACS,
    AUTO_BF16_MIN_MACS_NARROW,
    AUTO_BF16_WIDE,
    ONEDNN_MIN_ROWS,
    SAMPLING_PRECISIONS,
    TRAINING_PRECISIONS,
    autocast_matmul_dtype,
    bf16_autocast,
    compile_options,
    has_fast_bf16,
    inductor_cpu_simdlen,
    onednn_disabled,
)
from sb3_qchunk.common.torch_layers import EnsembleLayerNorm, EnsembleLinear, direct_call, fused_linear_gelu_dtype, linear_gelu

ACTOR_TYPES = ("best_of_n", "distill")
Q_AGGREGATIONS = ("mean", "min")
#: seed of the fixed noise of deterministic chunks (``predict(deterministic=True)``)
DETERMINISTIC_NOISE_SEED = 0


class FlowVelocityField(nn.Module):
    """
    The velocity field v(s, x, t) of a flow-matching policy over (flattened) action chunks.

    The first layer is split into an observation part and an (x, t) part: the sum equals one linear layer
    over the concatenation, but the observation's share is computed once per observation and reused for
    every sample and every Euler step. In large no-gradient batches on a CPU (best-of-N's candidates at the
    paper's sizes), each hidden Linear+GELU runs as one oneDNN matmul with a GELU post-op
    (:func:`sb3_qchunk.common.torch_layers.fused_linear_gelu_dtype`).

    :param features_dim: size of the observation features
    :param action_dim: size of the flattened chunk
    :param net_arch: hidden layer sizes
    :param activation_fn: activation function
    :param layer_norm: LayerNorm after each hidden activation
    """

    def __init__(
        self,
        features_dim: int,
        action_dim: int,
        net_arch: list[int],
        activation_fn: type[nn.Module] = nn.GELU,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        assert len(net_arch) > 0, "The flow actor needs at least one hidden layer"
        self.obs_in = nn.Linear(features_dim, net_arch[0])
        self.xt_in = nn.Linear(action_dim + 1, net_arch[0], bias=False)
        layers: list[nn.Module] = [activation_fn()]
        if layer_norm:
            layers.append(nn.LayerNorm(net_arch[0]))
        for in_size, out_size in zip(net_arch[:-1], net_arch[1:]):
            layers += [nn.Linear(in_size, out_size), activation_fn()]
            if layer_norm:
                layers.append(nn.LayerNorm(out_size))
        layers.append(nn.Linear(net_arch[-1], action_dim))
        self.body = nn.Sequential(*layers)

    def embed_obs(self, features: th.Tensor) -> th.Tensor:
        """The observation's share of the first layer."""
        return self.obs_in(features)

    def velocity(self, obs_embedding: th.Tensor, x: th.Tensor, t: th.Tensor) -> th.Tensor:
        """
        :param obs_embedding: ``embed_obs(features)``, broadcastable to x's leading dims
        :param x: points on the flow path (..., action_dim)
        :param t: times (..., 1)
        """
        hidden = obs_embedding + self.xt_in(th.cat([x, t], dim=-1))
        return self._run_body(hidden, self._body_plan(hidden))

    def _body_plan(self, hidden: th.Tensor) -> list[Callable[[th.Tensor], th.Tensor] | tuple[nn.Linear, th.dtype]]:
        """
        How the layers after the first one's linear part run for inputs shaped like ``hidden`` (its pre-activation),
        in the current gradient and autocast mode: each layer as itself (:func:`~sb3_qchunk.common.torch_layers.direct_call`),
        except a Linear+GELU pair that runs as one :func:`~sb3_qchunk.common.torch_layers.linear_gelu` call at these
        sizes, given as (the Linear's weight, its bias) in the call's precision. Decided once for all Euler steps of an
        integration, weights cast once for all of them under autocast.
        """
        rows = hidden.numel() // hidden.shape[-1]
        cast = autocast_matmul_dtype(hidden.device.type)
        layers, plan, i = list(self.body), [], 0
        while i < len(layers):
            dtype = (
                fused_linear_gelu_dtype(rows, hidden.dtype, hidden.device, layers[i], layers[i + 1]) if i + 1 < len(layers) else None
            )
            if dtype is None:
                plan.append(direct_call(layers[i], cast))
            else:
                plan.append((layers[i].weight.to(dtype), layers[i].bias.to(dtype)))
            i += 1 if dtype is None else 2
        return plan

    @staticmethod
    def _run_body(hidden: th.Tensor, plan: list[Callable[[th.Tensor], th.Tensor] | tuple[nn.Linear, th.dtype]]) -> th.Tensor:
        """The layers of ``plan`` (:meth:`_body_plan`) on the first layer's pre-activation ``hidden``."""
        for layer in plan:
            if isinstance(layer, tuple):  # large no-gradient batches: one oneDNN call
                weight, bias = layer
                hidden = linear_gelu(hidden.to(weight.dtype), weight, bias)
            else:
                hidden = layer(hidden)
        return hidden

    def forward(self, features: th.Tensor, x: th.Tensor, t: th.Tensor) -> th.Tensor:
        return self.velocity(self.embed_obs(features), x, t)

    def integrate(self, obs_embedding: th.Tensor, noise: th.Tensor, flow_steps: int) -> th.Tensor:
        """
        Euler integration of the flow from noise (t=0) to actions (t=1), clipped to [-1, 1].

        Every row of a step shares its time t = i / flow_steps, so the first layer's (x, t) part is x's share plus
        t times the time's column of the weight, added to the observation's share once per step: the same sum as
        :meth:`velocity`'s, without a column of times to build and concatenate at each step.

        :param obs_embedding: (B, 1, hidden) or (B, hidden), broadcast over samples
        :param noise: x0 ~ N(0, I), shape (B, N, action_dim) or (B, action_dim)
        :param flow_steps: number of Euler steps
        """
        action_dim = noise.shape[-1]
        x_weight = self.xt_in.weight[:, :action_dim]
        cast = autocast_matmul_dtype(noise.device.type)
        x_weight = x_weight if cast is None else x_weight.to(cast)
        t_weight = self.xt_in.weight[:, action_dim].to(obs_embedding.dtype)  # bf16 under autocast, as obs_in's output
        x, plan = noise, None
        for i in range(flow_steps):
            hidden = F.linear(x, x_weight) + th.add(obs_embedding, t_weight, alpha=i / flow_steps)
            plan = self._body_plan(hidden) if plan is None else plan
            x = th.add(x, self._run_body(hidden, plan), alpha=1.0 / flow_steps)
        return x.clamp(-1.0, 1.0)


class FlowActor(BaseModel):
    """
    The actor of QC: a flow-matching behaviour-cloning model over chunks, and for ``actor_type="distill"``
    a one-step policy mu(s, z) distilled from it (QC-FQL).

    :param observation_space: observation space
    :param action_space: the (chunk) action space
    :param net_arch: hidden layer sizes
    :param features_extractor: network that turns observations into features
    :param features_dim: size of the features
    :param activation_fn: activation function
    :param layer_norm: LayerNorm in the actor networks
    :param actor_type: "best_of_n" (QC) or "distill" (QC-FQL)
    :param flow_steps: Euler steps of the flow's integration
    :param normalize_images: whether to divide images by 255
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        activation_fn: type[nn.Module] = nn.GELU,
        layer_norm: bool = False,
        actor_type: str = "best_of_n",
        flow_steps: int = 10,
        normalize_images: bool = True,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            features_extractor=features_extractor,
            normalize_images=normalize_images,
        )
        action_dim = get_action_dim(action_space)
        self.flow_steps = flow_steps
        self.flow = FlowVelocityField(features_dim, action_dim, net_arch, activation_fn, layer_norm)
        self.onestep: nn.Module | None = None
        if actor_type == "distill":
            layers = create_mlp(features_dim + action_dim, action_dim, net_arch, activation_fn)
            self.onestep = nn.Sequential(*layers)

    def flow_actions(self, features: th.Tensor, noise: th.Tensor) -> th.Tensor:
        """
        Chunks of the BC flow for the given noise, in [-1, 1].

        :param features: (B, features_dim) observation features
        :param noise: x0 ~ N(0, I), (B, D) or (B, N, D) for N chunks per observation
        :return: chunks of the noise's shape
        """
        embedding = self.flow.embed_obs(features)
        if noise.dim() == 3:
            embedding = embedding.unsqueeze(1)
        return self.flow.integrate(embedding, noise, self.flow_steps)

    def onestep_actions(self, features: th.Tensor, noise: th.Tensor) -> th.Tensor:
        """Unclipped chunks of the distilled one-step actor mu(s, z) (``actor_type="distill"``), (B, D)."""
        assert self.onestep is not None, "The one-step actor exists only for actor_type='distill'"
        return self.onestep(th.cat([features, noise], dim=-1))

    def best_of_n(
        self, features: th.Tensor, critic_features: th.Tensor, critic: "EnsembleCritic", noise: th.Tensor, q_aggregation: str
    ) -> th.Tensor:
        """
        Turn N noise draws per observation into flow chunks and keep the one ``critic`` values most (QC's actor).

        :param features: (B, features_dim) the actor's observation features
        :param critic_features: (B, features_dim) the critic's observation features
        :param critic: the critic that ranks the candidates
        :param noise: (B, N, D) standard normal noise
        :param q_aggregation: "mean" or "min" over the critic ensemble
        :return: (B, D) chunks in [-1, 1]
        """
        candidates = self.flow_actions(features, noise)  # (B, N, D)
        q_values = aggregate_q(critic.q_from_features(critic_features, candidates), q_aggregation)  # (B, N)
        best = q_values.argmax(dim=1)
        return candidates[th.arange(candidates.shape[0], device=candidates.device), best]


class EnsembleCritic(BaseModel):
    """
    K critics Q_k(s, chunk) evaluated as one batched network.

    :param observation_space: observation space
    :param action_space: the (chunk) action space
    :param net_arch: hidden layer sizes
    :param features_extractor: network that turns observations into features
    :param features_dim: size of the features
    :param activation_fn: activation function
    :param n_critics: ensemble size K
    :param layer_norm: LayerNorm after each hidden activation (the paper's default)
    :param normalize_images: whether to divide images by 255
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        activation_fn: type[nn.Module] = nn.GELU,
        n_critics: int = 2,
        layer_norm: bool = True,
        normalize_images: bool = True,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            features_extractor=features_extractor,
            normalize_images=normalize_images,
        )
        assert len(net_arch) > 0, "The critic needs at least one hidden layer"
        action_dim = get_action_dim(action_space)
        self.n_critics = n_critics
        # The first layer is split like the actor's so the observation's share can be reused across samples.
        self.obs_in = EnsembleLinear(n_critics, features_dim, net_arch[0])
        self.action_in = EnsembleLinear(n_critics, action_dim, net_arch[0], bias=False)
        layers: list[nn.Module] = [activation_fn()]
        if layer_norm:
            layers.append(EnsembleLayerNorm(n_critics, net_arch[0]))
        for in_size, out_size in zip(net_arch[:-1], net_arch[1:]):
            layers += [EnsembleLinear(n_critics, in_size, out_size), activation_fn()]
            if layer_norm:
                layers.append(EnsembleLayerNorm(n_critics, out_size))
        layers.append(EnsembleLinear(n_critics, net_arch[-1], 1))
        self.body = nn.Sequential(*layers)

    def q_from_features(self, features: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """
        :param features: (B, features_dim)
        :param actions: (B, action_dim) or (B, N, action_dim) for N candidate chunks per observation
        :return: Q values, (K, B) or (K, B, N)
        """
        batch_shape = actions.shape[:-1]
        obs_part = self.obs_in(features)  # (K, B, H)
        action_part = self.action_in(actions.reshape(-1, actions.shape[-1]))  # (K, B*N, H)
        if actions.dim() == 3:
            hidden = (action_part.view(self.n_critics, *batch_shape, -1) + obs_part.unsqueeze(2)).flatten(1, 2)
        else:
            hidden = action_part + obs_part
        *hidden_layers, output_layer = map(direct_call, self.body)  # (slicing the Sequential would build a new one)
        for layer in hidden_layers:
            hidden = layer(hidden)
        # The output layer runs in float32 even under bf16 autocast: bf16 keeps ~3 significant digits, too few
        # to rank best-of-N candidates whose values differ in the third digit (Q ~ -50 rounds to steps of 0.25).
        with bf16_autocast(hidden.device.type, enabled=False):
            q_values = output_layer(hidden.float())
        return q_values.view(self.n_critics, *batch_shape)

    def forward(self, obs: PyTorchObs, actions: th.Tensor) -> th.Tensor:
        return self.q_from_features(self.extract_features(obs, self.features_extractor), actions)


def aggregate_q(q_values: th.Tensor, q_aggregation: str) -> th.Tensor:
    """Aggregate an ensemble's Q values (first dimension) by mean or min."""
    return q_values.mean(dim=0) if q_aggregation == "mean" else q_values.min(dim=0).values


class QCPolicy(BasePolicy):
    """
    Policy class for QC: flow actor (+ one-step actor for "distill"), ensemble critic and target critic.

    ``predict`` returns a whole chunk: for "best_of_n", ``num_samples`` chunks are drawn from the flow and the
    one with the highest aggregated critic value is kept; for "distill", the one-step actor maps one noise
    sample to a chunk. Both draw fresh noise from torch's global RNG (the paper acts this way at evaluation too);
    ``deterministic=True`` uses a fixed noise draw instead (:meth:`fixed_noise`), so an observation always gets
    the same chunk.

    :param observation_space: observation space
    :param action_space: the chunk action space (Box)
    :param lr_schedule: learning rate schedule
    :param net_arch: hidden sizes, a list for both networks or ``dict(pi=[...], qf=[...])``
    :param activation_fn: activation function
    :param actor_type: "best_of_n" (QC) or "distill" (QC-FQL)
    :param num_samples: N, chunks sampled per observation for best-of-N
    :param flow_steps: Euler steps of the flow
    :param q_aggregation: "mean" or "min" over the critic ensemble
    :param n_critics: number of critics K
    :param long_critic_action_space: the action space of a long-chunk critic (decoupled chunk lengths: chunks of
        the algorithm's ``critic_chunk_size`` actions, flattened), built beside the critic and stepped by the critic's
        optimizer; None (default): no long critic
    :param sampling_precision: precision of the no-gradient sampling path (flow integration of the N
        candidate chunks, their critic scores, the distillation target): "bfloat16" (autocast; master weights,
        losses and gradients stay float32), "float32", or "auto" = bfloat16 where bf16 matmuls are faster than
        float32 on the device (:func:`has_fast_bf16`) and one call of the widest layer has enough multiply-adds to
        pay for the casts (:meth:`QCPolicy.sampling_bf16`), float32 elsewhere
    :param training_precision: precision of the gradient path (the losses' forward and backward): "float32"
        (default), or "bfloat16" for mixed precision: bf16 autocast over the networks, with float32 master weights,
        optimizer state, loss arithmetic and critic output layer. Opt-in: it changes the numerics of learning;
        worth it where matmuls dominate (4x512 QC-FQL on a CPU with AMX: 1.6x the updates/s; 256x256: 1.1x)
    :param compile_sampling: ``torch.compile`` :meth:`sample_chunks`, the action choice (``predict``): best-of-N
        chunk choice 1.3x (4x512, N=32) to 2x (256x256, N=8) faster on a 2-core CPU, for up to tens of seconds
        of compilation at the first call on a machine; QC-FQL's one-step choice (a few layers on one row) gains
        little from it. The update's sampling is compiled with the rest of the update by the algorithm's
        ``compile_update``. Compiled and eager code draw the same noise, so they agree for a seed
    :param compile_options: inductor options of ``torch.compile`` for ``compile_sampling`` and the algorithm's
        ``compile_update``; None for the defaults chosen by measurement
        (:func:`sb3_qchunk.common.precision.compile_options`). On a CPU, ``cpp.simdlen`` is added where they do not
        set it (:meth:`inductor_options`)
    :param critic_layer_norm: LayerNorm in the critics
    :param actor_layer_norm: LayerNorm in the actors
    :param features_extractor_class: features extractor class
    :param features_extractor_kwargs: its keyword arguments
    :param normalize_images: whether to divide images by 255
    :param optimizer_class: optimizer class
    :param optimizer_kwargs: its keyword arguments (besides the learning rate); None gives Adam and AdamW
        ``fused=True`` (one kernel for all parameters)
    """

    actor: FlowActor
    critic: EnsembleCritic
    critic_target: EnsembleCritic
    long_critic: EnsembleCritic | None

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.GELU,
        actor_type: str = "best_of_n",
        num_samples: int = 32,
        flow_steps: int = 10,
        q_aggregation: str = "mean",
        n_critics: int = 2,
        long_critic_action_space: spaces.Box | None = None,
        sampling_precision: str = "auto",
        training_precision: str = "float32",
        compile_sampling: bool = False,
        compile_options: dict[str, Any] | None = None,
        critic_layer_norm: bool = True,
        actor_layer_norm: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if optimizer_kwargs is None and optimizer_class in (th.optim.Adam, th.optim.AdamW):
            optimizer_kwargs = dict(fused=True)
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=True,  # actions live in [-1, 1] and predict() unscales them to the env bounds
            normalize_images=normalize_images,
        )
        if actor_type not in ACTOR_TYPES:
            raise ValueError(f"actor_type must be one of {ACTOR_TYPES}, got {actor_type!r}")
        if q_aggregation not in Q_AGGREGATIONS:
            raise ValueError(f"q_aggregation must be one of {Q_AGGREGATIONS}, got {q_aggregation!r}")
        if sampling_precision not in SAMPLING_PRECISIONS:
            raise ValueError(f"sampling_precision must be one of {SAMPLING_PRECISIONS}, got {sampling_precision!r}")
        if training_precision not in TRAINING_PRECISIONS:
            raise ValueError(f"training_precision must be one of {TRAINING_PRECISIONS}, got {training_precision!r}")
        if num_samples < 1 or flow_steps < 1 or n_critics < 1:
            raise ValueError(
                f"num_samples, flow_steps and n_critics must be >= 1, got {num_samples}, {flow_steps}, {n_critics}"
            )
        if net_arch is None:
            net_arch = [512, 512, 512, 512]
        if isinstance(net_arch, dict):
            actor_arch, critic_arch = list(net_arch["pi"]), list(net_arch["qf"])
        else:
            actor_arch, critic_arch = list(net_arch), list(net_arch)
        self.net_arch = net_arch
        self.actor_arch, self.critic_arch = actor_arch, critic_arch
        self.activation_fn = activation_fn
        self.actor_type = actor_type
        self.num_samples = num_samples
        self.flow_steps = flow_steps
        self.q_aggregation = q_aggregation
        self.n_critics = n_critics
        self.long_critic_action_space = long_critic_action_space
        self.sampling_precision = sampling_precision
        self.training_precision = training_precision
        self.compile_sampling = compile_sampling
        self.compile_options = compile_options
        self.critic_layer_norm = critic_layer_norm
        self.actor_layer_norm = actor_layer_norm
        self.chunk_dim = get_action_dim(action_space)  # size of the flattened chunk (a plain int: no numpy when compiled)
        self._build(lr_schedule)
        self._compiled_sampling: Callable[..., th.Tensor] | None = None  # torch.compile'd sampling, built on first use
        self._fixed_noise: th.Tensor | None = None  # the noise of deterministic chunks, drawn on first use

    def _build(self, lr_schedule: Schedule) -> None:
        self.actor = self.make_actor()
        self.actor.optimizer = self.optimizer_class(
            self.actor.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs  # type: ignore[call-arg]
        )
        self.critic = self.make_critic()
        self.critic_target = self.make_critic()
        self.critic_target.load_state_dict(self.critic.state_dict())
        # The target network is only updated by Polyak averaging.
        self.critic_target.set_training_mode(False)
        self.critic_target.requires_grad_(False)
        # Decoupled chunk lengths: the long-chunk critic (no target network of its own) is stepped with the critic.
        self.long_critic: EnsembleCritic | None = None
        critic_parameters = list(self.critic.parameters())
        if self.long_critic_action_space is not None:
            self.long_critic = self.make_critic(self.long_critic_action_space)
            critic_parameters += list(self.long_critic.parameters())
        self.critic.optimizer = self.optimizer_class(
            critic_parameters, lr=lr_schedule(1), **self.optimizer_kwargs  # type: ignore[call-arg]
        )

    def _new_extractor(self) -> BaseFeaturesExtractor:
        return self.features_extractor_class(self.observation_space, **self.features_extractor_kwargs)

    def make_actor(self) -> FlowActor:
        extractor = self._new_extractor()
        return FlowActor(
            self.observation_space,
            self.action_space,  # type: ignore[arg-type]
            self.actor_arch,
            extractor,
            extractor.features_dim,
            self.activation_fn,
            layer_norm=self.actor_layer_norm,
            actor_type=self.actor_type,
            flow_steps=self.flow_steps,
            normalize_images=self.normalize_images,
        ).to(self.device)

    def make_critic(self, action_space: spaces.Box | None = None) -> EnsembleCritic:
        """
        :param action_space: the chunks the critic scores (None: the policy's own chunks)
        """
        extractor = self._new_extractor()
        return EnsembleCritic(
            self.observation_space,
            action_space if action_space is not None else self.action_space,  # type: ignore[arg-type]
            self.critic_arch,
            extractor,
            extractor.features_dim,
            self.activation_fn,
            n_critics=self.n_critics,
            layer_norm=self.critic_layer_norm,
            normalize_images=self.normalize_images,
        ).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                activation_fn=self.activation_fn,
                actor_type=self.actor_type,
                num_samples=self.num_samples,
                flow_steps=self.flow_steps,
                q_aggregation=self.q_aggregation,
                n_critics=self.n_critics,
                long_critic_action_space=self.long_critic_action_space,
                sampling_precision=self.sampling_precision,
                training_precision=self.training_precision,
                compile_sampling=self.compile_sampling,
                compile_options=self.compile_options,
                critic_layer_norm=self.critic_layer_norm,
                actor_layer_norm=self.actor_layer_norm,
                lr_schedule=self._dummy_schedule,
                features_extractor_class=self.features_extractor_class,
                features_extractor_kwargs=self.features_extractor_kwargs,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
            )
        )
        return data

    def sampling_bf16(self, batch_size: int) -> bool:
        """
        Whether the no-gradient sampling path runs in bfloat16 autocast: when ``sampling_precision`` says so, or it
        is "auto", bf16 is faster than float32 on the device, and one call of the networks' widest layer has enough
        multiply-adds (its rows, :meth:`sampling_rows`, times its width squared) to pay for the casts: at least
        ``AUTO_BF16_MIN_MACS`` where the layer is ``AUTO_BF16_WIDE`` wide or more, ``AUTO_BF16_MIN_MACS_NARROW``
        where it is narrower (the critic target of best-of-8 over 256x256 for a batch of 256 runs in bf16; QC-FQL's
        distillation target over 256x256 and acting in a few envs with small networks stay float32; acting with
        best-of-32 over 512-wide networks runs in bf16). Results are cast back to float32 by the callers, so the
        gradient path never sees bf16 tensors.

        :param batch_size: number of observations the sampling is for
        """
        if self.sampling_precision == "auto":
            macs = self.sampling_rows(batch_size) * self.widest_layer**2
            enough = macs >= (AUTO_BF16_MIN_MACS if self.widest_layer >= AUTO_BF16_WIDE else AUTO_BF16_MIN_MACS_NARROW)
            return enough and has_fast_bf16(self.device.type)
        return self.sampling_precision == "bfloat16"

    @property
    def widest_layer(self) -> int:
        """The largest hidden layer of the actor and critic networks (with the rows, it decides "auto")."""
        return max(self.actor_arch + self.critic_arch, default=0)

    def sampling_rows(self, batch_size: int) -> int:
        """Rows per layer of a chunk choice for ``batch_size`` observations: observations times candidates (best-of-N)."""
        return batch_size * (self.num_samples if self.actor_type == "best_of_n" else 1)

    def bf16_autocast(self, enabled: bool) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on the policy's device if ``enabled``, else a disabled autocast (float32 stays float32)."""
        return bf16_autocast(self.device.type, enabled)

    def training_autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the gradient path: bf16 with ``training_precision="bfloat16"``, disabled otherwise."""
        return self.bf16_autocast(self.training_precision == "bfloat16")

    def sampling_autocast(self, batch_size: int) -> contextlib.AbstractContextManager:
        """The autocast context of the no-gradient sampling path (see :meth:`sampling_bf16`)."""
        return self.bf16_autocast(self.sampling_bf16(batch_size))

    def sampling_noise(self, batch_size: int) -> th.Tensor:
        """
        The noise :meth:`sample_chunks_from_noise` turns into chunks: (B, N, D) for best-of-N, (B, D) for the
        one-step actor. Drawn eagerly, outside any compiled code (inductor's CPU randn is ~9x slower than eager's,
        and a compiled and an eager run then see the same numbers for the same seed).
        """
        shape = (batch_size, self.num_samples, self.chunk_dim) if self.actor_type == "best_of_n" else (batch_size, self.chunk_dim)
        return th.randn(shape, device=self.device)

    def fixed_noise(self, batch_size: int) -> th.Tensor:
        """
        The noise of deterministic chunks (``predict(deterministic=True)``): the same draw for every observation and
        every call, of :meth:`sampling_noise`'s shape, from a generator of its own seeded with
        :data:`DETERMINISTIC_NOISE_SEED` (the global RNG is not used, so deterministic evaluations leave training's
        random stream as it was). A saved and loaded model draws the same.
        """
        shape = (self.num_samples, self.chunk_dim) if self.actor_type == "best_of_n" else (self.chunk_dim,)
        if self._fixed_noise is None or self._fixed_noise.shape != shape or self._fixed_noise.device != self.device:
            generator = th.Generator().manual_seed(DETERMINISTIC_NOISE_SEED)  # on the CPU: the same numbers on any device
            self._fixed_noise = th.randn(shape, generator=generator).to(self.device)
        return self._fixed_noise.expand(batch_size, *shape)

    def _sampling_fn(self) -> Callable[..., th.Tensor]:
        """:meth:`sample_chunks_from_noise`, or its ``torch.compile``'d version with ``compile_sampling``."""
        if not self.compile_sampling:
            return self.sample_chunks_from_noise
        if self._compiled_sampling is None:
            self._compiled_sampling = th.compile(self.sample_chunks_from_noise, options=self.inductor_options())
        return self._compiled_sampling

    def inductor_options(self) -> dict[str, Any]:
        """
        The inductor options compiled code of this policy and its algorithm use: ``compile_options``, or
        :func:`~sb3_qchunk.common.precision.compile_options` where it is None; on a CPU with ``cpp.simdlen`` set to
        the vector width inductor picks in this process unless they set it (the same code, but a cache key of its own
        per width: :func:`~sb3_qchunk.common.precision.inductor_cpu_simdlen`).
        """
        options = compile_options(self.device) if self.compile_options is None else dict(self.compile_options)
        if self.device.type == "cpu":
            options.setdefault("cpp.simdlen", inductor_cpu_simdlen())
        return options

    def sample_chunks_from_noise(self, obs: PyTorchObs, noise: th.Tensor) -> th.Tensor:
        """
        The agent's chunks for ``noise`` (see :meth:`sampling_noise`), in [-1, 1], in the current autocast
        precision and with whatever gradient mode the caller set: the building block of :meth:`sample_chunks` and
        of the critic target, where it runs inside the (compiled) loss.
        """
        actor_features = self.actor.extract_features(obs, self.actor.features_extractor)
        if self.actor_type == "distill":
            return self.actor.onestep_actions(actor_features, noise).clamp(-1.0, 1.0)
        critic_features = self.critic.extract_features(obs, self.critic.features_extractor)
        return self.actor.best_of_n(actor_features, critic_features, self.critic, noise, self.q_aggregation)

    def sample_chunks(self, obs: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        """
        The chunks the agent acts with, in [-1, 1]: from fresh noise, or with ``deterministic`` from
        :meth:`fixed_noise`, so that an observation always gets the same chunk (up to the float rounding of the
        batch it is in).

        The choice runs in ``torch.inference_mode`` (no autograd bookkeeping at all: eager best-of-N chose 0.93-0.95x
        the time it took under ``torch.no_grad``); the chunks come back as an ordinary tensor without gradient, as
        from ``torch.no_grad``, usable anywhere (e.g. as a target of another network's loss).

        :param obs: a batch of (preprocessed by SB3's ``obs_to_tensor``) observations
        :param deterministic: use the fixed noise instead of drawing
        :return: (B, D) float32 chunks
        """
        batch_size = len(next(iter(obs.values())) if isinstance(obs, dict) else obs)
        noise = self.fixed_noise(batch_size) if deterministic else self.sampling_noise(batch_size)
        with th.inference_mode(), self.sampling_autocast(batch_size), onednn_disabled(self.small_eager_sampling(batch_size)):
            chunks = self._sampling_fn()(obs, noise)
        return chunks.to(th.float32, copy=True)  # outside inference mode: an ordinary tensor

    def small_eager_sampling(self, batch_size: int) -> bool:
        """
        Whether a chunk choice for ``batch_size`` observations runs with oneDNN off (:func:`onednn_disabled`): eager
        float32 sampling on a CPU with fewer than ``ONEDNN_MIN_ROWS`` rows per layer (observations times candidates),
        as when acting in a few envs, where oneDNN's GELU costs several times its arithmetic. The numbers differ by
        float rounding only (GELU within ~1e-6).
        """
        return (
            self.device.type == "cpu"
            and not self.compile_sampling
            and not self.sampling_bf16(batch_size)
            and self.sampling_rows(batch_size) < ONEDNN_MIN_ROWS
        )

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self.sample_chunks(observation, deterministic=deterministic)

    @property
    def device(self) -> th.device:
        """
        The policy's device, read from one parameter of the actor (SB3's ``BaseModel.device`` walks every parameter of
        every submodule, a cost the act path paid several times per ``predict``). ``.to()`` moves that parameter too.
        """
        try:
            return self.actor.flow.obs_in.weight.device
        except AttributeError:  # while the networks are being built
            return super().device

    def set_training_mode(self, mode: bool) -> None:
        """
        Put the networks in training or evaluation mode (``Module.train``); nothing to do when the policy and its actor
        and critics are in that mode already (as at every ``predict`` call while acting).
        """
        modules = [self, self.actor, self.critic] + ([self.long_critic] if self.long_critic is not None else [])
        if all(module.training == mode for module in modules):
            return
        for module in modules[1:]:
            module.set_training_mode(mode)
        self.training = mode


MlpPolicy = QCPolicy


class MultiInputPolicy(QCPolicy):
    """QC policy for Dict observation spaces (``CombinedExtractor`` by default); see :class:`QCPolicy`."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.GELU,
        actor_type: str = "best_of_n",
        num_samples: int = 32,
        flow_steps: int = 10,
        q_aggregation: str = "mean",
        n_critics: int = 2,
        long_critic_action_space: spaces.Box | None = None,
        sampling_precision: str = "auto",
        training_precision: str = "float32",
        compile_sampling: bool = False,
        compile_options: dict[str, Any] | None = None,
        critic_layer_norm: bool = True,
        actor_layer_norm: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            actor_type,
            num_samples,
            flow_steps,
            q_aggregation,
            n_critics,
            long_critic_action_space,
            sampling_precision,
            training_precision,
            compile_sampling,
            compile_options,
            critic_layer_norm,
            actor_layer_norm,
            features_extractor_class,
            features_extractor_kwargs,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )

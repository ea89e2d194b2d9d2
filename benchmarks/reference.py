"""
Timing worker for the authors' JAX code (github ColinQiyangLi/qc, ``agents/acfql.py``), the yardstick of
``benchmarks/throughput.py --reference-src DIR --reference-python PYTHON``.

It runs in the reference's own Python environment (jax, flax, optax, ...: never torch or sb3_qchunk) and is
driven by throughput.py over stdin/stdout, so that the reference's blocks and ours take turns in one run (paired,
interleaved) on the same machine. Nothing is downloaded: point it at a checkout of the reference and a venv
with its requirements. Set-up, once (versions of the reference's ``requirements.txt``)::

    git clone https://github.com/ColinQiyangLi/qc /path/to/qc && git -C /path/to/qc checkout 48283b4
    python -m venv /path/to/qc-venv
    /path/to/qc-venv/bin/pip install jax==0.6.0 jaxlib==0.6.0 flax==0.10.5 optax==0.2.4 ml_collections==1.1.0 \\
        distrax==0.1.5 chex==0.1.89 tensorflow-probability==0.25.0 numpy==2.2.5

What is timed is what the reference's own loops call: the jitted ``agent.update(batch)`` of its offline loop, on
synthetic batches of the shapes its ``sample_sequence`` gives (observations (B, obs), actions (B, h, A),
next_observations (B, h, obs), rewards / masks / valid (B, h)), and ``agent.sample_actions`` on one observation
followed by ``np.array`` (its ``main.py`` acting). Agents are built with the reference's ``get_config()``
defaults and the config's hidden sizes, N and h; each is compiled (one warm-up call) when it is built.

Protocol: one JSON request per line on stdin, one answer per line on stdout prefixed with ``RESULT `` (anything
else the libraries print is ignored by the caller):

- ``{"cmd": "build", "key": K, "actor": "best_of_n" | "distill", "hidden": [256, 256], "num_samples": 8,
  "batch_size": 256, "obs_dim": 28, "action_dim": 5, "chunk": 5}`` -> ``{"build_s": ...}``
- ``{"cmd": "update", "key": K, "n": 50}`` -> ``{"seconds": ...}`` (n updates, the last one waited for)
- ``{"cmd": "act", "key": K, "n": 50}`` -> ``{"seconds": ...}`` (n one-observation action choices)
- ``{"cmd": "matmul", "m": 8192, "k": 512, "n": 512, "reps": 20}`` -> ``{"seconds": ...}`` (float32 dense layers)
- ``{"cmd": "flops", "key": K}`` -> ``{"flops": ...}`` (of one update, by XLA's cost analysis)
- ``{"cmd": "info"}`` -> versions of jax / flax and the reference's commit if it is a git checkout

    /path/to/qc-venv/bin/python benchmarks/reference.py --src /path/to/qc
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACTOR_TYPES = {"best_of_n": "best-of-n", "distill": "distill-ddpg"}  # QC's actor_type -> the reference's


def synthetic_batch(np: Any, batch_size: int, obs_dim: int, action_dim: int, chunk: int, seed: int = 0) -> dict[str, Any]:
    """A batch of the shapes the reference's ``sample_sequence`` returns (values synthetic)."""
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.standard_normal((batch_size, obs_dim), dtype=np.float32),
        "actions": rng.uniform(-1, 1, (batch_size, chunk, action_dim)).astype(np.float32),
        "next_observations": rng.standard_normal((batch_size, chunk, obs_dim), dtype=np.float32),
        "rewards": -(rng.random((batch_size, chunk)) < 0.9).astype(np.float32),
        "masks": np.ones((batch_size, chunk), dtype=np.float32),
        "valid": np.ones((batch_size, chunk), dtype=np.float32),
    }


class Worker:
    """The reference's agents, built on request and timed on request."""

    def __init__(self, src: Path) -> None:
        sys.path.insert(0, str(src))
        import jax
        import numpy as np

        # TensorFlow Probability 0.25 (its last release, imported by distrax) reads
        # jax.interpreters.xla.pytype_aval_mappings, which newer jax (0.7 on) keeps in jax's core only: the alias lets the
        # reference import there too (e.g. on a GPU machine's newer jax). Nothing changes where it exists.
        xla = getattr(getattr(jax, "interpreters", None), "xla", None)
        if xla is not None and not hasattr(xla, "pytype_aval_mappings"):
            from jax._src import core

            xla.pytype_aval_mappings = core.pytype_aval_mappings
        from agents.acfql import ACFQLAgent, get_config

        self.src, self.jax, self.np = src, jax, np
        self.agent_class, self.get_config = ACFQLAgent, get_config
        self.agents: dict[str, Any] = {}
        self.batches: dict[str, Any] = {}
        self.keys: dict[str, Any] = {}
        self.observation = None
        self.matmuls: dict[tuple[int, int, int], Any] = {}

    def build(self, key: str, actor: str, hidden: list[int], num_samples: int, batch_size: int, obs_dim: int,
              action_dim: int, chunk: int, **_: Any) -> dict[str, float]:
        np, jax = self.np, self.jax
        start = time.perf_counter()
        config = self.get_config()
        config["actor_type"] = ACTOR_TYPES[actor]
        config["actor_hidden_dims"] = tuple(hidden)
        config["value_hidden_dims"] = tuple(hidden)
        config["actor_num_samples"] = num_samples
        config["horizon_length"] = chunk
        config["batch_size"] = batch_size
        agent = self.agent_class.create(0, np.zeros(obs_dim, np.float32), np.zeros(action_dim, np.float32), config)
        batch = synthetic_batch(np, batch_size, obs_dim, action_dim, chunk)
        agent, _ = agent.update(batch)  # compilation
        jax.block_until_ready(agent.network.params)
        self.observation = np.zeros(obs_dim, np.float32)
        rng = jax.random.PRNGKey(0)
        np.array(agent.sample_actions(observations=self.observation, rng=rng))  # compilation
        self.agents[key], self.batches[key], self.keys[key] = agent, batch, rng
        return {"build_s": time.perf_counter() - start}

    def update(self, key: str, n: int) -> dict[str, float]:
        agent, batch = self.agents[key], self.batches[key]
        start = time.perf_counter()
        for _ in range(n):
            agent, _ = agent.update(batch)
        self.jax.block_until_ready(agent.network.params)
        seconds = time.perf_counter() - start
        self.agents[key] = agent
        return {"seconds": seconds}

    def act(self, key: str, n: int) -> dict[str, float]:
        agent, rng, jax, np = self.agents[key], self.keys[key], self.jax, self.np
        start = time.perf_counter()
        for _ in range(n):
            rng, step_rng = jax.random.split(rng)
            np.array(agent.sample_actions(observations=self.observation, rng=step_rng))
        seconds = time.perf_counter() - start
        self.keys[key] = rng
        return {"seconds": seconds}

    def matmul(self, m: int, k: int, n: int, reps: int) -> dict[str, float]:
        """``reps`` float32 dense layers ``x @ w + b`` of (m, k) by (k, n), jitted (compiled at a shape's first call)."""
        jax, np = self.jax, self.np
        if (m, k, n) not in self.matmuls:
            rng = np.random.default_rng(0)
            arrays = [jax.numpy.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in ((m, k), (k, n), (n,))]
            layer = jax.jit(lambda x, w, b: x @ w + b)
            layer(*arrays).block_until_ready()
            self.matmuls[m, k, n] = (layer, arrays)
        layer, arrays = self.matmuls[m, k, n]
        start = time.perf_counter()
        for _ in range(reps):
            out = layer(*arrays)
        out.block_until_ready()
        return {"seconds": time.perf_counter() - start}

    def flops(self, key: str) -> dict[str, float]:
        """FLOPs of one ``agent.update``: XLA's cost analysis of the compiled update (elementwise work included)."""
        agent, batch = self.agents[key], self.batches[key]
        cost = type(agent).update.lower(agent, batch).compile().cost_analysis()
        if isinstance(cost, list):  # older jax: one dict per computation
            cost = cost[0]
        return {"flops": float(cost["flops"])}

    def info(self) -> dict[str, str]:
        import flax

        try:
            commit = subprocess.run(["git", "-C", str(self.src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown (not a git checkout)"
        return {"jax": self.jax.__version__, "flax": flax.__version__, "commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="a checkout of github ColinQiyangLi/qc")
    args = parser.parse_args()
    if not (args.src / "agents" / "acfql.py").is_file():
        raise SystemExit(f"{args.src} is not a checkout of the reference (no agents/acfql.py)")
    worker = Worker(args.src)
    print("RESULT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        command = request.pop("cmd")
        try:
            answer = getattr(worker, command)(**request)
        except Exception as error:  # reported to the caller, which raises it
            answer = {"error": f"{type(error).__name__}: {error}"}
        print("RESULT " + json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()

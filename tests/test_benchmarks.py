"""The benchmark scripts stay runnable: each has a tiny --smoke mode that runs here."""

import csv
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th
import torch.nn.functional as F

from sb3_qchunk.common.precision import has_native_bf16
from sb3_qchunk.common.torch_layers import rational_gelu
from sb3_qchunk.datasets import cached_play_dataset

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module(name):
    """A module of ``benchmarks/`` (scripts, not a package), imported by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def table_rows(text, first_cell):
    """The cells of the markdown table rows that start with ``first_cell``."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_throughput_smoke(tmp_path):
    out, reference = tmp_path / "throughput.md", tmp_path / "reference.json"
    reference.write_text(json.dumps({"updates_per_s": {"smoke": {"best_of_n": 2.0, "distill": 4.0}}}))
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--reference", str(reference), "--out", str(out)],
        check=True,
    )
    report = out.read_text()
    if platform.libc_ver()[0] == "glibc":  # measured with freed memory kept, and saying so
        assert benchmark_module("throughput").RETAINED_MEMORY_NOTE in report.splitlines()
    updates = table_rows(report, "smoke")
    paths = ["fp32", "auto", "auto + bf16 training"]
    assert [(row[1], row[2].split(":")[0] + (" + bf16 training" if "bf16 training" in row[2] else "")) for row in updates] == [
        (actor, path) for actor in ("best_of_n", "distill") for path in paths
    ]
    for row in updates:
        qc, sac, ratio, to_reference = float(row[3]), float(row[4]), float(row[5]), float(row[7])
        assert qc > 0 and sac > 0 and abs(ratio - qc / sac) < 0.01
        assert abs(to_reference - qc / {"best_of_n": 2.0, "distill": 4.0}[row[1]]) < 0.01
    profiled = [line for line in report.splitlines() if line.startswith("- distill, sampling ")]
    assert [line.split(":")[0] for line in profiled] == ["- distill, sampling float32", "- distill, sampling auto", "- distill, sampling auto + compile"]
    assert all("matmuls" in line and "top ops" in line for line in profiled)
    (wrapper,) = table_rows(report, "Pendulum-v1")
    assert float(wrapper[1]) > 0 and float(wrapper[2]) > 0
    (dataset,) = table_rows(report, "3000")  # 3 copies of a 1001-row episode: 1000 transitions each
    assert float(dataset[1]) > 0 and 1.0 < float(dataset[4]) < 2.5  # buffer bytes / raw bytes used
    (matmul,) = table_rows(report, "8 x 16 x 16")  # a dense layer's GFLOP/s: fp32, oneDNN fp32, bf16; no reference
    assert float(matmul[1]) > 0 and float(matmul[3]) > 0 and matmul[4] == "-"
    for row in updates:  # the matmul floor: positive, and never above the update's own time
        assert 0 < float(row[-2]) <= 1000 / float(row[3])


def test_throughput_reference_file_is_checked(tmp_path):
    """A reference file with an unknown actor or a non-positive rate is refused with a message that names it."""
    load_reference = benchmark_module("throughput").load_reference
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"updates_per_s": {"small": {"best_of_n": 28.0, "distill": 72.7}}}))
    assert load_reference(path) == {"small": {"best_of_n": 28.0, "distill": 72.7}}
    for bad in ({"small": {"best-of-n": 28.0}}, {"small": {"best_of_n": 0.0}}, {"large": {"best_of_n": 1.0}}):
        path.write_text(json.dumps({"updates_per_s": bad}))
        with pytest.raises(ValueError, match="updates_per_s|rates must be positive"):
            load_reference(path)
    path.write_text(json.dumps({"small": {"best_of_n": 28.0}}))
    with pytest.raises(ValueError, match="updates_per_s"):
        load_reference(path)


def test_gpu_check_script_runs_both_configs_and_summarises(tmp_path):
    """benchmarks/gpu_check.sh, tried on the CPU: both configs' reports and a summary row each."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_DEVICE="cpu", GPU_CHECK_ARGS="--smoke")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "run", str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"torch {th.__version__}" in (out / "gpu.txt").read_text()
    summary = (out / "summary.md").read_text()
    rows = {row[0]: row for row in table_rows(summary, "small") + table_rows(summary, "paper")}
    assert set(rows) == {"small", "paper"}
    for config, row in rows.items():
        assert row[1] == "0" and int(row[2]) >= 0
        if shutil.which("nvidia-smi") is None:
            assert row[3:] == ["-", "-", "-"]  # no utilisation samples
        assert len(table_rows((out / f"throughput_gpu_{config}.md").read_text(), "smoke")) == 6
    usage = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_learning_smoke(tmp_path, play_data_dir):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--smoke", "--out", str(tmp_path), "--data-dir", str(play_data_dir)],
        check=True,
    )
    with open(tmp_path / "curves.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for method in ("QC", "RLPD", "DQC"):
        assert {row["phase"] for row in rows if row["method"] == method} == {"offline", "online"}
    assert all(0.0 <= float(row["success_rate"]) <= 1.0 for row in rows)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "cube-single.png").exists()
    # The machine it ran on as the speed benchmarks name it (CPU, torch threads per run: the smoke run has one worker)
    machine = json.loads((tmp_path / "config.json").read_text())["machine"]
    assert machine.startswith(benchmark_module("throughput").machine_line("cpu", th.get_num_threads()))


def test_levers_smoke(tmp_path):
    out = tmp_path / "levers.md"
    levers = ["baseline", "onednn-linear-gelu"]  # each lever is a cold compilation: the baseline and a kernel swap
    command = [sys.executable, str(ROOT / "benchmarks" / "levers.py"), "--smoke", "--actors", "distill", "--threads", "1"]
    subprocess.run([*command, "--levers", *levers, "--out", str(out)], check=True)
    rows = table_rows(out.read_text(), "distill")
    assert [row[2] for row in rows] == levers
    assert float(rows[0][4]) == 1.0  # the baseline against itself
    assert all(float(row[3]) > 0 and float(row[5]) <= float(row[4]) <= float(row[6]) for row in rows)
    assert float(rows[0][8]) == 1.0 and all(float(row[7]) > 0 for row in rows)  # acting: ms, paired to the baseline


def test_levers_compute_the_same_function():
    """A lever may change how the sampling path computes, never what: same outputs as the modules it replaces."""
    levers = benchmark_module("levers")
    SamplingGELU, SamplingLinearGELU = levers.SamplingGELU, levers.SamplingLinearGELU
    th.manual_seed(0)
    linear, x = th.nn.Linear(16, 32), th.randn(64, 16) * 3
    with th.no_grad():
        expected = F.gelu(linear(x))
        th.testing.assert_close(SamplingGELU()(linear(x)), expected, rtol=0, atol=1e-6)
        th.testing.assert_close(SamplingLinearGELU(linear)(x), expected, rtol=1e-5, atol=1e-5)
    # With gradients (the training path), the plain modules run: same values, and gradients flow.
    y = SamplingLinearGELU(linear)(x)
    y.sum().backward()
    assert linear.weight.grad is not None
    th.testing.assert_close(y.detach(), expected)


def test_rational_gelu_function_lever_has_the_rational_forms_derivative():
    """The lever's written-out backward is the derivative of ``rational_gelu`` (inside and outside its clamp), which is
    within float32 rounding of the exact GELU's."""
    RationalGELUFunction = benchmark_module("levers").RationalGELUFunction
    x = th.linspace(-12.0, 12.0, 4001, dtype=th.float64, requires_grad=True)
    (through_autograd,) = th.autograd.grad(rational_gelu(x).sum(), x)
    (written_out,) = th.autograd.grad(RationalGELUFunction()(x).sum(), x)
    th.testing.assert_close(written_out, through_autograd, rtol=0, atol=1e-12)
    x32 = x.detach().float().requires_grad_()
    (exact,) = th.autograd.grad(F.gelu(x32).sum(), x32)
    (lever,) = th.autograd.grad(RationalGELUFunction()(x32).sum(), x32)
    th.testing.assert_close(lever, exact, rtol=0, atol=3e-6)


@pytest.mark.skipif(not th.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.skipif(not has_native_bf16("cpu"), reason="oneDNN's bf16 linear+GELU needs a CPU with AVX512-BF16 or AMX")
def test_levers_bf16_fused_linear_gelu_is_within_bf16_rounding():
    """In bf16 (the sampling path's precision on CPUs with native bf16) the fused lever agrees within bf16 rounding."""
    SamplingLinearGELU = benchmark_module("levers").SamplingLinearGELU
    th.manual_seed(0)
    linear, x = th.nn.Linear(16, 32), th.randn(64, 16) * 3
    with th.no_grad():
        fused = SamplingLinearGELU(linear)(x.bfloat16()).float()
        th.testing.assert_close(fused, F.gelu(linear(x)), rtol=2e-2, atol=2e-2)


def test_soak_smoke(tmp_path):
    out = tmp_path / "soak.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--smoke", "--out", str(out)], check=True)
    report = out.read_text()
    assert "Windows checked against the env clock: 2048, crossing a write position or mixing envs: 0." in report
    rows = [line.split("|")[1:-1] for line in report.splitlines() if line[:3] in ("| 5", "| 1", "| 2")]
    assert [int(row[2]) for row in rows] == [100] * 4  # 4 checkpoints, the rings full (2 x 50) at each
    assert all(int(row[1]) >= 5 for row in rows)  # each ring wrapped at least 5 times by the first checkpoint


@pytest.mark.parametrize(
    "actor, sampling, training",
    [("best_of_n", "float32", "float32"), ("distill", "float32", "float32"), ("distill", "bfloat16", "bfloat16")],
)
def test_matmul_floor_replays_every_matmul_of_an_update(actor, sampling, training):
    """The floor's replay does the FLOPs of one update (all of an MLP update's FLOPs are matmuls), in its precisions."""
    from torch.utils.flop_counter import FlopCounterMode

    throughput = benchmark_module("throughput")
    model = throughput.make_qc(actor, [16, 16], 2, 8, sampling, "cpu", training_precision=training)
    floor = throughput.MatmulFloor(model)
    with FlopCounterMode(display=False) as replayed:
        floor(2)
    with FlopCounterMode(display=False) as update:
        model.train(1, 8)
    assert replayed.get_total_flops() == 2 * update.get_total_flops() > 0
    dtypes = {args[0].dtype for _, args, _ in floor.calls}
    assert dtypes == ({th.float32} if sampling == "float32" else {th.float32, th.bfloat16})


def test_one_graph_update_of_best_of_n_matches_the_shipped_update():
    """The one-graph update (shipped for QC-FQL, a lever for best-of-N) takes best-of-N's shipped steps too."""
    make_qc = benchmark_module("throughput").make_qc
    shipped = make_qc("best_of_n", [16, 16], 2, 8, "float32", "cpu")  # seeds torch and numpy: same batches and noise
    shipped.train(3, 8)
    one_graph = make_qc("best_of_n", [16, 16], 2, 8, "float32", "cpu", compiled="one_graph")
    one_graph.train(3, 8)  # one eager update (creates Adam's state), then two compiled ones
    assert one_graph._compiled_update.step is not None and one_graph._compiled_update.losses is None
    for a, b in zip(shipped.policy.state_dict().values(), one_graph.policy.state_dict().values()):
        th.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_execution_smoke(tmp_path, play_data_dir):
    out = tmp_path / "execution.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "execution.py"), "--smoke", "--out", str(out)]
    subprocess.run([*command, "--data-dir", str(play_data_dir), "--save-model", str(tmp_path / "model")], check=True)
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith(("| 0.00", "| 0.30"))]
    assert [(row[0].strip(), row[1].strip()) for row in rows][:2] == [("0.00", "open loop"), ("0.00", "receding, replan every 3")]
    assert len(rows) == 10 and all(0.0 <= float(row[2]) <= 1.0 and 1 <= float(row[3]) <= 200 for row in rows)
    assert (tmp_path / "model.zip").is_file()


FAKE_JAX = {
    "jax/__init__.py": "from . import random\n__version__ = 'fake'\ndef block_until_ready(x):\n    return x\n",
    "jax/random.py": "def PRNGKey(seed):\n    return seed\ndef split(key, n=2):\n    return [key + i + 1 for i in range(n)]\n",
    "flax/__init__.py": "__version__ = 'fake'\n",
    "agents/__init__.py": "",
    # A stand-in for the reference's agent: it checks the batch shapes the worker sends and counts its calls.
    "agents/acfql.py": (
        "import time\n"
        "import numpy as np\n"
        "def get_config():\n    return {}\n"
        "class ACFQLAgent:\n"
        "    def __init__(self, config, obs_dim, action_dim):\n"
        "        self.config, self.obs_dim, self.action_dim, self.network = config, obs_dim, action_dim, self\n"
        "        self.params = None\n"
        "    @classmethod\n"
        "    def create(cls, seed, ex_observations, ex_actions, config):\n"
        "        assert config['actor_type'] in ('best-of-n', 'distill-ddpg'), config\n"
        "        return cls(config, ex_observations.shape[-1], ex_actions.shape[-1])\n"
        "    def update(self, batch):\n"
        "        b, h, o, a = self.config['batch_size'], self.config['horizon_length'], self.obs_dim, self.action_dim\n"
        "        assert batch['observations'].shape == (b, o) and batch['actions'].shape == (b, h, a)\n"
        "        assert batch['next_observations'].shape == (b, h, o) and batch['valid'].shape == (b, h)\n"
        "        time.sleep(0.002)\n"
        "        return self, {}\n"
        "    def sample_actions(self, observations, rng=None):\n"
        "        assert observations.shape == (self.obs_dim,)\n"
        "        time.sleep(0.002)\n"
        "        return np.zeros(self.action_dim * self.config['horizon_length'])\n"
    ),
}


def test_throughput_paired_with_a_reference_checkout(tmp_path):
    """``--reference-src``: the worker builds and times the reference's agents in turns with ours (a stand-in
    checkout here, which checks the batch shapes it is given and takes at least 2 ms a call); the paired columns are
    its timings: at most 500 updates/s, at least 2 ms an action."""
    src = tmp_path / "qc"
    for name, text in FAKE_JAX.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    out = tmp_path / "throughput.md"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--sections", "updates",
         "--reference-src", str(src), "--reference-python", sys.executable, "--out", str(out)],
        check=True,
    )
    report = out.read_text()
    rows = table_rows(report, "smoke")
    assert len(rows) == 6
    for row in rows:
        qc, sac, reference_to_sac, to_reference, reference_act_ms = float(row[3]), float(row[4]), float(row[6]), float(row[7]), float(row[9])
        assert to_reference >= qc / 500 - 0.01 and reference_act_ms >= 2.0
        # reference / SAC from this run's timings of both (the reference's rate: qc / to_reference), not recorded
        # ones; the bounds allow for the table's rounding of each column
        low = (qc - 0.005) / (to_reference + 0.005) / (sac + 0.05) - 0.005
        high = (qc + 0.005) / max(to_reference - 0.005, 1e-9) / max(sac - 0.05, 1e-9) + 0.005
        assert low <= reference_to_sac <= high
    assert "both timed in this run's interleaved blocks" in report
    assert "predict ms/chunk against the reference's act ms (paired)" in report


def test_reference_worker_refuses_a_directory_that_is_not_the_reference(tmp_path):
    ReferenceProcess = benchmark_module("throughput").ReferenceProcess
    with pytest.raises(RuntimeError, match="reference worker exited"):
        ReferenceProcess(sys.executable, tmp_path)


def test_act_latency_smoke(tmp_path):
    out = tmp_path / "act.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "act_latency.py"), "--smoke", "--out", str(out)], check=True)
    rows = table_rows(out.read_text(), "smoke")
    assert [row[1] for row in rows] == ["best_of_n", "distill"]
    for row in rows:
        assert all(float(row[i]) > 0 for i in (2, 3, 4))  # eager with oneDNN on, eager, compiled
        assert row[5:] == ["-", "-", "-"]  # no reference given


def test_reports_name_the_instruction_set_limits_they_ran_under(monkeypatch):
    """A run limited to older instruction sets (ATen, oneDNN, MKL, the reference's XLA) says so in its machine line."""
    throughput = benchmark_module("throughput")
    machine_line = throughput.machine_line
    for name in throughput.MACHINE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    plain = machine_line("cpu")
    assert "ONEDNN_MAX_CPU_ISA" not in plain and "XLA_FLAGS" not in plain
    # the threads of the runs it describes (e.g. one per run where runs share the cores), this process's by default
    assert machine_line("cpu", threads=7) == plain.replace(f"({th.get_num_threads()} threads)", "(7 threads)") != plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    limited = machine_line("cpu")
    assert limited.startswith(plain)
    assert limited.endswith("ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2")


FAULTS_SCRIPT = """
import ctypes, resource, sys
import torch as th
sys.path.insert(0, sys.argv[1])
import throughput
def cycle():  # an update's pattern: intermediates of 1 MiB allocated, touched, all freed
    blocks = [th.ones(256 * 1024) for _ in range(32)]
    del blocks
def faults_per_cycle():
    cycle(); cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        cycle()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
# glibc's starting thresholds (128 KiB), held fixed: what its defaults do to a heap that has not raised them yet
mallopt = ctypes.CDLL(None).mallopt
assert mallopt(-3, 128 * 1024) == 1 and mallopt(-1, 128 * 1024) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
handed_back = faults_per_cycle()
assert throughput.retain_freed_memory()
print(handed_back, faults_per_cycle())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
def test_retain_freed_memory_stops_the_page_faults_of_repeated_updates():
    """Where glibc hands freed blocks back to the kernel (its starting thresholds; with its defaults, whether a process
    is there depends on what it freed before), 32 MiB allocated and freed again and again are faulted in afresh each
    time; after ``retain_freed_memory`` the same pattern, in the same process, faults no page in."""
    command = [sys.executable, "-c", FAULTS_SCRIPT, str(ROOT / "benchmarks")]
    env = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    handed_back, retained = (float(value) for value in subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.split())
    assert handed_back > 4000  # of the 8192 pages a cycle touches
    assert retained < 256  # less than one 1 MiB block's pages a cycle


def test_retain_freed_memory_leaves_the_users_malloc_settings(monkeypatch):
    """Where GLIBC_TUNABLES is set, the benchmarks keep the user's settings (named in their machine line)."""
    throughput = benchmark_module("throughput")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert throughput.retain_freed_memory() is False
    assert "GLIBC_TUNABLES=glibc.malloc.trim_threshold=131072" in throughput.machine_line("cpu")


def test_act_latency_pairs_the_blocks_of_each_round():
    """Ours over the reference is the median of the per-round ratios (not a ratio of medians), with quartiles."""
    paired = benchmark_module("act_latency").paired
    assert paired([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == "2.00 (2.00-2.50)"  # rounds' ratios 2, 2, 3
    # rounds' ratios 0.5 and 1.5: median 1.00, where the ratio of the medians would be 1.75 / 1.5; the quartiles stay
    # within the ratios seen
    assert paired([0.5, 3.0], [1.0, 2.0]) == "1.00 (0.75-1.25)"


def test_act_latency_paired_with_a_reference_checkout(tmp_path):
    """``--reference-src``: the reference's action choices take turns with ours (the stand-in takes at least 2 ms a
    call); the ratio columns are medians of the rounds' ratios, within their quartiles."""
    src = tmp_path / "qc"
    for name, text in FAKE_JAX.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    out = tmp_path / "act.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "act_latency.py"), "--smoke", "--out", str(out)]
    subprocess.run([*command, "--reference-src", str(src), "--reference-python", sys.executable], check=True)
    rows = table_rows(out.read_text(), "smoke")
    assert [row[1] for row in rows] == ["best_of_n", "distill"]
    for row in rows:
        eager, compiled, reference = (float(value) for value in row[3:6])
        assert reference >= 2.0 and eager > 0 and compiled > 0
        for cell in row[6:8]:  # "median (q1-q3)"
            median, quartiles = cell.rstrip(")").split(" (")
            q1, q3 = (float(value) for value in quartiles.split("-"))
            assert 0 < q1 <= float(median) <= q3
    failed = subprocess.run([*command, "--reference-src", str(src)], capture_output=True, text=True)
    assert failed.returncode == 2 and "--reference-src and --reference-python go together" in failed.stderr


@pytest.mark.parametrize("buffer", ["synthetic", "dataset"])
def test_allocator_smoke(tmp_path, play_data_dir, buffer):
    out = tmp_path / "allocator.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "allocator.py"), "--smoke", "--actors", "distill", "--paths", "eager"]
    if buffer == "dataset":  # the demo smoke run's dataset (generated here if that test has not run yet)
        dataset = cached_play_dataset(play_data_dir / "cube-single-play-2000-seed0.npz", "cube-single", 2000, progress_bar=False)
        command += ["--dataset", str(dataset)]
    subprocess.run([*command, "--out", str(out)], check=True)
    text = out.read_text()
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=" in text  # the setting measured, named in the report
    assert ("loaded on `cube-single-singletask-task1-v0`" in text) == (buffer == "dataset")
    rows = table_rows(text, "smoke")
    assert [row[1:3] for row in rows] == [["distill", "eager"]]
    default_rate, set_rate, ratio = (float(cell) for cell in rows[0][3:6])
    assert default_rate > 0 and set_rate > 0
    assert ratio == pytest.approx(set_rate / default_rate, rel=1e-2)  # one round: its ratio is the ratio of the medians


def test_allocator_env_words_are_checked():
    allocator = benchmark_module("allocator")
    assert allocator.parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        allocator.parse_env(["LD_PRELOAD"])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs CPU affinity and 2 cores")
def test_use_cores_pins_the_run_and_its_workers_and_says_so():
    """``--cores 1``: this process and the processes it starts run on one core with one torch thread; the report's
    machine line names it; a count outside 1..usable cores is refused with a message."""
    script = (
        "import os, subprocess, sys, torch as th\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import throughput\n"
        "for bad in (0, len(os.sched_getaffinity(0)) + 1):\n"
        "    try:\n"
        "        throughput.use_cores(bad)\n"
        "    except ValueError as error:\n"
        "        assert '--cores must be between 1 and' in str(error), error\n"
        "    else:\n"
        "        raise AssertionError(bad)\n"
        "throughput.use_cores(1)\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(len(os.sched_getaffinity(0)))'], capture_output=True, text=True, check=True)\n"
        "print(len(os.sched_getaffinity(0)), th.get_num_threads(), child.stdout.strip())\n"
        "print(throughput.machine_line('cpu'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(ROOT / "benchmarks")], capture_output=True, text=True, check=True).stdout
    counts, line = out.strip().splitlines()
    assert counts.split() == ["1", "1", "1"]
    assert f"{os.cpu_count()} cores (1 used by this run: CPU affinity)" in line and "(1 threads)" in line
    if len(os.sched_getaffinity(0)) == os.cpu_count():  # a run with every core: nothing added
        assert "used by this run" not in benchmark_module("throughput").machine_line("cpu")

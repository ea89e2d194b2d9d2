#!/usr/bin/env bash
# The GPU check: updates/s and acting latency of both configs on a CUDA GPU (benchmarks/throughput.py), the GPU's
# utilisation while each config runs, and, where the reference's dependencies import there, the authors' JAX code
# paired in the same interleaved blocks. Made for a machine whose Python already has torch with CUDA (and jax with
# CUDA, flax, optax, chex for the reference) but that cannot download anything:
#
#   bash benchmarks/gpu_check.sh prepare [PYTHON_VERSION]   # here, with a package index: wheels of what such a Python
#                                                           # lacks (SB3, Gymnasium; distrax, ml_collections, TFP for
#                                                           # the reference) into .gpu-wheels/ (default 3.12)
#   bash benchmarks/gpu_check.sh run OUT [REFERENCE_SRC]    # there: installs them from .gpu-wheels/ (no index) into
#                                                           # .gpu-site/ (on PYTHONPATH beside the Python's own
#                                                           # packages), writes OUT/
#
# With the device tool, carry .gpu-wheels (and a checkout of the reference inside the repo, e.g. .gpu-ref/qc at commit
# 48283b4, passed as REFERENCE_SRC): all three paths are ignored by git.
#
# OUT/ gets gpu.txt (nvidia-smi, torch and jax versions), throughput_gpu_<config>.md, utilisation_<config>.csv
# (nvidia-smi samples every 200 ms while that config ran: GPU %, memory MiB) and a summary line per config in
# summary.md. Each config runs under a time limit (GPU_CHECK_LIMIT_S, default 240 s), so one call fits in 10 minutes;
# GPU_CHECK_CONFIGS (default "small paper") runs fewer, e.g. again the one that ran out of time, with a larger limit.
# GPU_CHECK_PYTHON (default python3) is the Python with torch; GPU_CHECK_DEVICE (default cuda) and GPU_CHECK_ARGS
# (extra throughput.py flags, e.g. --smoke) are for trying the script without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
SITE=.gpu-site
PYTHON=${GPU_CHECK_PYTHON:-python3}

prepare() {
    local version=${1:-3.12}
    mkdir -p "$WHEELS"
    # Pure-Python packages, without their dependencies: those the GPU image has already (numpy, cloudpickle, pandas,
    # matplotlib, tqdm, rich, absl-py, decorator); dm-tree is compiled, so it comes for the target Python. The
    # reference's versions are those of benchmarks/reference.py's set-up: change them together.
    python3 -m pip download --quiet --no-deps --dest "$WHEELS" --only-binary=:all: \
        "stable-baselines3==2.9.2" "gymnasium==1.4.0" "farama-notifications==0.0.6" \
        "distrax==0.1.5" "ml_collections==1.1.0" "tensorflow-probability==0.25.0" "gast==0.7.0" "six==1.17.0"
    python3 -m pip download --quiet --no-deps --dest "$WHEELS" --only-binary=:all: \
        --python-version "$version" --platform manylinux_2_28_x86_64 "dm-tree==0.1.10"
    ls "$WHEELS"
}

run() {
    local out=${1:?usage: gpu_check.sh run OUT [REFERENCE_SRC]} reference_src=${2:-}
    local device=${GPU_CHECK_DEVICE:-cuda} limit=${GPU_CHECK_LIMIT_S:-240}
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    # A folder on PYTHONPATH rather than a venv: the image's Python may be a venv itself, whose packages a venv made
    # from it would not see.
    if ! "$PYTHON" -c "import stable_baselines3, gymnasium" 2> /dev/null; then
        "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps --upgrade --target "$SITE" \
            stable-baselines3 gymnasium farama-notifications
    fi
    export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
        "$PYTHON" -c "import torch, stable_baselines3 as sb3; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'sb3', sb3.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
    } > "$out/gpu.txt" 2>&1
    local reference_args=()
    if [ -n "$reference_src" ]; then
        # The reference's extra dependencies, and jax not grabbing most of the GPU's memory at start-up.
        "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps --upgrade --target "$SITE" \
            distrax ml_collections tensorflow-probability gast six dm-tree >> "$out/gpu.txt" 2>&1 || true
        export XLA_PYTHON_CLIENT_PREALLOCATE=false
        if "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); import jax, reference; reference.Worker('$reference_src'); print('jax', jax.__version__, jax.devices())" >> "$out/gpu.txt" 2>&1; then
            reference_args=(--reference-src "$reference_src" --reference-python "$(command -v "$PYTHON")")
        else
            echo "the reference does not import here: ours alone" >> "$out/gpu.txt"
        fi
    fi
    echo "| config | exit | seconds | GPU % (mean of samples) | GPU % (90th percentile) | memory MiB (max) |" > "$out/summary.md"
    echo "|---|---|---|---|---|---|" >> "$out/summary.md"
    for config in ${GPU_CHECK_CONFIGS:-small paper}; do
        local sampler="" start rc=0
        if command -v nvidia-smi > /dev/null; then
            nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
                > "$out/utilisation_$config.csv" 2>/dev/null &
            sampler=$!
        fi
        start=$(date +%s)
        # shellcheck disable=SC2086  # GPU_CHECK_ARGS: words on purpose
        timeout "$limit" "$PYTHON" benchmarks/throughput.py --device "$device" --configs "$config" \
            --sections updates --repeats 3 "${reference_args[@]}" ${GPU_CHECK_ARGS:-} \
            --out "$out/throughput_gpu_$config.md" > "$out/log_$config.txt" 2>&1 || rc=$?
        [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
        "$PYTHON" - "$config" "$rc" "$(($(date +%s) - start))" "$out/utilisation_$config.csv" >> "$out/summary.md" <<'EOF'
import sys
from pathlib import Path

config, rc, seconds, path = sys.argv[1:]
rows = []
if Path(path).exists():
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(tuple(float(v) for v in line.split(",")))
        except ValueError:
            pass
if rows:
    util = sorted(r[0] for r in rows)
    mean, p90, memory = sum(util) / len(util), util[int(0.9 * (len(util) - 1))], max(r[1] for r in rows)
    print(f"| {config} | {rc} | {seconds} | {mean:.0f} | {p90:.0f} | {memory:.0f} |")
else:
    print(f"| {config} | {rc} | {seconds} | - | - | - |")
EOF
    done
    cat "$out/summary.md"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare [PYTHON_VERSION] | run OUT [REFERENCE_SRC]" >&2; exit 2 ;;
esac

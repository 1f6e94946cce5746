#!/usr/bin/env bash
# Full-size throughput benchmarks on a machine with one NVIDIA GPU.
#
#   bash benchmarks/run_gpu.sh                 # writes runs/gpu/
#   OUT=/somewhere PYTHON=python3 STEP_TIMEOUT=900 bash benchmarks/run_gpu.sh
#
# Expected runtime on one GPU: roughly 10-20 min in all (install aside);
# each benchmark step is capped at STEP_TIMEOUT seconds (default 900), a
# failed or timed-out step is logged and the next one still runs (exit
# status 1 at the end).
#
# Run from the repository root with a python that can `pip install` from
# wheels. Steps (each bounded by `timeout`, default 900 s, STEP_TIMEOUT=...):
#   1. pip install -e . (SKIP_INSTALL=1 skips it; a failure is tolerated if
#      the checkout and its dependencies import); pip install "jax[cuda12]"
#      ONLY if jax does not already see a GPU (guard:
#      jax.default_backend() == 'gpu'), and stop if it still does not.
#   2. ${OUT}/device.txt: nvidia-smi name and memory, jax devices.
#   3. bench_query.py, bench_dpsgd.py, bench_layers.py, bench_scaling.py, bench_distill.py at
#      full size: JSON to ${OUT}/<name>.json, stdout+stderr to
#      ${OUT}/<name>.log.
#   4. device.txt printed again at the end.
#
# Torch rows: bench_query.py and bench_dpsgd.py both accept --no-torch
# (skips every torch/opacus row; bench_dpsgd also has --no-opacus). A
# torch installed from PyPI here may be a CPU-only build or a CUDA build;
# the scripts move nothing to the GPU on the torch side (their torch rows
# are CPU eager code), so torch rows would time the host CPU against JAX
# on the GPU. They are therefore skipped by default; set WITH_TORCH=1 to
# keep them (then read them as CPU figures).
#
# bench_scaling.py part c runs its device-count children on 8 FAKE CPU
# devices (JAX_PLATFORMS=cpu, --xla_force_host_platform_device_count=8):
# with one GPU there is no multi-device mesh to time; those rows check
# that the sharded sums equal the unsharded ones and are host-CPU timings.
# Parts a and b (query vs N, distillation step vs IPC) run on the GPU.
set -euo pipefail

OUT="${OUT:-runs/gpu}"
PY="${PYTHON:-python}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
WITH_TORCH="${WITH_TORCH:-0}"

if [[ ! -f pyproject.toml && ! -f setup.py ]] || [[ ! -d dpgeng_jax ]]; then
  echo "run_gpu.sh: run me from the repository root" >&2
  exit 2
fi
mkdir -p "${OUT}"
# This checkout first, whatever is installed.
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

gpu_ok() {
  timeout 300 "${PY}" -c "import jax; assert jax.default_backend()=='gpu', jax.default_backend()" \
    >/dev/null 2>&1
}

echo "== install ($(date -Is))"
# A machine without network access cannot pip install: then carry on if
# this checkout and its dependencies already import (PYTHONPATH above).
if [[ "${SKIP_INSTALL:-0}" == "1" ]]; then
  echo "SKIP_INSTALL=1: not running pip install -e ."
elif ! timeout "${STEP_TIMEOUT}" "${PY}" -m pip install -q -e . 2>&1 | tail -n 20; then
  echo "pip install -e . failed; checking that the checkout imports anyway" >&2
fi
timeout 300 "${PY}" -c "import dpgeng_jax, flax, optax, dp_accounting; print('dpgeng_jax from', dpgeng_jax.__file__)"
if gpu_ok; then
  echo "jax already sees a GPU; not reinstalling jax"
else
  echo "jax does not see a GPU: installing jax[cuda12]"
  timeout "${STEP_TIMEOUT}" "${PY}" -m pip install -q "jax[cuda12]" 2>&1 | tail -n 20
  if ! gpu_ok; then
    echo "run_gpu.sh: jax still does not see a GPU after installing jax[cuda12]" >&2
    "${PY}" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())" >&2 || true
    exit 3
  fi
fi

write_device_txt() {
  {
    echo "# $(date -Is)"
    if command -v nvidia-smi >/dev/null 2>&1; then
      nvidia-smi --query-gpu=name,memory.total --format=csv
    else
      echo "nvidia-smi: not found"
    fi
    timeout 300 "${PY}" -c "import jax; print('jax', jax.__version__, 'backend', jax.default_backend()); print(jax.devices()); print([d.device_kind for d in jax.devices()])"
  } > "${OUT}/device.txt" 2>&1
}
write_device_txt
cat "${OUT}/device.txt"

TORCH_FLAG=(--no-torch)
if [[ "${WITH_TORCH}" == "1" ]]; then
  TORCH_FLAG=()
fi

# run NAME CMD...: bounded, stdout+stderr to ${OUT}/NAME.log (and the
# terminal); a failing or timed-out step is recorded and the next one runs.
FAILED=()
run() {
  local name="$1"
  shift
  echo "== ${name} ($(date -Is)): $*"
  local rc=0
  timeout "${STEP_TIMEOUT}" "$@" 2>&1 | tee "${OUT}/${name}.log" || rc=$?
  # With pipefail, rc is the first non-zero status of the pipeline
  # (124 = timed out).
  if [[ "${rc}" != "0" ]]; then
    echo "== ${name} FAILED (exit ${rc})" | tee -a "${OUT}/${name}.log"
    FAILED+=("${name}:${rc}")
  fi
}

run query "${PY}" benchmarks/bench_query.py ${TORCH_FLAG[@]+"${TORCH_FLAG[@]}"} \
  --out "${OUT}/query.json"
run dpsgd "${PY}" benchmarks/bench_dpsgd.py ${TORCH_FLAG[@]+"${TORCH_FLAG[@]}"} \
  --out "${OUT}/dpsgd.json"
run layers "${PY}" benchmarks/bench_layers.py --out "${OUT}/layers.json"
run scaling "${PY}" benchmarks/bench_scaling.py --out "${OUT}/scaling.json"
run distill "${PY}" benchmarks/bench_distill.py --out "${OUT}/distill.json"

write_device_txt
echo "== device ($(date -Is))"
cat "${OUT}/device.txt"
echo "== outputs in ${OUT}:"
ls -l "${OUT}"
if (( ${#FAILED[@]} )); then
  echo "failed steps: ${FAILED[*]}" >&2
  exit 1
fi

#!/usr/bin/env bash
# One command for a lent GPU machine: the CUDA variants of the device-parametrized tests, then bench/gpu.py.
# Logs and the JSON go under $OUT (the device tool's folder; ./gpu-out elsewhere). Each part has its own
# time limit, so a hang in one leaves the others' output.
#   bash bench/device_check.sh                      # tests + every bench section but the GRPO step
#   TESTS=0 BENCH_ARGS="--sections rollout" bash bench/device_check.sh
#   SWEEP=1 bash bench/device_check.sh              # also sweep the Triton kernels' tile sizes (bench/gpu_sweep.py)
#   GRPO=1 bash bench/device_check.sh               # also one GRPO step, ours vs TRL, on the GPU (bench/grpo_step.py)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/nvidia-smi.txt"
if [ "${BENCH:-1}" = 1 ]; then
  timeout "${BENCH_TIMEOUT:-330}" $PY bench/gpu.py ${BENCH_ARGS:---sections parity,greedy,logprobs,rollout,train,kernels} \
    > "$OUT/gpu.log" 2>&1
  echo "bench exit $?"
  grep -v '^{' "$OUT/gpu.log" | tail -40
  tail -1 "$OUT/gpu.log" > "$OUT/gpu.json"
fi
if [ "${GRPO:-0}" = 1 ]; then
  # TRL and what it needs are not on a GPU image: carried as wheels in .whl (see the device tool's README),
  # the peer scripts of ../shared/peers in .peers.
  if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  export R1_PEERS=${R1_PEERS:-$PWD/.peers}
  timeout "${GRPO_TIMEOUT:-150}" $PY bench/grpo_step.py --device cuda ${GRPO_ARGS:---steps 4 --tokens 32 --runners ours,trl} \
    > "$OUT/grpo_step.log" 2>&1
  echo "grpo_step exit $?"
  grep -v '^{' "$OUT/grpo_step.log" | tail -15
  tail -1 "$OUT/grpo_step.log" | tee "$OUT/grpo_step.json" | cut -c1-400
fi
if [ "${SWEEP:-0}" = 1 ]; then
  timeout "${SWEEP_TIMEOUT:-200}" $PY bench/gpu_sweep.py ${SWEEP_ARGS:-} > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?"
  tail -1 "$OUT/sweep.log" > "$OUT/sweep.json"
  $PY -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['best'], indent=0))" "$OUT/sweep.json" 2>/dev/null | head -60
fi
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider -k cuda -rs ${TEST_FILES:-\
    tests/test_rollout_decode_paths.py tests/test_rollout_sampler.py tests/test_kernels_decode_attention.py \
    tests/test_kernels_lm_head.py tests/test_kernels_moe.py tests/test_kernels_sampling.py} > "$OUT/tests.log" 2>&1
  echo "tests exit $?"; tail -25 "$OUT/tests.log"
fi

#!/usr/bin/env bash
# What runs on the lent GPU machine (the `device` tool; ../shared/device/README.md): the GPU tests and the
# GPU benchmarks, each under its own time limit, logs and JSON under $OUT.
#
#   bash .ci/device.sh install      # after every wheel part was copied to /tmp/parts (vLLM 0.24 + Ray)
#   bash .ci/device.sh tests        # pytest -m gpu: weight-sync exactness (ipc), trainer on CUDA, e2e in every
#                                   # placement one GPU allows (timeshare, share at eta 1 and 2), update modes
#   bash .ci/device.sh vs-trl       # streamrl bench vs-trl: TRL GRPOTrainer (vLLM colocate) vs each placement
#   bash .ci/device.sh e2e          # tests/test_gpu_e2e.py alone (timeshare, share at eta 1 and 2)
#   bash .ci/device.sh bench        # rollout, weight-sync (ipc), trainer, Qwen2-0.5B shape
#   bash .ci/device.sh rollout|rollout128|wsync|trainer|ipc-test|update-modes   # one alone (trainer also writes profiles)
#
# Each step's output goes to $OUT/<step>.log and its JSON to $OUT/<step>.json; a step that fails or runs
# past its limit is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  tail -n 25 "$OUT/$name.log"
}

QWEN05="--arch qwen2 --hidden 896 --layers 24 --vocab 151936"
bench_rollout() {  # bench_rollout LIMIT_S
  step bench_rollout "$1" python3 -m rl.cli bench rollout --device cuda $QWEN05 --heads 14 --kv-heads 2 \
    --intermediate 4864 --dtype bfloat16 --prompts 256 --n 4 --prompt-len 64 --max-tokens 512 \
    --max-num-seqs 256 --gpu-mem 0.8 --repeats 2 --out "$OUT/bench_rollout.json"
}
bench_wsync() {
  step bench_weight_sync "$1" python3 -m rl.cli bench weight-sync --device cuda $QWEN05 --transport ipc \
    --syncs 5 --out "$OUT/bench_weight_sync.json"
}
bench_trainer() {  # bench_trainer LIMIT_S [extra args]
  local limit=$1; shift
  step bench_trainer "$limit" python3 -m rl.cli bench trainer --device cuda --world-size 1 \
    --preset qwen2-0.5b --out "$OUT/bench_trainer.json" "$@"
}
bench_rollout128() {  # one step's batch of the vs-trl workload: 16 prompts x 8 samples, 64 + 512 tokens
  step bench_rollout128 "$1" python3 -m rl.cli bench rollout --device cuda $QWEN05 --heads 14 --kv-heads 2 \
    --intermediate 4864 --dtype bfloat16 --prompts 16 --n 8 --prompt-len 64 --max-tokens 512 \
    --max-num-seqs 256 --gpu-mem 0.35 --repeats 2 --out "$OUT/bench_rollout128.json"
}
case "${1:-}" in
  install)
    if [ ! -d /tmp/site/vllm ]; then
      (cd /tmp && cat /tmp/parts/wh.tar.* | tar xf - && python3 -m pip install -q --no-index --no-deps \
         --no-compile --no-cache-dir --target /tmp/site /tmp/wh/*.whl) || exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
    ;;
  tests)
    step gpu_tests "${2:-480}" python3 -m pytest -q -m gpu -s -p no:cacheprovider \
      tests/test_weight_sync.py tests/test_trainer_gpu.py tests/test_gpu_e2e.py tests/test_rollout.py
    ;;
  vs-trl)
    step bench_vs_trl "${2:-560}" python3 -m rl.cli bench vs-trl --device cuda --out "$OUT/bench_vs_trl.json" \
      ${VS_TRL_ARGS:-}
    ;;
  rollout128)
    bench_rollout128 "${2:-240}"
    ;;
  e2e)  # the placements on one GPU: per-token versions and the staleness bound on every trained sample
    step gpu_e2e "${2:-420}" python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu_e2e.py
    ;;
  rollout)
    bench_rollout "${2:-400}"
    ;;
  update-modes)
    step gpu_update_modes "${2:-300}" python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_rollout.py -k update_modes
    ;;
  spy)  # in the background beside vs-trl: py-spy (carried as .venv/bin/py-spy) samples the share run's rollout
         # actor, trainer and driver for ${2:-15} s once its second step is logged; collapsed stacks under $OUT/spy
    mkdir -p "$OUT/spy"
    for _ in $(seq 600); do
      m=$(ls /tmp/streamrl-vs-trl-share-*/metrics.jsonl 2>/dev/null | head -1)
      [ -n "$m" ] && [ "$(wc -l < "$m")" -ge 2 ] && break
      sleep 1
    done
    for who in "ray::RolloutWorker" "ray::TrainerWorker" "rl.bench.vs_trl"; do
      pid=$(pgrep -f "$who" | head -1)
      [ -n "$pid" ] && .venv/bin/py-spy record --pid "$pid" --duration "${2:-15}" --rate 200 --format raw \
        --nonblocking -o "$OUT/spy/${who//[:.]/_}.txt" > "$OUT/spy/${who//[:.]/_}.log" 2>&1 &
    done
    wait
    ;;
  ipc-test)
    step gpu_ipc_test "${2:-300}" python3 -m pytest -q -s -p no:cacheprovider "tests/test_weight_sync.py::test_gpu_sync_is_exact[ipc-M1-tp1]"
    ;;
  bench)
    bench_rollout "${2:-400}"
    bench_wsync "${3:-150}"
    bench_trainer "${4:-150}" --rounds 3
    ;;
  wsync)
    bench_wsync "${2:-150}"
    ;;
  trainer)
    bench_trainer "${2:-300}" --rounds 6 --profile "$OUT/trainer_profile"
    ;;
  *)
    echo "usage: $0 install|tests|e2e|vs-trl|bench|rollout|rollout128|wsync|trainer|ipc-test|update-modes" >&2; exit 2 ;;
esac

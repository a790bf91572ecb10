#!/usr/bin/env bash
# Every GPU check and benchmark of simigrad-compile, on a machine with a CUDA GPU (two or more for NCCL).
#
#     bash bench/gpu.sh                 # from the repository root, after the README's install
#     PYTHON=.venv/bin/python bash bench/gpu.sh
#
# Steps (each logged to bench/results/gpu_<stamp>/<step>.log; a failed step does not stop the others):
#   kernel-tests   Triton compiled for the GPU (TRITON_INTERPRET=0): the three ops against fp64 in fp32/bf16/fp16,
#                  CUDA-graph capture and replay of the launches, no host synchronisation in the launch path,
#                  the custom op inside an Inductor graph with mode="reduce-overhead"; plus the CPU kernel tests
#   rung-graphs    one CUDA graph per micro-batch rung, switching rungs without a recompile (tests/test_runtime.py)
#   kernels-fp32   bench/bench_kernels.py --device cuda: GB/s against the copy bandwidth (goal >= 85%), fp32 and bf16
#   kernels-bf16
#   step           bench/bench_step.py --device cuda: simigrad / inductor step time on a GPT (goal <= 1.05)
#   nccl-check     (>= 2 GPUs) the split-group DDP reduction on NCCL: gradients and statistics against references
#   nccl-ddp       (>= 2 GPUs) bench/bench_ddp.py --backend nccl: bytes and step time, ours / plain DDP / original
# Results: bench/results/kernels_cuda*.json, step_cuda.json, ddp_*.json, and bench/results/gpu_<stamp>.json, which
# lists every step with its command, exit status, seconds and log.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGS=bench/results/gpu_$STAMP
mkdir -p "$LOGS"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true
STEPS=()

step() {  # step NAME COMMAND...: run, log, record
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "== $name: exit $rc, $((SECONDS - start)) s"
    STEPS+=("$name|$rc|$((SECONDS - start))|$*")
}

step kernel-tests "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_kernels_gpu.py tests/test_kernels.py \
    tests/test_kernels_inductor.py --junitxml="$LOGS/kernel-tests.xml"
step rung-graphs "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_runtime.py -k cuda_graph \
    --junitxml="$LOGS/rung-graphs.xml"
step kernels-fp32 "$PY" bench/bench_kernels.py --device cuda --sizes 1M,16M,64M,256M --repeats 21 \
    --out bench/results/kernels_cuda.json
step kernels-bf16 "$PY" bench/bench_kernels.py --device cuda --sizes 1M,16M,64M,256M --repeats 21 --dtype bfloat16 \
    --out bench/results/kernels_cuda_bf16.json
step step "$PY" bench/bench_step.py --device cuda --batch 8,32 --seq 512 --d-model 512 --layers 8 \
    --out bench/results/step_cuda.json
if [ "$GPUS" -ge 2 ]; then
    step nccl-check env -C tests "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m simigrad_testkit.nccl_worker
    step nccl-ddp "$PY" bench/bench_ddp.py --backend nccl --worlds 2 --widths 2048 4096 --batch 64 --bucket-mb 25
else
    echo "== nccl: skipped ($GPUS GPU visible; needs 2)"
    STEPS+=("nccl-check|skipped|0|needs 2 GPUs" "nccl-ddp|skipped|0|needs 2 GPUs")
fi

"$PY" - "$LOGS" "$STAMP" "$GPUS" "${STEPS[@]}" <<'EOF'
import json, sys, torch
logs, stamp, gpus, *steps = sys.argv[1:]
rows = []
for s in steps:
    name, rc, secs, cmd = s.split("|", 3)
    rows.append({"step": name, "exit": rc, "seconds": int(secs), "command": cmd, "log": f"{logs}/{name}.log"})
out = {"timestamp": stamp, "gpu": torch.cuda.get_device_name(), "gpus": int(gpus), "torch": torch.__version__,
       "steps": rows}
path = f"bench/results/gpu_{stamp}.json"
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print(f"saved {path}")
failed = [r["step"] for r in rows if r["exit"] not in ("0", "skipped")]
print("failed steps:", ", ".join(failed) if failed else "none")
sys.exit(1 if failed else 0)
EOF

#!/usr/bin/env bash
# The GPU figures in one go: machine and versions, correctness, update-step MFU
# (with a profile of one step), decode against the bandwidth bound, and the
# full GRPO step side by side with Tunix. Run from the repository root:
#
#     OUT=results bash benchmarks/gpu_suite.sh           # on a GPU machine
#     OUT=/tmp/s TINY=1 bash benchmarks/gpu_suite.sh     # tiny shapes on CPU (a smoke run)
#
# Each part runs under its own `timeout` (seconds: T_CORRECTNESS, T_MFU,
# T_DECODE, T_FULLSTEP) and writes its raw output to $OUT/<part>.txt; a part
# that fails or times out is recorded in $OUT/summary.txt and the next one
# runs. PARTS picks and orders the parts (default: all). Tunix runs if its
# package imports (e.g. installed with `pip install --target` on PYTHONPATH).
set -u
OUT=${OUT:?set OUT to the folder for the outputs}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
PARTS=${PARTS:-"env correctness mfu decode fullstep"}
TINY=${TINY:-0}
SUMMARY="$OUT/summary.txt"
echo "gpu suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${SUITE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
    | tee "$SUMMARY"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name: $* (timeout ${limit}s)" | tee "$OUT/$name.txt"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.txt" 2>&1
    local rc=$?
    local status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="FAILED rc=$rc"
    echo "$name: $status in $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

env_info() {
    nvidia-smi || echo "nvidia-smi: not available"
    uname -a
    nproc
    python3 - <<'EOF'
import importlib.metadata as md, platform
import jax
print("python", platform.python_version())
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
          "numpy", "transformers", "torch", "safetensors", "tokenizers", "google-tunix", "google-metrax", "qwix"):
    try:
        print(f"{p} {md.version(p)}")
    except md.PackageNotFoundError:
        pass
print("devices", jax.devices())
EOF
}

if [ "$TINY" = 1 ]; then
    MFU_ARGS=(--tiny --steps 1)
    DECODE_ARGS=(--tiny --batch 4)
    FULL_ARGS=(--quick --sections step --repeats 1 --vocab 512 --d-model 64 --layers 2 --heads 4 --kv-heads 2
               --d-ff 128 --completion-len 8 --prompts 2)
else
    MFU_ARGS=(--models qwen2.5-1.5b qwen2.5-0.5b --seqs 1024 4096 --steps 3)
    DECODE_ARGS=(--batch 64 256 --repeats 2)
    # FULL_MODEL=1.5b (default): Qwen2.5-1.5B's shape, 151,936 vocab, d_model 1536, 28 layers, 12/2 heads,
    # d_ff 8960; FULL_MODEL=0.5b: Qwen2.5-0.5B's, d_model 896, 24 layers, 14/2 heads, d_ff 4864.
    if [ "${FULL_MODEL:-1.5b}" = 0.5b ]; then
        SHAPE=(--vocab 151936 --d-model 896 --layers 24 --heads 14 --kv-heads 2 --d-ff 4864)
    else
        SHAPE=(--vocab 151936 --d-model 1536 --layers 28 --heads 12 --kv-heads 2 --d-ff 8960)
    fi
    FULL_ARGS=(--sections step --repeats 2 --warmup 0 "${SHAPE[@]}")
fi

for p in $PARTS; do
    case $p in
        env) export -f env_info; part env 60 bash -c env_info ;;
        correctness) part correctness "${T_CORRECTNESS:-90}" python3 benchmarks/gpu_correctness.py ;;
        mfu) part mfu "${T_MFU:-150}" python3 benchmarks/bench_mfu_gpu.py "${MFU_ARGS[@]}" \
                 --profile /tmp/mfu_profile ;;
        decode) part decode "${T_DECODE:-100}" python3 benchmarks/bench_decode_gpu.py "${DECODE_ARGS[@]}" ;;
        fullstep)
            # Both libraries' workers share the GPU: no preallocation of 75% of its memory per process.
            part fullstep "${T_FULLSTEP:-200}" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
                JAX_PLATFORMS="${JAX_PLATFORMS:-$([ "$TINY" = 1 ] && echo cpu || echo cuda)}" \
                python3 benchmarks/run_cpu.py --libraries ours,tunix --work-dir /tmp/fullstep "${FULL_ARGS[@]}"
            for f in /tmp/fullstep/logs/*; do
                [ -f "$f" ] && { echo "--- worker log $f (last 40 lines)"; tail -40 "$f"; } >>"$OUT/fullstep.txt"
            done
            ;;
        *) echo "unknown part $p" | tee -a "$SUMMARY" ;;
    esac
done
echo "gpu suite done: $(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee -a "$SUMMARY"

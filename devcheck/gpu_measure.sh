#!/usr/bin/env bash
# Device check of the measure stage's GPU micro-benchmark on a CUDA machine, offline.
#
# Installs the wheels in devcheck/wheels (what `python -m cluster.measure` imports besides the
# standard library and torch) into a scratch directory, runs the gpu verb as the measure stage
# does (`python -m cluster.measure gpu`, the GpuRequest as JSON on stdin), and plans
# Llama-3.1-8B on one device with and without the measurement.
#
# Writes to $OUT: gpu.json (the verb's reply), gpu.err (its stderr), plan.txt, timing.txt.
# Environment: PYTHON (default python3), SITE (default /tmp/site), WHEELS (default
# devcheck/wheels), OUT (default a new temporary directory). Ends within 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-devcheck/wheels}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
began=$(date +%s%N)
lap() { echo "$1 $((($(date +%s%N) - began) / 1000000)) ms" | tee -a "$OUT/timing.txt"; }

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels in $WHEELS: download them first (see docs/PLANNER.md, measured GPU nodes)" >&2
  exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "${wheels[@]}"
export PYTHONPATH=$SITE:$PWD
lap "wheels installed:"

# The request exactly as the stage sends it: the GpuRequest's defaults as one JSON line.
request=$("$PYTHON" -c 'from cluster.measure import GpuRequest; print(GpuRequest().model_dump_json())')
echo "request: $request"
rc=0
timeout 150 "$PYTHON" -m cluster.measure gpu <<<"$request" >"$OUT/gpu.out" 2>"$OUT/gpu.err" || rc=$?
tail -n 1 "$OUT/gpu.out" | tee "$OUT/gpu.json"
lap "gpu verb (exit $rc):"
if [ "$rc" -ne 0 ]; then
  echo "the gpu verb failed: $(tail -n 1 "$OUT/gpu.err")" >&2
  exit "$rc"
fi

"$PYTHON" - "$OUT/gpu.json" <<'EOF' | tee "$OUT/plan.txt"
import json
import socket
import sys

from cluster.device_specs import device_for_gpu_name, get_device, measured_gpu_device
from cluster.measure import GpuMeasurement
from cluster.planner import ClusterShape, PlanOptions, plan_deployment
from cluster.planner.calibration import calibration_shape
from cluster.planner.efficiency import CALIBRATION_RATES

reply = json.load(open(sys.argv[1]))
measured = GpuMeasurement.model_validate(reply)
print(f"measured: {measured.describe()} in {measured.seconds:.1f} s")
for d in measured.devices:
    print(
        f"  cuda:{d.index} {d.name}: copy {d.copy_gbs:.1f} GB/s, matmul {d.matmul_tflops:.1f} "
        f"TFLOP/s at {d.matmul_size}, stream {d.stream_gbs} GB/s, {d.seconds:.1f} s"
    )
reference = CALIBRATION_RATES["nvidia-hopper"]
print(
    f"calibration device: copy {reference.copy_gbs:.1f} GB/s ({reference.source}); this "
    f"device / it = {measured.copy_gbs / reference.copy_gbs:.3f}"
)
print(f"reference matmul candidate (same method): {measured.matmul_tflops:.1f} TFLOP/s")
table = device_for_gpu_name(measured.slowest.name) or get_device("h100-sxm")
with_it = measured_gpu_device(measured, where=socket.gethostname())
shape = calibration_shape("llama-3.1-8b")
for label, device in (("without measurement", table), ("with measurement", with_it)):
    for concurrency in (1, 32):
        options = PlanOptions(
            prompt_len=512, concurrency=concurrency, max_model_len=2048, mem_fraction=0.9
        )
        plan = plan_deployment(shape, ClusterShape(device=device), options)
        e = plan.performance.expected
        print(
            f"{label:20} {device.key} c={concurrency:<3} decode {e.decode_at_concurrency.total_ms:.3f}"
            f" ms/token, prefill 512 {e.prefill.total_ms:.3f} ms, {e.throughput_tokens_per_s:,.0f}"
            " tok/s"
        )
    print(f"  {plan.notes[0]}")
EOF
lap "total:"

#!/usr/bin/env bash
# The GPU measurements of the performance page (issue 8), in one script for a fresh GPU machine:
#   1. the mixed-precision loss check: every loss on float16 predictions equals the float32 value within rounding;
#   2. `beadseg bench` for unet, resunet and attention_resunet at 512x512, 64 base filters, mixed precision + XLA,
#      batch 8, 16 and 32 (most important first: unet at batch 16, then batch 32 of every architecture).
# Writes under $OUT (default runs/gpu_bench): loss_precision.csv, bench_*.csv (one row per configuration, written
# as each finishes), gpu_bench.log, summary.txt. Every step runs under a deadline so that the whole script ends
# within $BUDGET seconds (default 500) and keeps whatever it measured.
#
# Usage, from anywhere:   OUT=/path/to/results tools/gpu_bench.sh        (STEPS=10 WARMUP=3 BUDGET=500 by default)
# Smoke test of the script on a CPU: ALLOW_CPU=1 SIZE=64 BASE=8 STEPS=2 WARMUP=1 OUT=/tmp/gb tools/gpu_bench.sh
# Python: .venv/bin/python if it has TensorFlow, else python3 if it has TensorFlow (beadseg runs from this checkout
# via PYTHONPATH, no install), else a new .venv with `pip install -e ".[gpu]"` (needs the package registry; several
# minutes, not counted in BUDGET's estimate).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-runs/gpu_bench}
STEPS=${STEPS:-10} WARMUP=${WARMUP:-3} BUDGET=${BUDGET:-500} SIZE=${SIZE:-512} BASE=${BASE:-64}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
START=$(date +%s)
log() { echo "[gpu_bench +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

has_tf() { "$1" -c 'import tensorflow, keras, pandas, skimage, tifffile, scipy, imageio' 2>/dev/null; }
if [ -x .venv/bin/python ] && has_tf .venv/bin/python; then PY=.venv/bin/python
elif command -v python3 >/dev/null && has_tf python3; then PY=python3
else
  log "no Python with TensorFlow: creating .venv and installing beadseg[gpu] (needs the package registry)"
  if ! { python3 -m venv .venv && .venv/bin/pip install -q -e ".[gpu]"; }; then log "FAILED: could not install beadseg[gpu]"; exit 1; fi
  PY=.venv/bin/python
  START=$(date +%s)  # the budget is for the measurements
  log "installed"
fi
log "python: $PY ($("$PY" --version 2>&1))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF' || { log "FAILED: TensorFlow sees no GPU"; exit 1; }
import os
import tensorflow as tf
gpus = tf.config.list_physical_devices('GPU')
print('tensorflow', tf.__version__, 'GPUs:', gpus)
raise SystemExit(0 if gpus or os.environ.get('ALLOW_CPU') else 1)
EOF
OVERHEAD=()
"$PY" -c 'import papermill, ipykernel' 2>/dev/null || { OVERHEAD=(--no-overhead); log "papermill/ipykernel missing: kernel start not timed"; }

# run `beadseg ARGS` with what is left of the budget (SIGINT at the deadline: the rows written so far stay)
run_beadseg() {
  local t; t=$(left)
  if [ "$t" -lt 30 ]; then log "skipped, out of time: beadseg $*"; return 0; fi
  timeout --signal=INT --kill-after=15 "$t" "$PY" -c '
import sys
from beadseg.cli import main
try: sys.exit(main())
except KeyboardInterrupt: sys.exit("beadseg bench: stopped at the deadline; the rows written so far are kept")' "$@"
}

log "1. mixed precision and the losses (float16 vs float32 predictions, 8 x 512 x 512)"
timeout 120 "$PY" - "$OUT/loss_precision.csv" <<'EOF'
import sys
from beadseg.bench import loss_precision_table
table = loss_precision_table(size=512, batch=8)
table.to_csv(sys.argv[1], index=False)
print(table.to_string(index=False))
print('loss check:', 'ok, every loss agrees within float32 rounding' if table.ok.all() else 'FAILED')
EOF

FULL=(--image-size "$SIZE" --base-filters "$BASE" --precision mixed --xla on --steps "$STEPS" --warmup "$WARMUP" --rounds 2)
log "2. unet ${SIZE}x${SIZE}, batch 16, 32, 8"
run_beadseg bench --architectures unet --batch-sizes 16,32,8 "${FULL[@]}" "${OVERHEAD[@]}" --out "$OUT/bench_unet.csv"
log "3. resunet and attention_resunet, batch 32"
run_beadseg bench --architectures resunet,attention_resunet --batch-sizes 32 "${FULL[@]}" --no-overhead --out "$OUT/bench_res_bs32.csv"
log "4. resunet and attention_resunet, batch 8 and 16"
run_beadseg bench --architectures resunet,attention_resunet --batch-sizes 8,16 "${FULL[@]}" --no-overhead --out "$OUT/bench_res_bs8_16.csv"

log "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import sys
from pathlib import Path
import pandas as pd
from beadseg.bench import bench_table
files = sorted(Path(sys.argv[1]).glob('bench_*.csv'))
if not files: raise SystemExit('no benchmark rows were written')
table = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
table.to_csv(Path(sys.argv[1])/'bench_all.csv', index=False)
print('device:', table.device.iloc[0])
print(bench_table(table))
unet16 = table[(table.architecture == 'unet') & (table.batch_size == 16)].images_per_s.dropna()
size = table.image_size.iloc[0]
if len(unet16): print(f'unet {size}x{size} batch 16: {unet16.iloc[0]:.0f} images/s (goal at 512x512 on an H100: >= 280)')
bs32 = table[table.batch_size == 32]
print('batch 32:', ', '.join(f"{r.architecture} {'fits' if pd.isna(r.error) else 'FAILED: ' + r.error}" for r in bs32.itertuples()))
EOF
log "done"

"""Peak host memory and time per effective batch of 32, plain against gradient accumulation (CPU evidence for PERFORMANCE.md).
Each setting runs in a fresh process, so each peak RSS is its own. Usage: python tools/accumulation_evidence.py [ARCH] [SIZE] [BASE]"""
import json, subprocess, sys
ONE = """
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np
from beadseg.config import PROJECT_SETTINGS, load_settings
from beadseg.runs import config_from_settings
from beadseg.train import build_or_resume
arch, size, base, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = config_from_settings(load_settings(PROJECT_SETTINGS), architecture=arch, batch_size=32, image_size=size, base_filters=base,
                              micro_batch_size=micro, mixed_precision='off', jit_compile='off', out_dir='-')
model, _ = build_or_resume(config, Path(tempfile.mkdtemp()), 1, micro)
x = np.random.default_rng(0).random((micro, size, size, 1), np.float32); y = (x > 0.7).astype(np.float32)
passes = 32 // micro
for _ in range(passes): model.train_on_batch(x, y)  # the first effective batch: tracing
times = []
for _ in range(3):
    started = time.perf_counter()
    for _ in range(passes): model.train_on_batch(x, y)
    times.append(time.perf_counter() - started)
print(json.dumps(dict(micro=micro, passes=passes, batch_s=float(np.median(times)), peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""
arch, size, base = (sys.argv[1:] + ['attention_resunet', '128', '16'][len(sys.argv) - 1:])[:3]
print(f'{arch}, {size} x {size}, base {base}, float32, effective batch 32; median of 3 effective batches after one untimed')
print('| micro-batch | passes | s per batch of 32 | peak host RSS MiB |\n|---|---|---|---|')
for micro in (32, 16, 8):
    out = subprocess.run([sys.executable, '-c', ONE, arch, size, base, str(micro)], capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {row['micro']} | {row['passes']} | {row['batch_s']:.2f} | {row['peak_rss_mib']:.0f} |", flush=True)

"""Full-size GPU check of beadseg's models and losses with Keras 3 on the JAX backend.

For a GPU machine without TensorFlow (this workplace's lent GPU has JAX but no TensorFlow, and nothing can be
installed there beyond a few carried wheels). It measures the training step of the real models, losses, metrics and
optimizer at 512 x 512, base 64, mixed precision, XLA-compiled, on in-memory batches: images/s, step time and peak GPU
memory for each architecture and batch size; and that the losses give the same values from float16 and float32
predictions. It does not exercise the tf.data pipeline (see `beadseg bench` for that, on a TensorFlow machine).

    OUT=folder python3 tools/gpu_keras_jax.py [BUDGET_SECONDS]

COMBOS=unet:8,resunet:16 picks configurations; LOSSES=0 skips the precision check. All chosen configurations are
first compiled at once, in parallel processes, into JAX's persistent compilation cache (compiling is CPU work, 51 to
123 s each); then each is timed alone, so the timings do not share the GPU.
"""
import csv, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = [('unet', 16), ('unet', 32), ('resunet', 32), ('attention_resunet', 32), ('unet', 8),
         ('attention_resunet', 16), ('resunet', 16), ('resunet', 8), ('attention_resunet', 8)]
COLUMNS = ['architecture', 'batch_size', 'images_per_second', 'step_ms_median', 'peak_gpu_gib', 'compile_s', 'params',
           'device', 'error']


CACHE = '/tmp/jax_cache'


def one(architecture, batch, steps=10, warmup=3):
    "Measure one configuration in this process; print one JSON line. With `steps=0`, only compile it into the cache."
    os.environ['KERAS_BACKEND'] = 'jax'
    import numpy as np, jax, keras
    jax.config.update('jax_compilation_cache_dir', CACHE)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    sys.path.insert(0, str(ROOT))
    from beadseg.models import build_model
    from beadseg.losses import get_loss, Jaccard, DiceCoef
    keras.mixed_precision.set_dtype_policy('mixed_float16')
    size, base = int(os.environ.get('SIZE', 512)), int(os.environ.get('BASE', 64))  # smaller only for a smoke test
    model = build_model(architecture, (size, size, 1), base, 0.3)
    model.compile(keras.optimizers.Adam(5e-5), loss=get_loss('focal_tversky'),
                  metrics=[Jaccard(name='jaccard'), DiceCoef(name='dice')], jit_compile=True)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.random((batch, size, size, 1), dtype=np.float32))
    y = jax.device_put((rng.random((batch, size, size, 1)) < 0.12).astype(np.float32))
    started = time.perf_counter()
    model.train_on_batch(x, y)  # traces and compiles
    compile_s = time.perf_counter() - started
    if not steps: return print(json.dumps(dict(architecture=architecture, batch_size=batch, compile_s=round(compile_s, 1))))
    for _ in range(warmup): model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        t = time.perf_counter(); model.train_on_batch(x, y); times.append(time.perf_counter() - t)  # returns floats: synchronises
    step = float(np.median(times))
    peak = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use', 0) / 2**30
    print(json.dumps(dict(architecture=architecture, batch_size=batch, images_per_second=round(batch / step, 1),
                          step_ms_median=round(step * 1000, 1), peak_gpu_gib=round(peak, 2), compile_s=round(compile_s, 1),
                          params=model.count_params(), device=str(jax.devices()[0].device_kind), error='')))


def losses():
    "Each loss from float16 predictions equals the loss from the same values in float32, at batch 32 of 512 x 512."
    os.environ['KERAS_BACKEND'] = 'jax'
    import numpy as np, keras
    sys.path.insert(0, str(ROOT))
    from beadseg.losses import LOSSES, get_loss
    rng = np.random.default_rng(1)
    y = (rng.random((32, 512, 512, 1)) < 0.12).astype(np.float32)
    p16 = rng.random((32, 512, 512, 1)).astype(np.float16)
    rows = []
    for name in LOSSES:
        loss = get_loss(name)
        a, b = float(loss(y, p16)), float(loss(y, p16.astype(np.float32)))
        rows.append(dict(loss=name, from_float16=a, from_float32=b, relative_difference=abs(a - b) / max(abs(b), 1e-12),
                         finite=bool(np.isfinite(a))))
    print(json.dumps(rows))


def main(budget=420):
    out = Path(os.environ.get('OUT', '.'))
    end = time.time() + budget
    started = time.time()
    order = [(a, int(b)) for a, b in (c.split(':') for c in os.environ['COMBOS'].split(','))] if 'COMBOS' in os.environ else ORDER
    compiling = [subprocess.Popen([sys.executable, __file__, 'compile', a, str(b)], stdout=subprocess.PIPE, text=True)
                 for a, b in order]
    if os.environ.get('LOSSES') != '0':
        check = subprocess.run([sys.executable, __file__, 'losses'], capture_output=True, text=True, timeout=180)
        rows = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else []
        (out/'loss_precision.json').write_text(json.dumps(rows, indent=1) or check.stderr[-2000:])
        print('losses:', rows or check.stderr[-2000:], flush=True)
    for p in compiling:
        try: compiled = p.communicate(timeout=max(end - time.time() - 60, 1))[0].strip()
        except subprocess.TimeoutExpired: p.kill(); compiled = 'not compiled: budget spent'
        print(f'{time.time() - started:5.0f} s', compiled, flush=True)
    with open(out/'gpu_keras_jax.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, COLUMNS); writer.writeheader()
        for architecture, batch in order:
            left = end - time.time()
            if left < 20: print(f'skipped {architecture} batch {batch}: budget spent', flush=True); continue
            try:
                done = subprocess.run([sys.executable, __file__, 'one', architecture, str(batch)], capture_output=True,
                                      text=True, timeout=left)
                row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else dict(
                    architecture=architecture, batch_size=batch, error=done.stderr.strip().splitlines()[-1][:300])
            except subprocess.TimeoutExpired:
                row = dict(architecture=architecture, batch_size=batch, error='timed out')
            writer.writerow(row); f.flush()
            print(f'{time.time() - started:5.0f} s', row, flush=True)


if __name__ == '__main__':
    if sys.argv[1:2] == ['one']: one(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ['compile']: one(sys.argv[2], int(sys.argv[3]), steps=0)
    elif sys.argv[1:2] == ['losses']: losses()
    else: main(*map(int, sys.argv[1:]))

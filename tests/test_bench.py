"`beadseg bench`: the CSV it writes (every column, numbers consistent within each row) and its errors. No timing assertions."
import os, subprocess, sys
import numpy as np, pandas as pd, pytest
from conftest import run_beadseg

TINY = ('--image-size', '64', '--base-filters', '8', '--steps', '2', '--warmup', '1', '--rounds', '2')
CPU_EMPTY = {'peak_gpu_memory_mb', 'error'}  # no GPU memory on a CPU, and no error


@pytest.fixture(scope='module')
def beads(tmp_path_factory):
    from beadseg.synthetic import synthesize
    return synthesize(tmp_path_factory.mktemp('data')/'beads', n_images=6, size=96, seed=2, preset='easy')


def test_bench_writes_every_column_with_ratios_from_the_same_run(beads, tmp_path):
    from beadseg.bench import COLUMNS
    out = tmp_path/'bench.csv'
    done = run_beadseg('bench', '--dataset', beads, '--batch-sizes', '3', *TINY, '--out', out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith('beadseg bench on CPU')
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS
    assert table.batch_size.tolist() == [3] and table.architecture.tolist() == ['unet']
    assert table[[c for c in COLUMNS if c not in CPU_EMPTY]].notna().all().all()
    assert table[list(CPU_EMPTY)].isna().all().all()
    assert (table.precision == 'float32').all() and (table.xla == 'off').all()  # auto on a CPU
    timed = ['step_s', 'ref_step_s', 'images_per_s', 'ref_images_per_s', 'pipeline_images_per_s', 'kernel_start_s', 'build_s',
             'first_step_s', 'ratio', 'pipeline_margin', 'achieved_tflops', 'overhead_s']
    assert (table[timed] > 0).all().all() and np.isfinite(table[timed]).all().all()
    assert (table.first_step_s > table.step_s).all()  # the first step traces the training function
    assert (table.overhead_s > table.kernel_start_s).all()  # a configuration pays more than its kernel start before training
    assert ((table.ratio > 0.1) & (table.ratio < 10)).all()  # the same model on the same crops, fed two ways: comparable
    assert 'ours/ref' in done.stdout and done.stdout.count('\n unet') == 1  # the printed table


def test_bench_records_a_batch_larger_than_the_dataset(beads, tmp_path):
    out = tmp_path/'bench.csv'
    done = run_beadseg('bench', '--dataset', beads, '--batch-sizes', '8', *TINY, '--no-overhead', '--out', out)
    assert done.returncode == 1
    table = pd.read_csv(out)
    assert table.error.str.startswith("batch size 8 is larger than an epoch's 6 training crops of 64 px").all(), table.error
    assert table.images_per_s.isna().all()


def test_bench_bad_flags_fail_in_one_line(tmp_path):
    for args, message in [(('--precision', 'half'), "--precision 'half'"), (('--image-size', '100'), 'multiple of 2^depth')]:
        done = run_beadseg('bench', *args, '--out', tmp_path/'x.csv')
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
        assert not (tmp_path/'x.csv').exists()
    probe = "import sys; from beadseg.cli import main; main(['bench', '--image-size', '100']); print('tensorflow' in sys.modules)"
    loaded = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.stdout.strip() == 'False', loaded.stdout + loaded.stderr  # refused before TensorFlow loads (1 s, not 10)


def test_pipeline_cores_reports_rates_per_core_and_the_cores_a_gpu_needs(beads):
    done = run_beadseg('bench', '--pipeline-cores', '--dataset', beads, '--image-size', '32', '--gpu-rate', '1e9')
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rows = [l.split() for l in lines[2:-1]]  # below the title and the header, above the conclusion
    assert [int(r[0]) for r in rows] == sorted({1, 2, os.cpu_count()})
    for cores, size, total, per_core in ((int(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in rows):
        assert size == 32 and total > 0 and per_core == pytest.approx(total / cores, rel=0.01, abs=0.1)
    needed, words = lines[-1].split(maxsplit=1)
    assert words == 'cores feed a GPU training 1e+09 images/s at this per-core rate'
    assert int(needed) == pytest.approx(1e9 / float(rows[-1][3]), rel=0.01)  # the per-core rate with the most cores
    bad = run_beadseg('bench', '--pipeline-cores', '--dataset', beads, '--image-size', '32', '--gpu-rate', '0')
    assert bad.returncode == 2 and bad.stderr.strip() == 'beadseg bench: error: --gpu-rate must be a positive number of images per second, got 0.0'


def test_compile_cache_times_the_first_step_without_and_with_a_persistent_cache():
    done = run_beadseg('bench', '--compile-cache', '--image-size', '32', '--base-filters', '4', '--batch-sizes', '2')
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == 'first training step with XLA, unet 32x32 batch 2, base 4, each in a fresh process'
    rows = [l.rsplit(maxsplit=3) for l in lines[2:]]
    assert [r[0].strip() for r in rows] == ['none', 'empty (filled by this run)', 'filled by the run before']
    for _, first, step, compile_s in rows:
        assert float(first) > float(step) > 0 and float(compile_s) > 0  # XLA compiles in the first step, whatever the cache


def test_bench_halving_runs_a_grid_and_halving_on_the_same_space_in_one_run(tmp_path):
    "Two configurations: the grid trains both 2 epochs; halving both 1, then the better one a second (3 epochs in all)."
    from beadseg.synthetic import synthesize
    beads = synthesize(tmp_path/'beads', n_images=8, size=128, seed=1, preset='easy')
    out = tmp_path/'bench'
    done = run_beadseg('bench', '--halving', '--dataset', beads, '--out', out, '--architectures', 'unet', '--batch-sizes', '4',
                       '--loss-functions', 'dice,focal', '--max-epochs', '2', '--min-epochs', '1', '--patience', '2', '--workers', '1',
                       timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = pd.read_csv(out/'halving_bench.csv').set_index('search')
    assert table.configurations.tolist() == [2, 2] and table.full_grid_epochs.tolist() == [4, 4]
    assert table.epochs.to_dict() == {'grid': 4, 'halving': 3}
    assert (table.wall_s > 0).all() and (table.ci_low <= table.val_jaccard).all() and (table.val_jaccard <= table.ci_high).all()
    assert "Halving trained 3 epochs, 75% of the grid's 4 (75% of the 4 of a grid without early stopping)." in done.stdout
    grid = pd.read_csv(next((out/'grid').glob('*/search_results_final.csv'))).set_index('config_id')
    halving = pd.read_csv(next((out/'halving').glob('*/search_results_final.csv')))
    assert sorted(grid.status) == ['completed', 'completed'] and sorted(halving.status) == ['completed', 'pruned']
    winner, grid_winner = table.winner['halving'], table.winner['grid']
    if winner == grid_winner: assert f"It found the grid's winner, {grid_winner}." in done.stdout
    else:  # the verdict follows from the grid's own score of halving's winner and its winner's interval
        inside = grid.val_jaccard[winner] >= table.ci_low['grid']
        assert ('within the grid\'s noise' if inside else 'is worse than the grid\'s') in done.stdout

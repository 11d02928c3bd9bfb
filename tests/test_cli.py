"The beadseg command: overrides, one-line errors without tracebacks, exit codes."
import pytest
from conftest import run_beadseg, edited_settings, ROOT


def test_settings_prints_merged_values():
    out = run_beadseg('settings', '--image-size', '128', '--loss-functions', 'focal,dice')
    assert out.returncode == 0, out.stderr
    assert 'image_size = 128\n' in out.stdout and 'loss_functions = focal, dice\n' in out.stdout
    assert 'learning_rate = 5e-05\n' in out.stdout


@pytest.mark.parametrize('old, new, key', [
    ('max_epochs = 200', 'max_epochs = 2OO', "[train] max_epochs = '2OO'"),
    ('resunet, attention_resunet', 'resunet, attention_unet', '[search] architectures'),
    ('focal_tversky, combined_tversky', 'focal_tversky, combined_tverski', '[search] loss_functions'),
    ('[train]', '[training]', 'unknown section [training]'),
])
def test_malformed_settings_fail_with_one_line(tmp_path, old, new, key):
    bad = edited_settings(tmp_path, old, new)
    for how in (dict(args=('--settings', bad)), dict(env={'BEADSEG_SETTINGS': str(bad)}), dict(cwd=tmp_path)):
        out = run_beadseg('settings', *how.get('args', ()), cwd=how.get('cwd', ROOT), env=how.get('env'))
        assert out.returncode == 2
        assert out.stdout == ''
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and 'Traceback' not in out.stderr
        assert lines[0].startswith('beadseg settings: error: ') and str(bad.name) in lines[0] and key in lines[0]


def test_bad_override_fails_with_one_line():
    out = run_beadseg('settings', '--val-split', '15')
    assert out.returncode == 2
    assert out.stderr.strip() == "beadseg settings: error: --val-split = '15': expected a number strictly between 0 and 1"


def test_models_prints_parameter_counts_and_rejects_bad_sizes():
    out = run_beadseg('models', '--image-size', '64', '--base-filters', '8')
    assert out.returncode == 0, out.stderr
    assert 'input 64x64x1, base filters 8' in out.stdout
    assert {'unet', 'resunet', 'attention_resunet'} <= set(out.stdout.split())
    bad = run_beadseg('models', '--image-size', '200')
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        'beadseg models: error: Input side 200 must be a multiple of 2^depth = 16: use e.g. 192 or 208. '
        'Received: input_shape=(200, 200, 1), depth=4']


def test_default_models_are_the_seeds():
    "The seed's counts at full size (512x512x1, 64 base filters): the one place pytest builds the full-size models."
    out = run_beadseg('models')
    assert out.returncode == 0, out.stderr
    for number in ('31,401,345', '33,156,929', '34,204,293'):
        assert number in out.stdout


def test_missing_tensorflow_is_one_line(tmp_path):
    "Installed without the [cpu] or [gpu] extra: say how to fix it instead of a traceback."
    (tmp_path/'tensorflow').mkdir()
    (tmp_path/'tensorflow'/'__init__.py').write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorflow'\", name='tensorflow')\n")
    out = run_beadseg('models', env={'PYTHONPATH': str(tmp_path)})
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "beadseg models: error: TensorFlow is not installed: pip install -e '.[cpu]' (or '.[gpu]' on a GPU machine)"]


def test_odd_requests_are_one_line_each(tmp_path):
    "Found by a hostile check: each was a traceback, a silent surprise or an unclear line."
    from pathlib import Path
    from beadseg.config import PROJECT_SETTINGS, load_settings
    from beadseg.plan import create_run
    from beadseg.runs import config_for
    run = create_run(load_settings(PROJECT_SETTINGS, dict(search_type='grid', architectures='unet', batch_sizes='8',
                                                          loss_functions='dice,focal')), tmp_path/'runs')
    cases = [(('synth', tmp_path/'huge', '--size', '100000'), "beadseg synth: error: --size 100000: give a side from 16 to 8192 pixels"),
             (('run-rung', run, '--rung', '0', '--slot', '0'),
              f"beadseg run-rung: error: {run}: not a halving search; its configurations run with `beadseg run-one RUN_DIR --index K`"),
             (('search', '--plan-only', '--batch-sizes', '8,8'), "beadseg search: error: --batch-sizes = '8,8': '8' is listed twice"),
             (('search', '--plan-only', '--batch-sizes', '8,,16'), "beadseg search: error: --batch-sizes = '8,,16': an empty item"),
             (('search', '--plan-only', '--space', 'dropout=0.1', '--space', 'dropout=0.2'), "--space dropout: given twice")]
    for args, says in cases:
        done = run_beadseg(*args, cwd=tmp_path)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and says in done.stderr, (args, done.stderr)
    assert not (tmp_path/'huge').exists() and [p.name for p in (tmp_path/'runs').iterdir()] == [run.name]  # nothing planned
    cut = Path(config_for(run, 1)['out_dir'])
    cut.mkdir(parents=True); (cut/'result.json').write_text('{"status": "compl')  # a disk that filled up mid-write
    done = run_beadseg('collect', run)
    assert done.returncode == 0 and done.stderr.strip() == (f"warning: {cut/'result.json'}: unreadable (cut short?); it counts as "
                                                            f"pending and a resumed search runs it again"), done.stderr

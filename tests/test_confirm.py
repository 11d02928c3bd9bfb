"Cross-validated finalists: `beadseg confirm` on a real tiny search, locally and through a real Slurm."
import json
import pandas as pd, pytest
from conftest import run_beadseg
from test_hpc import VENV_BIN, slurm, slurm_args, wait_for_slurm_jobs  # noqa: F401 (slurm is a fixture)

TINY = ('--image-size', '64', '--base-filters', '8', '--max-epochs', '1', '--learning-rate', '1e-3', '--search-type', 'grid',
        '--architectures', 'unet', '--batch-sizes', '2', '--no-progress')


@pytest.fixture(scope='module')
def parent(tmp_path_factory):
    "A finished search of three tiny configurations on ten synthetic 64 x 64 images."
    root = tmp_path_factory.mktemp('confirm')
    assert run_beadseg('synth', root/'beads', '--n-images', '10', '--size', '64').returncode == 0
    done = run_beadseg('search', '--dataset', root/'beads', '--out', root/'runs', *TINY, '--loss-functions', 'dice,focal,combined',
                       cwd=root, timeout=900)
    assert done.returncode == 0, done.stderr
    [run] = (root/'runs').glob('hyperparam_comprehensive_*')
    return run


def confirmations(parent):
    return sorted(parent.parent.glob(f'{parent.name}_confirm_*'))


def test_refusals_are_one_line_and_plan_nothing(parent):
    cases = [(('--top', '4'), f'{parent}: 3 scored configurations, fewer than --top 4; finish the search first '
                              f'(`beadseg search --resume {parent}`) or confirm fewer'),
             (('--folds', '1'), '--folds 1: cross-validation needs at least 2 folds'),
             (('--top', '0'), '--top 0: confirm at least 1 configuration'),
             (('--folds', '11'), '11 folds for 10 images: cross-validation needs 2 to 10 folds (every fold validates at least one image)')]
    for flags, message in cases:
        done = run_beadseg('confirm', parent, *flags, '--plan-only')
        assert (done.returncode, done.stderr) == (2, f'beadseg confirm: error: {message}\n'), flags
    assert confirmations(parent) == []


def test_confirm_trains_every_finalist_on_every_fold(parent):
    done = run_beadseg('confirm', parent, '--top', '2', '--folds', '2', '--no-progress', timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = confirmations(parent)
    ranked = pd.read_csv(parent/'search_results_final.csv')
    finalists = ranked.config_id[:2].tolist()
    meta = json.loads((run/'confirm.json').read_text())
    assert (meta['parent'], meta['finalists'], meta['folds']) == (str(parent.resolve()), finalists, 2)
    plan = pd.read_csv(run/'plan.csv')
    assert plan.config_id.tolist() == [f'{c}_fold{k}' for k in (0, 1) for c in finalists]
    assert (plan.architecture.tolist(), plan.loss_function.tolist()) == (['unet'] * 4, [c.split('_bs2_')[1] for c in finalists] * 2)

    # every image validated exactly once per finalist, from the split in its own folder, scored on exactly those images
    stems = sorted(p.stem for p in (parent.parent.parent/'beads'/'images').iterdir())
    results = pd.read_csv(run/'search_results_final.csv').set_index('config_id')
    for finalist in finalists:
        splits = [json.loads((run/'configs'/f'{finalist}_fold{k}'/'split.json').read_text()) for k in (0, 1)]
        assert sorted(s for split in splits for s in split['val']) == stems
        assert all(sorted(split['train'] + split['val']) == stems for split in splits)
        assert [results.loc[f'{finalist}_fold{k}', 'n_val_images'] for k in (0, 1)] == [len(s['val']) for s in splits]
    assert not (run/'split.json').exists()

    # one row per finalist: the mean, sd and t interval of its two fold scores
    table = pd.read_csv(run/'confirm_results.csv')
    assert sorted(table.config_id) == sorted(finalists) and table['rank'].tolist() == [1, 2]
    for row in table.itertuples():
        folds = [results.loc[f'{row.config_id}_fold{k}', 'best_val_jacard'] for k in (0, 1)]
        assert (row.fold_0, row.fold_1, row.folds_scored) == pytest.approx((*folds, 2))
        assert row.mean_val_jaccard == pytest.approx(sum(folds) / 2) and row.ci_low <= row.mean_val_jaccard <= row.ci_high
    assert table.mean_val_jaccard.is_monotonic_decreasing

    best = json.loads((run/'best_hyperparameters.json').read_text())
    winner = table.config_id[0]
    assert (best['config_id'], best['runner_up'], best['n_folds']) == (winner, table.config_id[1], 2)
    assert best['mean_val_jaccard'] == pytest.approx(table.mean_val_jaccard[0])
    assert best['model_config_id'] in {f'{winner}_fold0', f'{winner}_fold1'}
    from beadseg.predict import find_model  # what `beadseg predict RUN_DIR` uses: the winner's model of its best fold
    assert find_model(run)[0] == run/'configs'/best['model_config_id']/'model.keras'
    assert best['statement'].startswith(f'{winner} wins with a mean best validation Jaccard of')
    assert best['statement'] in done.stdout and 'distinguishable from the runner-up' in best['statement']

    # a confirmation is not confirmed again; resuming a finished one trains nothing and says the same
    again = run_beadseg('confirm', run, '--plan-only')
    assert again.stderr == f'beadseg confirm: error: {run}: a confirmation run already; confirm its parent search instead\n'
    resumed = run_beadseg('search', '--resume', run, '--no-progress', timeout=300)
    assert resumed.returncode == 0 and best['statement'] in resumed.stdout, resumed.stderr


def test_plan_only_writes_array_jobs_over_every_fold(parent):
    done = run_beadseg('confirm', parent, '--top', '1', '--folds', '3', '--plan-only')
    assert done.returncode == 0, done.stderr
    run = max(confirmations(parent))
    assert len(pd.read_csv(run/'plan.csv')) == 3 and not (run/'configs').exists()
    jobs = run_beadseg('submit', run, '--scheduler', 'slurm', '--dry-run')
    assert jobs.returncode == 0, jobs.stderr
    assert '#SBATCH --array=0-2' in (run/'jobs'/'array.slurm').read_text()


def test_confirm_through_a_real_slurm(parent, slurm):
    "A confirmation planned with --plan-only, trained as a Slurm array; the summary job collects and reports it."
    root = parent.parent.parent
    planned = run_beadseg('confirm', parent, '--top', '2', '--folds', '2', '--plan-only', cwd=root)
    assert planned.returncode == 0, planned.stderr
    run = max(confirmations(parent), key=lambda p: p.stat().st_mtime)
    out = run_beadseg('submit', run.relative_to(root), '--scheduler', 'slurm', *slurm_args(f'export PATH={VENV_BIN}:$PATH'),
                      cwd=root, env=slurm)
    assert out.returncode == 0, out.stderr
    wait_for_slurm_jobs(slurm, 900)
    logs = '\n'.join(f'== {p.name}\n{p.read_text()}' for p in sorted((run/'jobs'/'logs').glob('*.log')))
    statuses = [json.loads(p.read_text())['status'] for p in sorted(run.glob('configs/*/result.json'))]
    assert statuses == ['completed'] * 4, logs
    table = pd.read_csv(run/'confirm_results.csv')
    assert table.folds_scored.tolist() == [2, 2], logs
    best = json.loads((run/'best_hyperparameters.json').read_text())
    assert best['config_id'] == table.config_id[0] and '_fold' not in best['config_id']
    report = (root/'reports'/f'{run.name}.html').read_text()
    assert 'Cross-validated finalists' in report and best['config_id'] in report, logs

"Cross-validated finalists: `beadseg confirm` of a tiny search, trained locally (tests/test_hpc.py runs one through a real Slurm)."
import json
from pathlib import Path
import pandas as pd, pytest
from conftest import run_beadseg

TINY = ('--image-size', '64', '--base-filters', '8', '--max-epochs', '1', '--learning-rate', '1e-3', '--search-type', 'grid',
        '--architectures', 'unet', '--batch-sizes', '2', '--no-progress')


def scored_search(root, scores):
    "A planned search of tiny configurations on ten synthetic 64 x 64 images, recorded as finished with `scores` (nothing trained)."
    from beadseg.runs import Status, write_json
    from beadseg.search import collect
    from beadseg.runs import config_for
    assert run_beadseg('synth', root/'beads', '--n-images', '10', '--size', '64').returncode == 0
    losses = ','.join(['dice', 'focal', 'combined'][:len(scores)])
    done = run_beadseg('search', '--plan-only', '--dataset', root/'beads', '--out', root/'runs', *TINY, '--loss-functions', losses, cwd=root)
    assert done.returncode == 0, done.stderr
    [run] = (root/'runs').glob('hyperparam_comprehensive_*')
    for index, score in enumerate(scores):
        config = config_for(run, index); out = Path(config['out_dir']); out.mkdir(parents=True)
        write_json(out/'result.json', dict(config=config, status=Status.COMPLETED, best_val_jaccard=score, best_epoch=1))
    collect(run, final=True)
    return run


@pytest.fixture(scope='module')
def parent(tmp_path_factory):
    "A finished search of three configurations (its scores recorded, not trained: only its ranking matters to confirm)."
    return scored_search(tmp_path_factory.mktemp('confirm'), [0.3, 0.5, 0.4])


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

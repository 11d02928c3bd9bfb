"The search command: plans, a real papermill search with a failing configuration, collect, resume after kill -9."
import json, os, re, subprocess, sys, time
import pandas as pd, pytest
from conftest import logged_epochs, run_beadseg, ROOT
from beadseg.config import PROJECT_SETTINGS

TINY = ('--image-size', '64', '--base-filters', '8', '--max-epochs', '2', '--learning-rate', '1e-3', '--val-split', '0.25',
        '--search-type', 'grid', '--architectures', 'unet', '--no-progress')


@pytest.fixture(scope='module')
def beads(tmp_path_factory):
    folder = tmp_path_factory.mktemp('data')/'beads'
    done = run_beadseg('synth', folder, '--n-images', '8', '--size', '128')
    assert done.returncode == 0, done.stderr
    return folder


def the_run(out):
    runs = list(out.glob('hyperparam_comprehensive_*'))
    assert len(runs) == 1, runs
    return runs[0]


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    done = run_beadseg('search', '--dry-run', '--search-type', 'grid', '--out', tmp_path/'runs', cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert '36 configurations (grid search); nothing was run' in done.stdout
    assert '035_attention_resunet_bs32_combined_tversky' in done.stdout
    assert not (tmp_path/'runs').exists()
    random = run_beadseg('search', '--dry-run', '--n-random', '40', cwd=tmp_path)
    assert random.returncode == 2
    assert random.stderr.strip() == ('beadseg search: error: n_random = 40 is larger than the grid (36 configurations); '
                                     'use a smaller --n-random or --search-type grid')


def test_missing_dataset_says_so_and_offers_synthetic(tmp_path):
    done = run_beadseg('search', '--plan-only', cwd=tmp_path)
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    assert done.stderr.strip() == ('beadseg search: error: dataset_shrunk_masks: no dataset there; give one with --dataset DIR, '
                                   'or add --synthetic to generate synthetic beads there first (or run `beadseg demo`)')
    assert not (tmp_path/'runs').exists()


@pytest.fixture(scope='module')
def search_run(beads, tmp_path_factory):
    """A real two-configuration search: batch 4 trains, batch 64 is larger than the training set and fails.
    Planned with batch 64, the search is refused at once; so the plan is made with batch 8 and edited, as a user might."""
    out = tmp_path_factory.mktemp('search')/'runs'
    refused = run_beadseg('search', '--dataset', beads, '--out', out, *TINY, '--batch-sizes', '4,64', '--loss-functions', 'dice')
    assert refused.returncode == 2 and not out.exists(), refused.stderr
    assert refused.stderr.strip() == (f"beadseg search: error: batch size 64 is larger than an epoch's 24 training crops of 64 px "
                                      f"(6 training images of {beads}, 4 crops each); use smaller batch sizes or more images")
    planned = run_beadseg('search', '--dataset', beads, '--out', out, *TINY, '--batch-sizes', '4,8', '--loss-functions', 'dice',
                          '--plan-only')
    assert planned.returncode == 0, planned.stderr
    plan = pd.read_csv(the_run(out)/'plan.csv')
    plan.loc[1, ['batch_size', 'config_id']] = [64, '001_unet_bs64_dice']
    plan.to_csv(the_run(out)/'plan.csv', index=False)
    done = run_beadseg('search', '--resume', the_run(out), '--no-progress', timeout=600)
    return done, the_run(out)


def test_search_writes_every_file_and_records_the_failure(search_run):
    done, run = search_run
    assert done.returncode == 1  # one configuration failed
    assert '1 completed, 1 failed; best 000_unet_bs4_dice' in done.stdout
    ids = ['000_unet_bs4_dice', '001_unet_bs64_dice']
    for name in ('plan.csv', 'search.log', 'settings.ini', 'split.json', 'search.json', 'search_results.csv',
                 'search_results_final.csv', 'best_hyperparameters.json', f'history_{ids[0]}.csv', f'model_{ids[0]}.keras'):
        assert (run/name).is_file(), name
    for name in ('history.csv', 'model.keras', 'train.ipynb', 'result.json', 'predictions.png'):
        assert (run/'configs'/ids[0]/name).is_file(), name
    # validated and split once, when planned: every configuration trains on the run's split without validating again
    assert json.loads((run/'split.json').read_text())['dataset_summary']['n_images'] == 8
    for config in ids: assert (run/'configs'/config/'split.json').read_text() == (run/'split.json').read_text()
    assert 'dataset validated when the search was planned (8 images)' in (run/'configs'/ids[0]/'train.ipynb').read_text()
    final = pd.read_csv(run/'search_results_final.csv')
    assert list(final.config_id) == ids and list(final['rank']) == [1, 2]
    assert list(final.status) == ['completed', 'failed']
    assert "batch size 64 is larger than an epoch's" in final.error[1]
    result = json.loads((run/'configs'/ids[0]/'result.json').read_text())
    assert final.best_val_jacard[0] == pytest.approx(result['best_val_jaccard'])
    assert final.object_f1[0] == pytest.approx(result['evaluation']['object_f1'])
    best = json.loads((run/'best_hyperparameters.json').read_text())
    assert best['config_id'] == ids[0] and best['batch_size'] == 4
    assert 'pixel_size' in best and best['pixel_size'] == result['pixel_size']  # None here: synthetic images carry no calibration
    log = (run/'search.log').read_text()
    assert f'start {ids[0]}' in log and f'finish {ids[1]}: failed' in log and 'Epoch 2/2' in log


def test_the_seeds_analysis_snippet_runs_verbatim(search_run):
    _, run = search_run
    snippet = f"""
import pandas as pd
df = pd.read_csv('{run}/search_results_final.csv')
print(df.groupby('architecture')['best_val_jacard'].agg(['mean', 'max', 'count']))
print(df.groupby('batch_size')['best_val_jacard'].agg(['mean', 'max', 'count']))
print(df.groupby('loss_function')['best_val_jacard'].agg(['mean', 'max', 'count']))
print(df.iloc[0])
"""
    done = subprocess.run([sys.executable, '-c', snippet], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert 'unet' in done.stdout and '000_unet_bs4_dice' in done.stdout


def test_collect_rebuilds_the_same_results(search_run, tmp_path):
    _, run = search_run
    before = pd.read_csv(run/'search_results_final.csv')
    (run/'search_results_final.csv').unlink(); (run/'best_hyperparameters.json').unlink()
    done = run_beadseg('collect', run)
    assert done.returncode == 0, done.stderr
    pd.testing.assert_frame_equal(pd.read_csv(run/'search_results_final.csv'), before)
    rerun = run_beadseg('run-one', run, '--index', '0')  # finished: a no-op
    assert rerun.returncode == 0 and 'already done (status completed); nothing to do' in rerun.stdout
    missing = run_beadseg('collect', tmp_path/'nope')  # not a run folder: one line, nothing created
    assert missing.returncode == 2 and missing.stderr.strip() == (f'beadseg collect: error: {tmp_path}/nope/plan.csv: not found; '
                                                                  'plan the run first with `beadseg search --plan-only`')
    assert not (tmp_path/'nope').exists()


def test_kill_9_of_the_driver_then_resume_completes_a_search_over_a_further_dimension(beads, tmp_path):
    "A search over base_filters (a dimension beyond the seed's), its driver killed with -9 while training, then resumed."
    out, ids = tmp_path/'runs', ['000_unet_bs4_dice_bf4', '001_unet_bs4_dice_bf8']
    exe = os.path.join(os.path.dirname(sys.executable), 'beadseg')
    args = [exe, 'search', '--dataset', str(beads), '--out', str(out), *TINY, '--batch-sizes', '4', '--loss-functions', 'dice',
            '--space', 'base_filters=4,8', '--max-epochs', '3', '--workers', '2']  # both configurations train at once
    driver = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 300
    while time.time() < end:  # wait for the first configuration's first epoch
        histories = list(out.glob('*/configs/000_*/history.csv'))
        if histories and logged_epochs(histories[0]) >= 1: break
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.2)
    driver.kill()
    driver.communicate()
    run = the_run(out)
    done = run_beadseg('search', '--resume', run, '--no-progress', timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '2 completed' in done.stdout
    final = pd.read_csv(run/'search_results_final.csv')
    assert len(final) == 2 and set(final.status) == {'completed'} and sorted(final.config_id) == ids
    for config in final.config_id:
        assert list(pd.read_csv(run/'configs'/config/'history.csv').epoch) == [1, 2, 3]
    log = (run/'search.log').read_text()
    assert 'resume: ' in log and '2 at a time' in log
    # the further dimension: a column after the seed's, the run's id in result.json, the test table, the report
    assert list(final.columns[:8]) == ['rank', 'config_id', 'architecture', 'batch_size', 'loss_function', 'dropout',
                                       'learning_rate', 'base_filters']
    table = final.set_index('config_id')
    assert table.base_filters.to_dict() == {ids[0]: 4, ids[1]: 8} and table.params[ids[0]] < table.params[ids[1]]
    result = json.loads((run/'configs'/ids[0]/'result.json').read_text())
    assert result['config']['base_filters'] == 4 and result['config_id'] == ids[0]  # the run's id, naming the dimension
    from beadseg.testset import score_top  # as [data] test_dataset does: the test table names the dimension too
    assert score_top(run, beads, top=2).set_index('config_id').base_filters.to_dict() == {ids[0]: 4, ids[1]: 8}
    report = run_beadseg('report', run, '--out', tmp_path/'reports', timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert '<strong>base filters</strong>' in (tmp_path/'reports'/f'{run.name}.html').read_text()  # its own effect table


def test_a_test_set_scores_the_top_configurations_and_the_report_of_the_partly_failed_search_says_so(search_run, tmp_path):
    _, run = search_run
    test = tmp_path/'test'
    assert run_beadseg('synth', test, '--n-images', '3', '--size', '128', '--seed', '7').returncode == 0
    settings = (run/'settings.ini').read_text()
    (run/'settings.ini').write_text(re.sub(r'^test_dataset =.*$', f'test_dataset = {test}', settings, flags=re.M))
    try:
        done = run_beadseg('collect', run, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        scores = pd.read_csv(run/'test_results.csv')
        assert list(scores.config_id) == ['000_unet_bs4_dice'] and (scores.n_test_images == 3).all()  # the one scored configuration
        evaluation = json.loads((run/'configs'/'000_unet_bs4_dice'/'evaluation.json').read_text())
        assert scores.test_jaccard[0] == pytest.approx(evaluation['jaccard'])
        assert scores.test_jaccard_ci_low[0] <= scores.test_jaccard[0] <= scores.test_jaccard_ci_high[0]
        report = run_beadseg('report', run, '--out', tmp_path/'reports', timeout=300)
        assert report.returncode == 0, report.stderr[-2000:]
        html = (tmp_path/'reports'/f'{run.name}.html').read_text()
        assert 'On the test set (3 images the search never saw)' in html and 'test scores measure it' in html
        assert '000_unet_bs4_dice' in html and 'is larger than an epoch' in html  # the failed configuration, and why
        assert 'val_jaccard_ci_low' in html and 'val_jaccard_ci_high' in html  # the ranked table's interval
        assert (run/'report.ipynb').is_file()
    finally:
        (run/'settings.ini').write_text(settings)
        (run/'test_results.csv').unlink(missing_ok=True)


def test_space_flags_plan_a_grid_with_further_dimensions(tmp_path):
    done = run_beadseg('search', '--dry-run', '--search-type', 'grid', '--architectures', 'unet', '--loss-functions', 'focal',
                       '--space', 'batch_size=16', '--space', 'learning_rate=1e-4,3e-4', '--space', 'image_size=256,512', cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert '4 configurations (grid search); nothing was run' in done.stdout
    ids = re.findall(r'\b\d{3}_\S+', done.stdout)
    assert ids == ['000_unet_bs16_focal_lr1e-04_is256', '001_unet_bs16_focal_lr1e-04_is512',
                   '002_unet_bs16_focal_lr3e-04_is256', '003_unet_bs16_focal_lr3e-04_is512']
    assert re.search(r'index\s+config_id\s+architecture\s+batch_size\s+loss_function\s+dropout\s+learning_rate\s+image_size',
                     done.stdout)


def test_a_space_section_in_settings_adds_dimensions_and_overrides_the_seed_lists(tmp_path):
    (tmp_path/'settings.ini').write_text(PROJECT_SETTINGS.read_text() + '\n[space]\narchitecture = unet\nbase_filters = 8, 16\n')
    done = run_beadseg('search', '--dry-run', '--search-type', 'grid', cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert '24 configurations (grid search)' in done.stdout  # 1 architecture x 3 batch sizes x 4 losses x 2 base_filters
    assert '000_unet_bs8_focal_bf8' in done.stdout and '023_unet_bs32_combined_tversky_bf16' in done.stdout
    assert 'resunet' not in done.stdout


def test_random_search_draws_distributions_with_the_seed(tmp_path):
    args = ('search', '--dry-run', '--n-random', '5', '--space', 'learning_rate=loguniform(1e-5,1e-3)',
            '--space', 'dropout=uniform(0,0.5)', '--space', 'base_filters=intuniform(8,32)')
    first, again, other = run_beadseg(*args, cwd=tmp_path), run_beadseg(*args, cwd=tmp_path), run_beadseg(*args, '--seed', '7', cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert '5 configurations (random search)' in first.stdout
    assert first.stdout == again.stdout and first.stdout != other.stdout
    ids = re.findall(r'\b\d{3}_\S+', first.stdout)
    assert len(ids) == 5 and all(re.fullmatch(r'\d{3}_\w+_bs\d+_\w+_do[\d.]+_lr[\d.e+-]+_bf\d+', i) for i in ids), ids


@pytest.mark.parametrize('args, says', [
    (('--space', 'epochs=5'), "--space epochs = '5': unknown key 'epochs' (expected one of architecture,"),
    (('--space', 'learning_rate=gauss(1,2)'), "--space learning_rate = 'gauss(1,2)': unknown distribution 'gauss'"),
    (('--space', 'batch_size=uniform(8,32)'), "--space batch_size = 'uniform(8,32)': uniform needs a real-valued setting"),
    (('--space', 'dropout=0.2,1.5'), "--space dropout = '0.2,1.5': '1.5': expected a number in [0, 1)"),
    (('--space', 'image_size=100'), "--space image_size = '100': '100': expected a positive multiple of 16"),
    (('--space', 'image_size'), "--space 'image_size': expected KEY=VALUES"),
    (('--search-type', 'grid', '--space', 'learning_rate=loguniform(1e-5,1e-3)'),
     '[space] learning_rate = loguniform(1e-05,0.001): a distribution needs --search-type random'),
])
def test_a_bad_space_is_one_line_naming_the_key(tmp_path, args, says):
    done = run_beadseg('search', '--dry-run', *args, cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith('beadseg search: error: ' + says), done.stderr


def test_a_drawn_value_the_model_refuses_stops_the_search_before_it_runs(tmp_path):
    done = run_beadseg('search', '--n-random', '3', '--batch-sizes', '8', '--space', 'micro_batch_size=intuniform(3,7)',
                       '--out', tmp_path/'runs', cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert 'micro_batch_size must be 0 (the whole batch) or divide batch_size 8' in done.stderr and not (tmp_path/'runs').exists()
    sizes = run_beadseg('search', '--dry-run', '--n-random', '6', '--space', 'image_size=intuniform(64,512)', cwd=tmp_path)
    assert sizes.returncode == 0 and all(int(s) % 16 == 0 for s in re.findall(r'_is(\d+)', sizes.stdout)), sizes.stdout


def test_an_image_size_dimension_validates_the_data_at_its_smallest_and_refuses_sizes_beyond_the_images(beads, tmp_path):
    out = tmp_path/'runs'
    planned = run_beadseg('search', '--dataset', beads, '--out', out, '--plan-only', '--search-type', 'grid', '--architectures', 'unet',
                          '--batch-sizes', '4', '--loss-functions', 'dice', '--space', 'image_size=64,128')  # [data] image_size stays 512
    assert planned.returncode == 0, planned.stderr
    assert pd.read_csv(the_run(out)/'plan.csv').config_id.tolist() == ['000_unet_bs4_dice_is64', '001_unet_bs4_dice_is128']
    refused = run_beadseg('search', '--dataset', beads, '--out', tmp_path/'refused', '--plan-only', '--search-type', 'grid',
                          '--architectures', 'unet', '--batch-sizes', '4', '--loss-functions', 'dice', '--space', 'image_size=64,256')
    assert refused.returncode == 2 and not (tmp_path/'refused').exists()
    assert refused.stderr.strip() == (f'beadseg search: error: image_size 256 is larger than the smallest image side of {beads} '
                                      f'(128 px); plan smaller image sizes')


# ---- successive halving (nbs/16_halving.ipynb) ----

HALVING = ('--search-type', 'halving', '--min-epochs', '1', '--max-epochs', '3', '--batch-sizes', '4',
           '--loss-functions', 'dice,combined,focal')  # rungs of 1 and 3 epochs for 3 and 1 configurations


def test_halving_dry_run_prints_the_rungs_and_bad_settings_are_one_line(tmp_path):
    done = run_beadseg('search', '--dry-run', '--search-type', 'halving', cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-5:] == [
        'rung 0: 36 configurations to 30 epochs (at most 1,080 epochs)', 'rung 1: 12 configurations to 90 epochs (at most 720 epochs)',
        'rung 2: 4 configurations to 200 epochs (at most 440 epochs)', "at most 2,240 epochs, 31% of the full grid's 36 x 200 = 7,200",
        '36 configurations (halving search); nothing was run (--dry-run)']
    for args, says in [(('--eta', '1'), "--eta = '1': expected an integer >= 2"),
                       (('--min-epochs', '200'), '[search] min_epochs = 200 is not below [train] max_epochs = 200'),
                       (('--space', 'max_epochs=50,100'), '[space] max_epochs: a halving search sets the epochs of each rung itself')]:
        bad = run_beadseg('search', '--dry-run', '--search-type', 'halving', *args, cwd=tmp_path)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert bad.stderr.startswith('beadseg search: error: ' + says), bad.stderr


def record(run, config_id, **result):
    (run/'configs'/config_id).mkdir(parents=True, exist_ok=True)
    (run/'configs'/config_id/'result.json').write_text(json.dumps(result))


def test_run_rung_waits_for_the_rung_before_and_a_spare_slot_exits_0(beads, tmp_path):
    planned = run_beadseg('search', '--dataset', beads, '--out', tmp_path, '--plan-only', *TINY, *HALVING)
    assert planned.returncode == 0, planned.stderr
    run = the_run(tmp_path)
    ids = pd.read_csv(run/'plan.csv').config_id.tolist()
    record(run, ids[0], status='nan', epochs_run=1)
    record(run, ids[1], status='early_stopped', epochs_run=1, best_val_jaccard=0.4)
    record(run, ids[2], status='running')
    waiting = run_beadseg('run-rung', run, '--rung', '1', '--slot', '0')
    assert waiting.returncode == 2 and len(waiting.stderr.strip().splitlines()) == 1, waiting.stderr
    assert f'rung 0 has not ended (1 running: {ids[2]}, ...)' in waiting.stderr and not (run/'rungs'/'rung_0.csv').exists()
    record(run, ids[2], status='failed', error='an error')
    spare = run_beadseg('run-rung', run, '--rung', '1', '--slot', '0')  # nobody could go on: the one slot of rung 1 is spare
    assert spare.returncode == 0, spare.stderr
    assert spare.stdout.strip() == ('beadseg run-rung: rung 1 slot 0 is spare: only 0 configurations were promoted to it '
                                    '(the others early-stopped, diverged or failed); nothing to train')
    assert not pd.read_csv(run/'rungs'/'rung_0.csv').promoted.any()
    beyond = run_beadseg('run-rung', run, '--rung', '1', '--slot', '1')
    assert beyond.returncode == 2 and 'no slot 1 in rung 1 (slots 0 to 0)' in beyond.stderr


def test_halving_trains_rungs_in_order_continues_the_best_and_resumes_at_the_open_rung(beads, tmp_path):
    out = tmp_path/'runs'
    exe = os.path.join(os.path.dirname(sys.executable), 'beadseg')
    driver = subprocess.Popen([exe, 'search', '--dataset', str(beads), '--out', str(out), *TINY, *HALVING, '--workers', '2'],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 500
    while time.time() < end and not list(out.glob('*/rungs/rung_0.csv')):  # rung 0 has ended and been decided
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.2)
    driver.terminate()  # stop the search in rung 1 (its finalist stops after epoch 2, or before it starts it; never at 3)
    stopped = driver.communicate(timeout=300)
    assert driver.returncode == 1, stopped  # unfinished: the finalist has not ended rung 1
    run = the_run(out)
    done = run_beadseg('search', '--resume', run, '--no-progress', timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '2 pruned, 1 completed' in done.stdout
    rungs = pd.read_csv(run/'rungs.csv')
    assert rungs[['rung', 'budget']].values.tolist() == [[0, 1]] * 3 + [[1, 3]]
    first, second = rungs[rungs.rung == 0], rungs[rungs.rung == 1]
    assert first.promoted.tolist() == [True, False, False] and (first.epochs == 1).all() and (first.status == 'paused').all()
    assert first.best_val_jaccard.is_monotonic_decreasing  # ranked best first; the best went on
    [winner] = second.config_id
    assert winner == first.config_id.iloc[0] and second.epochs.tolist() == [3] and second.status.tolist() == ['completed']
    final = pd.read_csv(run/'search_results_final.csv').set_index('config_id')
    assert final.status.to_dict() == {winner: 'completed', **{c: 'pruned' for c in first.config_id[1:]}}
    assert final.epochs_run.to_dict() == {winner: 3, **{c: 1 for c in first.config_id[1:]}}
    assert final.val_jaccard[winner] >= 0 and final.val_jaccard.drop(winner).isna().all()  # only the finalist is evaluated
    # the finalist continued from its rung-0 resume point: each epoch trained once, none twice
    epochs = [json.loads(line)['epoch'] for line in (run/'configs'/winner/'state'/'epochs.jsonl').read_text().splitlines()]
    assert epochs == [1, 2, 3], epochs
    assert json.loads((run/'best_hyperparameters.json').read_text())['config_id'] == winner
    log = (run/'search.log').read_text()
    assert 'start: 4 of 4 rung trainings to run, 2 at a time' in log and 'resume: 1 of 4 rung trainings to run' in log
    assert log.count('rung 0: 3 configurations to 1 epochs') == 1  # not trained again on resume

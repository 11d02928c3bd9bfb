"The search report: tables against pandas, data-driven insights (`beadseg.insights`), edge cases, a self-contained HTML page that a browser renders."
import json, re, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest
from conftest import run_beadseg, ROOT
from beadseg import insights as I, report as R

METRICS = ['best_val_jacard', 'val_dice', 'best_epoch', 'epochs_run', 'train_seconds', 'seconds_per_epoch', 'images_per_second',
           'params', 'baseline_jaccard', 'object_precision', 'object_recall', 'object_f1', 'count_mae', 'device', 'error']
FINAL = ['rank', 'config_id', 'architecture', 'batch_size', 'loss_function', 'dropout', 'learning_rate', 'status', *METRICS]


def config(arch, bs, loss, score=None, status='completed', best_epoch=20, epochs_run=50, seconds=600.0, gap=0.05, error=None):
    "One configuration of a constructed run: its factors and the numbers its training would have recorded."
    return dict(architecture=arch, batch_size=bs, loss_function=loss, score=score, status=status, best_epoch=best_epoch,
                epochs_run=epochs_run, seconds=seconds, gap=gap, error=error)


def make_run(folder, configs, csv=True, max_epochs=100, patience=30):
    """A search run folder in the format of INTERFACES.md built from `configs` (see `config`): plan.csv, search.json,
    configs/<id>/{result.json, history.csv, predictions.png} and, when `csv`, search_results_final.csv.
    Status `running` leaves a history without result.json, `pending` nothing but the plan row."""
    folder.mkdir(parents=True)
    plan, rows = [], []
    for i, c in enumerate(configs):
        cid = f"{i:03d}_{c['architecture']}_bs{c['batch_size']}_{c['loss_function']}"
        factors = dict(architecture=c['architecture'], batch_size=c['batch_size'], loss_function=c['loss_function'],
                       dropout=0.3, learning_rate=5e-5)
        plan.append(dict(index=i, config_id=cid, **factors))
        out = folder/'configs'/cid
        if c['status'] == 'pending':
            rows.append(dict(config_id=cid, status='pending', **factors)); continue
        out.mkdir(parents=True)
        if c['score'] is not None:
            epochs = np.arange(1, c['epochs_run'] + 1)
            val = c['score'] - 0.004 * np.abs(epochs - c['best_epoch'])   # peaks at best_epoch with the score
            pd.DataFrame(dict(epoch=epochs, loss=1 - val, val_loss=1 - val, jaccard=val + c['gap'], val_jaccard=val,
                              dice=val, val_dice=val, learning_rate=5e-5, epoch_seconds=c['seconds'] / c['epochs_run'])
                         ).to_csv(out/'history.csv', index=False)
        if c['status'] == 'running':   # the search lists it as pending until its result.json exists
            rows.append(dict(config_id=cid, status='pending', **factors)); continue
        scored = c['score'] is not None
        evaluation = dict(jaccard=c['score'], dice=c['score'] + 0.1, baseline_jaccard=0.12, object_precision=0.9, object_recall=0.8,
                          object_f1=round(0.5 + c['score'] / 2, 4), count_mae=round(10 * (1 - c['score']), 3), n_images=2,
                          per_image=[dict(image='bead_001', true_count=100, predicted_count=97, jaccard=c['score']),
                                     dict(image='bead_007', true_count=120, predicted_count=125, jaccard=c['score'])]) if scored else None
        result = dict(config=dict(factors, patience=patience, max_epochs=max_epochs, image_size=64, dataset='data/synth'),
                      config_id=cid, status=c['status'], error=c['error'], best_val_jaccard=c['score'],
                      best_epoch=c['best_epoch'] if scored else None, epochs_run=c['epochs_run'] if scored else None,
                      train_seconds=c['seconds'], seconds_per_epoch=c['seconds'] / c['epochs_run'], images_per_second=3.0,
                      params=1000, device='cpu', versions=dict(tensorflow='2.21.0', keras='3.12.0'), evaluation=evaluation,
                      dataset_summary=dict(n_images=12, beads_mean=109.0, foreground_mean=0.12))
        (out/'result.json').write_text(json.dumps(result))
        row = {**{k: result.get(k) for k in METRICS}, 'config_id': cid, **factors, 'best_val_jacard': c['score']}
        rows.append({**row, 'status': c['status'], **({k: evaluation[k] for k in ('baseline_jaccard', 'object_precision',
                     'object_recall', 'object_f1', 'count_mae')} | {'val_dice': evaluation['dice']} if scored else {})})
        if scored:
            import matplotlib.pyplot as plt
            plt.imsave(out/'predictions.png', np.random.default_rng(i).random((48, 96)))
    pd.DataFrame(plan).to_csv(folder/'plan.csv', index=False)
    (folder/'search.json').write_text(json.dumps(dict(search_type='grid', seed=0, n_planned=len(configs), dataset='data/synth')))
    if csv:
        table = pd.DataFrame(rows)
        table = table.assign(_s=table['best_val_jacard'].notna()).sort_values(['_s', 'best_val_jacard'], ascending=False)
        table.assign(rank=range(1, len(table) + 1)).reindex(columns=FINAL).to_csv(folder/'search_results_final.csv', index=False)
    return folder


def grid(scores):
    "Completed configurations for architecture x batch size x loss, scored by `scores(arch, bs, loss)`."
    return [config(a, b, l, round(scores(a, b, l), 4), best_epoch=10 + b, seconds=100.0 * b)
            for a in ('unet', 'resunet', 'attention_resunet') for b in (8, 16, 32) for l in ('focal', 'focal_tversky')]


def big_batches_win(a, b, l):
    return 0.55 + 0.004 * b + {'unet': 0.0, 'resunet': 0.02, 'attention_resunet': 0.05}[a] + (0.01 if l == 'focal' else 0)


def small_batches_win(a, b, l):
    return 0.75 - 0.004 * b + {'unet': 0.05, 'resunet': 0.02, 'attention_resunet': 0.0}[a] + (0.01 if l == 'focal_tversky' else 0)


MIXED = grid(big_batches_win) + [config('unet', 64, 'dice', status='failed', error='ResourceExhaustedError: out of memory'),
                                 config('resunet', 64, 'dice', status='pending')]


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
    "The constructed multi-configuration run rendered once with `beadseg report`."
    tmp = tmp_path_factory.mktemp('report')
    run = make_run(tmp/'hyperparam_comprehensive_20260101_000000', MIXED)
    out = run_beadseg('report', run, '--out', tmp/'reports', timeout=600)
    assert out.returncode == 0, out.stderr
    html = tmp/'reports'/f'{run.name}.html'
    return run, html, html.read_text(), out


def test_command_writes_html_and_keeps_executed_notebook(rendered):
    run, html, text, out = rendered
    assert html.exists() and (run/'report.ipynb').exists()
    assert str(html) in out.stdout
    assert 'Search report: hyperparam_comprehensive_20260101_000000' in text
    assert 'from beadseg.report import' not in text and 'load_run(' not in text   # code cells hidden


def test_tables_match_pandas(rendered):
    run, _, text, _ = rendered
    df = pd.read_csv(run/'search_results_final.csv')
    ok = df[df['status'] == 'completed']
    for factor in ('architecture', 'batch_size', 'loss_function'):
        expected = ok.groupby(factor)['best_val_jacard'].agg(['mean', 'std', 'max', 'count'])
        got = I.effect_table(R.load_results(run), factor)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False)
        for value in expected[['mean', 'std', 'max']].to_numpy().ravel():
            assert f'{value:.3f}' in text
    pivot = ok.groupby(['architecture', 'loss_function'])['best_val_jacard'].mean().unstack()
    pd.testing.assert_frame_equal(I.interaction_table(R.load_results(run)), pivot, check_dtype=False, check_names=False)
    assert all(f'{v:.3f}' in text for v in pivot.to_numpy().ravel())
    # the ranked table lists the configurations best first
    top = ok.sort_values('best_val_jacard', ascending=False)['config_id'].head(10).tolist()
    positions = [text.index(f'>{cid}<') for cid in top]
    assert positions == sorted(positions)
    # overview: planned, completed and failed counts; total compute in hours
    overview = R.overview(R.load_run(run))
    assert (overview['configurations planned'], overview['completed (scored)'], overview['failed'], overview['pending']) == (20, 18, 1, 1)
    assert overview['total compute (h)'] == round(df['train_seconds'].sum() / 3600, 2)


def test_rebuilt_from_result_files_equals_the_csv(tmp_path):
    with_csv, without = make_run(tmp_path/'a', MIXED), make_run(tmp_path/'b', MIXED, csv=False)
    a, b = R.load_results(with_csv), R.load_results(without)
    assert list(a['config_id']) == list(b['config_id'])
    cols = ['status', 'best_val_jacard', 'val_dice', 'best_epoch', 'object_f1', 'count_mae', 'train_seconds']
    pd.testing.assert_frame_equal(a[cols], b[cols], check_dtype=False)


def test_self_contained_with_figures(rendered):
    text = rendered[2]
    remote = re.findall(r'''(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*https?:|import\s*\(?\s*["']https?:''', text, re.I)
    assert remote == []
    assert text.count('data:image/png;base64,') >= 6   # five figures and the predictions panel


def test_insights_in_page(rendered):
    text = rendered[2]
    assert 'Larger batches helped' in text
    assert '1 of 20 configurations (5%) failed' in text and 'ResourceExhaustedError' in text
    assert 'not finished yet: 1 pending' in text


def test_opposite_effects_give_opposite_statements(tmp_path):
    up, down = (R.load_results(make_run(tmp_path/n, grid(f))) for n, f in (('up', big_batches_win), ('down', small_batches_win)))
    assert I.batch_statement(up).startswith('Larger batches helped')
    assert I.batch_statement(down).startswith('Larger batches did not help')
    arch_up, arch_down = I.architecture_statement(up), I.architecture_statement(down)
    assert 'Residual connections paid off' in arch_up and 'Attention gates paid off' in arch_up
    assert 'Residual connections did not pay off' in arch_down and 'Attention gates did not pay off' in arch_down
    assert '**Batch size** matters' in I.factor_statement(up) and 'best level 32' in I.factor_statement(up)
    assert 'best level 8' in I.factor_statement(down)
    assert 'batch size 32 is the largest' in I.boundary_statement(up) and 'batch size 8 is the smallest' in I.boundary_statement(down)
    # which factor matters follows the data; a batch effect smaller than the run-to-run noise is not claimed
    noise = iter(np.random.default_rng(0).normal(0, 0.02, 18))  # sd 0.02 between runs, as seeds give
    flat = R.load_results(make_run(tmp_path/'loss', grid(lambda a, b, l: 0.6 + (0.1 if l == 'focal' else 0) + 0.0002 * b + next(noise))))
    assert I.factor_statement(flat).startswith('**Loss function** matters')
    assert I.batch_statement(flat).startswith('Batch size 32 against 8: no difference detected at this sample size')


def test_overfitting_and_stopping_follow_the_histories(tmp_path):
    def statements(gap, epochs_run):
        run = R.load_run(make_run(tmp_path/f'{gap}_{epochs_run}', [config('unet', 8, 'focal', 0.7, gap=gap, epochs_run=epochs_run, best_epoch=20),
                                                                config('unet', 16, 'focal', 0.6, gap=gap, epochs_run=epochs_run)]))
        gaps = R.best_epoch_gaps(run)
        assert np.allclose(gaps['gap'], gap)
        return I.overfit_statement(gaps), I.stopping_statement(run.results, **R.training_limits(run))
    fit, stop = statements(0.2, 50)
    assert 'it overfits' in fit and 'No run reached the cap of 100' in stop and 'patience 30' in stop
    fit, stop = statements(0.0, 100)
    assert 'no sign of overfitting' in fit and '2 of 2 runs reached the cap of 100' in stop


def test_seed_context(tmp_path):
    results = R.load_results(make_run(tmp_path/'r', grid(big_batches_win)))
    ranked = results.sort_values('best_val_jacard', ascending=False).reset_index(drop=True)
    seed = ranked.query("architecture == 'attention_resunet' and batch_size == 16 and loss_function == 'focal_tversky'")
    lines = I.seed_statements(results)
    assert f'ranked {seed.index[0] + 1} of 18' in lines[0]
    assert f"{ranked['best_val_jacard'][0]:.3f}, is above the seed's expected range 0.21-0.24" in lines[1]
    assert f"{ranked['best_val_jacard'][0] / 0.12:.1f} times that" in lines[2]
    seedlike = R.load_results(make_run(tmp_path/'seedlike', [config('unet', 8, 'focal', 0.13), config('unet', 16, 'focal', 0.22)]))
    lines = I.seed_statements(seedlike)
    assert 'was not part of this search' in lines[0] and 'is within the seed' in lines[1] and '1.8 times that' in lines[2]
    trivial = R.load_results(make_run(tmp_path/'trivial', [config('unet', 8, 'focal', 0.125)]))
    assert 'is below the seed' in I.seed_statements(trivial)[1] and 'barely above it' in I.seed_statements(trivial)[2]


EDGE_CASES = {
    'single': [config('attention_resunet', 16, 'focal_tversky', 0.41)],
    'nothing_completed': [config('unet', 8, 'focal', status='failed', error='ValueError: bad mask'),
                          config('unet', 16, 'focal', 0.5, status='running'), config('resunet', 8, 'focal', status='pending')],
    'partly_done': [config('unet', 8, 'focal', 0.5), config('resunet', 8, 'focal', 0.55),
                    config('unet', 16, 'focal', status='nan', error='loss became NaN at epoch 3'),
                    config('resunet', 16, 'focal', 0.6, status='running'), config('unet', 32, 'focal', status='pending')],
}


def edge_case(tmp_path, name):
    "The edge-case run `name` read as the report notebook reads it: the run, its insights and its failures."
    run = R.load_run(make_run(tmp_path/name, EDGE_CASES[name]))
    return run, I.insights(run.results, R.best_epoch_gaps(run, 10), **R.training_limits(run),
                           collapses=R.validation_collapses(run)), R.failures_table(run.results)


def test_single_configuration(tmp_path):
    run, insights, _ = edge_case(tmp_path, 'single')
    assert I.coverage_statement(run.results) == 'All 1 planned configurations completed; the numbers below cover all of them.'
    assert 'Only one configuration completed: too little data to compare factors.' in insights
    assert any('ranked 1 of 1 with 0.410' in line for line in insights)


def test_nothing_completed_renders(tmp_path):
    "The one edge case rendered through papermill: a run with nothing scored still gives a page, with its failure."
    run, insights, failures = edge_case(tmp_path, 'nothing_completed')
    assert insights == ['Nothing has completed yet, so there is nothing to compare.']
    out = run_beadseg('report', run.path, '--out', tmp_path/'reports', timeout=600)
    assert out.returncode == 0, out.stderr
    page = (tmp_path/'reports'/'nothing_completed.html').read_text()
    assert 'Nothing has completed yet' in page
    assert 'not finished yet: 1 running and 1 pending' in page and 'ValueError: bad mask' in page


def test_partly_failed_and_running(tmp_path):
    run, _, failures = edge_case(tmp_path, 'partly_done')
    assert I.coverage_statement(run.results) == ('The numbers below cover the 2 of 5 planned configurations that completed '
                                                 '(not finished yet: 1 running and 1 pending; 1 diverged).')
    assert failures['error'].tolist() == ['loss became NaN at epoch 3']


def test_failed_with_a_score_is_listed_but_never_counted(tmp_path):
    "A configuration whose evaluation failed after training keeps its score: Failures lists it; no ranking, best or statistic counts it."
    run = R.load_run(make_run(tmp_path/'r', [config('unet', 8, 'focal', 0.5), config('resunet', 8, 'focal', 0.55),
                                              config('unet', 16, 'focal', 0.9, status='failed', error='evaluation failed')]))
    assert I.scored(run.results)['config_id'].tolist() == ['001_resunet_bs8_focal', '000_unet_bs8_focal']
    assert R.ranked_table(run.results)['config_id'].tolist() == ['001_resunet_bs8_focal', '000_unet_bs8_focal']
    assert R.failures_table(run.results)['error'].tolist() == ['evaluation failed']
    assert (R.overview(run)['completed (scored)'], R.overview(run)['failed']) == (2, 1)
    assert "The observed best Jaccard, 0.550" in I.seed_statements(run.results)[1]


def test_insights_import_no_report(tmp_path):
    "The statistics and sentences stand on the results table alone: importing them loads neither the report nor matplotlib."
    code = "import sys, beadseg.insights; print([m for m in ('beadseg.report', 'matplotlib', 'tensorflow') if m in sys.modules])"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == '[]', out.stdout + out.stderr


def test_missing_run_folder_is_one_line(tmp_path):
    out = run_beadseg('report', tmp_path/'nope')
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert out.stderr.strip() == f'beadseg report: error: {tmp_path/"nope"}: not a search run folder (no search_results_final.csv, plan.csv or configs/*/result.json)'


def test_renders_in_headless_chromium(rendered, tmp_path):
    setup = subprocess.run([str(ROOT/'tools'/'ensure_apt.sh'), 'chromium=chromium'], capture_output=True, text=True)
    if setup.returncode == 3: pytest.skip(f'chromium unavailable: {setup.stderr.strip()}')
    assert setup.returncode == 0, setup.stderr
    shot = tmp_path/'report.png'
    subprocess.run(['chromium', '--headless', '--no-sandbox', '--disable-gpu', f'--screenshot={shot}', '--window-size=1280,2000',
                    rendered[1].as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert shot.stat().st_size > 20_000   # a blank page is a few kB

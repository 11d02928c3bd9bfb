"""Acceptance on real, public, labelled microscopy data: the DSB 2018 nuclei image that stardist ships, cut into tiles,
in both mask layouts a user has (instance labels with id gaps; binary shrunk masks without labels/). A tiny model
trained through the papermill template must learn, its validation curve must follow training, and its object F1 must
equal stardist's on the same predictions."""
import json
import numpy as np, pandas as pd, pytest
from conftest import nuclei_dataset, run_beadseg

matching = pytest.importorskip('stardist.matching').matching
SHRINK = 1
SEARCH = ('--image-size', '64', '--base-filters', '8', '--batch-sizes', '4', '--learning-rate', '1e-3', '--max-epochs', '10',
          '--patience', '10', '--val-split', '0.25', '--shrink', str(SHRINK), '--search-type', 'grid', '--architectures', 'unet',
          '--loss-functions', 'combined', '--no-progress')


@pytest.fixture(scope='module', params=['labels', 'binary'])
def nuclei_search(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    dataset = nuclei_dataset(work/'nuclei', request.param, shrink=SHRINK)
    done = run_beadseg('search', '--dataset', dataset, '--out', work/'runs', *SEARCH, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run, = (work/'runs').glob('hyperparam_comprehensive_*')
    return request.param, dataset, run


def test_learns_well_above_the_baseline_without_validation_collapse(nuclei_search):
    from beadseg.report import collapsed_epochs
    layout, _, run = nuclei_search
    config, = (run/'configs').iterdir()
    result = json.loads((config/'result.json').read_text())
    evaluation, history = result['evaluation'], pd.read_csv(config/'history.csv')
    assert evaluation['jaccard'] >= max(0.5, 2 * evaluation['baseline_jaccard']), (layout, evaluation)
    assert evaluation['object_f1'] >= 0.5, (layout, evaluation)
    assert collapsed_epochs(history) == [], history
    last = history.tail(3)  # validation follows training: no more than 0.2 below it at the end
    assert (last.jaccard - last.val_jaccard).mean() < 0.2, history
    final = pd.read_csv(run/'search_results_final.csv')
    low, high = final.loc[0, ['val_jaccard_ci_low', 'val_jaccard_ci_high']]
    assert low <= final.loc[0, 'val_jaccard'] <= high and high - low > 0
    assert final.loc[0, 'val_jaccard'] == pytest.approx(evaluation['jaccard'])


def test_object_f1_equals_stardist_on_the_same_predictions(nuclei_search):
    "Ground truth grown once, whatever the layout; ids with gaps counted as they are; stardist's matching."
    import keras
    import beadseg.losses  # registers the custom losses and metrics the model was saved with
    from beadseg import data
    from beadseg.metrics import predicted_objects
    from beadseg.train import predict_images
    layout, dataset, run = nuclei_search
    config, = (run/'configs').iterdir()
    result = json.loads((config/'result.json').read_text())
    val = set(json.loads((config/'split.json').read_text())['val'])
    samples = [s for s in data.find_pairs(dataset) if s.stem in val]
    model = keras.models.load_model(config/'model.keras')
    images, _, truths = data.load_arrays(samples, shrink=SHRINK)
    from beadseg.data import read_instances
    if layout == 'labels':  # the truth is the label tile itself, at full size, ids and gaps unchanged
        for s, truth in zip(samples, truths): assert np.array_equal(truth, read_instances(s.mask)[0])
    reference = [matching(t.astype(np.int32), predicted_objects(p, SHRINK)) for t, p in zip(truths, predict_images(model, images, 64))]
    tp, n_true, n_pred = (sum(int(getattr(r, k)) for r in reference) for k in ('tp', 'n_true', 'n_pred'))
    assert abs(result['evaluation']['object_f1'] - 2 * tp / (n_true + n_pred)) <= 0.01
    assert [row['true_count'] for row in result['evaluation']['per_image']] == [r.n_true for r in reference]

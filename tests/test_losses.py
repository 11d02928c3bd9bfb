"Losses and metrics: reference values, the seed's relations, edge cases, mixed precision, whole-set metrics."
import numpy as np
import pytest
import keras
from beadseg.losses import (LOSSES, get_loss, dice, focal, tversky, focal_tversky, combined, combined_tversky,
                            Jaccard, DiceCoef)

GT = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], 'float32')
PR1 = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]], 'float32')
PR2 = np.array([[1, 1, 1], [0, 0, 1], [0, 0, 0]], 'float32')


def value(x): return float(np.asarray(x))


@pytest.mark.parametrize('pred, iou, dice_coef, tversky_index', [(PR1, 0.5, 2/3, 0.5882), (PR2, 1/3, 0.5, 0.5)])
def test_reference_overlaps(pred, iou, dice_coef, tversky_index):
    assert value(1 - dice(GT, pred)) == pytest.approx(dice_coef, abs=1e-6)
    assert value(1 - tversky(GT, pred)) == pytest.approx(tversky_index, abs=1e-4)
    jaccard = Jaccard()
    jaccard.update_state(GT, pred)
    assert value(jaccard.result()) == pytest.approx(iou, abs=1e-6)


def test_tversky_weighs_false_negatives_more():
    "alpha=0.7 is on FN: missing a bead pixel costs more than a false alarm of the same size."
    missed = np.array([1, 1, 0, 0], 'float32'), np.array([1, 0, 0, 0], 'float32')
    extra = np.array([1, 0, 0, 0], 'float32'), np.array([1, 1, 0, 0], 'float32')
    assert value(tversky(*missed)) > value(tversky(*extra))
    assert value(tversky(*missed)) == pytest.approx(1 - 1 / (1 + 0.7), abs=1e-6)


@pytest.mark.parametrize('y, p, expected', [(1, .9, 2.63e-4), (0, .9, 1.3988), (1, .5, 0.04332), (0, .5, 0.12997)])
def test_focal_per_pixel(y, p, expected):
    assert value(focal(np.float32(y), np.float32(p))) == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize('seed', range(5))
def test_seed_relations_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((2, 32, 32, 1)) < rng.uniform(0.05, 0.5)).astype('float32')
    p = rng.random((2, 32, 32, 1)).astype('float32')
    d, f, t = value(dice(y, p)), value(focal(y, p)), value(tversky(y, p))
    assert value(focal_tversky(y, p)) == pytest.approx(t ** 1.33, rel=1e-5)
    assert value(combined(y, p)) == pytest.approx(0.7 * d + 0.3 * f, rel=1e-5)
    assert value(combined_tversky(y, p)) == pytest.approx(0.6 * t + 0.4 * f, rel=1e-5)


def test_seed_documented_values():
    "The seed's test table: a prediction whose Tversky loss is 0.15 has focal_tversky 0.080205 (so gamma = 1.33)."
    q = 0.85 * 0.7 / (1 - 0.85 * 0.3)  # all-bead truth, constant prediction q: Tversky index q / (0.7 + 0.3 q) = 0.85
    y, p = np.ones((1, 8, 8, 1), 'float32'), np.full((1, 8, 8, 1), q, 'float32')
    assert value(tversky(y, p)) == pytest.approx(0.15, abs=1e-6)
    assert value(focal_tversky(y, p)) == pytest.approx(0.080205, abs=1e-6)
    assert value(get_loss('focal_tversky', gamma=0.75)(y, p)) == pytest.approx(0.15 ** 0.75, abs=1e-6)  # the paper's form


def test_parameters_are_configurable():
    y, p = GT[None, ..., None], PR1[None, ..., None]
    assert value(get_loss('focal_tversky', gamma=0.75)(y, p)) == pytest.approx((1 - 0.5882) ** 0.75, abs=1e-4)
    assert value(get_loss('tversky', alpha=0.3, beta=0.7)(y, p)) == pytest.approx(1 - 2 / (2 + 0.3 * 2), abs=1e-6)
    assert value(get_loss('combined', dice_weight=1.0, focal_weight=0.0)(y, p)) == pytest.approx(1 / 3, abs=1e-6)
    assert value(get_loss('focal', alpha=0.5, gamma=0.0)(np.float32(1), np.float32(0.5))) == pytest.approx(0.5 * np.log(2), rel=1e-5)


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(ValueError, match='valid losses: dice, focal, tversky, focal_tversky, combined, combined_tversky'):
        get_loss('jaccard_loss')
    with pytest.raises(ValueError, match="no parameter 'gamma'"):
        get_loss('dice', gamma=2)


ZEROS, ONES = np.zeros((2, 8, 8, 1), 'float32'), np.ones((2, 8, 8, 1), 'float32')
EDGE_CASES = {'empty/empty': (ZEROS, ZEROS), 'empty/full': (ZEROS, ONES), 'full/empty': (ONES, ZEROS),
              'full/full': (ONES, ONES), 'empty/half': (ZEROS, ONES / 2),
              'exact 0 and 1': (GT[None, ..., None], PR2[None, ..., None])}


@pytest.mark.parametrize('name', LOSSES)
@pytest.mark.parametrize('case', EDGE_CASES)
def test_finite_values_and_gradients(name, case):
    import tensorflow as tf
    y, p = map(tf.constant, EDGE_CASES[case])
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = get_loss(name)(y, p)
    assert np.isfinite(value(loss)) and np.all(np.isfinite(tape.gradient(loss, p).numpy()))


def test_perfect_predictions_cost_nothing():
    for name in ('dice', 'tversky', 'focal_tversky'):
        assert value(get_loss(name)(ONES, ONES)) == pytest.approx(0, abs=1e-6)
        assert value(get_loss(name)(ZEROS, ZEROS)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize('name', LOSSES)
def test_float16_inputs_give_float32_values(name):
    "Under mixed precision a float16 prediction gives the same loss as the same numbers in float32 (to 1e-5)."
    rng = np.random.default_rng(1)
    y = (rng.random((4, 256, 256, 1)) < 0.12).astype('float16')
    p = rng.random((4, 256, 256, 1)).astype('float16')
    v16, v32 = LOSSES[name](y, p), LOSSES[name](y.astype('float32'), p.astype('float32'))
    assert keras.backend.standardize_dtype(v16.dtype) == 'float32'
    assert value(v16) == pytest.approx(value(v32), abs=1e-5)


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy('mixed_float16')
    yield
    keras.mixed_precision.set_global_policy('float32')


@pytest.mark.parametrize('name', LOSSES)
def test_losses_under_mixed_float16_policy(name, mixed_precision):
    "The same loss object, the same numbers: equal under the mixed_float16 and float32 policies, gradients finite."
    from beadseg.models import build_model
    model = build_model('unet', (32, 32, 1), base_filters=4, dropout=0)
    x = np.random.default_rng(2).random((2, 32, 32, 1)).astype('float32')
    y = np.zeros((2, 32, 32, 1), 'float32')
    y[:, 8:16, 8:16] = 1
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = get_loss(name)(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    assert keras.backend.standardize_dtype(loss.dtype) == 'float32'
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    p = model(x).numpy()
    assert p.dtype == np.float32
    assert value(get_loss(name)(y, p.astype('float16'))) == pytest.approx(value(LOSSES[name](y, p.astype('float16').astype('float32'))), abs=1e-5)


def masks(seed, n=6, side=16):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, side, side, 1)) < 0.2).astype('float32')
    p = np.clip(y * 0.4 + rng.random(y.shape) * 0.6, 0, 1).astype('float32')
    return y, p


def numpy_scores(y, p):
    t, q = y > 0.5, p > 0.5
    tp, fp, fn = (t & q).sum(), (~t & q).sum(), (t & ~q).sum()
    return tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)


def test_metrics_accumulate_over_the_whole_set():
    "Any batching gives the IoU/Dice of the whole set, computed independently with numpy."
    y, p = masks(0)
    expected = numpy_scores(y, p)
    for batch in (1, 2, 6):
        metrics = Jaccard(), DiceCoef()
        for i in range(0, len(y), batch):
            for m in metrics: m.update_state(y[i:i + batch], p[i:i + batch])
        assert [value(m.result()) for m in metrics] == pytest.approx(expected, abs=1e-6)
    per_batch_mean = np.mean([numpy_scores(y[i:i + 1], p[i:i + 1])[0] for i in range(len(y))])
    assert per_batch_mean != pytest.approx(expected[0], abs=1e-4)  # the seed's way would differ


def test_metrics_in_keras_evaluate_ignore_batch_size():
    "val_jaccard as Keras reports it: identical for batch sizes 1 and 4, equal to the numpy value."
    inputs = keras.Input((16, 16, 1))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss=get_loss('dice'), metrics=[Jaccard(), DiceCoef()])
    y, p = masks(3, n=8)
    scores = [model.evaluate(p, y, batch_size=b, verbose=0, return_dict=True) for b in (1, 4)]
    for s in scores:
        assert [s['jaccard'], s['dice_coef']] == pytest.approx(numpy_scores(y, p), abs=1e-6)


def test_metric_edge_cases():
    j = Jaccard()
    j.update_state(ZEROS, ZEROS)
    assert value(j.result()) == 1.0  # nothing to find, nothing found
    j.reset_state()
    j.update_state(ONES, ZEROS)
    assert value(j.result()) == 0.0
    j.reset_state()
    j.update_state(ONES, np.full_like(ONES, 0.5))  # threshold 0.5 is strict: 0.5 is background
    assert value(j.result()) == 0.0
    all_foreground = Jaccard()
    y, _ = masks(4)
    all_foreground.update_state(y, np.ones_like(y))
    assert value(all_foreground.result()) == pytest.approx(y.mean(), abs=1e-6)  # the trivial baseline = foreground share

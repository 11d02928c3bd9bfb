"Models: the seed's parameter counts, shapes, save/load round trips, attention, bad arguments."
import re
import numpy as np
import pytest
import keras
from beadseg.models import build_model, ARCHITECTURES
from beadseg.losses import get_loss, LOSSES, Jaccard, DiceCoef


@pytest.mark.parametrize('architecture', ARCHITECTURES)
@pytest.mark.parametrize('side', [64, 128, 512])
@pytest.mark.parametrize('channels', [1, 3])
def test_output_shape_matches_input(architecture, side, channels):
    model = build_model(architecture, (side, side, channels), base_filters=4)
    x = np.random.default_rng(0).random((1, side, side, channels)).astype('float32')
    y = model(x).numpy()
    assert y.shape == (1, side, side, 1) and y.dtype == np.float32
    assert 0 <= y.min() and y.max() <= 1


def test_output_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy('mixed_float16')
    try:
        model = build_model('attention_resunet', (32, 32, 1), base_filters=4)
        assert model.get_layer('enc1_conv1').compute_dtype == 'float16'
        assert str(model.output.dtype) == 'float32'
    finally:
        keras.mixed_precision.set_global_policy('float32')


@pytest.mark.filterwarnings('ignore:Skipping variable loading for optimizer')  # the optimizer was never built
@pytest.mark.parametrize('architecture', ARCHITECTURES)
def test_save_load_round_trip_with_every_loss(architecture, tmp_path):
    "Compiled with each loss, saved, loaded by a plain keras.models.load_model in safe mode: same predictions and loss."
    x = np.random.default_rng(1).random((2, 32, 32, 1)).astype('float32')
    y = (x > 0.7).astype('float32')
    model = build_model(architecture, (32, 32, 1), base_filters=4)
    expected = model(x).numpy()
    for name in LOSSES:
        model.compile(keras.optimizers.Adam(5e-5), loss=get_loss(name), metrics=[Jaccard(), DiceCoef()])
        path = tmp_path/f'{architecture}_{name}.keras'
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(loaded(x).numpy(), expected)
        assert loaded.loss.get_config() == model.loss.get_config()
        assert float(loaded.loss(y, expected)) == float(get_loss(name)(y, expected))
        assert [m['registered_name'] for m in loaded.get_compile_config()['metrics']] == ['beadseg>Jaccard', 'beadseg>DiceCoef']


def test_load_model_in_a_fresh_process(tmp_path):
    "Importing beadseg.losses is all a new process needs before keras.models.load_model."
    import subprocess, sys
    model = build_model('resunet', (32, 32, 1), base_filters=4)
    model.compile('adam', loss=get_loss('combined_tversky', focal_gamma=3.0), metrics=[Jaccard()])
    model.save(tmp_path/'m.keras')
    code = ("import beadseg.losses, keras; m = keras.models.load_model('m.keras'); "
            "print(m.loss.get_config()['loss'], m.loss.get_config()['focal_gamma'])")
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['combined_tversky', '3.0']


def test_no_lambda_layers():
    for architecture in ARCHITECTURES:
        layers = build_model(architecture, (32, 32, 1), base_filters=4).layers
        assert not any(isinstance(layer, keras.layers.Lambda) for layer in layers)


def test_attention_coefficients():
    model = build_model('attention_resunet', (64, 64, 3), base_filters=4)
    psi = keras.Model(model.input, [model.get_layer(f'att{i}_psi').output for i in range(1, 5)])
    skips = [model.get_layer(f'enc{i}_relu2').output for i in range(1, 5)]
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype('float32')
    for coeff, skip in zip([c.numpy() for c in psi(x)], skips):
        assert coeff.shape[1:3] == tuple(skip.shape[1:3]) and coeff.shape[-1] == 1
        assert coeff.min() >= 0 and coeff.max() <= 1


def test_dropout_placement():
    names = [layer.name for layer in build_model('unet', (32, 32, 1), base_filters=4).layers
             if isinstance(layer, keras.layers.Dropout)]
    assert names == ['enc4_dropout', 'bridge_dropout']
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in build_model('unet', (32, 32, 1), 4, dropout=0).layers)


@pytest.mark.parametrize('kwargs, message', [
    (dict(input_shape=(100, 100, 1)), 'Input side 100 must be a multiple of 2^depth = 16: use e.g. 96 or 112'),
    (dict(input_shape=(64, 72, 1)), 'Input side 72 must be a multiple of 2^depth = 16'),
    (dict(input_shape=(20, 20, 1), depth=3), 'Input side 20 must be a multiple of 2^depth = 8: use e.g. 16 or 24'),
    (dict(architecture='vnet'), "Unknown architecture 'vnet'; use one of unet, resunet, attention_resunet"),
    (dict(base_filters=0), 'base_filters must be a positive integer'),
    (dict(base_filters=-8), 'base_filters must be a positive integer'),
    (dict(input_shape=(64, 64, 0)), 'channels >= 1'),
    (dict(dropout=1.0), 'dropout must be in [0, 1)'),
])
def test_bad_arguments_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(**{'architecture': 'unet', **kwargs})

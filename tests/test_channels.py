"Stacks and channels: a dataset of 3-page grayscale TIFFs is refused without [data] channel and trains on that one page with it (issue 24)."
import json
from pathlib import Path
import numpy as np
import pytest, tifffile
from conftest import run_beadseg
from beadseg.synthetic import synthesize
from beadseg.data import read_image, normalise, validate_dataset


@pytest.fixture(scope='module')
def stacks(tmp_path_factory):
    "Synthetic beads whose images are 3-page ImageJ stacks at 0.5 um per pixel: page 1 the beads, pages 0 and 2 noise and an inverted copy."
    folder = synthesize(tmp_path_factory.mktemp('data')/'stacks', n_images=8, size=128, seed=1, preset='easy')
    rng = np.random.default_rng(0)
    for path in sorted((folder/'images').iterdir()):
        beads = tifffile.imread(path)
        noise = rng.integers(0, beads.max() + 1, beads.shape).astype(beads.dtype)
        tifffile.imwrite(path, np.stack([noise, beads, beads.max() - beads]), imagej=True, resolution=(2, 2),
                         metadata={'axes': 'ZYX', 'unit': 'um'})  # a Fiji Z stack at 0.5 um per pixel
    return folder


def test_a_stack_is_refused_without_channel_and_read_as_its_page_with_it(stacks):
    path = sorted((stacks/'images').iterdir())[0]
    page = tifffile.imread(path)[1]
    np.testing.assert_array_equal(read_image(path, channel=1)[..., 0], normalise(page.astype(np.float32)))
    refused = validate_dataset(stacks, 64)
    assert not refused.ok and len(refused.errors) == 8
    assert refused.errors[0] == (f'{path}: a stack of 3 planes (shape (3, 128, 128), axes ZYX); '
                                 f'set [data] channel (or --channel) to the plane to use')
    assert validate_dataset(stacks, 64, channel=1).ok
    assert validate_dataset(stacks, 64, channel=1).summary['pixel_size'] == 0.5
    out = run_beadseg('validate', stacks, '--image-size', '64')
    assert out.returncode == 1 and 'set [data] channel (or --channel)' in out.stdout
    assert run_beadseg('validate', stacks, '--image-size', '64', '--channel', '1').returncode == 0
    out = run_beadseg('validate', stacks, '--image-size', '64', '--channel', '3')
    assert out.returncode == 1 and 'channel 3 is not in this image' in out.stdout


def test_a_stack_dataset_trains_on_its_channel(stacks, tmp_path):
    from beadseg.config import PROJECT_SETTINGS, load_settings
    from beadseg.train import config_from_settings, train
    config = config_from_settings(load_settings(PROJECT_SETTINGS), dataset=str(stacks), out_dir=str(tmp_path/'run'), image_size=64,
                                  base_filters=8, batch_size=4, val_split=0.25, max_epochs=1, channel=1)
    result = train(config, verbose=0)
    assert result['status'] == 'completed' and result['config']['channel'] == 1
    recorded = json.loads((tmp_path/'run'/'result.json').read_text())
    assert recorded['config']['channel'] == 1 and np.isfinite(recorded['best_val_jaccard'])
    assert recorded['pixel_size'] == 0.5 and recorded['dataset_summary']['pixel_size_known'] == 8  # from the metadata

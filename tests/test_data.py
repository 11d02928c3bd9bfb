"Datasets: synthetic beads, reading, validation (library and `beadseg validate`), the split (beadseg.data) and the tf.data pipeline (beadseg.pipeline)."
import dataclasses, hashlib, shutil
from pathlib import Path
import numpy as np
import pytest, tifffile, imageio.v3 as iio
from skimage.measure import label
from conftest import run_beadseg
from beadseg.synthetic import synthesize
from beadseg.data import (find_pairs, read_image, read_mask, read_labels, load_arrays, validate_dataset, check_dataset,
                          split_dataset, density_bins, save_split, load_split, shrink_labels)
from beadseg.pipeline import make_dataset, geometric_augment, affine_transform, rotation_matrix, warp


def fingerprint(folder):
    "Content hash and modification time of every file under `folder`."
    return {p: (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def beads(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp('data')/'beads', n_images=12, size=128, seed=0, preset='easy')


# ---------------------------------------------------------------- synthetic beads

def test_synthetic_beads_match_the_users_data(tmp_path):
    out = synthesize(tmp_path/'big', n_images=4, size=512, seed=3, preset='easy', bead_diameter=23.6)  # the user's bead size
    labels = [tifffile.imread(p) for p in sorted((out/'labels').glob('*.tif'))]
    masks = [tifffile.imread(p) for p in sorted((out/'masks').glob('*.tif'))]
    images = [tifffile.imread(p) for p in sorted((out/'images').glob('*.tif'))]
    assert len(images) == 4 and images[0].dtype == np.uint16 and images[0].shape == (512, 512)
    assert masks[0].dtype == np.uint8 and set(np.unique(masks[0])) == {0, 1}
    beads = [len(np.unique(l)) - 1 for l in labels]
    assert 85 <= np.mean(beads) <= 135                       # about 109 per image
    assert 0.10 <= np.mean([m.mean() for m in masks]) <= 0.14  # about 12 % foreground (shrunk masks)
    for l, m in zip(labels, masks):
        assert ((l > 0) >= m).all()                          # masks are the shrunk beads
        assert label(m, connectivity=1).max() >= 0.97 * (len(np.unique(l)) - 1)  # shrinking keeps beads apart
        assert label(l > 0, connectivity=1).max() < len(np.unique(l)) - 1        # some beads touch
        assert (m == (shrink_labels(l.astype(np.int32), 2) > 0)).all()


def test_synthesize_is_deterministic_and_never_overwrites(tmp_path):
    a, b, c = (synthesize(tmp_path/n, n_images=2, size=64, seed=s) for n, s in (('a', 5), ('b', 5), ('c', 6)))
    for sub in ('images', 'masks', 'labels'):
        assert (a/sub/'bead_001.tif').read_bytes() == (b/sub/'bead_001.tif').read_bytes()
    assert (a/'images/bead_001.tif').read_bytes() != (c/'images/bead_001.tif').read_bytes()
    with pytest.raises(ValueError, match='already holds a dataset'): synthesize(a, n_images=1, size=64)


def test_synth_command(tmp_path):
    out = run_beadseg('synth', tmp_path/'s', '--n-images', '3', '--size', '64', '--seed', '1', '--shrink', '1')
    assert out.returncode == 0, out.stderr
    assert 'beads per image' in out.stdout and 'usable: 0 errors' in out.stdout
    assert len(list((tmp_path/'s/images').glob('*.tif'))) == 3
    again = run_beadseg('synth', tmp_path/'s', '--n-images', '3', '--size', '64')
    assert again.returncode == 2 and again.stderr == f'beadseg synth: error: {tmp_path}/s: already holds a dataset; choose a new folder\n'


# ---------------------------------------------------------------- reading

def test_reading_formats_and_mask_kinds(tmp_path, beads):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    iio.imwrite(tmp_path/'rgb.png', rgb)
    iio.imwrite(tmp_path/'gray.jpg', rgb[..., 0])
    for path, color, channels in [('rgb.png', 'gray', 1), ('rgb.png', 'rgb', 3), ('gray.jpg', 'rgb', 3), ('gray.jpg', 'gray', 1)]:
        x = read_image(tmp_path/path, color)
        assert x.shape == (40, 50, channels) and x.dtype == np.float32 and x.min() == 0 and x.max() == 1
    m = rng.random((20, 20)) < 0.3
    for name, pixels in [('bool.tif', m), ('255.png', m.astype(np.uint8) * 255), ('01.tif', m.astype(np.uint16))]:
        (iio.imwrite if name.endswith('png') else tifffile.imwrite)(tmp_path/name, pixels)
        out = read_mask(tmp_path/name, shrink=2)   # binary masks are taken as they are
        assert out.dtype == np.uint8 and (out == m).all()
    sample = find_pairs(beads)[0]
    # an instance-label mask shrunk on reading gives exactly the synthetic shrunk mask
    assert (read_mask(sample.labels, shrink=2) == read_mask(sample.mask)).all()
    # without labels/, the mask's beads grown back by the shrink approximate the true beads
    grown = read_labels(dataclasses.replace(sample, labels=None), 2)
    truth = read_labels(sample, 2)
    assert grown.dtype == truth.dtype == np.int32
    assert ((grown > 0) & (truth > 0)).sum() / ((grown > 0) | (truth > 0)).sum() > 0.85
    assert grown.max() == label(read_mask(sample.mask), connectivity=1).max()


def test_mask_suffix_pairs_files(tmp_path, beads):
    shutil.copytree(beads/'images', tmp_path/'images')
    (tmp_path/'masks').mkdir()
    for p in (beads/'masks').glob('*.tif'): shutil.copy(p, tmp_path/'masks'/f'{p.stem}_mask.tif')
    pairs = find_pairs(tmp_path, mask_suffix='_mask')
    assert [p.stem for p in pairs] == [f'bead_{i:03d}' for i in range(12)]
    assert pairs[0].mask.name == 'bead_000_mask.tif' and pairs[0].labels is None
    assert validate_dataset(tmp_path, 64, mask_suffix='_mask').ok
    assert not validate_dataset(tmp_path, 64).ok


# ---------------------------------------------------------------- validation

def test_validate_good_dataset_exits_0(beads):
    out = run_beadseg('validate', beads, '--image-size', '64')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ['images', '12'] and lines[2].split() == ['sizes', '128x128', '(12)']
    assert lines[-1] == 'status          usable: 0 errors, 0 warnings'
    report = validate_dataset(beads, 64)
    assert report.summary['n_images'] == 12 and 5 < report.summary['foreground_mean'] * 100 < 12
    assert sorted(report.bead_counts) == [f'bead_{i:03d}' for i in range(12)]
    assert report.bead_counts['bead_000'] == label(read_mask(beads/'masks/bead_000.tif'), connectivity=1).max()


@pytest.fixture(scope='module')
def broken(beads, tmp_path_factory):
    "A copy of the beads with one problem per image; (folder, expected errors, expected warnings)."
    d = Path(shutil.copytree(beads, tmp_path_factory.mktemp('broken')/'d', ignore=shutil.ignore_patterns('labels')))
    img, msk = d/'images', d/'masks'
    (msk/'bead_000.tif').unlink()
    tifffile.imwrite(msk/'orphan.tif', np.zeros((128, 128), np.uint8))
    tifffile.imwrite(msk/'bead_001.tif', np.zeros((64, 96), np.uint8))
    (img/'bead_002.tif').write_bytes(b'II*\x00 truncated')
    (msk/'bead_003.tif').write_bytes(b'')
    tifffile.imwrite(msk/'bead_004.tif', np.zeros((128, 128, 3), np.uint8))
    tifffile.imwrite(msk/'bead_005.tif', np.full((128, 128), 0.5, np.float32))
    tifffile.imwrite(msk/'bead_006.tif', np.full((128, 128), -1, np.int16))
    tifffile.imwrite(img/'bead_007.tif', np.zeros((32, 48), np.uint16))
    tifffile.imwrite(msk/'bead_007.tif', np.zeros((32, 48), np.uint8))
    tifffile.imwrite(msk/'bead_008.tif', np.zeros((128, 128), np.uint8))
    tifffile.imwrite(img/'bead_009.tif', np.zeros((100, 128), np.uint16))
    tifffile.imwrite(msk/'bead_009.tif', np.ones((100, 128), np.uint8))
    iio.imwrite(img/'bead_010.png', np.zeros((128, 128), np.uint8))
    tifffile.imwrite(img/'bead_011.tif', np.zeros((128, 128, 2), np.uint16))
    nan_image = tifffile.imread(img/'bead_008.tif').astype(np.float32); nan_image[5, :10] = np.nan; nan_image[6, 0] = np.inf
    tifffile.imwrite(img/'bead_012.tif', nan_image); shutil.copy(msk/'bead_009.tif', msk/'bead_012.tif')
    for stem, mask in (('bead_013', tifffile.imread(img/'bead_008.tif')),  # the image itself used as its mask
                       ('bead_014', np.random.default_rng(0).choice([0, 3, 7], (128, 128)).astype(np.uint8))):  # noise
        shutil.copy(img/'bead_008.tif', img/f'{stem}.tif'); tifffile.imwrite(msk/f'{stem}.tif', mask)
    tifffile.imwrite(img/'bead_015.tif', np.zeros((32, 48), np.uint16))  # too small and mismatched: both are said
    tifffile.imwrite(msk/'bead_015.tif', np.zeros((40, 40), np.uint8))
    errors = [
        f'{img}/bead_010.tif: another file has the same stem \'bead_010\' (bead_010.png)',
        f'{img}/bead_000.tif: no mask bead_000.* in masks/',
        f'{msk}/orphan.tif: no image orphan.* in images/',
        f'{msk}/bead_001.tif: mask is 64x96 but its image is 128x128',
        f'{img}/bead_002.tif: unreadable or corrupt image file',
        f'{msk}/bead_003.tif: unreadable or corrupt image file',
        f'{msk}/bead_004.tif: mask must be 2-D, found shape (128, 128, 3)',
        f'{msk}/bead_005.tif: mask values are neither binary nor integer labels (found 0.5)',
        f'{msk}/bead_006.tif: mask values are neither binary nor integer labels (found -1)',
        f'{img}/bead_007.tif: image is 32x48, smaller than image_size 64',
        f'{img}/bead_011.tif: a stack of 128 planes (shape (128, 128, 2), axes QYX); set [data] channel (or --channel) to the plane to use',
        f'{img}/bead_012.tif: 11 pixel values are NaN or infinite',
        f'{msk}/bead_013.tif: mask values are neither binary nor instance labels: ',  # the rest names the counts
        f'{msk}/bead_014.tif: mask values are neither binary nor instance labels: ',
        f'{msk}/bead_015.tif: mask is 40x40 but its image is 32x48',
        f'{img}/bead_015.tif: image is 32x48, smaller than image_size 64',
    ]
    warnings = [f'{msk}/bead_007.tif: empty mask (no beads)', f'{msk}/bead_008.tif: empty mask (no beads)',
                f'{img}/bead_009.tif: image is 100x128, not a multiple of image_size 64 (validation tiles leave out the rest)']
    return d, errors, warnings


@pytest.fixture(scope='module')
def validated(broken):
    d, _, _ = broken
    before = fingerprint(d)
    out = run_beadseg('validate', d, '--image-size', '64')
    assert fingerprint(d) == before   # validation never modifies the dataset
    return out


def test_validate_reports_every_problem_at_once(broken, validated):
    d, errors, warnings = broken
    assert validated.returncode == 1 and validated.stderr == ''
    lines = validated.stdout.splitlines()
    problems = [l for l in lines if l.startswith(('error: ', 'warning: '))]
    expected = [f'error: {e}' for e in errors] + [f'warning: {w}' for w in warnings]
    assert len(problems) == len(expected) and all(any(p.startswith(e) for p in problems) for e in expected)
    assert lines[-len(problems) - 1] == f'status          NOT usable: {len(errors)} errors, {len(warnings)} warnings'
    report = validate_dataset(d, 64)
    assert [e for e in expected if e[7:] not in report.errors and e[9:] not in report.warnings] == \
           [f'error: {e}' for e in errors if e.endswith(': ')]  # only the two prefixes are not whole lines
    assert len(report.errors) == len(errors) and sorted(report.warnings) == sorted(warnings) and not report.ok
    with pytest.raises(ValueError) as err: check_dataset(d, 64)
    assert str(err.value) == f'{d}: {len(errors)} problems: {report.errors[0]} (run `beadseg validate {d}`)'


@pytest.mark.parametrize('case', range(16))
def test_each_bad_case_has_its_one_line_message(broken, validated, case):
    assert f'error: {broken[1][case]}' in validated.stdout and validated.returncode == 1


def test_images_and_noise_used_as_masks_say_why(validated, broken):
    msk = broken[0]/'masks'
    for stem in ('bead_013', 'bead_014'):
        line, = [l for l in validated.stdout.splitlines() if l.startswith(f'error: {msk}/{stem}.tif')]
        assert 'separate regions' in line and 'instance labels are connected blobs of many pixels each' in line


def test_a_single_image_is_too_few_to_split(beads, tmp_path):
    d = tmp_path/'one'
    for sub in ('images', 'masks'):
        (d/sub).mkdir(parents=True); shutil.copy(beads/sub/'bead_000.tif', d/sub)
    out = run_beadseg('validate', d, '--image-size', '64')
    assert out.returncode == 1 and out.stderr == ''
    assert [l for l in out.stdout.splitlines() if l.startswith('error')] == \
           [f'error: {d}: only 1 usable image; training needs at least 2 (one to train on, one to validate)']


def test_real_label_tiles_with_id_gaps_and_binary_shrunk_masks_validate(tmp_path):
    "The layouts of real data: instance labels with gaps in their ids, and binary shrunk masks without labels/."
    pytest.importorskip('stardist')
    from conftest import nuclei_dataset
    for layout in ('labels', 'binary'):
        report = validate_dataset(nuclei_dataset(tmp_path/layout, layout), 64)
        assert report.ok and report.summary['n_images'] == 16, report.errors
        assert 9 <= report.summary['beads_mean'] <= 11  # 125 nuclei, some cut by tile edges; counted by distinct ids


@pytest.mark.parametrize('layout, message', [
    ('nothing', '{d}: no such folder'),
    ('masks', '{d}/images: missing folder (a dataset needs images/ and masks/)'),
    ('images', '{d}/masks: missing folder (a dataset needs images/ and masks/)'),
    ('images masks', '{d}/images: no images (.tif, .tiff, .png, .jpg, .jpeg)'),
])
def test_unusable_folders(tmp_path, layout, message):
    d = tmp_path/'d'
    for sub in layout.split():
        if sub != 'nothing': (d/sub).mkdir(parents=True)
    if (d/'masks').is_dir(): (d/'masks/readme.txt').write_text('not an image')
    out = run_beadseg('validate', d)
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    assert [l for l in out.stdout.splitlines() if l.startswith('error')] == ['error: ' + message.format(d=d)]


# ---------------------------------------------------------------- split

def test_split_is_stratified_and_deterministic():
    rng = np.random.default_rng(1)
    counts = {f's{i:03d}': int(c) for i, c in enumerate(rng.integers(20, 200, 80))}
    train, val, warns = split_dataset(list(counts), counts, 0.15, seed=7)
    assert warns == [] and len(val) == 12 and len(train) == 68 and not set(train) & set(val)
    assert set(train) | set(val) == set(counts)
    assert (train, val) == split_dataset(sorted(counts, reverse=True), counts, 0.15, seed=7)[:2]
    assert val != split_dataset(list(counts), counts, 0.15, seed=8)[1]
    stems = sorted(counts)
    bins = dict(zip(stems, density_bins(np.array([counts[s] for s in stems]), 4)))
    assert sorted(np.bincount([bins[s] for s in val]).tolist()) == [3, 3, 3, 3]   # 12 of 80 in 4 bins of 20


def test_split_falls_back_with_a_warning_and_round_trips(tmp_path):
    counts = dict(a=3, b=3, c=3, d=3, e=9)
    train, val, warns = split_dataset(counts, counts, 0.4, seed=0)
    assert len(val) == 2 and warns == ['too few images per bead-density bin (4, 1) to stratify; plain random split']
    save_split(tmp_path/'split.json', train, val, 0, bead_counts=counts)
    assert load_split(tmp_path/'split.json') == (train, val)
    with pytest.raises(ValueError, match='^a validation split needs at least 2 images, got 1$'): split_dataset(['a'], dict(a=1), 0.15, 0)


# ---------------------------------------------------------------- tf.data pipeline

def blobs(size=64, seed=0):
    "A smooth float32 image of random discs in [0, 1] and the mask `image > 0.5`."
    from scipy import ndimage as ndi
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    discs = np.zeros((size, size), bool)
    for cy, cx, r in zip(*rng.uniform(0, size, (2, size // 6)), rng.uniform(3, 7, size // 6)):
        discs |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    x = ndi.gaussian_filter(discs.astype(np.float32), 1.5)[..., None]
    return x, (x > 0.5).astype(np.float32)


def iou(a, b): return (a & b).sum() / (a | b).sum()


def test_geometric_augmentation_keeps_image_and_mask_aligned():
    image, mask = blobs()
    changed = 0
    for seed in range(24):
        aug_image, aug_mask = (t.numpy() for t in geometric_augment(image, mask, np.array([seed, 1])))
        assert set(np.unique(aug_mask)) <= {0., 1.}
        assert iou(aug_image > 0.5, aug_mask > 0.5) > 0.9
        changed += iou(aug_mask > 0.5, mask > 0.5) < 0.5
    assert changed > 12          # the transforms really move things
    t = affine_transform(rotation_matrix(np.float32(0.26), np.float32(1.1)), 64)   # the small rotation and zoom on their own
    rotated, rotated_mask = warp(image, t, 'BILINEAR').numpy(), warp(mask, t, 'NEAREST').numpy()
    assert iou(rotated > 0.5, rotated_mask > 0.5) > 0.9 and iou(rotated_mask > 0.5, mask > 0.5) < 0.8
    assert set(np.unique(rotated_mask)) <= {0., 1.}


@pytest.fixture(scope='module')
def mask_images(tmp_path_factory):
    "A dataset whose images are their masks plus noise: (samples)."
    d = tmp_path_factory.mktemp('pairs')
    (d/'images').mkdir(), (d/'masks').mkdir()
    for i in range(6):
        image, mask = blobs(96, seed=i)
        noisy = mask[..., 0] * 150 + 50 + np.random.default_rng(i).normal(0, 5, mask.shape[:2])
        tifffile.imwrite(d/f'images/m{i}.tif', noisy.astype(np.uint8))
        tifffile.imwrite(d/f'masks/m{i}.tif', mask[..., 0].astype(np.uint8))
    return find_pairs(d)


def batches(ds): return [(i.numpy(), m.numpy()) for i, m in ds]


def test_training_batches_are_aligned_bounded_and_reproducible(mask_images):
    before = fingerprint(mask_images[0].image.parent.parent)
    make = lambda seed, **kw: make_dataset(mask_images, 64, micro_batch=4, training=True, seed=seed, **kw)
    ds = make(1)
    epochs = [batches(ds), batches(ds)]
    assert [len(b[0]) for b in epochs[0]] == [4, 2]          # one crop per image and epoch, last batch kept
    for images, masks in epochs[0] + epochs[1]:
        assert images.dtype == masks.dtype == np.float32 and images.shape[1:] == masks.shape[1:3] + (1,) == (64, 64, 1)
        assert images.min() >= 0 and images.max() <= 1 and set(np.unique(masks)) <= {0., 1.}
        for image, mask in zip(images, masks):
            on, off = image[mask > 0.5].mean(), image[mask < 0.5].mean()
            assert on > off + 0.2 and iou(image > (on + off) / 2, mask > 0.5) > 0.8
    again = make(1, cache=False)
    for a, b in zip(epochs[0] + epochs[1], batches(again) + batches(again)):
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-6); np.testing.assert_array_equal(a[1], b[1])  # images to rounding: TensorFlow may differ in the last bit between runs
    assert not np.array_equal(epochs[0][0][0], epochs[1][0][0])               # each epoch draws anew
    assert not np.array_equal(epochs[0][0][0], batches(make(2))[0][0])        # another seed, other batches
    assert fingerprint(mask_images[0].image.parent.parent) == before          # reading never writes


def test_unaugmented_and_validation_data(mask_images):
    images, masks, labels = load_arrays(mask_images[:2])
    crops, crop_masks = batches(make_dataset(mask_images[:1], 64, 1, training=True, augment=False))[0]
    found = [(y, x) for y in range(33) for x in range(33) if np.array_equal(images[0][y:y + 64, x:x + 64], crops[0])]
    assert len(found) == 1 and np.array_equal(masks[0][found[0][0]:found[0][0] + 64, found[0][1]:found[0][1] + 64], crop_masks[0, ..., 0])
    tiles = batches(make_dataset(mask_images[:2], 32, micro_batch=5, training=False))
    assert [len(t[0]) for t in tiles] == [5, 5, 5, 3]          # 9 tiles of 32 per 96 x 96 image, 2 images
    first = np.concatenate([t[0] for t in tiles])[:9]
    np.testing.assert_array_equal(first.reshape(3, 3, 32, 32, 1).transpose(0, 2, 1, 3, 4).reshape(96, 96, 1), images[0])
    for a, b in zip(tiles, batches(make_dataset(mask_images[:2], 32, micro_batch=5, training=False))):
        np.testing.assert_array_equal(a[0], b[0]); np.testing.assert_array_equal(a[1], b[1])

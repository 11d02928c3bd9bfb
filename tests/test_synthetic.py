"Synthetic beads: presets, a bead size independent of the image size, aggregates, debris outside the labels (measured with skimage/scipy)."
import hashlib
import numpy as np, pytest, tifffile
from scipy import ndimage as ndi
from skimage.measure import regionprops
from conftest import run_beadseg
from beadseg.synthetic import synthesize


def read(folder, sub):
    return [tifffile.imread(p) for p in sorted((folder/sub).glob('*.tif'))]


def median_diameter(labels):
    "Median equivalent diameter (skimage regionprops) of every bead in a list of label images."
    return float(np.median([p.equivalent_diameter_area for l in labels for p in regionprops(l.astype(np.int32))]))


def touching_fraction(labels):
    "Fraction of beads whose mask, dilated by one pixel (4-connectivity), reaches another bead's pixels."
    touching = total = 0
    for l in labels:
        for p in regionprops(l.astype(np.int32)):
            y0, x0, y1, x1 = p.bbox
            box = l[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1]
            grown = ndi.binary_dilation(box == p.label)
            touching += bool(((box != p.label) & (box > 0) & grown).any()); total += 1
    return touching / total


def test_bead_diameter_in_pixels_does_not_depend_on_the_image_size(tmp_path):
    "`synth --size 512` and `--size 2048` (realistic, the default) draw beads of the same size in pixels: a larger field of view."
    small, large = (synthesize(tmp_path/str(s), n_images=1, size=s, seed=0) for s in (512, 2048))
    d512, d2048 = median_diameter(read(small, 'labels')), median_diameter(read(large, 'labels'))
    assert abs(d2048 / d512 - 1) <= 0.1 and 10 <= d512 <= 14, (d512, d2048)  # default 12 px


def test_realistic_beads_touch_and_debris_stays_out_of_the_labels(tmp_path):
    beads = synthesize(tmp_path/'beads', n_images=3, size=256, seed=4)
    clean = synthesize(tmp_path/'clean', n_images=3, size=256, seed=4, debris=0, fibres=0)
    labels = read(beads, 'labels')
    assert touching_fraction(labels) >= 0.2
    for l in labels: assert (np.unique(l) == np.arange(l.max() + 1)).all()  # every bead its own id, 1..n
    for sub in ('labels', 'masks'):  # debris changes the images only
        assert all((a == b).all() for a, b in zip(read(beads, sub), read(clean, sub)))
    changed = [(a != b) & (ndi.gaussian_filter(a.astype(float) - b, 1) > 20) for a, b in zip(read(beads, 'images'), read(clean, 'images'))]
    assert all(c.any() for c in changed)                                    # debris is drawn ...
    assert sum((c & (l == 0)).sum() for c, l in zip(changed, labels)) > 0   # ... where no bead is labelled


def test_easy_is_the_original_generator(tmp_path):
    "Files of the first versions (sha1 of bead_001.tif at 64 px, seed 5), so easy datasets and the tests pinned to them are unchanged."
    out = synthesize(tmp_path/'easy', n_images=2, size=64, seed=5, preset='easy')
    digest = {sub: hashlib.sha1((out/sub/'bead_001.tif').read_bytes()).hexdigest() for sub in ('images', 'masks', 'labels')}
    assert digest == dict(images='b9b6551d8715b2bba948bbdc18485c282068bc13', masks='3745062b763a4965ee385e0f7ce21a1b512951b3',
                          labels='6574711f4291b29a6471652c6f6e7e423d38c221')


def test_synth_presets_and_diameters_from_the_command_line(tmp_path):
    done = run_beadseg('synth', tmp_path/'hard', '--n-images', '2', '--size', '128', '--preset', 'hard',
                       '--bead-diameter', '8', '--pixel-size', '0.5')  # 8 um beads at 0.5 um per pixel: 16 px
    assert done.returncode == 0, done.stderr
    assert 13 <= median_diameter(read(tmp_path/'hard', 'labels')) <= 19
    bad = run_beadseg('synth', tmp_path/'bad', '--n-images', '2', '--size', '64', '--bead-diameter', '5')
    assert bad.returncode == 2 and bad.stderr == ('beadseg synth: error: bead diameter 5 px: masks shrunk by 2 px would erase such '
                                                  'beads; give at least 8 px\n')
    with pytest.raises(ValueError, match="preset 'blurry'"): synthesize(tmp_path/'x', n_images=1, size=64, preset='blurry')
    with pytest.raises(ValueError, match='too large for 64 px images'): synthesize(tmp_path/'y', n_images=1, size=64, bead_diameter=40)

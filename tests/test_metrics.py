"Object metrics against the field's reference, stardist's `matching`, on a real label image with many perturbations."
import numpy as np, pytest
from scipy import ndimage as ndi
from skimage.morphology import disk
from skimage.segmentation import expand_labels
from beadseg.metrics import match_objects, object_scores, score_predictions

matching = pytest.importorskip('stardist.matching').matching
from stardist.data import test_image_nuclei_2d as nuclei_sample

NUCLEI = nuclei_sample(return_mask=True)[1].astype(np.int32)  # DSB 2018: 125 nuclei, ids up to 183


def erode(labels, r):
    "Each label eroded on its own by a disk of radius `r`."
    return np.where(ndi.grey_erosion(labels, footprint=disk(r)) == ndi.grey_dilation(labels, footprint=disk(r)), labels, 0)


def merge_neighbours(labels):
    "Every label merged with the next id up (pairs of objects become one id)."
    ids = np.unique(labels[labels > 0])
    mapping = dict(zip(ids, np.repeat(ids[::2], 2)[:len(ids)]))
    return np.vectorize(lambda v: mapping.get(v, 0))(labels)


def noise_blobs(labels, seed=0, n=40):
    "`labels` with `n` extra random small blobs (false positives) on the background."
    rng, out = np.random.default_rng(seed), labels.copy()
    for k in range(n):
        y, x = rng.integers(4, labels.shape[0] - 4, 2)
        if not out[y - 3:y + 4, x - 3:x + 4].any(): out[y - 3:y + 4, x - 3:x + 4] = 1000 + k
    return out


def perturbations():
    rng = np.random.default_rng(42)
    dropped = np.where(np.isin(NUCLEI, rng.choice(np.unique(NUCLEI)[1:], 40, replace=False)), 0, NUCLEI)
    return {'identical': NUCLEI, 'eroded 1': erode(NUCLEI, 1), 'eroded 3': erode(NUCLEI, 3), 'dilated 2': expand_labels(NUCLEI, 2),
            'dilated 6': expand_labels(NUCLEI, 6), 'dropped 40': dropped, 'merged pairs': merge_neighbours(NUCLEI),
            'shifted 3': np.roll(NUCLEI, 3, 0), 'shifted 7': np.roll(np.roll(NUCLEI, 7, 0), -2, 1),
            'noise blobs': noise_blobs(NUCLEI), 'all of it': noise_blobs(np.roll(erode(dropped, 2), 4, 1), seed=1),
            'binary then components': ndi.label(NUCLEI > 0)[0], 'empty': np.zeros_like(NUCLEI)}


@pytest.mark.parametrize('name', list(perturbations()))
def test_matching_agrees_with_stardist_exactly(name):
    predicted = perturbations()[name]
    ours, theirs = match_objects(NUCLEI, predicted), matching(NUCLEI, predicted.astype(np.int32))
    assert (ours['tp'], ours['n_true'], ours['n_pred']) == (theirs.tp, theirs.n_true, theirs.n_pred), name
    scores = object_scores(ours['tp'], ours['n_true'], ours['n_pred'])
    assert (scores['object_precision'], scores['object_recall'], scores['object_f1']) == \
           pytest.approx((theirs.precision, theirs.recall, theirs.f1), abs=1e-12)
    assert ours['n_pred'] - ours['tp'] == theirs.fp and ours['n_true'] - ours['tp'] == theirs.fn


def test_the_perturbations_cover_a_range_of_scores():
    f1 = [matching(NUCLEI, p.astype(np.int32)).f1 for p in perturbations().values()]
    assert min(f1) == 0 and max(f1) == 1 and len({round(v, 2) for v in f1}) >= 8


def test_evaluation_block_counts_ids_with_gaps_and_matches_stardist_over_tiles():
    "Tiles of the nuclei image (ids with gaps), scored as a validation set: summed stardist counts give the same F1."
    predicted = np.roll(erode(NUCLEI, 1), 2, 1)
    tiles = [(slice(y, y + 128), slice(x, x + 128)) for y in range(0, 512, 128) for x in range(0, 512, 128)]
    truth, pred = [NUCLEI[t] for t in tiles], [predicted[t] for t in tiles]
    block = score_predictions([(p > 0).astype(float) for p in pred], [t > 0 for t in truth], truth, [str(i) for i in range(16)])
    reference = [matching(t, ndi.label(p > 0)[0].astype(np.int32)) for t, p in zip(truth, pred)]
    tp, n_true, n_pred = (sum(getattr(r, k) for r in reference) for k in ('tp', 'n_true', 'n_pred'))
    assert block['object_f1'] == pytest.approx(2 * tp / (n_true + n_pred), abs=1e-12)
    assert [row['true_count'] for row in block['per_image']] == [len(np.unique(t)) - 1 for t in truth]
    assert block['count_mae'] == pytest.approx(np.mean([abs(r.n_true - r.n_pred) for r in reference]))
    low, high = block['object_f1_ci']
    assert low < block['object_f1'] < high


def test_splitting_clumps_recovers_touching_beads_by_stardist():
    """Issue 27 on a clumped synthetic image, scored by stardist's matching rather than beadseg's: a stand-in prediction whose
    shrunk cores merge wherever beads touch (the union of the beads eroded by 2 px) undercounts; the watershed split
    (`segment` with a third of the bead diameter) finds the touching beads again and keeps the isolated ones. About 1 s."""
    from beadseg.inference import segment
    from beadseg.synthetic import synthetic_scene, touching_beads
    scene = synthetic_scene(np.random.default_rng([27, 0]), 256, 2, 'realistic', aggregated=0.6, overlap=0.35)
    truth = scene['labels']
    prob = ndi.gaussian_filter(ndi.binary_erosion(truth > 0, iterations=2).astype(float), 1)
    touching = set(touching_beads(truth).tolist())
    assert len(touching) > 0.3 * truth.max()

    def recall(found):
        m = matching(truth, found, thresh=0.5, report_matches=True)
        hits = [m.matched_pairs[i][0] for i in m.matched_tps]
        assert m.tp == match_objects(truth, found)['tp']
        return sum(t in touching for t in hits) / len(touching), sum(t not in touching for t in hits) / (truth.max() - len(touching)), m
    off, isolated_off, m_off = recall(segment(prob, 0.5, 2))
    on, isolated_on, m_on = recall(segment(prob, 0.5, 2, 0, 4))
    assert m_off.n_pred < 0.85 * m_off.n_true and abs(m_on.n_pred - m_on.n_true) < abs(m_off.n_pred - m_off.n_true) / 4  # 68, 121 of 129
    assert on - off >= 0.15 and isolated_on >= isolated_off - 0.02, (off, on, isolated_off, isolated_on)

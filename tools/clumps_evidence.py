"""Evidence for splitting clumps (issue 27): train two small U-Nets, one on clumped synthetic beads and one on the
'realistic' preset (fewer, looser clumps), choose each one's postprocessing on its own validation images (threshold,
minimum size, split distance), then score held-out clumped, realistic and easy images with splitting off and on (the
chosen distance, or 0.25 of the median bead diameter where the choice was off). Objects are matched by stardist's
`matching` (IoU >= 0.5), the field's reference, not by beadseg's own code (the script checks that the two agree), and
recall is split between beads that touch another bead and isolated ones. Writes nbs/evidence/clumps.csv (the table),
nbs/evidence/clumps_choice.json (the choices and their cost) and nbs/evidence/clumps_overlay.jpg for 17_inference.
Usage: python tools/clumps_evidence.py WORKDIR [EPOCHS]   (about 5 minutes of training per model on 2 CPU cores, then
two minutes; trained runs already in WORKDIR are reused)"""
import json, sys, time
from pathlib import Path
import numpy as np, pandas as pd
from stardist.matching import matching
import beadseg.inference as inference
from beadseg import data
from beadseg.config import PROJECT_SETTINGS, load_settings
from beadseg.predict import load_model
from beadseg.synthetic import synthesize, touching_beads
from beadseg.train import config_from_settings, predict_images, train

CLUMPED = dict(preset='realistic', aggregated=0.6, overlap=0.35)  # more beads in aggregates, pressed together: up to 35 % of the sum of their radii overlap
SETS = {'clumped (realistic, aggregated 0.6, overlap 0.35)': CLUMPED, 'realistic': dict(preset='realistic'), 'easy': dict(preset='easy')}
work, epochs = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25
evidence = Path(__file__).resolve().parent.parent/'nbs'/'evidence'


MODELS = {'clumped': CLUMPED, 'realistic': dict(preset='realistic')}  # what each model trains on


def make_data(seed=11):
    for k, (name, options) in enumerate(MODELS.items()):
        if not (work/f'train_{name}').is_dir(): synthesize(work/f'train_{name}', n_images=24, size=256, seed=seed + k, **options)
    for i, (name, options) in enumerate(SETS.items()):
        if not (work/f'test_{i}').is_dir(): synthesize(work/f'test_{i}', n_images=8, size=256, seed=seed + 100 + i, **options)


def trained_model(name):
    if not (work/f'run_{name}'/'model.keras').is_file():
        config = config_from_settings(load_settings(PROJECT_SETTINGS), dataset=str(work/f'train_{name}'), out_dir=str(work/f'run_{name}'),
                                      image_size=64, base_filters=16, batch_size=8, learning_rate=1e-3, loss_function='combined',
                                      max_epochs=epochs, patience=8, val_split=0.25, tensorboard=False, shrink=2)
        train(config, verbose=2)
    return load_model(work/f'run_{name}'/'model.keras')


def arrays(model, folder, names=None):
    samples, _ = data.match_files(folder, '')
    samples = [s for s in samples if names is None or s.stem in names]
    images, masks, objects = data.load_arrays(samples, shrink=2, color='gray')
    return predict_images(model, images, 64), masks, objects, images


def scores(truth, found):
    "stardist's matching of one image, recall split by whether the true bead touches another, precision by where the prediction lies."
    m = matching(truth, found, thresh=0.5, report_matches=True)
    hit = [m.matched_pairs[i] for i in m.matched_tps]
    touching = set(touching_beads(truth).tolist())
    true_ids = set(np.unique(truth)) - {0}
    overlap = pd.crosstab(found.ravel(), truth.ravel()).drop(index=0, errors='ignore').drop(columns=0, errors='ignore')
    # each prediction's home: the true bead it overlaps most (0, counted with the isolated ones, when it overlaps none)
    home = overlap.idxmax(axis=1).where(overlap.max(axis=1) > 0, 0) if overlap.shape[1] else pd.Series(0, overlap.index)
    in_clump = {p for p, t in home.items() if t in touching}
    found_ids = set(np.unique(found)) - {0}
    return dict(n_true=m.n_true, n_pred=m.n_pred, tp=m.tp, touching=len(touching), touching_tp=sum(t in touching for t, _ in hit),
                isolated=len(true_ids - touching), isolated_tp=sum(t not in touching for t, _ in hit),
                pred_touching=len(in_clump), pred_touching_tp=sum(p in in_clump for _, p in hit),
                pred_isolated=len(found_ids - in_clump), pred_isolated_tp=sum(p not in in_clump for _, p in hit),
                count_error=abs(m.n_true - m.n_pred), own_tp=inference.match_objects(truth, found)['tp'])


def table_rows(name, probabilities, objects, before, after, diameter):
    """Without splitting: the postprocessing chosen from the grid before issue 27 (no split candidates); with it: the choice
    now, or where that left splitting off, the same with a quarter of the median bead diameter (marked 'not chosen')."""
    forced = after if after['split_distance'] else dict(after, split_distance=round(inference.SPLIT_FRACTIONS[1] * diameter))
    rows = []
    for c in (before, forced):
        split = c['split_distance']
        per = [scores(o, inference.segment(p, c['threshold'], 2, c['min_size'], split)) for p, o in zip(probabilities, objects)]
        s = {k: sum(r[k] for r in per) for k in per[0]}
        assert s['own_tp'] == s['tp'], (s['own_tp'], s['tp'])  # beadseg's match_objects agrees with stardist
        rows.append(dict(images=name, splitting=f"on ({split} px{'' if after['split_distance'] else ', not chosen'})" if split else 'off',
                         threshold=c['threshold'], min_size=c['min_size'], true_beads=s['n_true'], found=s['n_pred'],
                         touching_share=s['touching'] / s['n_true'], precision=s['tp'] / s['n_pred'], recall=s['tp'] / s['n_true'],
                         f1=2 * s['tp'] / (s['n_true'] + s['n_pred']), recall_touching=s['touching_tp'] / s['touching'],
                         recall_isolated=s['isolated_tp'] / s['isolated'], precision_isolated=s['pred_isolated_tp'] / s['pred_isolated'],
                         precision_touching=s['pred_touching_tp'] / max(s['pred_touching'], 1),
                         count_error_per_image=s['count_error'] / len(per), count_bias=(s['n_pred'] - s['n_true']) / s['n_true']))
    return rows


def timed_choice(probabilities, masks, objects):
    start = time.perf_counter(); choice = inference.choose_postprocessing(probabilities, masks, objects, 2)
    seconds = time.perf_counter() - start
    fractions, inference.SPLIT_FRACTIONS = inference.SPLIT_FRACTIONS, (0,)  # the grid before issue 27
    start = time.perf_counter(); before = inference.choose_postprocessing(probabilities, masks, objects, 2)
    inference.SPLIT_FRACTIONS = fractions
    return choice, dict(seconds=round(seconds, 2), seconds_without_split_candidates=round(time.perf_counter() - start, 2),
                        before=before)


def overlay_figure(shown, path):
    "Per model a row: truth, the beads without splitting (the old grid's choice) and with it, cut beads tinted; their counts."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries
    fig, axes = plt.subplots(len(shown), 3, figsize=(12, 4.3 * len(shown)), squeeze=False)
    counts = {}
    for row, (model_name, (image, truth, prob, before, after)) in zip(axes, shown.items()):
        off = inference.segment(prob, before['threshold'], 2, before['min_size'], 0)
        on = inference.segment(prob, after['threshold'], 2, after['min_size'], after['split_distance'])
        cut = np.isin(on, inference.split_beads(on, prob >= after['threshold']))
        panels = [(f'truth: {truth.max()} beads', truth, None), (f'trained on {model_name}, splitting off: {off.max()} beads', off, None),
                  (f"splitting on ({after['split_distance']} px): {on.max()} beads, {cut.any() and len(np.unique(on[cut]))} cut (orange)", on, cut)]
        for ax, (title, labels, mark) in zip(row, panels):
            rgb, edge = np.repeat(image[..., :1], 3, -1), find_boundaries(labels)
            if mark is not None: rgb[mark & ~edge] = 0.5 * rgb[mark & ~edge] + 0.5 * np.array([1, 0.55, 0])
            rgb[edge] = (1, 0.1, 0.9)
            ax.imshow(rgb); ax.set_title(title, fontsize=9); ax.axis('off')
        counts[model_name] = dict(true_beads=int(truth.max()), found_without_splitting=int(off.max()), found_with_splitting=int(on.max()),
                                  cut_out_of_clumps=int(len(inference.split_beads(on, prob >= after['threshold']))), split_distance=after['split_distance'])
    fig.tight_layout(); fig.savefig(path, dpi=64, pil_kwargs=dict(quality=75)); plt.close(fig)
    return counts


if __name__ == '__main__':
    make_data()
    rows, record, shown = [], {}, {}
    for model_name in MODELS:
        model = trained_model(model_name)
        val = json.loads((work/f'run_{model_name}'/'split.json').read_text())['val']
        probabilities, masks, objects, _ = arrays(model, work/f'train_{model_name}', set(val))
        choice, cost = timed_choice(probabilities, masks, objects)
        record[model_name] = dict(choice=choice, cost=cost, validation_images=len(val), image_size=256)
        print(model_name, 'chose', choice, cost, flush=True)
        for i, name in enumerate(SETS):
            probabilities, _, objects, images = arrays(model, work/f'test_{i}')
            rows += [dict(model=f'trained on {model_name}', **r)
                     for r in table_rows(name, probabilities, objects, cost['before'], choice, inference.median_bead(objects)[1])]
            if i == 0:  # the first clumped test image, for the figure
                forced = choice if choice['split_distance'] else dict(choice, split_distance=round(inference.SPLIT_FRACTIONS[1] * inference.median_bead(objects)[1]))
                shown[model_name] = (images[0], objects[0], probabilities[0], cost['before'], forced)
    table = pd.DataFrame(rows).round(4)
    print(table.to_string(index=False))
    evidence.mkdir(exist_ok=True)
    table.to_csv(evidence/'clumps.csv', index=False)
    figure = overlay_figure(shown, evidence/'clumps_overlay.jpg')
    print('the clumped image shown:', figure)
    (evidence/'clumps_choice.json').write_text(json.dumps(dict(record, overlay_image=figure, command=' '.join(sys.argv)), indent=1,
                                                          default=float))

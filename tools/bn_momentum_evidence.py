"""Evidence for the BatchNorm momentum: train the same configuration with Keras' default momentum (0.99) and with
beadseg's (0.9), on real nuclei tiles (stardist's DSB 2018 sample, the `dev` extra) and on demo-like synthetic beads,
and write every epoch's training and validation Jaccard to nbs/evidence/bn_momentum.csv for 03_train to plot.
Usage: python tools/bn_momentum_evidence.py [EPOCHS]   (about 10 minutes on 2 CPU cores)"""
import functools, sys, tempfile
from pathlib import Path
import pandas as pd
sys.path.insert(0, str(Path(__file__).resolve().parent.parent/'tests'))
from conftest import nuclei_dataset
import beadseg.train as train_module
from beadseg.config import load_settings
from beadseg.search import config_from_settings
from beadseg.models import build_model
from beadseg.synthetic import synthesize

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
work = Path(tempfile.mkdtemp())
datasets = {'real nuclei (DSB 2018 tiles)': (nuclei_dataset(work/'nuclei', 'labels'), dict(shrink=1, val_split=0.25)),
            'synthetic beads (demo)': (synthesize(work/'beads', n_images=24, size=256, shrink=2, seed=42), dict(shrink=2, val_split=0.2))}
rows = []
for name, (folder, extra) in datasets.items():
    for momentum in (0.99, 0.9):
        train_module.build_model = functools.partial(build_model, batchnorm_momentum=momentum)
        config = config_from_settings(load_settings(None, dict(image_size=128, base_filters=8, learning_rate=1e-3,
                                                               max_epochs=epochs, patience=epochs)),
                                      architecture='unet', batch_size=4, loss_function='combined', dataset=str(folder),
                                      out_dir=str(work/f'{name[:4]}_{momentum}'), **extra)
        result = train_module.train(config, verbose=0)
        history = train_module.history_frame(config['out_dir'])
        rows += [dict(dataset=name, momentum=momentum, epoch=r.epoch, training=r.jaccard, validation=r.val_jaccard,
                      evaluated_jaccard=result['evaluation']['jaccard'], object_f1=result['evaluation']['object_f1'],
                      baseline=result['evaluation']['baseline_jaccard']) for r in history.itertuples()]
        print(name, momentum, 'best val', result['best_val_jaccard'], 'at', result['best_epoch'],
              'object F1', result['evaluation']['object_f1'], flush=True)
out = Path(__file__).resolve().parent.parent/'nbs'/'evidence'/'bn_momentum.csv'
out.parent.mkdir(exist_ok=True)
pd.DataFrame(rows).round(4).to_csv(out, index=False)
print('wrote', out)

"The newcomer's main job: `beadseg demo` end to end, at its smallest settings."
import json, re
import pandas as pd
from conftest import run_beadseg


def test_demo_produces_every_artefact(tmp_path):
    done = run_beadseg('demo', env={'BEADSEG_DEMO_QUICK': '1'}, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in range(1, 6): assert f'[{step}/5]' in done.stdout
    assert 'beadseg demo: done' in done.stdout
    dataset = tmp_path/'runs'/'demo_quick'/'dataset_shrunk_masks'
    for folder in ('images', 'masks', 'labels'): assert len(list((dataset/folder).iterdir())) == 12
    [run] = (tmp_path/'runs').glob('hyperparam_comprehensive_*')
    final = pd.read_csv(run/'search_results_final.csv')
    assert len(final) == 2 and set(final.status) <= {'completed', 'early_stopped'}
    assert json.loads((run/'best_hyperparameters.json').read_text())['config_id'] == final.config_id[0]
    html = (tmp_path/'reports'/f'{run.name}.html').read_text()
    assert 'Ranked configurations' in html and final.config_id[0] in html
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) >= 1
    for path in (dataset, run, run/'search_results_final.csv', tmp_path/'reports'/f'{run.name}.html'):
        assert str(path.relative_to(tmp_path)) in done.stdout  # says where each artefact is

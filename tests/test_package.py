"""Installed from a wheel, with no source tree: the templates and default settings ship inside the package.
The wheel runs the newcomer's main job, `beadseg demo --quick`, end to end: this is the demo's test too."""
import json, os, re, subprocess, sys, sysconfig, zipfile
import pandas as pd
from pathlib import Path
from conftest import ROOT

SHIPPED = {'templates/train.ipynb': 'nbs/train.ipynb', 'templates/report.ipynb': 'nbs/report.ipynb',
           'templates/predict.ipynb': 'nbs/predict.ipynb', 'templates/settings.ini': 'settings.ini'}


def test_shipped_templates_are_the_sources():
    "In a checkout the package's templates are links to nbs/ and settings.ini: one source of truth."
    for shipped, source in SHIPPED.items():
        assert (ROOT/'beadseg'/shipped).resolve() == (ROOT/source).resolve(), shipped


def test_wheel_runs_the_quick_demo_from_another_directory(tmp_path):
    built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', tmp_path/'dist', ROOT],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path/'dist').glob('beadseg-*.whl')
    with zipfile.ZipFile(wheel) as z:  # the wheel holds copies identical to the sources
        for shipped, source in SHIPPED.items(): assert z.read(f'beadseg/{shipped}') == (ROOT/source).read_bytes(), shipped
    venv = tmp_path/'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True)
    # the dependencies come from this environment; beadseg itself only from the wheel
    site, = venv.glob('lib/python*/site-packages')
    (site/'dependencies.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    installed = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', site, wheel],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    (venv/'bin'/'beadseg').write_text(f'#!{venv}/bin/python\nfrom beadseg.cli import main\nimport sys\nsys.exit(main())\n')
    (venv/'bin'/'beadseg').chmod(0o755)
    work = tmp_path/'elsewhere'; work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'BEADSEG_SETTINGS')}
    env['JUPYTER_PATH'] = str(Path(sys.prefix)/'share'/'jupyter')  # nbconvert's templates, data files of the dependencies
    where = subprocess.run([venv/'bin'/'python', '-c', 'import beadseg; print(beadseg.__file__)'], cwd=work, env=env,
                           capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    demo = subprocess.run([venv/'bin'/'beadseg', 'demo', '--quick'], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    demo_made_every_artefact(work, demo.stdout)


def demo_made_every_artefact(work, stdout):
    "The newcomer's main job, `beadseg demo` at its smallest settings: every step ran, every artefact is there, and it says where."
    for step in range(1, 6): assert f'[{step}/5]' in stdout
    assert 'beadseg demo: done' in stdout
    dataset = work/'runs'/'demo_quick'/'dataset_shrunk_masks'
    for folder in ('images', 'masks', 'labels'): assert len(list((dataset/folder).iterdir())) == 12
    [run] = (work/'runs').glob('hyperparam_comprehensive_*')
    final = pd.read_csv(run/'search_results_final.csv')
    assert len(final) == 2 and set(final.status) <= {'completed', 'early_stopped'}
    assert json.loads((run/'best_hyperparameters.json').read_text())['config_id'] == final.config_id[0]
    [report] = (work/'reports').glob('*.html')
    html = report.read_text()
    assert report.name == f'{run.name}.html' and 'Ranked configurations' in html and final.config_id[0] in html
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) >= 1
    for path in (dataset, run, run/'search_results_final.csv', report):
        assert str(path.relative_to(work)) in stdout  # says where each artefact is

"""Every notebook's inline checks, as `nbdev-test` runs them, one test per notebook: they share pytest's processes with
the other tests (see conftest.py) instead of running as a stage of their own before them."""
import json, subprocess, sys
from pathlib import Path
import pytest
from conftest import ROOT


def executed(notebook:Path) -> bool:
    "Whether nbdev-test runs `notebook`: all but those whose front matter says `skip_exec: true` (the papermill templates)."
    first = json.loads(notebook.read_text())['cells'][0]
    return not (first['cell_type'] == 'markdown' and 'skip_exec: true' in ''.join(first['source']))


NOTEBOOKS = [nb for nb in sorted((ROOT/'nbs').glob('*.ipynb')) if executed(nb)]


def test_the_papermill_templates_are_the_notebooks_left_out():
    assert sorted(nb.name for nb in (ROOT/'nbs').glob('*.ipynb') if not executed(nb)) == ['predict.ipynb', 'report.ipynb', 'train.ipynb']


@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=lambda nb: nb.stem)
def test_notebook_checks_pass(notebook):
    done = subprocess.run([str(Path(sys.executable).parent/'nbdev-test'), '--n-workers', '0', str(notebook)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

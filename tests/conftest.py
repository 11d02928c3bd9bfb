import collections, json, os, subprocess, sys
from pathlib import Path
from beadseg.config import PROJECT_SETTINGS

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = Path(__file__).resolve().parent.parent

# Tests run in groups, heaviest first, by the seconds each group took in the last whole run (tests/durations.json, which
# that run rewrites). A group is a test file (its tests share module fixtures), or one notebook of test_notebooks.py.
# Under `--dist loadfile --no-loadscope-reorder` pytest-xdist hands whole groups to its workers in this order (the
# scheduler below): long groups start first and the short ones even out the end, instead of one worker finishing a long
# group alone.
DURATIONS = Path(__file__).with_name('durations.json')
measured = collections.Counter()  # seconds per group in this run (setup, call and teardown of its tests)


def group_of(nodeid:str) -> str:
    "'03_train' for tests/test_notebooks.py::test_notebook_checks_pass[03_train], else the file: 'test_search'."
    path, _, name = nodeid.partition('::')
    if name.startswith('test_notebook_checks_pass['): return name[name.index('[') + 1:-1]
    return Path(path).stem


def pytest_collection_modifyitems(items):
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    items.sort(key=lambda item: -seconds.get(group_of(item.nodeid), 0))  # stable: tests keep their order within a group


def pytest_xdist_make_scheduler(config, log):
    "pytest-xdist's file scheduling, by `group_of` (its own `xdist_group` marks do not take with pytest 9)."
    if config.getvalue('dist') != 'loadfile': return None
    from xdist.scheduler import LoadScopeScheduling
    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid): return group_of(nodeid)
    return ByGroup(config, log)


def pytest_runtest_logreport(report):
    measured[group_of(report.nodeid)] += report.duration


def every_group() -> set:
    from test_notebooks import NOTEBOOKS
    return {p.stem for p in Path(__file__).parent.glob('test_*.py')} | {nb.stem for nb in NOTEBOOKS}


def pytest_sessionfinish(session, exitstatus):
    "After a whole, passing run (not a worker's share, not a selection): record each group's seconds for the next run's order."
    if hasattr(session.config, 'workerinput') or exitstatus != 0 or set(measured) != every_group(): return
    DURATIONS.write_text(json.dumps({k: round(v) for k, v in sorted(measured.items(), key=lambda kv: -kv[1])}, indent=1) + '\n')


def run_beadseg(*args, cwd=ROOT, env=None, timeout=300):
    "Run the installed `beadseg` console script; returns the CompletedProcess (text mode)."
    exe = Path(sys.executable).parent/'beadseg'
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def edited_settings(folder, old, new):
    "A copy of the project's settings.ini in `folder` with `old` replaced by `new` (which must occur)."
    text = PROJECT_SETTINGS.read_text()
    assert old in text, old
    path = folder/'settings.ini'
    path.write_text(text.replace(old, new))
    return path


def logged_epochs(history:Path) -> int:
    "Epoch rows in a `history.csv` that training may be appending to: counts lines, since a mid-write file can't be parsed."
    return max(len(history.read_text().splitlines()) - 1, 0) if history.is_file() else 0


def nuclei_dataset(folder, layout='labels', tile=128, shrink=1):
    """A real, public, labelled dataset: the DSB 2018 nuclei image that stardist ships (512 x 512, 125 nuclei with ids
    up to 183), cut into `tile` x `tile` tiles. `layout` 'labels': masks/ hold the instance ids (with their gaps);
    'binary': masks/ hold binary masks shrunk by `shrink` pixels, and there is no labels/ folder."""
    import numpy as np, tifffile
    from stardist.data import test_image_nuclei_2d
    from beadseg.data import shrink_labels
    image, labels = test_image_nuclei_2d(return_mask=True)
    folder = Path(folder)
    for sub in ('images', 'masks'): (folder/sub).mkdir(parents=True, exist_ok=True)
    for y in range(0, image.shape[0], tile):
        for x in range(0, image.shape[1], tile):
            name, ids = f'nuclei_{y:03d}_{x:03d}.tif', labels[y:y + tile, x:x + tile]
            tifffile.imwrite(folder/'images'/name, image[y:y + tile, x:x + tile])
            mask = ids if layout == 'labels' else (shrink_labels(ids, shrink) > 0).astype(np.uint8) * 255
            tifffile.imwrite(folder/'masks'/name, mask)
    return folder

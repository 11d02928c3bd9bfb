import os, subprocess, sys
from pathlib import Path
from beadseg.config import PROJECT_SETTINGS

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = Path(__file__).resolve().parent.parent


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

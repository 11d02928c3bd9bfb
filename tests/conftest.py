import os, subprocess, sys
from pathlib import Path
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = Path(__file__).resolve().parent.parent


def run_beadseg(*args, cwd=ROOT, env=None, timeout=300):
    "Run the installed `beadseg` console script; returns the CompletedProcess (text mode)."
    exe = Path(sys.executable).parent/'beadseg'
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def project_settings():
    return ROOT/'settings.ini'

#!/usr/bin/env bash
# beadseg's test suite, as the README's second command and .ci/run run it:
# generated files in sync with the notebooks, notebooks clean, notebook checks, pytest.
# Expects the project's virtual environment on PATH (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONWARNINGS=ignore::DeprecationWarning
# TensorFlow's oneDNN operations stay as TensorFlow decides (on with AVX-512, off otherwise). Forced on elsewhere
# (TF_ENABLE_ONEDNN_OPTS=1), a 3x3 convolution of 128 channels at 512 x 512 did not end in a minute on an AMD EPYC
# (TensorFlow 2.21), so a full-size predict in 13_predict ran past its cell timeout. The start-up lines oneDNN prints
# are still checked where they matter: 11_cli imports TensorFlow with it forced on and expects a quiet start.

fingerprint() { find "$@" -type f \( -name '*.py' -o -name '*.ipynb' -o -name '*.md' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha1sum; }

# Run a generator ($2...) and fail if it changed anything under $1: the committed files were stale.
check_unchanged() {
  local what=$1; shift
  local before; before=$(fingerprint beadseg nbs README.md)
  "$@" >/dev/null
  local after; after=$(fingerprint beadseg nbs README.md)
  if [ "$before" != "$after" ]; then
    echo "FAILED: $what changed these files; run it and commit the result:" >&2
    diff <(echo "$before") <(echo "$after") | grep '^>' | awk '{print "  " $3}' >&2
    exit 1
  fi
  echo "ok: $what leaves the project unchanged"
}

check_unchanged nbdev-export nbdev-export
check_unchanged nbdev-clean nbdev-clean
check_unchanged "README.md from nbs/index.ipynb" \
  jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN

echo "== Debian packages for the Slurm and browser tests (skipped by those tests, with the reason, if this fails)"
bash tools/ensure_apt.sh chromium=chromium slurmctld=slurm-wlm slurmd=slurm-wlm munged=munge || echo "could not install them: their tests will say skipped"
echo "== pytest: the tests and every notebook's checks (tests/test_notebooks.py runs nbdev-test on each), in three processes on"
echo "   any number of cores (they wait on subprocesses a quarter of the time); whole files and single notebooks, the heaviest"
echo "   first (see tests/conftest.py)"
python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=15 tests

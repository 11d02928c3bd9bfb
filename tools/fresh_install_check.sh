#!/usr/bin/env bash
# Fresh-machine check: clone the committed project into a new temporary folder (so no .venv,
# build or run output comes along) and run one of README.md's two opening commands there, timed.
# Usage: tools/fresh_install_check.sh [1|2]   (1: install and run, the default; 2: install and test)
set -euo pipefail
which=${1:-1}
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git clone -q "$src" "$work/beadseg"
cd "$work/beadseg"
cmd=$(awk '/^```sh$/ {n++; getline; if (n == '"$which"') {print; exit}}' README.md)
[ -n "$cmd" ] || { echo "README.md has no command $which" >&2; exit 1; }
echo "in $work/beadseg: $cmd"
start=$(date +%s)
bash -c "$cmd"
echo "README command $which finished in $(( $(date +%s) - start )) s"

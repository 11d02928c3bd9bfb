#!/usr/bin/env bash
# Install the Debian packages named as arguments unless their commands are already there.
# Usage: tools/ensure_apt.sh COMMAND=PACKAGE[,PACKAGE...] ...   e.g. chromium=chromium slurmctld=slurm-wlm,munge
# Exit status 3 (with one line on stderr) when apt is unavailable, so callers can report a skip with the reason.
set -euo pipefail
missing=()
for spec in "$@"; do
  if ! command -v "${spec%%=*}" >/dev/null 2>&1; then
    IFS=, read -r -a pkgs <<< "${spec#*=}"
    missing+=("${pkgs[@]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "apt-get unavailable (or not root): cannot install ${missing[*]}" >&2; exit 3
fi
export DEBIAN_FRONTEND=noninteractive
stamp=/tmp/.beadseg-apt-updated
[ -e "$stamp" ] || { apt-get update -qq >/dev/null && touch "$stamp"; }
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Install everything LBD needs on a Debian 12 machine (as root) and build the
# Python environment in .venv.  Safe to re-run: it only does what is missing.
#
#   tools/setup.sh            Debian packages + .venv with lbd, FUSE and test deps
#
# The virtual environment is made from Debian's /usr/bin/python3 with
# --system-site-packages so that Debian's python3-libnbd (and python3-rbd)
# modules can be imported next to the packages pip installs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

log() { printf 'setup: %s\n' "$*" >&2; }

mapfile -t pkgs < <(grep -v -E '^\s*(#|$)' tools/packages-debian.txt)
missing=()
for p in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing Debian packages: ${missing[*]}; run this script as root"
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

venv="$here/.venv"
stamp="$venv/.lbd-setup-stamp"
want=$(cat pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    exit 0
fi
if [[ ! -x $venv/bin/python ]]; then
    log "creating $venv from /usr/bin/python3"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
log "installing lbd and its Python dependencies into $venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[fuse,test]"
echo "$want" >"$stamp"

#!/usr/bin/env bash
# Installs what pixelpipe needs on a fresh Debian machine and activates its virtual environment.
# Source it (`source scripts/setup.sh`) to keep the environment; running it also works.
#
# The virtual environment lives outside the repository, keyed by the hash of requirements.lock: torch alone is
# several GB, so it is built once per set of pins and reused by every checkout and CI run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${PIXELPIPE_CACHE_DIR:-$HOME/.cache/pixelpipe}
mkdir -p "$cache"

say() { printf '[setup] %s\n' "$*" >&2; }

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v clickhouse-server >/dev/null || [ -x /usr/sbin/clickhouse-server ] || missing+=(clickhouse-server)
command -v chromium >/dev/null || missing+=(chromium)  # renders experiment reports in the report test
command -v prometheus >/dev/null || missing+=(prometheus)  # the local stack's Prometheus; promtool checks the rules
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >/dev/null
  # Debian's prometheus package enables a system service; the stack runs its own Prometheus instead.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

pins_hash=$( (cat "$repo/requirements.lock"; python3 --version) | sha256sum | cut -c1-16)
venv="$cache/venv-$pins_hash"
if [ ! -f "$venv/.complete" ]; then
  say "building the virtual environment $venv (once per requirements.lock)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # uv (pinned in the lock) installs the rest: it downloads each wheel once into its cache (~/.cache/uv, or
  # UV_CACHE_DIR) and hard-links it from there, so tests/packaging's fresh environments install in seconds.
  "$venv/bin/pip" install -q --no-deps "$(grep -E '^uv==' "$repo/requirements.lock")"
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps -r "$repo/requirements.lock"
  touch "$venv/.complete"
fi
# Byte-compiled once: CI sets PYTHONDONTWRITEBYTECODE, and without .pyc files every worker and test process compiles
# torch and diffusers from source at import (about 10 s each). A few test-data files do not compile; that is fine.
if [ ! -f "$venv/.compiled" ]; then
  say "byte-compiling the virtual environment (once, about two minutes)"
  "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null 2>&1 || true
  touch "$venv/.compiled"
fi
# The shared environment holds the dependencies only. Each checkout gets a small environment of its own (.venv,
# about 1 s to make) that sees the shared one's packages and holds this checkout's pixelpipe, installed editable: two
# checkouts of different commits on one machine each run their own code.
"$venv/bin/pip" uninstall -q -y pixelpipe >/dev/null 2>&1 || true
own="$repo/.venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$own/bin/python" ] || [ "$(cat "$own/.shared" 2>/dev/null)" != "$venv" ]; then
  rm -rf "$own"
  python3 -m venv --without-pip "$own"
  echo "$venv" >"$own/.shared"
fi
own_site=$("$own/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir, not a plain path: the shared packages' own .pth files are read too.
echo "import site; site.addsitedir('$site')" >"$own_site/_pixelpipe_shared_venv.pth"
if ! installed=$("$venv/bin/pip" --python "$own/bin/python" install -q --no-deps --no-build-isolation -e "$repo" 2>&1); then
  echo "$installed" >&2
  exit 1
fi
# The dependencies' commands (mkdocs, pytest, ...) run on this checkout's interpreter, which sees its own pixelpipe;
# native ones (ruff, uv) are found in the shared environment's bin, after this one on PATH.
"$own/bin/python" - "$venv" "$own" <<'PY'
import sys
from pathlib import Path

shared, own = (Path(arg) for arg in sys.argv[1:])
for script in (shared / "bin").iterdir():
    target = own / "bin" / script.name
    if target.exists() or not script.is_file():
        continue
    with script.open("rb") as file:
        if not file.readline(300).startswith(f"#!{shared / 'bin' / 'python'}".encode()):
            continue
    target.write_text(f'#!/bin/sh\nexec "{own / "bin" / "python"}" "{script}" "$@"\n')
    target.chmod(0o755)
PY
export VIRTUAL_ENV="$own"
export PATH="$own/bin:$venv/bin:$PATH"
export PIXELPIPE_CACHE_DIR="$cache"
export HF_HUB_OFFLINE=1  # no model hub is reachable; models load from local directories only
say "ready: $(python --version), pixelpipe from $repo, dependencies from $venv"

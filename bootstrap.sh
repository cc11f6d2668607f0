#!/usr/bin/env bash
# Sets up everything smat needs on a fresh machine, then runs a job.
#   bash bootstrap.sh            install, then the main job on the offline benchmark
#   bash bootstrap.sh test       install, then the test suite
#   bash bootstrap.sh install    install only
# Installs Debian's fonts-noto-core and dataset-fashion-mnist (the offline benchmark's inputs)
# with apt when run as root or with sudo, a virtual environment in .venv, and smat into it at the
# exact versions of constraints.txt, with every optional source (TFDS, h5, icons); fetches the
# emoji and icons domains' npm packages (the main job's benchmark needs them) when npm is there.
# SMAT_CUDA=12 adds JAX's CUDA 12 wheels (jax[cuda12], the `cuda12` extra) for an NVIDIA GPU machine.
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-reproduce}"
[ $# -gt 0 ] && shift

APT_PACKAGES=(fonts-noto-core dataset-fashion-mnist)
PYTHON="${PYTHON:-python3}"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! "$PYTHON" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  missing+=(python3 python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else
    echo "error: missing Debian packages: ${missing[*]}; run" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The emoji and icons domains' drawings: npm tarballs, fetched once into the data directory (they
# are read from the tarballs by `smat data prepare emoji|icons`). Not fatal: the tests and the
# glyph-only main job (`smat reproduce --benchmark glyphs`) run without them. npm pack names a
# scoped package's tarball without the @: @iconify/json@V → iconify-json-V.tgz.
NPM_PACKAGES=(emoji-datasource-apple@16.0.0 emoji-datasource-google@16.0.0
              emoji-datasource-twitter@16.0.0 emoji-datasource-facebook@16.0.0
              @iconify/json@2.2.535)
npm_dir="${SMAT_DATA_DIR:-$HOME/.cache/smat}/npm"
wanted=()
for spec in "${NPM_PACKAGES[@]}"; do
  name="${spec%@*}" version="${spec##*@}"
  tarball="${name#@}"
  [ -f "$npm_dir/${tarball//\//-}-$version.tgz" ] || wanted+=("$spec")
done
if [ ${#wanted[@]} -gt 0 ]; then
  if command -v npm >/dev/null && mkdir -p "$npm_dir" \
      && npm pack --silent "${wanted[@]}" --pack-destination "$npm_dir" >/dev/null; then
    echo "fetched ${wanted[*]} into $npm_dir"
  else
    echo "warning: could not fetch ${wanted[*]} (needs npm); the main job's emoji and icons" >&2
    echo "domains need them: run  npm pack ${wanted[*]} --pack-destination $npm_dir" >&2
    echo "(or run the glyph-only main job: .venv/bin/smat reproduce --benchmark glyphs)" >&2
  fi
fi

# constraints.txt pins every Python package to one working install's exact versions
# (pyproject.toml keeps the supported ranges); either file changing reinstalls.
extras="all,test"
case "${SMAT_CUDA:-}" in
  "") ;;
  12) extras="$extras,cuda12" ;;
  *) echo "error: SMAT_CUDA=${SMAT_CUDA}: the one CUDA build is 12 (SMAT_CUDA=12)" >&2; exit 2 ;;
esac
stamp=.venv/.installed-$( (cat pyproject.toml constraints.txt; echo "$extras") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "installing smat into .venv"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # (jax[cuda12] pins its plugin to jax's exact version, so the constraints hold for it too.)
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  rm -f .venv/.installed-* && touch "$stamp"
fi

case "$mode" in
  reproduce) exec .venv/bin/smat reproduce "$@" ;;
  test) exec .venv/bin/python -m pytest -q tests "$@" ;;
  install) echo "installed: .venv/bin/smat" ;;
  *) echo "usage: bash bootstrap.sh [reproduce|test|install]" >&2; exit 2 ;;
esac

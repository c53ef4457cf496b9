#!/usr/bin/env bash
# `make prefect-down`: stop what prefect_up.sh started, by its PID files (.prefect/serve.pid, then server.pid).
# Each was started as a session leader, so its process group (id = its PID) holds it and everything it started:
# SIGTERM to the group, then SIGKILL after PREFECT_DOWN_TIMEOUT seconds (default 20) if any member is left.
# A PID file whose process is gone, or now runs something else, is removed without signalling anyone.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE="$(pwd)/.prefect"
TIMEOUT=${PREFECT_DOWN_TIMEOUT:-20}

group_alive() {  # group_alive PGID: some process is in the group
    kill -0 -- "-$1" 2>/dev/null
}

stop() {  # stop NAME PATTERN: stop the group of .prefect/NAME.pid if its leader's command line has PATTERN
    local file="$STATE/$1.pid" pid
    [[ -f "$file" ]] || return 0
    pid=$(cat "$file")
    if ! group_alive "$pid"; then
        echo "prefect-down: $1 (PID $pid) was not running"
    elif [[ -r "/proc/$pid/cmdline" ]] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"; then
        echo "prefect-down: PID $pid is no longer $1 (PID reused); not signalled" >&2
    else
        kill -TERM -- "-$pid" 2>/dev/null || true
        local deadline=$((SECONDS + TIMEOUT))
        while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
        if group_alive "$pid"; then
            echo "prefect-down: $1 group $pid still running after ${TIMEOUT}s: SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || true
            while group_alive "$pid"; do sleep 0.2; done
        fi
        echo "prefect-down: $1 (process group $pid) stopped"
    fi
    rm -f "$file"
}

stop serve "pipeline.serve"  # first: it pauses the retrain schedule through the server on its way out
stop server "prefect server start"
rm -f "$STATE/env"

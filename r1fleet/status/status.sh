#!/bin/sh
# r1fleet status: what r1fleet's services on this host are doing, without generating a token.
#
# Usage: sh status.sh OLLAMA_URL LLAMA_URL LAUNCHD_LABEL PRELOAD_RECORD OLLAMA_UNIT LLAMA_UNIT [UNIT...]
#        (the names come from the roles that write them; PRELOAD_RECORD: the last result of Ollama's model preload)
#
# `r1fleet status` runs it right after the probe (r1fleet/probe/probe.sh), in the same SSH round trip, so its
# sections continue the probe document: each `#### r1fleet:status-<name>` followed by one command's output, every
# line of it framed with a leading `|`, so no line a command prints (an HTTP body, a model's name, a process name)
# can start a section of its own. r1fleet/status/readings.py parses them. Every request goes to the service on the host itself (it may listen on
# 127.0.0.1 only), is bounded in time, and only reads: no model is loaded and no token generated.
#
# POSIX sh only, as probe.sh.

OLLAMA_URL=$1
LLAMA_URL=$2
LAUNCHD_LABEL=$3
PRELOAD_RECORD=$4
shift 4
OLLAMA_UNIT=$1
LLAMA_UNIT=$2
LC_ALL=C
export LC_ALL
PATH="${PATH:-/usr/bin:/bin}:/usr/sbin:/sbin"
export PATH

has() {
    command -v "$1" >/dev/null 2>&1
}

section() {
    printf '#### r1fleet:status-%s\n' "$1"
}

# Every line of a command's output behind `|`, a last line without its newline too (awk ends each record).
framed() {
    awk '{ print "|" $0 }'
}

# A backend's API is asked only where its unit is installed (or, without systemd, on a Mac's Ollama).
installed() {
    if has systemctl; then
        [ "$(systemctl show -p LoadState --value "$1" 2>/dev/null)" = loaded ]
    else
        [ "$1" = "$OLLAMA_UNIT" ]
    fi
}

# GET a URL: the body, then the HTTP status on a line of its own (000: no answer). A key file, when given and
# readable, goes into the Authorization header through a pipe only, never into an argument list.
fetch() {
    if ! has curl; then
        printf '\ncurl-missing\n'
        return
    fi
    if [ -n "${2:-}" ] && [ -r "$2" ]; then
        printf 'Authorization: Bearer %s\n' "$(grep -v '^#' "$2" | head -n 1)" |
            curl -sS --connect-timeout 1 -m 3 -H @- -w '\n%{http_code}\n' "$1" 2>/dev/null
    else
        curl -sS --connect-timeout 1 -m 3 -w '\n%{http_code}\n' "$1" 2>/dev/null
    fi
}

section now
date +%s | framed

PROPERTIES=Id,LoadState,ActiveState,SubState,UnitFileState,ActiveEnterTimestamp,NRestarts,MainPID,Result
section units
if has systemctl; then
    # Timestamps as seconds since the epoch where systemd can (248 and later), else in its own words.
    { systemctl show --timestamp=unix -p "$PROPERTIES" "$@" 2>/dev/null ||
        systemctl show -p "$PROPERTIES" "$@" 2>/dev/null; } | framed
fi

section procs
# Each process of the units, with its age in seconds: the start time in /proc/PID/stat is in clock ticks since
# boot, field 22, counted here after the command name's closing parenthesis (the name may hold spaces).
if has systemctl && [ -r /proc/uptime ]; then
    hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
    up=$(cut -d ' ' -f 1 /proc/uptime)
    for unit in "$@"; do
        cg=$(systemctl show -p ControlGroup --value "$unit" 2>/dev/null)
        [ -n "$cg" ] || continue
        for procs in "/sys/fs/cgroup$cg/cgroup.procs" "/sys/fs/cgroup/systemd$cg/cgroup.procs"; do
            [ -r "$procs" ] || continue
            for pid in $(cat "$procs"); do
                [ -r "/proc/$pid/stat" ] || continue
                comm=$(cat "/proc/$pid/comm" 2>/dev/null)
                sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null |
                    awk -v unit="$unit" -v pid="$pid" -v up="$up" -v hz="$hz" -v comm="$comm" \
                        '{ printf "%s %s %d %s\n", unit, pid, up - $20 / hz, comm }'
            done
            break
        done
    done | framed
fi

section launchd
if [ "$(uname -s 2>/dev/null)" = Darwin ] && has launchctl; then
    launchctl print "system/$LAUNCHD_LABEL" 2>/dev/null | framed
fi

# Who holds Ollama's port, with the unit of each holder (its cgroup): Ollama's own ollama.service, started again
# (by its install script, say), would answer the requests below in place of r1fleet's.
if installed "$OLLAMA_UNIT" && has ss; then
    section ollama-port
    port=${OLLAMA_URL##*:}
    port=${port%%/*}
    for pid in $(ss -Htlnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d = -f 2 | sort -u); do
        # the unified hierarchy's line (0::) first, else systemd's own v1 one: the first that names a unit
        unit=
        for hierarchy in '0:' '[0-9]*:name=systemd'; do
            [ -n "$unit" ] || unit=$(sed -n -e "s|^$hierarchy:.*/\([^/]*\.service\)\$|\1|p" \
                -e "s|^$hierarchy:.*/\([^/]*\.scope\)\$|\1|p" "/proc/$pid/cgroup" 2>/dev/null | head -n 1)
        done
        printf '%s %s %s\n' "$pid" "${unit:--}" "$(cat "/proc/$pid/comm" 2>/dev/null)"
    done | framed
fi

if installed "$OLLAMA_UNIT"; then
    section ollama-version
    fetch "$OLLAMA_URL/api/version" | framed
    section ollama-ps
    fetch "$OLLAMA_URL/api/ps" | framed
    section ollama-tags
    fetch "$OLLAMA_URL/api/tags" | framed
    section ollama-preload
    cat "$PRELOAD_RECORD" 2>/dev/null | framed
fi

# llama-server's key, where its unit loads one: the LoadCredential line (the last one wins, as in systemd).
KEY_FILE=
if has systemctl; then
    KEY_FILE=$(systemctl cat "$LLAMA_UNIT" 2>/dev/null | sed -n 's/^LoadCredential=api-key://p' | tail -n 1)
fi

# The key goes only to the unit's own server: while llama-server is down, any local user could hold its port.
holds_port() {
    pid=$(systemctl show -p MainPID --value "$1" 2>/dev/null)
    port=${2##*:}
    port=${port%%/*}
    [ -n "$pid" ] && [ "$pid" != 0 ] && has ss &&
        ss -Htlnp "sport = :$port" 2>/dev/null | grep -q "pid=$pid,"
}

if installed "$LLAMA_UNIT"; then
    holds_port "$LLAMA_UNIT" "$LLAMA_URL" || KEY_FILE=
    section llama-health
    fetch "$LLAMA_URL/health" | framed
    section llama-props
    fetch "$LLAMA_URL/props" "$KEY_FILE" | framed
    section llama-models
    fetch "$LLAMA_URL/v1/models" "$KEY_FILE" | framed
    # llama-server's own account of its memory at this start (the table llama.cpp logs at load with -lv 4), from
    # the journal of the unit's running invocation. The table comes early and ends with its Host row: the read
    # stops there rather than going through every request logged since.
    section llama-memory
    invocation=$(systemctl show -p InvocationID --value "$LLAMA_UNIT" 2>/dev/null)
    if [ -n "$invocation" ] && has journalctl; then
        journalctl -o cat --no-pager "_SYSTEMD_INVOCATION_ID=$invocation" 2>/dev/null |
            awk '/common_memory_breakdown_print:/ { print; n++; if (/\| +- Host / || n >= 40) exit }' | framed
    fi
fi

exit 0

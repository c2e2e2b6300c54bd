#!/usr/bin/env bash
# Runs Kannel (bearerbox + smsbox, in the foreground) as an SMPP 3.4 ESME against the SMSC on
# 127.0.0.1:$SMSC_PORT, for benchmark scripts. Kannel's config is kannel.conf.in next to this
# script (the one the Rust harness, tests/src/kannel.rs, uses too), filled in with free loopback
# ports, in a new temporary directory that also holds the logs.
#
# Settings, from the environment:
#   SMSC_PORT   (required) the SMSC's port on 127.0.0.1
#   SYSTEM_ID   the bind's system_id (default otpgate)
#   PASSWORD    the bind's password (default secret)
#   WINDOW      max-pending-submits: submit_sm awaiting their resp (default 10)
#   THROUGHPUT  Kannel's own cap in messages/s, 0 for none (default 0)
#   LOG_LEVEL   Kannel's log level, 0 debug (every PDU) .. 4 panic (default 1, info)
#   KEEP_DIR    set it to keep the directory (config and logs) when Kannel stops
#
# Once the SMSC link is online (bearerbox's status page says so, within 20 s), it prints one line
# on stdout and keeps running until it gets SIGTERM or SIGINT:
#   kannel online sendsms 127.0.0.1:<port> admin 127.0.0.1:<port> dir <dir>
# Send SMS with GET http://127.0.0.1:<sendsms port>/cgi-bin/sendsms?username=otpgate&password=otpgate&to=...&text=...
# (see README.md); the status page is http://127.0.0.1:<admin port>/status.txt?password=otpgate-admin.
# On SIGTERM/SIGINT (or a failed start) it stops both boxes, removes the directory and exits.
# A start that fails prints the logs' tails on stderr and exits 1.
#
# Example, from a benchmark script:
#   SMSC_PORT=$SIM_PORT tests/interop/kannel/run.sh >"$WORK_DIR/kannel.out" 2>"$WORK_DIR/kannel.err" &
#   KANNEL_PID=$!
#   until grep -q online "$WORK_DIR/kannel.out"; do kill -0 $KANNEL_PID || exit 1; sleep 0.1; done
#   SENDSMS=$(awk '{ print $4 }' "$WORK_DIR/kannel.out")
#   ... ; kill $KANNEL_PID; wait $KANNEL_PID
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${SMSC_PORT:?set SMSC_PORT to the port of the SMSC on 127.0.0.1}"
SYSTEM_ID=${SYSTEM_ID:-otpgate}
PASSWORD=${PASSWORD:-secret}
WINDOW=${WINDOW:-10}
THROUGHPUT=${THROUGHPUT:-0}
LOG_LEVEL=${LOG_LEVEL:-1}
START_TIMEOUT_SECS=20

command -v bearerbox >/dev/null || PATH="$PATH:/usr/sbin"
command -v bearerbox >/dev/null || {
    echo "error: bearerbox not found; run $HERE/setup.sh" >&2
    exit 1
}

DIR=$(mktemp -d -t otpgate-kannel.XXXXXX)
BEARERBOX_PID=""
SMSBOX_PID=""

stop() {
    local pid
    for pid in $SMSBOX_PID $BEARERBOX_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "${KEEP_DIR:-}" ]]; then
        echo "kannel's config and logs kept in $DIR" >&2
    else
        rm -rf "$DIR"
    fi
}
trap stop EXIT
trap 'exit 0' TERM INT

fail() {
    echo "error: $*" >&2
    local log
    for log in bearerbox.log smsbox.log bearerbox.out smsbox.out; do
        [[ -s "$DIR/$log" ]] && { echo "--- $log" >&2; tail -n 30 "$DIR/$log" >&2; }
    done
    exit 1
}

# A TCP port on 127.0.0.1 that nothing listens on and that this script has not handed out.
HANDED_OUT=" "
free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if [[ "$HANDED_OUT" != *" $port "* ]] && [[ -z $(ss -Htln "sport = :$port") ]]; then
            HANDED_OUT+="$port "
            echo "$port"
            return
        fi
    done
    fail "no free port found"
}

# sed replacement text: escape \, & and the delimiter |.
quote() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

ADMIN_PORT=$(free_port)
SMSBOX_PORT=$(free_port)
SENDSMS_PORT=$(free_port)
sed -e "s|@ADMIN_PORT@|$ADMIN_PORT|g" \
    -e "s|@SMSBOX_PORT@|$SMSBOX_PORT|g" \
    -e "s|@SENDSMS_PORT@|$SENDSMS_PORT|g" \
    -e "s|@SMSC_PORT@|$SMSC_PORT|g" \
    -e "s|@SYSTEM_ID@|$(quote "$SYSTEM_ID")|g" \
    -e "s|@PASSWORD@|$(quote "$PASSWORD")|g" \
    -e "s|@WINDOW@|$WINDOW|g" \
    -e "s|@THROUGHPUT@|$THROUGHPUT|g" \
    -e "s|@LOG_LEVEL@|$LOG_LEVEL|g" \
    -e "s|@DIR@|$(quote "$DIR")|g" \
    "$HERE/kannel.conf.in" >"$DIR/kannel.conf"
if grep -v '^#' "$DIR/kannel.conf" | grep -q '@[A-Z_]*@'; then
    fail "placeholders left in kannel.conf: $(grep -v '^#' "$DIR/kannel.conf" | grep -o '@[A-Z_]*@' | sort -u | tr '\n' ' ')"
fi

# Foreground processes (no -d/--daemonize); the log files get everything at LOG_LEVEL, and
# stdout (-v 2: warnings and worse) goes to a file too, for what happens before the log file is
# open. smsbox gives up at once if bearerbox is not listening yet, so it starts once it is.
bearerbox -v 2 "$DIR/kannel.conf" >"$DIR/bearerbox.out" 2>&1 &
BEARERBOX_PID=$!
deadline=$((SECONDS + START_TIMEOUT_SECS))
until (exec 3<>"/dev/tcp/127.0.0.1/$SMSBOX_PORT") 2>/dev/null; do
    kill -0 "$BEARERBOX_PID" 2>/dev/null || fail "bearerbox exited"
    ((SECONDS < deadline)) || fail "bearerbox did not listen on its smsbox port within ${START_TIMEOUT_SECS}s"
    sleep 0.05
done
smsbox -v 2 "$DIR/kannel.conf" >"$DIR/smsbox.out" 2>&1 &
SMSBOX_PID=$!

STATUS_URL="http://127.0.0.1:$ADMIN_PORT/status.txt?password=otpgate-admin"
# Online: the SMSC link is bound ("(online Ns" on its line) and smsbox is connected.
online() {
    local status
    status=$(curl -fsS --max-time 2 "$STATUS_URL" 2>/dev/null) &&
        grep -q '(online' <<<"$status" && grep -q 'smsbox:' <<<"$status"
}
until online; do
    kill -0 "$BEARERBOX_PID" 2>/dev/null || fail "bearerbox exited"
    kill -0 "$SMSBOX_PID" 2>/dev/null || fail "smsbox exited"
    ((SECONDS < deadline)) || fail "the SMSC link on port $SMSC_PORT was not online within ${START_TIMEOUT_SECS}s"
    sleep 0.1
done

echo "kannel online sendsms 127.0.0.1:$SENDSMS_PORT admin 127.0.0.1:$ADMIN_PORT dir $DIR"
# Waits until a signal (the traps above) or until either box exits.
wait -n "$BEARERBOX_PID" "$SMSBOX_PID" || true
fail "a box exited"

#!/usr/bin/env bash
# Slow-loris benchmark: a normal client's throughput and latency while thousands of idle and
# trickling sockets try to hold the gateway's connections (docs/DESIGN.md section 3, *Connections*).
#
# Two runs, each with a fresh loadgen sink (a fast fake HTTP carrier) and a fresh gateway on the
# default connection guards (prelude, idle and body deadlines, 256 connections per address):
# first wrk alone posts POST /v1/verifications from 127.0.0.1; then bench/slowloris.py opens
# SOCKETS sockets from ADDRESSES other loopback addresses (silent, a bare HTTP/2 preface, headers
# a byte a second, a body a byte a second), reopens each one the gateway closes, and wrk runs the
# same load once the attack is under way. It prints, side by side, the sockets the attack held
# and the normal client's requests/s, p50, p99 and errors, and the gateway's closures by reason.
# It exits non-zero if a request of the normal client failed.
#
# Settings, from the environment: DURATION (wrk's, default 10s), CONNECTIONS (64), SOCKETS
# (4000), ADDRESSES (16), SKIP_BUILD (set it to reuse the release binaries), KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
SOCKETS=${SOCKETS:-4000}
ADDRESSES=${ADDRESSES:-16}
# The attack starts this long before wrk, so that its sockets are open when wrk starts.
RAMP_SECS=5

duration_secs=${DURATION%s}
[[ $duration_secs =~ ^[0-9]+$ ]] || die "DURATION must be whole seconds, like 10s"

# Runs wrk against the gateway and sets RPS, P50_MS, P99_MS and ERRORS.
run_wrk() {
    local name=$1
    say "wrk -t1 -c$CONNECTIONS -d$DURATION against the gateway ($name)"
    wrk -t1 "-c$CONNECTIONS" "-d$DURATION" --timeout 10s -s "$BENCH_DIR/verifications.lua" \
        "http://$GATEWAY_ADDR/v1/verifications" >"$WORK_DIR/wrk-$name.txt"
    local result
    result=$(grep '^wrk-result ' "$WORK_DIR/wrk-$name.txt") || die "wrk printed no result"
    field() { echo "$result" | tr ' ' '\n' | awk -F= -v key="$1" '$1 == key { print $2 }'; }
    RPS=$(awk -v n="$(field requests)" -v us="$(field duration_us)" 'BEGIN { printf "%.0f", n / (us / 1e6) }')
    P50_MS=$(awk -v us="$(field p50_us)" 'BEGIN { printf "%.2f", us / 1000 }')
    P99_MS=$(awk -v us="$(field p99_us)" 'BEGIN { printf "%.2f", us / 1000 }')
    ERRORS=$(($(field status) + $(field connect) + $(field read) + $(field write) + $(field timeout)))
}

# Starts a fresh sink and gateway on the default connection guards.
start_fresh_gateway() {
    start_loadgen_server sink sink --worker-threads 1
    SINK_PID=${STARTED_PIDS[-1]}
    free_port
    GATEWAY_ADDR="127.0.0.1:$FREE_PORT"
    free_port
    ADMIN_ADDR="127.0.0.1:$FREE_PORT"
    local config="$WORK_DIR/otpgate.toml"
    write_gateway_config "$config" "$GATEWAY_ADDR" "$ADMIN_ADDR" "$LOADGEN_ADDR"
    # The shared base turns the per-address cap off; this benchmark is about the defaults.
    sed -i '/^max_connections_per_ip = 0$/d' "$config"
    run_gateway "$config"
}

# The gateway's closures, by reason, on one line.
closures() {
    local reason line=""
    for reason in prelude_timeout idle per_ip_cap body_timeout; do
        line+="$reason $(gateway_metric otpgate_connections_closed_total "listener=\"api\",reason=\"$reason\""), "
    done
    echo "${line%, }"
}

ensure_wrk
command -v python3 >/dev/null || die "python3 is needed for the attacker"
build_release
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"
for binary in otpgate loadgen; do
    [[ -x "$BIN/$binary" ]] || die "$BIN/$binary is missing; build it or unset SKIP_BUILD"
done
failed=0

# Without the attack.
start_fresh_gateway
run_wrk quiet
QUIET="$RPS $P50_MS $P99_MS $ERRORS"
stop_pid "$GATEWAY_PID"
stop_pid "$SINK_PID"

# With the attack, which lasts the ramp, wrk's run and a little more, and stops by itself.
start_fresh_gateway
attack_secs=$((RAMP_SECS + duration_secs + 3))
say "slowloris.py: $SOCKETS sockets from $ADDRESSES addresses for $attack_secs s"
python3 "$BENCH_DIR/slowloris.py" --target "$GATEWAY_ADDR" --sockets "$SOCKETS" \
    --addresses "$ADDRESSES" --seconds "$attack_secs" --measure-from "$RAMP_SECS" --measure-secs "$duration_secs" \
    >"$WORK_DIR/slowloris.out" 2>"$WORK_DIR/slowloris.err" &
ATTACK_PID=$!
STARTED_PIDS+=("$ATTACK_PID")
sleep "$RAMP_SECS"
OPEN_AT_START=$(gateway_metric otpgate_connections_open 'listener="api"')
run_wrk attack
ATTACK="$RPS $P50_MS $P99_MS $ERRORS"
OPEN_AT_END=$(gateway_metric otpgate_connections_open 'listener="api"')
wait "$ATTACK_PID" || true
CLOSURES=$(closures)
stop_pid "$GATEWAY_PID"
stop_pid "$SINK_PID"
result=$(grep '^slowloris-result ' "$WORK_DIR/slowloris.out") || {
    cat "$WORK_DIR/slowloris.err" >&2
    die "slowloris.py printed no result"
}
afield() { echo "$result" | tr ' ' '\n' | awk -F= -v key="$1" '$1 == key { print $2 }'; }

echo
echo "wrk -t1 -c$CONNECTIONS -d$DURATION, POST /v1/verifications, default connection guards"
echo "attack: $SOCKETS sockets from $ADDRESSES addresses (silent, h2c preface, trickled headers, trickled body)"
printf '%-14s %14s %12s %10s %10s %8s\n' run "sockets held" requests/s p50 p99 errors
read -r rps p50 p99 errors <<<"$QUIET"
printf '%-14s %14s %12s %7s ms %7s ms %8s\n' "no attack" 0 "$rps" "$p50" "$p99" "$errors"
((errors == 0)) || failed=1
read -r rps p50 p99 errors <<<"$ATTACK"
printf '%-14s %14s %12s %7s ms %7s ms %8s\n' "attack" "$(afield held_mean)" "$rps" "$p50" "$p99" "$errors"
((errors == 0)) || failed=1
echo "sockets held by the attack while wrk ran: min $(afield held_min), mean $(afield held_mean), max $(afield held_max); opened $(afield opened), closed by the gateway $(afield closed_by_server), connect errors $(afield connect_errors)"
echo "gateway connections open (api): $OPEN_AT_START when wrk started, $OPEN_AT_END when it ended"
echo "gateway closures (api): $CLOSURES"
if ((failed)); then
    echo "FAIL: requests of the normal client failed" >&2
fi
exit "$failed"

#!/usr/bin/env bash
# API throughput benchmark: the gateway end to end against a bare hyper server (docs/DESIGN.md section 7).
#
# wrk drives POST /v1/verifications, a new valid phone number every request, over keep-alive
# connections, first through the whole gateway pipeline to the loadgen sink (a fast fake HTTP
# carrier), then against `loadgen bare`, which answers 202 and does no work.
# The gateway runs twice, speaking HTTP/1.1 and then HTTP/2 (h2c) to the sink.
# It prints requests/s, p50, p99 and errors for each, the ratios to the bare server, and how many
# of the SMS the gateway accepted reached the sink.
# It exits non-zero if any request failed or any SMS was lost or duplicated.
#
# Settings, from the environment: DURATION (default 10s), CONNECTIONS (64), THREADS (1),
# SKIP_BUILD (set it to reuse the release binaries), KEEP_WORK_DIR (set it to keep the logs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
TARGET_RATIO=0.33

# Runs wrk against one server and sets RPS, P50_MS, P99_MS, N_REQUESTS, N_NON_2XX and
# N_SOCKET_ERRORS from the line the Lua script prints.
# Usage: run_wrk NAME ADDR
run_wrk() {
    local name=$1 addr=$2
    say "wrk -t$THREADS -c$CONNECTIONS -d$DURATION against $name"
    wrk "-t$THREADS" "-c$CONNECTIONS" "-d$DURATION" -s "$BENCH_DIR/verifications.lua" \
        "http://$addr/v1/verifications" >"$WORK_DIR/wrk-$name.txt"
    local result
    result=$(grep '^wrk-result ' "$WORK_DIR/wrk-$name.txt") || die "wrk printed no result"
    # Reads one key=value field of the result line.
    field() { echo "$result" | tr ' ' '\n' | awk -F= -v key="$1" '$1 == key { print $2 }'; }
    local requests duration_us p50_us p99_us
    requests=$(field requests)
    duration_us=$(field duration_us)
    p50_us=$(field p50_us)
    p99_us=$(field p99_us)
    N_REQUESTS=$requests
    RPS=$(awk -v n="$requests" -v us="$duration_us" 'BEGIN { printf "%.0f", n / (us / 1e6) }')
    P50_MS=$(awk -v us="$p50_us" 'BEGIN { printf "%.2f", us / 1000 }')
    P99_MS=$(awk -v us="$p99_us" 'BEGIN { printf "%.2f", us / 1000 }')
    N_NON_2XX=$(field status)
    N_SOCKET_ERRORS=$(($(field connect) + $(field read) + $(field write) + $(field timeout)))
}

ensure_wrk
build_release
# Other work on the machine skews both runs; the load average says how quiet it was.
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"
for binary in otpgate loadgen; do
    [[ -x "$BIN/$binary" ]] || die "$BIN/$binary is missing; build it or unset SKIP_BUILD"
done

# The gateway end to end, once per HTTP version spoken to the carrier. The sink gets one worker
# thread: it is part of the pipeline being measured, and on a small machine a second thread only
# adds scheduling overhead.
# Usage: measure_gateway HTTP_VERSION; sets the G_* results of that run.
measure_gateway() {
    local version=$1
    start_loadgen_server sink sink --worker-threads 1
    local sink_addr=$LOADGEN_ADDR sink_pid=${STARTED_PIDS[-1]}
    start_gateway "$sink_addr" "$version"
    run_wrk "gateway-http$version" "$GATEWAY_ADDR"
    G_RPS=$RPS G_P50=$P50_MS G_P99=$P99_MS
    G_ERRORS=$((N_NON_2XX + N_SOCKET_ERRORS))
    G_ANSWERED_2XX=$((N_REQUESTS - N_NON_2XX))
    G_DETAIL="non-2xx $N_NON_2XX, socket errors $N_SOCKET_ERRORS"
    say "waiting for the queue to drain to the sink"
    wait_for_sink "$sink_addr"
    G_DELIVERED=$DELIVERED G_ACCEPTED=$ACCEPTED
    G_DISTINCT=$(sink_stat "$sink_addr" distinct_message_ids)
    G_BAD_REQUESTS=$(sink_stat "$sink_addr" bad_requests)
    G_OUTCOMES=$(gateway_outcomes)
    stop_pid "$GATEWAY_PID"
    stop_pid "$sink_pid"
}

declare -A RESULT RESULT_DETAIL SINK_LINE OUTCOMES
failed=0
for version in 1.1 2; do
    measure_gateway "$version"
    RESULT[$version]="$G_RPS $G_P50 $G_P99 $G_ERRORS"
    RESULT_DETAIL[${version/./}]="$G_DETAIL"
    SINK_LINE[${version/./}]="SMS at sink (carrier over HTTP/$version): $G_DELIVERED of $G_ACCEPTED accepted (distinct message ids $G_DISTINCT, bad requests $G_BAD_REQUESTS; wrk counted $G_ANSWERED_2XX 2xx answers and does not count requests in flight when it stops)"
    OUTCOMES[${version/./}]=$G_OUTCOMES
    if ((G_ERRORS > 0)); then
        echo "FAIL: requests to the gateway failed (carrier over HTTP/$version)" >&2
        failed=1
    fi
    if ((G_ACCEPTED == 0 || G_DELIVERED != G_ACCEPTED || G_DISTINCT != G_ACCEPTED || G_BAD_REQUESTS > 0)); then
        echo "FAIL: SMS lost, duplicated or malformed (carrier over HTTP/$version)" >&2
        failed=1
    fi
done

# The bare server, alone on the machine like the gateway was.
start_loadgen_server bare bare
BARE_PID=${STARTED_PIDS[-1]}
run_wrk bare "$LOADGEN_ADDR"
BARE_RPS=$RPS BARE_P50=$P50_MS BARE_P99=$P99_MS
BARE_ERRORS=$((N_NON_2XX + N_SOCKET_ERRORS))
BARE_DETAIL="non-2xx $N_NON_2XX, socket errors $N_SOCKET_ERRORS"
stop_pid "$BARE_PID"
if ((BARE_ERRORS > 0)); then
    echo "FAIL: requests to the bare server failed" >&2
    failed=1
fi

echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, POST /v1/verifications"
printf '%-24s %12s %10s %10s %8s %8s\n' target requests/s p50 p99 errors ratio
for version in 1.1 2; do
    read -r rps p50 p99 errors <<<"${RESULT[$version]}"
    ratio=$(awk -v a="$rps" -v b="$BARE_RPS" 'BEGIN { printf "%.3f", a / b }')
    met=$(awk -v r="$ratio" -v t="$TARGET_RATIO" 'BEGIN { print (r >= t) ? "met" : "NOT met" }')
    printf '%-24s %12s %7s ms %7s ms %8s %8s  (target >= %s: %s)\n' \
        "gateway, carrier HTTP/$version" "$rps" "$p50" "$p99" "$errors" "$ratio" "$TARGET_RATIO" "$met"
done
printf '%-24s %12s %7s ms %7s ms %8s %8s\n' bare "$BARE_RPS" "$BARE_P50" "$BARE_P99" "$BARE_ERRORS" 1.000
for version in 11 2; do
    echo "${SINK_LINE[$version]}"
done
echo "gateway counters (non-zero), carrier over HTTP/2:"
echo "${OUTCOMES[2]}"
exit "$failed"

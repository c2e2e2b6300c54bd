#!/usr/bin/env bash
# Slow-carrier benchmark (the carrier-dispatch issue): an HTTP carrier that answers every submit
# LATENCY_MS (40 ms) after it arrives, behind a gateway with a carrier window of WINDOW (100)
# and a pace far above anything the machine can send. Only the window limits the rate then: if
# every answer frees a place that the next submit takes at once, the carrier receives
# WINDOW / latency SMS a second (100 / 0.040 s = 2,500/s).
#
# It starts COUNT (20,000) verifications with `loadgen fill`; the gateway takes them much faster
# than 2,500/s, so they queue. When the sink has accepted them all, the script reads from the
# sink's `GET /ids` when it accepted each SMS, and takes as the steady-state rate the SMS accepted
# between the 10% and the 90% marks divided by the time between those two accepts. That leaves
# out the start (connections opening, the window filling) and the end (the queue running dry).
# It does this twice, with a fresh sink and gateway each time: the gateway speaking HTTP/1.1 to
# the carrier (one connection per submit in flight), then HTTP/2 with prior knowledge.
# It prints the steady-state rate, its ratio to WINDOW / latency (target at least 0.95), the rate
# from the first to the last accept, and SMS received and distinct. Since the sink's timer
# answers a little later than asked, it also prints how long the sink really took to answer (its
# mean_answer_micros) and how long a submit took as the gateway saw it (the mean of
# otpgate_carrier_submit_duration_seconds), and the rate against WINDOW / the sink's real latency,
# which says how full the gateway kept its window.
# It exits non-zero if an SMS was lost or duplicated.
#
# Settings, from the environment: COUNT (20000), LATENCY_MS (40), WINDOW (100),
# SKIP_BUILD, KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COUNT=${COUNT:-20000}
LATENCY_MS=${LATENCY_MS:-40}
WINDOW=${WINDOW:-100}
TARGET_RATIO=0.95
IDEAL=$(awk -v w="$WINDOW" -v l="$LATENCY_MS" 'BEGIN { printf "%.0f", w / (l / 1000) }')

build_release
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"

# Prints the rate between the 10% and 90% accepts, the rate from first to last accept, and the
# seconds from first to last accept, from a sink's `UNIX_MICROS MESSAGE_ID` lines (in order).
# Usage: accept_rates IDS_FILE
accept_rates() {
    awk '
        { at[NR] = $1 }
        END {
            n = NR
            if (n < 10) { print "0 0 0"; exit }
            low = int(n * 0.1); high = int(n * 0.9)
            steady = (high - low) / ((at[high] - at[low]) / 1e6)
            whole = (n - 1) / ((at[n] - at[1]) / 1e6)
            printf "%.0f %.0f %.2f\n", steady, whole, (at[n] - at[1]) / 1e6
        }' "$1"
}

# Usage: run_case HTTP_VERSION; appends a line to RESULTS and LATENCIES, and the gateway's
# counters to OUTCOMES.
RESULTS=()
LATENCIES=()
OUTCOMES=()
failed=0
run_case() {
    local version=$1
    # The sink gets a thread per core: with one, it reads each burst of submits (the window,
    # answered together 40 ms earlier, comes back together) one after the other, which adds
    # about 0.4 ms to every round trip and costs the gateway 1% of its rate.
    start_loadgen_server "sink-http$version" sink --latency-ms "$LATENCY_MS"
    local sink_addr=$LOADGEN_ADDR sink_pid=${STARTED_PIDS[-1]}
    PACE=1000000 WINDOW=$WINDOW start_gateway "$sink_addr" "$version"
    say "HTTP/$version: $COUNT verifications, carrier answering after $LATENCY_MS ms, window $WINDOW"
    "$BIN/loadgen" fill --target "http://$GATEWAY_ADDR" --count "$COUNT" --concurrency 64 \
        >"$WORK_DIR/fill-http$version.txt" ||
        die "fill failed: $(tail -n 3 "$WORK_DIR/fill-http$version.txt")"
    local fill_rate
    fill_rate=$(awk '/^done:/ { gsub(/\(/, "", $(NF - 1)); print $(NF - 1) }' \
        "$WORK_DIR/fill-http$version.txt")
    say "HTTP/$version: the gateway took the $COUNT starts at $fill_rate/s; waiting for the sink"
    wait_for_sink "$sink_addr"
    local created=$ACCEPTED received=$DELIVERED distinct steady whole seconds ratio met
    distinct=$(sink_stat "$sink_addr" distinct_message_ids)
    curl -sf "http://$sink_addr/ids" >"$WORK_DIR/ids-http$version.txt"
    read -r steady whole seconds < <(accept_rates "$WORK_DIR/ids-http$version.txt")
    ratio=$(awk -v r="$steady" -v i="$IDEAL" 'BEGIN { printf "%.3f", r / i }')
    local sink_ms submit_ms real_ideal real_ratio
    sink_ms=$(awk -v us="$(sink_stat "$sink_addr" mean_answer_micros)" \
        'BEGIN { printf "%.2f", us / 1000 }')
    submit_ms=$(gateway_histogram_mean_ms otpgate_carrier_submit_duration_seconds)
    real_ideal=$(awk -v w="$WINDOW" -v l="$sink_ms" 'BEGIN { printf "%.0f", w / (l / 1000) }')
    real_ratio=$(awk -v r="$steady" -v i="$real_ideal" 'BEGIN { printf "%.3f", r / i }')
    LATENCIES+=("$(printf '%-10s %13s ms %18s ms %19s %8s' \
        "HTTP/$version" "$sink_ms" "$submit_ms" "$real_ideal" "$real_ratio")")
    met=$(awk -v r="$ratio" -v t="$TARGET_RATIO" 'BEGIN { print (r >= t) ? "met" : "NOT met" }')
    RESULTS+=("$(printf '%-10s %10s %7s %-8s %12s %9s s %8s %8s %9s' \
        "HTTP/$version" "$steady" "$ratio" "($met)" "$whole" "$seconds" "$created" "$received" \
        "$distinct")")
    OUTCOMES+=("gateway counters (non-zero), carrier over HTTP/$version:" "$(gateway_outcomes)")
    if ((created != COUNT || received != COUNT || distinct != COUNT)); then
        echo "FAIL: HTTP/$version: $created created, $received received, $distinct distinct, of $COUNT" >&2
        failed=1
    fi
    stop_pid "$GATEWAY_PID"
    stop_pid "$sink_pid"
}

run_case 1.1
run_case 2

echo
echo "$COUNT SMS, HTTP carrier answering after $LATENCY_MS ms, window $WINDOW, no pace cap;" \
    "ideal WINDOW / latency = $IDEAL SMS/s (target >= $TARGET_RATIO of it)"
printf '%-10s %10s %16s %12s %11s %8s %8s %9s\n' carrier 'SMS/s' ratio 'first-last/s' time \
    created received distinct
printf '%s\n' "${RESULTS[@]}"
echo "SMS/s: between the 10% and 90% accepts; first-last/s and time: from the first to the last accept"
echo
printf '%-10s %16s %21s %19s %8s\n' carrier 'sink answered in' 'gateway submit took' \
    'WINDOW/sink latency' ratio
printf '%s\n' "${LATENCIES[@]}"
echo
printf '%s\n' "${OUTCOMES[@]}"
exit "$failed"

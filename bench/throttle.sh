#!/usr/bin/env bash
# Throttled-carrier benchmark (docs/DESIGN.md section 7, carrier pacing): COUNT SMS (3,000) through
# an HTTP carrier capped at CAPACITY SMS a second (200) that answers 429 above it.
# The ideal is COUNT / CAPACITY seconds (15 s); Kannel 1.4.5 needs about 180 s for the same
# over SMPP, because it parks throttled messages for a minute.
#
# Two cases, each with a fresh sink and gateway:
# - "matched": the gateway's configured pace equals the carrier's capacity;
# - "overconfigured": the gateway is configured at five times the capacity, so only its
#   adaptive pace (throttle answers slow it down at once) keeps it near the capacity.
# It prints, for each, the seconds from the first start request to the last SMS accepted, the
# ratio to the ideal, the carrier's throttle answers, and lost or duplicated SMS.
# It exits non-zero if an SMS was lost or duplicated.
#
# Settings, from the environment: COUNT (3000), CAPACITY (200), SKIP_BUILD, KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COUNT=${COUNT:-3000}
CAPACITY=${CAPACITY:-200}
IDEAL=$(awk -v n="$COUNT" -v c="$CAPACITY" 'BEGIN { printf "%.1f", n / c }')

build_release
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"

# Usage: run_case NAME PACE; appends a line to RESULTS.
RESULTS=()
failed=0
run_case() {
    local name=$1 pace=$2
    start_loadgen_server "sink-$name" sink --worker-threads 1 --capacity-per-sec "$CAPACITY"
    local sink_addr=$LOADGEN_ADDR sink_pid=${STARTED_PIDS[-1]}
    PACE=$pace WINDOW=100 start_gateway "$sink_addr"
    say "$name: $COUNT verifications, carrier capped at $CAPACITY/s, gateway paced at $pace/s"
    local started ended
    started=$(date +%s.%N)
    "$BIN/loadgen" fill --target "http://$GATEWAY_ADDR" --count "$COUNT" --concurrency 64 \
        >"$WORK_DIR/fill-$name.txt" || die "fill failed: $(tail -n 3 "$WORK_DIR/fill-$name.txt")"
    local received=0
    for _ in $(seq 1 6000); do
        received=$(sink_stat "$sink_addr" received)
        ((received >= COUNT)) && break
        sleep 0.05
    done
    ended=$(date +%s.%N)
    local distinct throttled seconds ratio
    distinct=$(sink_stat "$sink_addr" distinct_message_ids)
    throttled=$(sink_stat "$sink_addr" throttled)
    seconds=$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
    ratio=$(awk -v s="$seconds" -v i="$IDEAL" 'BEGIN { printf "%.2f", s / i }')
    RESULTS+=("$(printf '%-16s %8s %9s s %8s %8s %8s %10s' \
        "$name" "$pace" "$seconds" "$ratio" "$throttled" "$received" "$distinct")")
    if ((received != COUNT || distinct != COUNT)); then
        echo "FAIL: $name: $received received, $distinct distinct, of $COUNT" >&2
        failed=1
    fi
    stop_pid "$GATEWAY_PID"
    stop_pid "$sink_pid"
}

run_case matched "$CAPACITY"
run_case overconfigured $((CAPACITY * 5))

echo
echo "$COUNT SMS, HTTP carrier capped at $CAPACITY/s (429 above it); ideal $IDEAL s"
printf '%-16s %8s %11s %8s %8s %8s %10s\n' case pace time ratio 429s received distinct
printf '%s\n' "${RESULTS[@]}"
exit "$failed"

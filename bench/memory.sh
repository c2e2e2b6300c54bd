#!/usr/bin/env bash
# Memory per live verification: the gateway's RSS growth over COUNT live verifications.
#
# It starts the loadgen sink and a fresh gateway, reads the gateway's VmRSS from /proc, starts
# COUNT verifications with distinct phone numbers with `loadgen fill`, waits until every SMS has
# reached the sink (so the queue is empty again), reads VmRSS again and prints
# (after - before) / COUNT. The target is at most 512 bytes per live verification.
# It exits non-zero if fill saw a failed request or an SMS was lost or duplicated.
#
# Settings, from the environment: COUNT (default 1000000; 100000 runs quickly),
# CONCURRENCY (64), SKIP_BUILD (set it to reuse the release binaries),
# KEEP_WORK_DIR (set it to keep the logs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COUNT=${COUNT:-1000000}
CONCURRENCY=${CONCURRENCY:-64}
TARGET_BYTES=512

build_release
for binary in otpgate loadgen; do
    [[ -x "$BIN/$binary" ]] || die "$BIN/$binary is missing; build it or unset SKIP_BUILD"
done

start_loadgen_server sink sink --worker-threads 1
SINK_ADDR=$LOADGEN_ADDR
start_gateway "$SINK_ADDR"
# Let start-up work (first sweeps, lazily built tables) settle before the baseline.
sleep 2
RSS_BEFORE_KB=$(rss_kb "$GATEWAY_PID")

say "loadgen fill --count $COUNT --concurrency $CONCURRENCY"
fill_failed=0
"$BIN/loadgen" fill --target "http://$GATEWAY_ADDR" --count "$COUNT" \
    --concurrency "$CONCURRENCY" >"$WORK_DIR/fill.txt" || fill_failed=1
cat "$WORK_DIR/fill.txt" >&2
say "waiting for the queue to drain to the sink"
wait_for_sink "$SINK_ADDR"
DISTINCT=$(sink_stat "$SINK_ADDR" distinct_message_ids)
LIVE=$(gateway_metric otpgate_verifications_live)
# Let connection buffers and the emptied queue settle, as for the baseline.
sleep 2
RSS_AFTER_KB=$(rss_kb "$GATEWAY_PID")
RSS_PEAK_KB=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$GATEWAY_PID/status")

GATEWAY_OUTCOMES=$(gateway_outcomes)
BYTES_PER_VERIFICATION=$(awk -v before="$RSS_BEFORE_KB" -v after="$RSS_AFTER_KB" -v n="$LIVE" \
    'BEGIN { printf "%.0f", (n > 0 ? (after - before) * 1024 / n : 0) }')
TARGET_MET=$(awk -v b="$BYTES_PER_VERIFICATION" -v t="$TARGET_BYTES" \
    'BEGIN { print (b <= t) ? "met" : "NOT met" }')

echo
echo "RSS before:                   $((RSS_BEFORE_KB / 1024)) MiB ($RSS_BEFORE_KB kB)"
echo "RSS after:                    $((RSS_AFTER_KB / 1024)) MiB ($RSS_AFTER_KB kB)"
echo "RSS peak:                     $((RSS_PEAK_KB / 1024)) MiB ($RSS_PEAK_KB kB)"
echo "live verifications:           $LIVE (otpgate_verifications_live; $ACCEPTED created, $COUNT requested)"
echo "bytes per live verification:  $BYTES_PER_VERIFICATION (target <= $TARGET_BYTES: $TARGET_MET)"
echo "SMS at sink:                  $DELIVERED of $ACCEPTED accepted (distinct message ids $DISTINCT)"
echo "gateway counters (non-zero):"
echo "$GATEWAY_OUTCOMES"

failed=0
if ((fill_failed)); then
    echo "FAIL: fill saw failed requests" >&2
    failed=1
fi
if ((ACCEPTED == 0 || DELIVERED != ACCEPTED || DISTINCT != ACCEPTED || LIVE == 0)); then
    echo "FAIL: SMS lost or duplicated" >&2
    failed=1
fi
exit "$failed"

#!/usr/bin/env bash
# The load generator's own figures (the load generator issue's benchmarks):
#
# 1. Memory per virtual user: `loadgen run scenarios/hold-100k.toml` against a gateway in its own
#    process (so the load generator's RSS is its own), holding 100,000 users in flight at once.
#    Prints the load generator's peak RSS, the users in flight at the peak, and RSS per user.
#    Target: at most 10 KB per user (k6 measured here: about 240 KB per VU; Goose about 160 KB).
# 2. Request rate: `loadgen run bench/scenarios/rate.toml --worker-threads 1` against
#    `loadgen bare` (a server that does no work), and `wrk -t1 -c64` against the same server in the
#    same run. Prints both rates and the ratio. Target: at least 0.5.
#
# Settings, from the environment: CASES ("memory rate"), DURATION (wrk, 10s), SKIP_BUILD,
# KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CASES=${CASES:-memory rate}
DURATION=${DURATION:-10s}

build_release
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"

memory_case() {
    # hold-100k's carrier listens on 127.0.0.1:19901; the gateway is configured to send there,
    # unauthenticated on loopback, with the receipt token the scenario's carrier uses.
    [[ -z $(ss -Htln "sport = :19901") ]] || die "port 19901 (hold-100k's carrier) is taken"
    free_port
    GATEWAY_ADDR="127.0.0.1:$FREE_PORT"
    free_port
    ADMIN_ADDR="127.0.0.1:$FREE_PORT"
    local config="$WORK_DIR/gateway-memory.toml"
    cat >"$config" <<TOML
listen = "$GATEWAY_ADDR"
admin_listen = "$ADMIN_ADDR"
public_url = "http://$GATEWAY_ADDR"
max_connections = 4096
max_connections_per_ip = 0

[limits]
ip_sends = []

[queue]
capacity = 1000000

[[carriers]]
name = "bulk"
kind = "http"
url = "http://127.0.0.1:19901/sms"
pace_per_sec = 100000
window = 200
http_version = "1.1"
TOML
    run_gateway "$config"
    say "memory: 100,000 users in flight (about 2.5 minutes)"
    "$BIN/loadgen" run "$ROOT/scenarios/hold-100k.toml" --target "http://$GATEWAY_ADDR" \
        --progress lines --report "$WORK_DIR/hold.json" >"$WORK_DIR/hold.txt" 2>"$WORK_DIR/hold.err" || true
    [[ -s "$WORK_DIR/hold.json" ]] || { tail -n 20 "$WORK_DIR/hold.err" >&2; die "the run wrote no report"; }
    local peak_rss in_flight first_rss per_user per_user_growth
    peak_rss=$(jq '.self_watch.peak_rss_bytes' "$WORK_DIR/hold.json")
    in_flight=$(jq '.self_watch.peak_in_flight' "$WORK_DIR/hold.json")
    first_rss=$(jq '[.timeline[] | select(.rss_bytes > 0) | .rss_bytes] | first' "$WORK_DIR/hold.json")
    per_user=$(awk -v r="$peak_rss" -v n="$in_flight" 'BEGIN { printf "%.0f", r / n }')
    per_user_growth=$(awk -v r="$peak_rss" -v f="$first_rss" -v n="$in_flight" 'BEGIN { printf "%.0f", (r - f) / n }')
    echo
    echo "memory per virtual user (scenarios/hold-100k.toml, gateway in its own process)"
    printf '%-34s %s\n' "peak users in flight" "$in_flight"
    printf '%-34s %.1f MiB\n' "peak RSS of the load generator" "$(awk -v r="$peak_rss" 'BEGIN { print r / 1048576 }')"
    printf '%-34s %.1f MiB\n' "RSS after its first second" "$(awk -v r="$first_rss" 'BEGIN { print r / 1048576 }')"
    printf '%-34s %s bytes (target <= 10240)\n' "peak RSS / users in flight" "$per_user"
    printf '%-34s %s bytes\n' "growth / users in flight" "$per_user_growth"
    printf '%-34s %s\n' "verified, unfinished, lost SMS" \
        "$(jq -r '[.counts.verified, .counts.unfinished, .counts.lost_sms] | join(", ")' "$WORK_DIR/hold.json")"
    printf '%-34s %s\n' "run valid" "$(jq -r '.self_watch.valid' "$WORK_DIR/hold.json")"
    stop_pid "$GATEWAY_PID"
}

rate_case() {
    ensure_wrk
    start_loadgen_server bare bare --worker-threads 1
    local bare_addr=$LOADGEN_ADDR
    say "rate: loadgen, one worker thread, against loadgen bare"
    "$BIN/loadgen" --worker-threads 1 run "$BENCH_DIR/scenarios/rate.toml" \
        --target "http://$bare_addr" --connections 64 --progress off --max-lag-ms 100000 \
        --report "$WORK_DIR/rate.json" >"$WORK_DIR/rate.txt" 2>"$WORK_DIR/rate.err" || true
    [[ -s "$WORK_DIR/rate.json" ]] || { tail -n 20 "$WORK_DIR/rate.err" >&2; die "the run wrote no report"; }
    # The busiest full seconds of the run: the rate it sustained while users kept arriving.
    local loadgen_rate
    loadgen_rate=$(jq '[.timeline[1:-1][] | .requests] | sort | reverse | .[0:5] | add / length | floor' "$WORK_DIR/rate.json")
    say "rate: wrk -t1 -c64 -d$DURATION against the same server"
    local wrk_out wrk_rate
    wrk_out=$(wrk -t1 -c64 -d"$DURATION" -s "$BENCH_DIR/verifications.lua" "http://$bare_addr/v1/verifications")
    wrk_rate=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$wrk_out")
    echo
    echo "request rate against loadgen bare (one core each)"
    printf '%-34s %s requests/s (mean of its 5 busiest seconds)\n' "loadgen run, 1 worker thread" "$loadgen_rate"
    printf '%-34s %s requests/s\n' "wrk -t1 -c64" "$wrk_rate"
    printf '%-34s %s (target >= 0.5)\n' "ratio" "$(awk -v a="$loadgen_rate" -v b="$wrk_rate" 'BEGIN { printf "%.2f", a / b }')"
    printf '%-34s %s\n' "transport errors" "$(jq '.counts.transport_errors' "$WORK_DIR/rate.json")"
}

for case in $CASES; do
    "${case}_case"
done

#!/usr/bin/env bash
# SMPP benchmarks (the SMPP issue): the gateway's ESME against the load generator's SMSC
# simulator (`loadgen smsc`), and Kannel through the same simulator, in one run.
#
# 1. "window": an SMSC that answers every submit_sm LATENCY_MS (40) after it arrives, with no
#    capacity cap, and a gateway with one bind, a window of WINDOW (100) and a pace far above
#    what the machine can send. Only the window limits the rate then: WINDOW / latency SMS a
#    second (100 / 0.040 s = 2,500/s). COUNT (20,000) verifications are started with
#    `loadgen fill`; the rate is the simulator's messages between the 10% and 90% marks of their
#    arrival (its steady_messages_per_sec), as bench/slow.sh measures HTTP, which leaves out the
#    window filling at the start and the queue running dry at the end; the rate from its first
#    submit_sm to its last message is printed beside it. Target: at least 0.95 of WINDOW /
#    latency. Since the simulator's timer answers a little later than asked, it also prints how long the simulator
#    really took from reading a submit_sm to writing its answer (its mean_answer_micros and
#    max_answer_micros), the gateway's mean submit time (otpgate_carrier_submit_duration_seconds)
#    and the rate against WINDOW / the simulator's real latency, which says how full the gateway
#    kept its window; the difference between the two times is spent in the gateway (and its
#    SMPP client) and on loopback. RECEIPT_DELAY_MS (100) delays the receipts (deliver_sm).
# 2. "throttled": THROTTLED_COUNT (3,000) SMS through an SMSC capped at CAPACITY (200) submit_sm a
#    second, which answers ESME_RTHROTTLED above it. CAPACITY_RULE (sliding-second) says how the
#    simulator counts it: `sliding-second`, at most CAPACITY in any second, as the HTTP sink
#    counts its capacity in bench/throttle.sh (so the two benchmarks compare), or `bucket`, a
#    token bucket holding a tenth of a second, which a gateway must match much more tightly.
#    The gateway is configured at five times the
#    capacity (PACE, 1,000/s), so only its adaptive pace keeps it near the cap. Then Kannel
#    (Debian's kannel, bearerbox + smsbox, max-pending-submits WINDOW) sends the same number of
#    SMS, fed through its HTTP sendsms, through a fresh simulator with the same cap. For both it
#    prints the seconds from the simulator's first submit_sm to its last message, the ratio to
#    the ideal THROTTLED_COUNT / CAPACITY (15 s; target at most 1.05 for the gateway), and the
#    messages lost and duplicated. Kannel is given at most KANNEL_MAX_SECS (400) to finish.
#
# It exits non-zero if the gateway lost or duplicated an SMS.
#
# Settings, from the environment: COUNT (20000), LATENCY_MS (40), RECEIPT_DELAY_MS (100),
# WINDOW (100), THROTTLED_COUNT (3000), CAPACITY (200), CAPACITY_RULE (sliding-second),
# PACE (1000), KANNEL_MAX_SECS (400), SKIP_KANNEL, SKIP_BUILD, KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COUNT=${COUNT:-20000}
LATENCY_MS=${LATENCY_MS:-40}
RECEIPT_DELAY_MS=${RECEIPT_DELAY_MS:-100}
WINDOW=${WINDOW:-100}
THROTTLED_COUNT=${THROTTLED_COUNT:-3000}
CAPACITY=${CAPACITY:-200}
CAPACITY_RULE=${CAPACITY_RULE:-sliding-second}
PACE=${PACE:-1000}
KANNEL_MAX_SECS=${KANNEL_MAX_SECS:-400}
SYSTEM_ID=bench
PASSWORD=secret
IDEAL_RATE=$(awk -v w="$WINDOW" -v l="$LATENCY_MS" 'BEGIN { printf "%.0f", w / (l / 1000) }')
IDEAL_SECS=$(awk -v n="$THROTTLED_COUNT" -v c="$CAPACITY" 'BEGIN { printf "%.1f", n / c }')

command -v jq >/dev/null || apt_install jq
if [[ -z ${SKIP_KANNEL:-} ]]; then
    bash "$ROOT/tests/interop/kannel/setup.sh"
fi
build_release
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"

# Starts a simulator; sets SMSC_ADDR, SMSC_PID and SMSC_OUT.
# Usage: start_smsc NAME FLAG...
start_smsc() {
    local name=$1
    shift
    start_loadgen_server "$name" smsc --system-id "$SYSTEM_ID" --password "$PASSWORD" \
        --duration-secs 3600 "$@"
    SMSC_ADDR=$LOADGEN_ADDR
    SMSC_PID=${STARTED_PIDS[-1]}
    SMSC_OUT="$WORK_DIR/$name.out"
}

# Stops the simulator and sets SMSC_SUMMARY to its summary (the JSON line it prints when it
# stops). Not in a command substitution: a subshell cannot wait for the simulator, and would
# read its output before the summary is there.
stop_smsc() {
    stop_pid "$SMSC_PID"
    SMSC_SUMMARY=$(tail -n 1 "$SMSC_OUT")
    jq -e .submit_sm <<<"$SMSC_SUMMARY" >/dev/null 2>&1 ||
        die "the simulator printed no summary: $(tail -n 3 "$SMSC_OUT" "${SMSC_OUT%.out}.err")"
}

# Starts a gateway with one SMPP carrier on the simulator at SMSC_ADDR.
# Usage: start_smpp_gateway PACE WINDOW
start_smpp_gateway() {
    free_port
    GATEWAY_ADDR="127.0.0.1:$FREE_PORT"
    free_port
    ADMIN_ADDR="127.0.0.1:$FREE_PORT"
    local config="$WORK_DIR/otpgate.toml"
    {
        gateway_config_base "$GATEWAY_ADDR" "$ADMIN_ADDR"
        cat <<TOML

[[carriers]]
name = "smsc"
kind = "smpp"
host = "127.0.0.1"
port = ${SMSC_ADDR##*:}
system_id = "$SYSTEM_ID"
password = "$PASSWORD"
binds = 1
window = $2
pace_per_sec = $1
timeout_ms = 5000
TOML
    } >"$config"
    run_gateway "$config"
}

# Waits until the gateway's carrier accepted N SMS, or nothing changed for 20 s.
# Usage: wait_for_accepted N
wait_for_accepted() {
    local last=-1 since=$SECONDS accepted
    while true; do
        accepted=$(gateway_metric otpgate_sms_submitted_total 'outcome="accepted"')
        ((accepted >= $1)) && return
        if ((accepted != last)); then
            last=$accepted
            since=$SECONDS
        elif ((SECONDS - since >= 20)); then
            say "the gateway stopped at $accepted accepted of $1"
            return
        fi
        sleep 0.2
    done
}

# Prints "messages duplicates seconds" from a simulator summary: seconds from its first
# submit_sm to its last message.
summary_fields() {
    jq -r '[.messages, .duplicates,
        (if .first_submit_ms == null or .last_message_ms == null then 0
         else (.last_message_ms - .first_submit_ms) / 1000 end)] | @tsv' <<<"$1"
}

failed=0

# --- 1. window --------------------------------------------------------------------------------
start_smsc smsc-window --capacity-per-sec 1000000 --latency-ms "$LATENCY_MS" \
    --receipt-delay-ms "$RECEIPT_DELAY_MS"
start_smpp_gateway 1000000 "$WINDOW"
say "window: $COUNT verifications, SMSC answering after $LATENCY_MS ms, one bind, window $WINDOW"
"$BIN/loadgen" fill --target "http://$GATEWAY_ADDR" --count "$COUNT" --concurrency 64 \
    >"$WORK_DIR/fill-window.txt" ||
    die "fill failed: $(tail -n 3 "$WORK_DIR/fill-window.txt")"
wait_for_accepted "$COUNT"
window_submit_ms=$(gateway_histogram_mean_ms otpgate_carrier_submit_duration_seconds)
window_outcomes=$(gateway_outcomes)
stop_pid "$GATEWAY_PID"
stop_smsc
window_summary=$SMSC_SUMMARY
read -r w_messages w_duplicates w_secs < <(summary_fields "$window_summary")
w_whole=$(awk -v n="$w_messages" -v s="$w_secs" 'BEGIN { printf "%.0f", (s > 0) ? n / s : 0 }')
w_rate=$(jq -r '(.steady_messages_per_sec // 0) | round' <<<"$window_summary")
w_ratio=$(awk -v r="$w_rate" -v i="$IDEAL_RATE" 'BEGIN { printf "%.3f", r / i }')
w_met=$(awk -v r="$w_ratio" 'BEGIN { print (r >= 0.95) ? "met" : "NOT met" }')
read -r w_answer_ms w_answer_max_ms < <(jq -r '[(.mean_answer_micros // 0) / 1000,
    (.max_answer_micros // 0) / 1000] | map(. * 100 | round / 100) | @tsv' <<<"$window_summary")
w_real_ideal=$(awk -v w="$WINDOW" -v l="$w_answer_ms" 'BEGIN { printf "%.0f", (l > 0) ? w / (l / 1000) : 0 }')
w_real_ratio=$(awk -v r="$w_rate" -v i="$w_real_ideal" 'BEGIN { printf "%.3f", (i > 0) ? r / i : 0 }')
if ((w_messages != COUNT || w_duplicates != 0)); then
    echo "FAIL: window: $w_messages messages of $COUNT, $w_duplicates duplicates" >&2
    failed=1
fi

# --- 2. throttled: the gateway ----------------------------------------------------------------
start_smsc smsc-throttled-gateway --capacity-per-sec "$CAPACITY" --capacity-rule "$CAPACITY_RULE" \
    --receipt-delay-ms "$RECEIPT_DELAY_MS"
start_smpp_gateway "$PACE" "$WINDOW"
say "throttled: $THROTTLED_COUNT SMS through an SMSC capped at $CAPACITY/s, gateway paced at $PACE/s"
"$BIN/loadgen" fill --target "http://$GATEWAY_ADDR" --count "$THROTTLED_COUNT" --concurrency 64 \
    >"$WORK_DIR/fill-throttled.txt" ||
    die "fill failed: $(tail -n 3 "$WORK_DIR/fill-throttled.txt")"
wait_for_accepted "$THROTTLED_COUNT"
throttled_outcomes=$(gateway_outcomes)
stop_pid "$GATEWAY_PID"
stop_smsc
gateway_summary=$SMSC_SUMMARY
read -r g_messages g_duplicates g_secs < <(summary_fields "$gateway_summary")
g_throttled=$(jq -r .throttled <<<"$gateway_summary")
if ((g_messages != THROTTLED_COUNT || g_duplicates != 0)); then
    echo "FAIL: throttled: $g_messages messages of $THROTTLED_COUNT, $g_duplicates duplicates" >&2
    failed=1
fi

# --- 2. throttled: Kannel ---------------------------------------------------------------------
k_line="kannel     (skipped: SKIP_KANNEL)"
if [[ -z ${SKIP_KANNEL:-} ]]; then
    start_smsc smsc-throttled-kannel --capacity-per-sec "$CAPACITY" \
        --capacity-rule "$CAPACITY_RULE" --receipt-delay-ms "$RECEIPT_DELAY_MS"
    SMSC_PORT=${SMSC_ADDR##*:} SYSTEM_ID=$SYSTEM_ID PASSWORD=$PASSWORD WINDOW=$WINDOW \
        bash "$ROOT/tests/interop/kannel/run.sh" >"$WORK_DIR/kannel.out" 2>"$WORK_DIR/kannel.err" &
    KANNEL_PID=$!
    STARTED_PIDS+=("$KANNEL_PID")
    until grep -q online "$WORK_DIR/kannel.out"; do
        kill -0 "$KANNEL_PID" 2>/dev/null || die "Kannel did not start: $(tail -n 5 "$WORK_DIR/kannel.err")"
        sleep 0.1
    done
    sendsms=$(awk '{ print $4 }' "$WORK_DIR/kannel.out")
    admin=$(awk '{ print $6 }' "$WORK_DIR/kannel.out")
    say "throttled: the same $THROTTLED_COUNT SMS through Kannel (sendsms $sendsms)"
    # One distinct number and code per SMS, so the simulator can tell a duplicate.
    for i in $(seq 1 "$THROTTLED_COUNT"); do
        printf 'url = "http://%s/cgi-bin/sendsms?username=otpgate&password=otpgate&to=%%2B39333%07d&text=Your+code+is+%06d&dlr-mask=3"\noutput = "/dev/null"\n' \
            "$sendsms" "$i" "$i"
    done >"$WORK_DIR/kannel-urls.cfg"
    # curl draws a progress meter for --parallel even with -s: keep it out of the results.
    curl -s --parallel --parallel-max 32 -K "$WORK_DIR/kannel-urls.cfg" 2>"$WORK_DIR/curl.err"
    kannel_started=$SECONDS
    last=-1
    since=$SECONDS
    while ((SECONDS - kannel_started < KANNEL_MAX_SECS)); do
        sent=$(curl -s "http://$admin/status.txt?password=otpgate-admin" |
            awk '/^SMS:/ { for (i = 1; i <= NF; i++) if ($i == "sent") { print $(i + 1); exit } }' ||
            true)
        sent=${sent:-0}
        ((sent >= THROTTLED_COUNT)) && break
        if ((sent != last)); then
            last=$sent
            since=$SECONDS
        fi
        sleep 0.5
    done
    sleep 0.5
    stop_pid "$KANNEL_PID"
    stop_smsc
    kannel_summary=$SMSC_SUMMARY
    read -r k_messages k_duplicates k_secs < <(summary_fields "$kannel_summary")
    k_throttled=$(jq -r .throttled <<<"$kannel_summary")
    k_ratio=$(awk -v s="$k_secs" -v i="$IDEAL_SECS" 'BEGIN { printf "%.2f", s / i }')
    k_lost=$((THROTTLED_COUNT - k_messages))
    k_line=$(printf '%-10s %9.1f s %7s %10s %8s %10s %12s' kannel "$k_secs" "$k_ratio" \
        "$k_messages" "$k_lost" "$k_duplicates" "$k_throttled")
    if ((k_messages < THROTTLED_COUNT)); then
        k_line+="  (stopped after $KANNEL_MAX_SECS s, or Kannel gave up on some)"
    fi
fi

g_ratio=$(awk -v s="$g_secs" -v i="$IDEAL_SECS" 'BEGIN { printf "%.2f", s / i }')
g_met=$(awk -v r="$g_ratio" 'BEGIN { print (r <= 1.05) ? "met" : "NOT met" }')

echo
echo "1. window: $COUNT SMS, SMSC answering after $LATENCY_MS ms, one bind, window $WINDOW," \
    "no pace cap; ideal WINDOW / latency = $IDEAL_RATE SMS/s (target >= 0.95 of it)"
printf '%-10s %8s %8s %-8s %13s %9s %9s %10s\n' ESME 'SMS/s' ratio '' 'first-last/s' time \
    messages duplicates
printf '%-10s %8s %8s %-8s %13s %7.2f s %9s %10s\n' otpgate "$w_rate" "$w_ratio" "($w_met)" \
    "$w_whole" "$w_secs" "$w_messages" "$w_duplicates"
echo "SMS/s: between the 10% and 90% marks of the messages the SMSC received (as bench/slow.sh);" \
    "first-last/s and time: from its first submit_sm to its last message"
printf '%-10s %18s %21s %19s %8s\n' ESME 'SMSC answered in' 'gateway submit took' \
    'WINDOW/SMSC latency' ratio
printf '%-10s %10s ms (max %s) %18s ms %19s %8s\n' otpgate "$w_answer_ms" "$w_answer_max_ms" \
    "$window_submit_ms" "$w_real_ideal" "$w_real_ratio"
echo
echo "2. throttled: $THROTTLED_COUNT SMS through an SMSC capped at $CAPACITY/s ($CAPACITY_RULE;" \
    "ESME_RTHROTTLED above it); ideal $IDEAL_SECS s"
printf '%-10s %11s %7s %10s %8s %10s %12s\n' ESME time ratio messages lost duplicates \
    'throttled'
printf '%-10s %9.1f s %7s %10s %8s %10s %12s  (%s, target <= 1.05)\n' otpgate "$g_secs" \
    "$g_ratio" "$g_messages" "$((THROTTLED_COUNT - g_messages))" "$g_duplicates" \
    "$g_throttled" "$g_met"
echo "$k_line"
echo "time: from the SMSC's first submit_sm to its last message; throttled: ESME_RTHROTTLED answers"
echo
echo "gateway counters (non-zero), window case:"
echo "$window_outcomes"
echo "gateway counters (non-zero), throttled case:"
echo "$throttled_outcomes"
exit "$failed"

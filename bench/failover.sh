#!/usr/bin/env bash
# Failover benchmark (the carrier-dispatch issue): one gateway, two HTTP carriers, and the first
# one crashes mid-run. No SMS may be lost; an SMS the crashed carrier accepted but never answered
# is sent again by the other carrier, so a few duplicates are expected, at most as many as the
# first carrier had in flight when it died (its window).
#
# Two sinks, "alpha" and "beta", each answer LATENCY_MS (20 ms) after a submit arrives; the
# gateway paces each at PACE (500) SMS a second with a window of WINDOW (100), and both pull
# from the one queue. Alpha runs with `--die-after DIE_AFTER` (500): on accepting its 500th SMS
# it writes every SMS it accepted to a file and exits at once, so the submits it was still
# holding get no answer and their connections close, like a carrier that crashed; from then on
# its port refuses connections. Beta lists what it accepted at `GET /ids`.
# COUNT (5,000) verifications are started with `loadgen fill`, which the gateway takes far faster
# than the carriers' pace, so they queue; the script waits until every SMS the gateway created
# has reached one carrier or the other (or nothing has moved for STALL_SECS, 10 s).
#
# It prints the SMS the gateway created, those alpha accepted before it died, those beta
# accepted, the distinct SMS across both, lost ones (created but accepted by neither; target 0),
# duplicates (accepted more than once: by both carriers, or twice by one), how long after alpha
# beta accepted the duplicated SMS, and how many SMS alpha held unanswered when it died (those
# it accepted within LATENCY_MS of its death, or up to 2 ms more, since its timer answers a
# little late), which is what the duplicates should number.
# It prints the time from the first start request to the last SMS accepted, and an ideal for it:
# (COUNT - DIE_AFTER) / PACE, beta working at its pace throughout and alpha's SMS costing nothing
# (with WINDOW / latency in place of PACE when that is lower).
# It exits non-zero if an SMS was lost, if alpha never died, or if there are more duplicates than
# WINDOW, which no crash could explain.
#
# Settings, from the environment: COUNT (5000), PACE (500), WINDOW (100), LATENCY_MS (20),
# DIE_AFTER (500), BREAKER_OPEN_MS (10000), HTTP_VERSION (1.1), STALL_SECS (10),
# SKIP_BUILD, KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COUNT=${COUNT:-5000}
PACE=${PACE:-500}
WINDOW=${WINDOW:-100}
LATENCY_MS=${LATENCY_MS:-20}
DIE_AFTER=${DIE_AFTER:-500}
BREAKER_OPEN_MS=${BREAKER_OPEN_MS:-10000}
HTTP_VERSION=${HTTP_VERSION:-1.1}
STALL_SECS=${STALL_SECS:-10}
# Beta alone can take at most its pace, or its window every latency if that is less.
IDEAL=$(awk -v n="$COUNT" -v d="$DIE_AFTER" -v p="$PACE" -v w="$WINDOW" -v l="$LATENCY_MS" '
    BEGIN { rate = p; if (l > 0 && w * 1000 / l < rate) rate = w * 1000 / l; printf "%.1f", (n - d) / rate }')

build_release
say "load average before the run: $(cut -d ' ' -f 1-3 /proc/loadavg)"

ALPHA_IDS="$WORK_DIR/ids-alpha.txt"
BETA_IDS="$WORK_DIR/ids-beta.txt"
start_loadgen_server sink-alpha sink --worker-threads 1 --latency-ms "$LATENCY_MS" \
    --die-after "$DIE_AFTER" --ids-file "$ALPHA_IDS"
ALPHA_ADDR=$LOADGEN_ADDR
start_loadgen_server sink-beta sink --worker-threads 1 --latency-ms "$LATENCY_MS"
BETA_ADDR=$LOADGEN_ADDR BETA_PID=${STARTED_PIDS[-1]}

# Prints a [[carriers]] section.
# Usage: carrier_section NAME SINK_ADDR
carrier_section() {
    cat <<TOML

[[carriers]]
name = "$1"
kind = "http"
url = "http://$2/sms"
pace_per_sec = $PACE
window = $WINDOW
timeout_ms = 5000
http_version = "$HTTP_VERSION"
breaker_failures = 5
breaker_error_ratio = 0.5
breaker_open_ms = $BREAKER_OPEN_MS
breaker_probes = 1
TOML
}

free_port
GATEWAY_ADDR="127.0.0.1:$FREE_PORT"
free_port
ADMIN_ADDR="127.0.0.1:$FREE_PORT"
CONFIG="$WORK_DIR/otpgate.toml"
{
    gateway_config_base "$GATEWAY_ADDR" "$ADMIN_ADDR"
    carrier_section alpha "$ALPHA_ADDR"
    carrier_section beta "$BETA_ADDR"
} >"$CONFIG"
run_gateway "$CONFIG"

# Writes to FILE every SMS alpha and beta have accepted so far, `UNIX_MICROS MESSAGE_ID CARRIER`
# a line: alpha's from its file once it has died, else from its /ids.
# Usage: collect_ids FILE
collect_ids() {
    local alpha
    if [[ -s "$ALPHA_IDS" ]]; then
        alpha=$(cat "$ALPHA_IDS")
    else
        # It may die between the two looks; the next round reads its file.
        alpha=$(curl -sf "http://$ALPHA_ADDR/ids" || true)
    fi
    curl -sf "http://$BETA_ADDR/ids" >"$BETA_IDS" || die "beta stopped answering"
    {
        [[ -n "$alpha" ]] && awk '{ print $0, "alpha" }' <<<"$alpha"
        awk '{ print $0, "beta" }' "$BETA_IDS"
    } >"$1"
}

# Prints the number of distinct message ids in a file written by collect_ids.
distinct_ids() {
    awk '{ print $2 }' "$1" | sort -u | wc -l
}

say "$COUNT verifications; alpha and beta each paced at $PACE/s, window $WINDOW," \
    "answering after $LATENCY_MS ms; alpha dies on accepting its ${DIE_AFTER}th SMS"
STARTED_MICROS=$(($(date +%s%N) / 1000))
"$BIN/loadgen" fill --target "http://$GATEWAY_ADDR" --count "$COUNT" --concurrency 64 \
    >"$WORK_DIR/fill.txt" || die "fill failed: $(tail -n 3 "$WORK_DIR/fill.txt")"
CREATED=$(gateway_created)
say "the gateway created $CREATED verifications; waiting until every SMS reached a carrier"

ALL_IDS="$WORK_DIR/ids-all.txt"
last_distinct=-1
stalled_since=$SECONDS
while true; do
    collect_ids "$ALL_IDS"
    distinct=$(distinct_ids "$ALL_IDS")
    if ((distinct >= CREATED)); then
        # A retry still in flight would show up as a duplicate; give it a moment.
        sleep 1
        collect_ids "$ALL_IDS"
        break
    fi
    if ((distinct != last_distinct)); then
        last_distinct=$distinct
        stalled_since=$SECONDS
    elif ((SECONDS - stalled_since >= STALL_SECS)); then
        say "the carriers stopped receiving at $distinct of $CREATED"
        break
    fi
    sleep 0.2
done

failed=0
alpha_died=yes
# Alpha writes its file only as it dies.
if [[ ! -s "$ALPHA_IDS" ]]; then
    alpha_died=no
    echo "FAIL: alpha never died (it accepted fewer than DIE_AFTER=$DIE_AFTER SMS)" >&2
    failed=1
fi

# Every figure, from the lines `UNIX_MICROS MESSAGE_ID CARRIER` of both carriers.
# An SMS accepted by both was resent by beta some time after alpha accepted it: the resend delay.
# Alpha's timer answers up to 2 ms after LATENCY_MS, so an SMS it accepted LATENCY_MS to
# LATENCY_MS + 2 ms before it died may or may not have been answered: a range.
read -r alpha_accepted beta_accepted distinct duplicates both twice last_micros death_micros \
    unanswered unanswered_max resend_min_ms resend_max_ms < <(
    awk -v latency_us=$((LATENCY_MS * 1000)) '
        {
            n[$3]++; total++
            seen[$2]++
            if (!(($2, $3) in first_at)) { first_at[$2, $3] = $1; carriers[$2]++ } else { twice++ }
            if ($1 > last) last = $1
            if ($3 == "alpha") { alpha_at[n["alpha"]] = $1; if ($1 > death) death = $1 }
        }
        END {
            for (id in seen) distinct++
            resend_min = -1; resend_max = -1
            for (id in carriers) {
                if (carriers[id] < 2) continue
                both++
                resend = (first_at[id, "beta"] - first_at[id, "alpha"]) / 1000
                if (resend_min < 0 || resend < resend_min) resend_min = resend
                if (resend > resend_max) resend_max = resend
            }
            for (i = 1; i <= n["alpha"]; i++) {
                if (alpha_at[i] > death - latency_us) unanswered++
                if (alpha_at[i] > death - latency_us - 2000) unanswered_max++
            }
            printf "%d %d %d %d %d %d %.0f %.0f %d %d %.0f %.0f\n", n["alpha"], n["beta"],
                distinct, total - distinct, both, twice, last, death, unanswered, unanswered_max,
                resend_min, resend_max
        }' "$ALL_IDS"
)
lost=$((CREATED - distinct))
seconds=$(awk -v a="$STARTED_MICROS" -v b="$last_micros" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')
died_at=$(awk -v a="$STARTED_MICROS" -v b="$death_micros" 'BEGIN { printf "%.2f", (b - a) / 1e6 }')
ratio=$(awk -v s="$seconds" -v i="$IDEAL" 'BEGIN { printf "%.2f", s / i }')
if ((lost > 0)); then
    echo "FAIL: $lost SMS lost" >&2
    failed=1
fi
if ((duplicates > WINDOW)); then
    echo "FAIL: $duplicates duplicates, more than the window of $WINDOW a crash could explain" >&2
    failed=1
fi
OUTCOMES=$(gateway_outcomes)
CARRIER_METRICS=$(curl -sf "http://$ADMIN_ADDR/metrics" | awk '
    /^otpgate_(sms_retries_total|sms_failovers_total|carrier_circuit_state)[{ ]/ && $NF != 0 {
        print "  " $0
    }')

echo
echo "$COUNT SMS, two HTTP/$HTTP_VERSION carriers paced at $PACE/s each, window $WINDOW," \
    "answering after $LATENCY_MS ms; alpha dies on accepting SMS number $DIE_AFTER"
printf '%-44s %s\n' \
    "SMS created by the gateway" "$CREATED" \
    "accepted by alpha before it died" "$alpha_accepted (died: $alpha_died, at $died_at s)" \
    "accepted by beta" "$beta_accepted" \
    "distinct across both" "$distinct" \
    "lost" "$lost (target 0)" \
    "duplicates" "$duplicates (both carriers: $both, twice by one: $twice)" \
    "beta resent them after" "$resend_min_ms to $resend_max_ms ms (from alpha's accept; -1: none)" \
    "held unanswered by alpha when it died" \
    "$unanswered to $unanswered_max (accepted within $LATENCY_MS to $((LATENCY_MS + 2)) ms of its death)" \
    "time, first start to last accept" "$seconds s (ideal $IDEAL s, ratio $ratio)"
echo "gateway counters (non-zero):"
echo "$OUTCOMES"
echo "$CARRIER_METRICS"
stop_pid "$GATEWAY_PID"
stop_pid "$BETA_PID"
exit "$failed"

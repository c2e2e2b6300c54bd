#!/usr/bin/env bash
# Redis back-end benchmark (the redis back-end issue): API throughput on Redis against the
# embedded back-end, and two instances sharing one Redis against one instance.
#
# wrk drives POST /v1/verifications, a new valid phone number every request, over keep-alive
# connections, in three runs on one machine, one after the other, each with a fresh loadgen sink
# (a fast fake HTTP carrier) as the gateway's only carrier:
#   1. one gateway on the embedded back-end;
#   2. one gateway on the redis back-end, on a fresh redis-server;
#   3. two gateways with the same configuration (each its own ports) on one fresh redis-server.
# Every run uses the same client: two wrk processes, one thread and half the connections each,
# both aimed at the one gateway in runs 1 and 2 and one at each gateway in run 3, so that the
# client side is the same in all three. Each wrk process numbers its phones from its own block,
# so no two requests share a number and the per-phone limit never refuses.
# The redis-server is started by this script on a free loopback port, in the work directory,
# without persistence (--save "" --appendonly no), and stopped when the run ends.
#
# It prints requests/s (the sum over the two wrk processes), p50 and p99 (the worse of the two),
# non-2xx answers and socket errors for each run; the ratio redis/embedded (target >= 0.4); and
# the ratio two instances / one instance. The machine is shared, so only the ratios of runs made
# side by side mean much; on a machine of few cores, wrk, the sink, redis-server and the gateways
# share them, so a second instance has no core of its own, and the scaling ratio says so.
# After each run it waits until the sink has received as many SMS as the gateways created
# verifications (or nothing has moved for STALL_SECS, 10 s, or 120 s have passed), and, on Redis,
# until the SMS streams (otp:{G}:q:<lane>, whose entries are deleted once sent) are empty, for up
# to 10 s more.
# It exits non-zero if any request failed, any SMS had not reached the sink by the end of the wait
# or reached it twice or malformed, or a stream was left with entries in it.
#
# Settings, from the environment: DURATION (default 10s), CONNECTIONS (64, split over the two wrk
# processes), STALL_SECS (10), SKIP_BUILD (set it to reuse the release binaries),
# KEEP_WORK_DIR (set it to keep the logs: the gateways' NAME.err, redis-PORT.log, wrk-NAME-I.txt).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
TARGET_RATIO=0.4
# How long the SMS streams on Redis may take to empty once the wait for the sink has ended.
DRAIN_SECS=10
# The longest a wait for the sink may take, however slowly it keeps moving.
SINK_WAIT_MAX_SECS=120

((CONNECTIONS >= 2)) || die "CONNECTIONS must be at least 2 (it is split over two wrk processes)"

# Starts a fresh redis-server on a free loopback port, stopping the one started before if any,
# waits until it answers PING, and sets REDIS_PID and REDIS_PORT.
REDIS_PID=""
start_redis() {
    if [[ -n "$REDIS_PID" ]]; then
        stop_pid "$REDIS_PID"
    fi
    free_port
    REDIS_PORT=$FREE_PORT
    redis-server --save "" --appendonly no --port "$REDIS_PORT" --bind 127.0.0.1 \
        --daemonize no --dir "$WORK_DIR" >"$WORK_DIR/redis-$REDIS_PORT.log" 2>&1 &
    REDIS_PID=$!
    STARTED_PIDS+=("$REDIS_PID")
    for _ in $(seq 1 100); do
        if [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; then
            return
        fi
        if ! kill -0 "$REDIS_PID" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    tail -n 20 "$WORK_DIR/redis-$REDIS_PORT.log" >&2
    die "redis-server did not answer PING on port $REDIS_PORT within 10 s"
}

# Waits up to DRAIN_SECS for the SMS streams to empty and sets BACKLOG to what is left in them.
wait_for_backlog() {
    local deadline=$((SECONDS + DRAIN_SECS))
    while true; do
        BACKLOG=$(redis_backlog)
        if ((BACKLOG == 0 || SECONDS >= deadline)); then
            return
        fi
        sleep 0.2
    done
}

# A secret shared by every redis instance of the run, as the redis back-end requires.
SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')

# Starts one gateway on free ports sending to the sink at SINK_ADDR, on back-end STORE ("embedded",
# or "redis" on the redis-server at REDIS_PORT), waits until it is ready, and appends its PID and
# addresses to GW_PIDS, GW_ADDRS and GW_ADMINS. Its configuration is NAME.toml in the work
# directory and its logs NAME.out and NAME.err.
# Usage: start_instance NAME STORE SINK_ADDR
start_instance() {
    local name=$1 store=$2 sink_addr=$3
    free_port
    GATEWAY_ADDR="127.0.0.1:$FREE_PORT"
    free_port
    ADMIN_ADDR="127.0.0.1:$FREE_PORT"
    local config="$WORK_DIR/$name.toml"
    write_gateway_config "$WORK_DIR/$name.base.toml" "$GATEWAY_ADDR" "$ADMIN_ADDR" "$sink_addr"
    if [[ "$store" == redis ]]; then
        # Top-level keys go before the base's first table, [redis] after its carriers.
        {
            printf 'store = "redis"\nsecret = "%s"\n\n' "$SECRET"
            cat "$WORK_DIR/$name.base.toml"
            printf '\n[redis]\nurl = "redis://127.0.0.1:%s/"\n' "$REDIS_PORT"
        } >"$config"
    else
        cp "$WORK_DIR/$name.base.toml" "$config"
    fi
    run_gateway "$config"
    # run_gateway logs every gateway to gateway.out and gateway.err; this one goes on writing to
    # the files it has open under their new names, and the next one gets files of its own.
    mv "$WORK_DIR/gateway.out" "$WORK_DIR/$name.out"
    mv "$WORK_DIR/gateway.err" "$WORK_DIR/$name.err"
    GW_PIDS+=("$GATEWAY_PID")
    GW_ADDRS+=("$GATEWAY_ADDR")
    GW_ADMINS+=("$ADMIN_ADDR")
}

# Writes, for wrk process I (0 or 1), a wrk script that is bench/verifications.lua with its
# threads numbered from I, so that its phones come from block I and never meet the other's.
# Usage: write_wrk_script I
write_wrk_script() {
    cat >"$WORK_DIR/verifications-$1.lua" <<LUA
-- bench/verifications.lua with its wrk threads numbered from $1 (written by bench/redis.sh).
dofile("$BENCH_DIR/verifications.lua")
local numbered_setup = setup
function setup(thread)
  numbered_setup(thread)
  thread:set("thread_id", thread:get("thread_id") + $1)
end
LUA
}
write_wrk_script 0
write_wrk_script 1

# Runs two wrk processes at once, one thread and half the connections each, the first against
# the first gateway of GW_ADDRS and the second against the last (the same one when there is
# one), and sets RPS (the sum of their requests/s), P50_MS and P99_MS (the worse of the two),
# N_REQUESTS, N_NON_2XX and N_SOCKET_ERRORS (sums) from the lines their Lua scripts print.
# Usage: run_wrk NAME
run_wrk() {
    local name=$1
    local -a conns=($((CONNECTIONS / 2)) $((CONNECTIONS - CONNECTIONS / 2)))
    local -a addrs=("${GW_ADDRS[0]}" "${GW_ADDRS[-1]}")
    local -a pids=()
    local i
    say "2 x wrk -t1 -c${conns[0]}/-c${conns[1]} -d$DURATION against $name (${addrs[*]})"
    for i in 0 1; do
        wrk -t1 "-c${conns[i]}" "-d$DURATION" -s "$WORK_DIR/verifications-$i.lua" \
            "http://${addrs[i]}/v1/verifications" >"$WORK_DIR/wrk-$name-$i.txt" &
        pids+=("$!")
        STARTED_PIDS+=("$!")
    done
    for i in 0 1; do
        wait "${pids[i]}" || die "wrk $i against $name failed: $(cat "$WORK_DIR/wrk-$name-$i.txt")"
    done
    RPS=0 P50_MS=0 P99_MS=0 N_REQUESTS=0 N_NON_2XX=0 N_SOCKET_ERRORS=0
    local result requests duration_us p50_us p99_us
    # Reads one key=value field of the result line.
    field() { echo "$result" | tr ' ' '\n' | awk -F= -v key="$1" '$1 == key { print $2 }'; }
    for i in 0 1; do
        result=$(grep '^wrk-result ' "$WORK_DIR/wrk-$name-$i.txt") ||
            die "wrk $i against $name printed no result"
        requests=$(field requests)
        duration_us=$(field duration_us)
        p50_us=$(field p50_us)
        p99_us=$(field p99_us)
        N_REQUESTS=$((N_REQUESTS + requests))
        RPS=$(awk -v sum="$RPS" -v n="$requests" -v us="$duration_us" \
            'BEGIN { printf "%.0f", sum + n / (us / 1e6) }')
        P50_MS=$(awk -v worst="$P50_MS" -v us="$p50_us" \
            'BEGIN { ms = us / 1000; printf "%.2f", (ms > worst) ? ms : worst }')
        P99_MS=$(awk -v worst="$P99_MS" -v us="$p99_us" \
            'BEGIN { ms = us / 1000; printf "%.2f", (ms > worst) ? ms : worst }')
        N_NON_2XX=$((N_NON_2XX + $(field status)))
        N_SOCKET_ERRORS=$((N_SOCKET_ERRORS + $(field connect) + $(field read) + $(field write) + $(field timeout)))
    done
}

# Prints the verifications all the gateways of GW_ADMINS created, each of which sends one SMS.
# shellcheck disable=SC2317  # called through CREATED_FN
created_total() {
    local admin total=0 created
    for admin in "${GW_ADMINS[@]}"; do
        created=$(ADMIN_ADDR=$admin gateway_created)
        total=$((total + created))
    done
    echo "$total"
}

# Prints, for each gateway NAME, how many WARN and ERROR lines it logged and the most frequent of
# them (timestamp dropped, ids of 16 hex digits or more masked), leaving out the warning every
# benchmark gateway logs at start-up that no API keys are configured (it listens on loopback).
# Usage: gateway_log_problems NAME...
gateway_log_problems() {
    local name lines
    for name in "$@"; do
        lines=$(grep -E '^[^ ]+ +(WARN|ERROR) ' "$WORK_DIR/$name.err" |
            grep -v 'NO API KEYS CONFIGURED' | sed -E 's/^[^ ]+ +//; s/=[0-9a-f]{16,}/=<id>/g' || true)
        if [[ -z "$lines" ]]; then
            echo "  $name: no WARN or ERROR lines"
            continue
        fi
        echo "  $name: $(wc -l <<<"$lines") WARN/ERROR lines, the most frequent:"
        sort <<<"$lines" | uniq -c | sort -rn | awk 'NR <= 6' | cut -c 1-250 | sed 's/^/  /'
    done
}

ensure_wrk
ensure_redis
build_release
# Other work on the machine skews every run; the load average says how quiet it was.
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"
for binary in otpgate loadgen; do
    [[ -x "$BIN/$binary" ]] || die "$BIN/$binary is missing; build it or unset SKIP_BUILD"
done

declare -A R_RPS R_P50 R_P99 R_NON_2XX R_SOCKET R_SINK R_BACKLOG R_OUTCOMES R_LOGS
RUNS=(embedded redis-1 redis-2)
declare -A LABEL=(
    [embedded]="embedded, 1 instance"
    [redis-1]="redis, 1 instance"
    [redis-2]="redis, 2 instances"
)
failed=0

# One run: STORE ("embedded" or "redis") with INSTANCES (1 or 2) gateways; sets the R_* results
# of run NAME.
# Usage: measure NAME STORE INSTANCES
measure() {
    local name=$1 store=$2 instances=$3 i
    GW_PIDS=() GW_ADDRS=() GW_ADMINS=()
    if [[ "$store" == redis ]]; then
        start_redis
    fi
    start_loadgen_server "sink-$name" sink --worker-threads 1
    local sink_addr=$LOADGEN_ADDR sink_pid=${STARTED_PIDS[-1]}
    local -a names=()
    for ((i = 1; i <= instances; i++)); do
        names+=("gateway-$name-$i")
        start_instance "gateway-$name-$i" "$store" "$sink_addr"
    done
    run_wrk "$name"
    R_RPS[$name]=$RPS R_P50[$name]=$P50_MS R_P99[$name]=$P99_MS
    R_NON_2XX[$name]=$N_NON_2XX R_SOCKET[$name]=$N_SOCKET_ERRORS
    say "waiting for the queue to drain to the sink"
    CREATED_FN=created_total wait_for_sink "$sink_addr"
    # One reading of the sink's counters, so that they agree with each other.
    local stats distinct bad
    stats=$(curl -sf "http://$sink_addr/stats")
    DELIVERED=$(jq -r .received <<<"$stats")
    distinct=$(jq -r .distinct_message_ids <<<"$stats")
    bad=$(jq -r .bad_requests <<<"$stats")
    R_SINK[$name]="$DELIVERED of $ACCEPTED accepted, after waiting ${WAITED} s (distinct message ids $distinct, bad requests $bad; wrk counted $((N_REQUESTS - N_NON_2XX)) 2xx answers and does not count requests in flight when it stops)"
    if ((N_NON_2XX + N_SOCKET_ERRORS > 0)); then
        echo "FAIL: requests failed (${LABEL[$name]}): non-2xx $N_NON_2XX, socket errors $N_SOCKET_ERRORS" >&2
        failed=1
    fi
    if ((ACCEPTED == 0 || DELIVERED != ACCEPTED || distinct != ACCEPTED || bad > 0)); then
        echo "FAIL: SMS missing at the sink after the wait, duplicated or malformed (${LABEL[$name]}): ${R_SINK[$name]}" >&2
        failed=1
    fi
    R_BACKLOG[$name]="-"
    if [[ "$store" == redis ]]; then
        say "waiting up to $DRAIN_SECS s for the SMS streams on Redis to empty"
        wait_for_backlog
        R_BACKLOG[$name]=$BACKLOG
        R_SINK[$name]+="; $(sink_stat "$sink_addr" received) once the streams were checked"
        if ((BACKLOG != 0)); then
            echo "FAIL: $BACKLOG entries left in the SMS streams on Redis (${LABEL[$name]})" >&2
            failed=1
        fi
    fi
    R_OUTCOMES[$name]=""
    for i in "${!GW_ADMINS[@]}"; do
        R_OUTCOMES[$name]+="  ${names[i]}:"$'\n'"$(ADMIN_ADDR=${GW_ADMINS[i]} gateway_outcomes | sed 's/^/  /')"$'\n'
    done
    R_LOGS[$name]=$(gateway_log_problems "${names[@]}")
    for i in "${!GW_PIDS[@]}"; do
        stop_pid "${GW_PIDS[i]}"
    done
    stop_pid "$sink_pid"
}

measure embedded embedded 1
measure redis-1 redis 1
measure redis-2 redis 2
stop_pid "$REDIS_PID"

RATIO_REDIS=$(awk -v a="${R_RPS[redis-1]}" -v b="${R_RPS[embedded]}" 'BEGIN { printf "%.3f", a / b }')
RATIO_SCALE=$(awk -v a="${R_RPS[redis-2]}" -v b="${R_RPS[redis-1]}" 'BEGIN { printf "%.3f", a / b }')
MET=$(awk -v r="$RATIO_REDIS" -v t="$TARGET_RATIO" 'BEGIN { print (r >= t) ? "met" : "NOT met" }')

echo
echo "POST /v1/verifications, every run driven by 2 wrk processes (-t1 -c$((CONNECTIONS / 2)) and" \
    "-c$((CONNECTIONS - CONNECTIONS / 2)), -d$DURATION), each gateway sending to its run's loadgen sink"
printf '%-22s %11s %10s %10s %8s %9s %8s\n' run requests/s p50 p99 non-2xx sock-err backlog
for name in "${RUNS[@]}"; do
    printf '%-22s %11s %7s ms %7s ms %8s %9s %8s\n' "${LABEL[$name]}" "${R_RPS[$name]}" \
        "${R_P50[$name]}" "${R_P99[$name]}" "${R_NON_2XX[$name]}" "${R_SOCKET[$name]}" \
        "${R_BACKLOG[$name]}"
done
echo "(p50 and p99: the worse of the two wrk processes; backlog: entries left in the SMS streams"
echo " on Redis once the wait for the sink ended and up to $DRAIN_SECS s more had passed)"
echo "redis / embedded, 1 instance each:  $RATIO_REDIS  (target >= $TARGET_RATIO: $MET)"
echo "2 instances / 1 instance on Redis:  $RATIO_SCALE"
echo "  This machine has $(nproc) cores, shared by the 2 wrk processes, the sink, redis-server and"
echo "  the gateway(s), so a second instance gets no core of its own: the scaling ratio measures"
echo "  contention on this machine, not what a second instance adds on a machine of its own."
for name in "${RUNS[@]}"; do
    echo "SMS at sink (${LABEL[$name]}): ${R_SINK[$name]}"
done
for name in "${RUNS[@]}"; do
    echo "gateway counters (non-zero), ${LABEL[$name]}:"
    printf '%s' "${R_OUTCOMES[$name]}"
done
echo "gateway logs:"
for name in "${RUNS[@]}"; do
    echo "${R_LOGS[$name]}"
done
echo "load average after the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"
exit "$failed"

#!/usr/bin/env bash
# Chaos benchmark (issue 15): three gateways on one Redis with append-only persistence, a
# sustained load of verifications, a `kill -9` of a random gateway every few seconds and one
# `kill -9` of Redis mid-run; then every SMS the gateways accepted must reach the carrier (none
# lost), and duplicates may only be what the killed gateways had in flight.
#
# Each case (PROTOCOL: `http`, `smpp`, or `both`, the default, one after the other) starts:
# - one redis-server on a free loopback port, in its own directory of the work directory, with
#   `--appendonly yes --appendfsync APPENDFSYNC` (everysec) and no RDB snapshots. Redis writes
#   every change to the AOF (the kernel's page cache) before it answers, and fsyncs it once a
#   second: a `kill -9` of the process loses nothing the gateways were told, only a crash of the
#   machine could lose up to a second, which `always` would close at the cost of an fsync per
#   write. This benchmark kills processes, not the machine, so everysec is the realistic setting;
#   APPENDFSYNC=always runs it the other way.
# - one carrier shared by every gateway: `loadgen sink --latency-ms LATENCY_MS` (HTTP; it lists
#   every SMS at /ids by the gateway's message id, `<verification id>.<send number>`) or
#   `loadgen smsc --latency-ms LATENCY_MS --messages-file …` (SMPP; one bind per gateway; the
#   file lists the destination of every whole message);
# - INSTANCES (3) gateways on the redis back-end with the same configuration (the same secret,
#   `claim_after_secs = CLAIM_AFTER_SECS`, one carrier with a window of WINDOW and no pace cap),
#   each on its own API and admin ports.
# The load: bench/chaos_load.py starts COUNT (10,000) verifications, distinct numbers, at RATE
# (250) a second, start I first to gateway I mod INSTANCES; a start that gets no answer or a
# 5xx/429/409 is sent again to the next gateway with the same Idempotency-Key (so a retry never
# makes a second verification), for up to 60 s. A start is accepted when answered 202.
# The chaos, while the load runs: every CHAOS_SECS (3) seconds a random gateway is killed with
# SIGKILL and started again DOWN_SECS (1) later on the same ports; once, as soon as half the starts
# were accepted, redis-server is killed with SIGKILL instead and started again REDIS_DOWN_SECS (2)
# later on the same port and directory, reloading its AOF.
# Then, without chaos, it waits until every accepted verification's SMS reached the carrier and
# the SMS streams on Redis are empty (an entry is deleted once sent, so a job a dead gateway held
# is still there until another took it over after CLAIM_AFTER_SECS and sent it), or until
# nothing moved for STALL_SECS (20), or DRAIN_MAX_SECS (180) passed.
#
# It prints, per case: starts accepted (and failed, retried, replayed), how long a start took
# with its retries (p50, p99, the slowest), SMS delivered (distinct
# verifications, or numbers on SMPP), lost (accepted starts whose SMS never arrived; target 0),
# SMS for starts not counted accepted, duplicates (SMS beyond the first per verification or
# number) against their bound, the kills and the Redis restart, the jobs taken over from dead
# gateways (from the gateways' logs), what was left in the streams, and the times.
# The bound on duplicates: a gateway records that a carrier accepted an SMS in the same call
# that acknowledges its job, so the only SMS sent twice are those a gateway had submitted and not
# yet recorded when it was killed: at most its carrier window, WINDOW. The jobs it had read from
# Redis but not submitted were never sent; whoever takes them over sends them once. So the bound
# is kills x WINDOW; the Redis restart adds none (gateways retry recording an answer until Redis
# is back, and it is back long before CLAIM_AFTER_SECS lets anyone take over a live gateway's
# jobs).
# It exits non-zero if an SMS was lost, if there are more duplicates than the bound, if no gateway
# was killed or Redis was not restarted, or if a start was refused outright.
#
# Settings, from the environment: PROTOCOL (both), COUNT (10000), RATE (250), CONCURRENCY (32),
# INSTANCES (3), CHAOS_SECS (3), DOWN_SECS (1), REDIS_DOWN_SECS (2), CLAIM_AFTER_SECS (5),
# WINDOW (32), LATENCY_MS (20), APPENDFSYNC (everysec), STALL_SECS (20), DRAIN_MAX_SECS (180),
# SEED (random; fixes the choice of gateways to kill), SKIP_BUILD, KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROTOCOL=${PROTOCOL:-both}
COUNT=${COUNT:-10000}
RATE=${RATE:-250}
CONCURRENCY=${CONCURRENCY:-32}
INSTANCES=${INSTANCES:-3}
CHAOS_SECS=${CHAOS_SECS:-3}
DOWN_SECS=${DOWN_SECS:-1}
REDIS_DOWN_SECS=${REDIS_DOWN_SECS:-2}
CLAIM_AFTER_SECS=${CLAIM_AFTER_SECS:-5}
WINDOW=${WINDOW:-32}
LATENCY_MS=${LATENCY_MS:-20}
APPENDFSYNC=${APPENDFSYNC:-everysec}
STALL_SECS=${STALL_SECS:-20}
DRAIN_MAX_SECS=${DRAIN_MAX_SECS:-180}
SEED=${SEED:-$RANDOM}
SYSTEM_ID=bench
PASSWORD=secret
RANDOM=$SEED

case "$PROTOCOL" in
    both) CASES=(http smpp) ;;
    http | smpp) CASES=("$PROTOCOL") ;;
    *) die "PROTOCOL must be http, smpp or both" ;;
esac
case "$APPENDFSYNC" in
    everysec | always) ;;
    *) die "APPENDFSYNC must be everysec or always" ;;
esac
((INSTANCES >= 2)) || die "INSTANCES must be at least 2 (one is always up)"
((COUNT >= 1 && CHAOS_SECS >= 1 && WINDOW >= 1)) || die "COUNT, CHAOS_SECS and WINDOW must be positive"
# The load may take COUNT / RATE seconds and a minute more for the retries of the last starts.
LOAD_DEADLINE_SECS=$(awk -v n="$COUNT" -v r="$RATE" 'BEGIN { d = n / r + 120; print (d > 1800) ? 1800 : int(d) }')

command -v jq >/dev/null || apt_install jq
command -v python3 >/dev/null || apt_install python3
ensure_redis
build_release
for binary in otpgate loadgen; do
    [[ -x "$BIN/$binary" ]] || die "$BIN/$binary is missing; build it or unset SKIP_BUILD"
done
say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"

# A secret shared by every gateway, as the redis back-end requires.
SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')

# Stops tracking a PID this script started and has reaped, so that the clean-up on exit never
# signals a process that later got the same PID.
forget_pid() {
    local pid kept=()
    for pid in "${STARTED_PIDS[@]}"; do
        [[ "$pid" == "$1" ]] || kept+=("$pid")
    done
    STARTED_PIDS=("${kept[@]}")
}

# Kills a process this script started with SIGKILL, reaps it and forgets it.
kill_hard() {
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# Starts redis-server on REDIS_PORT with its data in REDIS_DIR (the AOF is reloaded from there on
# a restart), appending to its log, and waits until it answers PING (not LOADING); sets REDIS_PID.
run_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" --daemonize no \
        --save "" --appendonly yes --appendfsync "$APPENDFSYNC" \
        >>"$REDIS_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    STARTED_PIDS+=("$REDIS_PID")
    for _ in $(seq 1 300); do
        if [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; then
            return
        fi
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.05
    done
    tail -n 20 "$REDIS_DIR/redis.log" >&2
    die "redis-server did not answer PING on port $REDIS_PORT within 15 s"
}

# Writes gateway I's configuration for the current case to GW_CONFIG[I], on new free ports.
# Usage: write_instance_config I
write_instance_config() {
    local i=$1 api admin base="$WORK_DIR/$CASE-gateway-$1.base.toml"
    free_port
    api="127.0.0.1:$FREE_PORT"
    free_port
    admin="127.0.0.1:$FREE_PORT"
    GW_API[i]=$api
    GW_ADMIN[i]=$admin
    GW_CONFIG[i]="$WORK_DIR/$CASE-gateway-$i.toml"
    if [[ "$CASE" == http ]]; then
        PACE=1000000 write_gateway_config "$base" "$api" "$admin" "$CARRIER_ADDR"
    else
        {
            gateway_config_base "$api" "$admin"
            cat <<TOML

[[carriers]]
name = "smsc"
kind = "smpp"
host = "127.0.0.1"
port = ${CARRIER_ADDR##*:}
system_id = "$SYSTEM_ID"
password = "$PASSWORD"
binds = 1
window = $WINDOW
pace_per_sec = 1000000
timeout_ms = 5000
TOML
        } >"$base"
    fi
    # Top-level keys go before the base's first table, [redis] after its carriers.
    {
        printf 'store = "redis"\nsecret = "%s"\n\n' "$SECRET"
        cat "$base"
        printf '\n[redis]\nurl = "redis://127.0.0.1:%s/"\nclaim_after_secs = %s\n' \
            "$REDIS_PORT" "$CLAIM_AFTER_SECS"
    } >"${GW_CONFIG[i]}"
}

# Starts gateway I on its configuration (its log appended to across restarts) and waits until
# its /readyz answers 200; sets GW_PID[I].
# Usage: start_instance I
start_instance() {
    local i=$1 log="$WORK_DIR/$CASE-gateway-$1.err"
    echo "=== started at $(date -u +%T.%N)" >>"$log"
    "$BIN/otpgate" --config "${GW_CONFIG[i]}" >>"$WORK_DIR/$CASE-gateway-$i.out" 2>>"$log" &
    GW_PID[i]=$!
    STARTED_PIDS+=("${GW_PID[i]}")
    for _ in $(seq 1 300); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' "http://${GW_ADMIN[i]}/readyz") == 200 ]]; then
            return
        fi
        if ! kill -0 "${GW_PID[i]}" 2>/dev/null; then
            tail -n 20 "$log" >&2
            die "gateway $i exited during start-up"
        fi
        sleep 0.1
    done
    tail -n 20 "$log" >&2
    die "gateway $i was not ready after 30 s"
}

# Writes what the carrier received so far to DELIVERED_FILE, one `UNIX_MICROS KEY` line per SMS,
# where KEY is what an accepted start is matched by: the verification id (HTTP: the message id
# without its `.<send number>`) or the destination number (SMPP).
collect_delivered() {
    if [[ "$CASE" == http ]]; then
        curl -sf "http://$CARRIER_ADDR/ids" | awk '{ sub(/\.[0-9]+$/, "", $2); print $1, $2 }' \
            >"$DELIVERED_FILE" || die "the sink stopped answering"
    else
        cp "$MESSAGES_FILE" "$DELIVERED_FILE"
    fi
}

# Compares DELIVERED_FILE with the accepted starts and prints
# `delivered lost sms distinct duplicates extra last_micros`: accepted starts with an SMS, accepted
# starts without one, SMS received, distinct keys among them, SMS beyond the first per key, keys
# of no accepted start, and when the last SMS arrived.
compare_delivered() {
    awk -v field="$([[ "$CASE" == http ]] && echo 3 || echo 2)" '
        # SMPP destinations may come without the "+" of E.164.
        FNR == NR { sub(/^\+/, "", $field); accepted[$field] = 1; n_accepted++; next }
        {
            sub(/^\+/, "", $2)
            sms++
            if ($1 > last) last = $1
            if (!($2 in seen)) { seen[$2] = 1; distinct++; if ($2 in accepted) delivered++; else extra++ }
        }
        END {
            printf "%d %d %d %d %d %d %.0f\n", delivered, n_accepted - delivered, sms, distinct,
                sms - distinct, extra, last
        }' "$ACCEPTED_FILE" "$DELIVERED_FILE"
}

# Kills gateway I with SIGKILL, waits DOWN_SECS and starts it again on the same ports.
# Usage: chaos_kill I
chaos_kill() {
    local i=$1
    say "$CASE: kill -9 gateway $i (pid ${GW_PID[i]}) at $((SECONDS - LOAD_STARTED)) s"
    kill_hard "${GW_PID[i]}"
    KILLS=$((KILLS + 1))
    KILLS_OF[i]=$((KILLS_OF[i] + 1))
    sleep "$DOWN_SECS"
    start_instance "$i"
}

# Kills redis-server with SIGKILL, waits REDIS_DOWN_SECS and starts it again on the same port and
# directory; sets REDIS_RESTART to what happened.
chaos_redis() {
    local at=$((SECONDS - LOAD_STARTED)) accepted=$1 before after
    say "$CASE: kill -9 redis-server (pid $REDIS_PID) at $at s, $accepted starts accepted"
    before=$(date +%s%N)
    kill_hard "$REDIS_PID"
    sleep "$REDIS_DOWN_SECS"
    run_redis
    after=$(date +%s%N)
    REDIS_RESTART="killed at $at s (after $accepted accepted starts), answering again after $(
        awk -v a="$before" -v b="$after" 'BEGIN { printf "%.2f", (b - a) / 1e9 }') s"
}

# Sums the jobs the gateways' logs say they took over from another (dead) gateway, and counts
# the take-overs: prints `jobs times`.
takeovers() {
    cat "$WORK_DIR/$CASE"-gateway-*.err | awk '
        /took over SMS jobs/ { times++; for (i = 1; i <= NF; i++) if ($i ~ /^jobs=/) { sub(/^jobs=/, "", $i); jobs += $i } }
        END { printf "%d %d\n", jobs, times }'
}

declare -A R
failed=0

# One case: everything started, loaded, shaken and checked; sets R[CASE,*].
# Usage: run_case http|smpp
run_case() {
    CASE=$1
    local i
    GW_API=() GW_ADMIN=() GW_CONFIG=() GW_PID=() KILLS_OF=()
    KILLS=0
    REDIS_RESTART=""
    free_port
    REDIS_PORT=$FREE_PORT
    REDIS_DIR="$WORK_DIR/$CASE-redis"
    mkdir -p "$REDIS_DIR"
    run_redis
    local carrier_pid
    if [[ "$CASE" == http ]]; then
        start_loadgen_server "$CASE-sink" sink --worker-threads 1 --latency-ms "$LATENCY_MS"
    else
        MESSAGES_FILE="$WORK_DIR/$CASE-messages.txt"
        start_loadgen_server "$CASE-smsc" smsc --system-id "$SYSTEM_ID" --password "$PASSWORD" \
            --capacity-per-sec 1000000 --latency-ms "$LATENCY_MS" --duration-secs 3600 \
            --messages-file "$MESSAGES_FILE"
    fi
    CARRIER_ADDR=$LOADGEN_ADDR
    carrier_pid=${STARTED_PIDS[-1]}
    local targets=()
    for ((i = 0; i < INSTANCES; i++)); do
        KILLS_OF[i]=0
        write_instance_config "$i"
        start_instance "$i"
        targets+=(--target "http://${GW_API[i]}")
    done

    ACCEPTED_FILE="$WORK_DIR/$CASE-accepted.txt"
    DELIVERED_FILE="$WORK_DIR/$CASE-delivered.txt"
    local progress="$WORK_DIR/$CASE-progress.txt"
    echo 0 >"$progress"
    say "$CASE: $COUNT verifications at $RATE/s over $INSTANCES gateways on Redis (appendfsync" \
        "$APPENDFSYNC); a gateway killed every $CHAOS_SECS s, Redis once mid-run (seed $SEED)"
    local started_micros=$(($(date +%s%N) / 1000))
    LOAD_STARTED=$SECONDS
    python3 "$BENCH_DIR/chaos_load.py" "${targets[@]}" --count "$COUNT" --rate "$RATE" \
        --concurrency "$CONCURRENCY" --run "$CASE-$SEED" --deadline "$LOAD_DEADLINE_SECS" \
        --ids "$ACCEPTED_FILE" --progress "$progress" \
        >"$WORK_DIR/$CASE-load.json" 2>"$WORK_DIR/$CASE-load.err" &
    local load_pid=$!
    STARTED_PIDS+=("$load_pid")
    local next=$((SECONDS + CHAOS_SECS)) accepted
    # The driver is bounded by its own deadline; this loop by the driver and a margin.
    while kill -0 "$load_pid" 2>/dev/null && ((SECONDS - LOAD_STARTED < LOAD_DEADLINE_SECS + 30)); do
        sleep 0.2
        ((SECONDS >= next)) || continue
        accepted=$(cat "$progress")
        if [[ -z "$REDIS_RESTART" ]] && ((accepted * 2 >= COUNT)); then
            chaos_redis "$accepted"
        else
            chaos_kill $((RANDOM % INSTANCES))
        fi
        next=$((SECONDS + CHAOS_SECS))
    done
    local load_status=0
    wait "$load_pid" || load_status=$?
    forget_pid "$load_pid"
    local load_secs=$((SECONDS - LOAD_STARTED))
    local load
    load=$(tail -n 1 "$WORK_DIR/$CASE-load.json")
    jq -e .accepted <<<"$load" >/dev/null 2>&1 ||
        die "$CASE: the load driver printed no summary (exit $load_status): $(tail -n 5 "$WORK_DIR/$CASE-load.err")"
    local n_accepted
    n_accepted=$(jq -r .accepted <<<"$load")

    say "$CASE: load done ($n_accepted accepted); waiting for every SMS and for empty streams"
    local drain_started=$SECONDS stalled_since=$SECONDS last="" delivered lost sms distinct dups extra
    local last_micros backlog=-1 state
    while true; do
        collect_delivered
        read -r delivered lost sms distinct dups extra last_micros < <(compare_delivered)
        backlog=$(redis_backlog)
        if ((lost == 0 && backlog == 0)); then
            # A resend still in flight would show up as a duplicate; give it a moment.
            sleep 1
            collect_delivered
            read -r delivered lost sms distinct dups extra last_micros < <(compare_delivered)
            backlog=$(redis_backlog)
            break
        fi
        state="$sms $backlog"
        if [[ "$state" != "$last" ]]; then
            last=$state
            stalled_since=$SECONDS
        elif ((SECONDS - stalled_since >= STALL_SECS)); then
            say "$CASE: nothing moved for $STALL_SECS s: $delivered of $n_accepted delivered, $backlog in the streams"
            break
        fi
        if ((SECONDS - drain_started >= DRAIN_MAX_SECS)); then
            say "$CASE: still not done after $DRAIN_MAX_SECS s: $delivered of $n_accepted delivered"
            break
        fi
        sleep 0.5
    done
    local drain_secs=$((SECONDS - drain_started))

    local smsc_duplicates="-"
    for ((i = 0; i < INSTANCES; i++)); do
        stop_pid "${GW_PID[i]}"
        forget_pid "${GW_PID[i]}"
    done
    stop_pid "$carrier_pid"
    forget_pid "$carrier_pid"
    if [[ "$CASE" == smpp ]]; then
        local summary
        summary=$(tail -n 1 "$WORK_DIR/$CASE-smsc.out")
        smsc_duplicates=$(jq -r .duplicates <<<"$summary" 2>/dev/null || echo "?")
        # The simulator writes every message it got before printing its summary: count again.
        collect_delivered
        read -r delivered lost sms distinct dups extra last_micros < <(compare_delivered)
        grep -h 'messages file lists' "$WORK_DIR/$CASE-smsc.err" >&2 || true
    fi
    stop_pid "$REDIS_PID"
    forget_pid "$REDIS_PID"

    local bound=$((KILLS * WINDOW)) jobs_taken times_taken total_secs
    read -r jobs_taken times_taken < <(takeovers)
    total_secs=$(awk -v a="$started_micros" -v b="$last_micros" 'BEGIN { printf "%.1f", (b > a) ? (b - a) / 1e6 : 0 }')
    R[$CASE.accepted]="$n_accepted of $COUNT ($(jq -r '"failed \(.failed) \(.failed_by), retried \(.retried), replayed \(.replayed)"' <<<"$load"))"
    R[$CASE.start_secs]=$(jq -r '"p50 \(.start_secs_p50) s, p99 \(.start_secs_p99) s, slowest \(.slowest_start_secs) s; \(.starts_over_5s) took 5 s or more"' <<<"$load")
    R[$CASE.slow]=$(grep '^slow start' "$WORK_DIR/$CASE-load.err" | head -n 3 | paste -sd ';' || true)
    R[$CASE.attempts]=$(jq -c .attempts_by_outcome <<<"$load")
    R[$CASE.delivered]="$delivered accepted starts got their SMS ($sms SMS received, $distinct distinct $(
        [[ "$CASE" == http ]] && echo verifications || echo numbers))"
    R[$CASE.lost]="$lost (target 0)"
    R[$CASE.extra]=$extra
    R[$CASE.dups]="$dups (bound $KILLS kills x window $WINDOW = $bound)"
    if [[ "$CASE" == smpp ]]; then
        R[$CASE.dups]+="; the simulator counted $smsc_duplicates by destination and text"
    fi
    R[$CASE.kills]="$KILLS ($(for ((i = 0; i < INSTANCES; i++)); do printf 'gateway %d: %d  ' "$i" "${KILLS_OF[i]}"; done))"
    R[$CASE.redis]=${REDIS_RESTART:-"not done (the load ended first)"}
    R[$CASE.takeovers]="$jobs_taken jobs in $times_taken take-overs"
    R[$CASE.backlog]=$backlog
    R[$CASE.time]="load $load_secs s ($(jq -r .elapsed_secs <<<"$load") s in the driver), then $drain_secs s until done; first start to last SMS $total_secs s"

    if ((load_status != 0)) && (($(jq -r .failed <<<"$load") > 0)); then
        echo "FAIL: $CASE: starts failed: $(jq -c .failed_by <<<"$load")" >&2
        failed=1
    fi
    if ((lost > 0)); then
        echo "FAIL: $CASE: $lost accepted starts never got their SMS" >&2
        awk -v f="$([[ "$CASE" == http ]] && echo 3 || echo 2)" '
            FNR == NR { sub(/^\+/, "", $2); got[$2] = 1; next }
            { key = $f; sub(/^\+/, "", key) }
            !(key in got)' "$DELIVERED_FILE" "$ACCEPTED_FILE" | head -n 5 | sed 's/^/  lost: /' >&2
        failed=1
    fi
    if ((dups > bound)); then
        echo "FAIL: $CASE: $dups duplicates, above the bound of $bound" >&2
        failed=1
    fi
    if ((KILLS == 0)); then
        echo "FAIL: $CASE: no gateway was killed" >&2
        failed=1
    fi
    if [[ -z "$REDIS_RESTART" ]]; then
        echo "FAIL: $CASE: Redis was not restarted" >&2
        failed=1
    fi
    if ((backlog != 0)); then
        echo "FAIL: $CASE: $backlog entries left in the SMS streams" >&2
        failed=1
    fi
}

for case_name in "${CASES[@]}"; do
    run_case "$case_name"
done

echo
echo "chaos: $COUNT verifications at $RATE/s over $INSTANCES gateways on one Redis (appendonly," \
    "appendfsync $APPENDFSYNC); kill -9 of a random gateway every $CHAOS_SECS s (down $DOWN_SECS s)," \
    "one kill -9 of Redis (down $REDIS_DOWN_SECS s); window $WINDOW, carrier latency $LATENCY_MS ms," \
    "claim_after_secs $CLAIM_AFTER_SECS, seed $SEED"
for case_name in "${CASES[@]}"; do
    echo "--- $case_name carrier"
    printf '%-30s %s\n' \
        "starts accepted (202)" "${R[$case_name.accepted]}" \
        "attempts by outcome" "${R[$case_name.attempts]}" \
        "start time, retries included" "${R[$case_name.start_secs]}" \
        "slowest starts" "${R[$case_name.slow]:--}" \
        "SMS delivered" "${R[$case_name.delivered]}" \
        "lost" "${R[$case_name.lost]}" \
        "SMS for starts not accepted" "${R[$case_name.extra]}" \
        "duplicated" "${R[$case_name.dups]}" \
        "gateways killed" "${R[$case_name.kills]}" \
        "Redis restart" "${R[$case_name.redis]}" \
        "taken over from dead gateways" "${R[$case_name.takeovers]}" \
        "left in the SMS streams" "${R[$case_name.backlog]}" \
        "time" "${R[$case_name.time]}"
done
echo "load average after the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"
exit "$failed"

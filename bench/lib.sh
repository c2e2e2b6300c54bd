# Helpers shared by the benchmark scripts in this directory; source it, don't run it.
#
# Every process a script starts through these helpers is recorded and stopped by PID on exit,
# and every file goes into one temporary directory that is removed on exit.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR="$ROOT/bench"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
WORK_DIR=$(mktemp -d -t otpgate-bench.XXXXXX)
STARTED_PIDS=()

# Stops every process this script started, then removes the temporary directory.
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "${KEEP_WORK_DIR:-}" ]]; then
        echo "logs kept in $WORK_DIR" >&2
    else
        rm -rf "$WORK_DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Prints a message on stderr and exits non-zero.
die() {
    echo "error: $*" >&2
    exit 1
}

# Prints a progress message on stderr, so stdout holds only results.
say() {
    echo "== $*" >&2
}

# Installs Debian packages, with sudo unless running as root.
# Usage: apt_install PACKAGE...
apt_install() {
    say "installing $*"
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        sudo="sudo"
    fi
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq "$@" >&2
}

# Installs wrk from Debian's packages when it is missing.
ensure_wrk() {
    command -v wrk >/dev/null || apt_install wrk
}

# Builds the release binaries of the gateway and loadgen, unless SKIP_BUILD is set.
build_release() {
    if [[ -n "${SKIP_BUILD:-}" ]]; then
        return
    fi
    say "building release binaries"
    (cd "$ROOT" && cargo build --release -p gateway -p loadgen) >&2
}

# Sets FREE_PORT to a TCP port on 127.0.0.1 that nothing listens on and that this script has not
# handed out before (it sets a variable rather than printing, since a subshell would forget that).
# Another process could still take it before the gateway binds it; the gateway would then fail to
# start, and the script says so.
HANDED_OUT_PORTS=" "
free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if [[ "$HANDED_OUT_PORTS" != *" $port "* ]] && [[ -z $(ss -Htln "sport = :$port") ]]; then
            HANDED_OUT_PORTS+="$port "
            FREE_PORT=$port
            return
        fi
    done
    die "no free port found"
}

# Starts `loadgen SUBCOMMAND` on port 0 and sets LOADGEN_ADDR to the address it prints.
# Usage: start_loadgen_server NAME SUBCOMMAND [FLAG...]
start_loadgen_server() {
    local name=$1 subcommand=$2
    shift 2
    "$BIN/loadgen" "$subcommand" --listen 127.0.0.1:0 "$@" \
        >"$WORK_DIR/$name.out" 2>"$WORK_DIR/$name.err" &
    STARTED_PIDS+=("$!")
    local pid=$!
    for _ in $(seq 1 100); do
        if [[ -s "$WORK_DIR/$name.out" ]]; then
            LOADGEN_ADDR=$(head -n 1 "$WORK_DIR/$name.out" | awk '{ print $3 }')
            return
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    cat "$WORK_DIR/$name.err" >&2
    die "loadgen $subcommand did not start"
}

# Stops a process this script started and waits for it.
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Prints the part of a benchmark gateway configuration every script shares: no auth on
# loopback, no per-IP limit or per-address connection cap (every client is on 127.0.0.1), and a
# queue large enough for any run. Carriers come after it.
# Usage: gateway_config_base LISTEN ADMIN_LISTEN
gateway_config_base() {
    cat <<TOML
listen = "$1"
admin_listen = "$2"
max_connections = 10000
max_connections_per_ip = 0

[verification]
code_ttl_secs = 600

[limits]
phone_sends = [{ max = 1, per_secs = 30 }]
ip_sends = []
failed_checks_per_phone = { max = 100, per_secs = 86400 }
countries = []

[queue]
capacity = 2000000
TOML
}

# Writes a gateway configuration for benchmarks: the shared base and one HTTP carrier (the sink)
# paced far above what the machine can send.
# Usage: write_gateway_config FILE LISTEN ADMIN_LISTEN SINK_ADDR [HTTP_VERSION]
write_gateway_config() {
    {
        gateway_config_base "$2" "$3"
        cat <<TOML

[[carriers]]
name = "sink"
kind = "http"
url = "http://$4/sms"
pace_per_sec = ${PACE:-1000000}
window = ${WINDOW:-256}
timeout_ms = 5000
http_version = "${5:-1.1}"
TOML
    } >"$1"
}

# Starts the gateway with a fresh configuration pointing at the sink at SINK_ADDR,
# waits until /readyz answers 200, and sets GATEWAY_PID, GATEWAY_ADDR and ADMIN_ADDR.
# Usage: start_gateway SINK_ADDR [HTTP_VERSION]
start_gateway() {
    free_port
    GATEWAY_ADDR="127.0.0.1:$FREE_PORT"
    free_port
    ADMIN_ADDR="127.0.0.1:$FREE_PORT"
    local config="$WORK_DIR/otpgate.toml"
    write_gateway_config "$config" "$GATEWAY_ADDR" "$ADMIN_ADDR" "$1" "${2:-1.1}"
    run_gateway "$config"
}

# Starts the gateway with a configuration file the script wrote itself (for one that
# start_gateway's cannot express, such as two carriers), waits until /readyz answers 200 on
# ADMIN_ADDR, and sets GATEWAY_PID. The script sets GATEWAY_ADDR and ADMIN_ADDR (with free_port)
# and writes them into the file as listen and admin_listen.
# Usage: run_gateway CONFIG_FILE
run_gateway() {
    "$BIN/otpgate" --config "$1" >"$WORK_DIR/gateway.out" 2>"$WORK_DIR/gateway.err" &
    GATEWAY_PID=$!
    STARTED_PIDS+=("$GATEWAY_PID")
    for _ in $(seq 1 300); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$ADMIN_ADDR/readyz") == 200 ]]; then
            return
        fi
        if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
            tail -n 20 "$WORK_DIR/gateway.err" >&2
            die "the gateway exited during start-up"
        fi
        sleep 0.1
    done
    tail -n 20 "$WORK_DIR/gateway.err" >&2
    die "the gateway was not ready after 30 s"
}

# Prints the sum of the series of a counter or gauge on the gateway's /metrics whose labels
# contain LABEL (all series when it is omitted), or 0 when there are none.
# Usage: gateway_metric NAME [LABEL]
gateway_metric() {
    curl -sf "http://$ADMIN_ADDR/metrics" | awk -v name="$1" -v label="${2:-}" '
        ($1 == name || index($1, name "{") == 1) && index($1, label) > 0 { sum += $NF }
        END { printf "%.0f\n", sum }'
}

# Prints the mean of a histogram on the gateway's /metrics, in milliseconds, over all its series.
# Usage: gateway_histogram_mean_ms NAME
gateway_histogram_mean_ms() {
    curl -sf "http://$ADMIN_ADDR/metrics" | awk -v name="$1" '
        index($1, name "_sum") == 1 { sum += $NF }
        index($1, name "_count") == 1 { count += $NF }
        END { printf "%.2f\n", (count > 0) ? sum / count * 1000 : 0 }'
}

# Prints, one per line, the non-zero series of the gateway counters that say what happened to
# requests and SMS: answers by status, starts by outcome, submits by outcome, drops and rejections.
gateway_outcomes() {
    curl -sf "http://$ADMIN_ADDR/metrics" | awk '
        /^otpgate_(http_requests|verifications_started|sms_submitted|queue_dropped|queue_rejected|ratelimit_rejections)_total[{ ]/ && $NF != 0 {
            print "  " $0
        }'
}

# Prints one field of the sink's /stats.
# Usage: sink_stat SINK_ADDR FIELD
sink_stat() {
    curl -sf "http://$1/stats" | jq -r ".$2"
}

# Prints the verifications the gateway created, each of which sends one SMS: starts that
# returned an existing verification or replayed an idempotent one send none.
gateway_created() {
    gateway_metric otpgate_verifications_started_total 'outcome="created"'
}

# Waits until the sink has received as many SMS as the gateway created verifications, or until
# the count stops moving for STALL_SECS (default 10), or for SINK_WAIT_MAX_SECS if set, then sets
# ACCEPTED, DELIVERED and WAITED (seconds). CREATED_FN names the function that prints the
# verifications created (default gateway_created; several gateways sum theirs).
# Usage: wait_for_sink SINK_ADDR
wait_for_sink() {
    local stall_secs=${STALL_SECS:-10} last_delivered=-1 stalled_since=$SECONDS
    local created=${CREATED_FN:-gateway_created} started=$SECONDS
    while true; do
        WAITED=$((SECONDS - started))
        ACCEPTED=$("$created")
        DELIVERED=$(sink_stat "$1" received)
        if ((DELIVERED >= ACCEPTED)); then
            # Anything still in flight would show up as a duplicate; give it a moment.
            sleep 1
            ACCEPTED=$("$created")
            DELIVERED=$(sink_stat "$1" received)
            return
        fi
        if ((DELIVERED != last_delivered)); then
            last_delivered=$DELIVERED
            stalled_since=$SECONDS
        elif ((SECONDS - stalled_since >= stall_secs)); then
            say "the sink stopped receiving at $DELIVERED of $ACCEPTED"
            return
        fi
        if [[ -n ${SINK_WAIT_MAX_SECS:-} ]] && ((SECONDS - started >= SINK_WAIT_MAX_SECS)); then
            say "the sink was still receiving after $SINK_WAIT_MAX_SECS s: $DELIVERED of $ACCEPTED"
            return
        fi
        sleep 0.2
    done
}

# Prints a process's resident set size in kB, from /proc.
# Usage: rss_kb PID
rss_kb() {
    awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"
}

# Installs redis-server and redis-cli from Debian's packages when either is missing.
ensure_redis() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        apt_install redis-server redis-tools
    fi
}

# Prints the entries left in the SMS streams on the Redis at REDIS_PORT: the sum of XLEN over the
# keys otp:*:q:* (one stream per hash-tag group and lane; an entry is deleted once its SMS is sent).
redis_backlog() {
    local key len total=0
    while read -r key; do
        [[ -n "$key" ]] || continue
        len=$(redis-cli -p "$REDIS_PORT" XLEN "$key")
        total=$((total + len))
    done < <(redis-cli -p "$REDIS_PORT" --scan --pattern 'otp:*:q:*')
    echo "$total"
}

#!/usr/bin/env bash
# Proves the dashboards and alert rules against what the gateway really exports (run by CI).
#
# 1. promtool: `check config` and `check rules` on dashboards/prometheus/, and the rules' unit
#    tests (`test rules dashboards/prometheus/tests/*.yml`).
# 2. A real run on loopback: the release gateway (its own config in a temp dir, two clients
#    with webhooks, two carriers pointing at the load scenario's simulated carriers and an SMPP
#    carrier whose SMSC is never there, so that its sessions-bound gauge exists), a webhook
#    receiver (`loadgen bare`) for one client (the other's webhook URL refuses connections), a
#    real Prometheus scraping the gateway's admin listener every second with the recording and
#    alert rules loaded, and `loadgen run dashboards/test/scenario.toml --target` (about 50 s).
#    Unauthenticated calls would do on loopback, but the clients (with API keys) give the queue
#    two lanes and the webhook series something to count.
# 3. dashboards/test/check.py: every panel target of dashboards/grafana/otpgate.json, variables
#    filled in, must return data from /api/v1/query; every rule must be healthy and every metric
#    name a rule or panel reads must be in the gateway's /metrics.
#
# Needs: cargo, promtool and prometheus (Debian: apt-get install prometheus), python3, curl.
# Settings from the environment: PROFILE=debug (use the debug binaries, which `cargo test`
# builds; CI does so to save a release build), SKIP_BUILD=1 (use the binaries already built),
# RENDER=FILE.svg (also draw the dashboard of this run), KEEP_WORK_DIR=1 (keep logs and data).
# Every process it starts is stopped on exit; everything listens on 127.0.0.1 only.
set -euo pipefail

DASHBOARDS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$DASHBOARDS/.." && pwd)
PROFILE=${PROFILE:-release}
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
WORK_DIR=$(mktemp -d -t otpgate-dashboards.XXXXXX)
STARTED_PIDS=()
SCRIPT_START=$SECONDS

# Stops every process this script started: SIGTERM, then SIGKILL for any still running after
# 10 s (the gateway drains its queue for shutdown_grace_secs, 2 s here, and no longer).
cleanup() {
    local pid alive
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 100); do
        alive=0
        for pid in "${STARTED_PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${STARTED_PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
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

say() {
    echo "== $*"
}

die() {
    echo "error: $*" >&2
    exit 1
}

# Prints the last lines of a log of this run, for a failure.
show_log() {
    echo "-- last lines of $1:" >&2
    tail -n 30 "$WORK_DIR/$1" >&2 || true
}

# Waits up to $2 tenths of a second for URL $1 to answer 200; fails naming $3 otherwise.
wait_for_200() {
    local url=$1 tenths=$2 what=$3 pid=$4
    for _ in $(seq 1 "$tenths"); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' "$url") == 200 ]]; then
            return
        fi
        kill -0 "$pid" 2>/dev/null || { show_log "$what.err"; die "$what exited during start-up"; }
        sleep 0.1
    done
    show_log "$what.err"
    die "$what did not answer $url in $((tenths / 10)) s"
}

for tool in promtool prometheus python3 curl; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install prometheus python3 curl)"
done

say "promtool check config dashboards/prometheus/prometheus.yml"
promtool check config "$DASHBOARDS/prometheus/prometheus.yml"
say "promtool check rules"
promtool check rules "$DASHBOARDS/prometheus/recording.yml" "$DASHBOARDS/prometheus/alerts.yml"
say "promtool test rules (every alert, firing and not)"
(cd "$DASHBOARDS/prometheus" && promtool test rules tests/*.yml)

if [[ -z "${SKIP_BUILD:-}" ]]; then
    if [[ $PROFILE == release ]]; then
        say "cargo build --release -p gateway -p loadgen"
        (cd "$ROOT" && cargo build --release --locked -p gateway -p loadgen)
    else
        say "cargo build -p gateway -p loadgen ($PROFILE)"
        (cd "$ROOT" && cargo build --locked -p gateway -p loadgen)
    fi
fi
[[ -x "$BIN/otpgate" && -x "$BIN/loadgen" ]] || die "no $PROFILE binaries in $BIN"

# Seven distinct free ports on loopback, held together while they are picked. Nothing listens on
# the last one: the pharmacies' webhooks fail there, so retries and give-ups show too, and the
# SMPP carrier gamma never binds there.
read -r API_PORT ADMIN_PORT ALPHA_PORT BETA_PORT HOOK_PORT PROM_PORT DEAD_PORT < <(python3 -c '
import socket
sockets = [socket.socket() for _ in range(7)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))')
API="127.0.0.1:$API_PORT"
ADMIN="127.0.0.1:$ADMIN_PORT"
PROM="http://127.0.0.1:$PROM_PORT"

# The scenario with the carriers on the ports picked.
sed -e "s/127.0.0.1:19731/127.0.0.1:$ALPHA_PORT/" -e "s/127.0.0.1:19732/127.0.0.1:$BETA_PORT/" \
    "$DASHBOARDS/test/scenario.toml" >"$WORK_DIR/scenario.toml"

sha256() {
    printf '%s' "$1" | sha256sum | cut -d ' ' -f 1
}

# The gateway: the scenario's clients and carriers; short code lifetimes so that codes never
# typed expire during the run; no per-IP limit (every user comes from 127.0.0.1).
cat >"$WORK_DIR/otpgate.toml" <<TOML
listen = "$API"
admin_listen = "$ADMIN"
public_url = "http://$API"
shutdown_grace_secs = 2
# Every client of this run (the load generator's users and its carriers' receipts) connects
# from 127.0.0.1: no per-address cap.
max_connections_per_ip = 0

[verification]
code_ttl_secs = 20
max_extension_secs = 30

[limits]
ip_sends = []

[webhooks]
max_attempts = 3
retry_base_ms = 200
retry_max_ms = 2000

[[carriers]]
name = "alpha"
kind = "http"
url = "http://127.0.0.1:$ALPHA_PORT/sms"
pace_per_sec = 60
window = 20
timeout_ms = 2000
http_version = "1.1"
receipt_token = "dashboards-test-alpha-receipts"

[[carriers]]
name = "beta"
kind = "http"
url = "http://127.0.0.1:$BETA_PORT/sms"
pace_per_sec = 25
window = 10
timeout_ms = 1000
http_version = "1.1"
receipt_token = "dashboards-test-beta-receipts"
receipt_timeout_ms = 4000
breaker_open_ms = 3000

# An SMPP carrier whose SMSC is never there (nothing listens on DEAD_PORT): it exports
# otpgate_carrier_sessions_bound, at 0, for its panel and OtpgateSmppSessionsDown to read (the
# alert goes pending during the run, as it should; check.py reads rule health, not state). It
# serves a prefix no number of the scenario has, so it is never given an SMS and the load runs
# as with two carriers.
[[carriers]]
name = "gamma"
kind = "smpp"
host = "127.0.0.1"
port = $DEAD_PORT
system_id = "dashboards"
password = "test"
prefixes = ["+999"]

[[clients]]
name = "portal"
api_key_sha256 = "$(sha256 dashboards-test-portal-key)"
rate_per_sec = 1000
priority = 0
webhook_url = "http://127.0.0.1:$HOOK_PORT/hooks/portal"
webhook_secret = "dashboards-test-webhook-secret"
webhook_delayed_after_secs = 2

[[clients]]
name = "pharmacies"
api_key_sha256 = "$(sha256 dashboards-test-pharmacies-key)"
rate_per_sec = 1000
priority = 1
webhook_url = "http://127.0.0.1:$DEAD_PORT/hooks/pharmacies"
webhook_secret = "dashboards-test-webhook-secret"
webhook_delayed_after_secs = 2
TOML

# Prometheus: one-second scrapes and rule evaluations, the project's rules.
cat >"$WORK_DIR/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $DASHBOARDS/prometheus/recording.yml
  - $DASHBOARDS/prometheus/alerts.yml
scrape_configs:
  - job_name: otpgate
    static_configs:
      - targets: ["$ADMIN"]
YAML
promtool check config "$WORK_DIR/prometheus.yml" >/dev/null

say "starting a webhook receiver (loadgen bare) on 127.0.0.1:$HOOK_PORT"
"$BIN/loadgen" bare --listen "127.0.0.1:$HOOK_PORT" >"$WORK_DIR/hooks.out" 2>"$WORK_DIR/hooks.err" &
STARTED_PIDS+=("$!")

say "starting the gateway: API on $API, admin on $ADMIN"
"$BIN/otpgate" --config "$WORK_DIR/otpgate.toml" >"$WORK_DIR/gateway.out" 2>"$WORK_DIR/gateway.err" &
GATEWAY_PID=$!
STARTED_PIDS+=("$GATEWAY_PID")
wait_for_200 "http://$ADMIN/readyz" 300 gateway "$GATEWAY_PID"

# Receipts for SMS the gateway never sent, as a carrier with a wrong receipt URL would post them:
# the unmatched-receipt panels and rules must see them. The gateway holds a receipt it cannot
# match for 30 s (its SMS's submit answer may still be on the way) before counting it, so they
# go first, to be counted during the load.
for n in 1 2 3 4 5; do
    curl -sf -X POST "http://$API/v1/carriers/alpha/receipts" \
        -H "Authorization: Bearer dashboards-test-alpha-receipts" -H 'content-type: application/json' \
        -d "{\"carrier_message_id\": \"not-sent-by-this-gateway-$n\", \"status\": \"delivered\"}" >/dev/null
done

say "starting Prometheus on $PROM, scraping $ADMIN every second"
prometheus --config.file="$WORK_DIR/prometheus.yml" --storage.tsdb.path="$WORK_DIR/prometheus-data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn \
    >"$WORK_DIR/prometheus.out" 2>"$WORK_DIR/prometheus.err" &
PROM_PID=$!
STARTED_PIDS+=("$PROM_PID")
wait_for_200 "$PROM/-/ready" 300 prometheus "$PROM_PID"
for _ in $(seq 1 100); do
    if curl -sf "$PROM/api/v1/query?query=up" | grep -q '"value":\[[0-9.]*,"1"\]'; then
        break
    fi
    sleep 0.1
done

say "load: loadgen run dashboards/test/scenario.toml --target http://$API"
LOAD_START=$(date +%s.%N)
"$BIN/loadgen" run "$WORK_DIR/scenario.toml" --target "http://$API" --progress lines \
    --report "$WORK_DIR/load.json" >"$WORK_DIR/load.out" 2>"$WORK_DIR/load.err" &
LOAD_PID=$!
STARTED_PIDS+=("$LOAD_PID")
LOAD_STATUS=0
for _ in $(seq 1 1200); do
    kill -0 "$LOAD_PID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$LOAD_PID" 2>/dev/null; then
    show_log load.err
    die "the load run did not end within 2 minutes"
fi
wait "$LOAD_PID" || LOAD_STATUS=$?
LOAD_END=$(date +%s.%N)
# 0 passed; 3 means the load generator fell behind its schedule on a busy machine, which does
# not matter here: the point is traffic for Prometheus to see.
if [[ $LOAD_STATUS != 0 && $LOAD_STATUS != 3 ]]; then
    show_log load.err
    die "loadgen run exited with status $LOAD_STATUS"
fi
python3 -c '
import json, sys
report = json.load(open(sys.argv[1]))
print("   load run (loadgen exit status " + sys.argv[2] + "): "
      + ", ".join(f"{name} {value}" for name, value in report["counts"].items()))' \
    "$WORK_DIR/load.json" "$LOAD_STATUS"
# A last scrape and rule evaluation.
sleep 2

# The moment the panels are read at: the end of the scenario's arrivals (its busiest part,
# with beta's outage inside every one-minute window).
CHECK_AT=$(python3 -c "print(f'{$LOAD_START + 30:.3f}')")
say "checking the dashboard and the rules against Prometheus and the gateway's /metrics"
python3 "$DASHBOARDS/test/check.py" --prometheus "$PROM" --metrics "http://$ADMIN/metrics" \
    --dashboard "$DASHBOARDS/grafana/otpgate.json" --instance "$ADMIN" \
    --time "$CHECK_AT" --range-secs 30 --rate-interval 10s

if [[ -n "${RENDER:-}" ]]; then
    say "drawing the dashboard of this run into $RENDER"
    python3 "$DASHBOARDS/test/render.py" --prometheus "$PROM" \
        --dashboard "$DASHBOARDS/grafana/otpgate.json" --instance "$ADMIN" \
        --start "$LOAD_START" --end "$LOAD_END" --rate-interval 5s \
        --title "dashboards/test/scenario.toml against a release gateway, $(date -u +%Y-%m-%d)" \
        --out "$RENDER"
fi

say "dashboards checked in $((SECONDS - SCRIPT_START)) s"

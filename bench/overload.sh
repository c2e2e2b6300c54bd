#!/usr/bin/env bash
# Overload, side by side (issue 19: when the carriers cannot keep up, spend every SMS on a citizen
# who is still there). Runs SCENARIO (scenarios/lombardia-2021-slow-accept.toml, the
# acceptance-lag day, about 9 minutes at 40x) twice at the same time, with the same seed, each
# against a gateway in its own process: once with `--set gateway.queue_policy="deadline"` (the
# old policy: earliest deadline first always, admission by max_extension) and once with the
# scenario's own settings (the adaptive policy by default). Each writes its JSON report and its
# SVG into OUT_DIR; then one table compares them: users verified, gave up, refused at start (and
# by error code), SMS to citizens who had left without a code, expired sessions, users verified
# per SMS the carriers could have accepted, whether the run was valid, and its wall time.
#
# Arguments after the script go to both `loadgen run`s, e.g. a shorter day:
#   bench/overload.sh --set duration_secs=1800 --set drain_secs=900
#
# Settings, from the environment: SCENARIO, OUT_DIR (target/overload), SEED (default: the
# scenario's), TIMEOUT_SECS (1800, per run), SKIP_BUILD, KEEP_WORK_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIO=${SCENARIO:-$ROOT/scenarios/lombardia-2021-slow-accept.toml}
OUT_DIR=${OUT_DIR:-$ROOT/target/overload}
TIMEOUT_SECS=${TIMEOUT_SECS:-1800}
SEED=${SEED:-}

[[ -f $SCENARIO ]] || die "no scenario at $SCENARIO"
command -v python3 >/dev/null || die "python3 is needed to read the reports"
if [[ -z "${SKIP_BUILD:-}" ]]; then
    say "building the release load generator"
    (cd "$ROOT" && cargo build --release -p loadgen) >&2
fi
[[ -x "$BIN/loadgen" ]] || die "no $BIN/loadgen: build it, or unset SKIP_BUILD"
mkdir -p "$OUT_DIR"

COMMON=(--progress lines)
if [[ -n $SEED ]]; then
    COMMON+=(--set "seed=$SEED")
fi

# Starts one run in the background; its wall time goes to OUT_DIR/NAME.secs, its exit code to
# OUT_DIR/NAME.rc.
# Usage: start_run NAME [LOADGEN RUN FLAGS...]
start_run() {
    local name=$1
    shift
    rm -f "$OUT_DIR/$name".{json,svg,txt,err,secs,rc}
    (
        started=$(date +%s.%N)
        rc=0
        timeout "$TIMEOUT_SECS" "$BIN/loadgen" run "$SCENARIO" "${COMMON[@]}" "$@" \
            --report "$OUT_DIR/$name.json" --plot "$OUT_DIR/$name.svg" \
            >"$OUT_DIR/$name.txt" 2>"$OUT_DIR/$name.err" || rc=$?
        awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }' \
            >"$OUT_DIR/$name.secs"
        echo "$rc" >"$OUT_DIR/$name.rc"
    ) &
    STARTED_PIDS+=("$!")
}

say "load average before the runs: $(cut -d ' ' -f 1-3 /proc/loadavg)"
say "two runs of $(basename "$SCENARIO") at once (at most $TIMEOUT_SECS s each), into $OUT_DIR"
start_run deadline --set 'gateway.queue_policy="deadline"' "$@"
start_run adaptive "$@"
for pid in "${STARTED_PIDS[@]}"; do
    wait "$pid" || true
done

failed=0
for name in deadline adaptive; do
    rc=$(cat "$OUT_DIR/$name.rc" 2>/dev/null || echo "?")
    # 0 passed, 1 thresholds broken, 3 invalid run: each still wrote its report.
    if [[ ! -s "$OUT_DIR/$name.json" ]]; then
        tail -n 20 "$OUT_DIR/$name.err" >&2 || true
        echo "FAIL: the $name run wrote no report (exit code $rc; 124: timed out)" >&2
        failed=1
    fi
done
((failed == 0)) || exit 1

echo
echo "$(basename "$SCENARIO"), same seed, both runs at once; reports and plots in $OUT_DIR"
python3 - "$OUT_DIR/deadline.json" "$OUT_DIR/adaptive.json" \
    "$(cat "$OUT_DIR/deadline.secs")" "$(cat "$OUT_DIR/adaptive.secs")" <<'PY'
import json
import sys

deadline, adaptive = (json.load(open(path)) for path in sys.argv[1:3])
walls = sys.argv[3:5]


def count(report, name):
    return report["counts"].get(name, 0)


def share(report):
    value = report.get("verified_per_capacity")
    return "-" if value is None else f"{value:.3f}"


rows = [
    ("users arrived", lambda r, _: count(r, "arrived")),
    ("users verified", lambda r, _: count(r, "verified")),
    ("gave up", lambda r, _: count(r, "gave_up")),
    ("refused at start", lambda r, _: count(r, "refused_at_start")),
    ("  come_back_later", lambda r, _: count(r, "refused_come_back_later")),
    ("  overloaded", lambda r, _: count(r, "refused_overloaded")),
    ("SMS to absent", lambda r, _: count(r, "sms_to_absent")),
    ("expired sessions", lambda r, _: count(r, "expired_sessions")),
    ("verified/capacity", lambda r, _: share(r)),
    ("valid run", lambda r, _: "yes" if r["self_watch"]["valid"] else "NO"),
    ("wall time (s)", lambda _, wall: wall),
]
print(f"{'':<20} {'deadline (old)':>15} {'adaptive (new)':>15}")
for label, value in rows:
    print(f"{label:<20} {value(deadline, walls[0]):>15} {value(adaptive, walls[1]):>15}")
for name, report in (("deadline", deadline), ("adaptive", adaptive)):
    for problem in report["self_watch"]["problems"]:
        print(f"{name}: INVALID RUN: {problem}")
PY

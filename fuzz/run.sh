#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer on stable Rust (no nightly flags, no cargo-fuzz) and
# runs each for FUZZ_SECS seconds, from the seeds in corpus/<target>. One line per target: its
# inputs run, seconds and result. Exits non-zero if a target cannot be built or run, finds a
# crash (a panic, a failed assertion, a timeout or an out-of-memory), or reports no inputs run.
#
#   bash fuzz/run.sh                 # every target, 15 s each
#   FUZZ_SECS=60 bash fuzz/run.sh phone smpp_pdu
#
# FUZZ_SECS (15): seconds per target. FUZZ_RSS_MB (2048): memory limit of one target.
# FUZZ_TIMEOUT (10): seconds one input may take before it counts as a hang.
# A crashing input is kept in fuzz/artifacts/<target>/; rerun it with
# `fuzz/target/<host>/release/<target> fuzz/artifacts/<target>/crash-…`.
set -euo pipefail
cd "$(dirname "$0")"

secs=${FUZZ_SECS:-15}
rss_mb=${FUZZ_RSS_MB:-2048}
input_timeout=${FUZZ_TIMEOUT:-10}
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$PWD/target"

# What cargo-fuzz passes, less its nightly-only `-Z` flags (it adds -Zsanitizer=address by
# default): SanitizerCoverage's module pass with libFuzzer's counters, PC table, comparison
# tracing and stack depth, `--cfg fuzzing`, and debug assertions (overflow checks with them).
# The flags go to the target only (`--target`), never to build scripts or proc macros, which
# would not link without libFuzzer.
unset CARGO_ENCODED_RUSTFLAGS
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions"

all_targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -vx 'otpgate-fuzz')
if (($#)); then targets="$*"; else targets=$all_targets; fi
[[ -n $targets ]] || { echo "fuzz/run.sh: no targets found in fuzz/Cargo.toml" >&2; exit 1; }
for target in $targets; do
    grep -qx "$target" <<<"$all_targets" || { echo "fuzz/run.sh: no target $target" >&2; exit 1; }
done

build_started=$(date +%s)
if ! cargo build --release --locked --bins --target "$host"; then
    echo "fuzz/run.sh: FAILED: the fuzz targets did not build" >&2
    exit 1
fi
echo "fuzz/run.sh: built in $(($(date +%s) - build_started)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
total=0
printf '%-14s %12s %8s  %s\n' target inputs seconds result
for target in $targets; do
    binary="$CARGO_TARGET_DIR/$host/release/$target"
    corpus="$work/corpus/$target"
    artifacts="$PWD/artifacts/$target"
    log="$work/$target.log"
    mkdir -p "$corpus" "$artifacts"
    if [[ -d corpus/$target ]]; then cp -R "corpus/$target/." "$corpus/"; fi
    started=$(date +%s)
    status=0
    RUST_BACKTRACE=1 "$binary" "$corpus" \
        -max_total_time="$secs" -rss_limit_mb="$rss_mb" -timeout="$input_timeout" \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - started))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if ((status != 0)); then
        result="FAILED (exit $status)"
    elif [[ -z $runs || $runs == 0 ]]; then
        result="FAILED (no inputs run)"
    else
        result=ok
    fi
    printf '%-14s %12s %8s  %s\n' "$target" "${runs:-0}" "$elapsed" "$result"
    if [[ $result != ok ]]; then
        failed+=("$target")
        echo "---- $target: the end of libFuzzer's output" >&2
        tail -n 60 "$log" >&2
        # libFuzzer writes the input that crashed as <prefix>crash-…, leak-…, timeout-… or oom-….
        found=$(grep -o "Test unit written to .*" "$log" | sed 's/^Test unit written to //' || true)
        if [[ -n $found ]]; then
            echo "---- $target: the input that failed: $found" >&2
        fi
        echo "---- $target: rerun it with: $binary <input>" >&2
    else
        total=$((total + runs))
    fi
done

if ((${#failed[@]})); then
    echo "fuzz/run.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz/run.sh: every target ran ($(wc -w <<<"$targets") targets, $total inputs, ${secs} s each), no crash"

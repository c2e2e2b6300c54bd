#!/usr/bin/env python3
"""Load driver for bench/chaos.sh: starts COUNT verifications spread over several gateways that
are being killed and restarted under it, and records which starts were accepted.

Start number I goes to phone +39 (3200000000 + OFFSET + I) (an Italian mobile, as `loadgen fill`
numbers them), with `Idempotency-Key: chaos-RUN-I`, first to target I mod N. The starts are paced
at RATE a second (start I is due at I / RATE seconds; a start that is late goes at once) by
CONCURRENCY threads, each with one keep-alive connection per target.
A start that gets no answer (connection refused or reset, timeout) or an answer that invites a
retry (5xx, 429, 409) is sent again, after a short back-off, to the next target, with the same
body and the same Idempotency-Key: the gateways share their idempotency keys in Redis, so a
retry never makes a second verification, and one whose first attempt did create it gets the same
verification back. A start is given up after --start-timeout seconds of retries, or at the
deadline; any other answer (a 4xx) fails it at once.

Accepted (202) starts are written to --ids, one line `INDEX PHONE VERIFICATION_ID ATTEMPTS` each;
--progress holds the number accepted so far, rewritten every half second. At the end one JSON
line on stdout: accepted, failed (by last status or error), retried (starts that took more than
one attempt), replayed (answers with `Idempotent-Replayed: true`), attempts by outcome, the
time a start took until accepted, retries included (p50, p99, the slowest, and how many took 5 s
or more; the first five of those are listed on stderr with their attempts) and the elapsed time.
Loopback only: every target must be http://127.x.y.z:PORT.
"""

import argparse
import collections
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

FIRST_NATIONAL_NUMBER = 3_200_000_000
REQUEST_TIMEOUT_SECS = 5.0
MAX_BACKOFF_SECS = 0.5
MAX_DEADLINE_SECS = 1800
# Accepted starts that took this long are counted, and the first few listed on stderr.
SLOW_START_SECS = 5.0
SLOW_STARTS_SHOWN = 5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True,
                        help="a gateway's API base URL (repeat for each instance)")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=250.0, help="starts a second")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--phone-offset", type=int, default=0)
    parser.add_argument("--run", default="run", help="part of every Idempotency-Key")
    parser.add_argument("--start-timeout", type=float, default=60.0,
                        help="seconds a start may spend in retries")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds the whole run may take")
    parser.add_argument("--ids", required=True, help="file for the accepted starts")
    parser.add_argument("--progress", required=True, help="file for the count accepted so far")
    args = parser.parse_args()
    if args.count < 1 or args.rate <= 0 or args.concurrency < 1:
        parser.error("--count, --rate and --concurrency must be positive")
    if not 0 < args.deadline <= MAX_DEADLINE_SECS:
        parser.error(f"--deadline must be 0 to {MAX_DEADLINE_SECS} seconds")
    if args.phone_offset < 0 or FIRST_NATIONAL_NUMBER + args.phone_offset + args.count > 3_999_999_999:
        parser.error("--phone-offset plus --count run past the Italian mobile numbers")
    targets = []
    for target in args.target:
        url = urllib.parse.urlsplit(target)
        if url.scheme != "http" or not url.hostname or not url.hostname.startswith("127."):
            parser.error(f"{target}: only http:// targets on loopback")
        targets.append((url.hostname, url.port or 80))
    args.targets = targets
    return args


class Run:
    """What the threads share."""

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.next_index = 0
        self.started = time.monotonic()
        self.deadline = self.started + args.deadline
        self.accepted = 0
        self.retried = 0
        self.replayed = 0
        self.failed = collections.Counter()
        self.attempts = collections.Counter()
        self.slowest = 0.0
        # Seconds each accepted start took, retries included.
        self.took = []
        self.slow_shown = 0
        self.lines = []

    def take(self):
        with self.lock:
            if self.next_index >= self.args.count:
                return None
            index = self.next_index
            self.next_index += 1
            return index


class Worker:
    """One thread: one keep-alive connection per target."""

    def __init__(self, run):
        self.run = run
        self.connections = {}

    def connection(self, target):
        conn = self.connections.get(target)
        if conn is None:
            conn = http.client.HTTPConnection(*target, timeout=REQUEST_TIMEOUT_SECS)
            self.connections[target] = conn
        return conn

    def drop(self, target):
        conn = self.connections.pop(target, None)
        if conn is not None:
            conn.close()

    def post(self, target, body, key):
        """Returns (outcome, status, headers, payload); outcome names an unanswered attempt."""
        conn = self.connection(target)
        try:
            conn.request("POST", "/v1/verifications", body=body, headers={
                "Content-Type": "application/json",
                "Idempotency-Key": key,
            })
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.drop(target)
            name = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
            return name, None, None, None
        if response.getheader("Connection", "").lower() == "close":
            self.drop(target)
        return str(response.status), response.status, response, payload

    def start(self, index):
        run = self.run
        args = run.args
        phone = f"+39{FIRST_NATIONAL_NUMBER + args.phone_offset + index}"
        body = json.dumps({"phone": phone}).encode()
        key = f"chaos-{args.run}-{index}"
        began = time.monotonic()
        give_up = min(began + args.start_timeout, run.deadline)
        attempt = 0
        outcomes = []
        while True:
            target = args.targets[(index + attempt) % len(args.targets)]
            attempt += 1
            outcome, status, response, payload = self.post(target, body, key)
            outcomes.append(outcome)
            with run.lock:
                run.attempts[outcome] += 1
            if status == 202:
                verification = json.loads(payload)["id"]
                replayed = response.getheader("Idempotent-Replayed") == "true"
                took = time.monotonic() - began
                with run.lock:
                    run.accepted += 1
                    run.replayed += replayed
                    run.retried += attempt > 1
                    run.slowest = max(run.slowest, took)
                    run.took.append(took)
                    run.lines.append(f"{index} {phone} {verification} {attempt}\n")
                    if took >= SLOW_START_SECS and run.slow_shown < SLOW_STARTS_SHOWN:
                        run.slow_shown += 1
                        counts = collections.Counter(outcomes)
                        print(f"slow start {index}: {took:.1f} s, attempts {dict(counts)}",
                              file=sys.stderr)
                return
            retry = status is None or status in (409, 429) or status >= 500
            now = time.monotonic()
            if not retry or now >= give_up:
                with run.lock:
                    run.failed[outcome if retry else f"{outcome} {payload[:80]!r}"] += 1
                return
            # Another target next; back off a little so a dead one is not hammered.
            time.sleep(min(MAX_BACKOFF_SECS, 0.02 * 2 ** min(attempt, 5), max(0.0, give_up - now)))

    def loop(self):
        run = self.run
        while True:
            index = run.take()
            if index is None:
                return
            due = run.started + index / run.args.rate
            now = time.monotonic()
            if now >= run.deadline:
                with run.lock:
                    run.failed["deadline"] += 1
                continue
            if due > now:
                time.sleep(due - now)
            self.start(index)


def percentile(values, share):
    """The value below which `share` of `values` fall (nearest rank), or None."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 3)


def write_progress(run, path, stop):
    while not stop.wait(0.5):
        with open(path + ".tmp", "w") as out:
            out.write(f"{run.accepted}\n")
        # A reader never sees a half-written file.
        os.replace(path + ".tmp", path)


def main():
    args = parse_args()
    run = Run(args)
    stop = threading.Event()
    progress = threading.Thread(target=write_progress, args=(run, args.progress, stop), daemon=True)
    progress.start()
    threads = [threading.Thread(target=Worker(run).loop, daemon=True) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        # Every attempt is bounded by REQUEST_TIMEOUT_SECS and every start by the deadline.
        thread.join(max(0.0, run.deadline - time.monotonic()) + 2 * REQUEST_TIMEOUT_SECS)
    stop.set()
    elapsed = time.monotonic() - run.started
    with run.lock:
        with open(args.ids, "w") as out:
            out.writelines(run.lines)
        with open(args.progress, "w") as out:
            out.write(f"{run.accepted}\n")
        summary = {
            "count": args.count,
            "accepted": run.accepted,
            "failed": sum(run.failed.values()),
            "failed_by": dict(run.failed),
            "unfinished": args.count - run.accepted - sum(run.failed.values()),
            "retried": run.retried,
            "replayed": run.replayed,
            "attempts_by_outcome": dict(run.attempts),
            "start_secs_p50": percentile(run.took, 0.50),
            "start_secs_p99": percentile(run.took, 0.99),
            "slowest_start_secs": round(run.slowest, 3),
            "starts_over_5s": sum(took >= SLOW_START_SECS for took in run.took),
            "elapsed_secs": round(elapsed, 2),
        }
    print(json.dumps(summary))
    return 0 if summary["accepted"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())

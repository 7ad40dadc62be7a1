#!/usr/bin/env python3
"""A worker that reports progress to progressd instead of Redis pub/sub.

`ProgressReporter.publish(channel, message)` has the call signature of `redis.publish`, so a
worker that announced its progress on Redis changes two lines, not its call sites:

    # before                                    # after
    from redis import Redis                     from worker import ProgressReporter
    progress = Redis.from_url(REDIS_URL)        progress = ProgressReporter(PROGRESSD_URL)

    # unchanged, wherever the worker reports:
    progress.publish(f"progress:{job}", json.dumps({"percent": pct, "stage": stage}))

What changes is what the call promises. Redis forgets a message nobody is subscribed to at
that instant; progressd answers 201 only once the update is on disk, and replays it to every
watcher that connects or reconnects later. So `publish` retries until it gets that answer
(for 30 s by default, then it raises): on connection errors and timeouts, and on 5xx,
waiting what `Retry-After` says. Each call sends one `Idempotency-Key`, the same on all its
retries, so an update whose answer was lost is stored once, not twice. A 4xx is never
retried (the same request would get the same answer): it raises `ProgressError` with the
API's error code and message, `JobFinished` for 409 job_finished.

Run it as a simulated job:

    python3 worker.py build-42 --url http://127.0.0.1:7700 [--steps 3] [--final failed]

It prints `seq=N <update>` for each stored update. With auth on, set PROGRESSD_TOKEN to a
token that may publish the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

log = logging.getLogger("progressd")


class ProgressError(Exception):
    """progressd refused the update (or stayed unavailable); `code` is the API's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    @classmethod
    def from_response(cls, r: httpx.Response) -> ProgressError:
        try:
            body = r.json()
            code, message = body["error"], body["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "unexpected_response", r.text[:200]
        kind = JobFinished if r.status_code == 409 else ProgressError
        return kind(r.status_code, code, message)


class JobFinished(ProgressError):
    """409 job_finished: the job already reached succeeded, failed or cancelled."""


class ProgressReporter:
    """Publishes progress updates to progressd; `publish` mirrors `redis.publish`."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:7700",
        *,
        token: str | None = None,
        channel_prefix: str = "progress:",
        give_up_after: float = 30.0,
        timeout: float = 5.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self._prefix = channel_prefix
        self._give_up_after = give_up_after

    def publish(self, channel: str, message: str | bytes | dict[str, Any]) -> int:
        """Like `redis.publish(f"progress:{job}", json.dumps(update))`; returns the event's seq.

        The job id is the channel without its prefix (job ids may contain `:`).
        """
        job = channel[len(self._prefix):] if channel.startswith(self._prefix) else channel
        update = json.loads(message) if isinstance(message, (str, bytes)) else message
        return self.report(job, update)

    def report(self, job: str, update: dict[str, Any] | list[dict[str, Any]]) -> int:
        """Stores one update (or a batch, all or nothing) and returns the (last) event's seq.

        update: status, percent, current, total, stage, message, data (see the README).
        """
        key = str(uuid.uuid4())  # one logical update: the same key on every retry
        deadline = time.monotonic() + self._give_up_after
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                # Job ids are URL-safe by contract ([A-Za-z0-9_.:-]); progressd checks them.
                r = self._client.post(
                    f"/v1/jobs/{job}/events", json=update, headers={"Idempotency-Key": key}
                )
            except httpx.TransportError as e:  # refused, reset, timed out, cut mid-answer
                wait, why = backoff * random.uniform(0.8, 1.2), f"{type(e).__name__}: {e}"
            else:
                if r.status_code in (200, 201):  # 200: a retry of an update already stored
                    return r.json()["seq"]
                if r.status_code < 500:
                    raise ProgressError.from_response(r)
                err = ProgressError.from_response(r)
                wait = _retry_after(r)
                wait = backoff if wait is None else wait
                why = f"{err.status} {err.code}: {err.message}"
            if time.monotonic() + wait > deadline:
                raise ProgressError(503, "unavailable", f"gave up after {attempt} attempts: {why}")
            log.warning("job %s: attempt %d failed, retrying in %.1fs after %s", job, attempt, wait, why)
            time.sleep(wait)
            backoff = min(backoff * 2, 2.0)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_after(r: httpx.Response) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date), if the answer has one."""
    value = r.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def simulate(progress: ProgressReporter, job: str, steps: int, final: str, pause: float) -> None:
    """A job of `steps` steps, reporting the way a Redis-era worker did."""
    updates: list[dict[str, Any]] = [{"status": "running", "stage": "start", "current": 0, "total": steps}]
    updates += [{"current": i, "total": steps, "stage": f"step {i}"} for i in range(1, steps + 1)]
    updates.append({"status": final, "message": f"job {final}"})
    for update in updates:
        seq = progress.publish(f"progress:{job}", json.dumps(update))
        print(f"seq={seq} {json.dumps(update)}", flush=True)
        time.sleep(pause)


def main() -> int:
    p = argparse.ArgumentParser(description="Simulate a job that reports its progress to progressd.")
    p.add_argument("job", help="job id, e.g. build-42")
    p.add_argument("--url", default=os.environ.get("PROGRESSD_URL", "http://127.0.0.1:7700"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--final", choices=["succeeded", "failed", "cancelled"], default="succeeded")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between updates")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    with ProgressReporter(args.url, token=os.environ.get("PROGRESSD_TOKEN")) as progress:
        try:
            simulate(progress, args.job, args.steps, args.final, args.pause)
        except ProgressError as e:
            print(f"worker: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

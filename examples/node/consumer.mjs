// Follow one progressd job over Server-Sent Events with the `eventsource` package (v4), the
// WHATWG EventSource for Node: it reconnects by itself and sends `Last-Event-ID`, and
// progressd replays exactly what was missed (or sends `reset` if it is no longer kept).
//
//   npm ci --prefix examples/node
//   node examples/node/consumer.mjs build-42 --url http://127.0.0.1:7700
//   PROGRESSD_TOKEN=eyJ... node examples/node/consumer.mjs build-42     # with auth on
//
// Prints one line per event, like examples/python/consumer.py, and exits the same way:
// 0 the job succeeded, 1 it failed, 2 it was cancelled, 3 it was deleted (or expired) before
// we saw it end, 4 progressd refused the request (bad job id, missing or insufficient token).

import { EventSource } from 'eventsource';
import { parseArgs } from 'node:util';

const EXIT = { succeeded: 0, failed: 1, cancelled: 2 };
const GONE = 3;
const REFUSED = 4;

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: { url: { type: 'string', default: process.env.PROGRESSD_URL ?? 'http://127.0.0.1:7700' } },
});
if (positionals.length !== 1) {
  console.error('usage: node consumer.mjs JOB [--url URL]');
  process.exit(64);
}
const job = positionals[0];
const token = process.env.PROGRESSD_TOKEN;

let lastId = null; // the seq of the last event we have
let status = null; // the job's status as far as we know

function show(kind, seq, data) {
  const fields = [`${kind} seq=${seq}`];
  if (data.status != null) fields.push(`status=${data.status}`);
  if (data.percent != null) fields.push(`percent=${Math.round(data.percent * 10) / 10}`);
  if (data.stage != null) fields.push(`stage=${JSON.stringify(data.stage)}`);
  if (data.message != null) fields.push(`message=${JSON.stringify(data.message)}`);
  console.log(fields.join(' '));
}

function finish(es, code) {
  es.close();
  process.exit(code);
}

function follow() {
  // A fresh EventSource starts from `?after=` (only needed when we had to make a new one);
  // its own reconnections send `Last-Event-ID`, which progressd prefers.
  const url = new URL(`/v1/jobs/${encodeURIComponent(job)}/stream`, opts.url);
  if (lastId != null) url.searchParams.set('after', lastId);
  const es = new EventSource(url, {
    // v4 takes a custom fetch: the way to send headers, here the token. (Browsers'
    // EventSource cannot: there the token goes as `?access_token=`.)
    fetch: (input, init) =>
      fetch(input, {
        ...init,
        headers: { ...init.headers, ...(token ? { Authorization: `Bearer ${token}` } : {}) },
      }),
  });

  es.addEventListener('open', () => console.log(`connected after=${lastId ?? '-'}`));
  for (const kind of ['snapshot', 'reset', 'progress']) {
    es.addEventListener(kind, (e) => {
      const data = JSON.parse(e.data);
      lastId = e.lastEventId;
      status = data.status ?? status;
      show(kind, e.lastEventId, data);
    });
  }
  es.addEventListener('end', (e) => {
    status = JSON.parse(e.data).status;
    console.log(`end status=${status}`);
    finish(es, EXIT[status]);
  });
  es.addEventListener('deleted', () => {
    console.log('deleted');
    finish(es, GONE);
  });
  es.addEventListener('error', (e) => {
    if (e.data !== undefined) {
      // progressd's own `event: error` (its subscription failed): it closes the stream,
      // and EventSource reconnects with Last-Event-ID.
      console.error(`server error: ${e.data}`);
    } else if (e.code === 204) {
      // Nothing more will ever come. Either the last event we have is the job's last (so we
      // know how it ended), or the job is gone.
      if (status in EXIT) {
        console.log(`end status=${status}`);
        return finish(es, EXIT[status]);
      }
      console.log('deleted (the job no longer exists)');
      return finish(es, GONE);
    } else if (es.readyState === EventSource.CLOSED) {
      // Any other non-200 answer ends an EventSource for good.
      if (e.code >= 400 && e.code < 500) {
        console.error(`refused: ${e.message}`);
        return finish(es, REFUSED);
      }
      console.log(`reconnecting after=${lastId ?? '-'} in 1s: ${e.message}`);
      setTimeout(follow, 1000);
    } else {
      // The stream ended or the connection failed: EventSource retries after `retry:`.
      console.log(`reconnecting after=${lastId ?? '-'}: ${e.message ?? 'the stream ended'}`);
    }
  });
}

follow();

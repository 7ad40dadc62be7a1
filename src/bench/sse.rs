//! The benchmark's SSE subscriber: counts what it receives by the payload's `n` and measures
//! delivery latency from its `sent_us`.
//!
//! It reads the stream with a small reader of its own rather than `eventsource-stream` (which
//! `progressd watch` uses): the generator shares the machine with the server it measures, and
//! that crate's three `String`s and parser run per event made the generator, not the server,
//! the bound of the resume storm (malloc and free were a quarter of its profile). This one
//! reuses its buffers and reads a chunk's events in one go.

use std::ops::ControlFlow;

use futures_util::StreamExt;

use super::{now_us, Resume, Samples, Target, Waiter};

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// The highest `n` received (or the state a snapshot/reset put us at).
    pub last_n: u64,
    /// The last SSE `id:`, to resume from.
    pub last_id: Option<String>,
    pub delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Events skipped over (a later `n` arrived first and the missing ones never did).
    pub gaps: u64,
    pub resets: u64,
    pub latencies: Samples,
    pub error: Option<String>,
}

impl Seen {
    fn take(&mut self, event: &str, data: &str, id: &str) {
        if !id.is_empty() {
            match &mut self.last_id {
                Some(last) => {
                    last.clear();
                    last.push_str(id);
                }
                None => self.last_id = Some(id.to_owned()),
            }
        }
        let Some(n) = number_after(data, "\"n\":") else {
            return;
        };
        match event {
            // The state at (re)subscription: no delivery, but where we now are.
            "snapshot" => self.last_n = n,
            "reset" => {
                self.resets += 1;
                self.last_n = n;
            }
            _ => {
                if n == self.last_n + 1 {
                    self.delivered += 1;
                    if let Some(sent) = number_after(data, "\"sent_us\":") {
                        self.latencies.0.push(now_us().saturating_sub(sent));
                    }
                    self.last_n = n;
                } else if n == self.last_n {
                    self.duplicates += 1;
                } else if n < self.last_n {
                    self.out_of_order += 1;
                } else {
                    self.gaps += n - self.last_n - 1;
                    self.delivered += 1;
                    self.last_n = n;
                }
            }
        }
    }
}

/// The unsigned integer after the first `key` in `text`. (A `memmem` search: `str::find`
/// built a searcher for every call, and was the generator's largest cost in a resume storm.)
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest =
        &text.as_bytes()[memchr::memmem::find(text.as_bytes(), key.as_bytes())? + key.len()..];
    let rest = rest.trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// An error and what caused it, down the chain: reqwest's own message alone ("error sending
/// request") does not say whether the connect was refused, reset or timed out.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Opens a subscription; `Ok` once the server answered 2xx (it is subscribed).
pub async fn connect(
    client: &reqwest::Client,
    target: &Target,
    job: &str,
    resume_from: Option<&str>,
) -> Result<reqwest::Response, String> {
    let mut url = target.subscribe_url(job);
    let mut req = client.get(&url);
    if let Some(id) = resume_from {
        match target.resume {
            Resume::Header => req = req.header("last-event-id", id),
            Resume::Query => {
                let sep = if url.contains('?') { '&' } else { '?' };
                url = format!("{url}{sep}after={id}");
                req = client.get(&url);
            }
        }
    }
    let res = target
        .authorized(req.header("accept", "text/event-stream"))
        .send()
        .await
        .map_err(|e| with_causes(&e))?;
    if !res.status().is_success() {
        return Err(format!("{url}: {}", res.status()));
    }
    Ok(res)
}

/// Reads events into `seen` until `done(seen)` says so (asked after every event and every
/// time `wake` is raised), or the stream ends.
pub async fn consume(
    res: reqwest::Response,
    seen: &mut Seen,
    done: &dyn Fn(&Seen) -> bool,
    wake: &mut Waiter,
) {
    let mut body = res.bytes_stream();
    let mut reader = SseReader::default();
    while !done(seen) {
        tokio::select! {
            chunk = body.next() => match chunk {
                None => return,
                Some(Err(e)) => {
                    seen.error.get_or_insert(with_causes(&e));
                    return;
                }
                Some(Ok(chunk)) => {
                    // Stops at the event that makes it done: the rest of the chunk is not
                    // seen, as if it had not arrived (a resume asks for it again).
                    let _ = reader.feed(&chunk, &mut |event, data, id| {
                        seen.take(event, data, id);
                        if done(seen) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    });
                }
            },
            () = wake.next() => {}
        }
    }
}

/// Splits an SSE body into events: `event`, `data` (lines joined by `\n`) and `id` fields,
/// dispatched at a blank line; comments and other fields are skipped. Lines may be cut
/// anywhere between chunks. Only what the generator needs: no `retry`, no BOM.
#[derive(Default)]
struct SseReader {
    /// The start of a line cut by the end of a chunk.
    partial: Vec<u8>,
    event: String,
    data: String,
    id: String,
    /// A field was set since the last event.
    pending: bool,
}

impl SseReader {
    /// Reads `chunk`, calling `on_event(event, data, id)` for each complete event until it
    /// says to stop.
    fn feed(
        &mut self,
        mut chunk: &[u8],
        on_event: &mut dyn FnMut(&str, &str, &str) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        while let Some(end) = memchr::memchr(b'\n', chunk) {
            let line = &chunk[..end];
            chunk = &chunk[end + 1..];
            let flow = if self.partial.is_empty() {
                self.line(line, on_event)
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                let flow = self.line(&whole, on_event);
                whole.clear();
                self.partial = whole;
                flow
            };
            flow?;
        }
        self.partial.extend_from_slice(chunk);
        ControlFlow::Continue(())
    }

    fn line(
        &mut self,
        line: &[u8],
        on_event: &mut dyn FnMut(&str, &str, &str) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if !std::mem::take(&mut self.pending) {
                return ControlFlow::Continue(());
            }
            let event = if self.event.is_empty() {
                "message"
            } else {
                &self.event
            };
            let flow = on_event(event, &self.data, &self.id);
            self.event.clear();
            self.data.clear();
            self.id.clear();
            return flow;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            // A comment (`: keepalive`).
            Some(0) => return ControlFlow::Continue(()),
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let Ok(value) = std::str::from_utf8(value) else {
            return ControlFlow::Continue(());
        };
        let into = match field {
            b"event" => &mut self.event,
            b"id" => &mut self.id,
            b"data" => {
                if self.pending && !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.pending = true;
                return ControlFlow::Continue(());
            }
            _ => return ControlFlow::Continue(()),
        };
        into.clear();
        into.push_str(value);
        self.pending = true;
        ControlFlow::Continue(())
    }
}

/// The same over a WebSocket (progressd's `/v1/jobs/{job}/ws`): text frames whose JSON holds
/// the payload; `type` plays the part of the SSE event name.
pub async fn consume_ws(
    url: &str,
    seen: &mut Seen,
    done: &dyn Fn(&Seen) -> bool,
    wake: &mut Waiter,
) {
    let mut ws = match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            seen.error.get_or_insert(e.to_string());
            return;
        }
    };
    while !done(seen) {
        let message = tokio::select! {
            message = ws.next() => message,
            () = wake.next() => continue,
        };
        match message {
            None => return,
            Some(Err(e)) => {
                seen.error.get_or_insert(e.to_string());
                return;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                let kind = if text.starts_with(r#"{"type":"snapshot""#) {
                    "snapshot"
                } else if text.starts_with(r#"{"type":"reset""#) {
                    "reset"
                } else {
                    "progress"
                };
                let id = number_after(&text, "\"seq\":").map(|n| n.to_string());
                seen.take(kind, &text, &id.unwrap_or_default());
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of cutting a stream into chunks gives the same events.
    #[test]
    fn the_reader_gives_whole_events_however_the_stream_is_cut() {
        let stream: &[u8] =
            b"retry:3000\n\n: keepalive\n\nevent:snapshot\nid:3\ndata:{\"n\":3}\n\n\
            id:7\n\nevent: progress\r\nid: 4\r\ndata:a\r\ndata:b\r\n\r\ndata:c\n\n";
        let want = vec![
            (
                "snapshot".to_owned(),
                r#"{"n":3}"#.to_owned(),
                "3".to_owned(),
            ),
            ("message".to_owned(), String::new(), "7".to_owned()),
            ("progress".to_owned(), "a\nb".to_owned(), "4".to_owned()),
            ("message".to_owned(), "c".to_owned(), String::new()),
        ];
        for cut in 0..=stream.len() {
            for cut2 in cut..=stream.len() {
                let mut reader = SseReader::default();
                let mut got = Vec::new();
                let mut on = |e: &str, d: &str, i: &str| {
                    got.push((e.to_owned(), d.to_owned(), i.to_owned()));
                    ControlFlow::Continue(())
                };
                for part in [&stream[..cut], &stream[cut..cut2], &stream[cut2..]] {
                    let _ = reader.feed(part, &mut on);
                }
                assert_eq!(got, want, "cut at {cut} and {cut2}");
            }
        }
    }

    #[test]
    fn the_reader_stops_where_it_is_told() {
        let mut reader = SseReader::default();
        let mut seen = 0;
        let flow = reader.feed(b"data:1\n\ndata:2\n\ndata:3\n\n", &mut |_, _, _| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(flow.is_break());
        assert_eq!(seen, 2);
    }

    #[test]
    fn counts_by_the_payload_number() {
        let mut seen = Seen::default();
        let data = |n: u64| format!(r#"{{"job":"j","seq":{n},"data":{{"n":{n},"sent_us":0}}}}"#);
        for n in [1, 2, 2, 4, 3, 5] {
            seen.take("progress", &data(n), &n.to_string());
        }
        assert_eq!(seen.delivered, 4); // 1, 2, 4, 5
        assert_eq!(seen.duplicates, 1);
        assert_eq!(seen.gaps, 1); // 3 skipped when 4 came
        assert_eq!(seen.out_of_order, 1); // 3 after 4
        assert_eq!(seen.last_id.as_deref(), Some("5"));
        seen.take("reset", &data(9), "9");
        assert_eq!((seen.resets, seen.last_n), (1, 9));
    }
}

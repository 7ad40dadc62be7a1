//! The benchmark's SSE subscriber: counts what it receives by the payload's `n` and measures
//! delivery latency from its `sent_us`.

use eventsource_stream::Eventsource;
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
    fn take(&mut self, event: &str, data: &str, id: String) {
        if !id.is_empty() {
            self.last_id = Some(id);
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

/// The unsigned integer after the first `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits = rest
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?;
    digits.parse().ok()
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
    let mut events = res.bytes_stream().eventsource();
    while !done(seen) {
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => {
                    seen.error.get_or_insert(e.to_string());
                    return;
                }
                Some(Ok(event)) => seen.take(&event.event, &event.data, event.id),
            },
            () = wake.next() => {}
        }
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
                seen.take(kind, &text, id.unwrap_or_default());
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_the_payload_number() {
        let mut seen = Seen::default();
        let data = |n: u64| format!(r#"{{"job":"j","seq":{n},"data":{{"n":{n},"sent_us":0}}}}"#);
        for n in [1, 2, 2, 4, 3, 5] {
            seen.take("progress", &data(n), n.to_string());
        }
        assert_eq!(seen.delivered, 4); // 1, 2, 4, 5
        assert_eq!(seen.duplicates, 1);
        assert_eq!(seen.gaps, 1); // 3 skipped when 4 came
        assert_eq!(seen.out_of_order, 1); // 3 after 4
        assert_eq!(seen.last_id.as_deref(), Some("5"));
        seen.take("reset", &data(9), "9".into());
        assert_eq!((seen.resets, seen.last_n), (1, 9));
    }
}

//! Generation requests as the HTTP handlers see them: submit one or more choices to a
//! model's engine, then read their events (with latency metrics recorded on the way), and
//! stream response frames from a task that stops the moment the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use capy_engine::{Event, GenerateParams, PromptLogprob, Request, Sink, Summary, TokenOut};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::gateway::Ticket;
use crate::registry::Lease;
use crate::AppState;

/// Sends a choice's events into the request's channel; closed when the handler (or its
/// response stream) is dropped, which frees the sequence.
struct ChannelSink {
    tx: mpsc::UnboundedSender<(usize, Event)>,
    index: usize,
}

impl Sink for ChannelSink {
    fn send(&mut self, ev: Event) -> bool {
        self.tx.send((self.index, ev)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Runs a request's CPU work (tokenizing, parsing a model file) on tokio's blocking
/// threads, so the async workers keep answering other requests (`/health` among them).
///
/// # Errors
/// `f`'s, or a 500 when the blocking task panicked.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a blocking task failed: {e}")))?
}

/// What a request hears when its generation failed: a request's own grammar that failed
/// on the way (llguidance's limits, a part that accepts nothing) is a 400 naming it, with
/// the reason; anything else a 500.
pub fn failure(m: String) -> ApiError {
    match m.strip_prefix("grammar: ") {
        Some(why) => ApiError::bad_request(format!(
            "the request's grammar or schema failed during generation: {why}"
        )),
        None => ApiError::internal(m),
    }
}

/// The running choices of one request.
pub struct Gens {
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    pub lease: Lease,
    state: Arc<AppState>,
    t0: Instant,
    last: Vec<Option<Instant>>,
    /// Per choice: its prompt's length when it is the first choice of its prompt (the
    /// prompt a response's `usage` counts once), else 0.
    prompt_of: Vec<usize>,
    /// Per choice: tokens received, and its summary once done.
    seen: Vec<(usize, Option<(usize, usize)>)>,
    started: bool,
    any_token: bool,
    failed: bool,
    ticket: Option<Arc<Ticket>>,
}

impl Drop for Gens {
    /// Reports what the request used to its usage ticket: the summaries' counts for the
    /// choices that ended, the tokens received for those cut short (a disconnect).
    fn drop(&mut self) {
        let Some(t) = &self.ticket else { return };
        let (mut prompt, mut cached, mut completion) = (0, 0, 0);
        let mut cut = false;
        for (i, &(n, done)) in self.seen.iter().enumerate() {
            let first = self.prompt_of[i];
            match done {
                Some((c, k)) => {
                    completion += c;
                    if first > 0 {
                        cached += k;
                    }
                }
                None => {
                    completion += n;
                    cut = true;
                }
            }
            if self.started {
                prompt += first;
            }
        }
        t.add_tokens(prompt, cached, completion, cut && !self.failed);
    }
}

/// Everything one choice produced.
#[derive(Default)]
pub struct Outcome {
    pub tokens: Vec<TokenOut>,
    pub text: String,
    pub prompt_lp: Option<Vec<Option<PromptLogprob>>>,
    pub summary: Option<Summary>,
}

impl Gens {
    /// Queues one choice per `(prompt, params)` on the leased model; `per_prompt`
    /// consecutive choices share a prompt (a request's `n`). The usage `ticket` hears
    /// what the request used and gives its tenant's prefix-cache salt.
    pub fn start(
        state: &Arc<AppState>,
        lease: Lease,
        choices: Vec<(Vec<u32>, GenerateParams)>,
        per_prompt: usize,
        n_ctx: Option<usize>,
        t0: Instant,
        ticket: Option<Arc<Ticket>>,
    ) -> Result<Gens, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let n = choices.len();
        let per_prompt = per_prompt.max(1);
        let prompt_of = choices
            .iter()
            .enumerate()
            .map(|(i, (p, _))| if i % per_prompt == 0 { p.len() } else { 0 })
            .collect();
        let salt = ticket.as_ref().map(|t| t.salt()).unwrap_or_default();
        let reqs = choices
            .into_iter()
            .enumerate()
            .map(|(index, (prompt, params))| Request {
                prompt,
                params,
                n_ctx,
                salt: salt.clone(),
                sink: Box::new(ChannelSink {
                    tx: tx.clone(),
                    index,
                }),
            })
            .collect();
        if let Err(e) = lease.batch.submit_all(reqs) {
            if matches!(e, capy_engine::Error::QueueFull { .. }) {
                state
                    .metrics
                    .rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return Err(e.into());
        }
        Ok(Gens {
            rx,
            lease,
            state: Arc::clone(state),
            t0,
            last: vec![None; n],
            prompt_of,
            seen: vec![(0, None); n],
            started: false,
            any_token: false,
            failed: false,
            ticket,
        })
    }

    pub fn n(&self) -> usize {
        self.last.len()
    }

    /// The next event of any choice, with its index.
    pub async fn next(&mut self) -> Option<(usize, Event)> {
        use std::sync::atomic::Ordering::Relaxed;
        let (i, ev) = self.rx.recv().await?;
        let m = &self.state.metrics;
        match &ev {
            Event::Started { .. } => self.started = true,
            Event::Failed(_) => self.failed = true,
            Event::Token { .. } => {
                if let Some(s) = self.seen.get_mut(i) {
                    s.0 += 1;
                }
                if !self.any_token {
                    // the request's first token (the ticket's lock, once per request)
                    self.any_token = true;
                    if let Some(t) = &self.ticket {
                        t.first_token();
                    }
                }
                let now = Instant::now();
                match self.last.get(i).copied().flatten() {
                    Some(prev) => m.itl.observe((now - prev).as_secs_f64()),
                    None => m.ttft.observe((now - self.t0).as_secs_f64()),
                }
                if let Some(l) = self.last.get_mut(i) {
                    *l = Some(now);
                }
                m.generated_tokens.fetch_add(1, Relaxed);
            }
            Event::Done(s) => {
                if let Some(x) = self.seen.get_mut(i) {
                    x.1 = Some((s.completion_tokens, s.cached_tokens));
                }
                m.prompt_tokens.fetch_add(s.prompt_tokens as u64, Relaxed);
                m.cached_tokens.fetch_add(s.cached_tokens as u64, Relaxed);
            }
            _ => {}
        }
        Some((i, ev))
    }

    /// Waits for every choice to end.
    pub async fn collect(mut self) -> Result<Vec<Outcome>, ApiError> {
        let mut out: Vec<Outcome> = (0..self.n()).map(|_| Outcome::default()).collect();
        let mut left = self.n();
        while left > 0 {
            let Some((i, ev)) = self.next().await else {
                return Err(ApiError::internal("the engine stopped"));
            };
            let o = &mut out[i];
            match ev {
                Event::Started { .. } => {}
                Event::PromptLogprobs(lp) => o.prompt_lp = Some(lp),
                Event::Token { token, text } => {
                    o.text.push_str(&text);
                    o.tokens.push(token);
                }
                Event::Done(s) => {
                    o.text.push_str(&s.tail);
                    o.summary = Some(s);
                    left -= 1;
                }
                Event::Failed(m) => return Err(failure(m)),
            }
        }
        Ok(out)
    }
}

/// A streamed response: `produce` writes frames into the sender; it is cancelled (and its
/// generation with it) as soon as the client disconnects.
pub fn stream_response<F, Fut>(content_type: &'static str, produce: F) -> Response
where
    F: FnOnce(Frames) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let closed = tx.clone();
    let fut = produce(Frames(tx));
    tokio::spawn(async move {
        tokio::select! {
            _ = fut => {}
            _ = closed.closed() => {}
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The sending end of a streamed response.
pub struct Frames(mpsc::Sender<Bytes>);

impl Frames {
    /// `false` once the client is gone.
    pub async fn send(&self, frame: String) -> bool {
        self.0.send(Bytes::from(frame)).await.is_ok()
    }

    /// An SSE `data:` frame.
    pub async fn sse(&self, v: &serde_json::Value) -> bool {
        self.send(format!("data: {v}\n\n")).await
    }

    /// One NDJSON line.
    pub async fn line(&self, v: &serde_json::Value) -> bool {
        self.send(format!("{v}\n")).await
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC time with nanoseconds, as Ollama writes it.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = capy_db::time::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// A response id: a prefix and 24 hex digits from the clock and a counter.
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = capy_engine::sampler::Rng::new(nanos ^ N.fetch_add(1, Ordering::Relaxed) << 48);
    format!(
        "{prefix}-{:016x}{:08x}",
        rng.next_u64(),
        rng.next_u64() as u32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let t = |s: u64| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(t(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(t(951_782_400), "2000-02-29T00:00:00.000000000Z");
        assert_eq!(t(1_795_000_000), "2026-11-18T11:06:40.000000000Z");
        assert_ne!(new_id("x"), new_id("x"));
    }
}

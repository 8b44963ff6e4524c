//! Ensembles: N candidates in parallel (a member's samples as one batched request sharing
//! the prompt's cached prefix), then one answer by `vote` (self-consistency: the most
//! frequent extracted answer, Wang et al. 2022), `best-of` (the highest mean token logprob)
//! or `synthesize` (a judge member writes the answer from the candidates; it streams).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use capy_engine::{Event, GenerateParams, Message, SamplingOptions, StopReason};
use regex::Regex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{EnsembleSpec, Strategy, VirtualModel};
use crate::error::ApiError;
use crate::gateway::Ticket;
use crate::gen::Gens;
use crate::AppState;

/// How `vote` reads a candidate's answer.
#[derive(Clone, Debug)]
pub enum Extract {
    /// The last number in the text (`1,000` is 1000; `2.50` is 2.5).
    LastNumber,
    /// The last match of a regular expression: its first group when it has one.
    Regex(Regex),
    /// The whole text.
    Exact,
    /// A field (`a.b` for nested ones) of the first JSON object in the text.
    Json(String),
}

impl Extract {
    /// `last-number`, `regex:PATTERN`, `exact` or `json:FIELD`.
    ///
    /// # Errors
    /// Another name, a bad pattern, an empty field.
    pub fn parse(s: &str) -> Result<Extract, String> {
        if let Some(p) = s.strip_prefix("regex:") {
            let re = regex::RegexBuilder::new(p)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("bad regex: {e}"))?;
            return Ok(Extract::Regex(re));
        }
        if let Some(f) = s.strip_prefix("json:") {
            if f.trim().is_empty() {
                return Err("json: needs a field name (json:answer)".into());
            }
            return Ok(Extract::Json(f.trim().to_string()));
        }
        match s {
            "last-number" => Ok(Extract::LastNumber),
            "exact" => Ok(Extract::Exact),
            o => Err(format!(
                "expected last-number, regex:PATTERN, exact or json:FIELD, got {o:?}"
            )),
        }
    }

    /// The answer in `text`, normalised so that equal answers compare equal (numbers in
    /// one form; text trimmed, whitespace collapsed, lower case), or `None` when there is
    /// none.
    pub fn answer(&self, text: &str) -> Option<String> {
        fn norm(s: &str) -> Option<String> {
            let s = s
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .trim_end_matches(['.', '!', '?'])
                .to_lowercase();
            (!s.is_empty()).then_some(s)
        }
        match self {
            Extract::LastNumber => {
                static NUM: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
                let re = NUM.get_or_init(|| {
                    Regex::new(r"-?\d+(?:,\d{3})*(?:\.\d+)?").expect("a valid pattern")
                });
                let m = re.find_iter(text).last()?;
                let v: f64 = m.as_str().replace(',', "").parse().ok()?;
                Some(if v.fract() == 0.0 && v.abs() < 1e15 {
                    format!("{}", v as i64)
                } else {
                    format!("{v}")
                })
            }
            Extract::Regex(re) => {
                let c = re.captures_iter(text).last()?;
                let m = c.get(1).or_else(|| c.get(0))?;
                norm(m.as_str())
            }
            Extract::Exact => norm(text),
            Extract::Json(field) => {
                let start = text.find('{')?;
                let mut it =
                    serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
                let mut v = it.next()?.ok()?;
                for k in field.split('.') {
                    v = v.get_mut(k)?.take();
                }
                match v {
                    Value::String(s) => norm(&s),
                    Value::Null => None,
                    o => Some(o.to_string()),
                }
            }
        }
    }
}

impl fmt::Display for Extract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Extract::LastNumber => write!(f, "last-number"),
            Extract::Regex(r) => write!(f, "regex:{}", r.as_str()),
            Extract::Exact => write!(f, "exact"),
            Extract::Json(k) => write!(f, "json:{k}"),
        }
    }
}

/// The last user message's text (what a judge is shown as the question), or empty.
pub fn last_user(messages: &[Message]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone())
        .unwrap_or_default()
}

/// What the candidates are asked.
pub enum Input {
    /// A conversation, through each member's chat template.
    Chat(Vec<Message>),
    /// Raw text, tokenized by each member (a completion prompt).
    Text(String),
}

/// A request's generation settings for one member's sampling defaults and a candidate's
/// index (which varies the seed).
pub type ParamsFn = Arc<dyn Fn(&SamplingOptions, usize) -> GenerateParams + Send + Sync>;

/// One ensemble request as the handler parsed it.
pub struct Job {
    pub input: Input,
    /// The question the judge is shown (the last user message, or the prompt).
    pub question: String,
    pub params: ParamsFn,
    /// Ollama's `num_ctx`.
    pub n_ctx: Option<usize>,
    /// The request's `include_candidates` (else the ensemble's setting).
    pub include_candidates: Option<bool>,
}

/// What the ensemble sends the handler: the answer's text in pieces (one piece for `vote`
/// and `best-of`; the judge's tokens for `synthesize`), then `Done`, or `Failed`.
pub enum Out {
    Piece(String),
    Done(Box<Final>),
    Failed(ApiError),
}

/// The end of an ensemble's answer.
pub struct Final {
    pub stop: StopReason,
    /// Every model's prompt tokens (each member's prompt once, the judge's).
    pub prompt_tokens: usize,
    /// Every candidate's tokens and the judge's.
    pub completion_tokens: usize,
    /// Prompt tokens the prefix cache supplied (each member's first candidate's).
    pub cached_tokens: usize,
    /// The `ensemble` extension field: strategy, the chosen candidate, votes, per-member
    /// timing, failures, and the candidates when asked for.
    pub ensemble: Value,
}

/// One candidate's answer.
#[derive(Default)]
struct Cand {
    member: usize,
    text: String,
    lp_sum: f64,
    n_lp: usize,
    tokens: usize,
    /// Prompt tokens the prefix cache supplied.
    cached: usize,
    stop: Option<StopReason>,
    failed: Option<String>,
    seconds: f64,
}

impl Cand {
    fn mean_logprob(&self) -> f64 {
        if self.n_lp == 0 {
            f64::NEG_INFINITY
        } else {
            self.lp_sum / self.n_lp as f64
        }
    }
}

/// A member's part: its name, candidate count, prompt tokens, and why it failed.
struct Member {
    name: String,
    count: usize,
    prompt_tokens: usize,
    error: Option<String>,
    first: usize,
}

/// Starts the ensemble `v` on `job`: acquires every member and queues its samples (a
/// member refused, or not started by the deadline, is skipped unless `on_failure =
/// "fail"`), then answers on a task; the returned receiver hears the answer. Dropping it
/// cancels every candidate. A member's candidates report as they run, and its model is let
/// go once they have all ended (another member may need the room).
///
/// # Errors
/// Every member refused (the first refusal's status), or one refused under
/// `on_failure = "fail"`.
pub async fn start(
    st: &Arc<AppState>,
    v: &VirtualModel,
    spec: &EnsembleSpec,
    job: Job,
    ticket: Option<Arc<Ticket>>,
) -> Result<mpsc::Receiver<Out>, ApiError> {
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::from_std(t0) + spec.deadline;
    // a name listed twice is one batched request with twice the samples
    let mut members: Vec<Member> = Vec::new();
    for m in &spec.members {
        match members.iter_mut().find(|x| &x.name == m) {
            Some(x) => x.count += spec.samples,
            None => members.push(Member {
                name: m.clone(),
                count: spec.samples,
                prompt_tokens: 0,
                error: None,
                first: 0,
            }),
        }
    }
    let mut first = 0;
    for m in &mut members {
        m.first = first;
        first += m.count;
    }
    let job = Arc::new(job);
    // every candidate's events, tagged with its index
    let (etx, erx) = mpsc::unbounded_channel::<(usize, Event)>();
    let starts = members.iter().map(|m| {
        let (st, job, ticket) = (Arc::clone(st), Arc::clone(&job), ticket.clone());
        let (name, count, first) = (m.name.clone(), m.count, m.first);
        let etx = etx.clone();
        let limit = spec.deadline.as_secs_f64();
        async move {
            let go = async {
                let lease = st.registry.acquire(&name, None).await?;
                let prompt = match &job.input {
                    Input::Chat(msgs) => {
                        lease
                            .model
                            .chat_tokens_tools(msgs.clone(), Vec::new(), false)
                            .await?
                    }
                    Input::Text(t) => {
                        lease.model.check_text(t.len(), "prompt")?;
                        let (t, tok) = (t.clone(), Arc::clone(&lease.engine.tokenizer));
                        crate::gen::blocking(move || Ok(tok.encode(&t, true, true)?)).await?
                    }
                };
                let n_ctx = job
                    .n_ctx
                    .unwrap_or(lease.batch.params.n_ctx)
                    .min(lease.batch.params.n_ctx);
                let max_tokens = (job.params)(&lease.sampling, first).max_tokens;
                let asked = if max_tokens == usize::MAX {
                    1
                } else {
                    max_tokens
                };
                if prompt.len().saturating_add(asked) > n_ctx {
                    return Err(ApiError::bad_request(format!(
                        "{name}'s context is {n_ctx} tokens, but {} tokens of prompt and {asked} \
                         to generate were asked for",
                        prompt.len()
                    ))
                    .code("context_length_exceeded"));
                }
                let choices = (0..count)
                    .map(|i| {
                        let mut p = (job.params)(&lease.sampling, first + i);
                        p.logprobs = true;
                        (prompt.clone(), p)
                    })
                    .collect();
                let n_prompt = prompt.len();
                let mut gens = Gens::start(&st, lease, choices, count, job.n_ctx, t0, ticket)?;
                // forward the candidates' events until each has ended, then let the model go
                let task = tokio::spawn(async move {
                    let mut left = count;
                    while left > 0 {
                        let Some((i, ev)) = gens.next().await else {
                            return;
                        };
                        if matches!(ev, Event::Done(_) | Event::Failed(_)) {
                            left -= 1;
                        }
                        if etx.send((first + i, ev)).is_err() {
                            return;
                        }
                    }
                });
                Ok::<_, ApiError>((n_prompt, task))
            };
            match tokio::time::timeout_at(deadline, go).await {
                Ok(r) => r,
                Err(_) => Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "{name} did not start within the ensemble's deadline of {limit} s \
                         (loading, or waiting for room)"
                    ),
                )
                .code("deadline_exceeded")),
            }
        }
    });
    let started = futures_util::future::join_all(starts).await;
    drop(etx);
    let mut tasks = Vec::new();
    let mut first_error: Option<ApiError> = None;
    for (i, r) in started.into_iter().enumerate() {
        match r {
            Ok((n_prompt, task)) => {
                members[i].prompt_tokens = n_prompt;
                tasks.push(task);
            }
            Err(e) => {
                tracing::warn!(ensemble = %v.name, member = %members[i].name,
                               "member left out: {}", e.message);
                members[i].error = Some(e.message.clone());
                if !spec.skip_failed {
                    tasks.iter().for_each(|t| t.abort());
                    let message = format!(
                        "ensemble {}: member {} failed: {}",
                        v.name, members[i].name, e.message
                    );
                    // the member's refusal is the server's state, not the request's fault
                    return Err(if super::router::refused(&e) {
                        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
                            .code("member_failed")
                    } else {
                        ApiError { message, ..e }
                    });
                }
                first_error.get_or_insert(e);
            }
        }
    }
    if tasks.is_empty() {
        let e = first_error.unwrap_or_else(|| ApiError::internal("no members"));
        let why: Vec<String> = members
            .iter()
            .filter_map(|m| m.error.as_ref().map(|e| format!("{}: {e}", m.name)))
            .collect();
        return Err(ApiError {
            message: format!(
                "ensemble {}: no member could take the request ({})",
                v.name,
                why.join("; ")
            ),
            ..e
        });
    }
    let (tx, rx) = mpsc::channel(64);
    let name = v.name.clone();
    let spec = spec.clone();
    let st = Arc::clone(st);
    tokio::spawn(async move {
        let ctx = Answer {
            st,
            name,
            t0,
            deadline,
            ticket,
        };
        let r = answer(&ctx, &spec, &job, members, erx, tasks, &tx).await;
        if let Err(e) = r {
            let _ = tx.send(Out::Failed(e)).await;
        }
    });
    Ok(rx)
}

/// What [`answer`] works for.
struct Answer {
    st: Arc<AppState>,
    name: String,
    t0: Instant,
    deadline: tokio::time::Instant,
    ticket: Option<Arc<Ticket>>,
}

/// Takes one candidate event; `true` when the candidate ended.
fn apply(c: &mut Cand, ev: Event, t0: Instant) -> bool {
    match ev {
        Event::Token { token, text } => {
            c.text.push_str(&text);
            c.tokens += 1;
            if let Some(lp) = token.logprob {
                c.lp_sum += lp as f64;
                c.n_lp += 1;
            }
            false
        }
        Event::Done(s) => {
            c.text.push_str(&s.tail);
            c.stop = Some(s.stop_reason);
            c.tokens = s.completion_tokens;
            c.cached = s.cached_tokens;
            c.seconds = t0.elapsed().as_secs_f64();
            true
        }
        Event::Failed(m) => {
            c.failed = Some(crate::gen::failure(m).message);
            c.seconds = t0.elapsed().as_secs_f64();
            true
        }
        _ => false,
    }
}

/// Collects the candidates until all end or the deadline (what they had sent by then
/// counts), picks or writes the answer and sends it.
async fn answer(
    ctx: &Answer,
    spec: &EnsembleSpec,
    job: &Job,
    mut members: Vec<Member>,
    mut erx: mpsc::UnboundedReceiver<(usize, Event)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tx: &mpsc::Sender<Out>,
) -> Result<(), ApiError> {
    let (st, name, t0, ticket) = (&ctx.st, ctx.name.as_str(), ctx.t0, ctx.ticket.clone());
    let n: usize = members.iter().map(|m| m.count).sum();
    let mut cands: Vec<Cand> = Vec::with_capacity(n);
    let mut left = 0;
    for (mi, m) in members.iter().enumerate() {
        if m.error.is_none() {
            left += m.count;
        }
        for _ in 0..m.count {
            cands.push(Cand {
                member: mi,
                failed: m.error.clone(),
                ..Default::default()
            });
        }
    }
    let abort = |tasks: &[tokio::task::JoinHandle<()>]| tasks.iter().for_each(|t| t.abort());
    let mut deadline_hit = false;
    while left > 0 {
        let ev = tokio::select! {
            biased;
            _ = tx.closed() => {
                abort(&tasks);
                return Ok(());
            }
            r = tokio::time::timeout_at(ctx.deadline, erx.recv()) => r,
        };
        match ev {
            Err(_) => {
                deadline_hit = true;
                // what the candidates sent before the deadline still counts
                while let Ok((i, ev)) = erx.try_recv() {
                    if let Some(c) = cands.get_mut(i) {
                        apply(c, ev, t0);
                    }
                }
                break;
            }
            Ok(None) => break,
            Ok(Some((i, ev))) => {
                if cands.get_mut(i).is_some_and(|c| apply(c, ev, t0)) {
                    left -= 1;
                }
            }
        }
    }
    abort(&tasks);
    drop(tasks);
    let secs = t0.elapsed().as_secs_f64();
    for c in cands
        .iter_mut()
        .filter(|c| c.stop.is_none() && c.seconds == 0.0)
    {
        c.seconds = secs;
    }
    let finished: Vec<usize> = (0..n)
        .filter(|&i| cands[i].stop.is_some() && cands[i].failed.is_none())
        .collect();
    // nothing finished by the deadline: answer from what the candidates wrote so far
    let pool: Vec<usize> = if finished.is_empty() {
        (0..n).filter(|&i| cands[i].failed.is_none()).collect()
    } else {
        finished.clone()
    };
    for (mi, m) in members.iter_mut().enumerate() {
        if m.error.is_none()
            && cands
                .iter()
                .filter(|c| c.member == mi)
                .all(|c| c.failed.is_some())
        {
            m.error = cands
                .iter()
                .find(|c| c.member == mi)
                .and_then(|c| c.failed.clone());
        }
    }
    if pool.is_empty() {
        let why: Vec<String> = members
            .iter()
            .filter_map(|m| m.error.as_ref().map(|e| format!("{}: {e}", m.name)))
            .collect();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "ensemble {name}: every candidate failed ({})",
                why.join("; ")
            ),
        ));
    }
    if finished.is_empty() && pool.iter().all(|&i| cands[i].text.trim().is_empty()) {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "ensemble {name}: no candidate wrote anything within the deadline of {} s",
                spec.deadline.as_secs_f64()
            ),
        )
        .code("deadline_exceeded"));
    }
    let mut ext = json!({"strategy": spec.strategy.name(), "deadline_hit": deadline_hit});
    // the candidate whose text answers (vote, best-of, a judge's fallback)
    let best_of = |pool: &[usize]| -> usize {
        *pool
            .iter()
            .max_by(|&&a, &&b| cands[a].mean_logprob().total_cmp(&cands[b].mean_logprob()))
            .unwrap_or(&pool[0])
    };
    let mut chosen = best_of(&pool);
    let answers: Vec<Option<String>> = cands
        .iter()
        .map(|c| match spec.strategy {
            Strategy::Vote => spec.extract.answer(&c.text),
            _ => None,
        })
        .collect();
    if spec.strategy == Strategy::Vote {
        match vote(&pool, &answers, &|i| cands[i].mean_logprob()) {
            Some((answer, count, pick, tally)) => {
                chosen = pick;
                ext["answer"] = json!(answer);
                ext["votes"] = json!(tally);
                ext["agreement"] = json!(count as f64 / pool.len() as f64);
            }
            None => {
                ext["answer"] = Value::Null;
                ext["note"] = json!("no candidate had an answer to extract; best-of answered");
            }
        }
    }
    let mut judge_used: Option<Value> = None;
    let mut stop = cands[chosen].stop.unwrap_or(StopReason::Length);
    let (mut prompt_tokens, mut completion_tokens) = (
        members.iter().map(|m| m.prompt_tokens).sum::<usize>(),
        cands.iter().map(|c| c.tokens).sum::<usize>(),
    );
    let mut sent = false;
    if spec.strategy == Strategy::Synthesize {
        let judge = spec.judge.clone().unwrap_or_default();
        let tj = Instant::now();
        match synthesize(st, &judge, job, &pool, &cands, t0, ticket, tx).await {
            Ok(Some((s, p, c))) => {
                stop = s;
                prompt_tokens += p;
                completion_tokens += c;
                judge_used = Some(
                    json!({"model": judge, "seconds": tj.elapsed().as_secs_f64(),
                                         "prompt_tokens": p, "completion_tokens": c}),
                );
                sent = true;
            }
            Ok(None) => return Ok(()), // the client left
            Err(e) => {
                tracing::warn!(ensemble = %name, judge = %judge, "judge failed: {}", e.message);
                ext["judge_error"] = json!(format!("{judge}: {}", e.message));
                ext["note"] = json!("the judge failed; best-of answered");
            }
        }
    }
    if !sent
        && tx
            .send(Out::Piece(cands[chosen].text.clone()))
            .await
            .is_err()
    {
        return Ok(());
    }
    if let Some(j) = judge_used {
        ext["judge"] = j;
    } else {
        ext["chosen"] = json!({
            "model": members[cands[chosen].member].name,
            "index": chosen,
            "mean_logprob": finite(cands[chosen].mean_logprob()),
        });
    }
    ext["members"] = members
        .iter()
        .enumerate()
        .map(|(mi, m)| {
            let mine: Vec<&Cand> = cands.iter().filter(|c| c.member == mi).collect();
            let mut o = json!({
                "model": m.name,
                "candidates": m.count,
                "finished": mine.iter().filter(|c| c.stop.is_some() && c.failed.is_none()).count(),
                "seconds": mine.iter().map(|c| c.seconds).fold(0.0, f64::max),
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": mine.iter().map(|c| c.tokens).sum::<usize>(),
            });
            if let Some(e) = &m.error {
                o["error"] = json!(e);
            }
            o
        })
        .collect();
    let failed: Vec<Value> = members
        .iter()
        .filter_map(|m| {
            m.error
                .as_ref()
                .map(|e| json!({"model": m.name, "error": e}))
        })
        .collect();
    if !failed.is_empty() {
        ext["failed"] = json!(failed);
    }
    if job.include_candidates.unwrap_or(spec.include_candidates) {
        ext["candidates"] = cands
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i,
                    "model": members[c.member].name,
                    "text": c.text,
                    "mean_logprob": finite(c.mean_logprob()),
                    "completion_tokens": c.tokens,
                    "finish_reason": match (c.stop, &c.failed) {
                        (_, Some(_)) => "error",
                        (None, _) => "deadline",
                        (Some(StopReason::Length | StopReason::Context), _) => "length",
                        (Some(_), _) => "stop",
                    },
                    "answer": answers[i],
                    "error": c.failed,
                    "seconds": c.seconds,
                })
            })
            .collect();
    }
    let _ = tx
        .send(Out::Done(Box::new(Final {
            stop,
            prompt_tokens,
            completion_tokens,
            cached_tokens: members
                .iter()
                .filter_map(|m| cands.get(m.first).map(|c| c.cached))
                .sum(),
            ensemble: ext,
        })))
        .await;
    Ok(())
}

fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Majority vote over the answers of the candidates in `pool` (`None`s abstain); a tie goes
/// to the answer whose candidates have the highest mean of their mean token logprobs.
/// Returns the answer, its count, the candidate of that answer with the highest mean
/// logprob, and every answer's count; `None` when no candidate has an answer.
pub fn vote(
    pool: &[usize],
    answers: &[Option<String>],
    mean_lp: &dyn Fn(usize) -> f64,
) -> Option<(String, usize, usize, BTreeMap<String, usize>)> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for &i in pool {
        if let Some(a) = answers.get(i).and_then(|a| a.as_deref()) {
            groups.entry(a).or_default().push(i);
        }
    }
    let score = |g: &[usize]| -> f64 {
        let v: Vec<f64> = g
            .iter()
            .map(|&i| mean_lp(i))
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            f64::NEG_INFINITY
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let (answer, members) = groups.iter().max_by(|a, b| {
        a.1.len()
            .cmp(&b.1.len())
            .then(score(a.1).total_cmp(&score(b.1)))
    })?;
    let pick = *members
        .iter()
        .max_by(|&&a, &&b| mean_lp(a).total_cmp(&mean_lp(b)))?;
    let tally = groups
        .iter()
        .map(|(a, g)| (a.to_string(), g.len()))
        .collect();
    Some((answer.to_string(), members.len(), pick, tally))
}

/// The judge's instruction.
pub const JUDGE_SYSTEM: &str = "You are a careful judge. You are given a question and \
candidate answers written by other assistants; some may be wrong. Write the single best final \
answer to the question, correcting mistakes. Do not mention the candidates.";

/// Most bytes of one candidate shown to the judge.
const JUDGE_CANDIDATE_BYTES: usize = 2000;

/// The judge's prompt: the question and the candidates in the pool, each cut to `cap`
/// bytes.
pub fn judge_messages(question: &str, texts: &[&str], cap: usize) -> Vec<Message> {
    let mut u = format!("Question:\n{}\n\nCandidate answers:\n", question.trim());
    for (k, t) in texts.iter().enumerate() {
        let mut t = t.trim();
        if t.len() > cap {
            let mut cut = cap;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t = &t[..cut];
        }
        u.push_str(&format!("\n[{}] {t}\n", k + 1));
    }
    u.push_str("\nWrite the best final answer to the question.");
    vec![
        Message::new("system", JUDGE_SYSTEM),
        Message::new("user", &u),
    ]
}

/// Runs the judge, streaming its tokens as pieces. `Ok(None)`: the client left.
///
/// # Errors
/// The judge was refused or failed before writing anything.
#[allow(clippy::too_many_arguments)]
async fn synthesize(
    st: &Arc<AppState>,
    judge: &str,
    job: &Job,
    pool: &[usize],
    cands: &[Cand],
    t0: Instant,
    ticket: Option<Arc<Ticket>>,
    tx: &mpsc::Sender<Out>,
) -> Result<Option<(StopReason, usize, usize)>, ApiError> {
    let lease = st.registry.acquire(judge, None).await?;
    let texts: Vec<&str> = pool.iter().map(|&i| cands[i].text.as_str()).collect();
    // the candidates are cut shorter until the prompt leaves the judge a quarter of its
    // context to write in
    let n_ctx = job
        .n_ctx
        .unwrap_or(lease.batch.params.n_ctx)
        .min(lease.batch.params.n_ctx);
    let mut cap = JUDGE_CANDIDATE_BYTES;
    let prompt = loop {
        let p = lease
            .model
            .chat_tokens_tools(
                judge_messages(&job.question, &texts, cap),
                Vec::new(),
                false,
            )
            .await?;
        if p.len() <= n_ctx * 3 / 4 || cap <= 64 {
            break p;
        }
        cap /= 2;
    };
    let n_prompt = prompt.len();
    let mut params = (job.params)(&lease.sampling, 0);
    params.logprobs = false;
    params.top_logprobs = 0;
    let mut g = Gens::start(st, lease, vec![(prompt, params)], 1, job.n_ctx, t0, ticket)?;
    let mut wrote = false;
    while let Some((_, ev)) = g.next().await {
        match ev {
            Event::Token { text, .. } if !text.is_empty() => {
                wrote = true;
                if tx.send(Out::Piece(text)).await.is_err() {
                    return Ok(None);
                }
            }
            Event::Done(s) => {
                if !s.tail.is_empty() && tx.send(Out::Piece(s.tail)).await.is_err() {
                    return Ok(None);
                }
                return Ok(Some((s.stop_reason, n_prompt, s.completion_tokens)));
            }
            Event::Failed(m) if !wrote => return Err(crate::gen::failure(m)),
            Event::Failed(m) => {
                let _ = tx.send(Out::Failed(crate::gen::failure(m))).await;
                return Ok(None);
            }
            _ => {}
        }
    }
    Err(ApiError::internal("the judge's engine stopped"))
}

/// Reads an ensemble's whole answer (for a response that is not streamed).
///
/// # Errors
/// The ensemble's failure.
pub async fn collect(mut rx: mpsc::Receiver<Out>) -> Result<(String, Final), ApiError> {
    let mut text = String::new();
    while let Some(o) = rx.recv().await {
        match o {
            Out::Piece(p) => text.push_str(&p),
            Out::Done(f) => return Ok((text, *f)),
            Out::Failed(e) => return Err(e),
        }
    }
    Err(ApiError::internal("the ensemble stopped"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extractors_normalise() {
        let n = Extract::parse("last-number").unwrap();
        assert_eq!(n.answer("so 3 + 4 = 7."), Some("7".into()));
        assert_eq!(n.answer("It costs 1,250.50 dollars"), Some("1250.5".into()));
        assert_eq!(n.answer("-12 degrees, not 1, 2"), Some("2".into()));
        assert_eq!(n.answer("7.0"), Some("7".into()));
        assert_eq!(n.answer("no digits"), None);
        let r = Extract::parse(r"regex:(?i)answer:\s*(\w+)").unwrap();
        assert_eq!(r.answer("Answer: Paris. answer: Lyon"), Some("lyon".into()));
        assert_eq!(r.answer("Paris"), None);
        let e = Extract::parse("exact").unwrap();
        assert_eq!(e.answer("  The   Answer. "), e.answer("the answer"));
        let j = Extract::parse("json:a.b").unwrap();
        assert_eq!(
            j.answer("x {\"a\": {\"b\": \"Yes\"}} y"),
            Some("yes".into())
        );
        assert_eq!(j.answer("{\"a\": {\"b\": 3}}"), Some("3".into()));
        assert_eq!(j.answer("{\"a\": 1}"), None);
        assert!(Extract::parse("regex:(").is_err());
        assert!(Extract::parse("majority").is_err());
        assert_eq!(Extract::parse("json:x").unwrap().to_string(), "json:x");
    }

    #[test]
    fn majority_wins_and_ties_go_to_the_likelier_answer() {
        let a = |s: &[Option<&str>]| s.iter().map(|x| x.map(str::to_string)).collect::<Vec<_>>();
        let lps = [-1.0, -0.5, -2.0, -0.1, -3.0];
        let lp = |i: usize| lps[i];
        // 7 twice, 8 once, one abstains: 7 wins with its likelier candidate (index 1)
        let answers = a(&[Some("7"), Some("7"), Some("8"), None, Some("9")]);
        let (ans, count, pick, tally) = vote(&[0, 1, 2, 3, 4], &answers, &lp).unwrap();
        assert_eq!((ans.as_str(), count, pick), ("7", 2, 1));
        assert_eq!(tally.get("8"), Some(&1));
        // a tie: 8 (mean -2.0) against 9 (-3.0): 8
        let (ans, ..) = vote(&[2, 4], &answers, &lp).unwrap();
        assert_eq!(ans, "8");
        // only candidates in the pool vote
        let (ans, ..) = vote(&[4], &answers, &lp).unwrap();
        assert_eq!(ans, "9");
        assert!(vote(&[3], &answers, &lp).is_none());
    }

    #[test]
    fn the_judge_sees_the_question_and_every_candidate() {
        let long = "x".repeat(5000);
        let m = judge_messages("What is 2+2?", &["4", "5", &long], JUDGE_CANDIDATE_BYTES);
        assert_eq!(m[0].role, "system");
        let u = &m[1].content;
        assert!(u.contains("What is 2+2?") && u.contains("[1] 4") && u.contains("[2] 5"));
        assert!(u.len() < 2600, "a long candidate is cut");
    }
}

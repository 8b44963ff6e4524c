//! The continuous-batching engine against single-sequence generation, with the real model.

mod common;

use std::sync::mpsc;
use std::sync::Arc;

use capy_engine::{
    BatchEngine, BatchParams, ContextParams, Engine, Error, Event, FnSink, GenerateParams, Request,
    SamplerParams, StopReason, Summary,
};

fn engine() -> Engine {
    Engine::load(common::model_path("smollm2-135m")).expect("model loads")
}

fn batcher(e: &Engine, n_slots: usize, max_queue: usize) -> BatchEngine {
    BatchEngine::new(
        Arc::clone(&e.model),
        Arc::clone(&e.tokenizer),
        BatchParams {
            n_slots,
            n_ctx: 512,
            n_batch: 64,
            n_threads: 2,
            max_queue,
            isa: None,
        },
    )
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampler: SamplerParams::greedy(),
        ..Default::default()
    }
}

/// Submits a request; its events arrive on the returned channel.
fn submit(
    b: &BatchEngine,
    prompt: Vec<u32>,
    params: GenerateParams,
) -> Result<mpsc::Receiver<Event>, Error> {
    let (tx, rx) = mpsc::channel();
    b.submit(Request {
        prompt,
        params,
        n_ctx: None,
        sink: Box::new(FnSink(move |ev| tx.send(ev).is_ok())),
    })?;
    Ok(rx)
}

/// Collects a request's events: generated ids, the text as streamed, the summary, and
/// how many prompt tokens the cache supplied.
fn collect(rx: mpsc::Receiver<Event>) -> (Vec<u32>, String, Summary, usize) {
    let (mut ids, mut text, mut cached) = (Vec::new(), String::new(), usize::MAX);
    for ev in rx {
        match ev {
            Event::Started { cached: c } => cached = c,
            Event::Token { token, text: t } => {
                ids.push(token.id);
                text.push_str(&t);
            }
            Event::Done(s) => {
                text.push_str(&s.tail);
                return (ids, text, s, cached);
            }
            Event::Failed(m) => panic!("request failed: {m}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    panic!("the engine dropped a request without Done")
}

const PROMPTS: [&str; 6] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite recipe for pancakes starts with",
];

#[test]
fn batched_greedy_output_equals_single_sequence_generation() {
    let e = engine();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| e.tokenizer.encode(p, true, true).expect("tokenizes"))
        .collect();
    let mut session = e.session(ContextParams {
        n_ctx: 512,
        n_threads: 2,
        n_outputs: 1,
        ..Default::default()
    });
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| {
            session.reset();
            session
                .generate(p, &greedy(24), |_, _| true)
                .expect("generates")
        })
        .collect();

    // four slots for six requests: two wait in the queue and join as others finish
    let b = batcher(&e, 4, 16);
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| submit(&b, p.clone(), greedy(24)).expect("queued"))
        .collect();
    for ((rx, want), p) in rxs.into_iter().zip(&alone).zip(&prompts) {
        let (ids, text, sum, _) = collect(rx);
        let want_ids: Vec<u32> = want.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, want_ids, "tokens for prompt {p:?}");
        assert_eq!(text, want.text);
        assert_eq!(sum.text, want.text);
        assert_eq!(sum.prompt_tokens, p.len());
        assert_eq!(sum.completion_tokens, ids.len());
        let reason = if ids.len() == 24 {
            StopReason::Length
        } else {
            StopReason::Eos
        };
        assert_eq!(sum.stop_reason, reason);
    }
}

#[test]
fn a_repeated_prompt_reuses_the_cached_prefix() {
    let e = engine();
    let b = batcher(&e, 2, 4);
    let prompt = e
        .tokenizer
        .encode("A list of the planets of the solar system:", true, true)
        .expect("tokenizes");
    let (first, _, s1, c1) = collect(submit(&b, prompt.clone(), greedy(8)).expect("queued"));
    let (second, _, s2, c2) = collect(submit(&b, prompt.clone(), greedy(8)).expect("queued"));
    assert_eq!(c1, 0);
    assert_eq!(s1.cached_tokens, 0);
    assert_eq!(c2, prompt.len() - 1, "all but the last prompt token cached");
    assert_eq!(s2.cached_tokens, prompt.len() - 1);
    assert_eq!(first, second);
}

#[test]
fn stop_strings_cut_the_text_and_end_the_request() {
    let e = engine();
    let b = batcher(&e, 1, 4);
    let prompt = e
        .tokenizer
        .encode("1, 2, 3, 4, 5,", true, true)
        .expect("ok");
    let (ids, full, _, _) = collect(submit(&b, prompt.clone(), greedy(16)).expect("queued"));
    assert!(ids.len() > 4, "generated {full:?}");
    // stop on a piece of what greedy decoding produces anyway
    let stop: String = full.chars().skip(3).take(2).collect();
    let mut p = greedy(16);
    p.stop = vec![stop.clone()];
    let (_, text, sum, _) = collect(submit(&b, prompt, p).expect("queued"));
    assert_eq!(sum.stop_reason, StopReason::Stop);
    let cut = full.find(&stop).expect("stop string in the text");
    assert_eq!(text, full[..cut]);
}

#[test]
fn bad_requests_are_refused_before_queueing() {
    let e = engine();
    let b = batcher(&e, 1, 1);
    let too_long = vec![1u32; 600];
    assert!(matches!(
        submit(&b, too_long, greedy(4)),
        Err(Error::PromptTooLong {
            n_prompt: 600,
            n_ctx: 512
        })
    ));
    assert!(matches!(
        submit(&b, vec![], greedy(4)),
        Err(Error::EmptyPrompt)
    ));
    assert!(matches!(
        submit(&b, vec![1, 10_000_000], greedy(4)),
        Err(Error::BadToken { .. })
    ));
}

#[test]
fn a_full_queue_refuses_and_a_dropped_listener_frees_its_slot() {
    let e = engine();
    let b = batcher(&e, 1, 1);
    let prompt = e
        .tokenizer
        .encode("Tell me a long story.", true, true)
        .expect("ok");
    let mut long = greedy(400);
    long.ignore_eos = true;
    // the first takes the only slot and the second the only queue place
    let first = submit(&b, prompt.clone(), long.clone()).expect("queued");
    assert!(matches!(first.recv(), Ok(Event::Started { .. })));
    let second = submit(&b, prompt.clone(), greedy(4)).expect("queued");
    assert!(matches!(
        submit(&b, prompt.clone(), greedy(4)),
        Err(Error::QueueFull { max: 1 })
    ));
    // the first client goes away after one token: its slot must go to the second
    assert!(matches!(first.recv(), Ok(Event::Token { .. })));
    drop(first);
    let (ids, _, sum, _) = collect(second);
    assert!(!ids.is_empty() && sum.completion_tokens == ids.len());
}

#[test]
fn echo_reports_the_prompt_logprobs_of_single_sequence_generation() {
    let e = engine();
    let prompt = e
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog", true, true)
        .expect("ok");
    let mut params = greedy(2);
    params.echo = true;
    params.top_logprobs = 2;
    let mut session = e.session(ContextParams {
        n_ctx: 512,
        n_threads: 2,
        n_outputs: 64,
        ..Default::default()
    });
    let want = session
        .generate(&prompt, &params, |_, _| true)
        .expect("generates")
        .prompt_logprobs
        .expect("echo gives prompt logprobs");
    let b = batcher(&e, 2, 4);
    let rx = submit(&b, prompt.clone(), params).expect("queued");
    let got = rx
        .iter()
        .find_map(|ev| match ev {
            Event::PromptLogprobs(lp) => Some(lp),
            _ => None,
        })
        .expect("prompt logprobs event");
    assert_eq!(got.len(), prompt.len());
    for (g, w) in got.iter().zip(&want) {
        match (g, w) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                assert_eq!(g.id, w.id);
                assert!((g.logprob - w.logprob).abs() < 1e-3, "{g:?} vs {w:?}");
                assert_eq!(g.top.len(), 2);
            }
            _ => panic!("{g:?} vs {w:?}"),
        }
    }
}

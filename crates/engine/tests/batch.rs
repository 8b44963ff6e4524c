//! The continuous-batching engine against single-sequence generation, with the real model.

mod common;

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use capy_engine::{
    BatchEngine, BatchParams, ContextParams, Engine, Error, Event, FnSink, GenerateParams, KvType,
    Request, SamplerParams, StopReason, Summary,
};

fn engine() -> Engine {
    Engine::load(common::model_path("smollm2-135m")).expect("model loads")
}

fn batcher(e: &Engine, n_slots: usize, max_queue: usize) -> BatchEngine {
    batcher_with_pool(e, n_slots, max_queue, None)
}

/// A batching engine whose KV pool has `kv_blocks` blocks (`None`: every slot at 512).
fn batcher_with_pool(
    e: &Engine,
    n_slots: usize,
    max_queue: usize,
    kv_blocks: Option<usize>,
) -> BatchEngine {
    let hp = &e.model.hp;
    let f16 = (KvType::F16, KvType::F16);
    let block =
        capy_engine::KvCache::block_bytes_for(hp.n_layer, hp.n_embd_k(), hp.n_embd_v(), f16);
    BatchEngine::new(
        Arc::clone(&e.model),
        Arc::clone(&e.tokenizer),
        BatchParams {
            n_slots,
            n_ctx: 512,
            kv_bytes: kv_blocks.map(|n| (n * block) as u64),
            type_k: KvType::F16,
            type_v: KvType::F16,
            swa_full: false,
            n_batch: 64,
            n_threads: 2,
            max_queue,
            isa: None,
            ..Default::default()
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
    submit_salted(b, prompt, params, "")
}

fn submit_salted(
    b: &BatchEngine,
    prompt: Vec<u32>,
    params: GenerateParams,
    salt: &str,
) -> Result<mpsc::Receiver<Event>, Error> {
    let (tx, rx) = mpsc::channel();
    b.submit(Request {
        prompt,
        params,
        n_ctx: None,
        salt: salt.to_string(),
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

/// A prompt of about `n` tokens: numbered lines, so no two blocks repeat.
fn long_prompt(e: &Engine, n: usize, tail: &str) -> Vec<u32> {
    let mut text = String::from("Read these notes carefully.\n");
    let mut i = 0;
    while e.tokenizer.encode(&text, true, true).expect("ok").len() < n {
        i += 1;
        text.push_str(&format!(
            "Note {i}: the value of item {i} is {}.\n",
            i * 7 % 13
        ));
    }
    text.push_str(tail);
    e.tokenizer.encode(&text, true, true).expect("ok")
}

#[test]
fn requests_preempted_for_lack_of_blocks_complete_with_the_same_output() {
    let e = engine();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| e.tokenizer.encode(p, true, true).expect("tokenizes"))
        .collect();
    // seeded sampling, so a resumed request must also keep its sampler's state
    let params = |i: usize| {
        let mut p = greedy(150);
        p.ignore_eos = true;
        p.sampler.temperature = 0.8;
        p.sampler.seed = Some(100 + i as u64);
        p
    };
    let run = |b: &BatchEngine| -> Vec<Vec<u32>> {
        let rxs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| submit(b, p.clone(), params(i)).expect("queued"))
            .collect();
        rxs.into_iter()
            .map(|rx| {
                let (ids, _, sum, _) = collect(rx);
                assert_eq!(sum.completion_tokens, 150);
                ids
            })
            .collect()
    };
    let roomy = batcher(&e, 4, 16);
    let want = run(&roomy);
    assert_eq!(roomy.stats().preemptions.load(Ordering::Relaxed), 0);
    // 8 blocks for 4 sequences of 3 blocks each: the newest are preempted as the others grow
    let tight = batcher_with_pool(&e, 4, 16, Some(8));
    let got = run(&tight);
    assert!(
        tight.stats().preemptions.load(Ordering::Relaxed) > 0,
        "the pool was meant to run out"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} differs after preemption");
    }
}

#[test]
fn a_prefix_is_shared_across_sequences_but_not_across_salts() {
    let e = engine();
    let b = batcher(&e, 4, 8);
    let first = long_prompt(&e, 200, "Question: what is the value of item 3?");
    let second = long_prompt(&e, 200, "Question: which item has the value 5?");
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared >= 192, "the prompts share {shared} tokens");
    // the first is still running (a long answer) when the second arrives
    let mut long = greedy(200);
    long.ignore_eos = true;
    let rx1 = submit(&b, first.clone(), long).expect("queued");
    assert!(matches!(rx1.recv(), Ok(Event::Started { cached: 0 })));
    assert!(matches!(rx1.recv(), Ok(Event::Token { .. })));
    let (ids, _, sum, cached) = collect(submit(&b, second.clone(), greedy(12)).expect("queued"));
    // every full block of the shared prefix, and what it shares of the first's partly
    // filled block when that is still in the index (the first's prompt just ended)
    assert!(
        (shared / 64 * 64..=shared).contains(&cached),
        "{cached} of {shared} shared tokens from the cache"
    );
    assert_eq!(sum.cached_tokens, cached);
    // the same answer as without the cache
    let fresh = batcher(&e, 1, 1);
    let (want, _, _, c0) = collect(submit(&fresh, second.clone(), greedy(12)).expect("queued"));
    assert_eq!(c0, 0);
    assert_eq!(ids, want);
    // another tenant computes everything itself
    let (other, _, _, c) =
        collect(submit_salted(&b, second.clone(), greedy(12), "tenant-b").expect("queued"));
    assert_eq!(c, 0, "a different salt shares nothing");
    assert_eq!(other, want);
    // and then finds its own blocks
    let (_, _, _, c) =
        collect(submit_salted(&b, second.clone(), greedy(12), "tenant-b").expect("queued"));
    assert_eq!(c, second.len() - 1);
    drop(rx1);
}

#[test]
fn a_prompt_waits_for_blocks_and_one_larger_than_the_pool_is_refused() {
    let e = engine();
    // 4 blocks: the context is capped at 256 positions
    let b = batcher_with_pool(&e, 2, 4, Some(4));
    assert_eq!(b.params.n_ctx, 256);
    assert!(matches!(
        submit(&b, vec![1u32; 300], greedy(4)),
        Err(Error::PromptTooLong { n_ctx: 256, .. })
    ));
    // two prompts of 3 blocks each: the second waits for the first's blocks
    let p1 = long_prompt(&e, 150, "Summary:");
    let p2 = long_prompt(&e, 160, "In short:");
    assert!(p1.len() > 128 && p2.len() > 128 && p1.len() < 190 && p2.len() < 190);
    let rx1 = submit(&b, p1, greedy(8)).expect("queued");
    let rx2 = submit(&b, p2, greedy(8)).expect("queued");
    let (_, _, s1, _) = collect(rx1);
    let (_, _, s2, _) = collect(rx2);
    assert!(s1.completion_tokens > 0 && s2.completion_tokens > 0);
}

#[test]
fn an_8_bit_kv_cache_generates_what_the_f16_one_does() {
    let e = engine();
    let prompt = e
        .tokenizer
        .encode("The capital of France is", true, true)
        .expect("ok");
    let run = |type_k, type_v| {
        let mut session = e.session(ContextParams {
            n_ctx: 256,
            n_threads: 2,
            n_outputs: 1,
            type_k,
            type_v,
            ..Default::default()
        });
        let out = session
            .generate(&prompt, &greedy(6), |_, _| true)
            .expect("generates");
        (out.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), session)
    };
    let (want, s16) = run(KvType::F16, KvType::F16);
    assert_eq!(s16.ctx.kv.types(), (KvType::F16, KvType::F16));
    for ty in [KvType::Q8_0, KvType::Fp8] {
        let (got, s) = run(ty, ty);
        assert_eq!(s.ctx.kv.types(), (ty, ty));
        assert!(
            s.ctx.kv.bytes() < s16.ctx.kv.bytes() * 6 / 10,
            "{ty} pools are smaller"
        );
        assert_eq!(got[..4], want[..4], "{ty}: the first greedy tokens");
    }
}

/// Gemma 3's local layers keep only their window (512) of a long prompt; a second prompt
/// sharing its start finds the prefix in both groups of layers; the answers are those of a
/// cache keeping every position (`swa_full`).
#[test]
fn sliding_window_layers_keep_their_window_and_answer_as_a_full_cache() {
    let e = Engine::load(common::model_path("gemma3-270m")).expect("model loads");
    let first = long_prompt(&e, 900, "Question: what is the value of item 3?");
    let second = long_prompt(&e, 900, "Question: which item has the value 5?");
    let make = |swa_full: bool| {
        BatchEngine::new(
            Arc::clone(&e.model),
            Arc::clone(&e.tokenizer),
            BatchParams {
                n_slots: 2,
                n_ctx: 2048,
                swa_full,
                n_batch: 64,
                n_threads: 2,
                max_queue: 4,
                ..Default::default()
            },
        )
    };
    let run = |b: &BatchEngine| {
        let (a, _, _, c1) = collect(submit(b, first.clone(), greedy(10)).expect("queued"));
        let (bb, _, _, c2) = collect(submit(b, second.clone(), greedy(10)).expect("queued"));
        (a, bb, c1, c2)
    };
    let full = make(true);
    let windowed = make(false);
    let want = run(&full);
    let got = run(&windowed);
    assert_eq!((got.2, want.2), (0, 0));
    assert!(
        got.3 >= 832,
        "the shared prefix came from the cache ({})",
        got.3
    );
    assert_eq!(got.3, want.3);
    assert_eq!(got.0, want.0, "the first answer");
    assert_eq!(got.1, want.1, "the second answer");
    // the windowed cache is smaller
    let bytes = |b: &BatchEngine| b.stats().kv_bytes.load(Ordering::Relaxed);
    assert!(
        bytes(&windowed) < bytes(&full) * 7 / 10,
        "{} vs {}",
        bytes(&windowed),
        bytes(&full)
    );
}

/// A sink whose listener can leave while its request waits.
struct Leaving {
    gone: Arc<std::sync::atomic::AtomicBool>,
}

impl capy_engine::Sink for Leaving {
    fn send(&mut self, _: Event) -> bool {
        !self.gone.load(Ordering::Relaxed)
    }
    fn is_closed(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }
}

#[test]
fn waiting_requests_whose_client_left_leave_the_queue() {
    let e = engine();
    let b = batcher(&e, 1, 2);
    let prompt = e
        .tokenizer
        .encode("Tell me a story.", true, true)
        .expect("ok");
    let mut long = greedy(300);
    long.ignore_eos = true;
    let first = submit(&b, prompt.clone(), long).expect("queued");
    assert!(matches!(first.recv(), Ok(Event::Started { .. })));
    let gone: Vec<_> = (0..2)
        .map(|_| {
            let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
            b.submit(Request {
                prompt: prompt.clone(),
                params: greedy(4),
                n_ctx: None,
                salt: String::new(),
                sink: Box::new(Leaving {
                    gone: Arc::clone(&flag),
                }),
            })
            .expect("queued");
            flag
        })
        .collect();
    assert!(matches!(
        submit(&b, prompt.clone(), greedy(4)),
        Err(Error::QueueFull { max: 2 })
    ));
    for g in &gone {
        g.store(true, Ordering::Relaxed);
    }
    // within a few steps of the running request the queue is empty again
    let t0 = std::time::Instant::now();
    while b.stats().queued.load(Ordering::Relaxed) > 0 {
        assert!(
            t0.elapsed().as_secs() < 30,
            "the departed requests stay queued"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut four = greedy(4);
    four.ignore_eos = true;
    let (ids, _, _, _) = collect(submit(&b, prompt.clone(), four).expect("room again"));
    assert_eq!(ids.len(), 4);
    drop(first);
}

/// Gemma 3 with long prompts in a pool too small for all of them: preempted requests (whose
/// local layers had released blocks) resume and answer as with a roomy pool.
#[test]
fn preemption_with_sliding_window_layers_keeps_the_answers() {
    let e = Engine::load(common::model_path("gemma3-270m")).expect("model loads");
    let prompts: Vec<Vec<u32>> = ["What is item 2?", "What is item 5?", "Which is largest?"]
        .iter()
        .map(|q| long_prompt(&e, 600, q))
        .collect();
    let make = |blocks: Option<usize>| {
        let mut p = BatchParams {
            n_slots: 3,
            n_ctx: 1024,
            n_batch: 64,
            n_threads: 2,
            max_queue: 4,
            ..Default::default()
        };
        p.kv_bytes = blocks.map(|n| p.kv_bytes_for(&e.model.hp, n));
        BatchEngine::new(Arc::clone(&e.model), Arc::clone(&e.tokenizer), p)
    };
    let run = |b: &BatchEngine| -> Vec<Vec<u32>> {
        let mut params = greedy(64);
        params.ignore_eos = true;
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| submit(b, p.clone(), params.clone()).expect("queued"))
            .collect();
        rxs.into_iter().map(|rx| collect(rx).0).collect()
    };
    let want = run(&make(None));
    // the shared start (9 blocks) once and a block each for two ends: they outgrow it
    let tight = make(Some(12));
    let got = run(&tight);
    assert!(
        tight.stats().preemptions.load(Ordering::Relaxed) > 0,
        "meant to run out"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} differs after preemption");
    }
}

/// Requests arriving together with the same long start (the choices of `n` > 1, clients
/// sharing a system prompt): one computes it, the others wait for its blocks and take them
/// from the cache instead of computing them again.
#[test]
fn requests_arriving_together_compute_a_shared_start_once() {
    let e = engine();
    let b = batcher(&e, 4, 8);
    let prompt = long_prompt(&e, 300, "Question: what is the value of item 3?");
    let rxs: Vec<_> = (0..4)
        .map(|_| submit(&b, prompt.clone(), greedy(8)).expect("queued"))
        .collect();
    let outs: Vec<_> = rxs.into_iter().map(collect).collect();
    let mut cached: Vec<usize> = outs.iter().map(|o| o.3).collect();
    cached.sort_unstable();
    assert_eq!(cached[0], 0, "the first computes everything");
    for &c in &cached[1..] {
        assert!(
            c >= prompt.len() / 64 * 64,
            "the others find the shared blocks: {cached:?}"
        );
    }
    for o in &outs[1..] {
        assert_eq!(o.0, outs[0].0, "the same answer");
    }
    let st = b.stats();
    assert_eq!(
        st.prompt_tokens.load(Ordering::Relaxed) - st.cached_tokens.load(Ordering::Relaxed),
        (prompt.len() + 3 * (prompt.len() - cached[1])) as u64
    );
}

/// Requests arriving together with the same short prompt (under one block: an ensemble's
/// samples, the choices of `n` > 1): one computes it, the others copy its partly filled
/// block once it is done and compute only the last token; the answers are the same.
#[test]
fn the_same_short_prompt_is_computed_once() {
    let e = engine();
    let b = batcher(&e, 5, 8);
    let prompt = e
        .tokenizer
        .encode(
            "Question: what is 12 + 30? Answer with a number.",
            true,
            true,
        )
        .expect("encodes");
    assert!(prompt.len() < 64);
    let rxs: Vec<_> = (0..5)
        .map(|_| submit(&b, prompt.clone(), greedy(8)).expect("queued"))
        .collect();
    let outs: Vec<_> = rxs.into_iter().map(collect).collect();
    let mut cached: Vec<usize> = outs.iter().map(|o| o.3).collect();
    cached.sort_unstable();
    assert_eq!(
        cached,
        [
            0,
            prompt.len() - 1,
            prompt.len() - 1,
            prompt.len() - 1,
            prompt.len() - 1
        ]
    );
    for o in &outs[1..] {
        assert_eq!(o.0, outs[0].0, "the same answer");
    }
    // a different prompt with the same start does not wait for it, nor copy past the start
    let other = e
        .tokenizer
        .encode(
            "Question: what is 12 + 31? Answer with a number.",
            true,
            true,
        )
        .expect("encodes");
    let (ids, ..) = collect(submit(&b, other.clone(), greedy(8)).expect("queued"));
    let b2 = batcher(&e, 1, 1);
    let (alone, ..) = collect(submit(&b2, other, greedy(8)).expect("queued"));
    assert_eq!(ids, alone);
}

/// Speculation in the batching engine (a draft model that disagrees now and then, and
/// n-gram lookup) gives the plain engine's greedy tokens, alone (long guesses) and with
/// several requests sharing steps (fewer guesses each, then none).
#[test]
fn speculative_batches_give_the_plain_greedy_output() {
    let e = engine();
    let dir = std::env::temp_dir().join(format!("capy-batch-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let draft_path = dir.join("draft-q4_0.gguf");
    capy_model::quantize::quantize_file(
        &common::model_path("smollm2-135m"),
        &draft_path,
        capy_model::quantize::FileType::Q4_0,
        2,
        &mut |_, _, _| {},
    )
    .unwrap();
    let draft = Engine::load(&draft_path).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| e.tokenizer.encode(p, true, true).expect("tokenizes"))
        .collect();
    let plain = batcher(&e, 4, 16);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| collect(submit(&plain, p.clone(), greedy(40)).unwrap()).0)
        .collect();
    drop(plain);
    for (ty, p_min) in [
        (capy_engine::SpecType::Draft, 0.0),
        (capy_engine::SpecType::Ngram, 0.75),
    ] {
        let params = BatchParams {
            n_slots: 4,
            n_ctx: 512,
            n_batch: 64,
            n_threads: 2,
            max_queue: 16,
            spec: Some((
                ty,
                capy_engine::SpecParams {
                    draft_max: 6,
                    p_min,
                    ngram_min: 1,
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let b = BatchEngine::with_draft(
            Arc::clone(&e.model),
            Arc::clone(&e.tokenizer),
            params,
            Some(Arc::clone(&draft.model)),
        );
        // one at a time: every step guesses
        for (p, w) in prompts.iter().zip(&want).take(2) {
            let (ids, _, sum, _) = collect(submit(&b, p.clone(), greedy(40)).unwrap());
            assert_eq!(&ids, w, "{ty:?} alone: {p:?}");
            assert_eq!(sum.completion_tokens, ids.len());
        }
        // all together: four share each step, two wait
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| submit(&b, p.clone(), greedy(40)).unwrap())
            .collect();
        for ((rx, w), p) in rxs.into_iter().zip(&want).zip(&prompts) {
            let (ids, _, _, _) = collect(rx);
            assert_eq!(&ids, w, "{ty:?} together: {p:?}");
        }
        // a seeded sampled request gives the same tokens each time (the draft's draws
        // restart from the request's seed), with a repeat penalty too
        let seeded = GenerateParams {
            max_tokens: 24,
            sampler: SamplerParams {
                temperature: 0.7,
                seed: Some(5),
                repeat_penalty: 1.2,
                ..Default::default()
            },
            ..Default::default()
        };
        let runs: Vec<Vec<u32>> = (0..3)
            .map(|i| {
                let params = if i == 1 {
                    GenerateParams {
                        sampler: SamplerParams {
                            seed: Some(6),
                            ..seeded.sampler.clone()
                        },
                        ..seeded.clone()
                    }
                } else {
                    seeded.clone()
                };
                collect(submit(&b, prompts[1].clone(), params).unwrap()).0
            })
            .collect();
        assert_eq!(runs[0], runs[2], "{ty:?}: seed 5 twice, seed 6 between");
        let st = b.stats();
        let (d, a) = (
            st.spec_drafted.load(Ordering::Relaxed),
            st.spec_accepted.load(Ordering::Relaxed),
        );
        eprintln!("{ty:?}: {d} proposed, {a} accepted");
        assert!(d > 0 && a > 0, "{ty:?}: speculation ran");
        if ty == capy_engine::SpecType::Draft {
            assert!(a < d, "some guesses were rejected");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

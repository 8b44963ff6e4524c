//! Prometheus metrics: request and token counters, latency histograms, and gauges read
//! from the registry and the engines at scrape time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::registry::Registry;

/// A histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// sum in microseconds
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// `capy_grammar_mask_seconds`: the engine's [`capy_engine::grammar::MASK_TIMES`].
fn render_mask_times(out: &mut String) {
    use capy_engine::grammar::{MASK_BUCKETS, MASK_TIMES};
    let name = "capy_grammar_mask_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to compute a constrained sequence's allowed tokens (structured outputs), per token.\n# TYPE {name} histogram"
    );
    let (counts, sum) = MASK_TIMES.snapshot();
    let mut cum = 0;
    for (b, c) in MASK_BUCKETS.iter().zip(&counts) {
        cum += c;
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
    }
    let count: u64 = counts.iter().sum();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}

const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

pub struct Metrics {
    /// (endpoint, status) -> count
    requests: Mutex<Vec<((&'static str, u16), u64)>>,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub rejected: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(Vec::new()),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            rejected: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        match r.iter_mut().find(|(k, _)| *k == (endpoint, status)) {
            Some((_, n)) => *n += 1,
            None => r.push(((endpoint, status), 1)),
        }
    }

    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP capy_requests_total HTTP requests by endpoint and status.\n# TYPE capy_requests_total counter"
        );
        for ((ep, st), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "capy_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "capy_prompt_tokens_total",
            "Prompt tokens received.",
            ld(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "capy_prompt_tokens_cached_total",
            "Prompt tokens taken from the prefix cache.",
            ld(&self.cached_tokens),
        );
        counter(
            &mut out,
            "capy_generated_tokens_total",
            "Tokens generated.",
            ld(&self.generated_tokens),
        );
        counter(
            &mut out,
            "capy_requests_rejected_total",
            "Requests refused because the queue was full.",
            ld(&self.rejected),
        );
        self.ttft.render(
            &mut out,
            "capy_time_to_first_token_seconds",
            "Time from request to first generated token.",
        );
        self.itl.render(
            &mut out,
            "capy_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        render_mask_times(&mut out);
        let loaded = registry.loaded();
        let (mut queued, mut running, mut kv_used, mut kv_cap) = (0, 0, 0, 0);
        let (mut blocks, mut blocks_free, mut block_bytes_used, mut pool_bytes) = (0, 0, 0, 0);
        let (mut blocks_cached, mut preemptions) = (0, registry.retired_preemptions());
        let r = registry.retired();
        let mut spec = [
            r.spec_drafted.load(Ordering::Relaxed),
            r.spec_accepted.load(Ordering::Relaxed),
            r.spec_steps.load(Ordering::Relaxed),
        ];
        for l in &loaded {
            let st = l.model.batch.stats();
            queued += st.queued.load(Ordering::Relaxed);
            running += st.running.load(Ordering::Relaxed);
            kv_used += st.kv_used.load(Ordering::Relaxed);
            let (total, free) = (
                st.kv_blocks.load(Ordering::Relaxed),
                st.kv_blocks_free.load(Ordering::Relaxed),
            );
            blocks += total;
            blocks_free += free;
            blocks_cached += st.kv_blocks_cached.load(Ordering::Relaxed);
            preemptions += st.preemptions.load(Ordering::Relaxed);
            spec[0] += st.spec_drafted.load(Ordering::Relaxed);
            spec[1] += st.spec_accepted.load(Ordering::Relaxed);
            spec[2] += st.spec_steps.load(Ordering::Relaxed);
            block_bytes_used += st.kv_bytes_used.load(Ordering::Relaxed);
            pool_bytes += st.kv_bytes.load(Ordering::Relaxed);
            kv_cap += st.kv_capacity.load(Ordering::Relaxed);
        }
        gauge(
            &mut out,
            "capy_queue_depth",
            "Requests waiting for a sequence slot.",
            queued as f64,
        );
        gauge(
            &mut out,
            "capy_running_sequences",
            "Sequences being processed.",
            running as f64,
        );
        gauge(
            &mut out,
            "capy_kv_cache_used_tokens",
            "KV cache positions of running sequences (a block shared by several counts for each).",
            kv_used as f64,
        );
        gauge(
            &mut out,
            "capy_kv_cache_capacity_tokens",
            "KV cache positions the block pools of all loaded models hold (their full-attention layers; sliding-window layers keep only their window).",
            kv_cap as f64,
        );
        // bytes of blocks, not positions: sequences sharing cached blocks count them once,
        // and the blocks of sliding-window layers are smaller
        let usage = if pool_bytes > 0 {
            block_bytes_used as f64 / pool_bytes as f64
        } else {
            0.0
        };
        gauge(
            &mut out,
            "capy_kv_cache_usage_ratio",
            "Share of the KV cache pools' bytes in blocks held by running sequences.",
            usage,
        );
        gauge(
            &mut out,
            "capy_kv_cache_blocks",
            "KV cache blocks (64 positions each) in the pools of all loaded models.",
            blocks as f64,
        );
        gauge(
            &mut out,
            "capy_kv_cache_blocks_used",
            "KV cache blocks held by running sequences.",
            blocks.saturating_sub(blocks_free) as f64,
        );
        gauge(
            &mut out,
            "capy_kv_cache_blocks_cached",
            "KV cache blocks no sequence holds, kept for the prefix cache until the pool needs them.",
            blocks_cached as f64,
        );
        gauge(
            &mut out,
            "capy_kv_cache_blocks_free",
            "KV cache blocks holding nothing.",
            blocks_free.saturating_sub(blocks_cached) as f64,
        );
        counter(
            &mut out,
            "capy_speculative_drafted_tokens_total",
            "Tokens proposed by speculative decoding (draft model or n-gram) and checked by the target.",
            spec[0],
        );
        counter(
            &mut out,
            "capy_speculative_accepted_tokens_total",
            "Proposed tokens the target kept (acceptance rate: accepted / drafted).",
            spec[1],
        );
        counter(
            &mut out,
            "capy_speculative_steps_total",
            "Steps that checked proposed tokens (mean accepted length: accepted / steps).",
            spec[2],
        );
        counter(
            &mut out,
            "capy_kv_cache_preemptions_total",
            "Requests taken off their sequence for lack of KV cache blocks, to be recomputed (models since unloaded included).",
            preemptions,
        );
        gauge(
            &mut out,
            "capy_kv_cache_used_bytes",
            "Bytes of the KV cache blocks held by running sequences.",
            block_bytes_used as f64,
        );
        gauge(
            &mut out,
            "capy_kv_cache_bytes",
            "Bytes of the KV cache block pools of all loaded models.",
            pool_bytes as f64,
        );
        gauge(
            &mut out,
            "capy_models_loaded",
            "Models in memory.",
            loaded.len() as f64,
        );
        gauge(
            &mut out,
            "capy_memory_used_bytes",
            "Bytes counted against the memory budget.",
            registry.used_bytes() as f64,
        );
        if let Some(b) = registry.cfg.memory_budget {
            gauge(
                &mut out,
                "capy_memory_budget_bytes",
                "The memory budget.",
                b as f64,
            );
        }
        let _ = writeln!(
            out,
            "# HELP capy_model_loaded A loaded model.\n# TYPE capy_model_loaded gauge"
        );
        for l in &loaded {
            let _ = writeln!(
                out,
                "capy_model_loaded{{model=\"{}\"}} 1",
                l.model.name.replace('"', "'")
            );
        }
        out
    }
}

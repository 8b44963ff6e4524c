//! Structural checks on tiny random-weight models written by the test itself: batched
//! prefill equals token-by-token decoding, sequences in one batch do not see each other,
//! bad batches and missing tensors give errors.

use std::sync::Arc;

use capy_gguf::{Array, GgmlType, Gguf, GgufWriter, Value};
use capy_kernels::blocks::{as_bytes, BlockQ8_0};
use capy_kernels::quant::quantize::quantize_q8_0;
use capy_model::{Batch, Context, ContextParams, Error, Model};

struct Rng(u64);
impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

const N_EMBD: usize = 64;
const N_FF: usize = 96;
const N_VOCAB: usize = 50;
const N_LAYER: usize = 2;

fn q8(rng: &mut Rng, rows: usize, cols: usize, scale: f32) -> Vec<u8> {
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * scale).collect();
    let mut b = vec![
        BlockQ8_0 {
            d: half::f16::ZERO,
            qs: [0; 32]
        };
        rows * cols / 32
    ];
    quantize_q8_0(&x, &mut b);
    as_bytes(&b).to_vec()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A random model of `arch` ("llama" or "gemma3"); `skip` leaves one tensor out.
fn tiny(arch: &str, skip: Option<&str>) -> Vec<u8> {
    let mut rng = Rng(0x1234_5678);
    let mut w = GgufWriter::new();
    let (n_head, n_head_kv, head_dim) = (4usize, 2usize, 16usize);
    w.add_metadata("general.architecture", Value::String(arch.into()));
    let k = |s: &str| format!("{arch}.{s}");
    w.add_metadata(&k("embedding_length"), Value::U32(N_EMBD as u32));
    w.add_metadata(&k("block_count"), Value::U32(N_LAYER as u32));
    w.add_metadata(&k("feed_forward_length"), Value::U32(N_FF as u32));
    w.add_metadata(&k("attention.head_count"), Value::U32(n_head as u32));
    w.add_metadata(&k("attention.head_count_kv"), Value::U32(n_head_kv as u32));
    w.add_metadata(&k("attention.key_length"), Value::U32(head_dim as u32));
    w.add_metadata(&k("attention.value_length"), Value::U32(head_dim as u32));
    w.add_metadata(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6));
    w.add_metadata(&k("context_length"), Value::U32(128));
    if arch == "gemma3" {
        w.add_metadata(&k("attention.sliding_window"), Value::U32(4));
        w.add_metadata(&k("attention.sliding_window_pattern"), Value::U32(2));
    }
    let tokens: Vec<String> = (0..N_VOCAB).map(|i| format!("t{i}")).collect();
    w.add_metadata("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    let mut add = |name: &str, ty: GgmlType, dims: &[u64], data: Vec<u8>| {
        if Some(name) != skip {
            w.add_tensor(name, ty, dims, data).unwrap();
        }
    };
    add(
        "token_embd.weight",
        GgmlType::Q8_0,
        &[N_EMBD as u64, N_VOCAB as u64],
        q8(&mut rng, N_VOCAB, N_EMBD, 1.0),
    );
    let ones = f32s(&vec![1.0; N_EMBD]);
    add(
        "output_norm.weight",
        GgmlType::F32,
        &[N_EMBD as u64],
        ones.clone(),
    );
    let (q, kv) = ((n_head * head_dim) as u64, (n_head_kv * head_dim) as u64);
    let e = N_EMBD as u64;
    for il in 0..N_LAYER {
        let n = |s: &str| format!("blk.{il}.{s}.weight");
        add(&n("attn_norm"), GgmlType::F32, &[e], ones.clone());
        add(&n("ffn_norm"), GgmlType::F32, &[e], ones.clone());
        add(
            &n("attn_q"),
            GgmlType::Q8_0,
            &[e, q],
            q8(&mut rng, q as usize, N_EMBD, 0.3),
        );
        add(
            &n("attn_k"),
            GgmlType::Q8_0,
            &[e, kv],
            q8(&mut rng, kv as usize, N_EMBD, 0.3),
        );
        add(
            &n("attn_v"),
            GgmlType::Q8_0,
            &[e, kv],
            q8(&mut rng, kv as usize, N_EMBD, 0.3),
        );
        add(
            &n("attn_output"),
            GgmlType::Q8_0,
            &[q, e],
            q8(&mut rng, N_EMBD, q as usize, 0.3),
        );
        add(
            &n("ffn_gate"),
            GgmlType::Q8_0,
            &[e, N_FF as u64],
            q8(&mut rng, N_FF, N_EMBD, 0.3),
        );
        add(
            &n("ffn_up"),
            GgmlType::Q8_0,
            &[e, N_FF as u64],
            q8(&mut rng, N_FF, N_EMBD, 0.3),
        );
        add(
            &n("ffn_down"),
            GgmlType::Q8_0,
            &[N_FF as u64, e],
            q8(&mut rng, N_EMBD, N_FF, 0.3),
        );
        if arch == "gemma3" {
            let hd = f32s(&vec![1.0; head_dim]);
            add(
                &n("attn_q_norm"),
                GgmlType::F32,
                &[head_dim as u64],
                hd.clone(),
            );
            add(&n("attn_k_norm"), GgmlType::F32, &[head_dim as u64], hd);
            add(&n("post_attention_norm"), GgmlType::F32, &[e], ones.clone());
            add(&n("post_ffw_norm"), GgmlType::F32, &[e], ones.clone());
        }
    }
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

fn load(arch: &str) -> Arc<Model> {
    Arc::new(Model::from_gguf(Arc::new(Gguf::from_bytes(tiny(arch, None)).unwrap())).unwrap())
}

fn ctx(model: &Arc<Model>, n_seq: usize, n_threads: usize) -> Context {
    Context::new(
        Arc::clone(model),
        ContextParams {
            n_ctx: 32,
            n_seq,
            kv_blocks: None,
            type_k: Default::default(),
            type_v: Default::default(),
            swa_full: false,
            n_batch: 24,
            n_outputs: 16,
            n_threads,
            isa: None,
        },
    )
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const PROMPT: [u32; 10] = [3, 17, 5, 42, 8, 8, 1, 30, 22, 9];

#[test]
fn batched_prefill_equals_one_token_at_a_time() {
    for arch in ["llama", "gemma3"] {
        let model = load(arch);
        let mut a = ctx(&model, 1, 2);
        let mut batch = Batch::new();
        for (p, &t) in PROMPT.iter().enumerate() {
            batch.push(t, p, 0, true);
        }
        let all = a.decode(&batch).unwrap().to_vec();
        assert_eq!(all.len(), PROMPT.len() * N_VOCAB);
        let mut b = ctx(&model, 1, 1);
        for (p, &t) in PROMPT.iter().enumerate() {
            batch.clear();
            batch.push(t, p, 0, true);
            let one = b.decode(&batch).unwrap();
            let want = &all[p * N_VOCAB..(p + 1) * N_VOCAB];
            assert!(
                max_diff(one, want) < 1e-3,
                "{arch} position {p}: {}",
                max_diff(one, want)
            );
        }
        assert!(all.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn every_isa_gives_the_logits_of_the_scalar_kernels() {
    for arch in ["llama", "gemma3"] {
        let model = load(arch);
        let mut batch = Batch::new();
        for (p, &t) in PROMPT.iter().enumerate() {
            batch.push(t, p, 0, true);
        }
        let run = |isa: capy_kernels::Isa| {
            let params = ContextParams {
                n_ctx: 32,
                n_seq: 1,
                kv_blocks: None,
                type_k: Default::default(),
                type_v: Default::default(),
                swa_full: false,
                n_batch: 24,
                n_outputs: 16,
                n_threads: 2,
                isa: Some(isa),
            };
            let mut c = Context::new(Arc::clone(&model), params);
            c.decode(&batch).unwrap().to_vec()
        };
        let reference = run(capy_kernels::Isa::Scalar);
        for isa in capy_kernels::Isa::all_available() {
            let got = run(isa);
            assert!(
                max_diff(&got, &reference) < 2e-2,
                "{arch} {}: {}",
                isa.name(),
                max_diff(&got, &reference)
            );
        }
    }
}

#[test]
fn sequences_in_one_batch_are_independent() {
    for arch in ["llama", "gemma3"] {
        let model = load(arch);
        // alone
        let mut solo = ctx(&model, 1, 2);
        let mut batch = Batch::new();
        for (p, &t) in PROMPT.iter().enumerate() {
            batch.push(t, p, 0, p + 1 == PROMPT.len());
        }
        let want = solo.decode(&batch).unwrap().to_vec();
        // interleaved with another sequence of different tokens
        let mut multi = ctx(&model, 2, 2);
        batch.clear();
        for (p, &t) in PROMPT.iter().enumerate() {
            batch.push((t + 7) % N_VOCAB as u32, p, 1, false);
            batch.push(t, p, 0, p + 1 == PROMPT.len());
        }
        let got = multi.decode(&batch).unwrap();
        assert!(
            max_diff(got, &want) < 1e-3,
            "{arch}: {}",
            max_diff(got, &want)
        );
    }
}

#[test]
fn bad_batches_are_errors() {
    let model = load("llama");
    let mut c = ctx(&model, 1, 1);
    let mut b = Batch::new();
    b.push(N_VOCAB as u32, 0, 0, true);
    assert!(matches!(c.decode(&b), Err(Error::BadToken { .. })));
    b.clear();
    b.push(1, 5, 0, true); // gap: the cache is empty
    assert!(matches!(c.decode(&b), Err(Error::BadBatch(_))));
    b.clear();
    b.push(1, 0, 3, true);
    assert!(matches!(c.decode(&b), Err(Error::BadSequence { .. })));
    b.clear();
    b.push(1, 40, 0, true);
    assert!(matches!(c.decode(&b), Err(Error::ContextFull { .. })));
    b.clear();
    for p in 0..25 {
        b.push(1, p, 0, false);
    }
    assert!(matches!(c.decode(&b), Err(Error::BatchTooLarge { .. })));
}

#[test]
fn missing_tensor_and_unknown_arch_are_clear_errors() {
    let bytes = tiny("llama", Some("blk.1.ffn_up.weight"));
    let err = Model::from_gguf(Arc::new(Gguf::from_bytes(bytes).unwrap())).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor(t) if t == "blk.1.ffn_up.weight"),
        "{err}"
    );
    let bytes = tiny("mamba", None);
    let err = Model::from_gguf(Arc::new(Gguf::from_bytes(bytes).unwrap())).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownArch(a) if a == "mamba"),
        "{err}"
    );
}

/// Gemma 3's local layers (window 4 here) release their blocks behind the window; what
/// they compute is what a cache keeping every position (`swa_full`) computes, through a
/// rollback behind the window too (the released blocks are taken back from the cache).
#[test]
fn sliding_window_layers_that_release_blocks_compute_what_full_ones_do() {
    let model = load("gemma3");
    let tok = |p: usize| ((p * 7 + 3) % N_VOCAB) as u32;
    let run = |swa_full: bool| {
        let params = ContextParams {
            n_ctx: 256,
            n_seq: 1,
            kv_blocks: None,
            type_k: Default::default(),
            type_v: Default::default(),
            swa_full,
            n_batch: 16,
            n_outputs: 16,
            n_threads: 2,
            isa: None,
        };
        let mut c = Context::new(Arc::clone(&model), params);
        let mut out = Vec::new();
        let mut batch = Batch::new();
        let mut pass = |c: &mut Context, from: usize, to: usize, salt: usize| {
            for p0 in (from..to).step_by(16) {
                batch.clear();
                for p in p0..(p0 + 16).min(to) {
                    batch.push(tok(p + salt), p, 0, p + 1 == (p0 + 16).min(to));
                }
                out.extend_from_slice(c.decode(&batch).unwrap());
            }
        };
        pass(&mut c, 0, 200, 0);
        let cached_after_200 = c.kv.block_counts().cached;
        // back to position 60, behind the window and its slack, with other tokens
        pass(&mut c, 60, 180, 1);
        (out, cached_after_200)
    };
    let (full, full_cached) = run(true);
    let (swa, swa_cached) = run(false);
    assert_eq!(full_cached, 0, "a full cache releases nothing");
    assert_eq!(
        swa_cached, 1,
        "the local layers' first block went back to the pool"
    );
    assert_eq!(full.len(), swa.len());
    assert!(full.iter().all(|v| v.is_finite()));
    assert_eq!(full, swa, "the same logits, bit for bit");
}

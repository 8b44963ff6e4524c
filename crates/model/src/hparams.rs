//! Model hyper-parameters read from GGUF metadata, and the per-family differences.

use capy_gguf::Gguf;

use crate::{Error, Result};

/// Supported architectures (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama, Mistral, SmolLM2 and other llama-shaped models.
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
    /// BitNet b1.58 as llama.cpp's `bitnet`: llama-shaped with NeoX RoPE, an RMSNorm before
    /// the attention output projection (`attn_sub_norm`) and before the FFN down projection
    /// (`ffn_sub_norm`), optional per-tensor scales (`blk.N.*.scale`) multiplying the
    /// projections' outputs, and the token embeddings as the output matrix.
    Bitnet,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Arch> {
        Ok(match s {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            "bitnet" => Arch::Bitnet,
            other => return Err(Error::UnknownArch(other.to_string())),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Bitnet => "bitnet",
        }
    }
}

/// Feed-forward gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: silu(gate) * up.
    Silu,
    /// GeGLU: gelu_tanh(gate) * up.
    Gelu,
}

#[derive(Clone, Debug)]
pub struct Hparams {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Dimension of one query/key head.
    pub head_dim: usize,
    /// Dimension of one value head.
    pub head_dim_v: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3 uses 10000 there).
    pub rope_base_swa: f32,
    pub rope_freq_scale: f32,
    /// Rotated dimensions per head.
    pub rope_dim: usize,
    /// NeoX-style rotation (halves) instead of GPT-J-style (adjacent pairs).
    pub rope_neox: bool,
    /// Sliding window length in tokens (0 = none).
    pub sliding_window: usize,
    /// Per layer: does it use the sliding window?
    pub swa_layers: Vec<bool>,
    /// Scale applied to q·k.
    pub attn_scale: f32,
    /// Multiplier applied to token embeddings.
    pub embd_scale: f32,
    pub activation: Activation,
    /// Extra RMSNorms after attention and FFN (Gemma's "sandwich" norms).
    pub post_norms: bool,
    /// RMSNorm on each q and k head.
    pub qk_norm: bool,
    /// RMSNorms on the inputs of the attention output and FFN down projections (BitNet's
    /// `attn_sub_norm`, `ffn_sub_norm`).
    pub sub_norms: bool,
    /// Biases on q, k, v projections.
    pub qkv_bias: bool,
    /// `tanh` soft-cap on final logits (0 = none).
    pub final_logit_softcap: f32,
    /// `tanh` soft-cap on attention scores (0 = none).
    pub attn_logit_softcap: f32,
}

impl Hparams {
    pub fn from_gguf(g: &Gguf) -> Result<Hparams> {
        let arch_name = g
            .get_str("general.architecture")?
            .ok_or_else(|| Error::MissingKey("general.architecture".into()))?;
        let arch = Arch::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            g.get_usize(&key(k))?
                .ok_or_else(|| Error::MissingKey(key(k)))
        };
        let n_embd = req("embedding_length")?;
        let n_layer = req("block_count")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = g
            .get_usize(&key("attention.head_count_kv"))?
            .unwrap_or(n_head);
        let n_ff = req("feed_forward_length")?;
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || n_layer == 0 || n_embd == 0 {
            return Err(Error::BadHparams(format!(
                "n_embd {n_embd}, n_layer {n_layer}, n_head {n_head}, n_head_kv {n_head_kv}"
            )));
        }
        let head_dim = g
            .get_usize(&key("attention.key_length"))?
            .unwrap_or(n_embd / n_head);
        let head_dim_v = g
            .get_usize(&key("attention.value_length"))?
            .unwrap_or(head_dim);
        let rms_eps = g
            .get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f32;
        let rope_base = g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
        let rope_dim = g
            .get_usize(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        let rope_freq_scale = match g.get_str(&key("rope.scaling.type"))? {
            Some("linear") => {
                let f = g.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if f > 0.0 {
                    (1.0 / f) as f32
                } else {
                    1.0
                }
            }
            _ => 1.0,
        };
        let n_ctx_train = g.get_usize(&key("context_length"))?.unwrap_or(2048);
        let n_vocab = match g.get_array("tokenizer.ggml.tokens")? {
            Some(a) => a.len(),
            None => g.get_usize(&key("vocab_size"))?.unwrap_or(0),
        };
        if head_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(Error::BadHparams(format!(
                "head_dim {head_dim}, rope_dim {rope_dim}"
            )));
        }
        let mut hp = Hparams {
            arch,
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            head_dim_v,
            n_ff,
            rms_eps,
            rope_base,
            rope_base_swa: rope_base,
            rope_freq_scale,
            rope_dim,
            rope_neox: false,
            sliding_window: 0,
            swa_layers: vec![false; n_layer],
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embd_scale: 1.0,
            activation: Activation::Silu,
            post_norms: false,
            qk_norm: false,
            sub_norms: false,
            qkv_bias: false,
            final_logit_softcap: 0.0,
            attn_logit_softcap: 0.0,
        };
        match arch {
            Arch::Llama => {}
            Arch::Qwen2 => {
                hp.rope_neox = true;
                hp.qkv_bias = true;
            }
            Arch::Qwen3 => {
                hp.rope_neox = true;
                hp.qk_norm = true;
            }
            Arch::Bitnet => {
                hp.rope_neox = true;
                hp.sub_norms = true;
            }
            Arch::Gemma3 => {
                hp.rope_neox = true;
                hp.qk_norm = true;
                hp.post_norms = true;
                hp.activation = Activation::Gelu;
                hp.embd_scale = (n_embd as f32).sqrt();
                hp.rope_base_swa = 10000.0;
                hp.sliding_window = g.get_usize(&key("attention.sliding_window"))?.unwrap_or(0);
                // every sixth layer is global, the others use the sliding window
                let pattern = g
                    .get_usize(&key("attention.sliding_window_pattern"))?
                    .unwrap_or(6)
                    .max(1);
                for (il, swa) in hp.swa_layers.iter_mut().enumerate() {
                    *swa = hp.sliding_window > 0 && il % pattern < pattern - 1;
                }
                if let Some(c) = g.get_f64(&key("final_logit_softcapping"))? {
                    hp.final_logit_softcap = c as f32;
                }
                if let Some(c) = g.get_f64(&key("attn_logit_softcapping"))? {
                    hp.attn_logit_softcap = c as f32;
                }
            }
        }
        Ok(hp)
    }

    /// Width of the K (and V) rows cached per token per layer.
    pub fn n_embd_k(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    pub fn n_embd_v(&self) -> usize {
        self.n_head_kv * self.head_dim_v
    }

    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }
}

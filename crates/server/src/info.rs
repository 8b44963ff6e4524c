//! What the listing routes (`/api/tags`, `/api/ps`, `/api/show`) say of a model file, read
//! from its GGUF header once and cached by path, size and modification time, so a listing
//! neither opens every file on every call nor parses on the async workers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::gen::blocking;

/// A model file's description.
#[derive(Debug)]
pub struct ModelInfo {
    /// Ollama's `details`: format, family, parameter size, quantization.
    pub details: Value,
    /// Scalar metadata keys (arrays such as the vocabulary left out), for `/api/show`.
    pub metadata: Map<String, Value>,
    /// `tokenizer.chat_template`, or empty.
    pub template: String,
    /// The GGUF's recommended sampling (`general.sampling.*`).
    pub sampling: capy_engine::SamplingOptions,
    /// File size, bytes.
    pub size: u64,
    pub modified: SystemTime,
}

impl ModelInfo {
    /// Reads the header of the GGUF at `path`.
    ///
    /// # Errors
    /// The file cannot be read (500), or is not a valid GGUF (400 `model_not_supported`).
    pub fn read(path: &Path) -> Result<ModelInfo, ApiError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ApiError::internal(format!("reading {}: {e}", path.display())))?;
        let g = capy_gguf::Gguf::open(path).map_err(|e| crate::registry::gguf_error(path, e))?;
        let arch = g
            .get_str("general.architecture")
            .ok()
            .flatten()
            .unwrap_or("unknown")
            .to_string();
        let params = g.n_params() as f64;
        let size = if params >= 1e9 {
            format!("{:.1}B", params / 1e9)
        } else {
            format!("{:.0}M", params / 1e6)
        };
        let quant = g
            .file_type_name()
            .replace(" - Medium", "_M")
            .replace(" - Small", "_S")
            .replace(" - Large", "_L");
        let mut metadata = Map::new();
        for (k, v) in g.metadata() {
            let v = match v {
                capy_gguf::Value::String(s) => json!(s),
                capy_gguf::Value::Bool(b) => json!(b),
                capy_gguf::Value::F32(x) => json!(x),
                capy_gguf::Value::F64(x) => json!(x),
                capy_gguf::Value::Array(_) => Value::Null,
                other => json!(other.as_i64()),
            };
            if !v.is_null() && k != "tokenizer.chat_template" {
                metadata.insert(k.clone(), v);
            }
        }
        metadata.insert("general.parameter_count".into(), json!(g.n_params()));
        Ok(ModelInfo {
            details: json!({"parent_model": "", "format": "gguf", "family": arch,
                            "families": [arch], "parameter_size": size,
                            "quantization_level": quant}),
            metadata,
            template: g
                .get_str("tokenizer.chat_template")
                .ok()
                .flatten()
                .unwrap_or("")
                .to_string(),
            sampling: capy_engine::SamplingOptions::from_gguf(&g),
            size: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }
}

/// [`ModelInfo`] by path, re-read when the file's size or modification time changes.
#[derive(Default)]
pub struct InfoCache {
    map: Mutex<HashMap<PathBuf, Arc<ModelInfo>>>,
}

impl InfoCache {
    /// The description of the file at `path`, from the cache or read on a blocking thread.
    ///
    /// # Errors
    /// 500 when the file cannot be read (the detail is logged, not shown).
    pub async fn get(&self, path: &Path) -> Result<Arc<ModelInfo>, ApiError> {
        let stat = std::fs::metadata(path).ok();
        let key = stat.as_ref().map(|m| (m.len(), m.modified().ok()));
        if let Some(i) = self.lock().get(path) {
            if key == Some((i.size, Some(i.modified))) {
                return Ok(Arc::clone(i));
            }
        }
        let p = path.to_path_buf();
        let info = blocking(move || ModelInfo::read(&p)).await?;
        let info = Arc::new(info);
        self.lock().insert(path.to_path_buf(), Arc::clone(&info));
        Ok(info)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Arc<ModelInfo>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

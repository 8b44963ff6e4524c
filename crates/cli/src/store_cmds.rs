//! `capy pull | list | show | rm`.

use anyhow::{Context, Result};
use capy_store::Store;

use crate::progress::Bar;

#[derive(clap::Args)]
pub struct PullArgs {
    /// Built-in name (smollm2-135m, gemma3-270m), hf.co/ORG/REPO/FILE or an http(s) URL.
    pub name: String,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// A stored model name, a .gguf path, or a router or ensemble of the config file.
    pub name: String,
    /// TOML file with `[virtual.NAME]` tables [default: config.toml in CAPY_HOME, if there].
    #[arg(long, env = "CAPY_CONFIG")]
    pub config: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
pub struct RmArgs {
    pub name: String,
}

pub fn pull(a: PullArgs) -> Result<()> {
    let store = Store::open_default();
    let m = store
        .pull(&a.name, &Bar::default())
        .with_context(|| format!("pulling {}", a.name))?;
    println!("{}  {}  sha256:{}", m.name, human_bytes(m.size), m.sha256);
    Ok(())
}

pub fn list() -> Result<()> {
    let store = Store::open_default();
    let models = store.list()?;
    println!("{:<40} {:>10}  {:<14} SOURCE", "NAME", "SIZE", "SHA256");
    for m in models {
        println!(
            "{:<40} {:>10}  {:<14} {}",
            m.name,
            human_bytes(m.size),
            &m.sha256[..12.min(m.sha256.len())],
            m.source
        );
    }
    Ok(())
}

pub fn rm(a: RmArgs) -> Result<()> {
    let store = Store::open_default();
    if store.remove(&a.name)? {
        println!("deleted {}", a.name);
        Ok(())
    } else {
        anyhow::bail!("model {:?} is not in the store", a.name)
    }
}

pub fn show(a: ShowArgs) -> Result<()> {
    if let Some((_, v)) = crate::common::virtual_model(&a.name, a.config.as_deref())? {
        return show_virtual(&v);
    }
    // a config file's table shows the model it serves
    let (path, _) = crate::common::configured_model(&a.name, a.config.as_deref(), false)?;
    let g = capy_gguf::Gguf::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let hp = capy_model::Hparams::from_gguf(&g)?;
    println!("  path                {}", path.display());
    if let Ok(Some(m)) = Store::open_default().get(&a.name) {
        println!("  source              {}", m.source);
        println!("  sha256              {}", m.sha256);
    }
    let n_params = g.n_params();
    println!("  architecture        {}", hp.arch.name());
    if let Ok(Some(n)) = g.get_str("general.name") {
        println!("  name                {n}");
    }
    println!("  parameters          {:.1}M", n_params as f64 / 1e6);
    println!("  file size           {}", human_bytes(g.file_size()));
    println!("  context length      {}", hp.n_ctx_train);
    println!("  embedding length    {}", hp.n_embd);
    println!("  layers              {}", hp.n_layer);
    println!("  heads (q / kv)      {} / {}", hp.n_head, hp.n_head_kv);
    println!("  vocabulary          {}", hp.n_vocab);
    let mut types: std::collections::BTreeMap<String, usize> = Default::default();
    for t in g.tensors() {
        *types.entry(t.ty.to_string()).or_default() += 1;
    }
    let types: Vec<String> = types
        .into_iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    println!("  tensor types        {}", types.join(", "));
    match g.get_str("tokenizer.chat_template") {
        Ok(Some(_)) => println!("  chat template       from the model file"),
        _ => println!("  chat template       none in the file (built-in fallback)"),
    }
    Ok(())
}

/// `capy show` of a router or ensemble: its kind, members and settings.
fn show_virtual(v: &capy_server::virtuals::VirtualModel) -> Result<()> {
    let d = v.describe();
    println!("  virtual model       {} ({})", v.name, v.kind_name());
    if let Some(s) = d["description"].as_str() {
        println!("  description         {s}");
    }
    println!("  members             {}", v.members().join(", "));
    if let Some(o) = d.as_object() {
        for (k, val) in o {
            if matches!(k.as_str(), "kind" | "members" | "description") {
                continue;
            }
            let text = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {:<19} {text}", k.replace('_', " "));
        }
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0} KB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

//! Virtual models: names in the config file's `[virtual.NAME]` tables that are served like
//! models but stand for several. A **router** picks one member per request (rules on the
//! last user message, the prompt's length, what the request needs, or a classifier model's
//! scores), with fallbacks when the chosen member is refused; an **ensemble** runs several
//! candidates (members, samples of each) and answers once, by majority vote over extracted
//! answers (self-consistency, Wang et al. 2022, arXiv:2203.11171), by the highest mean token
//! logprob, or by a judge model that writes one answer from the candidates.

pub mod ensemble;
pub mod respond;
pub mod router;

use std::collections::BTreeMap;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::KeepAlive;

/// One `[virtual.NAME]` table as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VirtualConfig {
    /// `router` or `ensemble`.
    pub kind: String,
    /// A line for listings (`/api/tags`, `capy show`).
    pub description: Option<String>,
    /// Router: the member that answers when no rule (and no classifier) picks one.
    pub default: Option<String>,
    /// Router: members tried in order when the chosen one is refused (too big for the
    /// memory budget, queue full, load failure).
    pub fallback: Vec<String>,
    /// Router: checked in order; the first whose conditions all hold picks its `model`.
    pub rules: Vec<RuleConfig>,
    /// Router: a member model that scores category labels when no rule matched.
    pub classifier: Option<ClassifierConfig>,
    /// Ensemble: the members (a name twice is fine: more samples of it).
    pub members: Vec<String>,
    /// Ensemble: candidates per member (1 to 64; default 1).
    pub samples: Option<usize>,
    /// Ensemble: `vote` (default), `best-of` or `synthesize`.
    pub strategy: Option<String>,
    /// Ensemble, vote: `last-number`, `regex:PATTERN`, `exact` (default) or `json:FIELD`.
    pub extract: Option<String>,
    /// Ensemble, synthesize: the member that writes the final answer.
    pub judge: Option<String>,
    /// Ensemble: after this long ("60s") it answers from the candidates that finished.
    #[serde(deserialize_with = "crate::config::some_duration_text")]
    pub deadline: Option<String>,
    /// Ensemble: most candidates (members x samples) allowed (default 16, at most 64).
    pub max_candidates: Option<usize>,
    /// Ensemble: `skip` (default: a failed member is left out and named in the answer's
    /// `ensemble.failed`) or `fail` (the request fails).
    pub on_failure: Option<String>,
    /// Ensemble: put the candidates in every answer's `ensemble` field (a request's
    /// `include_candidates` overrides).
    pub include_candidates: Option<bool>,
}

/// One routing rule: its conditions (all must hold; at least one given) and its member.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// A regular expression (Rust `regex` syntax) searched in the last user message.
    pub regex: Option<String>,
    /// The prompt (every message's text) has at least this many tokens.
    pub min_prompt_tokens: Option<usize>,
    /// The prompt has at most this many tokens.
    pub max_prompt_tokens: Option<usize>,
    /// The request asks for `tools` or for `response_format` (also llama-server's
    /// `grammar`/`json_schema` and Ollama's `format`).
    pub needs: Option<String>,
    pub model: String,
}

/// A classifier: `labels` maps a category label to the member it routes to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    pub model: String,
    pub labels: BTreeMap<String, String>,
    /// The instruction before the user's message; `{labels}` is replaced by the labels,
    /// comma-separated.
    pub instruction: Option<String>,
}

/// What a rule's `needs` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Tools,
    ResponseFormat,
}

/// A checked routing rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub regex: Option<Regex>,
    pub min_prompt_tokens: Option<usize>,
    pub max_prompt_tokens: Option<usize>,
    pub needs: Option<Need>,
    pub model: String,
}

/// A checked classifier.
#[derive(Clone, Debug)]
pub struct Classifier {
    pub model: String,
    /// (label, member), in the file's order of keys (sorted).
    pub labels: Vec<(String, String)>,
    pub instruction: String,
}

/// The classifier's instruction unless the config gives one.
pub const DEFAULT_INSTRUCTION: &str = "Classify the user's message into exactly one of these \
categories: {labels}. Reply with the category name only.";

#[derive(Clone, Debug)]
pub struct RouterSpec {
    pub default: String,
    pub fallback: Vec<String>,
    pub rules: Vec<Rule>,
    pub classifier: Option<Classifier>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Vote,
    BestOf,
    Synthesize,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Vote => "vote",
            Strategy::BestOf => "best-of",
            Strategy::Synthesize => "synthesize",
        }
    }
}

pub use ensemble::Extract;

#[derive(Clone, Debug)]
pub struct EnsembleSpec {
    pub members: Vec<String>,
    pub samples: usize,
    pub strategy: Strategy,
    pub extract: Extract,
    pub judge: Option<String>,
    pub deadline: Duration,
    pub max_candidates: usize,
    /// `false`: a failed member fails the request.
    pub skip_failed: bool,
    pub include_candidates: bool,
}

#[derive(Clone, Debug)]
pub enum VirtualKind {
    Router(RouterSpec),
    Ensemble(EnsembleSpec),
}

/// A checked virtual model.
#[derive(Clone, Debug)]
pub struct VirtualModel {
    pub name: String,
    pub description: Option<String>,
    pub kind: VirtualKind,
}

/// Most candidates an ensemble may be configured for.
pub const MAX_CANDIDATES: usize = 64;

impl VirtualConfig {
    /// Checks one table; errors name the key (`virtual.NAME.samples`).
    ///
    /// # Errors
    /// An unknown kind or strategy, a missing member, keys of the other kind, a bad regex or
    /// extractor, a count out of range.
    pub fn check(&self, name: &str) -> Result<VirtualModel, String> {
        let at = |k: &str| format!("virtual.{name}.{k}");
        if name.trim().is_empty()
            || name.chars().any(char::is_whitespace)
            || name.ends_with(":latest")
        {
            return Err(format!(
                "virtual: {name:?} is not a model name (not empty, no spaces, no :latest tag)"
            ));
        }
        let member = |k: &str, m: &str| -> Result<String, String> {
            let m = m.trim();
            if m.is_empty() {
                return Err(format!("{}: a member's name is empty", at(k)));
            }
            Ok(m.strip_suffix(":latest").unwrap_or(m).to_string())
        };
        let router_keys = self.default.is_some()
            || !self.fallback.is_empty()
            || !self.rules.is_empty()
            || self.classifier.is_some();
        let ensemble_keys = !self.members.is_empty()
            || self.samples.is_some()
            || self.strategy.is_some()
            || self.extract.is_some()
            || self.judge.is_some()
            || self.deadline.is_some()
            || self.max_candidates.is_some()
            || self.on_failure.is_some()
            || self.include_candidates.is_some();
        let kind = match self.kind.as_str() {
            "router" => {
                if ensemble_keys {
                    return Err(format!(
                        "virtual.{name}: members, samples, strategy, extract, judge, deadline, \
                         max_candidates, on_failure and include_candidates are ensemble keys \
                         (kind = \"ensemble\")"
                    ));
                }
                let default = member(
                    "default",
                    self.default.as_deref().ok_or_else(|| {
                        format!("{}: a router needs a default member", at("default"))
                    })?,
                )?;
                let fallback = self
                    .fallback
                    .iter()
                    .map(|m| member("fallback", m))
                    .collect::<Result<_, _>>()?;
                let mut rules = Vec::new();
                for (i, r) in self.rules.iter().enumerate() {
                    let k = format!("rules[{i}]");
                    let regex = match &r.regex {
                        Some(p) => Some(
                            regex::RegexBuilder::new(p)
                                .size_limit(1 << 20)
                                .build()
                                .map_err(|e| format!("{}.regex: {e}", at(&k)))?,
                        ),
                        None => None,
                    };
                    let needs = match r.needs.as_deref() {
                        None => None,
                        Some("tools") => Some(Need::Tools),
                        Some("response_format" | "format") => Some(Need::ResponseFormat),
                        Some(o) => {
                            return Err(format!(
                                "{}.needs: expected tools or response_format, got {o:?}",
                                at(&k)
                            ))
                        }
                    };
                    if let (Some(lo), Some(hi)) = (r.min_prompt_tokens, r.max_prompt_tokens) {
                        if lo > hi {
                            return Err(format!(
                                "{}: min_prompt_tokens {lo} is more than max_prompt_tokens {hi}",
                                at(&k)
                            ));
                        }
                    }
                    if regex.is_none()
                        && r.min_prompt_tokens.is_none()
                        && r.max_prompt_tokens.is_none()
                        && needs.is_none()
                    {
                        return Err(format!(
                            "{}: a rule needs a condition (regex, min_prompt_tokens, \
                             max_prompt_tokens or needs)",
                            at(&k)
                        ));
                    }
                    rules.push(Rule {
                        regex,
                        min_prompt_tokens: r.min_prompt_tokens,
                        max_prompt_tokens: r.max_prompt_tokens,
                        needs,
                        model: member(&format!("{k}.model"), &r.model)?,
                    });
                }
                let classifier = match &self.classifier {
                    None => None,
                    Some(c) => {
                        if c.labels.len() < 2 {
                            return Err(format!(
                                "{}: give at least two labels (label = member)",
                                at("classifier.labels")
                            ));
                        }
                        let mut labels = Vec::new();
                        for (l, m) in &c.labels {
                            if l.trim().is_empty() || l.len() > 64 {
                                return Err(format!(
                                    "{}: a label must be 1 to 64 bytes, got {l:?}",
                                    at("classifier.labels")
                                ));
                            }
                            if labels.iter().any(|(x, _): &(String, String)| x == l.trim()) {
                                return Err(format!(
                                    "{}: the label {:?} is given twice",
                                    at("classifier.labels"),
                                    l.trim()
                                ));
                            }
                            labels.push((l.trim().to_string(), member("classifier.labels", m)?));
                        }
                        Some(Classifier {
                            model: member("classifier.model", &c.model)?,
                            labels,
                            instruction: c
                                .instruction
                                .clone()
                                .unwrap_or_else(|| DEFAULT_INSTRUCTION.to_string()),
                        })
                    }
                };
                VirtualKind::Router(RouterSpec {
                    default,
                    fallback,
                    rules,
                    classifier,
                })
            }
            "ensemble" => {
                if router_keys {
                    return Err(format!(
                        "virtual.{name}: default, fallback, rules and classifier are router \
                         keys (kind = \"router\")"
                    ));
                }
                if self.members.is_empty() {
                    return Err(format!("{}: an ensemble needs members", at("members")));
                }
                let members: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| member("members", m))
                    .collect::<Result<_, _>>()?;
                let samples = self.samples.unwrap_or(1);
                if !(1..=MAX_CANDIDATES).contains(&samples) {
                    return Err(format!(
                        "{}: must be between 1 and {MAX_CANDIDATES}, got {samples}",
                        at("samples")
                    ));
                }
                let max_candidates = self.max_candidates.unwrap_or(16);
                if !(1..=MAX_CANDIDATES).contains(&max_candidates) {
                    return Err(format!(
                        "{}: must be between 1 and {MAX_CANDIDATES}, got {max_candidates}",
                        at("max_candidates")
                    ));
                }
                let n = members.len() * samples;
                if n > max_candidates {
                    return Err(format!(
                        "virtual.{name}: {} members x {samples} samples is {n} candidates, \
                         more than max_candidates = {max_candidates}",
                        members.len()
                    ));
                }
                let strategy = match self.strategy.as_deref().unwrap_or("vote") {
                    "vote" => Strategy::Vote,
                    "best-of" => Strategy::BestOf,
                    "synthesize" => Strategy::Synthesize,
                    o => {
                        return Err(format!(
                            "{}: expected vote, best-of or synthesize, got {o:?}",
                            at("strategy")
                        ))
                    }
                };
                let extract = Extract::parse(self.extract.as_deref().unwrap_or("exact"))
                    .map_err(|e| format!("{}: {e}", at("extract")))?;
                let judge = self
                    .judge
                    .as_deref()
                    .map(|j| member("judge", j))
                    .transpose()?;
                if strategy != Strategy::Synthesize && judge.is_some() {
                    return Err(format!(
                        "{}: only the synthesize strategy has a judge (strategy is {})",
                        at("judge"),
                        strategy.name()
                    ));
                }
                if strategy != Strategy::Vote && self.extract.is_some() {
                    return Err(format!(
                        "{}: only the vote strategy extracts answers (strategy is {})",
                        at("extract"),
                        strategy.name()
                    ));
                }
                if strategy == Strategy::Synthesize && judge.is_none() {
                    return Err(format!(
                        "{}: the synthesize strategy needs a judge member",
                        at("judge")
                    ));
                }
                let deadline = match self.deadline.as_deref() {
                    None => Duration::from_secs(120),
                    Some(d) => match KeepAlive::parse(d) {
                        Ok(KeepAlive::For(d)) if !d.is_zero() => d,
                        _ => {
                            return Err(format!(
                                "{}: must be a positive duration such as 60s, got {d:?}",
                                at("deadline")
                            ))
                        }
                    },
                };
                let skip_failed = match self.on_failure.as_deref().unwrap_or("skip") {
                    "skip" => true,
                    "fail" => false,
                    o => {
                        return Err(format!(
                            "{}: expected skip or fail, got {o:?}",
                            at("on_failure")
                        ))
                    }
                };
                VirtualKind::Ensemble(EnsembleSpec {
                    members,
                    samples,
                    strategy,
                    extract,
                    judge,
                    deadline,
                    max_candidates,
                    skip_failed,
                    include_candidates: self.include_candidates.unwrap_or(false),
                })
            }
            "" => return Err(format!("{}: give router or ensemble", at("kind"))),
            o => {
                return Err(format!(
                    "{}: expected router or ensemble, got {o:?}",
                    at("kind")
                ))
            }
        };
        Ok(VirtualModel {
            name: name.to_string(),
            description: self.description.clone(),
            kind,
        })
    }
}

impl VirtualModel {
    /// Every member it may use (routers: default, fallbacks, rules' and classifier's; ensembles:
    /// members and judge), each once, in order.
    pub fn members(&self) -> Vec<String> {
        let mut all: Vec<&String> = Vec::new();
        match &self.kind {
            VirtualKind::Router(r) => {
                all.push(&r.default);
                all.extend(r.rules.iter().map(|x| &x.model));
                if let Some(c) = &r.classifier {
                    all.push(&c.model);
                    all.extend(c.labels.iter().map(|l| &l.1));
                }
                all.extend(&r.fallback);
            }
            VirtualKind::Ensemble(e) => {
                all.extend(&e.members);
                all.extend(&e.judge);
            }
        }
        let mut out: Vec<String> = Vec::new();
        for m in all {
            if !out.contains(m) {
                out.push(m.clone());
            }
        }
        out
    }

    /// Generations one request runs: an ensemble's candidates and judge; a router's one.
    pub fn generations(&self) -> usize {
        match &self.kind {
            VirtualKind::Router(_) => 1,
            VirtualKind::Ensemble(e) => {
                e.members.len() * e.samples + usize::from(e.judge.is_some())
            }
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            VirtualKind::Router(_) => "router",
            VirtualKind::Ensemble(_) => "ensemble",
        }
    }

    /// What listings say of it (`/v1/models`' and `/api/tags`' `virtual` field, `capy show`):
    /// a router's members are every model it may send to; an ensemble's as configured (a
    /// name twice runs twice the samples), its judge apart.
    pub fn describe(&self) -> Value {
        let members = match &self.kind {
            VirtualKind::Router(_) => self.members(),
            VirtualKind::Ensemble(e) => e.members.clone(),
        };
        let mut v = json!({"kind": self.kind_name(), "members": members});
        if let Some(d) = &self.description {
            v["description"] = json!(d);
        }
        match &self.kind {
            VirtualKind::Router(r) => {
                v["default"] = json!(r.default);
                v["fallback"] = json!(r.fallback);
                v["rules"] = r
                    .rules
                    .iter()
                    .map(|x| {
                        let mut o = json!({"model": x.model});
                        if let Some(re) = &x.regex {
                            o["regex"] = json!(re.as_str());
                        }
                        if let Some(n) = x.min_prompt_tokens {
                            o["min_prompt_tokens"] = json!(n);
                        }
                        if let Some(n) = x.max_prompt_tokens {
                            o["max_prompt_tokens"] = json!(n);
                        }
                        match x.needs {
                            Some(Need::Tools) => o["needs"] = json!("tools"),
                            Some(Need::ResponseFormat) => o["needs"] = json!("response_format"),
                            None => {}
                        }
                        o
                    })
                    .collect();
                if let Some(c) = &r.classifier {
                    v["classifier"] = json!({
                        "model": c.model,
                        "labels": c.labels.iter().map(|(l, m)| (l.clone(), json!(m)))
                            .collect::<serde_json::Map<_, _>>(),
                    });
                }
            }
            VirtualKind::Ensemble(e) => {
                v["samples"] = json!(e.samples);
                v["candidates"] = json!(e.samples * e.members.len());
                v["strategy"] = json!(e.strategy.name());
                if e.strategy == Strategy::Vote {
                    v["extract"] = json!(e.extract.to_string());
                }
                if let Some(j) = &e.judge {
                    v["judge"] = json!(j);
                }
                v["deadline_s"] = json!(e.deadline.as_secs_f64());
                v["on_failure"] = json!(if e.skip_failed { "skip" } else { "fail" });
            }
        }
        v
    }
}

/// Checks every `[virtual.NAME]` table against the served models' names (`is_model`): no
/// virtual name may be a model's, no member may be virtual, and no member's candidates
/// may outnumber a model's queue (`max_queue`).
///
/// # Errors
/// The first table's error.
pub fn check_all(
    tables: &BTreeMap<String, VirtualConfig>,
    is_model: &dyn Fn(&str) -> bool,
    max_queue: usize,
) -> Result<Vec<VirtualModel>, String> {
    let mut out = Vec::new();
    for (name, t) in tables {
        let v = t.check(name)?;
        if is_model(name) {
            return Err(format!(
                "virtual.{name}: the name is already a served model's; pick another"
            ));
        }
        for m in v.members() {
            if tables.contains_key(&m) {
                return Err(format!(
                    "virtual.{name}: member {m:?} is itself virtual (members must be models)"
                ));
            }
        }
        if let VirtualKind::Ensemble(e) = &v.kind {
            for m in &e.members {
                let n = e.members.iter().filter(|x| *x == m).count() * e.samples;
                if n > max_queue {
                    return Err(format!(
                        "virtual.{name}: member {m:?} runs {n} candidates, more than a model's \
                         queue (max_queue = {max_queue}) takes at once"
                    ));
                }
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// What a member must be, for the error naming one that is not served: the served models'
/// names (`served`), or stored models when the server serves the store.
pub fn member_hint(served: &[&str]) -> String {
    if served.is_empty() {
        "members are stored models (capy list) or built-in names".to_string()
    } else {
        format!(
            "members must be served models, here: {} (the [models.NAME] tables or -m names)",
            served.join(", ")
        )
    }
}

/// The virtual models a server offers.
#[derive(Default)]
pub struct Virtuals {
    pub models: Vec<VirtualModel>,
    /// When the server read them (their `created` / `modified_at` in listings).
    pub since: Option<std::time::SystemTime>,
    /// Tokenizers by model file, for counting prompt tokens without loading a model.
    pub(crate) tokenizers: std::sync::Mutex<
        std::collections::HashMap<std::path::PathBuf, std::sync::Arc<capy_engine::Tokenizer>>,
    >,
}

impl Virtuals {
    pub fn new(models: Vec<VirtualModel>) -> Virtuals {
        Virtuals {
            models,
            since: Some(std::time::SystemTime::now()),
            ..Default::default()
        }
    }

    /// The virtual model a client's name means (a trailing `:latest` ignored).
    pub fn get(&self, name: &str) -> Option<&VirtualModel> {
        let name = name.trim();
        let name = name.strip_suffix(":latest").unwrap_or(name);
        self.models.iter().find(|v| v.name == name)
    }

    /// The router a request body names, if it names one.
    pub fn router_in(&self, body: &[u8]) -> Option<(VirtualModel, RouterSpec)> {
        let v = self.named_in(body)?;
        match &v.kind {
            VirtualKind::Router(r) => Some((v.clone(), r.clone())),
            VirtualKind::Ensemble(_) => None,
        }
    }

    /// The virtual model a request body names in its `model` field, if any.
    pub fn named_in(&self, body: &[u8]) -> Option<&VirtualModel> {
        if self.models.is_empty() {
            return None;
        }
        // read as the handlers read it: a repeated key's last value wins
        let v: Value = serde_json::from_slice(body).ok()?;
        self.get(v.get("model")?.as_str()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Vec<VirtualModel>, String> {
        let c = crate::config::Config::from_toml(t)?;
        check_all(&c.virtuals, &|n| n == "taken", c.max_queue)
    }

    #[test]
    fn the_issue_config_parses() {
        let v = parse(
            r#"
[virtual.auto]
kind = "router"
default = "gemma3-270m"
fallback = ["smollm2-135m"]
rules = [ { regex = "(?i)```|\\bdef |\\bfn ", model = "smollm2-135m" },
          { min_prompt_tokens = 1500, model = "gemma3-270m" } ]
classifier = { model = "smollm2-135m", labels = { code = "smollm2-135m", chat = "gemma3-270m" } }

[virtual.council]
kind = "ensemble"
members = ["smollm2-135m"]
samples = 5
strategy = "vote"
extract = "last-number"
deadline = "60s"
"#,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].name, "auto");
        assert_eq!(v[0].members(), ["gemma3-270m", "smollm2-135m"]);
        let VirtualKind::Ensemble(e) = &v[1].kind else {
            panic!("council is an ensemble")
        };
        assert_eq!((e.samples, e.strategy), (5, Strategy::Vote));
        assert_eq!(e.deadline, Duration::from_secs(60));
        assert_eq!(v[1].describe()["extract"], "last-number");
    }

    #[test]
    fn bad_tables_name_their_key() {
        for (t, want) in [
            ("[virtual.a]\nkind = \"mixer\"", "virtual.a.kind"),
            ("[virtual.a]\nkind = \"router\"", "virtual.a.default"),
            (
                "[virtual.a]\nkind = \"router\"\ndefault = \"m\"\nsamples = 2",
                "ensemble keys",
            ),
            (
                "[virtual.a]\nkind = \"router\"\ndefault = \"m\"\nrules = [{ model = \"m\" }]",
                "rules[0]: a rule needs a condition",
            ),
            (
                "[virtual.a]\nkind = \"router\"\ndefault = \"m\"\nrules = [{ regex = \"(\", model = \"m\" }]",
                "rules[0].regex",
            ),
            ("[virtual.a]\nkind = \"ensemble\"", "virtual.a.members"),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\"]\nsamples = 0",
                "virtual.a.samples",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\", \"n\"]\nsamples = 9",
                "more than max_candidates",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\"]\nstrategy = \"synthesize\"",
                "needs a judge",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\"]\nextract = \"json:\"",
                "virtual.a.extract",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\"]\ndeadline = \"0s\"",
                "virtual.a.deadline",
            ),
            ("[virtual.taken]\nkind = \"ensemble\"\nmembers = [\"m\"]", "already a served"),
            ("[virtual.\"a:latest\"]\nkind = \"ensemble\"\nmembers = [\"m\"]", "no :latest"),
            (
                "[virtual.a]\nkind = \"router\"\ndefault = \"m\"\nrules = [{ min_prompt_tokens = 9, max_prompt_tokens = 3, model = \"m\" }]",
                "more than max_prompt_tokens",
            ),
            (
                "[virtual.a]\nkind = \"router\"\ndefault = \"m\"\nclassifier = { model = \"m\", labels = { \"x \" = \"m\", x = \"n\" } }",
                "given twice",
            ),
            (
                "max_queue = 4\n[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\", \"m\"]\nsamples = 3",
                "more than a model's queue",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\"]\njudge = \"m\"",
                "only the synthesize strategy has a judge",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\"]\nstrategy = \"best-of\"\nextract = \"exact\"",
                "only the vote strategy extracts",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"m\"]\nstrategy = \"best_of\"",
                "virtual.a.strategy",
            ),
            (
                "[virtual.a]\nkind = \"ensemble\"\nmembers = [\"b\"]\n[virtual.b]\nkind = \"ensemble\"\nmembers = [\"m\"]",
                "itself virtual",
            ),
        ] {
            let e = parse(t).unwrap_err();
            assert!(e.contains(want), "{t:?}: {e}");
        }
    }
}

//! Constrained decoding on the real models: a JSON schema, a GBNF grammar and a regex hold
//! through `Session::generate` and the batching engine, greedy and sampled; the reported
//! logprobs are the model's (before the mask); compile errors name the problem.

mod common;

use std::sync::{Arc, Mutex};

use capy_engine::grammar::{GrammarSpec, MAX_DIGIT_RUN};
use capy_engine::{
    BatchEngine, BatchParams, ContextParams, Engine, Event, FnSink, GenerateParams, Request,
    SamplerParams, StopReason,
};
use common::model_path;
use serde_json::{json, Value};

fn engine(name: &str) -> Engine {
    Engine::load(model_path(name)).expect("model loads")
}

fn person_schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "maxItems": 2, "items": {"enum": ["cat", "dog"]}}},
        "required": ["name", "age", "pets"]})
}

/// `value` follows `person_schema()` (checked by hand: no validator crate here).
fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let m = v.as_object().expect("an object");
    assert_eq!(m.len(), 3, "no other properties: {text}");
    assert!(m["name"].as_str().is_some_and(|s| s.chars().count() <= 20));
    assert!(m["age"].as_u64().is_some_and(|a| a <= 120));
    let pets = m["pets"].as_array().expect("pets array");
    assert!(pets.len() <= 2);
    assert!(pets.iter().all(|p| p == "cat" || p == "dog"));
}

#[test]
fn json_schema_holds_greedy_and_sampled_with_the_models_logprobs() {
    for name in ["smollm2-135m", "gemma3-270m"] {
        let e = engine(name);
        let grammar = e
            .tokenizer
            .grammars()
            .expect("grammar compiler")
            .compile(&GrammarSpec::JsonSchema(person_schema()))
            .expect("schema compiles");
        let prompt = e
            .chat_tokens(&[capy_engine::Message::new(
                "user",
                "Describe a person with pets as JSON.",
            )])
            .expect("prompt");
        let mut s = e.session(ContextParams {
            n_ctx: 1024,
            ..Default::default()
        });
        // the model's own first-token alternatives, unconstrained
        let free = s
            .generate(
                &prompt,
                &GenerateParams {
                    max_tokens: 1,
                    sampler: SamplerParams::greedy(),
                    top_logprobs: 3,
                    ..Default::default()
                },
                |_, _| true,
            )
            .expect("generates");
        for sampler in [
            SamplerParams::greedy(),
            SamplerParams {
                temperature: 1.0,
                seed: Some(11),
                ..Default::default()
            },
        ] {
            let params = GenerateParams {
                max_tokens: 300,
                sampler,
                logprobs: true,
                top_logprobs: 3,
                grammar: Some(grammar.clone()),
                ..Default::default()
            };
            let r = s
                .generate(&prompt, &params, |_, _| true)
                .expect("generates");
            assert_eq!(r.stop_reason, StopReason::Eos, "{name}: {}", r.text);
            check_person(&r.text);
            // the logprobs are the model's: the first token's alternatives are the
            // unconstrained model's, whatever the grammar allowed
            let first = &r.tokens[0];
            assert!(first.logprob.is_some_and(|l| l <= 0.0));
            assert_eq!(first.top, free.tokens[0].top, "{name}");
        }
    }
}

#[test]
fn gbnf_and_regex_hold_in_the_batch_engine() {
    let e = engine("smollm2-135m");
    let g = e.tokenizer.grammars().expect("grammar compiler");
    let gbnf = g
        .compile(&GrammarSpec::Gbnf(
            "root ::= \"Answer: \" (\"yes\" | \"no\") \" because \" [a-z ]{1,30} \".\"\n".into(),
        ))
        .expect("GBNF compiles");
    let regex = g
        .compile(&GrammarSpec::Regex("[0-9]{3}-[0-9]{4}".into()))
        .expect("regex compiles");
    let engine = BatchEngine::new(
        Arc::clone(&e.model),
        Arc::clone(&e.tokenizer),
        BatchParams {
            n_slots: 4,
            n_ctx: 512,
            ..Default::default()
        },
    );
    let prompt = e.tokenizer.encode("Is the sea salty?", true, true).unwrap();
    let outs: Arc<Mutex<Vec<(usize, String, StopReason)>>> = Arc::default();
    let mut reqs = Vec::new();
    for i in 0..6 {
        let grammar = if i % 2 == 0 { &gbnf } else { &regex };
        let outs = Arc::clone(&outs);
        reqs.push(Request {
            prompt: prompt.clone(),
            params: GenerateParams {
                max_tokens: 60,
                sampler: SamplerParams {
                    temperature: 0.9,
                    seed: Some(i as u64),
                    ..Default::default()
                },
                // a grammar's end ends the answer even so
                ignore_eos: true,
                grammar: Some(grammar.clone()),
                ..Default::default()
            },
            n_ctx: None,
            salt: String::new(),
            sink: Box::new(FnSink(move |ev| {
                if let Event::Done(s) = ev {
                    outs.lock().unwrap().push((i, s.text, s.stop_reason));
                }
                true
            })),
        });
    }
    engine.submit_all(reqs).expect("submitted");
    for _ in 0..600 {
        if outs.lock().unwrap().len() == 6 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let outs = outs.lock().unwrap();
    assert_eq!(outs.len(), 6, "{outs:?}");
    let yes_no = regex_lite(r"^Answer: (yes|no) because [a-z ]{1,30}\.$");
    for (i, text, reason) in outs.iter() {
        assert_eq!(*reason, StopReason::Eos, "{i}: {text:?}");
        if i % 2 == 0 {
            assert!(yes_no(text), "{i}: {text:?}");
        } else {
            let b = text.as_bytes();
            assert!(
                b.len() == 8
                    && b[3] == b'-'
                    && b.iter()
                        .enumerate()
                        .all(|(j, c)| j == 3 || c.is_ascii_digit()),
                "{i}: {text:?}"
            );
        }
    }
}

/// A matcher for the one pattern above (no regex crate among the dev-dependencies).
fn regex_lite(_pattern: &str) -> impl Fn(&str) -> bool {
    |t: &str| {
        let Some(rest) = t.strip_prefix("Answer: ") else {
            return false;
        };
        let Some(rest) = rest
            .strip_prefix("yes because ")
            .or_else(|| rest.strip_prefix("no because "))
        else {
            return false;
        };
        let Some(words) = rest.strip_suffix('.') else {
            return false;
        };
        (1..=30).contains(&words.len())
            && words.bytes().all(|c| c.is_ascii_lowercase() || c == b' ')
    }
}

#[test]
fn digit_runs_end_and_unlisted_properties_are_refused() {
    let e = engine("smollm2-135m");
    let g = e.tokenizer.grammars().expect("grammar compiler");
    // a number with no bound on its digits still ends
    let mut num = g
        .compile(&GrammarSpec::JsonSchema(
            json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
        ))
        .expect("compiles");
    let zero = e.tokenizer.token_id("0").expect("a '0' token");
    let point = e.tokenizer.token_id(".").expect("a '.' token");
    num.accept(zero).unwrap();
    num.accept(point).unwrap();
    for _ in 0..MAX_DIGIT_RUN {
        assert!(num.mask().unwrap().is_allowed(zero));
        num.accept(zero).unwrap();
    }
    // 0.000... must still get a nonzero digit: '0' is gone, the others stay
    let m = num.mask().unwrap();
    assert!(!m.is_allowed(zero));
    let one = e.tokenizer.token_id("1").expect("a '1' token");
    assert!(m.is_allowed(one));
    num.accept(one).unwrap();
    // past 16 digits in a row the number may end, so no digit may follow
    let m = num.mask().unwrap();
    assert!(!m.is_allowed(zero) && !m.is_allowed(one));
    assert!(num.is_accepting());

    // properties a schema does not list are refused unless it allows them
    let closed = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let mut open = closed.clone();
    open["additionalProperties"] = json!(true);
    let comma = e.tokenizer.encode("{\"a\":1,", false, false).unwrap();
    for (schema, allows_more) in [(closed, false), (open, true)] {
        let mut gr = g.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
        let ok = comma.iter().all(|&t| {
            let allowed = gr.mask().unwrap().is_allowed(t);
            allowed && gr.accept(t).is_ok()
        });
        assert_eq!(ok, allows_more);
    }
}

#[test]
fn compile_errors_name_the_problem() {
    let e = engine("gemma3-270m");
    let g = e.tokenizer.grammars().expect("grammar compiler");
    for (spec, words) in [
        (
            GrammarSpec::JsonSchema(json!({"type": "string", "format": "no-such-format"})),
            "no-such-format",
        ),
        (
            GrammarSpec::JsonSchema(json!({"$ref": "#/$defs/nowhere"})),
            "nowhere",
        ),
        (GrammarSpec::JsonSchema(json!([1, 2])), "must be an object"),
        (GrammarSpec::Gbnf("root ::= x\n".into()), "\"x\""),
        (
            GrammarSpec::Lark("start: undefined_rule\n".into()),
            "undefined_rule",
        ),
        (GrammarSpec::Regex("[a-".into()), "["),
    ] {
        let err = g.compile(&spec).expect_err("refused");
        assert!(err.contains(words), "{spec:?}: {err}");
    }
}

#[test]
fn tool_calls_are_constrained_from_the_start_or_once_they_start() {
    use capy_engine::tools::{call_grammar, parse_calls, Tool, ToolChoice, ToolFormat};
    let tools = vec![
        Tool {
            name: "get_weather".into(),
            description: Some("The weather in a city".into()),
            parameters: json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}),
        },
        Tool {
            name: "add".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {
                "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}),
        },
    ];
    for name in ["smollm2-135m", "gemma3-270m"] {
        let e = engine(name);
        let g = e.tokenizer.grammars().expect("grammar compiler");
        let format = ToolFormat::of(&e.template);
        let msgs = [capy_engine::Message::new(
            "user",
            "What is the weather in Paris?",
        )];
        let prompt = e.chat_tokens_tools(&msgs, &tools).expect("prompt");
        let mut s = e.session(ContextParams {
            n_ctx: 2048,
            ..Default::default()
        });
        for (choice, parallel) in [
            (ToolChoice::Required, true),
            (ToolChoice::Named("add".into()), false),
        ] {
            let (spec, trigger) = call_grammar(format, &tools, &choice, parallel, &e.tokenizer)
                .expect("grammar")
                .expect("a grammar for required calls");
            assert!(trigger.is_none());
            let grammar = g.compile(&spec).unwrap_or_else(|e| panic!("{e}\n{spec:?}"));
            for seed in [1, 2] {
                let params = GenerateParams {
                    max_tokens: 300,
                    sampler: SamplerParams {
                        temperature: 0.8,
                        seed: Some(seed),
                        ..Default::default()
                    },
                    grammar: Some(grammar.clone()),
                    ..Default::default()
                };
                let r = s
                    .generate(&prompt, &params, |_, _| true)
                    .expect("generates");
                let (text, calls) = parse_calls(format, &r.text, &tools);
                assert!(!calls.is_empty(), "{name} {choice:?}: {:?}", r.text);
                assert_eq!(text, "");
                for c in &calls {
                    if let ToolChoice::Named(n) = &choice {
                        assert_eq!(&c.name, n);
                        assert!(c.arguments["a"].is_i64() && c.arguments["b"].is_i64());
                    } else if c.name == "get_weather" {
                        assert!(c.arguments["city"].is_string());
                    }
                }
            }
        }
        // auto: free text until "<tool_call>", then a call that fits
        let (spec, trigger) = call_grammar(format, &tools, &ToolChoice::Auto, true, &e.tokenizer)
            .expect("grammar")
            .expect("a lazy grammar");
        let trigger = trigger.expect("a trigger");
        let mut lazy = g.compile_lazy(&spec, &trigger).expect("compiles");
        assert!(!lazy.is_active());
        let head = e
            .tokenizer
            .encode("Checking.\n<tool_call>\n{\"name\": \"add\", ", false, false)
            .unwrap();
        for &t in &head {
            lazy.accept(t).unwrap();
        }
        assert!(lazy.is_active());
        let m = lazy.mask().unwrap();
        let quote = e.tokenizer.token_id("\"").expect("a quote token");
        let brace = e.tokenizer.token_id("}").expect("a brace token");
        let allowed: Vec<String> = (0..e.tokenizer.n_vocab() as u32)
            .filter(|&t| m.is_allowed(t))
            .take(20)
            .map(|t| format!("{:?}", e.tokenizer.decode(&[t], true)))
            .collect();
        assert!(
            m.is_allowed(quote) && !m.is_allowed(brace),
            "{name}: {} allowed: {allowed:?}",
            m.num_set()
        );
    }
}

#[test]
fn a_grammar_can_start_after_a_thinking_block() {
    let e = engine("smollm2-135m");
    let g = e.tokenizer.grammars().expect("grammar compiler");
    let mut json_after = g.compile(&GrammarSpec::json_object()).expect("compiles");
    json_after.start_after("</think>");
    let open = e.tokenizer.token_id("{").expect("a brace token");
    for &t in &e
        .tokenizer
        .encode("Reasoning: 2 < 3, so no braces yet.</thi", false, false)
        .unwrap()
    {
        assert!(!json_after.is_active());
        json_after.accept(t).unwrap();
    }
    for &t in &e.tokenizer.encode("nk>", false, false).unwrap() {
        json_after.accept(t).unwrap();
    }
    assert!(json_after.is_active());
    let m = json_after.mask().unwrap();
    assert!(m.is_allowed(open));
    let word = e.tokenizer.token_id("The").expect("a word token");
    assert!(!m.is_allowed(word));
}

#[test]
fn a_complete_grammar_ends_the_answer_without_waiting_for_an_end_token() {
    let e = engine("smollm2-135m");
    let g = e.tokenizer.grammars().expect("grammar compiler");
    let yes = g
        .compile(&GrammarSpec::Gbnf("root ::= \"yes\" | \"no\"\n".into()))
        .expect("compiles");
    let prompt = e.tokenizer.encode("Is water wet?", true, true).unwrap();
    let mut s = e.session(ContextParams {
        n_ctx: 256,
        ..Default::default()
    });
    let params = GenerateParams {
        max_tokens: 8,
        sampler: SamplerParams::greedy(),
        grammar: Some(yes),
        ..Default::default()
    };
    let r = s
        .generate(&prompt, &params, |_, _| true)
        .expect("generates");
    assert!(r.text == "yes" || r.text == "no", "{:?}", r.text);
    assert_eq!(r.stop_reason, StopReason::Eos);
    // no end-of-generation token was needed (or sampled) after the last word
    let last = r.tokens.last().expect("a token").id;
    assert!(!e.tokenizer.is_eog(last), "{:?}", r.tokens);
}

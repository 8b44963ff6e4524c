//! Tokenization and detokenization equal llama.cpp's on every golden case.

mod common;

use capy_engine::Engine;
use common::{golden, ids, model_path, MODELS};

#[test]
fn tokenization_matches_llama_cpp() {
    for (name, file) in MODELS {
        let engine = Engine::load(model_path(name)).expect("model loads");
        let tok = &engine.tokenizer;
        let g = golden(file);
        let cases = g["tokenization"]["cases"].as_array().expect("cases");
        assert!(cases.len() >= 10);
        let mut checked = 0;
        for c in cases {
            let text = c["text"].as_str().expect("text");
            let case = c["name"].as_str().unwrap_or("?");
            for (key, add, parse) in [
                ("add_special_true", true, true),
                ("add_special_false", false, true),
                ("add_special_false_parse_special_false", false, false),
            ] {
                let want = ids(&c[key]["token_ids"]);
                let got = tok.encode(text, add, parse).expect("encode");
                assert_eq!(got, want, "{name} {case} {key}: {text:?}");
                checked += 1;
            }
            let want = c["detokenize_of_add_special_true_ids"]
                .as_str()
                .expect("detok");
            let got = tok.decode(&ids(&c["add_special_true"]["token_ids"]), true);
            assert_eq!(got, want, "{name} {case} detokenize");
        }
        // the completion prompts too
        for c in g["completions"].as_array().expect("completions") {
            let text = c["prompt"].as_str().expect("prompt");
            assert_eq!(
                tok.encode(text, true, true).unwrap(),
                ids(&c["prompt_token_ids"]),
                "{name} {text:?}"
            );
            checked += 1;
        }
        let chat = &g["chat"]["completion"];
        assert_eq!(
            tok.encode(chat["prompt"].as_str().unwrap(), true, true)
                .unwrap(),
            ids(&chat["prompt_token_ids"]),
            "{name} chat prompt"
        );
        assert!(checked > 40);
    }
}

#[test]
fn chat_template_matches_llama_cpp_for_the_model_template() {
    // SmolLM2 ships a template; llama.cpp's rendering of it is golden.
    let (name, file) = MODELS[0];
    let engine = Engine::load(model_path(name)).unwrap();
    let g = golden(file);
    let msgs: Vec<capy_engine::Message> =
        serde_json::from_value(g["chat"]["messages"].clone()).unwrap();
    assert!(engine.template.from_model);
    assert_eq!(
        engine.template.render(&msgs, true).unwrap(),
        g["chat"]["formatted_prompt"].as_str().unwrap()
    );
}

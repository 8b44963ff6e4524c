//! End-to-end checks of the `capy` binary on the real models.

mod common;

use common::{golden, model_path, run};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn generate_json_has_the_documented_shape_and_golden_tokens() {
    let g = golden("SmolLM2-135M-Instruct.Q4_1.json");
    let c = &g["completions"][0];
    let path = model_path("smollm2-135m");
    let (ok, out, err) = run(
        &[
            "generate",
            "-m",
            path.to_str().unwrap(),
            "--prompt",
            c["prompt"].as_str().unwrap(),
            "-n",
            "4",
            "--temp",
            "0",
            "--top-logprobs",
            "3",
            "--echo",
            "--json",
            "-t",
            "2",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON object on stdout");
    assert_eq!(ids(&v["prompt_token_ids"]), ids(&c["prompt_token_ids"]));
    let toks = v["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), 4);
    // greedy path of llama.cpp (no near-ties in these first tokens)
    let want = &ids(&c["generated_token_ids"])[..4];
    let got: Vec<u64> = toks.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(got, want);
    for t in toks {
        assert_eq!(t["top"].as_array().unwrap().len(), 3);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert!(t["text"].is_string());
    }
    assert_eq!(
        v["text"].as_str().unwrap(),
        toks.iter()
            .map(|t| t["text"].as_str().unwrap())
            .collect::<String>()
    );
    let plp = v["prompt_logprobs"].as_array().unwrap();
    assert_eq!(plp.len(), v["prompt_token_ids"].as_array().unwrap().len());
    assert!(plp[0].is_null());
    assert_eq!(plp[1]["top"].as_array().unwrap().len(), 3);
    for k in ["prompt_n", "prompt_ms", "gen_n", "gen_ms"] {
        assert!(v["timings"][k].is_number(), "timings.{k}");
    }
}

#[test]
fn generate_with_prompt_tokens_and_stop_string() {
    let path = model_path("smollm2-135m");
    let (ok, out, err) = run(
        &[
            "generate",
            "-m",
            path.to_str().unwrap(),
            "--prompt-tokens",
            "504,3575,282,4649,314",
            "-n",
            "20",
            "--temp",
            "0",
            "--stop",
            ".",
            "--json",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["text"].as_str().unwrap(), " Paris");
    assert_eq!(v["stop_reason"].as_str().unwrap(), "stop");
}

#[test]
fn run_one_shot_answers_with_the_chat_template() {
    let (ok, out, err) = run(
        &[
            "run",
            "smollm2-135m",
            "What is the capital of France?",
            "--temp",
            "0",
            "-n",
            "16",
            "--verbose",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty());
    assert!(err.contains("tokens/s"), "{err}");
}

#[test]
fn bad_inputs_give_errors_not_panics() {
    let path = model_path("smollm2-135m");
    let p = path.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["generate", "-m", "no-such-model", "--prompt", "hi"],
            "not in the store",
        ),
        (
            vec!["generate", "-m", "no-such-file.gguf", "--prompt", "hi"],
            "no-such-file.gguf: no such file",
        ),
        (
            vec!["generate", "-m", "/no/such/dir/m.gguf", "--prompt", "hi"],
            "/no/such/dir/m.gguf: no such file",
        ),
        (
            vec!["generate", "-m", p, "--prompt-tokens", "99999999"],
            "out of range",
        ),
        (vec!["generate", "-m", p, "--prompt", ""], "empty prompt"),
        (vec!["generate", "-m", p], "--prompt"),
    ];
    for (args, msg) in cases {
        let (ok, _, err) = run(&args, &[]);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn malformed_gguf_files_are_rejected_cleanly() {
    let dir = common::temp_dir("malformed");
    let real = std::fs::read(model_path("smollm2-135m")).unwrap();
    let mut huge = real[..4096].to_vec();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut magic = real[..4096].to_vec();
    magic[..4].copy_from_slice(b"GGML");
    let files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.gguf", vec![], "truncated"),
        ("magic.gguf", magic, "bad magic"),
        ("header.gguf", real[..100].to_vec(), "impossible"),
        (
            "cut.gguf",
            real[..real.len() / 2].to_vec(),
            "outside the file",
        ),
        ("huge.gguf", huge, "impossible"),
    ];
    for (name, bytes, msg) in files {
        let f = dir.join(name);
        std::fs::write(&f, bytes).unwrap();
        let (ok, _, err) = run(
            &["generate", "-m", f.to_str().unwrap(), "--prompt", "hi"],
            &[],
        );
        assert!(!ok, "{name} loaded");
        assert!(err.contains(msg), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn show_and_list_describe_the_models() {
    let (ok, out, err) = run(&["show", "smollm2-135m"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("architecture        llama"), "{out}");
    assert!(out.contains("Q4_1"), "{out}");
    let (ok, out, _) = run(&["list"], &[]);
    assert!(ok);
    assert!(
        out.contains("smollm2-135m") && out.contains("gemma3-270m"),
        "{out}"
    );
}

/// `capy run smollm2-135m` with "Write a haiku about rust programming." looped for 512
/// tokens on llama.cpp's defaults: built-in models chat with their model card's settings,
/// flags win over them, and piped input takes the interactive commands.
#[test]
fn run_uses_the_model_card_settings_and_flags_win() {
    let show = |extra: &[&str]| {
        let args = [&["run", "smollm2-135m", "-n", "8"], extra].concat();
        let input = b"/show parameters\n/set parameter top_k 7\n/set parameter top_k lots\n/show parameters\n/bye\n";
        let (ok, _, err) = common::run_piped(&args, &[], input);
        assert!(ok, "{err}");
        err
    };
    let card = show(&[]);
    assert!(card.contains("temperature         0.2"), "{card}");
    assert!(card.contains("repeat_penalty      1.1"), "{card}");
    assert!(
        card.contains("top_k               7"),
        "/set parameter: {card}"
    );
    assert!(
        card.contains("Couldn't set parameter: top_k must be a number"),
        "{card}"
    );
    let flags = show(&["--temp", "0.7", "--repeat-penalty", "1.3"]);
    assert!(flags.contains("temperature         0.7"), "{flags}");
    assert!(flags.contains("repeat_penalty      1.3"), "{flags}");
}

/// `--seed -1` was refused although seeds are any 64-bit integer; `--temp -1` gave clap's
/// "unexpected argument" instead of the range.
#[test]
fn negative_flag_values_reach_their_range_checks() {
    let m = model_path("smollm2-135m");
    let m = m.to_str().unwrap();
    let (ok, _, err) = run(
        &[
            "generate", "-m", m, "--prompt", "Hi", "-n", "1", "--seed", "-1",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run(
        &[
            "generate", "-m", m, "--prompt", "Hi", "-n", "1", "--temp", "-1",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("temperature must be between 0 and 100"),
        "{err}"
    );
}

/// The config file's `[models.NAME]` settings reach `capy run`: the model by its name or an
/// alias, its system message, context and sampling options; flags still win. Read from
/// `--config`, or from `config.toml` in CAPY_HOME.
#[test]
fn run_takes_a_models_settings_from_the_config_file() {
    let dir = common::temp_dir("run-config");
    let file = dir.join("capy.toml");
    let smol = model_path("smollm2-135m");
    std::fs::write(
        &file,
        format!(
            "[models.pirate]\npath = {:?}\nsystem = \"You are a pirate.\"\nctx_size = 512\n\
             aliases = [\"arr\"]\noptions = {{ temperature = 0.3, repeat_penalty = 1.2 }}\n",
            smol.to_str().unwrap()
        ),
    )
    .unwrap();
    let show = |args: &[&str], env: &[(&str, &str)]| {
        let args = [&["run"], args].concat();
        let (ok, _, err) = common::run_piped(&args, env, b"/show system\n/show\n/bye\n");
        assert!(ok, "{err}");
        err
    };
    let f = file.to_str().unwrap();
    let got = show(&["arr", "--config", f], &[]);
    assert!(got.contains("You are a pirate."), "{got}");
    assert!(got.contains("context length      512"), "{got}");
    assert!(got.contains("temperature         0.3"), "{got}");
    assert!(got.contains("repeat_penalty      1.2"), "{got}");
    let flags = show(
        &[
            "pirate",
            "--config",
            f,
            "--temp",
            "0.9",
            "--system",
            "Be brief.",
            "-c",
            "256",
        ],
        &[],
    );
    assert!(flags.contains("Be brief."), "{flags}");
    assert!(flags.contains("context length      256"), "{flags}");
    assert!(flags.contains("temperature         0.9"), "{flags}");
    assert!(flags.contains("repeat_penalty      1.2"), "{flags}");
    // CAPY_HOME/config.toml is read when no file is named
    let home = common::temp_dir("run-config-home");
    std::fs::copy(&file, home.join("config.toml")).unwrap();
    let got = show(&["pirate"], &[("CAPY_HOME", home.to_str().unwrap())]);
    assert!(got.contains("You are a pirate."), "{got}");

    // a bad config file is an error naming the file and the setting
    std::fs::write(&file, "[models.pirate]\nctx_size = 3\n").unwrap();
    let (ok, _, err) = run(&["run", "pirate", "hi", "--config", f], &[]);
    assert!(!ok);
    assert!(
        err.contains("capy.toml") && err.contains("models.pirate.ctx_size"),
        "{err}"
    );
}

/// `capy run -c 0` ran with a silent 16 and `-t 1000` started 1000 threads on a 2-core
/// machine: sizes and thread counts are range-checked, threads capped at the cores.
#[test]
fn run_checks_context_and_threads() {
    let m = model_path("smollm2-135m");
    let m = m.to_str().unwrap();
    for (flags, want) in [
        (["-c", "0"], "ctx-size must be between 16"),
        (["-c", "x"], "ctx-size must be between 16"),
        (["-t", "0"], "threads must be between 1 and 1024"),
        (["-t", "5000"], "threads must be between 1 and 1024"),
    ] {
        let (ok, _, err) = run(&["run", m, "hi", "-n", "1", flags[0], flags[1]], &[]);
        assert!(!ok, "{flags:?}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    let (ok, _, err) = run(&["run", m, "hi", "-n", "1", "-t", "1000"], &[]);
    assert!(ok, "{err}");
    assert!(err.contains("1000 threads asked for"), "{err}");
}

/// `capy run ... | head -c 20` panicked ("failed printing to stdout: Broken pipe"): a closed
/// pipe ends the command quietly.
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    use std::io::Read;
    let mut child = common::capy()
        .args([
            "run",
            "smollm2-135m",
            "-n",
            "200",
            "--temp",
            "0",
            "Tell a long story.",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let mut out = child.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    out.read_exact(&mut first).expect("some output");
    drop(out);
    let done = child.wait_with_output().expect("exits");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// `/set parameter stop` was "must be a number" and `-n -1` a clap error; Ollama takes both.
#[test]
fn run_takes_stop_strings_and_unlimited_answers() {
    let input = b"/set parameter stop END QED\n/show parameters\n/set parameter seed 12345678901234567\n/show parameters\n/bye\n";
    let (ok, _, err) = common::run_piped(&["run", "smollm2-135m", "-n", "-1"], &[], input);
    assert!(ok, "{err}");
    assert!(err.contains("Set parameter 'stop' to 'END, QED'"), "{err}");
    assert!(
        err.contains(r#"stop                ["END", "QED"]"#),
        "{err}"
    );
    assert!(err.contains("num_predict         -1"), "{err}");
    assert!(
        err.contains("seed                12345678901234567"),
        "exact: {err}"
    );
}

/// `capy bench -d` (llama-bench's depth): each test runs with that many tokens already in
/// the cache, reported as `n_depth`.
#[test]
fn bench_runs_tests_at_depth() {
    let (ok, out, err) = run(
        &[
            "bench",
            "-m",
            "smollm2-135m",
            "-p",
            "16",
            "-n",
            "4",
            "-d",
            "0,130",
            "-r",
            "1",
            "-t",
            "1",
            "--json",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let rows: Value = serde_json::from_str(&out).expect("JSON");
    let got: Vec<(u64, u64, u64)> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            assert!(r["avg_ts"].as_f64().is_some_and(|t| t > 0.0), "{r}");
            (
                r["n_prompt"].as_u64().unwrap(),
                r["n_gen"].as_u64().unwrap(),
                r["n_depth"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [(16, 0, 0), (16, 0, 130), (0, 4, 0), (0, 4, 130)]);
    let (ok, _, err) = run(
        &[
            "bench",
            "-m",
            "smollm2-135m",
            "-p",
            "0",
            "-n",
            "4",
            "-d",
            "100000",
        ],
        &[],
    );
    assert!(
        !ok && err.contains("does not fit the model's context"),
        "{err}"
    );
}

#[test]
fn generate_and_run_take_the_kv_cache_types() {
    let g = golden("SmolLM2-135M-Instruct.Q4_1.json");
    let c = &g["completions"][0];
    let path = model_path("smollm2-135m");
    let p = path.to_str().unwrap();
    let want = &ids(&c["generated_token_ids"])[..4];
    for ty in ["q8_0", "fp8"] {
        let (ok, out, err) = run(
            &[
                "generate",
                "-m",
                p,
                "--prompt",
                c["prompt"].as_str().unwrap(),
                "-n",
                "4",
                "--temp",
                "0",
                "--json",
                "-t",
                "2",
                "-ctk",
                ty,
                "-ctv",
                ty,
            ],
            &[],
        );
        assert!(ok, "{ty}: {err}");
        let v: Value = serde_json::from_str(out.trim()).expect("one JSON object");
        let got: Vec<u64> = v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "{ty}: llama.cpp's greedy tokens");
    }
    let (ok, out, err) = run(
        &["run", p, "Say hi", "-n", "4", "-ctk", "q8_0", "-t", "2"],
        &[],
    );
    assert!(ok && !out.trim().is_empty(), "{err}");
    let (ok, _, err) = run(&["run", p, "Say hi", "-ctv", "q4_0"], &[]);
    assert!(!ok && err.contains("unknown KV cache type"), "{err}");
}

//! `capy run` in a real terminal (a pty), as a user of `ollama run` drives it: Ctrl-C during
//! an answer killed the program; it must stop the answer and return to the prompt, and the
//! next question must be answered. Up-arrow recalls history; Ctrl-D exits.

mod common;

use std::process::Command;

use common::{model_path, temp_dir};

#[test]
fn ctrl_c_stops_an_answer_history_recalls_ctrl_d_exits() {
    let home = temp_dir("pty");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capy"));
    cmd.args([
        "run",
        model_path("smollm2-135m").to_str().unwrap(),
        "-n",
        "3000",
        "-t",
        "2",
    ])
    .args(["--temp", "0", "--repeat-penalty", "1.0"])
    .env("CAPY_HOME", &home)
    .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(60_000)).expect("spawns in a pty");
    p.exp_string(">>> ").expect("a prompt");
    // a long answer, stopped after it has begun
    p.send_line("Write a very long story about a dragon.")
        .unwrap();
    p.exp_string("dragon.").expect("the line echoed");
    p.exp_regex(r"\w+ \w+ \w+ \w+ \w+ \w+ \w+ \w+")
        .expect("the answer streams");
    p.send_control('c').unwrap();
    p.exp_string("(stopped)").expect("Ctrl-C stops the answer");
    p.exp_string(">>> ")
        .expect("back at the prompt, still running");
    p.send_line("What is the capital of France? Answer in one word.")
        .unwrap();
    p.exp_string("Paris")
        .expect("the next question is answered");
    p.exp_string(">>> ").unwrap();
    // up-arrow brings the last question back; Enter asks it again
    p.send("\x1b[A").unwrap();
    p.flush().unwrap();
    p.exp_string("capital of France").expect("history recall");
    p.send_line("").unwrap();
    p.exp_string("Paris").expect("asked again");
    p.exp_string(">>> ").unwrap();
    p.send_line("/show parameters").unwrap();
    p.exp_string("temperature         0").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().expect("Ctrl-D exits");
    let history = std::fs::read_to_string(home.join("history")).expect("history saved");
    assert!(history.contains("capital of France"), "{history}");
}

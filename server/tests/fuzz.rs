//! Fuzzing the HTTP API with schemathesis (pinned in
//! server/tests/python/requirements.txt, installed into .venv by
//! scripts/test.sh): cases generated from `openapi.yaml` against a real
//! server, bounded (10 examples per operation, fixed seed), checking that no
//! answer is a 5xx and that every error answer is an OpenAI error body
//! (`server/tests/fuzz/hooks.py`). The server runs with small request limits
//! so generated requests stay cheap.

mod common;

use std::time::Instant;

#[test]
fn schemathesis_finds_no_5xx_and_only_openai_error_bodies() {
    let root = common::root();
    let bin = std::env::var("OURO_SCHEMATHESIS").map(std::path::PathBuf::from).unwrap_or_else(|_| root.join(".venv/bin/schemathesis"));
    assert!(bin.exists(), "{} not found: run scripts/test.sh (it installs server/tests/python/requirements.txt into .venv)", bin.display());
    let s = common::start(&[
        "--kv-cache-bytes",
        "268435456",
        "--max-tokens",
        "8",
        "--max-n",
        "2",
        "--max-prompt-tokens",
        "256",
        "--trainer",
        "off",
    ]);
    let started = Instant::now();
    let out = std::process::Command::new(&bin)
        .arg("run")
        .arg(root.join("openapi.yaml"))
        .args(["--url", &s.base])
        .args(["--phases", "examples,fuzzing", "--max-examples", "10", "--seed", "1"])
        .args(["--checks", "not_a_server_error,openai_error_body"])
        // Learn jobs run the model for minutes; the experience tests cover them.
        .args(["--exclude-path-regex", "/learn$"])
        .args(["--request-timeout", "60", "--generation-database", "none", "--no-color"])
        .env("PYTHONPATH", root.join("server/tests/fuzz"))
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{log}");
    let summary = log.lines().skip_while(|l| !l.contains("Test cases:")).nth(1).unwrap_or("").trim().to_string();
    assert!(summary.contains("passed"), "{log}");
    println!("schemathesis: {summary} in {:.1} s", started.elapsed().as_secs_f64());
}

//! A closed-loop load generator for a running `ouro serve` (the logic lives
//! in `server::loadgen`): `--concurrency` clients each send streamed chat
//! completions back to back for `--duration-s` seconds (or until
//! `--requests` are done), then it prints answers by status, failures after
//! admission, requests/s, generated tokens/s and TTFT, ITL and end-to-end
//! latency percentiles.
//!
//! ```sh
//! cargo run --release -p ouro-server --example load -- \
//!     --url http://127.0.0.1:8000 --concurrency 64 --duration-s 60 --max-tokens 32
//! ```

use std::time::Duration;

use server::loadgen::{run, LoadConfig};

fn parse_args() -> LoadConfig {
    let mut a = LoadConfig::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value(),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency N"),
            "--requests" => a.requests = value().parse().expect("--requests N"),
            "--duration-s" => a.duration = Some(Duration::from_secs_f64(value().parse().expect("--duration-s SECONDS"))),
            "--max-tokens" => a.max_tokens = value().parse().expect("--max-tokens N"),
            "--disconnect-every" => a.disconnect_every = value().parse().expect("--disconnect-every N"),
            "--api-key" => a.api_key = Some(value()),
            other => panic!(
                "unknown flag {other} (flags: --url --concurrency --requests --duration-s --max-tokens --disconnect-every --api-key)"
            ),
        }
    }
    a
}

#[tokio::main]
async fn main() {
    let cfg = parse_args();
    let report = run(&cfg).await;
    println!("{}", report.summary(&cfg));
    for f in report.failed.iter().take(5) {
        println!("failed: {f}");
    }
    if !report.failed.is_empty() || !report.bad_rejections.is_empty() {
        std::process::exit(1);
    }
}

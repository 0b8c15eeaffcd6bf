//! Load test (issue 8): 64 concurrent streaming clients for 60 s
//! (`OURO_LOAD_SECS` shortens it for local runs) against one real server
//! with admission limits, every 8th client hanging up mid-stream. Admitted
//! requests never fail, every rejection is a 429 with Retry-After and an
//! OpenAI error body, the server's memory stays bounded, and once the load
//! stops the KV cache and the running/waiting gauges return to 0 (the hung-up
//! streams freed their blocks). Prints p50/p99 TTFT and ITL.

mod common;

use std::time::Duration;

use server::loadgen::{run, LoadConfig};

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_streaming_clients_for_a_minute_lose_no_admitted_request() {
    let s = common::start(&["--max-concurrent", "48", "--max-running", "16", "--kv-cache-bytes", "134217728", "--trainer", "off"]);
    let secs: f64 = std::env::var("OURO_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60.0);
    let rss_start = rss_bytes(s.pid);
    let pid = s.pid;
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        for _ in 0..((secs + 5.0) * 4.0) as usize {
            peak = peak.max(rss_bytes(pid));
            std::thread::sleep(Duration::from_millis(250));
        }
        peak
    });
    let cfg = LoadConfig {
        url: s.base.clone(),
        concurrency: 64,
        duration: Some(Duration::from_secs_f64(secs)),
        max_tokens: 32,
        disconnect_every: 8,
        ..LoadConfig::default()
    };
    let report = run(&cfg).await;
    let peak = sampler.join().unwrap();
    println!("{}", report.summary(&cfg));
    println!("server RSS: {} MiB at start, {} MiB peak", rss_start >> 20, peak >> 20);

    assert!(
        report.failed.is_empty(),
        "{} admitted requests failed, e.g. {:?}",
        report.failed.len(),
        &report.failed[..report.failed.len().min(3)]
    );
    assert!(report.bad_rejections.is_empty(), "bad 429s: {:?}", &report.bad_rejections[..report.bad_rejections.len().min(3)]);
    assert!(report.completed >= 16, "too few completed streams: {}", report.completed);
    assert!(report.disconnected >= 2, "the hang-ups must have happened: {}", report.disconnected);
    assert!(report.rejected >= 1, "64 clients over --max-concurrent 48 must see 429s");
    assert_eq!(report.statuses.keys().filter(|k| *k != "200" && *k != "429").count(), 0, "{:?}", report.statuses);
    assert!(!report.ttft.is_empty() && !report.itl.is_empty());
    // Bounded: the KV cache is 128 MiB; weights, activations and buffers
    // for 16 running sequences fit well inside 1.5 GiB over the idle size.
    assert!(peak < rss_start + (1536 << 20), "server RSS grew from {} MiB to {} MiB", rss_start >> 20, peak >> 20);

    for (name, what) in [
        ("ouro_kv_cache_usage_perc", "KV cache usage"),
        ("ouro_num_requests_running", "running requests"),
        ("ouro_num_requests_waiting", "waiting requests"),
    ] {
        let r = common::wait_metric(&s.addr, name, "", 0.0, Duration::from_secs(30));
        assert!(r.is_ok(), "{what} did not return to 0 after the load: {:?}", r.err());
    }
}

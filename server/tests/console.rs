//! The web console (`/console`) end to end in headless Chromium: one real
//! server, driven by `server/tests/console/console.test.mjs` (Playwright,
//! installed by scripts/test.sh with `npm ci`). Screenshots of each view land
//! in `target/console-screenshots/`.

mod common;

use std::path::PathBuf;
use std::process::Command;

const ADMIN_KEY: &str = "console-test-admin-key";

/// Chromium's path: `OURO_CHROMIUM`, else `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    std::env::var("OURO_CHROMIUM").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/bin/chromium"))
}

#[test]
fn the_console_works_in_a_real_browser() {
    // Fail loudly (never pass silently) when the browser tooling is missing.
    let chromium = chromium();
    assert!(
        chromium.exists(),
        "{} not found: the console test needs Chromium (scripts/test.sh installs it: apt-get install -y --no-install-recommends chromium chromium-driver)",
        chromium.display()
    );
    let node_ok = Command::new("node").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(node_ok, "node not found: the console test needs Node.js 20+ (scripts/test.sh installs it)");
    let dir = common::root().join("server/tests/console");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "{}/node_modules/playwright-core is missing: run `npm ci` there (scripts/test.sh does)",
        dir.display()
    );

    let s = common::start(&["--admin-key", ADMIN_KEY]);

    // The static files, with their content types, without a browser.
    let (code, html) = common::raw_get(&s.addr, "/console").unwrap();
    assert_eq!(code, 200);
    assert!(html.contains("/console/console.js"), "{html}");
    let (code, _) = common::raw_get(&s.addr, "/console/nope.js").unwrap();
    assert_eq!(code, 404);

    let out_dir = common::root().join("target/console-screenshots");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = Command::new("node")
        .arg(dir.join("console.test.mjs"))
        .args([&s.base, ADMIN_KEY, &out_dir.display().to_string()])
        .env("OURO_CHROMIUM", &chromium)
        .output()
        .expect("running node");
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{log}");
    assert!(out.status.success(), "the console browser test failed:\n{log}");
    for view in ["chat", "learning", "experiences", "load"] {
        let shot = out_dir.join(format!("{view}.png"));
        assert!(shot.exists(), "{} was not written", shot.display());
    }
}

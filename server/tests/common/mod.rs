//! Test harness: real `ouro serve` processes on free loopback ports.
//!
//! Each server is started once per test binary and shared by its tests. The
//! child gets SIGTERM when the test process exits (PR_SET_PDEATHSIG, armed
//! from a thread that lives as long as the process).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running server.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The served model name.
    pub model: String,
    /// The server's process id.
    pub pid: u32,
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The default model file (fetched by scripts/fetch-model.sh).
pub fn model_path() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn spawn_child(args: Vec<String>, env: Vec<(String, String)>) -> Child {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ouro"));
        cmd.args(&args).envs(env).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        tx.send(cmd.spawn().expect("starting ouro serve")).unwrap();
        // PR_SET_PDEATHSIG fires when this thread exits: keep it alive.
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap()
}

/// Starts `ouro serve --port 0` on the default model with `extra` flags and
/// waits until `/health` answers 200.
pub fn start(extra: &[&str]) -> Server {
    start_logged(extra, None)
}

/// [`start`], with the server's stderr (its log) appended to `log` when given.
pub fn start_logged(extra: &[&str], log: Option<&Path>) -> Server {
    // Each server learns into its own fresh state folder.
    let state = fresh_state_dir();
    start_in(extra, &state, log)
}

/// A new, empty state folder under the temp dir, removed (with its `.log`
/// sibling) when the test process exits.
pub fn fresh_state_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let state = std::env::temp_dir().join(format!(
        "ouro-test-state-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&state);
    at_exit().lock().unwrap().dirs.push(state.clone());
    state
}

/// What the test process cleans up when it exits: the servers it started
/// (each holds a state folder of about 100 MB) and their state folders.
#[derive(Default)]
struct AtExit {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

fn at_exit() -> &'static std::sync::Mutex<AtExit> {
    static CLEANUP: std::sync::OnceLock<std::sync::Mutex<AtExit>> = std::sync::OnceLock::new();
    CLEANUP.get_or_init(|| {
        // SAFETY: registers a plain function; it runs once, from exit(3).
        unsafe { libc::atexit(clean_up) };
        Default::default()
    })
}

extern "C" fn clean_up() {
    let Ok(todo) = at_exit().lock() else { return };
    for &pid in &todo.pids {
        // Only a child of ours that is still running: waitpid answers 0 for
        // it, and -1 for a pid already reaped (which may since be reused).
        // SAFETY: plain system calls on our own children.
        unsafe {
            if libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) == 0 {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
        }
    }
    for dir in &todo.dirs {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(dir.with_extension("log"));
    }
}

/// [`start_logged`] with a given state folder (kept as it is: restarts
/// resume from it).
pub fn start_in(extra: &[&str], state: &Path, log: Option<&Path>) -> Server {
    start_with_env(extra, state, log, &[])
}

/// [`start_in`] with extra environment variables for the server process
/// (e.g. the fault injection of `engine::fault`).
pub fn start_with_env(extra: &[&str], state: &Path, log: Option<&Path>, env: &[(&str, &str)]) -> Server {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--port".into(),
        "0".into(),
        "--model".into(),
        model_path().display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = spawn_child(args, env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Keep draining stderr so the server never blocks on a full pipe.
    let mut log_file = log.map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).expect("opening the server log"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(f) = log_file.as_mut() {
                let _ = f.write_all(&buf[..n]);
            }
            if std::env::var("OURO_TEST_SERVER_LOG").is_ok() {
                let _ = std::io::stderr().write_all(&buf[..n]);
            }
        }
    });
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next().expect("server printed nothing").unwrap();
    let base = line.split("listening on ").nth(1).unwrap_or_else(|| panic!("unexpected first line: {line}")).trim().to_string();
    std::thread::spawn(move || for _ in lines {});
    let addr = base.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok((200, _)) = raw_get(&addr, "/health") {
            break;
        }
        assert!(Instant::now() < deadline, "server at {base} not healthy after 180 s");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = child.id();
    std::mem::forget(child);
    at_exit().lock().unwrap().pids.push(pid);
    Server { base, addr, model: "SmolLM2-135M-Instruct.Q4_1".into(), pid }
}

/// A plain HTTP/1.1 GET (no client library), returning status and body.
pub fn raw_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// The value of a metric line `name{...} value` (first match whose labels
/// contain `label`), from `GET /metrics`.
pub fn metric(addr: &str, name: &str, label: &str) -> Option<f64> {
    let (_, body) = raw_get(addr, "/metrics").ok()?;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `GET /metrics` until the metric equals `value` (engine gauges are
/// published after each step, so they lag the tokens a client sees).
pub fn wait_metric(addr: &str, name: &str, label: &str, value: f64, timeout: Duration) -> Result<(), Option<f64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(addr, name, label);
        if v == Some(value) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

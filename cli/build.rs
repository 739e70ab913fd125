//! Builds the agent (`../agent`, a cdylib) with the same cargo, so that the
//! `probert` binary carries it (`include_bytes!`) and `cargo install --path
//! cli` gives a working command with nothing else to install.
//!
//! The agent is built `--release --locked` (offline when cargo is) into
//! `<target>/embedded-agent`, one directory for every profile of the
//! command: a debug and a release build of the command share it, and a
//! rebuild with nothing changed is cargo's no-op. Under clippy (which builds
//! no binary) and outside the workspace (a packaged crate, which does not
//! hold the agent's sources), nothing is embedded and the command looks for
//! the agent next to itself or in `PROBERT_AGENT`.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let embedded = out.join("libprobert_agent.so");
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = here.join("..");
    let manifest = root.join("agent/Cargo.toml");
    println!("cargo:rerun-if-env-changed=PROBERT_NO_EMBED");
    let clippy = std::env::var_os("RUSTC_WORKSPACE_WRAPPER")
        .is_some_and(|w| w.to_string_lossy().contains("clippy"));
    if !manifest.is_file() || clippy || std::env::var_os("PROBERT_NO_EMBED").is_some() {
        std::fs::write(&embedded, b"").expect("write the empty agent");
        return;
    }
    for p in [
        "agent/src",
        "agent/Cargo.toml",
        "runtime/src",
        "runtime/Cargo.toml",
        "runtime/build.rs",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    // OUT_DIR is <target>/[<triple>/]<profile>/build/probert-cli-<hash>/out.
    let target = target_dir(&out).unwrap_or_else(|| out.clone());
    let agent_target = target.join("embedded-agent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--lib", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&agent_target)
        // The embedded copy needs no debug information: a smaller binary.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    if std::env::var("CARGO_NET_OFFLINE").as_deref() == Ok("true") {
        cmd.arg("--offline");
    }
    let st = cmd.status().expect("run cargo for the agent");
    assert!(st.success(), "building the agent (probert-agent) failed");
    let built = agent_target.join("release/libprobert_agent.so");
    std::fs::copy(&built, &embedded).expect("copy the agent");
}

/// The target directory holding `out`, found as the parent of the profile
/// directory that holds `build/`.
fn target_dir(out: &Path) -> Option<PathBuf> {
    let build = out
        .ancestors()
        .find(|a| a.file_name() == Some("build".as_ref()))?;
    Some(build.parent()?.parent()?.to_path_buf())
}

//! The `rootfsctl` example as a test sees it: built on demand with the test's profile,
//! and run with a cache dir and a scratch `TMPDIR`, directly or under another command
//! (`strace ... rootfsctl ...`). Shared by `tests/interop.rs`, `tests/nothing_lost.rs` and
//! `tests/crash_points.rs`; included with `#[path = "common/rootfsctl.rs"] mod rootfsctl;`
//! next to `mod support;`.
//!
//! `cargo test --test X` does not build examples: [`rootfsctl_bin`] brings the binary up
//! to date when a test first needs it (a no-op when it is).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::support;

/// `target/[<triple>/]<profile>/examples/rootfsctl`, built (or brought up to date) with
/// the profile this test was built with.
pub fn rootfsctl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // Tests run from target/[<triple>/]<profile>/deps/.
        let profile_dir = exe.parent().and_then(Path::parent).expect("test binary outside target/<profile>/deps");
        let bin = profile_dir.join("examples").join("rootfsctl");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => panic!("odd test binary path {}", exe.display()),
        };
        let up = profile_dir.parent().unwrap();
        let (target_dir, triple) =
            if up.join("CACHEDIR.TAG").exists() { (up, None) } else { (up.parent().unwrap(), up.file_name()) };
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--example", "rootfsctl", "--profile", profile])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        if let Some(t) = triple {
            cmd.arg("--target").arg(t);
        }
        support::run(&mut cmd);
        assert!(bin.is_file(), "cargo built no {}", bin.display());
        bin
    })
}

/// `rootfsctl` with a cache dir, and `TMPDIR` (where `mount` probes overlayfs) on the
/// scratch tmpfs.
pub struct Ctl {
    pub cache: PathBuf,
    pub tmp: PathBuf,
}

impl Ctl {
    /// `rootfsctl ARGS` (no cache), not started yet.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(rootfsctl_bin());
        c.args(args).env("TMPDIR", &self.tmp);
        c
    }

    /// `rootfsctl --cache C ARGS`, not started yet.
    pub fn cached_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd(&["--cache", s(&self.cache)]);
        c.args(args);
        c
    }

    /// `WRAPPER... rootfsctl [--cache C] ARGS` (`WRAPPER` is a command that runs the one
    /// after it, such as `strace -o TRACE`), not started yet.
    pub fn wrapped(&self, wrapper: &[&str], cached: bool, args: &[&str]) -> Command {
        let (prog, pre) = wrapper.split_first().expect("a wrapper command");
        let mut c = Command::new(prog);
        c.args(pre).arg(rootfsctl_bin()).env("TMPDIR", &self.tmp);
        if cached {
            c.arg("--cache").arg(&self.cache);
        }
        c.args(args);
        c
    }

    /// `rootfsctl ARGS` (no cache), its stdout; panics unless it succeeds.
    pub fn run(&self, args: &[&str]) -> String {
        String::from_utf8(support::run(&mut self.cmd(args))).unwrap()
    }

    /// `rootfsctl --cache C ARGS`, its stdout; panics unless it succeeds.
    pub fn cached(&self, args: &[&str]) -> String {
        String::from_utf8(support::run(&mut self.cached_cmd(args))).unwrap()
    }

    /// `rootfsctl ARGS` (no cache), however it ends.
    pub fn output(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args);
        c.output().unwrap_or_else(|e| panic!("spawn {c:?}: {e}"))
    }

    /// `rootfsctl --cache C ARGS`, however it ends.
    pub fn cached_output(&self, args: &[&str]) -> Output {
        let mut c = self.cached_cmd(args);
        c.output().unwrap_or_else(|e| panic!("spawn {c:?}: {e}"))
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("non-UTF-8 scratch path")
}

/// `key=value` tokens of one output line.
pub fn kv(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .map(|t| {
            let (k, v) = t.split_once('=').unwrap_or_else(|| panic!("not key=value: {t:?} in {line:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

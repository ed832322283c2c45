//! `rootfsctl --cache C run [--keep] REF WS -- COMMAND...`: a command run chrooted in a
//! fresh workspace, its status passed on, and every path tearing down what `run` set up
//! and only that.
//!
//! The image is an OCI layout made here whose one layer holds the host's `/bin/sh` and
//! the shared libraries `ldd` lists for it (no static busybox needed), plus a few files.
//! Every test runs in its own private mount namespace (the test thread's; `rootfsctl`
//! inherits it) on a scratch tmpfs.
//!
//! Needs root (mounts, chroot) and `ldd` (skipped otherwise, a failure under `CI=1`).

#[path = "common/live_sandbox.rs"]
mod live_sandbox;
#[path = "common/rootfsctl.rs"]
mod rootfsctl;
#[path = "common/scratch_ns.rs"]
mod scratch_ns;
mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rootfs_cache::is_mount_point;
use rootfsctl::{Ctl, s};
use support::{Ent, Fmt};

/// A scratch tmpfs with the layout `L` (tag `sh`) and a cache `C`.
struct Fx {
    base: PathBuf,
    ctl: Ctl,
    image: String,
    _scratch: scratch_ns::Mounted,
    _tmp: tempfile::TempDir,
}

fn setup(test: &str) -> Option<Fx> {
    if !support::require_root(test) || !support::require_tools(test, &["ldd"]) {
        return None;
    }
    scratch_ns::private_ns();
    let tmp = support::tempdir();
    let scratch = scratch_ns::tmpfs(tmp.path(), "size=256m,mode=0755");
    let base = tmp.path().to_path_buf();
    let ctl = Ctl { cache: base.join("C"), tmp: base.join("tmp") };
    fs::create_dir(&ctl.tmp).unwrap();
    let layout = shell_layout(&base.join("L"));
    rootfsctl::rootfsctl_bin();
    Some(Fx { image: format!("{}:sh", s(&layout)), base, ctl, _scratch: scratch, _tmp: tmp })
}

/// The host's `/bin/sh` as `bin/sh`, and every library `ldd /bin/sh` names at the path
/// it names (the dynamic loader included), with the directories above them.
fn sh_layer() -> Vec<Ent> {
    let out = support::run(Command::new("ldd").arg("/bin/sh"));
    let mut files: Vec<(String, PathBuf)> = vec![("bin/sh".into(), PathBuf::from("/bin/sh"))];
    for line in String::from_utf8(out).unwrap().lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push((p.trim_start_matches('/').to_string(), PathBuf::from(p)));
        }
    }
    let mut dirs = BTreeSet::new();
    for (name, _) in &files {
        let mut d = Path::new(name).parent();
        while let Some(p) = d.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_str().unwrap().to_string());
            d = p.parent();
        }
    }
    dirs.insert("etc".into());
    dirs.insert("tmp".into());
    let mut ents: Vec<Ent> = dirs.iter().map(|d| Ent::dir(d)).collect();
    for (name, host) in &files {
        let data = fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
        ents.push(Ent::file(name, data).mode(0o755));
    }
    ents.push(Ent::file("etc/hostname", "image\n"));
    ents
}

/// An OCI layout with one image, tag `sh`: [`sh_layer`], gzip.
fn shell_layout(l: &Path) -> PathBuf {
    use live_sandbox::{OCI_CONFIG, OCI_GZIP, OCI_INDEX, OCI_MANIFEST, blob};
    use serde_json::json;
    fs::create_dir_all(l.join("blobs/sha256")).unwrap();
    fs::write(l.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let layer = blob(l, OCI_GZIP, &support::gzip(&support::tar_of(&sh_layer(), Fmt::Pax)));
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}});
    let config = blob(l, OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
    let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]});
    let mut d = blob(l, OCI_MANIFEST, &serde_json::to_vec(&m).unwrap());
    d["annotations"] = json!({"org.opencontainers.image.ref.name": "sh"});
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d]});
    fs::write(l.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    l.to_path_buf()
}

impl Fx {
    /// `rootfsctl --cache C run ARGS`, however it ends (stdin empty).
    fn run(&self, args: &[&str]) -> Output {
        let mut c = self.ctl.cached_cmd(&["run"]);
        c.args(args).stdin(Stdio::null());
        c.output().unwrap()
    }

    /// `run [FLAGS] IMAGE WS -- COMMAND...`.
    fn run_sh(&self, flags: &[&str], ws: &Path, command: &[&str]) -> Output {
        let mut args: Vec<&str> = flags.to_vec();
        args.extend([self.image.as_str(), s(ws), "--"]);
        args.extend(command);
        self.run(&args)
    }

    fn leases(&self) -> String {
        self.ctl.cached(&["leases"])
    }

    /// Nothing left of a run without `--keep`: no workspace, no lease, no mount, and the
    /// image's layers still cached (unleased).
    fn assert_gone(&self, ws: &Path) {
        assert!(!ws.exists(), "{} is left: {:?}", ws.display(), live_sandbox::names(ws));
        assert_eq!(self.leases(), "", "a lease is left");
        assert_eq!(live_sandbox::mounts_under(&self.base), Vec::<String>::new(), "a mount is left");
        let ls = self.ctl.cached(&["ls"]);
        assert_eq!(ls.lines().count(), 1, "the layer is not cached: {ls:?}");
        assert!(ls.lines().all(|l| l.ends_with(" -")), "still leased: {ls:?}");
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One `rootfsctl:` line on stderr.
fn assert_one_line(o: &Output, contains: &str) {
    let e = stderr(o);
    assert_eq!(e.lines().count(), 1, "stderr: {e:?}");
    assert!(e.starts_with("rootfsctl: ") && e.contains(contains), "stderr: {e:?}");
}

#[test]
fn output_and_status_pass_through() {
    let Some(fx) = setup("output_and_status_pass_through") else { return };
    let ws = fx.base.join("ws");
    let o = fx.run_sh(
        &[],
        &ws,
        &["sh", "-c", "echo hello; read h < /etc/hostname; echo $h; pwd; test -e /C || echo chrooted"],
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "hello\nimage\n/\nchrooted\n");
    assert_eq!(stderr(&o), "");
    fx.assert_gone(&ws);

    let o = fx.run_sh(&[], &ws, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((o.status.code(), stdout(&o).as_str(), stderr(&o).as_str()), (Some(3), "out\n", "err\n"));
    fx.assert_gone(&ws);

    // Arguments after `--` are the command's, options of rootfsctl's included.
    let o = fx.run_sh(&[], &ws, &["sh", "-c", r#"printf '[%s]' "$@""#, "sh", "--help", "--keep", "a b", "--"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "[--help][--keep][a b][--]");

    // stdin passes through; the default PATH when there is none; the environment.
    let mut c =
        fx.ctl.cached_cmd(&["run", &fx.image, s(&ws), "--", "sh", "-c", "read x; echo \"got $x $PATH $GREETING\""]);
    c.env_remove("PATH").env("GREETING", "hi").stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"line\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "got line /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin hi\n");
    fx.assert_gone(&ws);

    // An empty directory is taken (and gone afterwards, as with `destroy`).
    fs::create_dir(&ws).unwrap();
    let o = fx.run_sh(&[], &ws, &["sh", "-c", "exit 0"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    fx.assert_gone(&ws);
}

#[test]
fn keep_leaves_the_writes_for_later_commands() {
    let Some(fx) = setup("keep_leaves_the_writes_for_later_commands") else { return };
    for backend in ["kernel", "copy"] {
        let ws = fx.base.join(format!("ws-{backend}"));
        let o = fx.run_sh(
            &["--keep", "--backend", backend],
            &ws,
            &["sh", "-c", "echo data > /written; echo changed > /etc/hostname"],
        );
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
        assert_eq!((stdout(&o).as_str(), stderr(&o).as_str()), ("", ""), "run --keep printed something");
        assert_eq!(fs::read(ws.join("upper/written")).unwrap(), b"data\n");
        assert!(!is_mount_point(&ws.join("rootfs")).unwrap(), "--keep left the view mounted");
        assert_eq!(fx.leases().lines().count(), 1, "--keep gave the lease back");

        // `mount` and `diff export` use the sandbox's writes; `destroy` takes it all away.
        let view = fx.ctl.run(&["mount", s(&ws)]);
        let view = Path::new(view.trim_end());
        assert_eq!(fs::read(view.join("written")).unwrap(), b"data\n");
        assert_eq!(fs::read(view.join("etc/hostname")).unwrap(), b"changed\n");
        fx.ctl.run(&["unmount", s(&ws)]);
        let tar = fx.base.join(format!("{backend}.tar"));
        fx.ctl.run(&["diff", "export", s(&ws), s(&tar)]);
        let names = live_sandbox::tar_list(&tar).unwrap();
        assert!(names.iter().any(|n| n == "written") && names.iter().any(|n| n == "etc/hostname"), "{names:?}");
        fx.ctl.cached(&["destroy", s(&ws)]);
        fx.assert_gone(&ws);
    }
}

#[test]
fn exec_failures_are_127_and_126() {
    let Some(fx) = setup("exec_failures_are_127_and_126") else { return };
    let ws = fx.base.join("ws");
    let o = fx.run_sh(&[], &ws, &["no-such-command", "arg"]);
    assert_eq!(o.status.code(), Some(127));
    assert_one_line(&o, "no-such-command: command not found");
    fx.assert_gone(&ws);
    let o = fx.run_sh(&["--keep"], &ws, &["/bin/nope"]);
    assert_eq!(o.status.code(), Some(127));
    assert_one_line(&o, "/bin/nope: command not found");
    assert!(ws.join("workspace.json").is_file(), "--keep did not keep");
    fx.ctl.cached(&["destroy", s(&ws)]);
    fx.assert_gone(&ws);
    // Not executable (the host's own /etc/hostname must not be what runs).
    let o = fx.run_sh(&[], &ws, &["/etc/hostname"]);
    assert_eq!(o.status.code(), Some(126));
    assert_one_line(&o, "/etc/hostname: Permission denied");
    fx.assert_gone(&ws);
}

#[test]
fn killed_by_a_signal_is_128_plus_n() {
    let Some(fx) = setup("killed_by_a_signal_is_128_plus_n") else { return };
    let ws = fx.base.join("ws");
    let o = fx.run_sh(&[], &ws, &["sh", "-c", "kill -KILL $$"]);
    assert_eq!(o.status.code(), Some(128 + 9), "stderr: {}", stderr(&o));
    fx.assert_gone(&ws);
    let o = fx.run_sh(&[], &ws, &["sh", "-c", "kill -USR1 $$"]);
    assert_eq!(o.status.code(), Some(128 + 10), "stderr: {}", stderr(&o));
    fx.assert_gone(&ws);
}

/// A started `rootfsctl run ... -- sh -c 'echo ready; read x; echo read'`, its stdin a
/// pipe that is never written (kept open here: `Child::wait` would close it).
struct Waiting {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    _stdin: std::process::ChildStdin,
}

/// Starts it; returns once the command runs. SIGINT is reset to its default for it, as
/// in an interactive shell (a test run in the background inherits it ignored, and a
/// non-interactive `sh` cannot undo that).
fn start_waiting(fx: &Fx, flags: &[&str], ws: &Path) -> Waiting {
    use std::os::unix::process::CommandExt;
    let mut args = vec!["run"];
    args.extend(flags);
    args.extend([fx.image.as_str(), s(ws), "--", "sh", "-c", "echo ready; read x; echo read"]);
    let mut c = fx.ctl.cached_cmd(&args);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: signal(2) with SIG_DFL between fork and exec, nothing else.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    Waiting { child, out, _stdin: stdin }
}

#[test]
fn signals_are_forwarded_and_run_still_tears_down() {
    let Some(fx) = setup("signals_are_forwarded_and_run_still_tears_down") else { return };
    let ws = fx.base.join("ws");
    for (sig, n) in [(libc::SIGTERM, 15), (libc::SIGINT, 2), (libc::SIGHUP, 1)] {
        let mut w = start_waiting(&fx, &[], &ws);
        assert!(is_mount_point(&ws.join("rootfs")).unwrap());
        // SAFETY: a plain kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(w.child.id() as i32, sig) }, 0);
        let status = w.child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + n), "signal {sig}: {status:?}");
        fx.assert_gone(&ws);
    }
}

#[test]
fn sigkill_of_rootfsctl_leaves_a_destroyable_workspace() {
    let Some(fx) = setup("sigkill_of_rootfsctl_leaves_a_destroyable_workspace") else { return };
    let ws = fx.base.join("ws");
    let mut w = start_waiting(&fx, &[], &ws);
    w.child.kill().unwrap();
    assert_eq!(w.child.wait().unwrap().signal(), Some(9));
    // The command went with it (its stdout closes without "read", its stdin still open).
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut w.out, &mut rest).unwrap();
    assert_eq!(rest, "");
    assert!(ws.join("workspace.json").is_file());
    assert_eq!(fx.leases().lines().count(), 1);
    fx.ctl.cached(&["destroy", s(&ws)]);
    fx.assert_gone(&ws);
}

#[test]
fn a_non_empty_ws_dir_is_refused_untouched() {
    let Some(fx) = setup("a_non_empty_ws_dir_is_refused_untouched") else { return };
    let ws = fx.base.join("ws");
    fs::create_dir(&ws).unwrap();
    fs::write(ws.join("precious"), "mine\n").unwrap();
    let before = live_sandbox::tree(&ws);
    let o = fx.run_sh(&[], &ws, &["sh", "-c", "echo ran"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "");
    assert_one_line(&o, "not empty");
    live_sandbox::assert_same_tree("the refused WS_DIR", &before, &live_sandbox::tree(&ws));
    assert_eq!(fx.leases(), "");

    // A kept workspace is not run over either, and stays usable.
    let kept = fx.base.join("kept");
    let o = fx.run_sh(&["--keep"], &kept, &["sh", "-c", "echo 1 > /one"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let before = live_sandbox::tree(&kept);
    let o = fx.run_sh(&[], &kept, &["sh", "-c", "echo ran"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(1), ""));
    live_sandbox::assert_same_tree("the kept workspace", &before, &live_sandbox::tree(&kept));
    fx.ctl.cached(&["destroy", s(&kept)]);
    assert!(!kept.exists());

    // A file, not a directory.
    let file = fx.base.join("file");
    fs::write(&file, "x").unwrap();
    let o = fx.run_sh(&[], &file, &["sh"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn bad_refs_and_usage_leave_nothing() {
    let Some(fx) = setup("bad_refs_and_usage_leave_nothing") else { return };
    let ws = fx.base.join("ws");
    let missing = format!("{}:no-such-tag", s(&fx.base.join("L")));
    let nowhere = s(&fx.base.join("nowhere")).to_string();
    for r in [missing.as_str(), nowhere.as_str(), "oci:"] {
        let o = fx.run(&[r, s(&ws), "--", "sh", "-c", "echo ran"]);
        assert!(matches!(o.status.code(), Some(1 | 2)), "{r}: {:?}", o.status);
        assert_eq!(stdout(&o), "", "{r}");
        assert_one_line(&o, "");
        assert!(!ws.exists(), "{r}: {} was made", ws.display());
    }
    assert_eq!(fx.leases(), "");
    // Usage: no `--`, no command, no WS_DIR, --lazy with --keep, an unknown option, no
    // --cache.
    for args in [
        vec![fx.image.as_str(), s(&ws), "sh"],
        vec![fx.image.as_str(), s(&ws), "--"],
        vec![fx.image.as_str(), "--", "sh"],
        vec!["--lazy", "--keep", fx.image.as_str(), s(&ws), "--", "sh"],
        vec!["--backend", "fuse", fx.image.as_str(), s(&ws), "--", "sh"],
    ] {
        let o = fx.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_one_line(&o, "");
        assert!(!ws.exists());
    }
    let o = fx.ctl.output(&["run", &fx.image, s(&ws), "--", "sh"]);
    assert_eq!(o.status.code(), Some(2), "without --cache: {}", stderr(&o));
    assert!(!ws.exists());
    // `run --help` prints the command's help, even with a command after `--`.
    let o = fx.ctl.output(&["run", "--help"]);
    assert!(o.status.success() && stdout(&o).contains("run [--lazy] [--keep]"));
}

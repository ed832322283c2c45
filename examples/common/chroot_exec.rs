//! Running a command with a directory as its root, for `rootfsctl run`
//! (`#[path = "common/chroot_exec.rs"] mod chroot_exec;`).
//!
//! The child gets a mount namespace of its own (and a user namespace too when the caller
//! is not root, so that it may `chroot`), with the root mount made a slave: the mounts
//! the command makes (`/proc`, tmpfs) stay in its namespace and go with it, and never
//! stand in the way of the caller's unmount of the view. The view itself stays mounted
//! in the caller's namespace. Then `chroot(root)`, `chdir("/")`, and `execve` along `PATH` (as `execvp`), so the
//! command is looked up in the new root's `PATH` directories (a default `PATH` when it is
//! unset). The child dies with the caller (`PR_SET_PDEATHSIG`): a command never outlives
//! the process that tears its workspace down.
//!
//! The caller blocks SIGINT, SIGTERM, SIGHUP and SIGCHLD first ([`Blocked::block`]) and
//! keeps them blocked until it exits: [`run`] waits for them with `sigwaitinfo`,
//! forwards the first three to the command and reaps it on the last, and a signal that
//! arrives after the command ended never interrupts the teardown.
//!
//! This is the example's only `unsafe` code: `fork`, `sigwaitinfo`, `execve`, `_exit`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

/// `PATH` for the command when the caller has none (the usual one of shells and runc).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The signals passed on to the command.
const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// SIGINT, SIGTERM, SIGHUP and SIGCHLD blocked in this thread; the mask before, for the
/// child. Never unblocked again in this process (see the module docs).
pub struct Blocked {
    old: SigSet,
}

impl Blocked {
    /// Blocks the signals. No thread started earlier may still run (it would take them
    /// with their default action; threads started later inherit the mask), and [`run`]
    /// forks: `rootfsctl`'s library calls run their threads scoped, joined before they
    /// return.
    pub fn block() -> Result<Blocked, String> {
        let mut set = SigSet::empty();
        for s in FORWARDED.iter().chain([&Signal::SIGCHLD]) {
            set.add(*s);
        }
        let mut old = SigSet::empty();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
            .map_err(|e| format!("sigprocmask: {e}"))?;
        Ok(Blocked { old })
    }
}

/// How the command ended.
#[derive(Clone, Copy, Debug)]
pub enum Ended {
    Exited(i32),
    Signaled(Signal),
}

impl Ended {
    /// The status a shell reports: the exit code, or 128 + the signal's number.
    pub fn code(self) -> u8 {
        match self {
            Ended::Exited(c) => c as u8,
            Ended::Signaled(s) => (128 + s as i32) as u8,
        }
    }
}

/// Why the command did not run.
#[derive(Debug)]
pub enum Failure {
    /// `execvp` failed (the new root has no such command, or it cannot be executed).
    Exec(Errno),
    /// A step before it failed in the child: its name, and the error.
    Setup(&'static str, Errno),
    /// Preparing or starting the child failed in the caller.
    Start(String),
}

/// The child's steps, by the number it reports on failure (0 is `execvp`).
const STEPS: [&str; 9] = [
    "execvp",
    "unshare(CLONE_NEWUSER|CLONE_NEWNS)",
    "write /proc/self/setgroups",
    "write /proc/self/uid_map",
    "write /proc/self/gid_map",
    "unshare(CLONE_NEWNS)",
    "mount --make-rslave /",
    "chroot",
    "chdir /",
];

/// Runs `argv` with `root` as its root directory (see the module docs), stdin, stdout
/// and stderr passed through, and waits for it, forwarding SIGINT, SIGTERM and SIGHUP
/// (except those a terminal sent to the whole foreground process group, which the
/// command got already).
pub fn run(blocked: &Blocked, root: &Path, argv: &[String]) -> Result<Ended, Failure> {
    // Everything the child needs is made here: it only makes system calls.
    let cstr = |b: &[u8]| {
        CString::new(b).map_err(|_| Failure::Start(format!("{:?}: contains a NUL byte", String::from_utf8_lossy(b))))
    };
    let root_c = cstr(root.as_os_str().as_bytes())?;
    let args = argv.iter().map(|a| cstr(a.as_bytes())).collect::<Result<Vec<_>, _>>()?;
    let Some(prog) = args.first() else { return Err(Failure::Start("no command".into())) };
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    // The environment and the program's candidate paths (a `PATH` search, as execvp
    // does it) are made here too: the child of a multi-threaded process (a lazy `run`
    // serves FUSE from threads) may not allocate.
    let mut env: Vec<CString> = Vec::new();
    for (k, v) in std::env::vars_os() {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.extend(CString::new(kv).ok());
    }
    let search = std::env::var_os("PATH").map_or_else(|| DEFAULT_PATH.as_bytes().to_vec(), |p| p.as_bytes().to_vec());
    if std::env::var_os("PATH").is_none() {
        env.push(CString::new(format!("PATH={DEFAULT_PATH}")).expect("no NUL"));
    }
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let candidates: Vec<CString> = if prog.as_bytes().contains(&b'/') {
        vec![prog.clone()]
    } else {
        search
            .split(|&b| b == b':')
            .map(|dir| {
                let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
                let mut p = dir.to_vec();
                p.push(b'/');
                p.extend_from_slice(prog.as_bytes());
                p
            })
            .filter_map(|p| CString::new(p).ok())
            .collect()
    };
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let rootless = !nix::unistd::geteuid().is_root();
    let uid_map = format!("{uid} {uid} 1\n");
    let gid_map = format!("{gid} {gid} 1\n");
    let parent = nix::unistd::getpid();
    let (report_r, report_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Failure::Start(format!("pipe2: {e}")))?;

    // SAFETY: the child only makes system calls on data prepared above (no allocation:
    // other threads may hold the allocator's locks) and leaves with `execve` or
    // `_exit`, never returning into the caller's code.
    match unsafe { nix::unistd::fork() }.map_err(|e| Failure::Start(format!("fork: {e}")))? {
        ForkResult::Child => {
            drop(report_r);
            let (step, errno) = child(ChildPlan {
                blocked,
                root: &root_c,
                candidates: &candidates,
                argv: &arg_ptrs,
                envp: &env_ptrs,
                rootless: rootless.then_some((uid_map.as_bytes(), gid_map.as_bytes())),
                parent,
            });
            let mut msg = [0u8; 5];
            msg[0] = step;
            msg[1..].copy_from_slice(&(errno as i32).to_ne_bytes());
            // SAFETY: plain system calls on a valid buffer and descriptor; `_exit` skips
            // the caller's atexit handlers and buffered output, which are not the child's.
            unsafe {
                libc::write(report_w.as_raw_fd(), msg.as_ptr().cast(), msg.len());
                libc::_exit(127)
            }
        }
        ForkResult::Parent { child } => {
            drop(report_w);
            let report = read_report(report_r);
            let ended = wait_forwarding(child, report.is_none());
            match report {
                Some((0, errno)) => Err(Failure::Exec(errno)),
                Some((step, errno)) => Err(Failure::Setup(STEPS.get(step as usize).copied().unwrap_or("setup"), errno)),
                None => ended.map_err(Failure::Start),
            }
        }
    }
}

struct ChildPlan<'a> {
    blocked: &'a Blocked,
    root: &'a CString,
    /// The paths to try, in order (the program itself when it names a path).
    candidates: &'a [CString],
    argv: &'a [*const libc::c_char],
    /// The environment, `PATH` included.
    envp: &'a [*const libc::c_char],
    /// Not root: a user namespace, mapping these uid and gid lines.
    rootless: Option<(&'a [u8], &'a [u8])>,
    parent: Pid,
}

/// The child's side: returns only on failure, with the step and the error.
fn child(p: ChildPlan<'_>) -> (u8, Errno) {
    use nix::sched::{CloneFlags, unshare};
    // Dies with the caller; if the caller is already gone, goes too.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != p.parent {
        // SAFETY: leaving the child at once.
        unsafe { libc::_exit(127) }
    }
    let step = |n: u8, r: nix::Result<()>| r.map_err(|e| (n, e));
    let setup = (|| {
        match p.rootless {
            Some((uid_map, gid_map)) => {
                step(1, unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS))?;
                step(2, write_proc("/proc/self/setgroups", b"deny"))?;
                step(3, write_proc("/proc/self/uid_map", uid_map))?;
                step(4, write_proc("/proc/self/gid_map", gid_map))?;
            }
            None => step(5, unshare(CloneFlags::CLONE_NEWNS))?,
        }
        let slave = nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE;
        step(6, nix::mount::mount(None::<&str>, "/", None::<&str>, slave, None::<&str>))?;
        step(7, nix::unistd::chroot(p.root.as_c_str()))?;
        step(8, nix::unistd::chdir("/"))?;
        Ok(())
    })();
    if let Err(failed) = setup {
        return failed;
    }
    // The command starts as a shell would start it: SIGPIPE back to its default (Rust
    // ignores it), the caller's signal mask.
    // SAFETY: SIG_DFL installs no handler.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&p.blocked.old), None);
    // As execvp: the first candidate that can be executed; EACCES if one existed but
    // could not be, else the last error.
    let mut denied = false;
    let mut last = Errno::ENOENT;
    for c in p.candidates {
        // SAFETY: NUL-terminated strings and NULL-terminated argv and envp, prepared
        // before fork.
        unsafe { libc::execve(c.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr()) };
        last = Errno::last();
        denied |= last == Errno::EACCES;
        if !matches!(last, Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES | Errno::ELOOP | Errno::ENAMETOOLONG) {
            break;
        }
    }
    (0, if denied { Errno::EACCES } else { last })
}

/// Writes `data` to a `/proc` file in one `write`, as the kernel wants for id maps.
fn write_proc(path: &str, data: &[u8]) -> nix::Result<()> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::write(&fd, data).map(drop)
}

/// What the child reported before `execvp` replaced it: nothing (the command runs), or
/// the failed step and its error.
fn read_report(r: OwnedFd) -> Option<(u8, Errno)> {
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(&r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    (got == buf.len()).then(|| (buf[0], Errno::from_raw(i32::from_ne_bytes(buf[1..].try_into().expect("4 bytes")))))
}

/// Waits for `child`, forwarding SIGINT, SIGTERM and SIGHUP to it when `forward` (a
/// child that failed to exec just gets reaped).
fn wait_forwarding(child: Pid, forward: bool) -> Result<Ended, String> {
    let mut set = SigSet::empty();
    for s in FORWARDED.iter().chain([&Signal::SIGCHLD]) {
        set.add(*s);
    }
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Ended::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Ended::Signaled(sig)),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("waitpid {child}: {e}")),
        }
        // SAFETY: `info` is a plain C struct the call fills in; `set` is a valid sigset.
        let (signo, code) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let n = libc::sigwaitinfo(set.as_ref(), &mut info);
            if n < 0 {
                continue; // EINTR
            }
            (n, info.si_code)
        };
        if signo == libc::SIGCHLD || !forward {
            continue;
        }
        // A terminal's ^C, ^\ or hangup went to the whole foreground process group, the
        // command included (SI_KERNEL): passing it on would deliver it twice.
        if code == libc::SI_KERNEL {
            continue;
        }
        if let Ok(sig) = Signal::try_from(signo) {
            let _ = nix::sys::signal::kill(child, sig);
        }
    }
}

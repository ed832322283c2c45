//! The FUSE file system behind a lazy layer's data-only lower.
//!
//! A lazy layer is mounted as `lowerdir=…:skeleton::data` where `skeleton` holds the
//! layer's tree (directories, links, devices, whiteouts, xattrs, small files) and every
//! other regular file is a sparse placeholder of the right size carrying
//! `overlay.metacopy` and `overlay.redirect=/<id>`. The kernel looks `/<id>` up in the
//! data-only lower only when the file is *opened* (`stat` and `readdir` never get here),
//! so this file system is flat: its root holds one read-only regular file per data
//! entry, named by a prefix (the layer's, so that the data-only lowers of several lazy
//! layers under one overlay never answer for each other: the kernel looks a redirect up
//! in every data-only lower, in order) and the entry's number in lowercase hex.
//!
//! - `lookup` and `getattr` answer from memory (sizes are known from the verified TOC).
//! - `open` of an entry whose data is local (its [`DataSource::path`] exists) opens that
//!   file and, where the kernel has FUSE passthrough (6.9+, and the process may register
//!   backing files), hands it to the kernel, which then reads it without coming back
//!   here: reads run at the backing file system's speed. Otherwise `read` serves it.
//! - `open` of an entry that is not local waits, on a worker, for [`DataSource::fetch`]
//!   (its queue holds waiting opens only: background completion, still to come, is the
//!   source's business); concurrent opens of one entry share one fetch. A fetch that
//!   fails answers every waiting open with EIO: a read of data that cannot be fetched
//!   fails and never returns other bytes; how long it waits is the source's to bound (the
//!   registry's retries are bounded; a fetch that never returns keeps its opens waiting).
//! - Dropping the [`DataServer`] unmounts it. The connection lives as long as an overlay
//!   is stacked on it (the kernel holds the super block), and so does the session thread:
//!   a sandbox is never broken by a drop; the owner (the cache, through the layer's
//!   leases) decides when it goes. If the serving process dies, the connection is
//!   aborted and every later open or read of data not yet opened fails with `ENOTCONN`,
//!   never with empty files or zeros.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, Request, SessionACL,
};

use crate::error::{Error, Result};

/// Where a data-only lower gets its bytes: the lazy layer's fetcher and local store.
pub(crate) trait DataSource: Send + Sync + 'static {
    /// Make entry `id`'s bytes local (then [`open`](Self::open) finds them), verified,
    /// or fail. Blocks; runs on one of the server's workers. Called at most once at a
    /// time per entry.
    fn fetch(&self, id: usize) -> Result<()>;
    /// Entry `id`'s bytes, if they are local (whole and verified), opened for reading.
    fn open(&self, id: usize) -> Option<File>;
}

/// What a [`DataServer`] has done, for tests and metrics.
#[derive(Debug, Default)]
pub(crate) struct DataStats {
    /// Opens that waited for a fetch.
    pub(crate) waited_opens: AtomicU64,
    /// Fetches started.
    pub(crate) fetches: AtomicU64,
    /// Fetches that failed (their opens got EIO).
    pub(crate) failed_fetches: AtomicU64,
    /// Opens handed to the kernel with FUSE passthrough.
    pub(crate) passthrough_opens: AtomicU64,
    /// `read` requests served here (no passthrough).
    pub(crate) reads: AtomicU64,
}

/// A mounted data-only lower; unmounted (and its connection closed) on drop.
pub(crate) struct DataServer {
    state: Arc<State>,
    session: Option<fuser::BackgroundSession>,
    #[cfg_attr(not(test), allow(dead_code))]
    mountpoint: PathBuf,
    stats: Arc<DataStats>,
    passthrough: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// Inode of the root directory; entry `id` is inode `id + FIRST_ENTRY`.
const ROOT: u64 = 1;
const FIRST_ENTRY: u64 = 2;
/// Everything here is immutable for the server's life: the kernel may cache it for long.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Fetch workers: opens of different entries wait in parallel.
const WORKERS: usize = 4;

impl DataServer {
    /// Mount a data-only lower at `mountpoint` (an empty directory) serving one file per
    /// entry of `sizes` from `source`. `mountpoint` must stay where it is while mounted.
    ///
    /// Entry `id` is named `{prefix}{id:x}`.
    pub(crate) fn mount(
        mountpoint: &Path,
        prefix: &str,
        sizes: Vec<u64>,
        source: Arc<dyn DataSource>,
    ) -> Result<DataServer> {
        let stats = Arc::new(DataStats::default());
        let passthrough = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State {
            prefix: prefix.to_string(),
            sizes,
            source,
            waiting: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            backing: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stats: Arc::clone(&stats),
            passthrough: Arc::clone(&passthrough),
            queue: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel::<usize>();
        let rx = Arc::new(Mutex::new(rx));
        *lock(&state.queue) = Some(tx);
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let (rx, shared) = (Arc::clone(&rx), Arc::clone(&state));
            let spawned =
                std::thread::Builder::new().name(format!("lazy-fetch-{i}")).spawn(move || worker(&rx, &shared));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    stop_workers(&state, workers);
                    return Err(Error::io("spawn fetch worker", mountpoint, e));
                }
            }
        }
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("rootfs-cache-lazy".into()),
            MountOption::Subtype("rootfs-cache".into()),
            MountOption::RO,
            MountOption::NoDev,
            MountOption::NoSuid,
            // Not `noexec`: the overlay opens a program's data in this lower to exec it,
            // and a `noexec` lower makes that EPERM.
        ];
        // The overlay opens lower files with its mounter's credentials, and tests and
        // callers may inspect the lower as another user: anyone may read (the files are
        // 0444 and carry nothing the merged view does not show).
        config.acl = if nix::unistd::geteuid().is_root() { SessionACL::All } else { SessionACL::Owner };
        config.n_threads = Some(2);
        let fs = DataFs { state: Arc::clone(&state) };
        let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| Error::io("mount fuse", mountpoint, e));
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                stop_workers(&state, workers);
                return Err(e);
            }
        };
        Ok(DataServer {
            state,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            stats,
            passthrough,
            workers,
        })
    }

    /// The mount point: the data-only lower to give the overlay (after `::`).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What the server has done so far.
    pub(crate) fn stats(&self) -> &DataStats {
        &self.stats
    }

    /// Whether the kernel accepted FUSE passthrough for this connection.
    pub(crate) fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }
}

impl Drop for DataServer {
    fn drop(&mut self) {
        // Unmount, end the session and the workers. With no overlay on top the session
        // ends at once; an overlay still stacked on it (a caller's leak) keeps the
        // connection, and so the session thread, alive: then this returns after a
        // bounded wait and the threads end with the last user of the mount.
        let session = self.session.take();
        let state = Arc::clone(&self.state);
        let workers = std::mem::take(&mut self.workers);
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let reaper = std::thread::Builder::new().name("lazy-fuse-reaper".into()).spawn(move || {
            if let Some(session) = session {
                session.umount_and_join().ok();
            }
            stop_workers(&state, workers);
            let _ = done_tx.send(());
        });
        if reaper.is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(2));
        }
    }
}

struct State {
    prefix: String,
    sizes: Vec<u64>,
    source: Arc<dyn DataSource>,
    /// Opens waiting for an entry's fetch, by entry.
    waiting: Mutex<HashMap<usize, Vec<(ReplyOpen, bool)>>>,
    /// Open files served by `read`, by handle.
    handles: Mutex<HashMap<u64, Arc<File>>>,
    /// Backing ids registered for passthrough, by entry, with their open count: the
    /// kernel wants one backing id per inode for all its open files.
    backing: Mutex<HashMap<usize, (BackingId, u64)>>,
    next_fh: AtomicU64,
    stats: Arc<DataStats>,
    passthrough: Arc<AtomicBool>,
    queue: Mutex<Option<mpsc::Sender<usize>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handles with this bit set are passthrough opens: `release` drops a backing id ref.
const PASSTHROUGH_FH: u64 = 1 << 63;

impl State {
    fn entry(&self, ino: INodeNo) -> Option<usize> {
        let id = ino.0.checked_sub(FIRST_ENTRY)?;
        let id = usize::try_from(id).ok()?;
        (id < self.sizes.len()).then_some(id)
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o555, 0, 2),
            _ => (FileType::RegularFile, 0o444, self.sizes[(ino - FIRST_ENTRY) as usize], 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Answer an open of a local entry: passthrough where possible, else a handle.
    fn open_local(&self, id: usize, reply: ReplyOpen) {
        let Some(file) = self.source.open(id) else { return reply.error(Errno::EIO) };
        match file.metadata() {
            Ok(m) if m.len() == self.sizes[id] => {}
            _ => return reply.error(Errno::EIO),
        }
        if self.passthrough.load(Ordering::Relaxed) {
            let mut backing = lock(&self.backing);
            if let Some((bid, n)) = backing.get_mut(&id) {
                *n += 1;
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                return reply.opened_passthrough(FileHandle(PASSTHROUGH_FH | id as u64), FopenFlags::empty(), bid);
            }
            if let Ok(bid) = reply.open_backing(&file) {
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                reply.opened_passthrough(FileHandle(PASSTHROUGH_FH | id as u64), FopenFlags::empty(), &bid);
                backing.insert(id, (bid, 1));
                return;
            }
            // Not allowed (no CAP_SYS_ADMIN in the initial namespace): serve reads here.
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) & !PASSTHROUGH_FH;
        lock(&self.handles).insert(fh, Arc::new(file));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }
}

/// Close the fetch queue and wait for the workers (each finishes the fetch it is in).
fn stop_workers(state: &State, workers: Vec<std::thread::JoinHandle<()>>) {
    lock(&state.queue).take();
    for h in workers {
        let _ = h.join();
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<usize>>, state: &State) {
    loop {
        let id = match lock(rx).recv() {
            Ok(id) => id,
            Err(_) => return,
        };
        // An open that raced with the end of the previous fetch of this entry queues it
        // again: it is local by now, nothing to fetch.
        let ok = state.source.open(id).is_some() || {
            state.stats.fetches.fetch_add(1, Ordering::Relaxed);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.source.fetch(id)))
                .map(|r| r.is_ok())
                .unwrap_or(false)
        };
        if !ok {
            state.stats.failed_fetches.fetch_add(1, Ordering::Relaxed);
        }
        let waiters = lock(&state.waiting).remove(&id).unwrap_or_default();
        for (reply, _) in waiters {
            if ok {
                state.open_local(id, reply);
            } else {
                reply.error(Errno::EIO);
            }
        }
    }
}

struct DataFs {
    state: Arc<State>,
}

impl Filesystem for DataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Passthrough needs the kernel's consent and a stacking depth of 1 (an overlay
        // goes on top of this file system). Without it, `read` serves the data.
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok() {
            self.state.passthrough.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let id = name
            .to_str()
            .and_then(|n| n.strip_prefix(self.state.prefix.as_str()))
            .filter(|n| !n.is_empty() && n.len() <= 16)
            .and_then(|n| {
                // Canonical lowercase hex only: one name per entry.
                let id = u64::from_str_radix(n, 16).ok()?;
                (format!("{id:x}") == n).then_some(id)
            });
        match (parent.0, id) {
            (ROOT, Some(id)) if (id as usize) < self.state.sizes.len() && id < u64::MAX - FIRST_ENTRY => {
                reply.entry(&TTL, &self.state.attr(id + FIRST_ENTRY), Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT || self.state.entry(ino).is_some() {
            reply.attr(&TTL, &self.state.attr(ino.0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(id) = self.state.entry(ino) else { return reply.error(Errno::ENOENT) };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if let Some(file) = self.state.source.open(id) {
            drop(file);
            return self.state.open_local(id, reply);
        }
        let first = {
            let mut waiting = lock(&self.state.waiting);
            let list = waiting.entry(id).or_default();
            list.push((reply, true));
            list.len() == 1
        };
        self.state.stats.waited_opens.fetch_add(1, Ordering::Relaxed);
        if first {
            let sent = lock(&self.state.queue).as_ref().map(|q| q.send(id).is_ok()).unwrap_or(false);
            if !sent {
                for (reply, _) in lock(&self.state.waiting).remove(&id).unwrap_or_default() {
                    reply.error(Errno::EIO);
                }
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.state.stats.reads.fetch_add(1, Ordering::Relaxed);
        let Some(file) = lock(&self.state.handles).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        reply.data(&buf[..got]);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 & PASSTHROUGH_FH != 0 {
            let id = (fh.0 & !PASSTHROUGH_FH) as usize;
            let mut backing = lock(&self.state.backing);
            if let Some((_, n)) = backing.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    backing.remove(&id);
                }
            }
        } else {
            lock(&self.state.handles).remove(&fh.0);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        // Offsets: 1 = ".", 2 = "..", 3 + id = entry id.
        let total = self.state.sizes.len() as u64 + 2;
        for off in offset..total {
            let full = match off {
                0 => reply.add(INodeNo(ROOT), 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(ROOT), 2, FileType::Directory, ".."),
                n => {
                    let id = n - 2;
                    reply.add(
                        INodeNo(id + FIRST_ENTRY),
                        n + 1,
                        FileType::RegularFile,
                        format!("{}{id:x}", self.state.prefix),
                    )
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    /// A data source over bytes in memory: `fetch` writes entry `id` to a temporary
    /// name and renames it into place, after `delay`; ids in `fail` fail.
    struct Mem {
        dir: PathBuf,
        data: Vec<Vec<u8>>,
        fail: HashSet<usize>,
        delay: Duration,
        calls: Mutex<Vec<usize>>,
    }

    impl DataSource for Mem {
        fn fetch(&self, id: usize) -> Result<()> {
            lock(&self.calls).push(id);
            std::thread::sleep(self.delay);
            if self.fail.contains(&id) {
                return Err(Error::io("fetch", self.path(id), std::io::Error::other("registry gone")));
            }
            let tmp = self.dir.join(format!(".tmp-{id:x}"));
            std::fs::write(&tmp, &self.data[id]).map_err(|e| Error::io("write", &tmp, e))?;
            std::fs::rename(&tmp, self.path(id)).map_err(|e| Error::io("rename", &tmp, e))
        }
        fn open(&self, id: usize) -> Option<File> {
            File::open(self.path(id)).ok()
        }
    }

    impl Mem {
        fn path(&self, id: usize) -> PathBuf {
            self.dir.join(format!("{id:x}"))
        }
    }

    /// Root and /dev/fuse, or skip (fail under `CI`).
    fn can_mount() -> bool {
        let ok = nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists();
        if !ok && std::env::var_os("CI").is_some() {
            panic!("lazy FUSE tests need root and /dev/fuse under CI");
        }
        ok
    }

    fn private_ns() {
        use nix::mount::MsFlags;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .unwrap();
    }

    /// A skeleton with placeholders `f<i>` for every entry (metacopy + redirect to `/<i>`,
    /// sparse, of the entry's size) and a plain directory and file.
    fn skeleton(dir: &Path, sizes: &[u64]) {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/small"), b"small file, in the skeleton\n").unwrap();
        for (i, size) in sizes.iter().enumerate() {
            let p = dir.join(format!("f{i}"));
            let f = File::create(&p).unwrap();
            f.set_len(*size).unwrap();
            f.set_permissions(std::fs::Permissions::from_mode(0o755)).unwrap();
            use std::os::fd::AsFd;
            crate::sys::fsetxattr(f.as_fd(), b"trusted.overlay.metacopy", b"").unwrap();
            crate::sys::fsetxattr(f.as_fd(), b"trusted.overlay.redirect", format!("/{i:x}").as_bytes()).unwrap();
        }
    }

    fn overlay(skel: &Path, data: &Path, top: &Path) -> PathBuf {
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(top.join(d)).unwrap();
        }
        let opts = format!(
            "lowerdir={}::{},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
            skel.display(),
            data.display(),
            top.join("upper").display(),
            top.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &top.join("merged"),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .expect("overlay with a FUSE data-only lower");
        top.join("merged")
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(seed as u32) as u8).collect()
    }

    #[test]
    fn only_open_fetches_and_reads_see_the_right_bytes() {
        if !can_mount() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let handle = {
            let t = t.path().to_path_buf();
            std::thread::spawn(move || {
                private_ns();
                let blobs = vec![data(3 << 20, 1), data(70_000, 2), data(1, 3), data(9000, 4)];
                let sizes: Vec<u64> = blobs.iter().map(|b| b.len() as u64).collect();
                let store = t.join("store");
                std::fs::create_dir_all(&store).unwrap();
                let src = Arc::new(Mem {
                    dir: store,
                    data: blobs.clone(),
                    fail: [3].into(),
                    delay: Duration::from_millis(50),
                    calls: Mutex::new(Vec::new()),
                });
                let mnt = t.join("data");
                std::fs::create_dir_all(&mnt).unwrap();
                let server =
                    DataServer::mount(&mnt, "", sizes.clone(), Arc::clone(&src) as Arc<dyn DataSource>).unwrap();
                skeleton(&t.join("skel"), &sizes);
                let merged = overlay(&t.join("skel"), server.mountpoint(), &t.join("ws"));

                // stat and readdir never reach the data layer.
                for (i, size) in sizes.iter().enumerate() {
                    assert_eq!(std::fs::metadata(merged.join(format!("f{i}"))).unwrap().len(), *size);
                }
                let names: HashSet<String> = std::fs::read_dir(&merged)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                assert!(names.contains("f0") && names.contains("etc"), "{names:?}");
                assert!(lock(&src.calls).is_empty());
                assert_eq!(server.stats().fetches.load(Ordering::Relaxed), 0);

                // Opens fetch, once per entry, however many open at once.
                let readers: Vec<_> = (0..6)
                    .map(|_| {
                        let p = merged.join("f0");
                        std::thread::spawn(move || std::fs::read(p).unwrap())
                    })
                    .collect();
                for r in readers {
                    assert!(r.join().unwrap() == blobs[0]);
                }
                assert_eq!(std::fs::read(merged.join("f1")).unwrap(), blobs[1]);
                assert_eq!(std::fs::read(merged.join("f2")).unwrap(), blobs[2]);
                assert_eq!(std::fs::read(merged.join("f0")).unwrap(), blobs[0]);
                assert_eq!(*lock(&src.calls), [0, 1, 2]);

                // Data that cannot be fetched: EIO, promptly, and nothing is cached.
                let err = std::fs::read(merged.join("f3")).unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
                assert!(!src.path(3).exists());
                // Asking again asks the source again.
                let err = std::fs::read(merged.join("f3")).unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
                assert_eq!(*lock(&src.calls), [0, 1, 2, 3, 3]);

                // A copy-up (chmod, append) copies the data; the upper gets no metacopy.
                std::fs::set_permissions(merged.join("f1"), std::fs::Permissions::from_mode(0o600)).unwrap();
                let upper = t.join("ws/upper/f1");
                assert_eq!(std::fs::read(&upper).unwrap(), blobs[1]);
                let up = File::open(&upper).unwrap();
                use std::os::fd::AsFd;
                assert!(crate::sys::fgetxattr(up.as_fd(), b"trusted.overlay.metacopy").unwrap().is_none());
                assert_eq!(std::fs::read(merged.join("etc/small")).unwrap(), b"small file, in the skeleton\n");

                nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
                let passthrough = server.passthrough();
                let reads = server.stats().reads.load(Ordering::Relaxed);
                drop(server);
                (passthrough, reads)
            })
        };
        let (passthrough, reads) = handle.join().unwrap();
        // With passthrough the kernel reads the backing files itself.
        if passthrough {
            assert_eq!(reads, 0);
        }
    }

    /// The child half of `a_dead_server_gives_enotconn`: serve until killed.
    #[test]
    #[ignore = "run by a_dead_server_gives_enotconn in a child process"]
    fn serve_until_killed() {
        let Some(dir) = std::env::var_os("ROOTFS_CACHE_FUSE_CHILD") else { return };
        let dir = PathBuf::from(dir);
        let src = Arc::new(Mem {
            dir: dir.join("store"),
            data: vec![data(5000, 1), data(5000, 2)],
            fail: HashSet::new(),
            delay: Duration::ZERO,
            calls: Mutex::new(Vec::new()),
        });
        let _server = DataServer::mount(&dir.join("data"), "", vec![5000, 5000], src).unwrap();
        println!("ready");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }

    #[test]
    fn a_dead_server_gives_enotconn() {
        if !can_mount() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        std::thread::spawn(move || {
            private_ns();
            std::fs::create_dir_all(dir.join("store")).unwrap();
            std::fs::create_dir_all(dir.join("data")).unwrap();
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "lazy::fuse::tests::serve_until_killed",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("ROOTFS_CACHE_FUSE_CHILD", &dir)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            while !line.contains("ready") {
                line.clear();
                assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "child ended early");
            }
            skeleton(&dir.join("skel"), &[5000, 5000]);
            let merged = overlay(&dir.join("skel"), &dir.join("data"), &dir.join("ws"));
            assert_eq!(std::fs::read(merged.join("f0")).unwrap(), data(5000, 1));
            child.kill().unwrap();
            child.wait().unwrap();
            // Not opened before the death: ENOTCONN, never an empty file.
            let err = std::fs::read(merged.join("f1")).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
            // The tree is still there (the skeleton), and the sandbox can be torn down.
            assert_eq!(std::fs::metadata(merged.join("f1")).unwrap().len(), 5000);
            nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
            nix::mount::umount2(&dir.join("data"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        })
        .join()
        .unwrap();
    }
}

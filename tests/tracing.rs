//! The `tracing` feature: spans and completion events reach a subscriber (run with
//! `cargo test --features tracing --test tracing`; without the feature this file is
//! empty, and the crate makes no tracing calls at all).
#![cfg(feature = "tracing")]

mod support;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rootfs_cache::{DiffOptions, UnpackOptions, Workspace, WorkspaceOptions, unpack};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// What the subscriber saw, one line per span or event.
static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

struct Recorder(AtomicU64);

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut f = Fields(String::new());
        span.record(&mut f);
        SEEN.lock().unwrap().push(format!("span {} {}{}", span.metadata().target(), span.metadata().name(), f.0));
        Id::from_u64(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut f = Fields(String::new());
        event.record(&mut f);
        SEEN.lock().unwrap().push(format!("event {}{}", event.metadata().target(), f.0));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn spans_and_events_carry_paths_digests_and_sizes() {
    let dir = support::tempdir();
    let layer = support::tar_of(
        &[support::Ent::dir("etc"), support::Ent::file("etc/hostname", "sandbox\n")],
        support::Fmt::Gnu,
    );
    let lower = dir.path().join("lower");
    std::fs::create_dir(&lower).unwrap();
    tracing::subscriber::with_default(Recorder(AtomicU64::new(0)), || {
        unpack(&layer[..], &lower, &UnpackOptions::default()).unwrap();
        let a = Workspace::create(dir.path().join("a"), lower.as_path(), WorkspaceOptions::default()).unwrap();
        // A write straight into the upper (no mount needed): the diff has one file.
        std::fs::write(a.upper().join("new"), b"x").unwrap();
        let mut blob = Vec::new();
        a.export_diff(&mut blob, &DiffOptions::default()).unwrap();
        let mut b = Workspace::create(dir.path().join("b"), lower.as_path(), WorkspaceOptions::default()).unwrap();
        b.import_diff(&blob[..]).unwrap();
        a.destroy().unwrap();
        b.destroy().unwrap();
    });
    let seen = SEEN.lock().unwrap().clone();
    let has = |prefix: &str, needle: &str| seen.iter().any(|l| l.starts_with(prefix) && l.contains(needle));
    assert!(has("span rootfs_cache unpack", &lower.display().to_string()), "{seen:#?}");
    assert!(has("event rootfs_cache", "entries=2"), "{seen:#?}");
    assert!(has("span rootfs_cache export_diff", "aligned=false"), "{seen:#?}");
    assert!(has("event rootfs_cache", "message=exported"), "{seen:#?}");
    assert!(has("span rootfs_cache import_diff", "dir="), "{seen:#?}");
    assert!(has("event rootfs_cache", "digest=sha256:"), "{seen:#?}");
}

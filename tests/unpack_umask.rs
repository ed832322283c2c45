//! The extractor skips `fchmod` when creation already gave an entry its mode, which
//! depends on the umask. A runtime may change its umask between extractions: the modes
//! must stay exact. Own binary: the umask is process-wide.

use std::os::unix::fs::PermissionsExt;

use nix::sys::stat::{Mode, umask};
use rootfs_cache::{UnpackOptions, unpack};

fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    b.append_data(&mut h, "d/", std::io::empty()).unwrap();
    for (name, mode) in [("d/rw", 0o644), ("d/x", 0o755), ("d/g", 0o664), ("d/o", 0o600)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(mode);
        b.append_data(&mut h, name, &b"x"[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn modes_are_exact_whatever_the_umask_and_when_it_changes() {
    let blob = layer();
    for mask in [0o022, 0o077, 0o002, 0o000, 0o777] {
        umask(Mode::from_bits_truncate(mask));
        for pipelined in [true, false] {
            let dest = tempfile::tempdir().unwrap();
            let mut o = UnpackOptions::default();
            o.pipelined = pipelined;
            unpack(&blob[..], dest.path(), &o).unwrap();
            for (name, mode) in [("d", 0o755), ("d/rw", 0o644), ("d/x", 0o755), ("d/g", 0o664), ("d/o", 0o600)] {
                let got = std::fs::symlink_metadata(dest.path().join(name)).unwrap().permissions().mode() & 0o7777;
                assert_eq!(got, mode, "{name} with umask {mask:03o} pipelined={pipelined}: {got:o}");
            }
        }
    }
    umask(Mode::from_bits_truncate(0o022));
}

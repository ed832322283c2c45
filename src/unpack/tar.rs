//! A streaming tar reader: ustar, GNU (long names, base-256 numbers, old sparse) and
//! PAX (path, linkpath, size, uid, gid, mtime, `SCHILY.xattr.*`, sparse 1.0).
//!
//! Written for hostile input: every metadata block that is buffered (PAX records, GNU
//! long names, sparse maps) is bounded by [`Limits::max_header_bytes`], header checksums
//! are verified, numbers are range-checked, and truncation anywhere is an error
//! ([`Error::InvalidArchive`]) rather than a short file. Entry data is never buffered:
//! the caller pulls it through [`TarReader::read_data`].

use std::io::{self, Read};

use crate::error::{Error, Result};

const BLOCK: usize = 512;

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

/// Extended attributes of an entry: (name, value) pairs, in archive order.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// One archive member's metadata (data is read separately).
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Bytes of data stored in the archive for this entry.
    pub size: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Xattrs,
    /// For sparse files: the (offset, length) segments the data fills, and the file size.
    pub sparse: Option<(Vec<(u64, u64)>, u64)>,
    /// Offset of the entry's first header in the tar stream.
    pub offset: u64,
}

/// Bounds on what the reader buffers or accepts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_header_bytes: u64,
    pub max_entries: Option<u64>,
    /// Bound on a sparse file's apparent size (its holes cost no input).
    pub max_sparse_size: Option<u64>,
    /// A stream that ends without the end-of-archive marker is truncated (an error).
    pub require_end: bool,
}

#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse_major: Option<u64>,
    sparse_minor: Option<u64>,
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
}

/// Pulls [`Header`]s and their data out of an uncompressed tar stream.
pub(crate) struct TarReader<R> {
    r: R,
    offset: u64,
    remaining: u64,
    padding: u64,
    entries: u64,
    limits: Limits,
    done: bool,
}

fn invalid(offset: u64, reason: impl Into<String>) -> Error {
    Error::InvalidArchive { offset, reason: reason.into() }
}

/// The uncompressed-size bound was hit (carried inside an `io::Error` through decoders).
#[derive(Debug)]
pub(crate) struct LimitHit(pub u64);

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uncompressed size limit of {} bytes reached", self.0)
    }
}

impl std::error::Error for LimitHit {}

/// Map a read error of the blob/decoder chain to the crate error.
pub(crate) fn read_err(e: io::Error) -> Error {
    if let Some(LimitHit(limit)) = e.get_ref().and_then(|i| i.downcast_ref::<LimitHit>()) {
        return Error::LimitExceeded { what: "uncompressed layer size", limit: *limit };
    }
    Error::Read { what: "layer blob", source: e }
}

/// What a [`TarReader`] reads: a byte stream that can skip entry data, by reading and
/// discarding it or, where it can, by seeking past it.
pub(crate) trait Source: Read {
    /// Skips up to `n` bytes; returns how many were skipped (fewer only at end of stream).
    fn skip_bytes(&mut self, n: u64) -> io::Result<u64>;
}

impl Source for Box<dyn Read + '_> {
    fn skip_bytes(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut self.take(n), &mut io::sink())
    }
}

impl Source for &[u8] {
    fn skip_bytes(&mut self, n: u64) -> io::Result<u64> {
        let k = n.min(self.len() as u64) as usize;
        *self = &self[k..];
        Ok(k as u64)
    }
}

impl<R: Source> TarReader<R> {
    pub(crate) fn new(r: R, limits: Limits) -> Self {
        TarReader { r, offset: 0, remaining: 0, padding: 0, entries: 0, limits, done: false }
    }

    /// The underlying reader (positioned after whatever was consumed).
    pub(crate) fn into_inner(self) -> R {
        self.r
    }

    /// Read as many bytes as `buf` holds, or fewer only at end of stream.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_err(e)),
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let got = loop {
            match self.r.skip_bytes(n) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r.map_err(read_err)?,
            }
        };
        self.offset += got;
        if got < n {
            return Err(invalid(self.offset, "truncated archive: unexpected end of data"));
        }
        Ok(())
    }

    /// Offset in the stream of the next byte to read: after [`next_entry`](Self::next_entry),
    /// where the entry's data starts.
    pub(crate) fn position(&self) -> u64 {
        self.offset
    }

    /// Read a metadata payload of `size` bytes (plus padding), bounded by the header limit.
    fn read_meta(&mut self, size: u64, what: &'static str) -> Result<Vec<u8>> {
        if size > self.limits.max_header_bytes {
            return Err(Error::LimitExceeded { what, limit: self.limits.max_header_bytes });
        }
        let mut v = vec![0u8; size as usize];
        if self.fill(&mut v)? < v.len() {
            return Err(invalid(self.offset, format!("truncated archive inside {what}")));
        }
        self.skip(pad(size))?;
        Ok(v)
    }

    /// The next entry, or `None` at the end of the archive. Skips unread data of the
    /// previous entry.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Header>> {
        if self.done {
            return Ok(None);
        }
        // `remaining` is below 2^64 - 512 (checked when it was set), so this cannot overflow.
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;

        let mut pax = Pax::default();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut meta_bytes = 0u64;
        let mut start: Option<u64> = None;
        loop {
            let hdr_offset = self.offset;
            let mut block = [0u8; BLOCK];
            let n = self.fill(&mut block)?;
            if n == 0 && start.is_none() {
                if self.limits.require_end {
                    return Err(invalid(hdr_offset, "truncated archive: no end-of-archive marker"));
                }
                // End of stream without the two zero blocks: accepted, as GNU tar and
                // every tar library do; the blob digest still covers the whole stream.
                self.done = true;
                return Ok(None);
            }
            if n < BLOCK {
                return Err(invalid(hdr_offset, "truncated archive: partial header block"));
            }
            if block.iter().all(|&b| b == 0) {
                if start.is_some() {
                    return Err(invalid(hdr_offset, "end-of-archive marker after an extended header"));
                }
                self.done = true;
                return Ok(None);
            }
            let start = *start.get_or_insert(hdr_offset);
            verify_checksum(&block, hdr_offset)?;
            let typeflag = block[156];
            let size = parse_num(&block[124..136]).ok_or_else(|| invalid(hdr_offset, "bad size field"))?;
            match typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    meta_bytes = meta_bytes.saturating_add(size);
                    if meta_bytes > self.limits.max_header_bytes {
                        return Err(Error::LimitExceeded {
                            what: "extended header data of one entry",
                            limit: self.limits.max_header_bytes,
                        });
                    }
                    match typeflag {
                        b'x' => {
                            let data = self.read_meta(size, "PAX extended header")?;
                            parse_pax(&data, &mut pax).map_err(|r| invalid(hdr_offset, r))?;
                        }
                        // Global PAX headers set defaults for following entries in theory; OCI
                        // layer producers do not use them and containerd ignores them, as do we.
                        b'g' => {
                            self.read_meta(size, "PAX global header")?;
                        }
                        b'L' => long_name = Some(trim_nul(self.read_meta(size, "GNU long name")?)),
                        _ => long_link = Some(trim_nul(self.read_meta(size, "GNU long link name")?)),
                    }
                    continue;
                }
                b'V' => {
                    // Volume label: no content.
                    self.skip(padded(size).ok_or_else(|| invalid(hdr_offset, "size field overflows"))?)?;
                    continue;
                }
                _ => {}
            }
            self.entries += 1;
            if let Some(max) = self.limits.max_entries {
                if self.entries > max {
                    return Err(Error::LimitExceeded { what: "number of archive entries", limit: max });
                }
            }
            return self.finish_header(&block, start, pax, long_name, long_link, size).map(Some);
        }
    }

    fn finish_header(
        &mut self,
        block: &[u8; BLOCK],
        offset: u64,
        pax: Pax,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        header_size: u64,
    ) -> Result<Header> {
        let field = |r: std::ops::Range<usize>, what: &str| -> Result<u64> {
            parse_num(&block[r]).ok_or_else(|| invalid(offset, format!("bad {what} field")))
        };
        let ustar = &block[257..263] == b"ustar\0";
        let gnu = &block[257..265] == b"ustar  \0";
        let typeflag = block[156];

        let mut path = match (pax.sparse_name.clone(), pax.path, long_name) {
            (Some(p), _, _) | (None, Some(p), _) | (None, None, Some(p)) => p,
            (None, None, None) => {
                let name = cstr_field(&block[0..100]);
                let prefix = if ustar { cstr_field(&block[345..500]) } else { &[][..] };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    let mut p = prefix.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    p
                }
            }
        };
        let link = pax.link.or(long_link).unwrap_or_else(|| cstr_field(&block[157..257]).to_vec());
        let mode = (field(100..108, "mode")? & 0o7777) as u32;
        let uid = match pax.uid {
            Some(v) => v,
            None => field(108..116, "uid")?,
        };
        let gid = match pax.gid {
            Some(v) => v,
            None => field(116..124, "gid")?,
        };
        let (mtime, mtime_nsec) = match pax.mtime {
            Some(t) => t,
            None => (parse_signed(&block[136..148]).ok_or_else(|| invalid(offset, "bad mtime field"))?, 0),
        };
        let mut size = pax.size.unwrap_or(header_size);
        let (dev_major, dev_minor) = if ustar || gnu {
            let maj = field(329..337, "devmajor")?;
            let min = field(337..345, "devminor")?;
            (
                u32::try_from(maj).map_err(|_| invalid(offset, "devmajor out of range"))?,
                u32::try_from(min).map_err(|_| invalid(offset, "devminor out of range"))?,
            )
        } else {
            (0, 0)
        };
        let kind = match typeflag {
            b'0' | b'7' => Kind::File,
            // Pre-POSIX tars mark directories only by a trailing slash.
            0 if path.ends_with(b"/") => Kind::Dir,
            0 => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            b'S' => Kind::File,
            other => {
                return Err(Error::Unsupported {
                    what: format!(
                        "tar entry type {:?} for {:?} at byte {offset}",
                        other as char,
                        String::from_utf8_lossy(&path)
                    ),
                });
            }
        };

        // Sparse files. Old GNU format: the map is in the header (+ extension blocks).
        let mut sparse = None;
        if typeflag == b'S' {
            let mut map = Vec::new();
            read_sparse_entries(&block[386..482], &mut map, offset)?;
            let real = field(483..495, "GNU sparse realsize")?;
            let mut extended = block[482] != 0;
            let mut ext_bytes = 0u64;
            while extended {
                ext_bytes += BLOCK as u64;
                if ext_bytes > self.limits.max_header_bytes {
                    return Err(Error::LimitExceeded { what: "GNU sparse map", limit: self.limits.max_header_bytes });
                }
                let mut ext = [0u8; BLOCK];
                if self.fill(&mut ext)? < BLOCK {
                    return Err(invalid(self.offset, "truncated archive inside GNU sparse map"));
                }
                read_sparse_entries(&ext[..504], &mut map, offset)?;
                extended = ext[504] != 0;
            }
            sparse = Some((map, real));
        } else if let Some(major) = pax.sparse_major {
            // PAX sparse 1.0 (GNU tar --posix --sparse): the map leads the data.
            if (major, pax.sparse_minor) != (1, Some(0)) {
                return Err(Error::Unsupported { what: format!("PAX sparse format {major}.{:?}", pax.sparse_minor) });
            }
            let real = pax
                .sparse_realsize
                .ok_or_else(|| invalid(offset, "PAX sparse 1.0 entry without GNU.sparse.realsize"))?;
            let (map, used) = self.read_sparse_1_0(size, offset)?;
            size -= used;
            sparse = Some((map, real));
        }
        if let Some((map, real)) = &sparse {
            if let Some(max) = self.limits.max_sparse_size {
                if *real > max {
                    return Err(Error::LimitExceeded { what: "apparent size of a sparse file", limit: max });
                }
            }
            let mut total = 0u64;
            for &(off, len) in map {
                let end = off.checked_add(len).ok_or_else(|| invalid(offset, "sparse map overflows"))?;
                if end > *real {
                    return Err(invalid(offset, "sparse segment beyond the file size"));
                }
                total = total.checked_add(len).ok_or_else(|| invalid(offset, "sparse map overflows"))?;
            }
            if total != size {
                return Err(invalid(offset, "sparse map does not match the data size"));
            }
        }

        if kind == Kind::Dir {
            while path.len() > 1 && path.ends_with(b"/") {
                path.pop();
            }
        }
        // Only regular files carry data we use; a hardlink or other entry with a size
        // field (allowed by PAX) has it skipped.
        // (For PAX sparse 1.0 the map occupied whole blocks, so padding is unchanged.)
        if padded(size).is_none() {
            return Err(invalid(offset, "size field overflows"));
        }
        self.remaining = size;
        self.padding = pad(size);
        let size = if kind == Kind::File { size } else { 0 };
        Ok(Header {
            path,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            size,
            dev_major,
            dev_minor,
            xattrs: pax.xattrs,
            sparse,
            offset,
        })
    }

    /// Parse the PAX sparse 1.0 map at the start of the data: decimal lines
    /// `count`, then `offset`/`length` pairs, padded to a block boundary.
    /// Returns the map and the bytes of data it occupied.
    fn read_sparse_1_0(&mut self, size: u64, offset: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut used = 0u64;
        let mut block = [0u8; BLOCK];
        let mut pos = BLOCK; // force a read
        let mut numbers: Vec<u64> = Vec::new();
        let mut want: Option<u64> = None;
        let mut cur: Vec<u8> = Vec::new();
        loop {
            if let Some(w) = want {
                if numbers.len() as u64 == 2 * w {
                    break;
                }
            }
            if pos == BLOCK {
                if used + BLOCK as u64 > size || used >= self.limits.max_header_bytes {
                    return Err(invalid(offset, "PAX sparse map larger than the entry"));
                }
                if self.fill(&mut block)? < BLOCK {
                    return Err(invalid(self.offset, "truncated archive inside PAX sparse map"));
                }
                used += BLOCK as u64;
                pos = 0;
            }
            let b = block[pos];
            pos += 1;
            if b == b'\n' {
                let s = std::str::from_utf8(&cur).ok().and_then(|s| s.parse::<u64>().ok());
                let n = s.ok_or_else(|| invalid(offset, "bad number in PAX sparse map"))?;
                cur.clear();
                if want.is_none() {
                    if n > self.limits.max_header_bytes / 16 {
                        return Err(Error::LimitExceeded {
                            what: "PAX sparse map entries",
                            limit: self.limits.max_header_bytes / 16,
                        });
                    }
                    want = Some(n);
                } else {
                    numbers.push(n);
                }
            } else if cur.len() > 20 {
                return Err(invalid(offset, "bad number in PAX sparse map"));
            } else {
                cur.push(b);
            }
        }
        Ok((numbers.chunks_exact(2).map(|c| (c[0], c[1])).collect(), used))
    }

    /// The stream, for reading the current entry's data in place; report what was read
    /// with [`consumed_data`](Self::consumed_data).
    pub(crate) fn source_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Bytes of the current entry's data not read yet.
    pub(crate) fn data_left(&self) -> u64 {
        self.remaining
    }

    /// `n` bytes (at most [`data_left`](Self::data_left)) of the current entry's data were
    /// read from [`source_mut`](Self::source_mut); 0 means the stream ended.
    ///
    /// # Errors
    /// [`Error::InvalidArchive`] if `n` is 0 while data is left (truncated archive).
    pub(crate) fn consumed_data(&mut self, n: usize) -> Result<()> {
        if n == 0 && self.remaining > 0 {
            return Err(invalid(self.offset, "truncated archive: entry data ends early"));
        }
        debug_assert!(n as u64 <= self.remaining);
        self.offset += n as u64;
        self.remaining -= n as u64;
        Ok(())
    }

    /// Read data of the current entry. Returns 0 once all of it has been read.
    ///
    /// # Errors
    /// [`Error::InvalidArchive`] if the stream ends before the entry's data does.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = self.remaining.min(buf.len() as u64) as usize;
        let n = loop {
            match self.r.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_err(e)),
            }
        };
        if n == 0 {
            return Err(invalid(self.offset, "truncated archive: entry data ends early"));
        }
        self.offset += n as u64;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// `n` rounded up to whole blocks, `None` on overflow (hostile size fields).
fn padded(n: u64) -> Option<u64> {
    n.checked_add(pad(n))
}

fn pad(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn cstr_field(f: &[u8]) -> &[u8] {
    match f.iter().position(|&b| b == 0) {
        Some(i) => &f[..i],
        None => f,
    }
}

fn verify_checksum(block: &[u8; BLOCK], offset: u64) -> Result<()> {
    let stored = parse_num(&block[148..156]).ok_or_else(|| invalid(offset, "bad header checksum field"))?;
    // The checksum field counts as eight spaces. Plain sums over the whole block (which
    // the compiler vectorizes), corrected for the field; the signed sum (old writers) only
    // when the unsigned one does not match.
    let field = &block[148..156];
    let spaces = 8 * u64::from(b' ');
    let unsigned =
        block.iter().map(|&b| u64::from(b)).sum::<u64>() - field.iter().map(|&b| u64::from(b)).sum::<u64>() + spaces;
    let signed = || {
        block.iter().map(|&b| i64::from(b as i8)).sum::<i64>() - field.iter().map(|&b| i64::from(b as i8)).sum::<i64>()
            + spaces as i64
    };
    if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed()) {
        Ok(())
    } else {
        Err(invalid(
            offset,
            format!("header checksum mismatch (stored {stored}, computed {unsigned}): not a tar archive, or corrupt"),
        ))
    }
}

/// Parse an octal field (NUL/space padded) or a GNU base-256 field. `None` if malformed
/// or negative.
pub(crate) fn parse_num(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|&b| b & 0x80 != 0) {
        if f[0] == 0xff {
            return None; // negative
        }
        let mut v: u64 = u64::from(f[0] & 0x7f);
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let mut v: u64 = 0;
    let mut seen = false;
    let mut ended = false;
    for &b in f {
        match b {
            b'0'..=b'7' if !ended => {
                v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
                seen = true;
            }
            b' ' | 0 if !seen => {}
            b' ' | 0 => ended = true,
            _ => return None,
        }
    }
    Some(v)
}

/// Like [`parse_num`] but allows negative base-256 (pre-1970 mtimes).
fn parse_signed(f: &[u8]) -> Option<i64> {
    if f.first() == Some(&0xff) {
        // Two's complement over the whole field: start from all ones, shift bytes in.
        let mut acc: i128 = -1;
        for &b in &f[1..] {
            acc = acc.checked_mul(256)? | i128::from(b);
        }
        return i64::try_from(acc).ok();
    }
    parse_num(f).and_then(|v| i64::try_from(v).ok())
}

fn read_sparse_entries(area: &[u8], map: &mut Vec<(u64, u64)>, offset: u64) -> Result<()> {
    for e in area.chunks_exact(24) {
        if e.iter().all(|&b| b == 0) {
            continue;
        }
        let off = parse_num(&e[..12]).ok_or_else(|| invalid(offset, "bad GNU sparse offset"))?;
        let len = parse_num(&e[12..]).ok_or_else(|| invalid(offset, "bad GNU sparse length"))?;
        map.push((off, len));
    }
    Ok(())
}

fn parse_dec(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// PAX time: `[-]seconds[.fraction]`.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (secs, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    let secs = i64::try_from(parse_dec(secs)?).ok()?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    if neg {
        // -1.5 means 1.5 s before the epoch: (-2 s, 0.5e9 ns).
        if nsec == 0 { Some((-secs, 0)) } else { Some((-secs - 1, 1_000_000_000 - nsec)) }
    } else {
        Some((secs, nsec))
    }
}

fn parse_pax(mut data: &[u8], pax: &mut Pax) -> std::result::Result<(), String> {
    while !data.is_empty() {
        // Some writers pad the record area with NULs.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data.iter().position(|&b| b == b' ').ok_or("PAX record without length")?;
        let len = parse_dec(&data[..sp]).ok_or("bad PAX record length")? as usize;
        if len <= sp + 1 || len > data.len() {
            return Err("PAX record length out of range".into());
        }
        let rec = &data[sp + 1..len];
        data = &data[len..];
        let rec = rec.strip_suffix(b"\n").ok_or("PAX record not terminated by a newline")?;
        let eq = rec.iter().position(|&b| b == b'=').ok_or("PAX record without '='")?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        let num = |what: &str| parse_dec(value).ok_or_else(|| format!("bad PAX {what}"));
        match key {
            b"path" => pax.path = (!value.is_empty()).then(|| value.to_vec()),
            b"linkpath" => pax.link = (!value.is_empty()).then(|| value.to_vec()),
            b"size" => pax.size = Some(num("size")?),
            b"uid" => pax.uid = Some(num("uid")?),
            b"gid" => pax.gid = Some(num("gid")?),
            b"mtime" => pax.mtime = Some(parse_pax_time(value).ok_or("bad PAX mtime")?),
            b"GNU.sparse.major" => pax.sparse_major = Some(num("GNU.sparse.major")?),
            b"GNU.sparse.minor" => pax.sparse_minor = Some(num("GNU.sparse.minor")?),
            b"GNU.sparse.name" => pax.sparse_name = Some(value.to_vec()),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => pax.sparse_realsize = Some(num("GNU.sparse.realsize")?),
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" | b"GNU.sparse.map" => {
                return Err("PAX sparse format 0.x is not supported (use GNU tar's default 1.0)".into());
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if name.is_empty() {
                        return Err("empty xattr name".into());
                    }
                    pax.xattrs.push((name.to_vec(), value.to_vec()));
                }
                // Everything else (atime, ctime, uname, gname, comment, charset,
                // LIBARCHIVE.xattr.* which libarchive duplicates as SCHILY.xattr.*) is
                // ignored, as POSIX allows for unknown keywords.
            }
        }
    }
    // A repeated xattr: the last record wins (linear, not a search per record: one PAX
    // header can hold tens of thousands of keys).
    if pax.xattrs.len() > 1 {
        let mut seen = std::collections::HashSet::new();
        let mut v: Vec<(Vec<u8>, Vec<u8>)> =
            std::mem::take(&mut pax.xattrs).into_iter().rev().filter(|(k, _)| seen.insert(k.clone())).collect();
        v.reverse();
        pax.xattrs = v;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_num(b"0000644\0"), Some(0o644));
        assert_eq!(parse_num(b"  644 \0"), Some(0o644));
        assert_eq!(parse_num(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_num(b"0000000000000000"), Some(0));
        assert_eq!(parse_num(b"64 4"), None);
        assert_eq!(parse_num(b"0008"), None);
        assert_eq!(parse_num(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_num(&[0xff, 0xff]), None);
        assert_eq!(parse_num(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_signed(&[0xff; 12]), Some(-1));
        assert_eq!(parse_signed(b"00000000017\0"), Some(15));
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b"1.x"), None);
    }

    #[test]
    fn pax_records() {
        let mut p = Pax::default();
        parse_pax(b"14 path=a/b/c\n25 SCHILY.xattr.user.k=v\n12 uid=1000\n", &mut p).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"a/b/c"[..]));
        assert_eq!(p.uid, Some(1000));
        assert_eq!(p.xattrs, vec![(b"user.k".to_vec(), b"v".to_vec())]);
        // A repeated xattr: the last record wins, order of first appearance kept.
        let mut p = Pax::default();
        parse_pax(b"20 SCHILY.xattr.a=1\n20 SCHILY.xattr.b=2\n20 SCHILY.xattr.a=3\n", &mut p).unwrap();
        assert_eq!(p.xattrs, vec![(b"b".to_vec(), b"2".to_vec()), (b"a".to_vec(), b"3".to_vec())]);
        for bad in [&b"99 path=x\n"[..], b"5 a=b\n", b"x path=a\n", b"9 path=a\0", b"10 patha\n"] {
            assert!(parse_pax(bad, &mut Pax::default()).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}

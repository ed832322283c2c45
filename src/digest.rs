//! Content digests: [`Digest`], and readers/writers that hash what passes through them.
//!
//! Only `sha256:` followed by exactly 64 lowercase hex digits is accepted. The digest's
//! hex form names directories in the cache (`layers/<hex>`), so it must have exactly
//! one spelling: accepting upper case, other algorithms or padding would let two
//! strings for the same content become two cache entries, and anything that is not
//! plain hex must never reach a path. OCI allows `sha512`, but registries and the
//! image tools this crate interoperates with (containerd, umoci, skopeo) produce
//! `sha256` for layers and manifests; support for another algorithm would be a new,
//! explicit variant, not a looser parser.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

const PREFIX: &str = "sha256:";

/// A `sha256` content digest, e.g. `sha256:e3b0c442...b855`.
///
/// Ordered and hashed by its bytes. `Display` gives the canonical `sha256:<hex>` form;
/// [`Digest::hex`] gives the 64 hex digits alone (the cache's directory name).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of a byte slice.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// Wrap a raw 32-byte sha256 value.
    pub fn from_sha256_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    /// Parse 64 lowercase hex digits (no prefix), as found in a cache directory name.
    ///
    /// # Errors
    /// [`Error::InvalidDigest`] unless the input is exactly 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Result<Digest> {
        let invalid = |reason| Error::InvalidDigest { input: hex.chars().take(100).collect(), reason };
        let b = hex.as_bytes();
        if b.len() != 64 {
            return Err(invalid("expected 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = nibble(pair[0]).ok_or_else(|| invalid("expected lowercase hex digits [0-9a-f]"))?;
            let lo = nibble(pair[1]).ok_or_else(|| invalid("expected lowercase hex digits [0-9a-f]"))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Digest(out))
    }

    /// Check `found` (the digest of the bytes actually read) against `self` (the
    /// expected one).
    ///
    /// # Errors
    /// [`Error::DigestMismatch`] when they differ.
    pub fn verify(&self, found: &Digest) -> Result<()> {
        if self == found { Ok(()) } else { Err(Error::DigestMismatch { expected: *self, found: *found }) }
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl FromStr for Digest {
    type Err = Error;

    /// Parse `sha256:<64 lowercase hex>`.
    ///
    /// # Errors
    /// [`Error::InvalidDigest`] for any other algorithm, length, case or character.
    fn from_str(s: &str) -> Result<Digest> {
        match s.strip_prefix(PREFIX) {
            Some(hex) => Digest::from_hex(hex).map_err(|e| match e {
                Error::InvalidDigest { reason, .. } => {
                    Error::InvalidDigest { input: s.chars().take(100).collect(), reason }
                }
                other => other,
            }),
            None => Err(Error::InvalidDigest {
                input: s.chars().take(100).collect(),
                reason: "only sha256 digests are supported (expected \"sha256:\" prefix)",
            }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// An incremental sha256 computation.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

/// A reader that hashes every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    /// Wrap `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Hasher::new() }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.hasher.len()
    }

    /// Read the rest of the stream (so the digest covers all of it) and return the digest
    /// and the total length.
    ///
    /// # Errors
    /// The inner reader's error, as [`Error::Read`].
    pub fn finish(mut self) -> Result<(Digest, u64)> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Read { what: "stream", source });
                }
            }
        }
        let len = self.hasher.len();
        Ok((self.hasher.finish(), len))
    }

    /// The inner reader, and the hasher state.
    pub fn into_parts(self) -> (R, Hasher) {
        (self.inner, self.hasher)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that hashes every byte written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Hasher::new() }
    }

    /// The digest and length of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        let len = self.hasher.len();
        (self.hasher.finish(), len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_canonical_form() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of(b""));
        assert_eq!(Digest::from_hex(&d.hex()).unwrap(), d);
    }

    #[test]
    fn rejects_everything_else() {
        let hex = &EMPTY[7..];
        for bad in [
            String::new(),
            hex.to_string(),                          // no prefix
            format!("sha512:{hex}"),                  // other algorithm
            format!("SHA256:{hex}"),                  // prefix case
            format!("sha256:{}", hex.to_uppercase()), // upper-case hex
            format!("sha256:{}", &hex[1..]),          // 63 digits
            format!("sha256:{hex}0"),                 // 65 digits
            format!("sha256:{}g", &hex[1..]),         // non-hex
            format!("sha256:../{}", &hex[3..]),       // path characters
            format!("sha256: {}", &hex[1..]),         // whitespace
            format!("sha256:{hex}\n"),                // trailing newline
        ] {
            let err = bad.parse::<Digest>().unwrap_err();
            assert!(matches!(err, Error::InvalidDigest { .. }), "{bad:?} -> {err}");
        }
    }

    #[test]
    fn hashing_reader_and_writer_agree() {
        let data = vec![7u8; 100_000];
        let mut r = HashingReader::new(&data[..]);
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!((d, n), (Digest::of(&data), 100_000));

        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let (d2, n2, out) = w.finish();
        assert_eq!((d2, n2), (d, 100_000));
        assert_eq!(out, data);
    }

    #[test]
    fn verify_reports_both_digests() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert!(a.verify(&a).is_ok());
        match a.verify(&b).unwrap_err() {
            Error::DigestMismatch { expected, found } => assert_eq!((expected, found), (a, b)),
            e => panic!("{e}"),
        }
    }
}

//! Test helpers: an in-process HTTP server with canned answers, and an observer that
//! records events.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use crate::fetch::FetchObserver;

/// A loopback HTTP server answering each connection with `answer(n, request head)`
/// (the whole response, then close), `n` counting connections from 0. Returns its
/// address and the request heads it saw.
pub(crate) fn server(answer: impl Fn(usize, &str) -> Vec<u8> + Send + 'static) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|k| k == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let reply = answer(n, &head);
            log.lock().unwrap().push(head);
            let _ = conn.write_all(&reply);
        }
    });
    (addr, seen)
}

pub(crate) fn response(status: &str, headers: &[(&str, String)], body: &[u8], content_length: usize) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {content_length}\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

pub(crate) fn range_start(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string))
        .map(|r| r.trim_end_matches('-').parse().unwrap())
}

#[derive(Default)]
pub(crate) struct Events(pub(crate) Mutex<Vec<String>>);
impl FetchObserver for Events {
    fn retry(&self, host: &str, reason: &str) {
        self.0.lock().unwrap().push(format!("retry {host} {reason}"));
    }
    fn resumed(&self, host: &str, offset: u64) {
        self.0.lock().unwrap().push(format!("resumed {host} {offset}"));
    }
    fn fallback(&self, host: &str, reason: &str) {
        self.0.lock().unwrap().push(format!("fallback {host} {reason}"));
    }
}

/// The value of header `name` (case-insensitive) in a request head.
pub(crate) fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// The request target (`/v2/...`) of a request head.
pub(crate) fn target(head: &str) -> String {
    head.split(' ').nth(1).unwrap_or("").to_string()
}

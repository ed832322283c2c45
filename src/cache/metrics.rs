//! [`CacheStats`] in the Prometheus text exposition format (version 0.0.4), as a pure
//! function with a table test.

use std::fmt::Write;

use super::CacheStats;

/// Prometheus metric type.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

impl CacheStats {
    /// The stats in the Prometheus text exposition format 0.0.4 (what a `/metrics`
    /// endpoint serves as `text/plain; version=0.0.4`): one `rootfs_cache_*` metric per
    /// field, each with `# HELP` and `# TYPE` lines; counters end in `_total`, sizes are
    /// in bytes. No labels and no timestamps: an embedder adds its own labels by
    /// relabelling, or serves it beside its other metrics.
    ///
    /// ```
    /// let text = rootfs_cache::CacheStats::default().prometheus();
    /// assert!(text.contains("# TYPE rootfs_cache_hits_total counter\nrootfs_cache_hits_total 0\n"));
    /// ```
    pub fn prometheus(&self) -> String {
        use Kind::{Counter, Gauge};
        let s = self;
        let metrics: [(&str, Kind, &str, u64); 15] = [
            ("hits_total", Counter, "Layers found ready in the cache when asked for.", s.hits),
            ("misses_total", Counter, "Layers that had to be extracted, or waited for.", s.misses),
            ("extractions_total", Counter, "Layer extractions completed.", s.extractions),
            (
                "extracted_blob_bytes_total",
                Counter,
                "Bytes of layer blobs (compressed) read by completed extractions.",
                s.bytes_extracted,
            ),
            ("evictions_total", Counter, "Layers evicted.", s.evictions),
            (
                "dedup_waits_total",
                Counter,
                "Times an ensure waited for another caller's extraction of a layer.",
                s.dedup_waits,
            ),
            ("failed_gc_passes_total", Counter, "Automatic eviction passes that failed.", s.failed_gc_passes),
            (
                "downloaded_bytes_total",
                Counter,
                "Bytes of layer blobs read from fetchers (compressed), failed downloads included.",
                s.bytes_downloaded,
            ),
            ("download_retries_total", Counter, "Requests retried on the same host.", s.download_retries),
            ("resumed_downloads_total", Counter, "Broken blob downloads resumed.", s.resumed_downloads),
            ("host_fallbacks_total", Counter, "Times a host failed and the next one was tried.", s.host_fallbacks),
            ("layer_bytes", Gauge, "Disk usage of ready layers.", s.bytes_in_use),
            ("layers", Gauge, "Ready layers.", s.entries),
            ("leased_layers", Gauge, "Ready layers currently leased.", s.leased_entries),
            (
                "over_budget_bytes",
                Gauge,
                "Bytes over the disk budget after the last eviction pass (held by leases).",
                s.over_budget_bytes,
            ),
        ];
        let mut out = String::with_capacity(metrics.len() * 160);
        for (name, kind, help, value) in metrics {
            let kind = match kind {
                Counter => "counter",
                Gauge => "gauge",
            };
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP rootfs_cache_{name} {}\n# TYPE rootfs_cache_{name} {kind}\nrootfs_cache_{name} {value}\n",
                escape_help(help)
            );
        }
        out
    }
}

/// `# HELP` text escaping of the 0.0.4 format: backslash and line feed.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_format() {
        let s = CacheStats {
            hits: 1,
            misses: 2,
            extractions: 3,
            bytes_extracted: 4,
            evictions: 5,
            dedup_waits: 6,
            bytes_in_use: 7,
            entries: 8,
            leased_entries: 9,
            over_budget_bytes: 10,
            failed_gc_passes: 11,
            bytes_downloaded: 12,
            download_retries: 13,
            resumed_downloads: 14,
            host_fallbacks: 15,
        };
        let text = s.prometheus();
        let expected = "\
# HELP rootfs_cache_hits_total Layers found ready in the cache when asked for.
# TYPE rootfs_cache_hits_total counter
rootfs_cache_hits_total 1
# HELP rootfs_cache_misses_total Layers that had to be extracted, or waited for.
# TYPE rootfs_cache_misses_total counter
rootfs_cache_misses_total 2
# HELP rootfs_cache_extractions_total Layer extractions completed.
# TYPE rootfs_cache_extractions_total counter
rootfs_cache_extractions_total 3
# HELP rootfs_cache_extracted_blob_bytes_total Bytes of layer blobs (compressed) read by completed extractions.
# TYPE rootfs_cache_extracted_blob_bytes_total counter
rootfs_cache_extracted_blob_bytes_total 4
# HELP rootfs_cache_evictions_total Layers evicted.
# TYPE rootfs_cache_evictions_total counter
rootfs_cache_evictions_total 5
# HELP rootfs_cache_dedup_waits_total Times an ensure waited for another caller's extraction of a layer.
# TYPE rootfs_cache_dedup_waits_total counter
rootfs_cache_dedup_waits_total 6
# HELP rootfs_cache_failed_gc_passes_total Automatic eviction passes that failed.
# TYPE rootfs_cache_failed_gc_passes_total counter
rootfs_cache_failed_gc_passes_total 11
# HELP rootfs_cache_downloaded_bytes_total Bytes of layer blobs read from fetchers (compressed), failed downloads included.
# TYPE rootfs_cache_downloaded_bytes_total counter
rootfs_cache_downloaded_bytes_total 12
# HELP rootfs_cache_download_retries_total Requests retried on the same host.
# TYPE rootfs_cache_download_retries_total counter
rootfs_cache_download_retries_total 13
# HELP rootfs_cache_resumed_downloads_total Broken blob downloads resumed.
# TYPE rootfs_cache_resumed_downloads_total counter
rootfs_cache_resumed_downloads_total 14
# HELP rootfs_cache_host_fallbacks_total Times a host failed and the next one was tried.
# TYPE rootfs_cache_host_fallbacks_total counter
rootfs_cache_host_fallbacks_total 15
# HELP rootfs_cache_layer_bytes Disk usage of ready layers.
# TYPE rootfs_cache_layer_bytes gauge
rootfs_cache_layer_bytes 7
# HELP rootfs_cache_layers Ready layers.
# TYPE rootfs_cache_layers gauge
rootfs_cache_layers 8
# HELP rootfs_cache_leased_layers Ready layers currently leased.
# TYPE rootfs_cache_leased_layers gauge
rootfs_cache_leased_layers 9
# HELP rootfs_cache_over_budget_bytes Bytes over the disk budget after the last eviction pass (held by leases).
# TYPE rootfs_cache_over_budget_bytes gauge
rootfs_cache_over_budget_bytes 10
";
        assert_eq!(text, expected);
        // Every sample line is `name value`, names in the metric-name grammar, each
        // family's HELP and TYPE before its sample, counters ending in `_total`.
        let mut lines = text.lines();
        while let Some(help) = lines.next() {
            let name = help.strip_prefix("# HELP ").unwrap().split(' ').next().unwrap();
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{name}");
            let ty = lines.next().unwrap();
            let kind = ty.strip_prefix(&format!("# TYPE {name} ")).unwrap();
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
            let sample = lines.next().unwrap();
            let (n, v) = sample.split_once(' ').unwrap();
            assert_eq!(n, name);
            v.parse::<u64>().unwrap();
        }
        assert!(text.ends_with('\n'));
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }
}

//! Optional instrumentation (feature `tracing`): spans around the expensive operations,
//! with the digests, paths and sizes a runtime wants in its traces, and completion
//! events carrying what was done. Without the feature the macros expand to nothing: no
//! field expression is evaluated, no call is made.

/// `let _span = span!("name", field = value, ...);`: a `tracing` span (target
/// `rootfs_cache`, level INFO) entered until the guard drops.
macro_rules! span {
    ($name:literal $(, $($fields:tt)*)?) => {{
        #[cfg(feature = "tracing")]
        let guard = ::tracing::info_span!(target: "rootfs_cache", $name $(, $($fields)*)?).entered();
        #[cfg(not(feature = "tracing"))]
        let guard = $crate::trace::NoSpan;
        guard
    }};
}

/// `event!(field = value, ..., "message")`: an INFO event (target `rootfs_cache`) inside
/// the current span.
macro_rules! event {
    ($($t:tt)*) => {{
        #[cfg(feature = "tracing")]
        ::tracing::info!(target: "rootfs_cache", $($t)*);
    }};
}

/// What [`span!`] gives without the feature.
#[cfg(not(feature = "tracing"))]
pub(crate) struct NoSpan;

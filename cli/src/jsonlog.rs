//! `--log-format json`: tracing-subscriber's own JSON lines, serialized without
//! its per-write adapter.
//!
//! tracing-subscriber's `Json` format serializes each event through an adapter
//! that turns every small write serde_json makes (a quote, a key, a comma) into a
//! UTF-8 check and a `String` push: under load, a tenth of `tether serve`'s CPU
//! went to the one admission line per request. [`FastJson`] makes the same
//! serializer calls, with the same `tracing-serde` field serialization, into a
//! reused byte buffer, and hands the line over in one write. Events inside a span
//! (the line then lists spans, which need the subscriber's span store) are
//! formatted by tracing-subscriber's own `Json` format; tether's admission path
//! has no spans. `tests` checks both kinds of event line for line against it.

use serde::ser::{SerializeMap, Serializer as _};
use std::cell::RefCell;
use std::fmt;
use tracing::{Event, Subscriber};
use tracing_serde::AsSerde;
use tracing_serde::fields::AsMap;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::registry::LookupSpan;

/// tracing-subscriber's JSON line format (its defaults: timestamp, level,
/// `fields`, target; current span and span list when inside spans).
pub struct FastJson<T> {
    timer: T,
    /// The built-in format, for events inside a span.
    inner: Format<Json, T>,
}

impl<T: FormatTime + Clone> FastJson<T> {
    /// The format with `timer` for the `timestamp` field.
    pub fn new(timer: T) -> FastJson<T> {
        FastJson {
            inner: tracing_subscriber::fmt::format().json().with_timer(timer.clone()),
            timer,
        }
    }
}

thread_local! {
    /// The line being built, reused: a line costs no allocation once the
    /// buffers have grown to the longest line.
    static LINE: RefCell<(Vec<u8>, String)> = const { RefCell::new((Vec::new(), String::new())) };
}

impl<S, T> FormatEvent<S, JsonFields> for FastJson<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // As the built-in format decides whether to list spans: an explicit
        // parent, else the current span (even for an event with an explicit
        // `parent: None`).
        let in_span = event.parent().is_some() || ctx.lookup_current().is_some();
        if in_span {
            return self.inner.format_event(ctx, writer, event);
        }
        let written = LINE.try_with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                // Logging from inside a log line's serialization (a field's
                // `Debug` that logs): the built-in format, which needs no buffer.
                return None;
            };
            let (bytes, timestamp) = &mut *line;
            bytes.clear();
            timestamp.clear();
            Some(self.line(bytes, timestamp, event).and_then(|()| {
                // serde_json writes UTF-8 only; checked once per line.
                let text = std::str::from_utf8(bytes).map_err(|_| fmt::Error)?;
                writer.write_str(text)
            }))
        });
        match written {
            Ok(Some(result)) => result,
            _ => self.inner.format_event(ctx, writer, event),
        }
    }
}

impl<T: FormatTime> FastJson<T> {
    /// The JSON line of `event` (outside any span), with its newline.
    fn line(&self, out: &mut Vec<u8>, timestamp: &mut String, event: &Event<'_>) -> fmt::Result {
        self.timer.format_time(&mut Writer::new(timestamp))?;
        let meta = event.metadata();
        let mut ser = serde_json::Serializer::new(&mut *out);
        let result: Result<(), serde_json::Error> = (|| {
            let mut map = ser.serialize_map(None)?;
            map.serialize_entry("timestamp", timestamp.as_str())?;
            map.serialize_entry("level", &meta.level().as_serde())?;
            map.serialize_entry("fields", &event.field_map())?;
            map.serialize_entry("target", meta.target())?;
            map.end()
        })();
        result.map_err(|_| fmt::Error)?;
        out.push(b'\n');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// A timer that always writes the same time, so two formats' lines compare.
    #[derive(Clone)]
    struct Fixed;
    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-01T09:00:00.123456Z")
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    /// Events of every kind tether logs: string fields that need escaping,
    /// numbers, booleans, `%` and `?` values, a message with arguments, events
    /// inside nested spans and an event with an explicit parent.
    fn log_everything() {
        tracing::info!(
            endpoint = "mutate",
            uid = "9b6e3a6b-c6d5-4708-86d8-4943f3b9a702",
            namespace = "shop",
            workload = "shop/Deployment/checkout",
            mode = "enforce",
            decision = "patched",
            dry_run = false,
            duration_us = 42u64,
            "admission"
        );
        tracing::warn!(reason = %"quote \" backslash \\ newline \n tab \t ctrl \u{1} é ✓", workload = ?Some("x"), "seccomp exemption honored");
        tracing::error!(error = %io::Error::other("boom"), n = -3i64, f = 0.5f64, "cannot {} the {}", "load", "index");
        tracing::debug!("below the level: not written");
        let outer = tracing::info_span!("request", uid = "u-1", n = 7u64);
        let _o = outer.enter();
        let inner = tracing::info_span!("decide", workload = "w");
        let _i = inner.enter();
        tracing::info!(decision = "allowed", "in spans");
        tracing::info!(parent: &outer, "explicit parent");
        tracing::info!(parent: None, "explicit root");
        drop(_i);
        drop(_o);
        tracing::info!(parent: None, "explicit root outside spans");
    }

    fn lines_of(fast: bool) -> String {
        let out = Lines::default();
        let builder = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(out.clone())
            .json()
            .with_timer(Fixed);
        if fast {
            tracing::subscriber::with_default(builder.event_format(FastJson::new(Fixed)).finish(), log_everything);
        } else {
            tracing::subscriber::with_default(builder.finish(), log_everything);
        }
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn lines_are_tracing_subscribers_own_json_lines() {
        let ours = lines_of(true);
        let theirs = lines_of(false);
        assert_eq!(ours.lines().count(), 7, "{ours}");
        for (a, b) in ours.lines().zip(theirs.lines()) {
            assert_eq!(a, b);
            let _: serde_json::Value = serde_json::from_str(a).unwrap();
        }
        assert_eq!(ours, theirs);
        // Span-free lines were built in the fast path's buffer (the last one is
        // still there), not by the built-in format.
        let last = LINE.with(|l| String::from_utf8(l.borrow().0.clone()).unwrap());
        assert!(last.contains(r#""message":"explicit root outside spans""#), "{last:?}");
        assert!(ours.ends_with(&last));
    }
}

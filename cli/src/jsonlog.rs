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
//!
//! [`SecondCachedTime`] writes the `timestamp` as tracing-subscriber's
//! `SystemTime` does, formatting the date and time of day once per second.

use serde::ser::{SerializeMap, Serializer as _};
use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};
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

/// tracing-subscriber's `SystemTime` timestamps (RFC 3339 in UTC with
/// microseconds: `2026-12-06T15:46:52.740506Z`), the part up to the second
/// formatted by it once per second per thread and reused: its date and
/// time-of-day formatting (`fmt` of seven numbers) was a quarter of the
/// admission line's cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecondCachedTime;

thread_local! {
    /// The second (since the epoch) of the prefix, and the prefix:
    /// `2026-12-06T15:46:52.`
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for SecondCachedTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let Ok(now) = std::time::SystemTime::now().duration_since(UNIX_EPOCH) else {
            // Before 1970: as tracing-subscriber writes it.
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        };
        let cached = SECOND.try_with(|second| {
            let mut second = second.try_borrow_mut().ok()?;
            if second.0 != now.as_secs() {
                second.1 = prefix_of(now.as_secs())?;
                second.0 = now.as_secs();
            }
            Some(write_at(w, &second.1, now))
        });
        match cached {
            Ok(Some(written)) => written,
            _ => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

/// tracing-subscriber's timestamp of a moment in second `secs`, up to and with
/// the decimal point: formatted by it at a moment known to lie in that second,
/// `None` when the clock is no longer in it.
fn prefix_of(secs: u64) -> Option<String> {
    let mut text = String::new();
    tracing_subscriber::fmt::time::SystemTime
        .format_time(&mut Writer::new(&mut text))
        .ok()?;
    let after = std::time::SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    // The formatted moment lies between `secs` and `after`: in that second
    // when `after` still is. Its text ends in `.uuuuuuZ`.
    if after.as_secs() != secs || !text.ends_with('Z') || text.len() < 8 {
        return None;
    }
    text.truncate(text.len() - 7);
    text.ends_with('.').then_some(text)
}

/// `prefix`, then the microseconds of `now` in six digits, then `Z`.
fn write_at(w: &mut Writer<'_>, prefix: &str, now: Duration) -> fmt::Result {
    let mut micros = now.subsec_micros();
    let mut digits = [b'0'; 7];
    digits[6] = b'Z';
    for d in digits[..6].iter_mut().rev() {
        *d = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    w.write_str(prefix)?;
    // ASCII digits and `Z`.
    w.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
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

    /// The timestamp at a moment as tracing-subscriber's formatter writes it,
    /// read from `SystemTime` before and after: `(before, after)`.
    fn theirs_around(ours: &mut String) -> (String, String) {
        let mut before = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut before))
            .unwrap();
        ours.clear();
        SecondCachedTime.format_time(&mut Writer::new(ours)).unwrap();
        let mut after = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut after))
            .unwrap();
        (before, after)
    }

    #[test]
    fn timestamps_are_tracing_subscribers_own_across_seconds() {
        let mut ours = String::new();
        let mut seconds = std::collections::BTreeSet::new();
        let start = std::time::Instant::now();
        // Until three different seconds were seen (two second changes), each
        // timestamp in the same second as the formatter's around it.
        while seconds.len() < 3 {
            assert!(start.elapsed() < Duration::from_secs(10));
            let (before, after) = theirs_around(&mut ours);
            assert_eq!(ours.len(), before.len(), "{ours} vs {before}");
            assert!(before <= ours && ours <= after, "{before} <= {ours} <= {after}");
            // The second, as `2026-12-06T15:46:52.`, reused or not.
            seconds.insert(ours[..ours.len() - 7].to_owned());
            std::thread::sleep(Duration::from_micros(300));
        }
    }

    #[test]
    fn microseconds_are_six_digits_then_z() {
        for (nanos, want) in [
            (0, "x.000000Z"),
            (1_000, "x.000001Z"),
            (999_999_999, "x.999999Z"),
            (120_450_000, "x.120450Z"),
        ] {
            let mut out = String::new();
            write_at(&mut Writer::new(&mut out), "x.", Duration::new(5, nanos)).unwrap();
            assert_eq!(out, want);
        }
    }
}

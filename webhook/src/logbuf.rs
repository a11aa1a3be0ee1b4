//! Log lines of the connection threads, written a batch at a time.
//!
//! `tether serve` writes one JSON line per admission. Each `write(2)` of a log
//! line costs several microseconds on a virtual machine (the syscall, the file
//! system, the page cache), more than formatting the line: written one by one
//! the lines were a fifth of the server's CPU per admission, and written each
//! time a connection thread ran out of work (about every 5 admissions under
//! load) still ~1 µs per admission. A connection thread instead collects its
//! lines and writes them when the batch would pass [`BATCH_LIMIT`], or at the
//! latest [`MAX_DELAY`] after the batch's first line ([`BatchGuard::writer`],
//! a task on the thread's runtime), and when batching ends. Lines stay whole:
//! each `write` carries complete lines only.
//!
//! What it gives up: the lines a thread holds when the process dies without
//! unwinding (SIGKILL, abort) are lost: at most [`MAX_DELAY`] of them, and at
//! most [`BATCH_LIMIT`] bytes, per connection thread. Threads that do not opt in
//! ([`batch_this_thread`]) write each line at once, as before.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The most a batch holds before it is written. Larger than `PIPE_BUF` (4 KiB),
/// the size up to which the kernel keeps a pipe write whole against other
/// writers: the sink must keep its writers apart itself, as std's `Stderr` does
/// (its lock is held for a whole `write_all`, so batches of different threads
/// never interleave, on a pipe or a file).
pub const BATCH_LIMIT: usize = 16 * 1024;

/// The longest a line waits in its thread's batch (see [`BatchGuard::writer`]).
pub const MAX_DELAY: Duration = Duration::from_millis(50);

/// Where a thread's batch goes.
type Sink = Box<dyn Write>;

struct Batch {
    pending: Vec<u8>,
    sink: Sink,
    /// Told when a line goes into an empty batch: starts [`BatchGuard::writer`]'s wait.
    started: Arc<Notify>,
}

impl Batch {
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            // A log line that cannot be written has nowhere else to go; the
            // server keeps serving (as tracing's own writer does).
            let _ = self.sink.write_all(&self.pending);
            self.pending.clear();
        }
    }
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Makes this thread's log lines ([`LogWriter`]) go to `sink` in batches until
/// the returned guard is dropped, which writes what is left. Without the
/// guard's [`writer`](BatchGuard::writer) running, a batch is written only when
/// full or when batching ends.
#[must_use = "batching stops, and the lines held are written, when the guard is dropped"]
pub fn batch_this_thread(sink: Sink) -> BatchGuard {
    let started = Arc::new(Notify::new());
    BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if let Some(old) = b.as_mut() {
            old.flush();
        }
        *b = Some(Batch {
            pending: Vec::with_capacity(BATCH_LIMIT),
            sink,
            started: started.clone(),
        });
    });
    BatchGuard {
        started,
        _not_send: std::marker::PhantomData,
    }
}

/// Ends batching on its thread when dropped, writing the lines held.
#[derive(Debug)]
pub struct BatchGuard {
    started: Arc<Notify>,
    // The batch lives in a thread-local: the guard must be dropped on its thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl BatchGuard {
    /// The task that writes the batch [`MAX_DELAY`] after its first line: a
    /// line goes out when its batch fills or at most that long after it was
    /// logged. It never ends; it must run on the batching thread (a task of that
    /// thread's current-thread runtime), since it writes the batch of the thread
    /// it runs on. It sleeps while the batch is empty, so an idle thread is not
    /// woken for it.
    pub fn writer(&self) -> impl Future<Output = ()> + Send + 'static {
        let started = self.started.clone();
        async move {
            loop {
                // A line that arrives while this sleeps leaves a permit, so the
                // next wait ends at once: every line is written within MAX_DELAY
                // of going into the batch.
                started.notified().await;
                tokio::time::sleep(MAX_DELAY).await;
                flush();
            }
        }
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        let _ = BATCH.try_with(|b| {
            if let Some(mut batch) = b.borrow_mut().take() {
                batch.flush();
            }
        });
    }
}

/// Writes the lines this thread holds, if it batches. Cheap when there are none.
pub fn flush() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut()
            && let Some(batch) = b.as_mut()
        {
            batch.flush();
        }
    });
}

/// The log writer tether hands to its subscriber (one `write_all` per formatted
/// line): batched on threads that opted in, else straight to stderr. It never
/// fails: a line that cannot be written (stderr closed) is dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogWriter;

impl LogWriter {
    /// A writer for one line (the shape `tracing_subscriber`'s `with_writer` takes).
    pub fn make() -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let batched = BATCH
            .try_with(|b| {
                let Ok(mut b) = b.try_borrow_mut() else {
                    return false;
                };
                let Some(batch) = b.as_mut() else {
                    return false;
                };
                if batch.pending.len() + line.len() > BATCH_LIMIT {
                    batch.flush();
                }
                if line.len() > BATCH_LIMIT {
                    // Longer than a batch: on its own, at once.
                    let _ = batch.sink.write_all(line);
                } else {
                    if batch.pending.is_empty() {
                        batch.started.notify_one();
                    }
                    batch.pending.extend_from_slice(line);
                }
                true
            })
            .unwrap_or(false);
        if !batched {
            // Dropped when stderr is gone, as in a batch: logging must not fail
            // the work that logs.
            let _ = io::stderr().write_all(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that records each `write` it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Writes {
        fn taken(&self) -> Vec<String> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .map(|w| String::from_utf8(w.clone()).unwrap())
                .collect()
        }
    }

    fn line(n: usize, len: usize) -> Vec<u8> {
        let mut l = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
        l.resize(len - 3, b'x');
        l.extend_from_slice(b"\"}\n");
        l
    }

    // Each test sets up and tears down its own batch with a guard, so the
    // thread-local is left as found even if the test panics.
    /// Waits (up to 10 s) until `sink` has had `n` writes; how long that took.
    async fn writes_after(sink: &Writes, n: usize) -> std::time::Duration {
        let start = std::time::Instant::now();
        while sink.taken().len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no write after 10 s: {:?}",
                sink.taken()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        start.elapsed()
    }

    #[tokio::test]
    async fn lines_go_out_together_in_order_within_the_delay_of_the_first() {
        let sink = Writes::default();
        let guard = batch_this_thread(Box::new(sink.clone()));
        tokio::spawn(guard.writer());
        for n in 0..3 {
            LogWriter.write_all(&line(n, 100)).unwrap();
        }
        assert!(sink.taken().is_empty(), "written before the delay");
        let waited = writes_after(&sink, 1).await;
        assert!(waited >= MAX_DELAY, "written after {waited:?}, before the delay");
        let writes = sink.taken();
        assert_eq!(writes.len(), 1, "{writes:?}");
        let expected: Vec<u8> = (0..3).flat_map(|n| line(n, 100)).collect();
        assert_eq!(writes[0].as_bytes(), expected);
        // The writer goes on: a later line is written by itself, as late.
        LogWriter.write_all(&line(3, 100)).unwrap();
        let waited = writes_after(&sink, 2).await;
        assert!(waited >= MAX_DELAY, "written after {waited:?}, before the delay");
        assert_eq!(sink.taken()[1].as_bytes(), line(3, 100));
        // Nothing held, nothing written.
        tokio::time::sleep(MAX_DELAY * 3).await;
        assert_eq!(sink.taken().len(), 2);
        drop(guard);
    }

    #[test]
    fn a_batch_never_passes_the_limit_nor_splits_a_line() {
        let sink = Writes::default();
        let guard = batch_this_thread(Box::new(sink.clone()));
        let lines: Vec<Vec<u8>> = (0..100).map(|n| line(n, 300 + n % 7)).collect();
        for l in &lines {
            LogWriter.write_all(l).unwrap();
        }
        let long = line(100, BATCH_LIMIT + 10);
        LogWriter.write_all(&long).unwrap();
        drop(guard);
        let writes = sink.taken();
        assert!(writes.len() > 1);
        for w in &writes[..writes.len() - 1] {
            assert!(w.len() <= BATCH_LIMIT, "a write of {} bytes", w.len());
            assert!(w.ends_with('\n'), "a write that ends inside a line");
        }
        // Everything arrives, in order, the long line whole and by itself.
        let all: Vec<u8> = writes.concat().into_bytes();
        let expected: Vec<u8> = lines.concat().into_iter().chain(long.clone()).collect();
        assert_eq!(all, expected);
        assert_eq!(writes.last().unwrap().as_bytes(), long);
    }

    #[test]
    fn dropping_the_guard_writes_what_is_held_and_ends_batching() {
        let sink = Writes::default();
        let guard = batch_this_thread(Box::new(sink.clone()));
        LogWriter.write_all(&line(0, 50)).unwrap();
        drop(guard);
        assert_eq!(sink.taken().len(), 1);
        // Not batching any more: this goes to stderr, not to the old sink.
        LogWriter.write_all(b"").unwrap();
        flush();
        assert_eq!(sink.taken().len(), 1);
    }
}

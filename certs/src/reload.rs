//! A rustls certificate resolver that reloads its pair when the files change,
//! without a restart and without touching established connections.
//!
//! Kubelet updates a mounted Secret by writing a new timestamped directory and
//! atomically swapping the `..data` symlink to it; the visible `tls.crt` is a
//! symlink through `..data`. An inotify watch on `tls.crt` itself misses that swap,
//! so the resolver watches the directories holding the files and also polls them as
//! a backstop. A new pair is served only when both files parse, belong together and
//! are within their validity; otherwise the old pair stays in service and the reason
//! is logged and counted.

use crate::CertError;
use crate::load::{LoadedPair, pair_from_pem};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// Outcome label of a reload attempt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ReloadResult {
    /// A new pair is in service.
    Success,
    /// The files changed but could not be used; the old pair stays.
    Failure,
}

/// Labels of the reload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// How the attempt ended.
    pub result: ReloadResult,
}

/// Certificate metrics. Cloning shares the underlying metrics.
#[derive(Debug, Clone, Default)]
pub struct CertMetrics {
    /// Seconds until the serving certificate expires (negative once expired).
    pub expiry_seconds: Gauge<f64, AtomicU64>,
    /// Reload attempts on changed files, by result.
    pub reloads: Family<ReloadLabels, Counter>,
}

impl CertMetrics {
    /// Registers the metrics (`tls_certificate_expiry_seconds`,
    /// `tls_certificate_reloads_total`) in `registry`, under its prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tls_certificate_expiry_seconds",
            "Seconds until the serving certificate expires",
            self.expiry_seconds.clone(),
        );
        registry.register(
            "tls_certificate_reloads",
            "Reloads of the serving certificate after its files changed, by result",
            self.reloads.clone(),
        );
    }
}

/// Serves the current pair and swaps in a new one when its files change.
#[derive(Debug)]
pub struct ReloadingResolver {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<LoadedPair>,
    /// The contents of the last pair that failed, so a broken file is reported
    /// once, not at every poll.
    last_failed: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
    metrics: CertMetrics,
}

impl ReloadingResolver {
    /// Loads the initial pair; fails when it cannot serve (there is no old pair to
    /// keep yet).
    pub fn new(cert_path: &Path, key_path: &Path, metrics: CertMetrics) -> Result<Arc<Self>, CertError> {
        let pair = crate::load::load_pair(cert_path, key_path)?;
        let resolver = ReloadingResolver {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(pair),
            last_failed: Mutex::new(None),
            metrics,
        };
        resolver.update_expiry();
        Ok(Arc::new(resolver))
    }

    fn read_current(&self) -> std::sync::RwLockReadGuard<'_, LoadedPair> {
        // A panic while holding the lock cannot leave the pair half-written (it
        // is replaced whole), so a poisoned lock still holds a usable pair.
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// End of the served certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.read_current().not_after
    }

    /// The served chain and key.
    pub fn certified(&self) -> Arc<CertifiedKey> {
        self.read_current().certified.clone()
    }

    fn update_expiry(&self) {
        let not_after = self.not_after();
        let secs = match not_after.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        self.metrics.expiry_seconds.set(secs);
    }

    /// Re-reads the files. `Ok(true)`: a new pair is in service; `Ok(false)`: the
    /// files are unchanged (or are the same broken pair as last time); `Err`: they
    /// changed and cannot serve, and the old pair stays.
    pub fn reload(&self) -> Result<bool, CertError> {
        self.update_expiry();
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| CertError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(&self.cert_path)?, read(&self.key_path)?);
        {
            let current = self.read_current();
            if current.cert_pem == cert_pem && current.key_pem == key_pem {
                return Ok(false);
            }
        }
        let mut last_failed = self.last_failed.lock().unwrap_or_else(|e| e.into_inner());
        if last_failed.as_ref() == Some(&(cert_pem.clone(), key_pem.clone())) {
            return Ok(false);
        }
        match pair_from_pem(&self.cert_path, &cert_pem, &self.key_path, &key_pem) {
            Ok(pair) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
                *last_failed = None;
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels {
                        result: ReloadResult::Success,
                    })
                    .inc();
                self.update_expiry();
                Ok(true)
            }
            Err(e) => {
                *last_failed = Some((cert_pem, key_pem));
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels {
                        result: ReloadResult::Failure,
                    })
                    .inc();
                Err(e)
            }
        }
    }

    /// Starts watching the files' directories, reloading on change and every `poll`
    /// as a backstop. Runs on the current tokio runtime until the handle is dropped.
    pub fn watch(self: &Arc<Self>, poll: Duration) -> WatchHandle {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = self.start_notify(tx);
        let me = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = rx.recv() => {
                        if event.is_none() {
                            // The notifier is gone; polling goes on.
                            tokio::time::sleep(poll).await;
                        } else {
                            // Writers touch several files in a row: let them finish.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            while rx.try_recv().is_ok() {}
                        }
                    }
                    _ = tokio::time::sleep(poll) => {}
                }
                let resolver = Arc::clone(&me);
                let outcome = tokio::task::spawn_blocking(move || resolver.reload()).await;
                match outcome {
                    Ok(Ok(true)) => tracing::info!(cert = %me.cert_path.display(), "serving certificate reloaded"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "serving certificate not reloaded; the previous one stays in service")
                    }
                    Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
                }
            }
        });
        WatchHandle {
            task,
            _watcher: watcher,
        }
    }

    fn start_notify(&self, tx: tokio::sync::mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
        use notify::Watcher;
        let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if is_change(&event) {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch certificate files; relying on polling");
                return None;
            }
        };
        let mut dirs: Vec<PathBuf> = [&self.cert_path, &self.key_path]
            .iter()
            .map(|p| {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            })
            .collect();
        dirs.dedup();
        for dir in dirs {
            if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; relying on polling");
            }
        }
        Some(watcher)
    }
}

/// Whether a file-watch event reports a change. Reads (open, close without
/// write) are not changes: reacting to them makes every reload, which reads the
/// files, trigger the next one.
pub fn is_change(event: &notify::Result<notify::Event>) -> bool {
    event
        .as_ref()
        .is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)))
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

/// Keeps a [`ReloadingResolver::watch`] running; dropping it stops the watch.
#[derive(Debug)]
pub struct WatchHandle {
    task: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{Usage, Validity, for_service, issue};
    use prometheus_client::encoding::text::encode;

    fn serial(r: &ReloadingResolver) -> Vec<u8> {
        r.certified().cert[0].to_vec()
    }

    #[test]
    fn keeps_the_old_pair_for_every_kind_of_bad_file_and_takes_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let pki = for_service("s", "n", &[], 10).unwrap();
        std::fs::write(&c, &pki.cert).unwrap();
        std::fs::write(&k, &pki.key).unwrap();
        let metrics = CertMetrics::default();
        let r = ReloadingResolver::new(&c, &k, metrics.clone()).unwrap();
        let original = serial(&r);
        assert!(!r.reload().unwrap(), "unchanged files are not a reload");

        let other = for_service("s", "n", &[], 10).unwrap();
        let expired = {
            let past = Validity {
                not_before: SystemTime::now() - Duration::from_secs(3 * 86_400),
                not_after: SystemTime::now() - Duration::from_secs(86_400),
            };
            issue(&pki.ca_cert, &pki.ca_key, &["s".into()], Usage::Server, past).unwrap()
        };
        let bad: [(&str, &str, &str); 4] = [
            ("expired", &expired.0, &expired.1),
            ("mismatched", &other.cert, &pki.key),
            ("truncated", &pki.cert[..pki.cert.len() - 40], &pki.key),
            ("garbage", "\u{0}\u{1}garbage", "more garbage"),
        ];
        for (what, cert, key) in bad {
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            assert!(r.reload().is_err(), "{what} accepted");
            assert_eq!(serial(&r), original, "{what} replaced the served certificate");
            // The same broken files are reported once.
            assert!(!r.reload().unwrap(), "{what} reported twice");
        }

        std::fs::write(&c, &other.cert).unwrap();
        std::fs::write(&k, &other.key).unwrap();
        assert!(r.reload().unwrap());
        assert_ne!(serial(&r), original);

        let mut registry = Registry::with_prefix("tether");
        metrics.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("tether_tls_certificate_reloads_total{result=\"Failure\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("tether_tls_certificate_reloads_total{result=\"Success\"} 1"),
            "{text}"
        );
        let expiry = metrics.expiry_seconds.get();
        assert!(expiry > 9.0 * 86_400.0 && expiry <= 10.0 * 86_400.0, "{expiry}");
    }

    /// A change the directory watch cannot see (the files are symlinks into a
    /// directory that is not watched) is still picked up by polling.
    #[tokio::test]
    async fn polling_catches_what_the_directory_watch_misses() {
        let watched = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let pki = for_service("s", "n", &[], 10).unwrap();
        let (real_c, real_k) = (elsewhere.path().join("c.pem"), elsewhere.path().join("k.pem"));
        std::fs::write(&real_c, &pki.cert).unwrap();
        std::fs::write(&real_k, &pki.key).unwrap();
        let (c, k) = (watched.path().join("tls.crt"), watched.path().join("tls.key"));
        std::os::unix::fs::symlink(&real_c, &c).unwrap();
        std::os::unix::fs::symlink(&real_k, &k).unwrap();
        let r = ReloadingResolver::new(&c, &k, CertMetrics::default()).unwrap();
        let original = serial(&r);
        let _watch = r.watch(Duration::from_millis(200));
        let other = for_service("s", "n", &[], 10).unwrap();
        std::fs::write(&real_c, &other.cert).unwrap();
        std::fs::write(&real_k, &other.key).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while serial(&r) == original && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_ne!(serial(&r), original, "the poll backstop did not reload");
    }
}

//! Certificate rotation and client authentication against a real TLS server, with
//! a real HTTP/2 client.

use crate::tls::{client, client_config, resolver_in, serve};
use certs::generate::{Usage, Validity, for_service, issue, new_ca};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Writes a kubelet-style Secret volume version and points `..data` at it
/// atomically (a new symlink renamed over the old one), as kubelet's AtomicWriter does.
fn publish(dir: &Path, version: &str, cert: &str, key: &str) {
    let data = dir.join(version);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tls.crt"), cert).unwrap();
    std::fs::write(data.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(f)).is_err() {
            symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
    }
}

fn leaf_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

const POLL: Duration = Duration::from_secs(1);

/// When a request on a new connection completed, and the leaf certificate it saw.
type Seen = (Instant, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_through_the_data_symlink_drops_no_request_and_new_connections_see_the_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = for_service("tether-webhook", "tether-system", &["localhost".into()], 30).unwrap();
    publish(dir.path(), "..2026_11_30_00_00_00.1", &pki.cert, &pki.key);
    let (new_cert, new_key) = issue(
        &pki.ca_cert,
        &pki.ca_key,
        &["localhost".into()],
        Usage::Server,
        Validity::days(60),
    )
    .unwrap();
    let (old_der, new_der) = (leaf_der(&pki.cert), leaf_der(&new_cert));

    let resolver = resolver_in(dir.path());
    let _watch = resolver.watch(POLL);
    let server = serve(certs::tls::server_config(resolver.clone(), None).unwrap()).await;
    let url = format!("https://localhost:{}/healthz", server.addr.port());

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let mut tasks = Vec::new();
    for reuse in [true, false] {
        let kept = client(client_config(&pki.ca_cert, None), true);
        // Without session resumption, so every new connection is a full handshake
        // that shows the certificate the server serves now.
        let mut config = client_config(&pki.ca_cert, None);
        config.resumption = rustls::client::Resumption::disabled();
        let (stop, failures, ok, seen, url) = (stop.clone(), failures.clone(), ok.clone(), seen.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A fresh client has no pooled connection: every request handshakes.
                let c = if reuse {
                    kept.clone()
                } else {
                    client(config.clone(), false)
                };
                match c.get(&url).send().await {
                    Ok(resp) if resp.status().is_success() => {
                        assert_eq!(resp.version(), reqwest::Version::HTTP_2, "the client negotiates h2");
                        if !reuse {
                            let info = resp.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
                            let der = info.peer_certificate().unwrap().to_vec();
                            seen.lock().unwrap().push((Instant::now(), der));
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("request failed: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let swapped_at = Instant::now();
    publish(dir.path(), "..2026_11_30_00_10_00.2", &new_cert, &new_key);
    tokio::time::sleep(POLL * 2).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed during rotation");
    assert!(ok.load(Ordering::Relaxed) > 50, "too few requests to prove anything");
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|(t, c)| *t < swapped_at && *c == old_der));
    let first_new = seen
        .iter()
        .find(|(_, c)| *c == new_der)
        .map(|(t, _)| t.duration_since(swapped_at))
        .expect("no new connection ever saw the new certificate");
    eprintln!(
        "rotation: {} requests ok, 0 failed; first new connection with the new certificate {first_new:?} after the swap",
        ok.load(Ordering::Relaxed)
    );
    assert!(first_new <= POLL, "took {first_new:?}, more than the poll interval");
    // Once the new certificate is served, no new connection gets the old one.
    let cutoff = swapped_at + first_new;
    assert!(
        seen.iter()
            .filter(|(t, _)| *t > cutoff + Duration::from_millis(50))
            .all(|(_, c)| *c == new_der)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_rotation_keeps_serving_the_old_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = for_service("tether-webhook", "tether-system", &["localhost".into()], 30).unwrap();
    publish(dir.path(), "..v1", &pki.cert, &pki.key);
    let resolver = resolver_in(dir.path());
    let _watch = resolver.watch(Duration::from_millis(200));
    let server = serve(certs::tls::server_config(resolver.clone(), None).unwrap()).await;
    let url = format!("https://localhost:{}/", server.addr.port());
    let c = client(client_config(&pki.ca_cert, None), false);

    let other = for_service("x", "y", &[], 30).unwrap();
    for (version, cert, key) in [
        ("..mismatched", pki.cert.as_str(), other.key.as_str()),
        ("..truncated", &pki.cert[..200], pki.key.as_str()),
        ("..garbage", "garbage", "garbage"),
    ] {
        publish(dir.path(), version, cert, key);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let resp = c.get(&url).send().await.unwrap_or_else(|e| panic!("{version}: {e}"));
        let der = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .unwrap()
            .peer_certificate()
            .unwrap()
            .to_vec();
        assert_eq!(der, leaf_der(&pki.cert), "{version} replaced the certificate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_a_certificate_from_it_connect() {
    let dir = tempfile::tempdir().unwrap();
    let pki = for_service("tether-webhook", "tether-system", &["localhost".into()], 30).unwrap();
    pki.write(dir.path(), false).unwrap();
    let (client_ca, client_ca_key) = new_ca("API server clients", Validity::days(30)).unwrap();
    let client_ca_path = dir.path().join("client-ca.crt");
    std::fs::write(&client_ca_path, &client_ca).unwrap();
    let (id_cert, id_key) = issue(
        &client_ca,
        &client_ca_key,
        &["kube-apiserver".into()],
        Usage::Client,
        Validity::days(30),
    )
    .unwrap();
    let (rogue_ca, rogue_key) = new_ca("rogue", Validity::days(30)).unwrap();
    let (rogue_cert, rogue_id_key) = issue(
        &rogue_ca,
        &rogue_key,
        &["kube-apiserver".into()],
        Usage::Client,
        Validity::days(30),
    )
    .unwrap();

    let resolver = resolver_in(dir.path());
    let config = certs::tls::server_config(resolver, Some(&client_ca_path)).unwrap();
    let server = serve(config).await;
    let url = format!("https://localhost:{}/", server.addr.port());

    let with_id = client(client_config(&pki.ca_cert, Some((&id_cert, &id_key))), false);
    assert!(with_id.get(&url).send().await.unwrap().status().is_success());
    let anonymous = client(client_config(&pki.ca_cert, None), false);
    assert!(
        anonymous.get(&url).send().await.is_err(),
        "a client without a certificate got through"
    );
    let rogue = client(client_config(&pki.ca_cert, Some((&rogue_cert, &rogue_id_key))), false);
    assert!(
        rogue.get(&url).send().await.is_err(),
        "a client with a certificate from another CA got through"
    );
}

/// Runs `openssl s_client` with `flags` against `port`; returns (success, output).
pub fn s_client(port: u16, flags: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .args(flags)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_1_2_and_1_3_and_alpn_offers_h2_and_http_1_1() {
    let dir = tempfile::tempdir().unwrap();
    let pki = for_service("tether-webhook", "tether-system", &["localhost".into()], 30).unwrap();
    pki.write(dir.path(), false).unwrap();
    let resolver = resolver_in(dir.path());
    let server = serve(certs::tls::server_config(resolver, None).unwrap()).await;
    let port = server.addr.port();
    let result = tokio::task::spawn_blocking(move || {
        // SECLEVEL=0 lets OpenSSL 3 offer the old versions at all, so a refusal is the server's.
        let old: Vec<(bool, String)> = ["-tls1", "-tls1_1"]
            .iter()
            .map(|v| s_client(port, &[v, "-cipher", "DEFAULT@SECLEVEL=0"]))
            .collect();
        let v12 = s_client(port, &["-tls1_2", "-alpn", "http/1.1"]);
        let v13 = s_client(port, &["-tls1_3", "-alpn", "h2,http/1.1"]);
        (old, v12, v13)
    })
    .await
    .unwrap();
    let (old, v12, v13) = result;
    for (ok, text) in old {
        assert!(!ok, "an old TLS version was accepted:\n{text}");
        // The server answered the ClientHello with an alert (rustls sends
        // handshake_failure or protocol_version): the refusal is the server's.
        assert!(
            text.contains("alert handshake failure") || text.contains("alert protocol version"),
            "not refused by the server:\n{text}"
        );
    }
    assert!(
        v12.1.contains("Protocol  : TLSv1.2") || v12.1.contains("TLSv1.2"),
        "{}",
        v12.1
    );
    assert!(v12.1.contains("ALPN protocol: http/1.1"), "{}", v12.1);
    assert!(v13.1.contains("TLSv1.3"), "{}", v13.1);
    assert!(v13.1.contains("ALPN protocol: h2"), "{}", v13.1);
}

/// The e2e suite registers its local webhook by `url: https://IP:PORT/mutate`:
/// an HTTPS client reaching the server by IP accepts a certificate with that IP
/// SAN, and refuses one with only DNS names.
#[tokio::test]
async fn a_certificate_with_an_ip_san_is_accepted_by_a_client_dialing_that_ip() {
    for (sans, accepted) in [
        (vec!["127.0.0.1".to_string()], true),
        (vec!["localhost".to_string()], false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let pki = for_service("tether-webhook", "tether-e2e", &sans, 1).unwrap();
        pki.write(dir.path(), false).unwrap();
        let resolver = resolver_in(dir.path());
        let server = serve(certs::tls::server_config(resolver, None).unwrap()).await;
        let url = format!("https://127.0.0.1:{}/mutate", server.addr.port());
        let got = client(client_config(&pki.ca_cert, None), false).get(&url).send().await;
        assert_eq!(got.is_ok(), accepted, "SANs {sans:?}: {got:?}");
        if let Ok(resp) = got {
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        }
    }
}

//! A scripted Kubernetes API server for unit tests of kube calls.
//!
//! [`serve`] gives a [`kube::Client`] whose requests go to a `tower-test` mock
//! that plays a list of expected [`Call`]s in order: each request must have the
//! scripted method and path, its body can be checked, and it gets the scripted
//! answer. A call out of order, a call the script does not have, or a scripted
//! call that never comes fails the test ([`Script::finish`] reports it). Every
//! crate that talks to the API server (certs, profile-store, webhook, installer)
//! tests its calls with this one verifier.
//!
//! [`route`] serves loops whose calls come in no fixed order (reflectors,
//! elections): a handler answers each call by what it asks for, and watches are
//! held open.
//!
//! Test support only: it panics on every mismatch, as a test should.

// Linked only into tests (a dev-dependency), where a panic is the failure report;
// clippy.toml allows these in `#[test]` code, which this crate is in effect.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::Value;
use std::time::Duration;

/// How long a scripted call may take to come before the script fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Script::finish`] waits for a call beyond the script: long enough
/// for a client that would make one right away, short enough for every test.
const EXTRA_CALL_WINDOW: Duration = Duration::from_millis(200);

/// What the client sent with one request.
#[derive(Debug)]
pub struct Sent {
    /// The `content-type` header, if any (e.g. `application/json-patch+json`).
    pub content_type: Option<String>,
    /// The JSON body, `Value::Null` when the request had none.
    pub body: Value,
}

type Check = Box<dyn FnOnce(&Sent) + Send>;
type Answer = Box<dyn FnOnce(usize, &Value) -> Value + Send>;

/// One expected request and the API server's answer.
pub struct Call {
    method: Method,
    path: String,
    status: StatusCode,
    answer: Answer,
    check: Option<Check>,
}

impl Call {
    /// Expects `method` on `path` (no query) and answers `status` with `body`.
    ///
    /// Panics on a status that is not an HTTP status code (a typo in a test).
    pub fn new(method: Method, path: &str, status: u16, body: Value) -> Call {
        Call {
            method,
            path: path.to_string(),
            status: StatusCode::from_u16(status).expect("an HTTP status code"),
            answer: Box::new(move |_, _| body),
            check: None,
        }
    }

    /// Answers with what `f` makes of the call's position in the script and the
    /// body sent (e.g. a write echoed back under a new `resourceVersion`).
    pub fn answer_with(mut self, f: impl FnOnce(usize, &Value) -> Value + Send + 'static) -> Call {
        self.answer = Box::new(f);
        self
    }

    /// Runs `check` on the JSON body the client sent (`Value::Null` for none).
    pub fn check(self, check: impl FnOnce(&Value) + Send + 'static) -> Call {
        self.check_request(move |sent| check(&sent.body))
    }

    /// Runs `check` on the request's content type and body.
    pub fn check_request(mut self, check: impl FnOnce(&Sent) + Send + 'static) -> Call {
        self.check = Some(Box::new(check));
        self
    }

    /// Expects exactly `want` as the JSON body.
    pub fn expect_body(self, want: Value) -> Call {
        self.check(move |got| assert_eq!(got, &want, "the body sent"))
    }
}

/// The running script; [`Script::finish`] says whether it was played.
#[must_use = "call finish() to learn whether the client made the scripted calls"]
pub struct Script {
    server: tokio::task::JoinHandle<()>,
}

/// A client (default namespace `namespace`) and the server playing `calls`. Call
/// from inside a tokio runtime: the server is a task on it.
pub fn serve(calls: Vec<Call>, namespace: &str) -> (kube::Client, Script) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        for (i, call) in calls.into_iter().enumerate() {
            let (req, send) = tokio::time::timeout(CALL_TIMEOUT, handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("call {i} ({} {}) never came", call.method, call.path))
                .unwrap_or_else(|| panic!("the client went away before call {i} ({} {})", call.method, call.path));
            assert_eq!(req.method(), call.method, "call {i}: {}", req.uri());
            assert_eq!(req.uri().path(), call.path, "call {i}");
            let content_type = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = req.into_body().collect().await.expect("the request body").to_bytes();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("a JSON request body")
            };
            let sent = Sent { content_type, body };
            if let Some(check) = call.check {
                check(&sent);
            }
            let answer = (call.answer)(i, &sent.body);
            send.send_response(
                Response::builder()
                    .status(call.status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("a JSON answer")))
                    .expect("a response"),
            );
        }
        if let Ok(Some((req, _))) = tokio::time::timeout(EXTRA_CALL_WINDOW, handle.next_request()).await {
            panic!("unexpected call {} {}", req.method(), req.uri());
        }
    });
    (kube::Client::new(service, namespace), Script { server })
}

impl Script {
    /// Waits for the script to end; panics (failing the test) with what went
    /// wrong if a call differed, never came, or came beyond the script.
    pub async fn finish(self) {
        if let Err(e) = self.server.await {
            match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("the scripted API server was cancelled: {e}"),
            }
        }
    }
}

/// A call as [`route`]'s handler sees it.
#[derive(Debug)]
pub struct Routed {
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query string (`""` for none).
    pub query: String,
    /// The JSON body, `Value::Null` when the request had none.
    pub body: Value,
}

/// The running server of [`route`].
#[must_use = "call finish() to learn whether the handler failed on a call"]
pub struct Routes {
    server: tokio::task::JoinHandle<()>,
}

/// A client (default namespace `namespace`) whose calls `answer` answers with a
/// status and a JSON body; watches (`watch=true`) are held open, unanswered, so a
/// reflector lists once and then waits. `answer` panics on a call it does not
/// expect ([`Routes::finish`] reports it). Call from inside a tokio runtime.
pub fn route(
    namespace: &str,
    mut answer: impl FnMut(&Routed) -> (u16, Value) + Send + 'static,
) -> (kube::Client, Routes) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut watches = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            if query.split('&').any(|q| q == "watch=true") {
                watches.push(send);
                continue;
            }
            let bytes = req.into_body().collect().await.expect("the request body").to_bytes();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("a JSON request body")
            };
            let (status, reply) = answer(&Routed {
                method,
                path,
                query,
                body,
            });
            send.send_response(
                Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).expect("a JSON answer")))
                    .expect("a response"),
            );
        }
    });
    (kube::Client::new(service, namespace), Routes { server })
}

impl Routes {
    /// Stops serving; panics (failing the test) with the handler's panic if it
    /// met a call it did not expect.
    pub async fn finish(self) {
        self.server.abort();
        if let Err(e) = self.server.await
            && let Ok(panic) = e.try_into_panic()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PATH: &str = "/api/v1/namespaces/default/configmaps/x";

    fn config_map() -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "default"}})
    }

    async fn get(client: &kube::Client) -> Result<k8s_openapi::api::core::v1::ConfigMap, kube::Error> {
        kube::Api::default_namespaced(client.clone()).get("x").await
    }

    #[tokio::test]
    async fn a_played_script_finishes() {
        let (client, script) = serve(vec![Call::new(Method::GET, PATH, 200, config_map())], "default");
        assert_eq!(get(&client).await.unwrap().metadata.name.as_deref(), Some("x"));
        script.finish().await;
    }

    #[tokio::test]
    #[should_panic(expected = "unexpected call")]
    async fn a_call_beyond_the_script_fails() {
        let (client, script) = serve(vec![], "default");
        let _pending = tokio::spawn(async move { get(&client).await });
        script.finish().await;
    }

    #[tokio::test]
    #[should_panic(expected = "call 0")]
    async fn a_call_to_another_path_fails() {
        let (client, script) = serve(vec![Call::new(Method::GET, "/api/v1/pods", 200, json!({}))], "default");
        let _pending = tokio::spawn(async move { get(&client).await });
        script.finish().await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "never came")]
    async fn a_scripted_call_that_never_comes_fails() {
        let (_client, script) = serve(vec![Call::new(Method::GET, PATH, 200, config_map())], "default");
        script.finish().await;
    }

    #[tokio::test]
    async fn checks_see_the_body_and_answers_the_position() {
        let (client, script) = serve(
            vec![
                Call::new(Method::POST, "/api/v1/namespaces/default/configmaps", 201, Value::Null)
                    .check_request(|sent| {
                        assert_eq!(sent.content_type.as_deref(), Some("application/json"));
                        assert_eq!(sent.body["metadata"]["name"], "x");
                    })
                    .answer_with(|i, sent| {
                        let mut stored = sent.clone();
                        stored["metadata"]["resourceVersion"] = json!(format!("{i}00"));
                        stored
                    }),
            ],
            "default",
        );
        let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(config_map()).unwrap();
        let created = kube::Api::default_namespaced(client)
            .create(&Default::default(), &cm)
            .await
            .unwrap();
        assert_eq!(created.metadata.resource_version.as_deref(), Some("000"));
        script.finish().await;
    }

    #[tokio::test]
    async fn routes_answer_by_path_and_hold_watches() {
        let (client, routes) = route("default", |call| match (call.method.as_str(), call.path.as_str()) {
            ("GET", PATH) => (200, config_map()),
            _ => panic!("unexpected call {} {}", call.method, call.path),
        });
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::default_namespaced(client.clone());
        let params = kube::api::WatchParams::default();
        let watch = api.watch(&params, "0");
        let held = tokio::time::timeout(Duration::from_millis(200), watch).await;
        assert!(held.is_err(), "a watch was answered");
        assert_eq!(get(&client).await.unwrap().metadata.name.as_deref(), Some("x"));
        routes.finish().await;
    }

    #[tokio::test]
    #[should_panic(expected = "unexpected call")]
    async fn a_call_the_routes_do_not_expect_fails() {
        let (client, routes) = route("default", |call| {
            panic!("unexpected call {} {}", call.method, call.path)
        });
        let _ = get(&client).await;
        routes.finish().await;
    }
}

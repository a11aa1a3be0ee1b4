//! The AdmissionReview tether sends back, as the API server reads it.
//!
//! kube-core's `Serialize` writes `response.patch` (Go's `[]byte`) as a JSON array
//! of numbers, which the API server's decoder accepts but which is four times the
//! size of the base64 string Go itself writes. A patch of ~500 bytes became
//! ~1.9 KB of digits to format, encrypt and send for every pod. This writes the
//! same document with the patch as base64, the encoding of the AdmissionReview
//! API; everything else is kube-core's own serialization of its types.

use base64::Engine;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionResponse, AdmissionReview};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// `review` as the JSON body of an answer. Fails only if a field cannot be
/// serialized (never for the types admission builds).
pub fn to_vec(review: &AdmissionReview<DynamicObject>) -> serde_json::Result<Vec<u8>> {
    match (&review.request, &review.response) {
        // Every answer tether sends: written through the same template as a
        // cached one, so both come out in the same bytes.
        (None, Some(response)) if review.types == response.types => Ok(Template::new(response)?.answer(&response.uid)),
        _ => {
            let mut out = Vec::with_capacity(256);
            serde_json::to_writer(&mut out, &Review(review))?;
            Ok(out)
        }
    }
}

/// The JSON patch in an answer as [`to_vec`] writes it (`response.patch` in
/// base64), decoded as the API server decodes it; `None` when the answer has
/// none. For the tools and tests that read answers back; fails with what is
/// wrong when `answer` is not such an answer.
pub fn patch_of(answer: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let review: serde_json::Value =
        serde_json::from_slice(answer).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let Some(response) = review.get("response").filter(|r| r.is_object()) else {
        return Err("the answer has no response".into());
    };
    match response.get("patch") {
        None => Ok(None),
        Some(serde_json::Value::String(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map(Some)
            .map_err(|e| format!("response.patch is not base64: {e}")),
        Some(other) => Err(format!("response.patch is not a base64 string: {other}")),
    }
}

/// An answer written once, apart from the uid of the request it answers.
///
/// Every Pod created from one template gets the same answer but for the uid
/// (the decision cache keeps its result per template): the bytes are kept here,
/// and [`Template::answer`] writes the uid into a copy. Building kube-core's
/// response, cloning the patch and annotations into it and serializing it again
/// for each pod cost little in a loop but 2-3 µs of server CPU per cached
/// admission under load (bench/README.md, 6 December), where the memory a
/// request touches is what costs.
///
/// Guarantees: `Template::new(response).answer(uid)` equals the bytes of
/// `response.into_review()` with `uid` as its uid, as [`to_vec`] writes them
/// (kube-core's serialization with the patch in base64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The whole answer without the uid's JSON string.
    bytes: Vec<u8>,
    /// Where the uid goes.
    uid_at: usize,
}

impl Template {
    /// The answer `response` gives (its `uid` is not kept). Fails only if a
    /// field cannot be serialized.
    pub fn new(response: &AdmissionResponse) -> serde_json::Result<Template> {
        let patch = response.patch.as_ref().map_or(0, |p| p.len().div_ceil(3) * 4);
        let audit: usize = response
            .audit_annotations
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum();
        let mut bytes = Vec::with_capacity(256 + patch + audit);
        bytes.extend_from_slice(b"{\"apiVersion\":");
        serde_json::to_writer(&mut bytes, &response.types.api_version)?;
        bytes.extend_from_slice(b",\"kind\":");
        serde_json::to_writer(&mut bytes, &response.types.kind)?;
        bytes.extend_from_slice(b",\"response\":{\"uid\":");
        let uid_at = bytes.len();
        // The other fields as a map of their own, whose opening brace becomes
        // the comma after the uid; then the review's closing brace.
        serde_json::to_writer(&mut bytes, &Rest(response))?;
        bytes[uid_at] = b',';
        bytes.push(b'}');
        Ok(Template { bytes, uid_at })
    }

    /// The answer to the request `uid`.
    pub fn answer(&self, uid: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + uid.len() + 8);
        out.extend_from_slice(&self.bytes[..self.uid_at]);
        // Writing a `&str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut out, uid);
        out.extend_from_slice(&self.bytes[self.uid_at..]);
        out
    }
}

/// `patch` in base64 as a JSON string, written as it is: base64 never needs a
/// JSON escape, and serde_json's escaping pass over ~700 bytes of it took
/// ~0.5 µs of every patched answer.
fn base64_string(patch: &[u8]) -> serde_json::Result<Box<serde_json::value::RawValue>> {
    let mut quoted = String::with_capacity(patch.len().div_ceil(3) * 4 + 2);
    quoted.push('"');
    base64::engine::general_purpose::STANDARD.encode_string(patch, &mut quoted);
    quoted.push('"');
    serde_json::value::RawValue::from_string(quoted)
}

struct Review<'a>(&'a AdmissionReview<DynamicObject>);

impl Serialize for Review<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("apiVersion", &self.0.types.api_version)?;
        m.serialize_entry("kind", &self.0.types.kind)?;
        if let Some(request) = &self.0.request {
            m.serialize_entry("request", request)?;
        }
        if let Some(response) = &self.0.response {
            m.serialize_entry("response", &Response(response))?;
        }
        m.end()
    }
}

struct Response<'a>(&'a AdmissionResponse);

impl Serialize for Response<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("uid", &self.0.uid)?;
        Rest(self.0).entries(&mut m)?;
        m.end()
    }
}

/// The response's fields after its uid.
struct Rest<'a>(&'a AdmissionResponse);

impl Rest<'_> {
    fn entries<M: SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        let r = self.0;
        m.serialize_entry("allowed", &r.allowed)?;
        m.serialize_entry("status", &r.result)?;
        if let Some(patch) = &r.patch {
            let patch = base64_string(patch).map_err(serde::ser::Error::custom)?;
            m.serialize_entry("patch", &patch)?;
            // `with_patch`, the only way kube-core sets a patch, sets this type.
            m.serialize_entry("patchType", "JSONPatch")?;
        }
        if !r.audit_annotations.is_empty() {
            // Sorted by key, as Go's encoder writes maps: kube-core keeps them
            // in a `HashMap`, whose order changes from one map to the next, so
            // the same answer came out in different bytes.
            let sorted: std::collections::BTreeMap<&str, &str> = r
                .audit_annotations
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            m.serialize_entry("auditAnnotations", &sorted)?;
        }
        if let Some(warnings) = &r.warnings {
            m.serialize_entry("warnings", warnings)?;
        }
        Ok(())
    }
}

impl Serialize for Rest<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        self.entries(&mut m)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use json_patch::{AddOperation, Patch, PatchOperation};
    use kube::core::admission::AdmissionRequest;
    use serde_json::{Value, json};

    fn request() -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "userInfo": {"username": "u"}
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    /// Regression guard: the body is kube-core's own serialization, field for
    /// field, except that the patch is base64 — so a kube-core upgrade that adds
    /// a response field shows up here.
    #[test]
    fn the_answer_is_kube_cores_with_a_base64_patch() {
        let add = |path: &str| {
            PatchOperation::Add(AddOperation {
                path: path.parse().unwrap(),
                value: json!({"type": "Localhost", "localhostProfile": "tether/a/b/c/d-0123456789ab.json"}),
            })
        };
        let mut patched = AdmissionResponse::from(&request())
            .with_patch(Patch(vec![add("/spec/containers/0/securityContext/seccompProfile")]))
            .unwrap();
        patched
            .audit_annotations
            .insert("injected".into(), "d=0123456789ab".into());
        patched.warnings = Some(vec!["w".into()]);
        let denied = AdmissionResponse::from(&request()).deny("tether: no");
        let plain = AdmissionResponse::from(&request());
        for res in [patched, denied, plain] {
            let review = res.into_review();
            let ours: Value = serde_json::from_slice(&to_vec(&review).unwrap()).unwrap();
            let mut theirs = serde_json::to_value(&review).unwrap();
            if let Some(bytes) = theirs["response"]["patch"].as_array() {
                let bytes: Vec<u8> = bytes.iter().map(|b| b.as_u64().unwrap() as u8).collect();
                let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
                assert_eq!(ours["response"]["patch"], json!(b64));
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(ours["response"]["patch"].as_str().unwrap())
                    .unwrap();
                let ops: Value = serde_json::from_slice(&decoded).unwrap();
                assert_eq!(ops[0]["op"], "add");
                theirs["response"]["patch"] = json!(b64);
            }
            assert_eq!(ours, theirs);
        }
    }

    /// Regression guard: a cached answer (a template given the uid) is the
    /// same bytes as the answer serialized whole, whatever the uid holds.
    #[test]
    fn a_template_given_the_uid_is_the_answer_serialized_whole() {
        let mut patched = AdmissionResponse::from(&request())
            .with_patch(Patch(vec![PatchOperation::Add(AddOperation {
                path: "/metadata/annotations".parse().unwrap(),
                value: json!({"a/b": "c~d"}),
            })]))
            .unwrap();
        patched.audit_annotations.insert("injected".into(), "app=1".into());
        patched.audit_annotations.insert("fallback".into(), "x \"y\"".into());
        patched.warnings = Some(vec!["one".into(), "two\n".into()]);
        let denied = AdmissionResponse::from(&request()).deny("tether: no");
        let plain = AdmissionResponse::from(&request());
        for res in [patched, denied, plain] {
            let template = Template::new(&res).unwrap();
            for uid in ["705ab4f5-6393-11e8-b7cc-42010a800002", "", "a\"b\\c\u{1}é"] {
                let mut res = res.clone();
                res.uid = uid.into();
                let review = res.into_review();
                let whole = serde_json::to_vec(&Review(&review)).unwrap();
                assert_eq!(
                    String::from_utf8(template.answer(uid)).unwrap(),
                    String::from_utf8(whole).unwrap()
                );
                assert_eq!(to_vec(&review).unwrap(), template.answer(uid));
            }
        }
    }

    #[test]
    fn audit_annotations_are_written_in_key_order() {
        let mut res = AdmissionResponse::from(&request());
        for k in ["injected", "dry-run", "fallback", "exempted", "denied"] {
            res.audit_annotations.insert(k.into(), format!("{k}!"));
        }
        let text = String::from_utf8(to_vec(&res.into_review()).unwrap()).unwrap();
        assert!(
            text.contains(r#""auditAnnotations":{"denied":"denied!","dry-run":"dry-run!","exempted":"exempted!","fallback":"fallback!","injected":"injected!"}"#),
            "{text}"
        );
    }
}

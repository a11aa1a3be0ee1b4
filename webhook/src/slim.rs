//! Reads an AdmissionReview once, keeping only what admission looks at.
//!
//! Parsing a real Pod into `serde_json::Value` and then into k8s-openapi's `Pod`
//! cost ~36 µs per request, most of it allocating fields tether never reads
//! (`managedFields`, env, volumes, probes...). Here the envelope is read with the
//! object left as a borrowed slice of the body, and a Pod CREATE's object is read
//! into the few fields that decide and patch use, then handed over as a k8s-openapi
//! `Pod` holding only those fields. The API server has already decoded the object
//! into its own types, so the fields skipped here are well-formed in any real
//! request; a field tether reads with the wrong type is still an error.

use k8s_openapi::api::core::v1::{Container, Pod, PodSecurityContext, PodSpec, SeccompProfile, SecurityContext};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::admission::{AdmissionRequest, Operation};
use kube::core::{GroupVersionKind, GroupVersionResource, TypeMeta};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The AdmissionReview's outer fields and its request, read in one pass; `O` is
/// how the object is read: [`SlimPod`] or `IgnoredAny`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Envelope<'a, O> {
    #[serde(default, borrow)]
    pub api_version: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub kind: Option<Cow<'a, str>>,
    pub request: Option<Request<O>>,
}

/// The request's fields, as kube-core's `AdmissionRequest` reads them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
pub(crate) struct Request<O> {
    uid: String,
    kind: GroupVersionKind,
    resource: GroupVersionResource,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    operation: Operation,
    #[serde(default)]
    dry_run: bool,
    #[serde(default = "no_object", deserialize_with = "map_only")]
    object: Option<O>,
}

/// A request without an object (DELETE, CONNECT).
fn no_object<O>() -> Option<O> {
    None
}

/// Reads the object only from a JSON object (or null): serde's derived structs
/// also accept an array, taking fields by position, so `"object": []` read as an
/// empty Pod and was allowed untouched. No API server sends that; it is refused.
fn map_only<'de, D, O>(d: D) -> Result<Option<O>, D::Error>
where
    D: serde::Deserializer<'de>,
    O: Deserialize<'de>,
{
    struct MapOnly<O>(std::marker::PhantomData<O>);
    impl<'de, O: Deserialize<'de>> serde::de::Visitor<'de> for MapOnly<O> {
        type Value = Option<O>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object (a JSON map) or null")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            O::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_option(MapOnly(std::marker::PhantomData))
}

impl<O> Request<O> {
    /// Whether tether acts on this request: a Pod CREATE that is not a subresource.
    pub fn is_pod_create(&self) -> bool {
        self.kind.group.is_empty()
            && self.kind.kind == "Pod"
            && self.operation == Operation::Create
            && self.sub_resource.as_deref().unwrap_or_default().is_empty()
    }

    /// kube-core's request (without its object, which is returned beside it as
    /// read), so answers start from `AdmissionResponse::from(&request)` and keep
    /// the uid.
    pub fn into_request<T: kube::Resource>(self) -> (AdmissionRequest<T>, Option<O>) {
        let own = self.object;
        let request = AdmissionRequest {
            types: TypeMeta {
                api_version: "admission.k8s.io/v1".into(),
                kind: "AdmissionReview".into(),
            },
            uid: self.uid,
            kind: self.kind,
            resource: self.resource,
            sub_resource: self.sub_resource,
            request_kind: None,
            request_resource: None,
            request_sub_resource: None,
            name: self.name,
            namespace: self.namespace,
            operation: self.operation,
            user_info: Default::default(),
            object: None,
            old_object: None,
            dry_run: self.dry_run,
            options: None,
        };
        (request, own)
    }
}

/// A Pod as admission reads it; converted into a k8s-openapi `Pod` holding only
/// these fields.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SlimPod {
    #[serde(default)]
    metadata: SlimMeta,
    #[serde(default)]
    spec: Option<SlimSpec>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SlimMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    generate_name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    owner_references: Option<Vec<SlimOwner>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimOwner {
    #[serde(default)]
    api_version: String,
    kind: String,
    name: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    controller: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimSpec {
    #[serde(default)]
    containers: Vec<SlimContainer>,
    #[serde(default)]
    init_containers: Option<Vec<SlimContainer>>,
    #[serde(default)]
    security_context: Option<SlimSecurityContext>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimContainer {
    name: String,
    #[serde(default)]
    security_context: Option<SlimSecurityContext>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimSecurityContext {
    #[serde(default)]
    seccomp_profile: Option<SeccompProfile>,
}

impl From<SlimContainer> for Container {
    fn from(c: SlimContainer) -> Container {
        Container {
            name: c.name,
            // Only presence and the profile matter: the patch adds to an existing
            // securityContext and creates an absent one.
            security_context: c.security_context.map(|sc| SecurityContext {
                seccomp_profile: sc.seccomp_profile,
                ..SecurityContext::default()
            }),
            ..Container::default()
        }
    }
}

impl From<SlimPod> for Pod {
    fn from(p: SlimPod) -> Pod {
        let m = p.metadata;
        Pod {
            metadata: ObjectMeta {
                name: m.name,
                generate_name: m.generate_name,
                namespace: m.namespace,
                labels: m.labels,
                annotations: m.annotations,
                owner_references: m.owner_references.map(|owners| {
                    owners
                        .into_iter()
                        .map(|o| OwnerReference {
                            api_version: o.api_version,
                            kind: o.kind,
                            name: o.name,
                            uid: o.uid,
                            controller: o.controller,
                            block_owner_deletion: None,
                        })
                        .collect()
                }),
                ..ObjectMeta::default()
            },
            spec: p.spec.map(|s| PodSpec {
                containers: s.containers.into_iter().map(Container::from).collect(),
                init_containers: s.init_containers.map(|l| l.into_iter().map(Container::from).collect()),
                security_context: s.security_context.map(|sc| PodSecurityContext {
                    seccomp_profile: sc.seccomp_profile,
                    ..PodSecurityContext::default()
                }),
                ..PodSpec::default()
            }),
            status: None,
        }
    }
}

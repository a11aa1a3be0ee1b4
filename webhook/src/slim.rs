//! Reads an AdmissionReview once, keeping only what admission looks at.
//!
//! Parsing a real Pod into `serde_json::Value` and then into k8s-openapi's `Pod`
//! cost ~36 µs per request, most of it allocating fields tether never reads
//! (`managedFields`, env, volumes, probes...). Here the envelope and the object
//! are read in one pass, the object into a [`PodView`]: the few fields that
//! decide and patch use, as strings borrowed from the body (a string is copied
//! only when it holds a JSON escape), everything else skipped. The API server has
//! already decoded the object into its own types, so the fields skipped here are
//! well-formed in any real request; a field tether reads with the wrong type is
//! still an error.

use k8s_openapi::api::core::v1::{Container, Pod, SeccompProfile};
use kube::core::admission::{AdmissionRequest, Operation};
use kube::core::{GroupVersionKind, GroupVersionResource, TypeMeta};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The AdmissionReview's outer fields and its request, read in one pass; `O` is
/// how the object is read: [`PodView`] or `IgnoredAny`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Envelope<'a, O> {
    #[serde(default, borrow)]
    pub api_version: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub request: Option<Request<'a, O>>,
}

/// The request's fields, as kube-core's `AdmissionRequest` reads them, its
/// strings borrowed from the body: a cached answer needs only the uid and the
/// namespace, and copying every field into kube-core's request for each pod
/// was a dozen allocations. [`Request::to_request`] builds that request where
/// an answer is made from it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "'de: 'a, O: Deserialize<'de>"))]
pub(crate) struct Request<'a, O> {
    #[serde(borrow)]
    pub uid: Str<'a>,
    #[serde(borrow)]
    kind: Gvk<'a>,
    #[serde(borrow)]
    resource: Gvr<'a>,
    #[serde(default, borrow)]
    sub_resource: Option<Str<'a>>,
    #[serde(default, borrow)]
    name: Str<'a>,
    #[serde(default, borrow)]
    namespace: Option<Str<'a>>,
    pub operation: Operation,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default = "no_object", deserialize_with = "map_only")]
    object: Option<O>,
}

/// A request without its object (taken out by [`Request::split`]).
pub(crate) type Head<'a> = Request<'a, ()>;

/// kube-core's `GroupVersionKind`, borrowed.
#[derive(Deserialize)]
struct Gvk<'a> {
    #[serde(borrow)]
    group: Str<'a>,
    #[serde(borrow)]
    version: Str<'a>,
    #[serde(borrow)]
    kind: Str<'a>,
}

/// kube-core's `GroupVersionResource`, borrowed.
#[derive(Deserialize)]
struct Gvr<'a> {
    #[serde(borrow)]
    group: Str<'a>,
    #[serde(borrow)]
    version: Str<'a>,
    #[serde(borrow)]
    resource: Str<'a>,
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

impl<'a, O> Request<'a, O> {
    /// Whether tether acts on this request: a Pod CREATE that is not a subresource.
    pub fn is_pod_create(&self) -> bool {
        self.kind.group.is_empty()
            && self.kind.kind.as_str() == "Pod"
            && self.operation == Operation::Create
            && self.sub_resource.as_deref().unwrap_or_default().is_empty()
    }

    /// The request without its object, and the object as read.
    pub fn split(self) -> (Head<'a>, Option<O>) {
        let head = Request {
            uid: self.uid,
            kind: self.kind,
            resource: self.resource,
            sub_resource: self.sub_resource,
            name: self.name,
            namespace: self.namespace,
            operation: self.operation,
            dry_run: self.dry_run,
            object: None,
        };
        (head, self.object)
    }

    /// The request's namespace (empty for a cluster-scoped object).
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    /// kube-core's request (without the object), so answers start from
    /// `AdmissionResponse::from(&request)` and keep the uid.
    pub fn to_request<T: kube::Resource>(&self) -> AdmissionRequest<T> {
        let owned = |s: &Str<'_>| s.as_str().to_owned();
        AdmissionRequest {
            types: TypeMeta {
                api_version: "admission.k8s.io/v1".into(),
                kind: "AdmissionReview".into(),
            },
            uid: owned(&self.uid),
            kind: GroupVersionKind::gvk(&self.kind.group, &self.kind.version, &self.kind.kind),
            resource: GroupVersionResource::gvr(&self.resource.group, &self.resource.version, &self.resource.resource),
            sub_resource: self.sub_resource.as_ref().map(owned),
            request_kind: None,
            request_resource: None,
            request_sub_resource: None,
            name: owned(&self.name),
            namespace: self.namespace.as_ref().map(owned),
            operation: self.operation.clone(),
            user_info: Default::default(),
            object: None,
            old_object: None,
            dry_run: self.dry_run,
            options: None,
        }
    }
}

/// A string of the request: borrowed from the body unless it holds an escape.
///
/// serde's own `Cow<str>` always copies inside an `Option`, a map or a `Vec`;
/// this one borrows wherever serde_json can lend the bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Str<'a>(pub Cow<'a, str>);

impl Str<'_> {
    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Str<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'a> From<&'a str> for Str<'a> {
    fn from(s: &'a str) -> Str<'a> {
        Str(Cow::Borrowed(s))
    }
}

impl std::fmt::Display for Str<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Str<'a>, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s)))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// String-to-string map of the pod (labels, annotations).
pub type StrMap<'a> = BTreeMap<Str<'a>, Str<'a>>;

/// A Pod as admission reads it: what [`crate::decide`] and [`crate::patch`] use
/// and nothing else. Read from a request body (borrowing from it), or made from a
/// k8s-openapi `Pod` ([`PodView::of`]) by code that already holds one.
#[derive(Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView<'a> {
    /// The metadata fields admission reads.
    #[serde(default, borrow)]
    pub metadata: MetaView<'a>,
    /// The spec fields admission reads.
    #[serde(default, borrow)]
    pub spec: Option<SpecView<'a>>,
}

/// `metadata`, as admission reads it.
#[derive(Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView<'a> {
    /// `name` (absent for pods created from `generateName`).
    #[serde(default, borrow)]
    pub name: Option<Str<'a>>,
    /// `generateName`.
    #[serde(default, borrow)]
    pub generate_name: Option<Str<'a>>,
    /// `namespace` (often absent: the request has it).
    #[serde(default, borrow)]
    pub namespace: Option<Str<'a>>,
    /// `labels`.
    #[serde(default, borrow)]
    pub labels: Option<StrMap<'a>>,
    /// `annotations`.
    #[serde(default, borrow)]
    pub annotations: Option<StrMap<'a>>,
    /// `ownerReferences`.
    #[serde(default, borrow)]
    pub owner_references: Option<Vec<OwnerView<'a>>>,
}

/// An ownerReference, as admission reads it.
#[derive(Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerView<'a> {
    /// `kind`.
    #[serde(borrow)]
    pub kind: Str<'a>,
    /// `name`.
    #[serde(borrow)]
    pub name: Str<'a>,
    /// `controller`.
    #[serde(default)]
    pub controller: Option<bool>,
}

/// `spec`, as admission reads it.
#[derive(Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView<'a> {
    /// `containers`.
    #[serde(default, borrow)]
    pub containers: Vec<ContainerView<'a>>,
    /// `initContainers`.
    #[serde(default, borrow)]
    pub init_containers: Option<Vec<ContainerView<'a>>>,
    /// The pod-level `securityContext`.
    #[serde(default, borrow)]
    pub security_context: Option<SecurityContextView<'a>>,
}

/// A container (or init container), as admission reads it.
#[derive(Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView<'a> {
    /// `name`.
    #[serde(borrow)]
    pub name: Str<'a>,
    /// `securityContext`: only whether it is there, and its profile, matter (the
    /// patch adds to an existing one and creates an absent one).
    #[serde(default, borrow)]
    pub security_context: Option<SecurityContextView<'a>>,
}

/// A `securityContext` (pod or container), as admission reads it.
#[derive(Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContextView<'a> {
    /// `seccompProfile`.
    #[serde(default, borrow)]
    pub seccomp_profile: Option<ProfileView<'a>>,
}

/// A `seccompProfile`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileView<'a> {
    /// `type`: `Localhost`, `RuntimeDefault` or `Unconfined`.
    #[serde(rename = "type", borrow)]
    pub type_: Str<'a>,
    /// `localhostProfile`.
    #[serde(default, borrow)]
    pub localhost_profile: Option<Str<'a>>,
}

fn borrowed(s: &Option<String>) -> Option<Str<'_>> {
    s.as_deref().map(Str::from)
}

fn borrowed_map(m: &Option<BTreeMap<String, String>>) -> Option<StrMap<'_>> {
    m.as_ref().map(|m| {
        m.iter()
            .map(|(k, v)| (Str::from(k.as_str()), Str::from(v.as_str())))
            .collect()
    })
}

fn profile_of(p: &SeccompProfile) -> ProfileView<'_> {
    ProfileView {
        type_: Str::from(p.type_.as_str()),
        localhost_profile: borrowed(&p.localhost_profile),
    }
}

fn container_of(c: &Container) -> ContainerView<'_> {
    ContainerView {
        name: Str::from(c.name.as_str()),
        security_context: c.security_context.as_ref().map(|sc| SecurityContextView {
            seccomp_profile: sc.seccomp_profile.as_ref().map(profile_of),
        }),
    }
}

impl<'a> PodView<'a> {
    /// The view of a k8s-openapi `Pod`, borrowing its strings (for code that
    /// reads pods from the API, such as the crash watcher).
    pub fn of(pod: &'a Pod) -> PodView<'a> {
        let m = &pod.metadata;
        PodView {
            metadata: MetaView {
                name: borrowed(&m.name),
                generate_name: borrowed(&m.generate_name),
                namespace: borrowed(&m.namespace),
                labels: borrowed_map(&m.labels),
                annotations: borrowed_map(&m.annotations),
                owner_references: m.owner_references.as_ref().map(|owners| {
                    owners
                        .iter()
                        .map(|o| OwnerView {
                            kind: Str::from(o.kind.as_str()),
                            name: Str::from(o.name.as_str()),
                            controller: o.controller,
                        })
                        .collect()
                }),
            },
            spec: pod.spec.as_ref().map(|s| SpecView {
                containers: s.containers.iter().map(container_of).collect(),
                init_containers: s.init_containers.as_ref().map(|l| l.iter().map(container_of).collect()),
                security_context: s.security_context.as_ref().map(|sc| SecurityContextView {
                    seccomp_profile: sc.seccomp_profile.as_ref().map(profile_of),
                }),
            }),
        }
    }
}

/// Bytes a view's strings and containers are counted at beyond their text:
/// what a copy allocates around each (a rough, deliberately high figure).
const OVERHEAD: usize = 48;

impl Str<'_> {
    /// The string, owned (for keeping past the request body).
    pub fn to_static(&self) -> Str<'static> {
        Str(Cow::Owned(self.0.as_ref().to_owned()))
    }
}

fn map_to_static(m: &StrMap<'_>) -> StrMap<'static> {
    m.iter().map(|(k, v)| (k.to_static(), v.to_static())).collect()
}

fn map_weight(m: &StrMap<'_>) -> usize {
    m.iter().map(|(k, v)| k.len() + v.len() + 2 * OVERHEAD).sum()
}

impl ProfileView<'_> {
    fn to_static(&self) -> ProfileView<'static> {
        ProfileView {
            type_: self.type_.to_static(),
            localhost_profile: self.localhost_profile.as_ref().map(Str::to_static),
        }
    }

    fn weight(&self) -> usize {
        self.type_.len() + self.localhost_profile.as_ref().map_or(0, |p| p.len()) + 2 * OVERHEAD
    }
}

impl SecurityContextView<'_> {
    fn to_static(&self) -> SecurityContextView<'static> {
        SecurityContextView {
            seccomp_profile: self.seccomp_profile.as_ref().map(ProfileView::to_static),
        }
    }

    fn weight(&self) -> usize {
        OVERHEAD + self.seccomp_profile.as_ref().map_or(0, ProfileView::weight)
    }
}

impl ContainerView<'_> {
    fn to_static(&self) -> ContainerView<'static> {
        ContainerView {
            name: self.name.to_static(),
            security_context: self.security_context.as_ref().map(SecurityContextView::to_static),
        }
    }

    fn weight(&self) -> usize {
        self.name.len() + OVERHEAD + self.security_context.as_ref().map_or(0, SecurityContextView::weight)
    }
}

impl PodView<'_> {
    /// The same view with its strings owned: to keep it after the request body
    /// is gone (the decision cache keeps views as keys).
    pub fn to_static(&self) -> PodView<'static> {
        let m = &self.metadata;
        PodView {
            metadata: MetaView {
                name: m.name.as_ref().map(Str::to_static),
                generate_name: m.generate_name.as_ref().map(Str::to_static),
                namespace: m.namespace.as_ref().map(Str::to_static),
                labels: m.labels.as_ref().map(map_to_static),
                annotations: m.annotations.as_ref().map(map_to_static),
                owner_references: m.owner_references.as_ref().map(|owners| {
                    owners
                        .iter()
                        .map(|o| OwnerView {
                            kind: o.kind.to_static(),
                            name: o.name.to_static(),
                            controller: o.controller,
                        })
                        .collect()
                }),
            },
            spec: self.spec.as_ref().map(|s| SpecView {
                containers: s.containers.iter().map(ContainerView::to_static).collect(),
                init_containers: s
                    .init_containers
                    .as_ref()
                    .map(|l| l.iter().map(ContainerView::to_static).collect()),
                security_context: s.security_context.as_ref().map(SecurityContextView::to_static),
            }),
        }
    }

    /// About how many bytes of memory [`PodView::to_static`]'s copy takes: its
    /// strings' lengths, plus a fixed allowance per string and container.
    pub fn weight(&self) -> usize {
        let m = &self.metadata;
        let text = |s: &Option<Str<'_>>| s.as_ref().map_or(0, |s| s.len() + OVERHEAD);
        let meta = text(&m.name)
            + text(&m.generate_name)
            + text(&m.namespace)
            + m.labels.as_ref().map_or(0, map_weight)
            + m.annotations.as_ref().map_or(0, map_weight)
            + m.owner_references.as_ref().map_or(0, |owners| {
                owners.iter().map(|o| o.kind.len() + o.name.len() + 3 * OVERHEAD).sum()
            });
        let spec = self.spec.as_ref().map_or(0, |s| {
            let containers: usize = s
                .containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .map(ContainerView::weight)
                .sum();
            containers + OVERHEAD + s.security_context.as_ref().map_or(0, SecurityContextView::weight)
        });
        OVERHEAD + meta + spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decide;
    use crate::index::Index;
    use crate::policy::Policy;
    use crate::tests::{entry, key, review};

    /// The point of [`Str`]: reading a pod copies no string that has no escape.
    #[test]
    fn strings_without_escapes_are_borrowed_from_the_body() {
        let body = br#"{"metadata":{"name":"web-0","labels":{"app":"web"},"annotations":{"a":"b"},
            "ownerReferences":[{"kind":"StatefulSet","name":"web","controller":true}]},
            "spec":{"containers":[{"name":"app","securityContext":{"seccompProfile":{"type":"Localhost","localhostProfile":"p.json"}}}]}}"#;
        let pod: PodView<'_> = serde_json::from_slice(body).unwrap();
        let m = &pod.metadata;
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let profile = c.security_context.as_ref().unwrap().seccomp_profile.as_ref().unwrap();
        let strs = [
            m.name.as_ref().unwrap(),
            m.labels.as_ref().unwrap().keys().next().unwrap(),
            m.annotations.as_ref().unwrap().values().next().unwrap(),
            &m.owner_references.as_ref().unwrap()[0].name,
            &c.name,
            &profile.type_,
            profile.localhost_profile.as_ref().unwrap(),
        ];
        for s in strs {
            assert!(matches!(s.0, Cow::Borrowed(_)), "{s} was copied");
        }
    }

    /// Escaped strings (Go escapes `<`, `>` and `&` as `\u003c`...) are read as
    /// written, and a lookup by the unescaped name finds them.
    #[test]
    fn escaped_strings_are_unescaped_and_found_by_their_value() {
        let body = br#"{"metadata":{"annotations":{"tether.dev\/exempt":"a \u0026 b\n"}},
            "spec":{"containers":[{"name":"c\u0031"}]}}"#;
        let pod: PodView<'_> = serde_json::from_slice(body).unwrap();
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.get("tether.dev/exempt").map(Str::as_str), Some("a & b\n"));
        assert_eq!(pod.spec.unwrap().containers[0].name.as_str(), "c1");
    }

    /// The crash watcher's view of a k8s-openapi `Pod` and admission's view of
    /// the same pod as JSON give the same decision, on every captured review.
    #[test]
    fn a_view_of_a_typed_pod_decides_as_the_view_read_from_json() {
        let index = Index::from_entries([
            (key("shop/deployment/checkout/migrate"), entry('a', None)),
            (key("shop/deployment/checkout/app"), entry('b', Some("crashed"))),
        ]);
        let policy = Policy::default();
        for rel in [
            "admission/01-pod-create-replicaset-owner-request-only.json",
            "admission/02-pod-create-replicaset-owner-v1-envelope.json",
            "admission/03-pod-create-2containers-2initcontainers-request-only.json",
            "admission/04-pod-create-kubectl-apply-full-envelope.json",
            "admission/apiserver-1.35/pod-create-bare-dryrun.json",
            "admission/apiserver-1.35/pod-create-bare-exemption-annotation.json",
            "admission/apiserver-1.35/pod-create-replicaset-initcontainers.json",
        ] {
            let object = review(rel)["request"]["object"].clone();
            let json = serde_json::to_vec(&object).unwrap();
            let read: PodView<'_> = serde_json::from_slice(&json).unwrap();
            let typed: Pod = serde_json::from_value(object).unwrap();
            let ns = policy.namespace("shop", None);
            let a = decide(&read, "shop", &ns, policy.on_missing, &index);
            let b = decide(&PodView::of(&typed), "shop", &ns, policy.on_missing, &index);
            assert!(!a.containers.is_empty(), "{rel}: no container read");
            assert_eq!(a, b, "{rel}");
        }
    }
}

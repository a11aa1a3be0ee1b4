//! Seccomp profile JSON -> `SeccompProfile`, as `FsStore::profile` reads a stored
//! version, and the canonical form round trip the version hash depends on: a
//! profile read back from its canonical bytes is the same profile, its canonical
//! bytes are the same bytes, and so its version is the same version.

use profile_store::{SeccompProfile, Version};

fn round_trip(p: &SeccompProfile) {
    let canonical = p.canonical_json();
    let back: SeccompProfile = match serde_json::from_slice(&canonical) {
        Ok(b) => b,
        Err(e) => panic!(
            "canonical JSON does not parse back: {e}\n{}",
            String::from_utf8_lossy(&canonical)
        ),
    };
    assert_eq!(&back, p, "the canonical JSON reads back as another profile");
    assert_eq!(back.canonical_json(), canonical, "canonical JSON is not a fixed point");
    let version = p.version();
    assert_eq!(version, Version::of(&canonical));
    match version.as_str().parse::<Version>() {
        Ok(parsed) => assert_eq!(parsed, version, "a version does not parse back as itself"),
        Err(e) => panic!("version {version} does not parse: {e}"),
    }
}

/// Parses `data` as a stored profile and checks the round trip.
pub fn fuzz_one(data: &[u8]) {
    let Ok(profile) = serde_json::from_slice::<SeccompProfile>(data) else {
        return;
    };
    round_trip(&profile);
    let log = profile.log_variant();
    round_trip(&log);
    assert_eq!(
        log.allowed(),
        profile.allowed(),
        "the Log variant allows other syscalls"
    );
}

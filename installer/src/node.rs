//! The file-system shell: the node's `<kubelet-root>/seccomp/tether/` tree.
//!
//! Files are written atomically (temporary file, fsync, rename, directory fsync)
//! and never rewritten: a version's file is content-addressed, and a container
//! that restarts must find the profile it started with. Every path is derived
//! from a validated `localhostProfile`, so nothing outside `seccomp/tether/` is
//! ever written or removed.

use profile_store::store::{NodeFile, localhost_profile, parse_localhost_profile, write_atomic};
use profile_store::{StoreError, Version};
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Why a file on the node could not be installed, checked or removed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A file or directory could not be read, written or removed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing a new file failed.
    #[error(transparent)]
    Write(#[from] StoreError),
    /// A path that is not a tether `localhostProfile` (this is a bug in the
    /// caller: the installer touches nothing else).
    #[error(
        "`{0}` is not a tether localhostProfile (tether/<ns>/<kind>/<name>/<container>-<version>.json); refusing to touch it"
    )]
    NotTether(String),
    /// The bytes to write do not hash to the version their path names.
    #[error("refusing to write {path}: its content hashes to {actual}, not to the version in its name")]
    WrongContent {
        /// The `localhostProfile`.
        path: String,
        /// What the content hashes to.
        actual: Version,
    },
    /// A directory on the way to a file is a symlink or not a directory: writing
    /// or removing through it could reach outside `seccomp/tether/`.
    #[error(
        "{path} is a symlink or not a directory; tether writes only into real directories under seccomp/tether/: remove it and the installer recreates the directory"
    )]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// A file on the node does not hash to the version in its name: someone
    /// altered it. It is not rewritten (a running container may have been started
    /// with it) and not reported as installed.
    #[error(
        "{path} does not hash to its version {version} (it hashes to {actual}): the file on this node was altered; remove it by hand and the installer writes it again"
    )]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The version in its name.
        version: Version,
        /// What its content hashes to.
        actual: Version,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`NodeDir::install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The file was written.
    Written,
    /// An intact file was already there.
    Present,
}

/// What [`NodeDir::scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// `localhostProfile`s whose files hash to their version.
    pub verified: BTreeSet<String>,
    /// Files that do not hash to their version (never reported as installed).
    pub mismatched: Vec<NodeError>,
    /// Their `localhostProfile`s.
    pub altered: BTreeSet<String>,
    /// Entries under `tether/` that are not version files (temporary files of an
    /// interrupted write, symlinks, files someone else put there): left alone.
    pub ignored: usize,
}

/// Files already verified, by `localhostProfile`, with the inode, size and
/// modification time they had: a pass re-reads only files that changed, not
/// every version on the node every heartbeat.
#[derive(Debug, Default)]
pub struct Verified(HashMap<String, (u64, u64, i64, i64)>);

fn stamp(m: &fs::Metadata) -> (u64, u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

/// The kubelet's seccomp root of this node.
#[derive(Debug, Clone)]
pub struct NodeDir {
    seccomp: PathBuf,
}

impl NodeDir {
    /// The seccomp root under `kubelet_root` (`<kubelet-root>/seccomp`), where
    /// `localhostProfile` paths are resolved.
    pub fn new(kubelet_root: &Path) -> NodeDir {
        NodeDir {
            seccomp: kubelet_root.join("seccomp"),
        }
    }

    /// The directory tether owns: `<kubelet-root>/seccomp/tether`.
    pub fn tether_root(&self) -> PathBuf {
        self.seccomp.join("tether")
    }

    /// The file of `localhost`, which must be exactly a path
    /// [`localhost_profile`] produces (validated components, no `..`).
    pub fn path_of(&self, localhost: &str) -> Result<(PathBuf, Version), NodeError> {
        let not_tether = || NodeError::NotTether(localhost.to_string());
        let (key, version) = parse_localhost_profile(localhost).ok_or_else(not_tether)?;
        // Parsing is lenient about nothing, but only the canonical spelling is ours.
        if localhost_profile(&key, &version) != localhost {
            return Err(not_tether());
        }
        Ok((self.seccomp.join(localhost), version))
    }

    /// Checks that every existing directory from `tether/` down to `path`'s
    /// parent is a real directory, not a symlink (which `create_dir_all`, the
    /// rename and `remove_file` would follow).
    fn real_dirs(&self, path: &Path) -> Result<(), NodeError> {
        let root = self.tether_root();
        let rel = path
            .parent()
            .and_then(|p| p.strip_prefix(&root).ok())
            .unwrap_or(Path::new(""));
        let mut dir = root.clone();
        let below = rel.components().map(|c| {
            dir.push(c);
            dir.clone()
        });
        for d in std::iter::once(root.clone()).chain(below) {
            match fs::symlink_metadata(&d) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(NodeError::NotADirectory { path: d }),
                // The rest is created by the write.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err(&d)(e)),
            }
        }
        Ok(())
    }

    /// Writes `file` unless it is already there. An existing file is verified,
    /// never rewritten: a mismatch is an error.
    pub fn install(&self, file: &NodeFile) -> Result<Installed, NodeError> {
        let (path, version) = self.path_of(&file.localhost_profile)?;
        let actual = Version::of(&file.bytes);
        if actual != version {
            return Err(NodeError::WrongContent {
                path: file.localhost_profile.clone(),
                actual,
            });
        }
        self.real_dirs(&path)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => {
                verify(&path, &version)?;
                Ok(Installed::Present)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&path, &file.bytes)?;
                Ok(Installed::Written)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Every version file under `tether/`, verified against its name (files
    /// `cache` vouches for unchanged are not read again). Symlinks are not
    /// followed.
    pub fn scan(&self, cache: &mut Verified) -> Result<Scan, NodeError> {
        let mut scan = Scan::default();
        let mut seen = HashMap::new();
        let root = self.tether_root();
        // tether/<ns>/<kind>/<name>/<file>: three levels of directories.
        let mut dirs = vec![(root, String::from("tether"), 0)];
        while let Some((dir, rel, depth)) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound && depth == 0 => return Ok(scan),
                Err(e) => return Err(io_err(&dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                let kind = entry.file_type().map_err(io_err(&entry.path()))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    scan.ignored += 1;
                    continue;
                };
                let rel = format!("{rel}/{name}");
                if depth < 3 && kind.is_dir() {
                    dirs.push((entry.path(), rel, depth + 1));
                } else if depth == 3
                    && kind.is_file()
                    && let Ok((path, version)) = self.path_of(&rel)
                {
                    let now = entry.metadata().map(|m| stamp(&m)).map_err(io_err(&path))?;
                    if cache.0.get(&rel) == Some(&now) {
                        seen.insert(rel.clone(), now);
                        scan.verified.insert(rel);
                        continue;
                    }
                    match verify(&path, &version) {
                        Ok(()) => {
                            seen.insert(rel.clone(), now);
                            scan.verified.insert(rel);
                        }
                        Err(e @ NodeError::HashMismatch { .. }) => {
                            scan.altered.insert(rel);
                            scan.mismatched.push(e);
                        }
                        Err(e) => return Err(e),
                    }
                } else {
                    scan.ignored += 1;
                }
            }
        }
        cache.0 = seen;
        Ok(scan)
    }

    /// Removes the file of `localhost` (which must be a tether `localhostProfile`)
    /// and the directories it leaves empty, up to `tether/`.
    pub fn remove(&self, localhost: &str) -> Result<(), NodeError> {
        let (path, _) = self.path_of(localhost)?;
        self.real_dirs(&path)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let root = self.tether_root();
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| *d != root && d.starts_with(&root)) {
            // Fails on a directory that still holds files: that is the stop.
            if fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }
}

/// Checks that the file at `path` hashes to `version`.
fn verify(path: &Path, version: &Version) -> Result<(), NodeError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let actual = Version::of(&bytes);
    if &actual != version {
        return Err(NodeError::HashMismatch {
            path: path.to_path_buf(),
            version: version.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use profile_store::store::node_files;
    use profile_store::{SeccompProfile, WorkloadKey};
    use serde_json::json;

    fn files(calls: &[&str]) -> [NodeFile; 2] {
        let profile: SeccompProfile = serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": calls, "action": "SCMP_ACT_ALLOW"}]
        }))
        .unwrap();
        let key: WorkloadKey = "prod/deployment/api/app".parse().unwrap();
        node_files(&key, &profile)
    }

    #[test]
    fn installs_atomically_under_tether_and_never_rewrites() {
        let root = tempfile::tempdir().unwrap();
        let node = NodeDir::new(root.path());
        let [file, log] = files(&["read"]);
        assert_eq!(node.install(&file).unwrap(), Installed::Written);
        assert_eq!(node.install(&log).unwrap(), Installed::Written);
        let path = root.path().join("seccomp").join(&file.localhost_profile);
        assert_eq!(fs::read(&path).unwrap(), file.bytes);
        let dir = path.parent().unwrap();
        let leftovers: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        // A second install keeps the very same file (same inode: not replaced).
        use std::os::unix::fs::MetadataExt;
        let inode = fs::metadata(&path).unwrap().ino();
        assert_eq!(node.install(&file).unwrap(), Installed::Present);
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
        let scan = node.scan(&mut Verified::default()).unwrap();
        assert_eq!(
            scan.verified,
            BTreeSet::from([file.localhost_profile.clone(), log.localhost_profile.clone()])
        );
    }

    #[test]
    fn an_altered_file_is_reported_not_rewritten_and_not_installed() {
        let root = tempfile::tempdir().unwrap();
        let node = NodeDir::new(root.path());
        let [file, _] = files(&["read"]);
        node.install(&file).unwrap();
        let path = root.path().join("seccomp").join(&file.localhost_profile);
        fs::write(&path, b"{\"defaultAction\":\"SCMP_ACT_ALLOW\"}").unwrap();
        let err = node.install(&file).unwrap_err();
        assert!(matches!(err, NodeError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("altered"), "{err}");
        assert_eq!(
            fs::read(&path).unwrap(),
            b"{\"defaultAction\":\"SCMP_ACT_ALLOW\"}",
            "rewritten"
        );
        let scan = node.scan(&mut Verified::default()).unwrap();
        assert!(scan.verified.is_empty());
        assert_eq!(scan.mismatched.len(), 1);
    }

    #[test]
    fn content_that_does_not_match_its_name_is_never_written() {
        let root = tempfile::tempdir().unwrap();
        let node = NodeDir::new(root.path());
        let [mut file, _] = files(&["read"]);
        file.bytes = b"{}".to_vec();
        assert!(matches!(node.install(&file), Err(NodeError::WrongContent { .. })));
        assert!(!root.path().join("seccomp").join(&file.localhost_profile).exists());
    }

    #[test]
    fn nothing_outside_tether_is_touched() {
        let root = tempfile::tempdir().unwrap();
        let node = NodeDir::new(root.path());
        let outside = root.path().join("seccomp/other.json");
        fs::create_dir_all(outside.parent().unwrap()).unwrap();
        fs::write(&outside, b"x").unwrap();
        for bad in [
            "other.json",
            "tether/../other.json",
            "tether/prod/deployment/api/../../../../other.json",
            "/etc/passwd",
            "tether/prod/Deployment/api/app-0123456789ab.json",
            "tether/prod/deployment/api/app-0123456789ab.json/../x",
        ] {
            assert!(matches!(node.remove(bad), Err(NodeError::NotTether(_))), "{bad}");
        }
        assert!(outside.exists());
        // Foreign files under tether/ are ignored by the scan, so never collected.
        let [file, _] = files(&["read"]);
        node.install(&file).unwrap();
        let dir = root.path().join("seccomp/tether/prod/deployment/api");
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        fs::write(dir.join(".tmp-abc"), b"partial").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("app-0123456789ab.json")).unwrap();
        let scan = node.scan(&mut Verified::default()).unwrap();
        assert_eq!(scan.verified, BTreeSet::from([file.localhost_profile.clone()]));
        assert_eq!(scan.ignored, 3);
    }

    #[test]
    fn symlinked_directories_are_neither_written_through_nor_removed_through() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let node = NodeDir::new(root.path());
        let [file, _] = files(&["read"]);
        // tether/prod -> a directory outside.
        fs::create_dir_all(node.tether_root()).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), node.tether_root().join("prod")).unwrap();
        let err = node.install(&file).unwrap_err();
        assert!(matches!(err, NodeError::NotADirectory { .. }), "{err}");
        assert_eq!(
            fs::read_dir(elsewhere.path()).unwrap().count(),
            0,
            "written through the symlink"
        );
        // A file that happens to be there is not removed through it either.
        let victim = elsewhere.path().join("deployment/api");
        fs::create_dir_all(&victim).unwrap();
        let name = file.localhost_profile.rsplit('/').next().unwrap();
        fs::write(victim.join(name), &file.bytes).unwrap();
        assert!(
            node.scan(&mut Verified::default()).unwrap().verified.is_empty(),
            "the scan follows no symlink"
        );
        assert!(matches!(
            node.remove(&file.localhost_profile),
            Err(NodeError::NotADirectory { .. })
        ));
        assert!(victim.join(name).exists());
        // The tether root itself as a symlink.
        let root2 = tempfile::tempdir().unwrap();
        fs::create_dir_all(root2.path().join("seccomp")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root2.path().join("seccomp/tether")).unwrap();
        assert!(matches!(
            NodeDir::new(root2.path()).install(&file),
            Err(NodeError::NotADirectory { .. })
        ));
    }

    #[test]
    fn remove_deletes_the_file_and_empty_directories_up_to_tether() {
        let root = tempfile::tempdir().unwrap();
        let node = NodeDir::new(root.path());
        let [a, a_log] = files(&["read"]);
        node.install(&a).unwrap();
        node.install(&a_log).unwrap();
        node.remove(&a.localhost_profile).unwrap();
        assert!(
            root.path().join("seccomp/tether/prod/deployment/api").exists(),
            "still holds a_log"
        );
        node.remove(&a_log.localhost_profile).unwrap();
        assert!(!root.path().join("seccomp/tether/prod").exists());
        assert!(node.tether_root().exists(), "tether/ itself stays");
        // Removing what is gone is not an error (a restart after a partial GC).
        node.remove(&a.localhost_profile).unwrap();
    }
}

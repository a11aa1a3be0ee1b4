//! Syscall number <-> name tables per ABI, taken from the `syscalls` crate.
//!
//! Tetragon reports raw syscall numbers together with the ABI of the calling task;
//! strace and kprobe function names carry names. Both end up as kernel syscall
//! names, which is what an OCI seccomp profile lists.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A syscall ABI: the table a syscall number is looked up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Abi {
    /// x86-64 (Tetragon `x64`).
    X86_64,
    /// 32-bit x86, also the compat ABI of x86-64 nodes (Tetragon `i386`).
    I386,
    /// 64-bit Arm (Tetragon `arm64`).
    Aarch64,
    /// 32-bit Arm, also the compat ABI of arm64 nodes (Tetragon `arm32`).
    Arm,
}

/// Bit set in x86-64 syscall numbers made through the x32 ABI.
const X32_SYSCALL_BIT: u64 = 0x4000_0000;

impl Abi {
    /// Every ABI tether knows, in a stable order.
    pub const ALL: [Abi; 4] = [Abi::X86_64, Abi::I386, Abi::Aarch64, Abi::Arm];

    /// The ABI of the machine this binary was built for; the default for inputs that
    /// carry numbers without an ABI.
    pub fn host() -> Abi {
        if cfg!(target_arch = "aarch64") {
            Abi::Aarch64
        } else if cfg!(target_arch = "arm") {
            Abi::Arm
        } else if cfg!(target_arch = "x86") {
            Abi::I386
        } else {
            Abi::X86_64
        }
    }

    /// The 32-bit compat ABI that tasks on a node of this ABI may use.
    pub fn compat(self) -> Abi {
        match self {
            Abi::X86_64 | Abi::I386 => Abi::I386,
            Abi::Aarch64 | Abi::Arm => Abi::Arm,
        }
    }

    /// Maps Tetragon's ABI strings (`x64`, `i386`, `arm64`, `arm32`) and our own names.
    pub fn from_tetragon(s: &str) -> Option<Abi> {
        match s {
            "x64" | "x86_64" | "amd64" => Some(Abi::X86_64),
            "i386" | "x86" | "ia32" => Some(Abi::I386),
            "arm64" | "aarch64" => Some(Abi::Aarch64),
            "arm32" | "arm" => Some(Abi::Arm),
            _ => None,
        }
    }

    /// The kernel name of syscall number `nr` in this ABI, if the table has it.
    pub fn name_of(self, nr: u64) -> Option<&'static str> {
        let id = usize::try_from(nr).ok()?;
        match self {
            Abi::X86_64 => {
                // x32 calls share the x86-64 table, offset by a marker bit.
                let id = if nr & X32_SYSCALL_BIT != 0 {
                    usize::try_from(nr & !X32_SYSCALL_BIT).ok()?
                } else {
                    id
                };
                syscalls::x86_64::Sysno::new(id).map(|s| s.name())
            }
            Abi::I386 => syscalls::x86::Sysno::new(id).map(|s| s.name()),
            Abi::Aarch64 => syscalls::aarch64::Sysno::new(id).map(|s| s.name()),
            Abi::Arm => syscalls::arm::Sysno::new(id).map(|s| s.name()),
        }
    }

    /// The number of syscall `name` in this ABI, if it exists there. Returns the
    /// table's `&'static str` too, so callers can keep names without allocating.
    pub fn lookup(self, name: &str) -> Option<(u32, &'static str)> {
        match self {
            Abi::X86_64 => syscalls::x86_64::Sysno::from_str(name)
                .ok()
                .map(|s| (s.id().unsigned_abs(), s.name())),
            Abi::I386 => syscalls::x86::Sysno::from_str(name)
                .ok()
                .map(|s| (s.id().unsigned_abs(), s.name())),
            Abi::Aarch64 => syscalls::aarch64::Sysno::from_str(name)
                .ok()
                .map(|s| (s.id().unsigned_abs(), s.name())),
            Abi::Arm => syscalls::arm::Sysno::from_str(name)
                .ok()
                .map(|s| (s.id().unsigned_abs(), s.name())),
        }
    }

    /// The table's static copy of `name` when any ABI knows it.
    pub fn known_name(name: &str) -> Option<&'static str> {
        Abi::ALL.iter().find_map(|abi| abi.lookup(name).map(|(_, n)| n))
    }

    /// The lower-case name used on the command line and in stored files.
    pub fn as_str(self) -> &'static str {
        match self {
            Abi::X86_64 => "x86_64",
            Abi::I386 => "i386",
            Abi::Aarch64 => "aarch64",
            Abi::Arm => "arm",
        }
    }
}

impl fmt::Display for Abi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Abi {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Abi::from_tetragon(s).ok_or_else(|| format!("unknown ABI `{s}`: use one of x86_64, i386, aarch64, arm"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_differ_per_abi() {
        assert_eq!(Abi::X86_64.name_of(0), Some("read"));
        assert_eq!(Abi::I386.name_of(3), Some("read"));
        assert_eq!(Abi::Aarch64.name_of(63), Some("read"));
        assert_eq!(Abi::Arm.name_of(3), Some("read"));
        assert_eq!(Abi::X86_64.name_of(435), Some("clone3"));
        assert_eq!(Abi::Aarch64.name_of(56), Some("openat"));
    }

    #[test]
    fn x32_numbers_resolve_through_the_x86_64_table() {
        assert_eq!(Abi::X86_64.name_of(X32_SYSCALL_BIT | 1), Some("write"));
    }

    #[test]
    fn unknown_numbers_and_names_are_none() {
        assert_eq!(Abi::X86_64.name_of(100_000), None);
        assert_eq!(Abi::X86_64.lookup("no_such_call"), None);
        // `open` does not exist on arm64.
        assert_eq!(Abi::Aarch64.lookup("open"), None);
        assert_eq!(Abi::X86_64.lookup("openat").map(|p| p.0), Some(257));
    }

    #[test]
    fn tetragon_abi_strings() {
        assert_eq!(Abi::from_tetragon("x64"), Some(Abi::X86_64));
        assert_eq!(Abi::from_tetragon("arm32"), Some(Abi::Arm));
        assert!("mips".parse::<Abi>().is_err());
    }
}

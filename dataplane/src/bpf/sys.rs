//! The raw `bpf(2)` commands aya 0.14 keeps to itself, each needed here: `BPF_OBJ_GET` and
//! `BPF_OBJ_PIN` of links it did not make, `BPF_LINK_UPDATE` (swapping a program into a
//! pinned cgroup link atomically, for restarts), `BPF_LINK_CREATE` of the cgroup sockopt
//! link as a pinnable link, `BPF_MAP_CREATE` of the build marker.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_CGROUP_SETSOCKOPT` of `enum bpf_attach_type`.
pub const ATTACH_CGROUP_SETSOCKOPT: u32 = 22;

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    pad: [u8; 48],
}

#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: [u8; 44],
}

#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
    pad: [u8; 48],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a bpf_attr prefix for `cmd`, zero-padded, of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: [0; 44],
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just handed us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_CREATE` of `prog` on the cgroup `target` (aya 0.14 cannot hand out a
/// cgroup sockopt link as a pinnable `FdLink`).
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: u32::try_from(prog.as_raw_fd()).unwrap_or(0),
        target_fd: u32::try_from(target.as_raw_fd()).unwrap_or(0),
        attach_type,
        flags: 0,
        pad: [0; 48],
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just handed us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_OBJ_PIN`: `fd` outlives the process at `path` (on a bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(0),
        file_flags: 0,
        path_fd: 0,
        pad: [0; 44],
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Swaps the program behind `link` for `prog`, atomically: no moment without one.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = LinkUpdate {
        link_fd: u32::try_from(link.as_raw_fd()).unwrap_or(0),
        new_prog_fd: u32::try_from(prog.as_raw_fd()).unwrap_or(0),
        flags: 0,
        old_prog_fd: 0,
        pad: [0; 48],
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct MapNextKey {
    map_fd: u32,
    pad0: u32,
    key: u64,
    next_key: u64,
    pad: [u8; 48],
}

/// How many keys the hash map `map` holds (walked with `BPF_MAP_GET_NEXT_KEY`; a map
/// changing meanwhile gives an approximate count).
pub fn count_keys(map: BorrowedFd<'_>, key_size: u32) -> std::io::Result<u64> {
    let size = key_size as usize;
    let mut key = vec![0u8; size];
    let mut next = vec![0u8; size];
    let mut n = 0u64;
    let mut first = true;
    loop {
        let mut attr = MapNextKey {
            map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
            pad0: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            pad: [0; 48],
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                n += 1;
                first = false;
                std::mem::swap(&mut key, &mut next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}

#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    pad: [u8; 44],
}

/// A one-slot array map named `name` (at most 15 bytes): pinned, an object whose path says
/// something (the build marker), costing a page of kernel memory.
pub fn marker_create(name: &str) -> std::io::Result<OwnedFd> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
        pad: [0; 44],
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just handed us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const BPF_PROG_LOAD: libc::c_long = 5;

#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    pad: [u8; 56],
}

/// One eBPF instruction, encoded.
const fn insn(code: u8, regs: u8, imm: i32) -> u64 {
    (code as u64) | ((regs as u64) << 8) | ((imm.cast_unsigned() as u64) << 32)
}
/// `r0 = 1`.
const MOV_R0_1: u64 = insn(0xb7, 0, 1);
/// `call <imm>`.
const fn call(helper: i32) -> u64 {
    insn(0x85, 0, helper)
}
/// `exit`.
const EXIT: u64 = insn(0x95, 0, 0);

/// What loading a probe program said.
pub enum Loaded {
    Ok,
    /// Refused, with the errno and the verifier's log.
    Refused(std::io::Error, String),
}

/// Loads (and at once closes) a program of `prog_type` expecting `attach_type`, made of
/// `insns`, with the verifier's log.
fn probe_load(prog_type: u32, attach_type: u32, insns: &[u64]) -> Loaded {
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).unwrap_or(0),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: u32::try_from(log.len()).unwrap_or(0),
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type: attach_type,
        pad: [0; 56],
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            if let Ok(fd) = i32::try_from(fd) {
                // SAFETY: the kernel just handed us this descriptor; closed at once.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            Loaded::Ok
        }
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            Loaded::Refused(e, String::from_utf8_lossy(&log[..end]).into_owned())
        }
    }
}

/// Whether a program of `prog_type` may be loaded for `attach_type` (`Err`: the probe
/// itself failed, as without the privilege to load programs).
pub fn probe_attach_type(prog_type: u32, attach_type: u32) -> std::io::Result<bool> {
    match probe_load(prog_type, attach_type, &[MOV_R0_1, EXIT]) {
        Loaded::Ok => Ok(true),
        Loaded::Refused(e, _) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Loaded::Refused(e, _) => Err(e),
    }
}

/// Whether programs of `prog_type` for `attach_type` may call `helper`: the verifier names
/// a helper the program may not call before it looks at anything else (the probe's other mistakes, its
/// arguments, its return value, come after and say the helper is there).
pub fn probe_helper(prog_type: u32, attach_type: u32, helper: i32) -> std::io::Result<bool> {
    match probe_load(prog_type, attach_type, &[call(helper), EXIT]) {
        // "unknown func" up to 6.x, "program of this type cannot use helper" since; "invalid
        // func" for an id beyond the kernel's last.
        Loaded::Refused(_, log)
            if log.contains("unknown func")
                || log.contains("cannot use helper")
                || log.contains("invalid func") =>
        {
            Ok(false)
        }
        // No word from the verifier: refused before it ran (no privilege, say).
        Loaded::Refused(e, log) if log.is_empty() => Err(e),
        Loaded::Ok | Loaded::Refused(..) => Ok(true),
    }
}

/// Whether the kernel knows the `bpf(2)` command `cmd` taking a descriptor first: asked
/// with descriptor -1, a known command answers `EBADF`, an unknown one `EINVAL`.
fn probe_fd_command(cmd: libc::c_long) -> std::io::Result<bool> {
    let mut attr = LinkUpdate {
        link_fd: u32::MAX,
        new_prog_fd: 0,
        flags: 0,
        old_prog_fd: 0,
        pad: [0; 48],
    };
    match bpf(cmd, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(_) => Ok(true),
    }
}

/// `BPF_LINK_CREATE` (Linux 5.7).
pub fn probe_link_create() -> std::io::Result<bool> {
    probe_fd_command(BPF_LINK_CREATE)
}

/// `BPF_LINK_UPDATE` (Linux 5.7).
pub fn probe_link_update() -> std::io::Result<bool> {
    probe_fd_command(BPF_LINK_UPDATE)
}

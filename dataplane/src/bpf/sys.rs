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

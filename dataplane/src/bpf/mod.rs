//! Loading and attaching the kernel programs, and the maps as [`KvStore`]s.
//!
//! This module only declares its parts and re-exports what they offer. `object` names the
//! embedded object's programs and maps; `kv` makes a BPF hash map a [`KvStore`]; `pins`
//! keeps the pin directory; `load` loads the object and attaches the socket hooks, or takes
//! this build's pinned programs as they are; `maps` hands out the maps of what `load`
//! returns and reads its counters. Each uses only parts named before it, `pkt` (the packet
//! layer's programs) and `sys` (raw `bpf(2)` commands), so the parts form no cycle. `host`
//! reads what the agent needs of the host: the cgroup v2 mount, the network namespace's
//! cookie.
//!
//! [`KvStore`]: crate::apply::reconcile::KvStore

mod host;
mod kv;
mod load;
mod maps;
mod object;
mod pins;
pub mod pkt;
pub mod sys;

pub use host::{cgroup2_mount, cgroup2_mount_in, netns_cookie};
pub use kv::BpfHash;
pub use load::Loaded;
pub use object::{MAPS, SOCK_HOOKS, SOCKOPT_HOOK, build_id, layout_id, sock_programs};
pub use pins::{DEFAULT_PIN_DIR, check_bpffs, has_pinned_links, secure_pin_dir, unpin_all};
pub use sys::count_keys;

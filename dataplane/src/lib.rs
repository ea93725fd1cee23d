//! The dataplane agent as a library: the binary (`main.rs`) and the privileged tests use it.

pub mod agent;
pub mod api;
pub mod bpf;
pub mod desired;
pub mod docker;
pub mod forward;
pub mod netlink;
pub mod notrack;
pub mod reconcile;
pub mod terminate;

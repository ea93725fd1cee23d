//! The dataplane agent as a library: the binary (`main.rs`) and the privileged tests use it.

pub mod addr;
pub mod agent;
pub mod api;
pub mod apply;
pub mod bpf;
pub mod cache;
pub mod desired;
pub mod docker;
pub mod egress;
pub mod endpoint;
pub mod engine;
pub mod features;
pub mod hostfw;
pub mod input;
pub mod metrics;
pub mod model;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod notify;
pub mod ownfw;
pub mod packet;
pub mod plan;
pub mod reconcile;
pub mod sockets;
pub mod status;

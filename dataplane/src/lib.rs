//! The dataplane agent as a library: the binary (`main.rs`) and the privileged tests use it.

pub mod addr;
pub mod agent;
pub mod apply;
pub mod bpf;
pub mod config;
pub mod docker;
pub mod egress;
pub mod endpoint;
pub mod engine;
pub mod features;
pub mod hostfw;
pub mod input;
pub mod model;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod ownfw;
pub mod packet;
pub mod plan;
pub mod report;
pub mod retry;

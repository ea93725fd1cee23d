//! The kernel side of the dataplane: cgroup `sock_addr` hooks that connect sockets straight to
//! the container behind a published port. Each hook is a thin entry over `sock`, which reads
//! the maps and calls the pure decision in `dataplane_common::xlate`.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each entry its context by value"
)]

mod maps;
mod sock;
mod tc;
mod test_xlate;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; there is no unwinding in BPF.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

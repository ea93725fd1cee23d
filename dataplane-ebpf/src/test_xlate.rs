//! A classifier that exists only to be run with `BPF_PROG_TEST_RUN`: it feeds a
//! [`TestRequest`] through the same map lookups and decision as the socket hooks, in the
//! kernel, and writes the result back as a [`TestAnswer`]. The agent never attaches it.

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{
    TEST_F_HOST_NETNS, TEST_F_SOCK6, TEST_REQ_OFFSET, TestAnswer, TestRequest,
    xlate::{target_v4, target_v6},
};

use crate::sock::{lookup, skipped};

/// Returns 1 when translated, 0 when not, 2 when the input is too short.
#[classifier]
pub fn dp_test_xlate(ctx: TcContext) -> i32 {
    let Ok(req) = ctx.load::<TestRequest>(TEST_REQ_OFFSET) else {
        return 2;
    };
    let host_ns = req.flags & TEST_F_HOST_NETNS != 0;
    let target = lookup(&req.addr, req.port_be, req.proto, host_ns, req.netns_cookie)
        .map_err(skipped)
        .ok()
        .and_then(|b| {
            if req.flags & TEST_F_SOCK6 != 0 {
                target_v6(&req.addr, &b)
            } else {
                target_v4(&b)
            }
        });
    let answer = target.map_or(
        TestAnswer {
            addr: [0; 16],
            port_be: 0,
            pad: 0,
        },
        |t| TestAnswer {
            addr: t.addr,
            port_be: t.port_be,
            pad: 0,
        },
    );
    if ctx.store(TEST_REQ_OFFSET, &answer, 0).is_err() {
        return 2;
    }
    i32::from(target.is_some())
}

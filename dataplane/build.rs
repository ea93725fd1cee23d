//! Embeds the eBPF object that `cargo xtask build` compiled (with Debian's rustc for
//! `bpfel-unknown-none`). Without it the agent still builds, so a plain `cargo test` needs no
//! BPF toolchain; such a binary refuses to run and says how to build a real one.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("dataplane.bpf.o");
    println!("cargo:rerun-if-env-changed=DATAPLANE_EBPF_OBJECT");
    let src = env::var_os("DATAPLANE_EBPF_OBJECT").map_or_else(
        || {
            PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
                .join("../target/ebpf/bpfel-unknown-none/release/dataplane-ebpf")
        },
        PathBuf::from,
    );
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo::rustc-check-cfg=cfg(no_ebpf_object)");
    println!("cargo:rerun-if-env-changed=DATAPLANE_REQUIRE_EBPF_OBJECT");
    if let Ok(bytes) = fs::read(&src) {
        fs::write(&out, bytes).expect("writing the embedded eBPF object");
    } else {
        // `cargo xtask` builds the object first and requires it.
        assert!(
            env::var_os("DATAPLANE_REQUIRE_EBPF_OBJECT").is_none(),
            "no eBPF object at {}: `cargo xtask build` makes it",
            src.display()
        );
        fs::write(&out, []).expect("writing an empty eBPF object");
        // Tests that read the object are ignored (and listed as such).
        println!("cargo:rustc-cfg=no_ebpf_object");
    }
}

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
    match fs::read(&src) {
        Ok(bytes) => fs::write(&out, bytes).expect("writing the embedded eBPF object"),
        Err(_) => fs::write(&out, []).expect("writing an empty eBPF object"),
    }
}

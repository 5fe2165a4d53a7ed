//! Embeds the kernel object built by `cargo xtask build-ebpf`, so `target/release/bpfproxy`
//! is self-contained. Without it (plain `cargo check`/`clippy`) an empty object is embedded
//! and the agent says at load time how to build the real one.

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("proxy-ebpf.o");
    let source = env::var("BPFPROXY_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
                .join("../target/bpfel-unknown-none/release/proxy-ebpf")
        });
    println!("cargo:rerun-if-env-changed=BPFPROXY_EBPF_OBJ");
    println!("cargo:rerun-if-changed={}", source.display());
    match fs::read(&source) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}; run `cargo xtask build-ebpf` first (embedding an empty one)",
                source.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}

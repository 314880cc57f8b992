//! Compiles the protos with protox (pure Rust: no system `protoc`) and embeds
//! the descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/keyward/v1/keys.proto",
        "proto/keyward/v1/check.proto",
        "proto/keyward/v1/owners.proto",
        "proto/keyward/v1/audit.proto",
        "proto/keyward/v1/leaks.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("keyward_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        // These hold plaintext keys: src/pb.rs gives them redacting Debug impls.
        .skip_debug([
            "keyward.v1.MintResponse",
            "keyward.v1.CheckRequest",
            "keyward.v1.RotateResponse",
            "keyward.v1.ReportRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}

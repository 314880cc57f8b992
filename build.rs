//! Compiles the protos with protox (pure Rust: no system `protoc`) and embeds
//! the descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf, process::Command};

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
    git_sha();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    embed_migrations(&out_dir)?;

    let fds = protox::compile(protos, ["proto"])?;
    fs::write(out_dir.join("keyward_descriptor.bin"), fds.encode_to_vec())?;
    // Envoy's ext_authz service, for reflection only (see proto/vendor).
    let envoy = protox::compile(
        ["envoy/service/auth/v3/external_auth.proto"],
        ["proto/vendor"],
    )?;
    fs::write(
        out_dir.join("envoy_authz_descriptor.bin"),
        envoy.encode_to_vec(),
    )?;

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

/// The migrations, embedded: `migrations.rs` lists each file of
/// `migrations/` as `(version, description, include_str!(its path))`,
/// named as sqlx names them (`<version>_<description>.sql`, `_` read as a
/// space), for `store::migrator`. What `sqlx::migrate!` would embed,
/// without building sqlx's macros and the database driver they carry
/// (a unit test compares the two).
fn embed_migrations(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=migrations");
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("migrations");
    let mut found = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((version, rest)) = name.split_once('_') else {
            continue;
        };
        let Some(description) = rest.strip_suffix(".sql") else {
            continue;
        };
        if description.ends_with(".up") || description.ends_with(".down") {
            return Err(
                format!("migrations/{name}: reversible migrations are not supported").into(),
            );
        }
        let version: i64 = version
            .parse()
            .map_err(|_| format!("migrations/{name}: the name must start with a number"))?;
        found.push((version, description.replace('_', " "), path));
    }
    found.sort_by_key(|(version, ..)| *version);
    let mut list = String::from("&[\n");
    for (version, description, path) in &found {
        list.push_str(&format!(
            "    ({version}, {description:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    list.push_str("]\n");
    fs::write(out_dir.join("migrations.rs"), list)?;
    Ok(())
}

/// `KEYWARD_GIT_SHA` for `keyward_build_info`: from the environment (a
/// container build passes it as a build argument), else from git, else
/// `unknown`.
fn git_sha() {
    println!("cargo:rerun-if-env-changed=KEYWARD_GIT_SHA");
    let sha = env::var("KEYWARD_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=KEYWARD_GIT_SHA={sha}");
    // Re-run when HEAD moves: HEAD itself (a checkout) and the branch it
    // names (a commit). Only paths that exist: a missing one reruns always.
    if let Ok(head) = fs::read_to_string(".git/HEAD") {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(branch) = head.strip_prefix("ref: ") {
            let path = format!(".git/{}", branch.trim());
            if fs::metadata(&path).is_ok() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}

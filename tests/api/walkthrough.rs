//! The README's run command and grpcurl walkthrough, run verbatim: the
//! walkthrough block is read from README.md, so the README cannot rot.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::process::{Child, Command};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::helpers::fresh_database_url;

const MARKER: &str = "<!-- walkthrough:";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The paragraphs (blank-line separated) of the README's walkthrough block.
fn walkthrough_paragraphs(readme: &str) -> Vec<String> {
    let start = readme
        .find(MARKER)
        .expect("README has a walkthrough marker");
    let block = &readme[start..];
    let open = block.find("```sh\n").expect("walkthrough opens a sh block") + "```sh\n".len();
    let close = block[open..]
        .find("\n```")
        .expect("walkthrough block closes")
        + open;
    block[open..close]
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts the README's run command with a test database and port.
fn run_command(root: &Path, database_url: &str, addr: &str) -> Child {
    Command::new(root.join("scripts/run"))
        .current_dir(root)
        .env("KEYWARD_BIN", env!("CARGO_BIN_EXE_keyward"))
        .env("DATABASE_URL", database_url)
        .env("KEYWARD_GRPC_ADDR", addr)
        .env("KEYWARD_SHUTDOWN_GRACE", "5s")
        .env("KEYWARD_SHUTDOWN_DELAY", "0s")
        // Tests run side by side: no fixed metrics port.
        .env("KEYWARD_METRICS_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("start ./scripts/run")
}

async fn wait_until_serving(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let serving = async {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let mut client = HealthClient::new(channel);
            let resp = client
                .check(HealthCheckRequest::default())
                .await
                .ok()?
                .into_inner();
            Some(
                resp.status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            )
        };
        if serving.await == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "keyward did not start serving at {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the paragraphs in one shell, returning each paragraph's stdout.
async fn run_walkthrough(root: &Path, paragraphs: &[String], env: &[(&str, &str)]) -> Vec<String> {
    const STEP: &str = "::walkthrough-step::";
    let mut script = String::from("set -euo pipefail\n");
    for p in paragraphs {
        script.push_str(&format!("echo '{STEP}'\n{p}\n"));
    }
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(root)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("walkthrough finishes within 2 minutes")
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walkthrough failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .split(&format!("{STEP}\n"))
        .skip(1)
        .map(str::to_owned)
        .collect()
}

fn json(output: &str) -> Value {
    serde_json::from_str(output).unwrap_or_else(|e| panic!("not JSON ({e}): {output}"))
}

#[tokio::test]
async fn the_readme_run_command_and_grpcurl_walkthrough_work_verbatim() {
    let root = repo();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let paragraphs = walkthrough_paragraphs(&readme);
    assert_eq!(
        paragraphs.len(),
        9,
        "the walkthrough's steps changed; update this test"
    );

    let database_url = fresh_database_url();
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let mut server = run_command(&root, &database_url, &addr);
    wait_until_serving(&addr).await;

    let outputs = run_walkthrough(
        &root,
        &paragraphs,
        &[
            ("KW", addr.as_str()),
            ("KEYWARD_BIN", env!("CARGO_BIN_EXE_keyward")),
            ("DATABASE_URL", database_url.as_str()),
        ],
    )
    .await;
    assert_eq!(outputs.len(), paragraphs.len());

    // Set-up and bootstrap print nothing on stdout: the key went into $ADMIN.
    assert_eq!(outputs[0].trim(), "");
    assert_eq!(outputs[1].trim(), "");

    let minted = json(&outputs[2]);
    let secret = minted["secret"].as_str().expect("secret");
    assert!(secret.starts_with("kw_live_"), "{secret}");
    assert_eq!(minted["key"]["ownerId"], "acme");
    assert_eq!(minted["key"]["state"], "ACTIVE");
    assert_eq!(minted["key"]["start"], &secret[..12]);
    let key_id = minted["key"]["id"].as_str().expect("id");

    let allowed = json(&outputs[3]);
    assert_eq!(allowed["allowed"], true);
    assert_eq!(allowed["reason"], "OK");
    assert_eq!(allowed["httpStatus"], 200);
    assert_eq!(allowed["keyId"], key_id);

    let revoked = json(&outputs[4]);
    assert_eq!(revoked["key"]["id"], key_id);
    assert_eq!(revoked["key"]["state"], "REVOKED");
    assert_eq!(revoked["key"]["revokedReason"], "rotated");
    assert!(
        !outputs[4].contains(secret),
        "Revoke must not return the secret"
    );

    let denied = json(&outputs[5]);
    assert_eq!(
        denied.get("allowed"),
        None,
        "false is omitted in proto3 JSON"
    );
    assert_eq!(denied["reason"], "REVOKED");
    assert_eq!(denied["httpStatus"], 401);

    // 6. Rotation: a new secret, both keys linked.
    let rotated = json(&outputs[6]);
    let new_secret = rotated["secret"].as_str().expect("new secret");
    assert!(new_secret.starts_with("kw_live_"));
    let old_id = rotated["previous"]["id"].as_str().expect("old id");
    assert_eq!(rotated["key"]["rotatedFrom"], old_id);
    assert_eq!(rotated["previous"]["replacedBy"], rotated["key"]["id"]);
    assert_eq!(rotated["key"]["scopes"][0], "invoices:read");
    assert!(
        rotated["previous"]["expiresAt"].is_string(),
        "the old key expires"
    );

    // 7. Suspended: the new key answers OWNER_INACTIVE.
    let suspended = json(&outputs[7]);
    assert_eq!(suspended["reason"], "OWNER_INACTIVE");
    assert_eq!(suspended["httpStatus"], 403);

    // 8. Resumed: allowed again.
    let resumed = json(&outputs[8]);
    assert_eq!(resumed["allowed"], true);
    assert_eq!(resumed["reason"], "OK");

    // SIGTERM: the server drains and exits cleanly within its grace period.
    let pid = server.id().expect("server pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(15), server.wait())
        .await
        .expect("keyward exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "keyward exited with {status}");
}

#[test]
fn walkthrough_paragraphs_split_on_blank_lines() {
    let readme = "x\n<!-- walkthrough: y -->\n```sh\n# a\necho 1\n\n# b\necho 2\n```\nz";
    assert_eq!(
        walkthrough_paragraphs(readme),
        ["# a\necho 1", "# b\necho 2"]
    );
}

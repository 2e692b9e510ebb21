//! The real device-sim binary pointed at a port nothing listens on: the
//! first thing it says is that there is no server there and what to check,
//! before the report of zeros.

use std::process::Command;

#[test]
fn no_server_is_said_first_with_what_to_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port that was free a moment ago and is closed now.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let server = format!("http://{closed}");
    // The device is registered already, so the run goes straight to
    // uploading (registration would retry for half a minute first).
    let credentials = dir.path().join("creds.json");
    std::fs::write(&credentials, r#"{"sim-00001": "tok_sim"}"#).expect("credentials");

    let output = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(["--server", &server, "--devices", "1", "--duration", "1s"])
        .arg("--credentials-file")
        .arg(&credentials)
        .env("RUST_LOG", "warn")
        .output()
        .expect("device-sim runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let first = stderr.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!(
            "device-sim: no ingest server at {server} (connection refused): is `ingest serve` \
             running? (--server, DEVICE_SIM_SERVER); the devices keep retrying with backoff"
        ),
        "stderr:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("no ingest server").count(),
        1,
        "said once: {stderr}"
    );
    // The report still follows, on stdout.
    assert!(stdout.contains("readings"), "stdout:\n{stdout}");
}

//! `ingest devices rotate-token | credentials | revoke | disable | enable |
//! bind-cert`, and `register --cert`: the real binary against a real
//! server on both backends, each change checked by what a device can then
//! do with its token.

use crate::common::*;
use sha2::{Digest, Sha256};
use tonic::Code;

backend_tests!(
    rotation_revocation_and_disabling_from_the_cli,
    a_certificate_is_bound_and_revoked_from_the_cli,
    a_device_registers_with_its_certificate,
    mistakes_exit_non_zero_with_a_message,
);

const DAY: u64 = 86_400 * 1_000_000_000;

/// `ingest devices ARGS... --server URL`, with the ops token from the
/// environment, as an operator would run it.
async fn devices(server: &TestServer, args: &[&str]) -> CliRun {
    let all: Vec<&str> = std::iter::once("devices")
        .chain(args.iter().copied())
        .collect();
    server.operator_cli(&all).await
}

async fn devices_ok(server: &TestServer, args: &[&str]) -> CliRun {
    let run = devices(server, args).await;
    assert!(
        run.success,
        "ingest devices {args:?} failed: {}",
        run.stderr
    );
    run
}

async fn devices_err(server: &TestServer, args: &[&str]) -> String {
    let run = devices(server, args).await;
    assert!(
        !run.success,
        "ingest devices {args:?} should have failed; printed {}",
        run.stdout
    );
    assert!(run.stdout.is_empty(), "nothing on stdout: {}", run.stdout);
    run.stderr
}

async fn credentials_json(server: &TestServer, device: &str) -> serde_json::Value {
    let run = devices_ok(server, &["credentials", device, "--json"]).await;
    serde_json::from_str(&run.stdout).unwrap()
}

async fn assert_refused(server: &TestServer, token: &str, why: &str) {
    let refused = cursor_with(server, token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{why}: {refused:?}");
}

/// The table row of one token, split into its columns.
fn token_row(table: &str, id: i64) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("no row for token {id}:\n{table}"))
}

/// A self-signed certificate naming `device`, written as PEM into `dir`;
/// with its SHA-256 fingerprint computed here, not by the server's code.
fn certificate(dir: &tempfile::TempDir, device: &str) -> (std::path::PathBuf, String) {
    let certified = rcgen::generate_simple_self_signed(vec![device.to_owned()]).unwrap();
    let path = dir.path().join(format!("{device}.pem"));
    std::fs::write(&path, certified.cert.pem()).unwrap();
    let fingerprint = hex::encode(Sha256::digest(certified.cert.der()));
    (path, fingerprint)
}

async fn rotation_revocation_and_disabling_from_the_cli(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    // Register: the token, alone, on stdout.
    let run = devices_ok(&server, &["register", "pump-7"]).await;
    let first = run.stdout.trim().to_owned();
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert!(run.stderr.contains("registered pump-7"), "{}", run.stderr);
    assert_eq!(cursor_with(&server, &first).await.unwrap(), 0);
    let first_id = credentials_json(&server, "pump-7").await["tokens"][0]["credential_id"]
        .as_i64()
        .unwrap();

    // Rotate with a day's overlap: both tokens work, the old one expires.
    let before = now_nanos();
    let run = devices_ok(
        &server,
        &["rotate-token", "pump-7", "--overlap", "24h", "--json"],
    )
    .await;
    let rotated: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let second = rotated["token"].as_str().unwrap().to_owned();
    let second_id = rotated["credential_id"].as_i64().unwrap();
    assert_ne!(second, first);
    assert_ne!(second_id, first_id);
    assert_eq!(rotated["credentials"]["device_id"], "pump-7");
    assert_eq!(
        rotated["credentials"]["tokens"].as_array().unwrap().len(),
        2
    );

    let json = credentials_json(&server, "pump-7").await;
    let tokens = json["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{json}");
    assert!(tokens.iter().all(|t| t["active"] == true), "{json}");
    let old = tokens
        .iter()
        .find(|t| t["credential_id"] == first_id)
        .unwrap();
    let expires = old["expires_time_unix_nano"].as_u64().unwrap();
    assert!(
        (before + DAY..=now_nanos() + DAY).contains(&expires),
        "old token expires in a day: {json}"
    );
    let new = tokens
        .iter()
        .find(|t| t["credential_id"] == second_id)
        .unwrap();
    assert_eq!(new["expires_time_unix_nano"], 0, "{json}");
    assert!(
        !json.to_string().contains(&second[4..]),
        "no secret: {json}"
    );

    let table = devices_ok(&server, &["credentials", "pump-7"]).await.stdout;
    assert!(!table.contains(&second[4..]) && !table.contains(&first[4..]));
    let old_row = token_row(&table, first_id);
    let new_row = token_row(&table, second_id);
    // TOKEN CREATED LAST-USED STATE SINCE/UNTIL: an active token shows
    // its expiry, a revoked one when it was revoked.
    assert_eq!(old_row.len(), 5, "{table}");
    assert_eq!(old_row[3], "active", "{table}");
    assert!(old_row[4].ends_with('Z'), "{table}");
    assert_eq!(old_row[4][..10], chrono_day(expires), "{table}");
    assert_eq!(new_row[3..], ["active", "no", "expiry"], "{table}");
    assert!(table.contains("disabled      no"), "{table}");

    assert_eq!(cursor_with(&server, &second).await.unwrap(), 0);
    assert_eq!(cursor_with(&server, &first).await.unwrap(), 0, "overlap");

    // Revoke the old token.
    let run = devices_ok(
        &server,
        &["revoke", "pump-7", "--token", &first_id.to_string()],
    )
    .await;
    assert_eq!(
        run.stdout,
        format!("pump-7: token {first_id} revoked; 1 active token left\n")
    );
    assert_refused(&server, &first, "revoked token").await;
    let json = credentials_json(&server, "pump-7").await;
    let old = json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["credential_id"] == first_id)
        .unwrap();
    assert_eq!(old["active"], false, "{json}");
    assert_ne!(old["revoked_time_unix_nano"], 0, "{json}");
    let table = devices_ok(&server, &["credentials", "pump-7"]).await.stdout;
    let old_row = token_row(&table, first_id);
    assert_eq!(old_row[3], "revoked", "{table}");
    assert!(old_row[4].ends_with('Z'), "revoked time: {table}");

    // Disable, then enable.
    let run = devices_ok(&server, &["disable", "pump-7"]).await;
    assert!(
        run.stdout.starts_with("pump-7: disabled since "),
        "{}",
        run.stdout
    );
    assert_refused(&server, &second, "disabled device").await;
    let table = devices_ok(&server, &["credentials", "pump-7"]).await.stdout;
    assert!(table.contains("disabled      since "), "{table}");
    assert_ne!(
        credentials_json(&server, "pump-7").await["disabled_time_unix_nano"],
        0
    );

    let run = devices_ok(&server, &["enable", "pump-7", "--json"]).await;
    let enabled: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(enabled["disabled_time_unix_nano"], 0, "{enabled}");
    assert_eq!(cursor_with(&server, &second).await.unwrap(), 0);

    // Rotate with no overlap, as text: the token on stdout, the old one
    // ends at once.
    let run = devices_ok(&server, &["rotate-token", "pump-7", "--overlap", "0s"]).await;
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    let third = run.stdout.trim().to_owned();
    assert!(third.starts_with("dev_"), "{third}");
    assert!(
        run.stderr.contains("(shown once, store it now)")
            && run
                .stderr
                .contains(&format!("token {second_id}: expired now")),
        "{}",
        run.stderr
    );
    assert_refused(&server, &second, "expired at once").await;
    assert_eq!(cursor_with(&server, &third).await.unwrap(), 0);
}

/// `2026-11-24` of a time, as the table's RFC 3339 starts.
fn chrono_day(nanos: u64) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos as i64)
        .format("%Y-%m-%d")
        .to_string()
}

async fn a_certificate_is_bound_and_revoked_from_the_cli(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pem, fingerprint) = certificate(&dir, "pump-8");
    let pem = pem.to_str().unwrap();
    let token = server.register("pump-8").await;

    let table = devices_ok(&server, &["credentials", "pump-8"]).await.stdout;
    assert!(table.contains("certificate   none"), "{table}");

    let run = devices_ok(&server, &["bind-cert", "pump-8", "--cert", pem]).await;
    assert_eq!(
        run.stdout,
        format!("pump-8: certificate sha256 {fingerprint} bound; require_mtls no\n")
    );
    let table = devices_ok(&server, &["credentials", "pump-8"]).await.stdout;
    assert!(
        table.contains(&format!("certificate   sha256 {fingerprint} (bound 20")),
        "{table}"
    );
    assert!(table.contains("require_mtls  no"), "{table}");
    let json = credentials_json(&server, "pump-8").await;
    assert_eq!(json["certificate_sha256"], fingerprint);
    assert_ne!(json["certificate_bound_time_unix_nano"], 0);
    assert_eq!(cursor_with(&server, &token).await.unwrap(), 0);

    // --require-mtls: the token alone is refused; binding again without
    // either flag leaves that as it is; --no-require-mtls lifts it.
    let run = devices_ok(
        &server,
        &[
            "bind-cert",
            "pump-8",
            "--cert",
            pem,
            "--require-mtls",
            "--json",
        ],
    )
    .await;
    let bound: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(bound["require_mtls"], true, "{bound}");
    assert_eq!(bound["certificate_sha256"], fingerprint, "{bound}");
    assert_refused(&server, &token, "require_mtls without a certificate").await;
    let run = devices_ok(&server, &["bind-cert", "pump-8", "--cert", pem]).await;
    assert!(run.stdout.ends_with("require_mtls yes\n"), "{}", run.stdout);
    let run = devices_ok(
        &server,
        &["bind-cert", "pump-8", "--cert", pem, "--no-require-mtls"],
    )
    .await;
    assert!(run.stdout.ends_with("require_mtls no\n"), "{}", run.stdout);
    assert_eq!(cursor_with(&server, &token).await.unwrap(), 0);

    let run = devices_ok(&server, &["revoke", "pump-8", "--certificate"]).await;
    assert_eq!(run.stdout, "pump-8: certificate binding revoked\n");
    let table = devices_ok(&server, &["credentials", "pump-8"]).await.stdout;
    assert!(table.contains("certificate   none"), "{table}");
    assert!(!table.contains(&fingerprint), "{table}");
    let json = credentials_json(&server, "pump-8").await;
    assert_eq!(json["certificate_sha256"], "");
    assert_eq!(json["certificate_bound_time_unix_nano"], 0);
    // The token was never the certificate's to take away.
    assert_eq!(cursor_with(&server, &token).await.unwrap(), 0);
}

async fn a_device_registers_with_its_certificate(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pem, fingerprint) = certificate(&dir, "pump-9");
    let pem = pem.to_str().unwrap();

    let run = devices_ok(
        &server,
        &["register", "pump-9", "--cert", pem, "--require-mtls"],
    )
    .await;
    assert!(run.stdout.trim().starts_with("dev_"), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "registered pump-9 with certificate sha256 {fingerprint} (require_mtls)"
        )),
        "{}",
        run.stderr
    );
    let json = credentials_json(&server, "pump-9").await;
    assert_eq!(json["certificate_sha256"], fingerprint, "{json}");
    assert_eq!(json["require_mtls"], true, "{json}");
    assert_refused(&server, run.stdout.trim(), "require_mtls").await;

    // Revoking the certificate of a device that requires it says what
    // that leaves.
    let run = devices_ok(&server, &["revoke", "pump-9", "--certificate"]).await;
    assert!(
        run.stdout.contains("require_mtls is still on"),
        "{}",
        run.stdout
    );
}

async fn mistakes_exit_non_zero_with_a_message(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("pump-1").await;
    let dir = tempfile::tempdir().unwrap();

    let stderr = devices_err(&server, &["revoke", "pump-1"]).await;
    assert!(
        stderr.contains("--token") && stderr.contains("--certificate"),
        "{stderr}"
    );
    let stderr = devices_err(
        &server,
        &["revoke", "pump-1", "--token", "1", "--certificate"],
    )
    .await;
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let stderr = devices_err(&server, &["revoke", "pump-1", "--token", "999999"]).await;
    assert!(
        stderr.contains("NotFound") && stderr.contains("999999"),
        "{stderr}"
    );
    let stderr = devices_err(&server, &["credentials", "nope"]).await;
    assert!(
        stderr.contains("NotFound") && stderr.contains("nope"),
        "{stderr}"
    );
    let stderr = devices_err(&server, &["disable", "nope"]).await;
    assert!(stderr.contains("NotFound"), "{stderr}");
    let stderr = devices_err(&server, &["rotate-token", "pump-1", "--overlap", "soon"]).await;
    assert!(stderr.contains("--overlap"), "{stderr}");

    // A device holds at most 3 active tokens.
    devices_ok(&server, &["rotate-token", "pump-1"]).await;
    devices_ok(&server, &["rotate-token", "pump-1"]).await;
    let stderr = devices_err(&server, &["rotate-token", "pump-1"]).await;
    assert!(
        stderr.contains("FailedPrecondition") && stderr.contains("revoke one first"),
        "{stderr}"
    );

    // A key where the certificate should be is caught before the server.
    let key = dir.path().join("pump-1.key");
    let certified = rcgen::generate_simple_self_signed(vec!["pump-1".to_owned()]).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let stderr = devices_err(
        &server,
        &["bind-cert", "pump-1", "--cert", key.to_str().unwrap()],
    )
    .await;
    assert!(
        stderr.contains("pump-1.key") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
    let stderr = devices_err(
        &server,
        &["bind-cert", "pump-1", "--cert", "/nonexistent.pem"],
    )
    .await;
    assert!(stderr.contains("/nonexistent.pem"), "{stderr}");
    let stderr = devices_err(&server, &["register", "pump-2", "--require-mtls"]).await;
    assert!(stderr.contains("--cert"), "{stderr}");
    assert_eq!(
        credentials_json(&server, "pump-1").await["certificate_sha256"],
        ""
    );
}

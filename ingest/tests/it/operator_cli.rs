//! The operator's first hour (issue 25): the real `ingest` binary against a
//! real server on both backends, asserting the exact stdout, stderr and
//! exit status of each mistake a newcomer makes, and that every table fits
//! 80 columns with long ids.

use std::path::Path;

use crate::common::*;

backend_tests!(
    tokens_come_from_one_place_and_errors_say_which,
    tables_fit_80_columns_and_get_shows_everything,
    mistakes_say_what_to_do,
    alerts_watch_starts_from_now,
);

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `ingest ARGS` with exactly the given environment on top of a clean one:
/// nothing of the test runner's INGEST_* settings, no terminal width.
fn ingest(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"));
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("INGEST_") || name == "COLUMNS" {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// `ingest ARGS --server URL` with the test's ops token in the environment.
fn op(server: &TestServer, args: &[&str]) -> Run {
    let url = server.url();
    let all: Vec<&str> = args.iter().copied().chain(["--server", &url]).collect();
    ingest(&all, &[("INGEST_OPS_TOKEN", OPS_TOKEN)])
}

fn ok(run: Run, what: &str) -> String {
    assert_eq!(run.code, 0, "{what} failed: {}{}", run.stdout, run.stderr);
    run.stdout
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

async fn tokens_come_from_one_place_and_errors_say_which(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    // The server's own file format: `NAME TOKEN` lines; the first is used.
    let tokens = dir.path().join("tokens");
    write(
        &tokens,
        &format!("# operators\nalice {OPS_TOKEN}\nbob ops_other\n"),
    );
    let tokens_arg = tokens.to_str().unwrap();
    let list = ["devices", "list", "--server", &url];

    let run = ingest(
        &[&list[..], &["--ops-token-file", tokens_arg]].concat(),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "DEVICE  NAME  STATE  SEQUENCE  LAST UPLOAD (UTC)     LABELS\n"
    );

    // An explicit --ops-token-file beats INGEST_OPS_TOKEN.
    let run = ingest(
        &[&list[..], &["--ops-token-file", tokens_arg]].concat(),
        &[("INGEST_OPS_TOKEN", "ops_wrong")],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);

    // A refused token says where it came from.
    let run = ingest(&list, &[("INGEST_OPS_TOKEN", "ops_wrong")]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    assert_eq!(
        run.stderr,
        "error: Unauthenticated: ops token not recognised; use a token from INGEST_OPS_TOKEN, \
         --ops-token-file or <data-dir>/ops.token (this command's token came from INGEST_OPS_TOKEN)\n"
    );
    let wrong = dir.path().join("wrong");
    write(&wrong, "ops_wrong\n");
    let run = ingest(
        &[&list[..], &["--ops-token-file", wrong.to_str().unwrap()]].concat(),
        &[],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.ends_with(&format!(
            "(this command's token came from {})\n",
            wrong.display()
        )),
        "{}",
        run.stderr
    );

    // An empty INGEST_OPS_TOKEN counts as unset: the data directory's
    // ops.token is next, and its absence is explained.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let data_arg = data.to_str().unwrap();
    let run = ingest(
        &[&list[..], &["--data-dir", data_arg]].concat(),
        &[("INGEST_OPS_TOKEN", "")],
    );
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr,
        format!(
            "error: no ops token: {}/ops.token does not exist (the server writes it at its first \
             start, in its --data-dir); give the token with --ops-token-file FILE or \
             INGEST_OPS_TOKEN, or the server's data directory with --data-dir\n",
            data.display()
        )
    );
    // With the file there, --data-dir (or INGEST_DATA_DIR) finds it.
    write(&data.join("ops.token"), &format!("{OPS_TOKEN}\n"));
    let run = ingest(&list, &[("INGEST_DATA_DIR", data_arg)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

async fn tables_fit_80_columns_and_get_shows_everything(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let long = "sensor-gateway-basement-0000001"; // 31 characters
    let long32 = "sensor-gateway-basement-00000002"; // 32
    for id in [long, long32, "pump-1"] {
        ok(
            op(
                &server,
                &[
                    "devices",
                    "register",
                    id,
                    "--name",
                    "a gateway in the basement next to the boiler room",
                    "--label",
                    "site=plant-3",
                    "--label",
                    "floor=basement",
                ],
            ),
            "register",
        );
    }
    ok(op(&server, &["devices", "disable", "pump-1"]), "disable");
    ok(
        op(
            &server,
            &[
                "rules",
                "add",
                "a-rule-with-a-rather-long-name-too",
                "--severity",
                "warning",
                "--sensor",
                "temperature",
                "--above",
                "40",
                "--clear",
                "35",
            ],
        ),
        "rules add",
    );
    for args in [
        &["devices", "list"][..],
        &["rules", "list"],
        &["alerts", "list", "--all"],
        &["command", "list"],
        &["devices", "credentials", long32],
    ] {
        let out = ok(op(&server, args), &format!("{args:?}"));
        for line in out.lines() {
            assert!(
                line.chars().count() <= 80,
                "`ingest {}` printed a line of {} columns:\n{out}",
                args.join(" "),
                line.chars().count()
            );
        }
    }
    // The reports too, read from the database, with a command to show.
    ok(op(&server, &["command", "send", long32, "reboot"]), "send");
    let db_args: Vec<String> = match &server.storage.database {
        ingest::storage::Database::Sqlite { .. } => vec![
            "--data-dir".into(),
            server.storage.data_dir.path().display().to_string(),
        ],
        ingest::storage::Database::Postgres { url } => vec!["--database-url".into(), url.clone()],
    };
    for report in [
        "readings_hourly",
        "readings_daily",
        "latest_readings",
        "device_status",
        "alert_history",
        "command_log",
    ] {
        let args: Vec<&str> = ["report", report]
            .into_iter()
            .chain(db_args.iter().map(String::as_str))
            .collect();
        let out = ok(ingest(&args, &[]), report);
        for line in out.lines() {
            assert!(
                line.chars().count() <= 80,
                "`ingest report {report}` printed a line of {} columns:\n{out}",
                line.chars().count()
            );
        }
    }

    let list = ok(op(&server, &["devices", "list"]), "list");
    let pump = list.lines().find(|l| l.starts_with("pump-1")).unwrap();
    assert!(pump.contains(" disabled "), "{list}");
    let header = list.lines().next().unwrap();
    let column = |line: &str, word| line.find(word).map(|b| line[..b].chars().count());
    assert_eq!(column(pump, "disabled"), column(header, "STATE"), "{list}");

    let get = ok(op(&server, &["devices", "get", "pump-1"]), "get");
    let fields: Vec<&str> = get.lines().take(10).collect();
    assert_eq!(fields[0], "device        pump-1");
    assert_eq!(
        fields[1],
        "name          a gateway in the basement next to the boiler room"
    );
    assert_eq!(fields[2], "labels        floor=basement,site=plant-3");
    assert!(fields[3].starts_with("created       20"), "{get}");
    assert_eq!(fields[4], "state         disabled");
    assert!(
        fields[5].starts_with("disabled      yes, since 20"),
        "{get}"
    );
    assert_eq!(fields[6], "require_mtls  no");
    assert_eq!(fields[7], "certificate   -");
    assert_eq!(fields[8], "firmware      -");
    assert_eq!(fields[9], "sequence      0");
    assert!(get.ends_with("\n\nno sensors yet\n"), "{get}");
    let json: serde_json::Value = serde_json::from_str(&ok(
        op(&server, &["devices", "get", "pump-1", "--json"]),
        "json",
    ))
    .unwrap();
    assert_eq!(json["device_id"], "pump-1");
    assert_eq!(json["require_mtls"], false);
    assert!(json["disabled_time_unix_nano"].as_u64().unwrap() > 0);
    assert_eq!(json["sensors"], serde_json::json!([]));
}

async fn mistakes_say_what_to_do(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    // No server at the address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let nowhere = format!("http://127.0.0.1:{port}");
    let run = ingest(
        &["devices", "list", "--server", &nowhere],
        &[("INGEST_OPS_TOKEN", OPS_TOKEN)],
    );
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr,
        format!(
            "error: no ingest server at {nowhere} (connection refused): is `ingest serve` running \
             there? (set the address with --server or INGEST_SERVER)\n"
        )
    );

    // The admin HTTP port instead of the gRPC one.
    let admin = format!("http://{}", server.admin_addr);
    let run = ingest(
        &["devices", "list", "--server", &admin],
        &[("INGEST_OPS_TOKEN", OPS_TOKEN)],
    );
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr,
        "error: the server did not answer as a gRPC server: is --server the admin HTTP port \
         (--admin-listen) rather than the gRPC port (--listen, 50051 by default)?\n"
    );

    // Durations: one parser, with examples.
    for (args, bad) in [
        (
            &[
                "rules",
                "add",
                "r",
                "--severity",
                "info",
                "--silence",
                "forever",
            ][..],
            "forever",
        ),
        (&["command", "send", "d", "ping", "--ttl", "5"], "5"),
    ] {
        let run = op(&server, args);
        assert_eq!(run.code, 2, "clap's usage error: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("`{bad}` is not a duration (")),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr
                .contains("e.g. 500ms, 30s, 5m, 1h30m (units: ms, s, m, h, d)"),
            "{}",
            run.stderr
        );
    }

    // An unknown command kind lists the kinds.
    server.register("pump-1").await;
    let run = op(&server, &["command", "send", "pump-1", "blink"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    assert_eq!(
        run.stderr,
        "error: unknown command kind `blink`: the kinds are set-interval DURATION, \
         set-batch-size N, enable-sensor SENSOR, disable-sensor SENSOR, reboot, ping, \
         custom JSON (see `ingest command send --help`)\n"
    );

    // --wait on a device that is offline: the command stays queued, and
    // the operator is told so (exit 2: the wait ran out).
    let run = op(
        &server,
        &["command", "send", "pump-1", "ping", "--wait", "200ms"],
    );
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("QUEUED"), "{}", run.stdout);
    assert!(
        run.stderr.starts_with("device pump-1 is offline: command ")
            && run
                .stderr
                .contains(" stays queued until it connects (or expires at 20"),
        "{}",
        run.stderr
    );

    // A cursor file in a directory that does not exist: said at start.
    let run = op(
        &server,
        &[
            "alerts",
            "watch",
            "--cursor-file",
            "/nonexistent-dir/cursor",
        ],
    );
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr,
        "error: the directory of --cursor-file /nonexistent-dir/cursor does not exist: create \
         it (mkdir -p /nonexistent-dir) or name another file\n"
    );
}

async fn alerts_watch_starts_from_now(backend: Backend) {
    use crate::common::alert_helpers::{alert_server, put, temperatures, too_hot};
    use std::io::BufRead;
    let Some(server) = alert_server(backend).await else {
        return;
    };
    put(&mut server.ops().await, too_hot()).await;
    let token = server.register("d1").await;
    let mut device = server.ingest(&token).await;
    // An alert fires before the watch starts (in the upload's commit): a
    // watch from now does not show it.
    let start = now_nanos() - 60 * SEC;
    temperatures(&mut device, 1, start, &[45.0]).await;
    let stored = "SELECT COUNT(*) FROM alert_events";
    assert_eq!(server.storage.scalar(stored).await, 1);

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args([
            "alerts",
            "watch",
            "--json",
            "--heartbeats",
            "--server",
            &server.url(),
        ])
        .env("INGEST_OPS_TOKEN", OPS_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = move || -> serde_json::Value {
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
    };
    // The first line is the server naming the start.
    let first = tokio::task::block_in_place(&mut next);
    assert_eq!(first["kind"], "heartbeat", "{first}");
    // Then only what happens from now on: the alert resolving.
    temperatures(&mut device, 2, start + SEC, &[20.0]).await;
    let event = tokio::task::block_in_place(|| {
        loop {
            let line = next();
            if line["kind"] != "heartbeat" {
                break line;
            }
        }
    });
    assert_eq!(event["kind"], "resolved", "{event}");
    child.kill().unwrap();
    child.wait().unwrap();
}

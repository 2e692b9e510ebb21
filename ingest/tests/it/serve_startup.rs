//! `ingest serve` refusing to start, as an operator meets it: the real
//! binary, its stderr and exit code, within a deadline (issue 25). And the
//! start-up log lines on SQLite.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far more than any refusal here may take: the point is failing fast,
/// and the PostgreSQL probe gives up after 5 s at worst.
const DEADLINE: Duration = Duration::from_secs(30);

struct Refusal {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

/// Runs `ingest serve ARGS` (data in a fresh directory, logs off) and waits
/// for it to exit; kills it and fails past [`DEADLINE`].
fn serve_refused(args: &[&str]) -> Refusal {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "off")
        .env_remove("INGEST_DATABASE_URL")
        .env_remove("INGEST_LISTEN")
        .env_remove("INGEST_ADMIN_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("`ingest serve {args:?}` still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Refusal {
        code: status.code(),
        stderr: reader.join().unwrap(),
        took: started.elapsed(),
    }
}

/// `serve` on the database at `url`, which must refuse it (exit code 1).
fn serve_on_database(url: &str) -> Refusal {
    let args = ["--listen", "127.0.0.1:0", "--admin-listen", ""];
    let run = serve_refused(&[&args[..], &["--database-url", url]].concat());
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    run
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_unreachable_postgresql_is_named_once_and_at_once() {
    let port = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/telemetry");
    let run = serve_on_database(&url);
    assert_eq!(
        run.stderr,
        format!(
            "error: opening the database: cannot reach PostgreSQL at 127.0.0.1:{port}: connection refused\n"
        )
    );
    assert!(
        run.took < Duration::from_secs(10),
        "took {:?}: no pool timeout",
        run.took
    );
}

#[test]
fn a_missing_database_is_named_with_the_createdb_command() {
    let admin_url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let options: sqlx::postgres::PgConnectOptions = admin_url.parse().unwrap();
    let (host, port) = (options.get_host().to_owned(), options.get_port());
    // Reachable? Without PostgreSQL this case cannot be shown.
    if std::net::TcpStream::connect((host.as_str(), port)).is_err() {
        assert!(
            std::env::var("REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "REQUIRE_POSTGRES=1 but PostgreSQL at {host}:{port} is unreachable"
        );
        eprintln!("SKIPPED: PostgreSQL at {host}:{port} is unreachable");
        return;
    }
    let name = format!("ingest_missing_{}", std::process::id());
    let url = format!("postgres://{}@{host}:{port}/{name}", options.get_username());
    let run = serve_on_database(&url);
    assert_eq!(
        run.stderr,
        format!(
            "error: opening the database: database `{name}` does not exist on {host}:{port}: \
             create it with `createdb -h {host} -p {port} {name}`\n"
        )
    );
}

#[test]
fn a_taken_admin_port_names_the_flag_and_how_to_turn_it_off() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = serve_refused(&["--listen", "127.0.0.1:0", "--admin-listen", &addr]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let prefix = format!(
        "error: cannot listen on {addr} for the admin HTTP endpoint (/metrics, /healthz, /readyz): "
    );
    let suffix = "; choose another address with `--admin-listen ADDR`, \
                  or turn it off with `--admin-listen ''`\n";
    assert!(
        run.stderr.starts_with(&prefix) && run.stderr.ends_with(suffix),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
}

#[test]
fn a_listen_address_without_a_port_or_with_a_scheme_gets_an_example() {
    let example =
        "--listen wants HOST:PORT, e.g. 127.0.0.1:50051 (0.0.0.0:50051 for every interface)";
    for (value, why) in [
        ("http://127.0.0.1:50051", "without a scheme such as http://"),
        ("127.0.0.1", "the port is missing"),
        ("127.0.0.1:", "the port is missing"),
        (
            "localhost:50051",
            "HOST is an IP address (names such as localhost are not looked up)",
        ),
    ] {
        let run = serve_refused(&["--listen", value, "--admin-listen", ""]);
        // clap's usage error.
        assert_eq!(run.code, Some(2), "{value}: {}", run.stderr);
        let want = format!("{example}; {why}");
        assert!(
            run.stderr.starts_with(&format!(
                "error: invalid value '{value}' for '--listen <LISTEN>': {want}\n"
            )),
            "{value}: {}",
            run.stderr
        );
    }
}

/// On SQLite the server is the only process: no "replica registered"; the
/// admin listener's address is logged as an address, not `Some(..)`.
#[test]
fn sqlite_start_up_logs_name_no_replica_and_a_plain_admin_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("INGEST_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Logs go to stderr.
    let stdout = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    let admin = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = child.kill();
            panic!(
                "no admin listener line within {DEADLINE:?}:\n{}",
                seen.join("\n")
            );
        };
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        seen.push(line);
        let message = value["fields"]["message"].as_str().unwrap_or_default();
        if message.starts_with("admin listener") {
            break value;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    // "replica registered" would come before "serving", which comes before
    // the admin listener's line.
    assert!(
        !seen.iter().any(|l| l.contains("replica registered")),
        "{}",
        seen.join("\n")
    );
    let addr = admin["fields"]["addr"].as_str().unwrap();
    assert!(
        addr.parse::<std::net::SocketAddr>().is_ok(),
        "admin addr {addr:?}"
    );
}

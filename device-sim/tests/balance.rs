//! The real device-sim binary against two real ingest servers at once
//! (`--server a,b`): the fleet's streams land on both, and when one server
//! is killed the fleet goes on against the other.
//!
//! Scale-out runs several server processes on one PostgreSQL; here each
//! server has its own SQLite, a copy of the other's taken after the devices
//! were registered, so a device's token is valid on both. The servers'
//! own /metrics say how many readings each committed and how many streams
//! each holds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ingest::auth::OpsTokenSource;
use ingest::domain::Token;
use ingest::storage::Database;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1::RegisterDeviceRequest;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::runtime::Runtime;

const OPS_TOKEN: &str = "ops_balance_test_token";
const DEVICES: u32 = 16;

/// A real server in a runtime of its own: shutting that runtime down drops
/// the server and every connection task at once, without a goodbye, which
/// is what a killed process looks like to its clients.
struct Server {
    url: String,
    admin: SocketAddr,
    runtime: Option<Runtime>,
}

impl Server {
    fn start(data_dir: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        let bind = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("non-blocking");
            listener
        };
        let (grpc, admin) = (bind(), bind());
        let url = format!("http://{}", grpc.local_addr().expect("addr"));
        let admin_addr = admin.local_addr().expect("admin addr");
        let config = ingest::Config::new(
            data_dir.to_owned(),
            Database::Sqlite {
                path: data_dir.join("telemetry.db"),
            },
            OpsTokenSource::Value(Token::new(OPS_TOKEN.into())),
        );
        {
            let _entered = runtime.enter();
            let grpc = tokio::net::TcpListener::from_std(grpc).expect("grpc listener");
            let admin = tokio::net::TcpListener::from_std(admin).expect("admin listener");
            runtime.spawn(ingest::server::run_with_admin(
                config,
                grpc,
                Some(admin),
                std::future::pending(),
            ));
        }
        Self {
            url,
            admin: admin_addr,
            runtime: Some(runtime),
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// The sum of the samples of `metric` carrying every label of `labels`.
    async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, text) = ingest::server::admin::get(self.admin, "/metrics")
            .await
            .expect("scrape");
        assert_eq!(status, 200);
        ingest::server::admin::sum(&text, metric, labels)
    }

    async fn committed(&self) -> f64 {
        self.metric("ingest_readings_total", &[("outcome", "committed")])
            .await
    }

    async fn control_streams(&self) -> f64 {
        self.metric("ingest_streams", &[("kind", "control")]).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two servers whose databases both know the fleet's devices, and the
/// credentials file holding their tokens.
async fn two_servers(dir: &Path) -> (Server, Server, PathBuf) {
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&dir_b).expect("dir b");
    let a = Server::start(&dir_a);
    let channel = tonic::transport::Endpoint::from_shared(a.url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("server a answers");
    let mut ops = OpsClient::with_interceptor(channel, Bearer::new(OPS_TOKEN).expect("token"));
    let mut credentials = serde_json::Map::new();
    for n in 1..=DEVICES {
        let device_id = format!("sim-{n:05}");
        let token = ops
            .register_device(RegisterDeviceRequest {
                device_id: device_id.clone(),
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner()
            .token;
        credentials.insert(device_id, token.into());
    }
    let credentials_file = dir.join("credentials.json");
    std::fs::write(
        &credentials_file,
        serde_json::to_vec(&credentials).expect("json"),
    )
    .expect("write credentials");
    ingest::storage::backup::sqlite(&dir_a.join("telemetry.db"), &dir_b.join("telemetry.db"))
        .await
        .expect("copy a's database for b");
    let b = Server::start(&dir_b);
    (a, b, credentials_file)
}

/// device-sim, quiet, with its JSON report in `dir`.
fn device_sim(dir: &Path, servers: &[&Server], credentials: &Path, duration: &str) -> Child {
    let servers: Vec<&str> = servers.iter().map(|s| s.url.as_str()).collect();
    Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(["--server", &servers.join(",")])
        .args(["--devices", &DEVICES.to_string()])
        .args(["--sample-rate", "100", "--batch-size", "10"])
        .args(["--duration", duration, "--quiet"])
        .arg("--credentials-file")
        .arg(credentials)
        .arg("--report-json")
        .arg(dir.join("report.json"))
        .env("DEVICE_SIM_OPS_TOKEN", OPS_TOKEN)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("start device-sim")
}

/// Waits for device-sim to exit and returns its JSON report.
async fn report(dir: &Path, mut child: Child) -> serde_json::Value {
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("device-sim exits");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report"))
            .expect("report is JSON");
    assert!(status.success(), "device-sim failed: {report:#}");
    report
}

/// Polls `condition` until it holds, failing after `within`.
async fn eventually<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut condition: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_spreads_its_streams_over_every_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b, credentials) = two_servers(dir.path()).await;
    let child = device_sim(dir.path(), &[&a, &b], &credentials, "30s");
    // Every device holds one Control stream for the whole run: both
    // servers hold some, and together all of them.
    eventually(
        "all Control streams open",
        Duration::from_secs(20),
        || async { a.control_streams().await + b.control_streams().await == f64::from(DEVICES) },
    )
    .await;
    let (on_a, on_b) = (a.control_streams().await, b.control_streams().await);
    assert!(
        on_a > 0.0 && on_b > 0.0,
        "control streams: a {on_a}, b {on_b}"
    );
    // Uploads (one stream per batch here) land on both.
    eventually("uploads on both", Duration::from_secs(20), || async {
        a.committed().await > 0.0 && b.committed().await > 0.0
    })
    .await;
    // Stop early: SIGTERM settles the open streams and writes the report.
    sigterm(&child);
    let report = report(dir.path(), child).await;
    assert_eq!(report["devices_failed"], 0, "{report:#}");
    let committed = a.committed().await + b.committed().await;
    let accepted = report["readings_accepted"].as_f64().expect("number");
    assert!(accepted > 0.0);
    assert_eq!(
        committed, accepted,
        "every accepted reading is on one server"
    );
    assert!(report["wire_bytes_sent"].as_u64().expect("number") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_goes_on_when_one_server_is_killed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, mut b, credentials) = two_servers(dir.path()).await;
    let child = device_sim(dir.path(), &[&a, &b], &credentials, "30s");
    eventually("uploads on both", Duration::from_secs(20), || async {
        a.committed().await > 0.0 && b.committed().await > 0.0
    })
    .await;

    b.kill();
    // Every device's uploads and Control stream end up on a. A call that
    // lands on the dead server fails and the retry picks again at random,
    // so this takes a few backoffs.
    let after_kill = a.committed().await;
    eventually(
        "every Control stream on a",
        Duration::from_secs(30),
        || async { a.control_streams().await == f64::from(DEVICES) },
    )
    .await;
    let enough = after_kill + f64::from(DEVICES * 4 * 10 * 5);
    eventually("uploads go on on a", Duration::from_secs(20), || async {
        a.committed().await > enough
    })
    .await;

    sigterm(&child);
    let report = report(dir.path(), child).await;
    assert_eq!(report["devices_failed"], 0, "{report:#}");
    assert!(
        report["retries"].as_u64().expect("number") > 0,
        "{report:#}"
    );
}

/// Asks device-sim to stop as Ctrl-C would, through the `kill` command
/// (no libc in this crate's dependencies).
fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

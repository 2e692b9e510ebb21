//! Several real `ingest serve` processes on one fresh PostgreSQL database,
//! the harness of the scale-out tests. Each process is the built binary
//! with one worker thread, its own data directory and ports chosen by the
//! kernel; the tests reach it only through its gRPC and admin listeners, as
//! a load balancer's clients would. Processes can be SIGKILLed and started
//! again; every child is killed when the cluster is dropped, a panicking
//! test included, and a failing test prints every process's log.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_client::IngestClient;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{Backend, Bearer, Ingest, OPS_TOKEN, Ops, TestStorage};
use ingest::storage::Database;

use super::ControlDevice;
use super::admin::{self, Metrics};

/// A start (migrations, leases, listeners) may take this long on a busy
/// two-core machine before the test gives up on the process.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// SIGTERM to exit; the processes get a shorter `--shutdown-grace`.
pub const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// Lines of each log printed when a test fails (the whole file is kept).
const LOG_TAIL_LINES: usize = 200;

/// Scale-out tests start three processes each: run in parallel they would
/// put a dozen servers on two cores and turn lease timings into noise.
/// A tokio mutex, because each test has its own runtime and holds the
/// guard across awaits.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The flags every process of a cluster gets, before its own.
pub struct ClusterSpec {
    pub processes: usize,
    /// For every process, after the harness's own flags.
    pub args: Vec<String>,
    /// For one process only: `(index, flags)`.
    pub process_args: Vec<(usize, Vec<String>)>,
}

impl ClusterSpec {
    pub fn new(processes: usize) -> Self {
        Self {
            processes,
            args: Vec::new(),
            process_args: Vec::new(),
        }
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    pub fn process_args(mut self, index: usize, args: &[&str]) -> Self {
        self.process_args
            .push((index, args.iter().map(|a| (*a).to_owned()).collect()));
        self
    }
}

/// One `ingest serve` process, with what it needs to start again.
pub struct Node {
    pub index: usize,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// The thread copying the child's stderr into `log`; joined once the
    /// child is reaped, so the log is complete when printed.
    copier: Option<std::thread::JoinHandle<()>>,
    /// Of the newest start; a restart may get other ports.
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub starts: u32,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the copy of a reaped child's stderr to end.
    fn join_copier(&mut self) {
        if let Some(copier) = self.copier.take() {
            let _ = copier.join();
        }
    }
}

pub struct Cluster {
    pub storage: TestStorage,
    pub database_url: String,
    pub nodes: Vec<Node>,
    /// Logs, the ops token file and the data directories. Kept (and its
    /// path printed) when a test fails.
    dir: Option<tempfile::TempDir>,
    token_file: PathBuf,
    /// Last, so it is released after the children are gone.
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// `None` when PostgreSQL is unreachable and not required (the test is
    /// skipped, loudly, by [`TestStorage`]).
    pub async fn start(spec: ClusterSpec) -> Option<Self> {
        let serial = ONE_CLUSTER_AT_A_TIME.lock().await;
        let storage = TestStorage::new(Backend::Postgres).await?;
        let Database::Postgres { url } = &storage.database else {
            unreachable!("a PostgreSQL test storage");
        };
        let database_url = url.clone();
        let dir = tempfile::Builder::new()
            .prefix("ingest-cluster-")
            .tempdir()
            .unwrap();
        let token_file = dir.path().join("ops.tokens");
        std::fs::write(&token_file, format!("{OPS_TOKEN}\n")).unwrap();
        let nodes = (0..spec.processes)
            .map(|index| {
                let data_dir = dir.path().join(format!("p{index}"));
                std::fs::create_dir_all(&data_dir).unwrap();
                let mut args = vec![
                    "serve".to_owned(),
                    "--database-url".into(),
                    database_url.clone(),
                    "--ops-token-file".into(),
                    token_file.display().to_string(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                ];
                args.extend(spec.args.iter().cloned());
                for (i, extra) in &spec.process_args {
                    if *i == index {
                        args.extend(extra.iter().cloned());
                    }
                }
                Node {
                    index,
                    log: dir.path().join(format!("p{index}.log")),
                    data_dir,
                    args,
                    child: None,
                    copier: None,
                    addr: unbound(),
                    admin_addr: unbound(),
                    starts: 0,
                }
            })
            .collect();
        let mut cluster = Self {
            storage,
            database_url,
            nodes,
            dir: Some(dir),
            token_file,
            _one_at_a_time: serial,
        };
        // One after the other: concurrent first starts would race on the
        // migrations, which is a test of its own, not this harness's job.
        for i in 0..cluster.nodes.len() {
            cluster.start_process(i).await;
        }
        Some(cluster)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// Starts process `i` (again) and waits until it serves.
    pub async fn start_process(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "process {i} is already running");
        node.starts += 1;
        mark(&node.log, &format!("start #{}", node.starts));
        let started = spawn_logged(&node.args, &node.log);
        let (child, ready, copier) = match started {
            Ok(started) => started,
            Err(e) => self.fail(&format!("process {i}: cannot start: {e}")),
        };
        self.nodes[i].child = Some(child);
        self.nodes[i].copier = Some(copier);
        match self.wait_serving(i, ready).await {
            Ok((addr, admin_addr)) => {
                self.nodes[i].addr = addr;
                self.nodes[i].admin_addr = admin_addr;
            }
            Err(e) => self.fail(&format!("process {i}: {e}")),
        }
    }

    /// Reads the process's log lines until it has said where it serves,
    /// then polls its health service until it answers SERVING.
    async fn wait_serving(
        &mut self,
        i: usize,
        mut lines: mpsc::UnboundedReceiver<serde_json::Value>,
    ) -> Result<(SocketAddr, SocketAddr), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let (mut addr, mut admin_addr) = (None, None);
        while addr.is_none() || admin_addr.is_none() {
            if let Some(status) = self.exited(i) {
                return Err(format!("exited while starting ({status})"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "did not log its addresses within {START_DEADLINE:?} (serving: {addr:?}, admin: {admin_addr:?})"
                ));
            }
            // A bounded wait for the next line, so an exit is noticed.
            let line = match tokio::time::timeout(Duration::from_millis(100), lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    // stderr closed: the process is exiting; its status
                    // shows above once it is reaped.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_) => continue,
            };
            let message = line["fields"]["message"].as_str().unwrap_or_default();
            if message == "serving" {
                addr = Some(parse_addr(&line)?);
            } else if message.starts_with("admin listener") {
                admin_addr = Some(parse_addr(&line)?);
            }
        }
        let (addr, admin_addr) = (addr.unwrap(), admin_addr.unwrap());
        // "serving" is logged before the listener is polled: the process
        // is ready once its health service answers.
        let url = format!("http://{addr}");
        loop {
            if let Some(status) = self.exited(i) {
                return Err(format!("exited while starting ({status})"));
            }
            if health(&url).await {
                return Ok((addr, admin_addr));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{url} did not answer SERVING within {START_DEADLINE:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status, if process `i` has ended by itself.
    pub fn exited(&mut self, i: usize) -> Option<ExitStatus> {
        let child = self.nodes[i].child.as_mut()?;
        let status = child.try_wait().unwrap()?;
        self.nodes[i].child = None;
        self.nodes[i].join_copier();
        Some(status)
    }

    /// SIGKILL: no shutdown, no lease released, nothing flushed.
    pub async fn kill9(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut child = node.child.take().expect("kill9 of a process not running");
        // On Unix, Child::kill is SIGKILL; the wait reaps it at once.
        child.kill().unwrap();
        child.wait().unwrap();
        node.join_copier();
        mark(&node.log, "SIGKILL");
    }

    /// SIGTERM and wait for the exit: the process drains and stops.
    pub async fn stop(&mut self, i: usize) -> ExitStatus {
        let node = &mut self.nodes[i];
        let mut child = node.child.take().expect("stop of a process not running");
        mark(&node.log, "SIGTERM");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped, so the pid
        // cannot name another process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.nodes[i].join_copier();
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.nodes[i].join_copier();
                self.fail(&format!(
                    "process {i} did not exit within {STOP_DEADLINE:?} of SIGTERM"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then a start on the same data directory (new ports).
    pub async fn restart(&mut self, i: usize) -> ExitStatus {
        let status = self.stop(i).await;
        self.start_process(i).await;
        status
    }

    /// Process indexes running now.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect()
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    pub async fn channel(&self, i: usize) -> Channel {
        Channel::from_shared(self.url(i))
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to process {i} ({}): {e}", self.url(i)))
    }

    pub async fn ops(&self, i: usize) -> Ops {
        OpsClient::with_interceptor(self.channel(i).await, Bearer::new(OPS_TOKEN).unwrap())
    }

    pub async fn ingest(&self, i: usize, token: &str) -> Ingest {
        IngestClient::with_interceptor(self.channel(i).await, Bearer::new(token).unwrap())
    }

    /// A device's Control stream on process `i`.
    pub async fn control(&self, i: usize, token: &str) -> ControlDevice {
        ControlDevice::open(self.ingest(i, token).await, "cluster-test")
            .await
            .unwrap_or_else(|s| panic!("opening a Control stream on process {i}: {s}"))
    }

    /// Registers a device through the first running process; its token.
    pub async fn register(&self, device_id: &str) -> String {
        let i = self.running()[0];
        self.ops(i)
            .await
            .register_device(pb::RegisterDeviceRequest {
                device_id: device_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Registers `n` devices `<prefix>-000`...; (id, token) in order.
    pub async fn register_many(&self, prefix: &str, n: usize) -> Vec<(String, String)> {
        let mut ops = self.ops(self.running()[0]).await;
        let mut devices = Vec::with_capacity(n);
        for d in 0..n {
            let id = format!("{prefix}-{d:03}");
            let token = ops
                .register_device(pb::RegisterDeviceRequest {
                    device_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .token;
            devices.push((id, token));
        }
        devices
    }

    /// GET on process `i`'s admin listener: (status, body).
    pub async fn admin(&self, i: usize, path: &str) -> (u16, String) {
        admin::get(self.nodes[i].admin_addr, path)
            .await
            .unwrap_or_else(|e| panic!("admin {path} of process {i}: {e}"))
    }

    /// A gauge or counter of process `i`; `None` when not exported.
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        Metrics::scrape(self.nodes[i].admin_addr)
            .await
            .get(name, &[])
    }

    /// The running processes reporting `ingest_cluster_leader 1`.
    pub async fn leaders(&self) -> Vec<usize> {
        let mut leaders = Vec::new();
        for i in self.running() {
            if self.metric(i, "ingest_cluster_leader").await == Some(1.0) {
                leaders.push(i);
            }
        }
        leaders
    }

    /// Polls until exactly one running process reports itself leader.
    pub async fn wait_for_one_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let leaders = self.leaders().await;
            if let [one] = leaders[..] {
                return one;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "not exactly one leader within {within:?}: processes {leaders:?} report ingest_cluster_leader 1 (running: {:?})",
                    self.running()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the PostgreSQL sessions of this cluster's database whose
    /// `application_name` is LIKE `pattern`; how many.
    pub async fn terminate_backends(&self, pattern: &str) -> i64 {
        self.storage
            .scalar(&format!(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name LIKE '{pattern}'"
            ))
            .await
    }

    /// Sessions of this cluster's database whose `application_name` is
    /// LIKE `pattern`.
    pub async fn count_backends(&self, pattern: &str) -> i64 {
        self.storage
            .scalar(&format!(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name LIKE '{pattern}'"
            ))
            .await
    }

    /// Every process's log, the last lines of each.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out += &format!(
                "\n----- process {} ({}; {} start(s)) -----\n",
                node.index,
                node.log.display(),
                node.starts
            );
            out += &tail(&node.log, LOG_TAIL_LINES);
        }
        out
    }

    /// Panics with `why` and the logs (the directory is kept on drop).
    pub fn fail(&self, why: &str) -> ! {
        panic!("{why}\n{}", self.logs());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            node.join_copier();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            if let Some(dir) = self.dir.take() {
                eprintln!("cluster logs and data kept in {}", dir.keep().display());
            }
        }
    }
}

/// Starts `ingest ARGS` with one worker thread and JSON logs, its stderr
/// copied line by line into `log` and its JSON lines sent to the returned
/// receiver (which may be dropped: the copy goes on). The receiver ends,
/// and the returned thread finishes, once the copy is complete.
pub fn spawn_logged(
    args: &[String],
    log: &Path,
) -> std::io::Result<(
    Child,
    mpsc::UnboundedReceiver<serde_json::Value>,
    std::thread::JoinHandle<()>,
)> {
    let mut file = OpenOptions::new().create(true).append(true).open(log)?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    // Drop kills the children of a failing test; this covers a test
    // process that is itself killed (a CI timeout): the kernel sends the
    // child SIGKILL when the spawning thread exits. Spawns happen on the
    // test runtime's worker threads, which live as long as the test.
    // SAFETY: prctl is async-signal-safe, and the closure touches nothing
    // else between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = command
        .args(args)
        .args(["--log-format", "json"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--shutdown-grace", "5s"])
        .env("TOKIO_WORKER_THREADS", "1")
        .env("RUST_LOG", "info")
        // Nothing from the environment may point the process elsewhere.
        .env_remove("INGEST_DATABASE_URL")
        .env_remove("INGEST_DATA_DIR")
        .env_remove("INGEST_OPS_TOKEN")
        .env_remove("INGEST_LISTEN")
        .env_remove("INGEST_ADMIN_LISTEN")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::unbounded_channel();
    // A thread, not a task: it must outlive the test's runtime to drain
    // the pipe of a process that is still being killed.
    let copier = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(file, "{line}");
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = tx.send(value);
            }
        }
    });
    Ok((child, rx, copier))
}

/// `fields.addr` of a log line: `127.0.0.1:PORT`, or `Some(127.0.0.1:PORT)`
/// where the server logs an optional address with `?`.
fn parse_addr(line: &serde_json::Value) -> Result<SocketAddr, String> {
    let raw = line["fields"]["addr"]
        .as_str()
        .ok_or_else(|| format!("no fields.addr in {line}"))?;
    let bare = raw
        .strip_prefix("Some(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or(raw);
    bare.parse()
        .map_err(|e| format!("fields.addr {raw:?} of {line}: {e}"))
}

async fn health(url: &str) -> bool {
    let Ok(endpoint) = Channel::from_shared(url.to_owned()) else {
        return false;
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1));
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    // The empty service name is the server as a whole.
    match HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
    {
        Ok(r) => r.into_inner().status() == ServingStatus::Serving,
        Err(_) => false,
    }
}

fn unbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// A marker line in a process's log, so a reader sees where the test struck.
fn mark(log: &Path, what: &str) {
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "===== cluster harness: {what} =====");
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})\n"));
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    let mut out = String::new();
    if from > 0 {
        out += &format!("... {from} earlier lines in the file\n");
    }
    for line in &lines[from..] {
        out += line;
        out.push('\n');
    }
    out
}

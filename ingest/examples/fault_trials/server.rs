//! The server under test as a child process: started, killed with SIGKILL,
//! restarted on the same address, stopped with SIGTERM. With `--processes`
//! several of them serve one PostgreSQL database, each with its own data
//! directory and the trial's shared ops token file.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a start may take before the trial gives up on the server.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long a SIGTERM may take; the server's own grace is set below it.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

pub struct Server {
    bin: PathBuf,
    data_dir: PathBuf,
    database_url: String,
    /// Chosen once per trial, so the fleet reconnects to the same address
    /// after every restart, as a real fleet would.
    addr: SocketAddr,
    /// The MQTT listener's.
    mqtt_addr: SocketAddr,
    pub log: PathBuf,
    /// Shared by every process of a cluster trial; `None`: the server
    /// generates its token in its data directory.
    ops_token_file: Option<PathBuf>,
    /// Appended to every `ingest serve` (`--server-arg`).
    extra_args: Vec<String>,
    child: Option<Child>,
    /// Exits nobody asked for (e.g. the server gave up on its database).
    pub unexpected_exits: Vec<String>,
}

impl Server {
    pub fn new(bin: &Path, data_dir: &Path, database_url: String) -> anyhow::Result<Self> {
        // Binding port 0 and letting go leaves a small window in which
        // another process may take the port; on a CI machine that is rare,
        // and a start failure says so in the log.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("choosing a port")?;
        let mqtt_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("choosing a port")?;
        Ok(Self {
            mqtt_addr,
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
            database_url,
            addr,
            log: data_dir.join("server.log"),
            ops_token_file: None,
            extra_args: Vec::new(),
            child: None,
            unexpected_exits: Vec::new(),
        })
    }

    /// One process of several: they share the ops token in this file.
    pub fn with_ops_token_file(mut self, file: &Path) -> Self {
        self.ops_token_file = Some(file.to_owned());
        self
    }

    /// Flags added to every start.
    pub fn with_args(mut self, args: &[String]) -> Self {
        self.extra_args = args.to_vec();
        self
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ops_token(&self) -> anyhow::Result<String> {
        let token =
            std::fs::read_to_string(self.ops_token_path()).context("reading the ops token")?;
        Ok(token.trim().to_owned())
    }

    fn ops_token_path(&self) -> PathBuf {
        match &self.ops_token_file {
            Some(file) => file.clone(),
            None => self.data_dir.join("ops.token"),
        }
    }

    /// Starts the server and waits until its health check says SERVING.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening the server log")?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(["--shutdown-grace", "5s"])
            .arg("--mqtt-listen")
            .arg(self.mqtt_addr.to_string())
            // Port 0: several servers (or trials) must not share the
            // default admin port.
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(
                self.ops_token_file
                    .iter()
                    .flat_map(|f| [OsStr::new("--ops-token-file"), f.as_os_str()]),
            )
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        let endpoint = Endpoint::from_shared(self.url())?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1));
        loop {
            if let Some(status) = self.exited()? {
                anyhow::bail!("the server exited while starting ({status})");
            }
            if let Ok(channel) = endpoint.connect().await
                && serving(channel).await
                && self.ops_token_path().is_file()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server was not serving within {START_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status, if the child has ended by itself.
    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// Notes an exit nobody asked for and starts the server again, as a
    /// service manager would. Returns whether it had exited.
    pub async fn supervise(&mut self) -> anyhow::Result<bool> {
        let Some(status) = self.exited()? else {
            return Ok(false);
        };
        self.unexpected_exits.push(status.to_string());
        self.child = None;
        self.start().await?;
        Ok(true)
    }

    /// SIGKILL: no shutdown, no flush, whatever was in flight.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // On Unix, Child::kill sends SIGKILL.
            let _ = child.kill();
            wait(child, STOP_DEADLINE).await?;
        }
        Ok(())
    }

    /// SIGTERM and wait: the server drains and exits.
    pub async fn stop(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.child.take() else {
            return Ok(None);
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) with a pid we spawned and have not reaped, so it
        // cannot name another process.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            anyhow::bail!("SIGTERM failed: {}", std::io::Error::last_os_error());
        }
        wait(child, STOP_DEADLINE).await.map(Some)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A trial that failed half-way must not leave a server behind.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn serving(channel: Channel) -> bool {
    let mut health = HealthClient::new(channel);
    // The empty service name is the server as a whole.
    match health.check(HealthCheckRequest::default()).await {
        Ok(r) => r.into_inner().status() == ServingStatus::Serving,
        Err(_) => false,
    }
}

/// Polls for the child's exit; SIGKILLs it past the deadline.
async fn wait(mut child: Child, deadline: Duration) -> anyhow::Result<ExitStatus> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let status = child.wait()?;
            anyhow::bail!("the server did not exit within {deadline:?}; killed ({status})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Opens the log for appending a marker line, so a reader of the log sees
/// where the harness struck.
pub fn mark(log: &Path, what: &str) {
    use std::io::Write;
    if let Ok(mut f) = OpenOptions::new().append(true).open(log) {
        let _ = writeln!(f, "===== fault_trials: {what} =====");
    }
}

//! `ingest alerts list | ack | watch`.
//!
//! `watch` is meant to run unattended (piped into a notifier, under a service
//! manager), so it outlives server restarts: it reconnects forever and
//! resumes after the last event it printed, optionally remembering that
//! event across its own restarts in a cursor file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand};
use telemetry_proto::v1 as pb;
use tonic::Code;

use telemetry_client::backoff::Backoff;
use telemetry_client::status::{is_retryable, retry_delay};

use super::client::{Ops, ServerArgs};
use super::output::{Answer, Column, Table, number, or_dash, status_error, time};
use super::rules::{SeverityArg, severity_json, severity_name};

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// List open alerts (or, with --all, resolved ones too, most recent
    /// first).
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Include resolved alerts.
        #[arg(long)]
        all: bool,
        /// Only alerts of this device; repeat for more.
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
        /// At most this many alerts (default: the server's, 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge an open alert (an operator is on it) and print it.
    Ack {
        #[command(flatten)]
        server: ServerArgs,
        /// The alert's id (see `ingest alerts list`).
        alert_id: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print alert events as they happen, reconnecting whenever the server
    /// goes away.
    Watch(Box<WatchArgs>),
}

#[derive(Debug, Args)]
#[command(after_help = "\
Where it starts: after the event id saved in --cursor-file if that file exists;
otherwise from now (only events from now on), or, with --from-start, from the
first stored event (every stored event is replayed, then live ones follow).

With --cursor-file the id of each event is saved (atomically, after the event
was printed and stdout flushed), so a restarted watcher prints every event at
least once and never skips one.

Ctrl-C or SIGTERM exits with status 0.")]
pub struct WatchArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Only events of this severity or higher.
    #[arg(long, value_enum, value_name = "SEVERITY")]
    min_severity: Option<SeverityArg>,
    /// Only events of this device; repeat for more.
    #[arg(long = "device", value_name = "ID")]
    devices: Vec<String>,
    /// Only events of this rule; repeat for more.
    #[arg(long = "rule", value_name = "ID")]
    rules: Vec<String>,
    /// Resume after the event id saved in this file, and keep it up to date.
    #[arg(long, value_name = "PATH")]
    cursor_file: Option<PathBuf>,
    /// Without a saved cursor, replay every stored event first (by default
    /// the watch starts from now).
    #[arg(long)]
    from_start: bool,
    /// Also print the heartbeats the server sends on a quiet stream.
    #[arg(long)]
    heartbeats: bool,
    /// Reconnect when nothing, not even a heartbeat, arrived for this long
    /// (3x the server's heartbeat interval); 0 disables the check.
    #[arg(long, value_name = "DURATION", default_value = "15s",
          value_parser = super::duration)]
    stall_timeout: Duration,
}

pub async fn run(cmd: AlertsCommand) -> anyhow::Result<()> {
    match cmd {
        AlertsCommand::List {
            server,
            all,
            devices,
            limit,
            json,
        } => {
            let alerts = server
                .call(async |ops| {
                    ops.list_alerts(pb::ListAlertsRequest {
                        include_resolved: all,
                        device_ids: devices,
                        limit: limit.unwrap_or(0),
                    })
                    .await
                })
                .await?
                .alerts;
            Answer::stdout(json).list(&alerts, alert_json, table)?;
        }
        AlertsCommand::Ack {
            server,
            alert_id,
            json,
        } => {
            let alert = server
                .call(async |ops| ops.ack_alert(pb::AckAlertRequest { alert_id }).await)
                .await?;
            Answer::stdout(json).one(&alert, alert_json, |a| table(std::slice::from_ref(a)))?;
        }
        AlertsCommand::Watch(args) => {
            tokio::select! {
                result = watch(&args) => result?,
                () = crate::server::shutdown::signal() => {}
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// list, ack
// ---------------------------------------------------------------------------

fn alert_state(alert: &pb::Alert) -> &'static str {
    if !alert.open {
        "resolved"
    } else if alert.acked {
        "acked"
    } else {
        "open"
    }
}

fn alert_json(a: &pb::Alert) -> serde_json::Value {
    serde_json::json!({
        "alert_id": a.alert_id,
        "state": alert_state(a),
        "rule_id": a.rule_id,
        "device_id": a.device_id,
        "sensor": a.sensor,
        "severity": severity_json(a.severity),
        "open": a.open,
        "acked": a.acked,
        "fired_value": a.fired_value,
        "fired_time_unix_nano": a.fired_time_unix_nano,
        "acked_time_unix_nano": a.acked_time_unix_nano,
        "resolved_time_unix_nano": a.resolved_time_unix_nano,
        "message": a.message,
    })
}

fn table(alerts: &[pb::Alert]) -> Table {
    Table::new([
        Column::right("ALERT"),
        Column::left("STATE").keep(),
        Column::left("SEVERITY").keep(),
        Column::left("RULE"),
        Column::left("DEVICE"),
        Column::left("SENSOR"),
        Column::right("VALUE"),
        Column::time("FIRED (UTC)"),
    ])
    .rows(alerts, |a| {
        [
            a.alert_id.to_string(),
            alert_state(a).to_owned(),
            severity_name(a.severity).to_owned(),
            a.rule_id.clone(),
            a.device_id.clone(),
            or_dash(&a.sensor).to_owned(),
            a.fired_value.map_or_else(|| "-".into(), number),
            time(a.fired_time_unix_nano),
        ]
    })
}

// ---------------------------------------------------------------------------
// watch
// ---------------------------------------------------------------------------

async fn watch(args: &WatchArgs) -> anyhow::Result<()> {
    let saved = match &args.cursor_file {
        Some(path) => {
            check_cursor_directory(path)?;
            read_cursor(path)?
        }
        None => None,
    };
    let mut printer = Printer {
        cursor: saved.unwrap_or(0),
        started: saved.is_some() || args.from_start,
        cursor_file: args.cursor_file.clone(),
        json: args.json,
        heartbeats: args.heartbeats,
    };
    match saved {
        Some(cursor) => tracing::info!("watching alerts after event {cursor} (saved cursor)"),
        None if args.from_start => tracing::info!("watching alerts from the first stored event"),
        None => tracing::info!("watching alerts from now (--from-start replays stored ones)"),
    }
    let stall = (!args.stall_timeout.is_zero()).then_some(args.stall_timeout);
    let mut backoff = Backoff::default();
    let mut out = std::io::stdout();
    let mut reconnecting = false;
    loop {
        let Interrupted {
            delivered,
            reason,
            retry_after,
        } = watch_once(args, reconnecting, stall, &mut printer, &mut out).await?;
        reconnecting = true;
        if delivered {
            backoff.reset();
        }
        let delay = backoff.next_delay_with(retry_after, &mut rand::rng());
        tracing::warn!(
            "{reason}; reconnecting in {} (after event {})",
            humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
            printer.cursor
        );
        tokio::time::sleep(delay).await;
    }
}

/// A watch stream that ended in a way worth retrying.
#[derive(Debug)]
struct Interrupted {
    /// Whether the stream delivered anything, i.e. the server was reachable
    /// and serving, so the backoff starts over.
    delivered: bool,
    reason: String,
    /// How long the server asked the watcher to wait (RetryInfo).
    retry_after: Option<Duration>,
}

impl Interrupted {
    fn new(delivered: bool, reason: impl Into<String>) -> Self {
        Self {
            delivered,
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// One connection: connect, watch from the cursor, print until the stream
/// ends. `Ok` asks for a retry, `Err` is fatal.
async fn watch_once(
    args: &WatchArgs,
    reconnect: bool,
    stall: Option<Duration>,
    printer: &mut Printer,
    out: &mut impl Write,
) -> anyhow::Result<Interrupted> {
    // A fresh connection every time: after a stall the old one may be a
    // black hole that the channel would happily keep using.
    let mut ops = match within(stall, connect(&args.server)).await {
        None => return Ok(Interrupted::new(false, "connecting timed out")),
        Some(Err(Connect::Transient(error))) => {
            return Ok(Interrupted::new(false, format!("{error:#}")));
        }
        Some(Err(Connect::Fatal(error))) => return Err(error),
        Some(Ok(ops)) => ops,
    };
    let request = pb::WatchAlertsRequest {
        from_now: !printer.started,
        after_event_id: printer.cursor,
        min_severity: args
            .min_severity
            .map_or(pb::Severity::Unspecified, pb::Severity::from)
            .into(),
        device_ids: args.devices.clone(),
        rule_ids: args.rules.clone(),
    };
    let mut stream = match within(stall, ops.watch_alerts(request)).await {
        None => return Ok(Interrupted::new(false, "the server did not answer")),
        Some(Err(status)) => return classify(status, false),
        Some(Ok(response)) => response.into_inner(),
    };
    if reconnect {
        tracing::info!("reconnected; resuming after event {}", printer.cursor);
    }
    let mut delivered = false;
    loop {
        let event = match within(stall, stream.message()).await {
            None => {
                let stall = stall.map_or(0, |d| d.as_millis() as u64);
                return Ok(Interrupted::new(
                    delivered,
                    format!(
                        "nothing, not even a heartbeat, for {}",
                        humantime::format_duration(Duration::from_millis(stall))
                    ),
                ));
            }
            Some(Err(status)) => return classify(status, delivered),
            Some(Ok(None)) => {
                return Ok(Interrupted::new(delivered, "the server ended the stream"));
            }
            Some(Ok(Some(event))) => event,
        };
        delivered = true;
        printer.handle(out, &event, SystemTime::now())?;
    }
}

/// `fut`, given up on after `limit` (`None`) when there is a limit.
async fn within<F: Future>(limit: Option<Duration>, fut: F) -> Option<F::Output> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, fut).await.ok(),
        None => Some(fut.await),
    }
}

enum Connect {
    Transient(anyhow::Error),
    Fatal(anyhow::Error),
}

/// `ServerArgs::ops` connects eagerly, which is what a retry loop wants;
/// only its transport failures (refused, unreachable) are worth retrying,
/// not a missing token file or a malformed address.
async fn connect(server: &ServerArgs) -> Result<Ops, Connect> {
    server.ops().await.map_err(|error| {
        if error
            .chain()
            .any(|e| e.is::<tonic::transport::Error>() || e.is::<super::client::NoServer>())
        {
            Connect::Transient(error)
        } else {
            Connect::Fatal(error)
        }
    })
}

/// A transient code (the server is down, restarting or overloaded, or the
/// connection broke) or a status with a retry delay is worth retrying;
/// anything else (UNAUTHENTICATED, INVALID_ARGUMENT, UNIMPLEMENTED, ...)
/// would fail the same way forever. RESOURCE_EXHAUSTED is retried even
/// without a delay: a watcher that runs unattended should outlast a
/// server that is short of something for a while.
fn classify(status: tonic::Status, delivered: bool) -> anyhow::Result<Interrupted> {
    if is_retryable(&status) || status.code() == Code::ResourceExhausted {
        Ok(Interrupted {
            retry_after: retry_delay(&status),
            ..Interrupted::new(
                delivered,
                format!("{:?}: {}", status.code(), status.message()),
            )
        })
    } else {
        Err(status_error(status))
    }
}

/// Prints events and keeps the cursor.
struct Printer {
    /// The id of the last event printed (or heartbeat seen): where a
    /// reconnect resumes.
    cursor: u64,
    /// Whether the cursor is where to resume: false for a watch from now
    /// until the server named the start.
    started: bool,
    cursor_file: Option<PathBuf>,
    json: bool,
    heartbeats: bool,
}

impl Printer {
    fn handle(
        &mut self,
        out: &mut impl Write,
        event: &pb::AlertEvent,
        received: SystemTime,
    ) -> anyhow::Result<()> {
        let heartbeat = event.kind == pb::AlertEventKind::Heartbeat as i32;
        if !heartbeat || self.heartbeats {
            Answer::new(&mut *out, self.json).one(
                event,
                |e| event_json(e, received),
                event_line,
            )?;
        }
        // The id must not reach the cursor file before the event reached
        // stdout's reader, or a crash in between would lose the event.
        out.flush()?;
        self.started = true;
        // Never backwards: a heartbeat of a filtered stream may carry an
        // older id than the last event printed.
        if event.event_id > self.cursor {
            self.cursor = event.event_id;
            if let Some(path) = &self.cursor_file {
                write_cursor(path, self.cursor)?;
            }
        }
        Ok(())
    }
}

/// Refuses a cursor file in a directory that does not exist at start,
/// rather than after the first event, when the watch would end.
fn check_cursor_directory(path: &Path) -> anyhow::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => anyhow::bail!(
            "the directory of --cursor-file {} does not exist: create it (mkdir -p {}) or name another file",
            path.display(),
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// The saved cursor; `None` if there is none yet. An empty file counts as
/// none: that is what a crash during the first write can leave behind, and
/// replaying is safe where skipping is not.
fn read_cursor(path: &Path) -> anyhow::Result<Option<u64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("reading the cursor file {}", path.display()));
        }
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).with_context(|| {
        format!(
            "the cursor file {} should hold an event id, not {text:?}",
            path.display()
        )
    })
}

/// Replaces the cursor file atomically, so a crash leaves either the old id
/// or the new one. No fsync: the watcher writes once per event, and a power
/// loss that drops the last few writes only means replaying those events.
fn write_cursor(path: &Path, event_id: u64) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{event_id}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("saving the cursor to {}", path.display()))
}

fn kind_name(kind: i32) -> &'static str {
    match pb::AlertEventKind::try_from(kind) {
        Ok(pb::AlertEventKind::Fired) => "fired",
        Ok(pb::AlertEventKind::Acked) => "acked",
        Ok(pb::AlertEventKind::Resolved) => "resolved",
        Ok(pb::AlertEventKind::Heartbeat) => "heartbeat",
        Ok(pb::AlertEventKind::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

fn nanos_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One JSON object per event. `received_unix_nano` is this process's clock
/// when the event arrived: minus `time_unix_nano` it is the alert latency.
fn event_json(e: &pb::AlertEvent, received: SystemTime) -> serde_json::Value {
    serde_json::json!({
        "event_id": e.event_id,
        "kind": kind_name(e.kind),
        "alert_id": e.alert_id,
        "rule_id": e.rule_id,
        "device_id": e.device_id,
        "sensor": e.sensor,
        "severity": severity_json(e.severity),
        "value": e.value,
        "time_unix_nano": e.time_unix_nano,
        "message": e.message,
        "received_unix_nano": nanos_since_epoch(received),
    })
}

/// E.g. `2026-11-23 22:51:20.123  FIRED     critical  rule=temp-high
/// device=sim-00003 sensor=temperature value=45.2  (alert 17, event 42) msg`
/// on one line; fixed-width columns up front so a scrolling terminal reads
/// like a table.
fn event_line(e: &pb::AlertEvent) -> String {
    let time = if e.time_unix_nano == 0 {
        format!("{:<23}", "-")
    } else {
        chrono::DateTime::from_timestamp_nanos(e.time_unix_nano as i64)
            .format("%Y-%m-%d %H:%M:%S%.3f")
            .to_string()
    };
    let kind = kind_name(e.kind).to_uppercase();
    if e.kind == pb::AlertEventKind::Heartbeat as i32 {
        return format!("{time}  {kind:<9} (event {})", e.event_id);
    }
    let mut line = format!(
        "{time}  {kind:<9} {:<8}  rule={} device={} sensor={}",
        severity_name(e.severity),
        or_dash(&e.rule_id),
        or_dash(&e.device_id),
        // An inactivity rule without a sensor watches any sensor.
        if e.sensor.is_empty() { "*" } else { &e.sensor },
    );
    if let Some(value) = e.value {
        line.push_str(&format!(" value={value}"));
    }
    line.push_str(&format!("  (alert {}, event {})", e.alert_id, e.event_id));
    if !e.message.is_empty() {
        line.push(' ');
        line.push_str(&e.message);
    }
    line
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: AlertsCommand,
    }

    fn fired() -> pb::AlertEvent {
        pb::AlertEvent {
            event_id: 42,
            kind: pb::AlertEventKind::Fired as i32,
            alert_id: 17,
            rule_id: "temp-high".into(),
            device_id: "sim-00003".into(),
            sensor: "temperature".into(),
            severity: pb::Severity::Critical as i32,
            value: Some(45.2),
            // 2026-11-23 22:51:20.123 UTC
            time_unix_nano: 1_795_474_280_123_456_789,
            message: "temperature 45.2 above 40".into(),
        }
    }

    fn heartbeat(event_id: u64) -> pb::AlertEvent {
        pb::AlertEvent {
            event_id,
            kind: pb::AlertEventKind::Heartbeat as i32,
            time_unix_nano: 1_795_474_280_123_456_789,
            ..Default::default()
        }
    }

    #[test]
    fn event_line_for_people() {
        assert_eq!(
            event_line(&fired()),
            "2026-11-23 22:51:20.123  FIRED     critical  rule=temp-high device=sim-00003 \
             sensor=temperature value=45.2  (alert 17, event 42) temperature 45.2 above 40"
        );
        let silent = pb::AlertEvent {
            kind: pb::AlertEventKind::Resolved as i32,
            sensor: String::new(),
            value: None,
            message: String::new(),
            severity: pb::Severity::Info as i32,
            ..fired()
        };
        assert_eq!(
            event_line(&silent),
            "2026-11-23 22:51:20.123  RESOLVED  info      rule=temp-high device=sim-00003 \
             sensor=*  (alert 17, event 42)"
        );
        assert_eq!(
            event_line(&heartbeat(7)),
            "2026-11-23 22:51:20.123  HEARTBEAT (event 7)"
        );
    }

    #[test]
    fn event_json_for_scripts() {
        let received = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_795_474_280_200_000_000);
        assert_eq!(
            event_json(&fired(), received),
            serde_json::json!({
                "event_id": 42,
                "kind": "fired",
                "alert_id": 17,
                "rule_id": "temp-high",
                "device_id": "sim-00003",
                "sensor": "temperature",
                "severity": "critical",
                "value": 45.2,
                "time_unix_nano": 1_795_474_280_123_456_789u64,
                "message": "temperature 45.2 above 40",
                "received_unix_nano": 1_795_474_280_200_000_000u64,
            })
        );
        let hb = event_json(&heartbeat(7), received);
        assert_eq!(hb["kind"], "heartbeat");
        assert_eq!(hb["value"], serde_json::Value::Null);
        assert_eq!(hb["severity"], serde_json::Value::Null);
    }

    #[test]
    fn cursor_file_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cursor");
        assert_eq!(read_cursor(&path).expect("absent is fine"), None);
        write_cursor(&path, 42).expect("write");
        assert_eq!(read_cursor(&path).expect("read"), Some(42));
        write_cursor(&path, u64::MAX).expect("overwrite");
        assert_eq!(read_cursor(&path).expect("read"), Some(u64::MAX));
        assert!(!dir.path().join("cursor.tmp").exists());

        std::fs::write(&path, " 7\n").expect("write");
        assert_eq!(read_cursor(&path).expect("read"), Some(7));
        std::fs::write(&path, "").expect("write");
        assert_eq!(read_cursor(&path).expect("empty is none"), None);
        std::fs::write(&path, "seven").expect("write");
        assert!(read_cursor(&path).is_err());
    }

    fn printer(cursor_file: Option<PathBuf>, heartbeats: bool) -> Printer {
        Printer {
            cursor: 0,
            started: true,
            cursor_file,
            json: false,
            heartbeats,
        }
    }

    #[test]
    fn heartbeats_advance_the_cursor_silently() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cursor");
        let mut p = printer(Some(path.clone()), false);
        let mut out = Vec::new();
        p.handle(&mut out, &fired(), SystemTime::now())
            .expect("handle");
        assert_eq!(read_cursor(&path).expect("read"), Some(42));
        p.handle(&mut out, &heartbeat(50), SystemTime::now())
            .expect("handle");
        assert_eq!(p.cursor, 50);
        assert_eq!(read_cursor(&path).expect("read"), Some(50));
        // An older id (a filtered stream's heartbeat) never moves it back.
        p.handle(&mut out, &heartbeat(3), SystemTime::now())
            .expect("handle");
        assert_eq!(p.cursor, 50);
        assert_eq!(read_cursor(&path).expect("read"), Some(50));
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("FIRED"));
    }

    #[test]
    fn heartbeats_are_printed_on_request() {
        let mut p = printer(None, true);
        p.json = true;
        let mut out = Vec::new();
        p.handle(&mut out, &heartbeat(5), SystemTime::now())
            .expect("handle");
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON object");
        assert_eq!(line["kind"], "heartbeat");
        assert_eq!(line["event_id"], 5);
    }

    /// A writer whose reader went away, like a closed pipe.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn an_event_not_printed_is_not_saved() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cursor");
        let mut p = printer(Some(path.clone()), false);
        let error = p
            .handle(&mut Closed, &fired(), SystemTime::now())
            .expect_err("closed pipe");
        // main treats a broken pipe as a normal end, so it must stay an
        // io::Error.
        assert_eq!(
            error
                .downcast_ref::<std::io::Error>()
                .map(std::io::Error::kind),
            Some(std::io::ErrorKind::BrokenPipe)
        );
        assert_eq!(p.cursor, 0);
        assert_eq!(read_cursor(&path).expect("read"), None);
    }

    #[test]
    fn only_transient_codes_are_retried() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(
                classify(tonic::Status::new(code, "x"), true).is_ok(),
                "{code:?}"
            );
        }
        for code in [
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            let error = classify(tonic::Status::new(code, "bad"), true).expect_err("fatal");
            assert_eq!(error.to_string(), format!("{code:?}: bad"));
        }
    }

    #[test]
    fn watch_arguments() {
        let cli = Cli::try_parse_from([
            "alerts",
            "watch",
            "--min-severity",
            "warning",
            "--device",
            "a",
            "--device",
            "b",
            "--rule",
            "r",
            "--cursor-file",
            "/tmp/c",
            "--stall-timeout",
            "0s",
        ])
        .expect("valid");
        let AlertsCommand::Watch(args) = cli.cmd else {
            panic!("not watch");
        };
        assert_eq!(args.min_severity, Some(SeverityArg::Warning));
        assert_eq!(args.devices, ["a", "b"]);
        assert_eq!(args.rules, ["r"]);
        assert_eq!(args.stall_timeout, Duration::ZERO);
        let cli = Cli::try_parse_from(["alerts", "watch"]).expect("valid");
        let AlertsCommand::Watch(args) = cli.cmd else {
            panic!("not watch");
        };
        assert_eq!(args.stall_timeout, Duration::from_secs(15));
        assert!(Cli::try_parse_from(["alerts", "watch", "--min-severity", "loud"]).is_err());
    }

    #[test]
    fn alert_states_and_table() {
        let alert = pb::Alert {
            alert_id: 17,
            rule_id: "temp-high".into(),
            device_id: "sim-00003".into(),
            sensor: "temperature".into(),
            severity: pb::Severity::Critical as i32,
            open: true,
            acked: false,
            fired_value: Some(45.2),
            fired_time_unix_nano: 1_795_474_280_123_456_789,
            ..Default::default()
        };
        assert_eq!(alert_state(&alert), "open");
        let acked = pb::Alert {
            acked: true,
            ..alert.clone()
        };
        assert_eq!(alert_state(&acked), "acked");
        let resolved = pb::Alert {
            open: false,
            acked: true,
            resolved_time_unix_nano: 1_795_474_300_000_000_000,
            ..alert.clone()
        };
        assert_eq!(alert_state(&resolved), "resolved");
        assert_eq!(alert_json(&resolved)["state"], "resolved");

        let text = table(&[alert, resolved]).to_string();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].trim_start().starts_with("ALERT  STATE"));
        assert!(lines[1].contains(" open "));
        assert!(lines[1].ends_with("45.2  2026-11-23T22:51:20Z"), "{text}");
        assert!(lines[2].contains(" resolved "), "{text}");
    }
}

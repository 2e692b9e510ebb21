//! `telemetry.v1.Ops`: the operator-facing service (device registry now;
//! alerts and commands arrive with their own modules).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use telemetry_proto::v1 as pb;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::alert_messages::{alert_to_pb, event_to_pb, rule_from_pb, rule_to_pb, severity_from_pb};
use super::command_messages::{command_to_pb, kind_from_pb, state_from_pb};
use super::feed_messages::{consumer_to_pb, item_to_pb, watch_from_pb};
use super::read_messages::{chunk_to_pb, query_from_pb};
use super::{convert, status};
use crate::alerts::watch::{WatchEnd, WatchItem};
use crate::alerts::{AlertEngine, WatchConfig, WatchFilter};
use crate::auth::{Credentials, Operator};
use crate::control::CommandCenter;
use crate::domain::alert::RuleId;
use crate::domain::consumer::ConsumerName;
use crate::domain::credential::InvalidCertificate;
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::domain::{CertFingerprint, Token};
use crate::domain::{DeviceId, DisplayName, Labels};
use crate::feed::Feed;
use crate::read::Reader;
use crate::storage::{NewDevice, Store};

/// The handles every Ops call may need, built by the wiring
/// (`server::run`).
pub struct OpsService {
    pub store: Store,
    pub alerts: AlertEngine,
    pub control: std::sync::Arc<CommandCenter>,
    pub credentials: std::sync::Arc<Credentials>,
    pub watch: WatchConfig,
    /// Ends watch streams when the server stops.
    pub shutdown: watch::Receiver<bool>,
    pub reader: Reader,
    pub feed: Feed,
    /// Devices one RegisterDevices call may create.
    pub max_register_devices: usize,
}

impl OpsService {
    /// `DisableDevice` and `EnableDevice`.
    async fn set_disabled(
        &self,
        device_id: &str,
        disabled: bool,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        let id = DeviceId::parse(device_id)?;
        let credentials = self.credentials.set_disabled(&id, disabled).await?;
        Ok(Response::new(convert::credentials(credentials)))
    }
}

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

type AlertStream = Pin<Box<dyn Stream<Item = Result<pb::AlertEvent, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ReadingsChunk, Status>> + Send>>;

/// Page tokens are the hex of the last id returned: opaque to clients, and
/// never mistaken for a device id typed by hand.
/// Ids a filter may list: enough for any dashboard, and a bound on what
/// one request makes the server hold and compare.
const MAX_FILTER_IDS: usize = 1000;

/// A request's list of device ids, each parsed: an id no device can have
/// is a mistake worth telling, and never reaches the database.
fn parse_device_ids(field: &str, ids: Vec<String>) -> Result<Vec<String>, Status> {
    check_filter_len(field, ids.len())?;
    for id in &ids {
        DeviceId::parse(id).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    }
    Ok(ids)
}

fn check_filter_len(field: &str, n: usize) -> Result<(), Status> {
    if n > MAX_FILTER_IDS {
        return Err(Status::invalid_argument(format!(
            "{field} lists {n} ids, at most {MAX_FILTER_IDS}"
        )));
    }
    Ok(())
}

/// A request's optional certificate, as its fingerprint.
fn certificate(pem: &str) -> Result<Option<CertFingerprint>, Status> {
    if pem.trim().is_empty() {
        return Ok(None);
    }
    CertFingerprint::of_pem(pem)
        .map(Some)
        .map_err(|e: InvalidCertificate| Status::invalid_argument(e.to_string()))
}

/// How many items a page holds: the default when the request says 0, and
/// never more than the most.
fn page_size(asked: u32) -> u32 {
    match asked {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// The token of the page after `items`, which were fetched one more than
/// `page_size`: the extra one, dropped here, tells whether another page
/// exists. Empty on the last page.
fn next_page_token<T>(items: &mut Vec<T>, page_size: u32, token: impl Fn(&T) -> String) -> String {
    if items.len() <= page_size as usize {
        return String::new();
    }
    items.truncate(page_size as usize);
    items.last().map(token).unwrap_or_default()
}

fn parse_page_token(token: &str) -> Result<Option<DeviceId>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token is not one this server returned");
    let bytes = hex::decode(token).map_err(|_| bad())?;
    let id = String::from_utf8(bytes).map_err(|_| bad())?;
    DeviceId::parse(&id).map(Some).map_err(|_| bad())
}

/// A device to register, checked, and its new token.
fn new_device(
    req: pb::RegisterDeviceRequest,
    created: UnixNanos,
) -> Result<(NewDevice, Token), Status> {
    let id = DeviceId::parse(&req.device_id)?;
    let display_name = DisplayName::parse(&req.display_name, &id)?;
    let labels = Labels::parse(req.labels)?;
    let certificate = certificate(&req.certificate_pem)?;
    if req.require_mtls && certificate.is_none() {
        return Err(Status::invalid_argument(
            "require_mtls needs certificate_pem: a device that must use mutual TLS needs a bound certificate",
        ));
    }
    let token = Token::generate("dev_");
    let device = NewDevice {
        id,
        display_name,
        labels,
        token_hash: token.hash(),
        created,
        certificate,
        require_mtls: req.require_mtls,
    };
    Ok((device, token))
}

#[tonic::async_trait]
impl pb::ops_server::Ops for OpsService {
    #[tracing::instrument(skip_all, fields(device = tracing::field::Empty))]
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let (device, token) = new_device(request.into_inner(), now_unix_nanos())?;
        tracing::Span::current().record("device", device.id.as_str());
        let record = self
            .store
            .register_device(&device)
            .await
            .map_err(|e| status::registration(e, &device.id))?;
        self.alerts
            .device_registered(
                record.pk,
                record.id.clone(),
                record.labels.clone(),
                record.created,
            )
            .await;
        tracing::info!("device registered");
        Ok(Response::new(pb::RegisterDeviceResponse {
            device: Some(convert::device(record)),
            token: token.expose().to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(devices = tracing::field::Empty))]
    async fn register_devices(
        &self,
        request: Request<pb::RegisterDevicesRequest>,
    ) -> Result<Response<pb::RegisterDevicesResponse>, Status> {
        let asked = request.into_inner().devices;
        tracing::Span::current().record("devices", asked.len());
        if asked.is_empty() {
            return Err(Status::invalid_argument(
                "devices is empty: nothing to register",
            ));
        }
        if asked.len() > self.max_register_devices {
            return Err(Status::invalid_argument(format!(
                "{} devices in one call; at most {} (--max-register-devices): send them in several calls",
                asked.len(),
                self.max_register_devices
            )));
        }
        let created = now_unix_nanos();
        let mut seen = std::collections::HashSet::with_capacity(asked.len());
        let mut devices = Vec::with_capacity(asked.len());
        let mut tokens = Vec::with_capacity(asked.len());
        for (i, req) in asked.into_iter().enumerate() {
            let (device, token) = new_device(req, created).map_err(|status| {
                Status::new(status.code(), format!("devices[{i}]: {}", status.message()))
            })?;
            if !seen.insert(device.id.clone()) {
                return Err(Status::invalid_argument(format!(
                    "devices[{i}]: device {} is asked for twice",
                    device.id
                )));
            }
            devices.push(device);
            tokens.push(token);
        }
        let records = self
            .store
            .register_devices(&devices)
            .await
            .map_err(status::bulk_registration)?;
        let mut registered = Vec::with_capacity(records.len());
        for (record, token) in records.into_iter().zip(tokens) {
            registered.push(pb::RegisteredDevice {
                device_id: record.id.as_str().to_owned(),
                token: token.expose().to_owned(),
                created_time_unix_nano: record.created,
            });
            self.alerts
                .device_registered(record.pk, record.id, record.labels, record.created)
                .await;
        }
        tracing::info!("devices registered");
        Ok(Response::new(pb::RegisterDevicesResponse {
            devices: registered,
        }))
    }

    async fn rotate_device_token(
        &self,
        request: Request<pb::RotateDeviceTokenRequest>,
    ) -> Result<Response<pb::RotateDeviceTokenResponse>, Status> {
        let req = request.into_inner();
        let id = DeviceId::parse(&req.device_id)?;
        let overlap = req.overlap_millis.map(std::time::Duration::from_millis);
        let (token, credential_id, credentials) =
            self.credentials.rotate_token(&id, overlap).await?;
        Ok(Response::new(pb::RotateDeviceTokenResponse {
            token: token.expose().to_owned(),
            credential_id,
            credentials: Some(convert::credentials(credentials)),
        }))
    }

    async fn list_device_credentials(
        &self,
        request: Request<pb::ListDeviceCredentialsRequest>,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        let id = DeviceId::parse(&request.into_inner().device_id)?;
        let credentials = self.store.device_credentials(&id).await?;
        Ok(Response::new(convert::credentials(credentials)))
    }

    async fn revoke_device_credential(
        &self,
        request: Request<pb::RevokeDeviceCredentialRequest>,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        use pb::revoke_device_credential_request::Credential;
        let req = request.into_inner();
        let id = DeviceId::parse(&req.device_id)?;
        let credentials = match req.credential {
            Some(Credential::TokenCredentialId(token)) => {
                self.credentials.revoke_token(&id, token).await?
            }
            Some(Credential::Certificate(true)) => self.credentials.revoke_certificate(&id).await?,
            Some(Credential::Certificate(false)) | None => return Err(nothing_to_revoke()),
        };
        Ok(Response::new(convert::credentials(credentials)))
    }

    async fn bind_device_certificate(
        &self,
        request: Request<pb::BindDeviceCertificateRequest>,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        let req = request.into_inner();
        let id = DeviceId::parse(&req.device_id)?;
        let mut warnings = Vec::new();
        let credentials = match (certificate(&req.certificate_pem)?, req.require_mtls) {
            (Some(certificate), require_mtls) => {
                let bound = self
                    .credentials
                    .bind_certificate(&id, Some(certificate), require_mtls)
                    .await?;
                warnings.extend(crate::auth::naming_warning(&id, &req.certificate_pem));
                bound
            }
            (None, Some(require_mtls)) => {
                self.credentials.set_require_mtls(&id, require_mtls).await?
            }
            (None, None) => {
                return Err(Status::invalid_argument(
                    "certificate_pem is empty and require_mtls is not set: nothing to change",
                ));
            }
        };
        Ok(Response::new(pb::DeviceCredentials {
            warnings,
            ..convert::credentials(credentials)
        }))
    }

    async fn disable_device(
        &self,
        request: Request<pb::DisableDeviceRequest>,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        self.set_disabled(&request.get_ref().device_id, true).await
    }

    async fn enable_device(
        &self,
        request: Request<pb::EnableDeviceRequest>,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        self.set_disabled(&request.get_ref().device_id, false).await
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let id = DeviceId::parse(&request.get_ref().device_id)?;
        let record = self
            .store
            .get_device(&id)
            .await
            .map_err(|e| status::storage_about(e, &format!("device {id}")))?;
        let sensors = self
            .store
            .device_sensors(record.pk)
            .await
            .map_err(status::storage)?;
        let mut device = convert::device(self.control.with_live_presence(record));
        device.sensors = sensors.into_iter().map(convert::sensor).collect();
        Ok(Response::new(device))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let req = request.into_inner();
        let after = parse_page_token(&req.page_token)?;
        let page_size = page_size(req.page_size);
        let mut records = self
            .store
            .list_devices(after.as_ref(), page_size + 1)
            .await
            .map_err(status::storage)?;
        let next_page_token =
            next_page_token(&mut records, page_size, |d| hex::encode(d.id.as_str()));
        Ok(Response::new(pb::ListDevicesResponse {
            devices: records
                .into_iter()
                .map(|d| convert::device(self.control.with_live_presence(d)))
                .collect(),
            next_page_token,
        }))
    }

    async fn reset_upload_cursor(
        &self,
        request: Request<pb::ResetUploadCursorRequest>,
    ) -> Result<Response<pb::ResetUploadCursorResponse>, Status> {
        let req = request.into_inner();
        let id = DeviceId::parse(&req.device_id)?;
        // Stored as a signed 64-bit integer, as batch sequences are.
        if req.committed_sequence > i64::MAX as u64 {
            return Err(Status::invalid_argument(format!(
                "committed_sequence {} is above the maximum, {}",
                req.committed_sequence,
                i64::MAX
            )));
        }
        let (previous, record) = self
            .store
            .reset_committed_sequence(&id, req.committed_sequence)
            .await
            .map_err(|e| status::storage_about(e, &format!("device {id}")))?;
        // An operator overriding duplicate detection: readings may be
        // stored twice after it, so each reset leaves a trace.
        tracing::warn!(
            device = %id,
            previous,
            new = req.committed_sequence,
            "upload cursor reset"
        );
        Ok(Response::new(pb::ResetUploadCursorResponse {
            previous_committed_sequence: previous,
            device: Some(convert::device(self.control.with_live_presence(record))),
        }))
    }

    type WatchAlertsStream = AlertStream;

    async fn watch_alerts(
        &self,
        request: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let req = request.into_inner();
        let devices = parse_device_ids("device_ids", req.device_ids)?;
        check_filter_len("rule_ids", req.rule_ids.len())?;
        for id in &req.rule_ids {
            RuleId::parse(id).map_err(|e| Status::invalid_argument(format!("rule_ids: {e}")))?;
        }
        let filter = WatchFilter {
            min_severity: severity_from_pb(req.min_severity),
            devices: devices.into_iter().collect(),
            rules: req.rule_ids.into_iter().collect(),
        };
        let after = if req.from_now {
            self.store
                .latest_alert_event_id()
                .await
                .map_err(status::storage)?
        } else {
            req.after_event_id
        };
        let items = crate::alerts::watch::start(
            self.store.clone(),
            self.alerts.clone(),
            filter,
            crate::alerts::watch::Start {
                after,
                announce: req.from_now,
            },
            self.watch.clone(),
            self.shutdown.clone(),
        );
        let stream = ReceiverStream::new(items).map(|item| match item {
            WatchItem::Event(e) => Ok(event_to_pb(&e)),
            WatchItem::Heartbeat {
                last_event_id,
                time,
            } => Ok(pb::AlertEvent {
                event_id: last_event_id,
                kind: pb::AlertEventKind::Heartbeat as i32,
                time_unix_nano: time.max(0) as u64,
                ..Default::default()
            }),
            WatchItem::End(WatchEnd::ShuttingDown { last_event_id }) => {
                Err(Status::unavailable(format!(
                    "the server is shutting down; reconnect with after_event_id = {last_event_id}"
                )))
            }
            WatchItem::End(WatchEnd::StorageFailed { last_event_id }) => Err(Status::unavailable(
                format!("storage is unavailable; reconnect with after_event_id = {last_event_id}"),
            )),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type QueryReadingsStream = ChunkStream;

    #[tracing::instrument(skip_all)]
    async fn query_readings(
        &self,
        request: Request<pb::QueryReadingsRequest>,
    ) -> Result<Response<Self::QueryReadingsStream>, Status> {
        // The auth layer let only ops tokens through; their name keys the
        // per-token stream limit.
        let operator = request
            .extensions()
            .get::<Operator>()
            .map(|o| o.token_name.clone())
            .unwrap_or_else(|| "".into());
        let req = request.into_inner();
        let query = query_from_pb(&req)?.validate(self.reader.max_devices())?;
        let chunks = self
            .reader
            .query(query, &req.resume_token, &operator)
            .await?;
        let reader = self.reader.clone();
        let stream = ReceiverStream::new(chunks).map(move |chunk| {
            let (message, rows) = chunk_to_pb(chunk?);
            reader.record_sent(rows, prost::Message::encoded_len(&message));
            Ok(message)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchReadingsStream = ChunkStream;

    #[tracing::instrument(skip_all)]
    async fn watch_readings(
        &self,
        request: Request<pb::WatchReadingsRequest>,
    ) -> Result<Response<Self::WatchReadingsStream>, Status> {
        let req = watch_from_pb(request.into_inner(), self.feed.max_devices())?;
        let items = self.feed.watch(req).await?;
        let feed = self.feed.clone();
        let stream = ReceiverStream::new(items).map(move |item| {
            let (message, rows) = item_to_pb(item)?;
            feed.record_sent(rows);
            Ok(message)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn commit_readings_cursor(
        &self,
        request: Request<pb::CommitReadingsCursorRequest>,
    ) -> Result<Response<pb::ReadingsConsumer>, Status> {
        let req = request.into_inner();
        let name = ConsumerName::parse(&req.consumer)?;
        let consumer = self.feed.commit_cursor(&name, &req.cursor).await?;
        Ok(Response::new(consumer_to_pb(consumer)))
    }

    async fn list_readings_consumers(
        &self,
        _request: Request<pb::ListReadingsConsumersRequest>,
    ) -> Result<Response<pb::ListReadingsConsumersResponse>, Status> {
        let consumers = self.feed.consumers().await?;
        Ok(Response::new(pb::ListReadingsConsumersResponse {
            consumers: consumers.into_iter().map(consumer_to_pb).collect(),
        }))
    }

    async fn delete_readings_consumer(
        &self,
        request: Request<pb::DeleteReadingsConsumerRequest>,
    ) -> Result<Response<pb::DeleteReadingsConsumerResponse>, Status> {
        let name = ConsumerName::parse(&request.into_inner().consumer)?;
        self.feed.delete_consumer(&name).await?;
        Ok(Response::new(pb::DeleteReadingsConsumerResponse {}))
    }

    async fn put_alert_rule(
        &self,
        request: Request<pb::PutAlertRuleRequest>,
    ) -> Result<Response<pb::AlertRule>, Status> {
        let rule = request
            .into_inner()
            .rule
            .ok_or_else(|| Status::invalid_argument("rule is required"))?;
        let rule = rule_from_pb(rule)?;
        let warnings = self.alerts.put_rule(rule.clone()).await?;
        tracing::info!(rule = %rule.id, "alert rule stored");
        Ok(Response::new(pb::AlertRule {
            warnings,
            ..rule_to_pb(&rule)
        }))
    }

    async fn list_alert_rules(
        &self,
        _request: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        let rules = self.store.list_rules().await.map_err(status::storage)?;
        Ok(Response::new(pb::ListAlertRulesResponse {
            rules: rules.iter().map(rule_to_pb).collect(),
        }))
    }

    async fn delete_alert_rule(
        &self,
        request: Request<pb::DeleteAlertRuleRequest>,
    ) -> Result<Response<pb::DeleteAlertRuleResponse>, Status> {
        let id = RuleId::parse(&request.get_ref().rule_id)?;
        self.alerts.delete_rule(id).await?;
        Ok(Response::new(pb::DeleteAlertRuleResponse {}))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(req.limit);
        let device_ids = parse_device_ids("device_ids", req.device_ids)?;
        let alerts = self
            .store
            .list_alerts(req.include_resolved, &device_ids, limit)
            .await
            .map_err(status::storage)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.into_iter().map(alert_to_pb).collect(),
        }))
    }

    async fn ack_alert(
        &self,
        request: Request<pb::AckAlertRequest>,
    ) -> Result<Response<pb::Alert>, Status> {
        let alert = self.alerts.ack(request.get_ref().alert_id).await?;
        Ok(Response::new(alert_to_pb(alert)))
    }

    async fn send_command(
        &self,
        request: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::Command>, Status> {
        let req = request.into_inner();
        let id = DeviceId::parse(&req.device_id)?;
        let kind = kind_from_pb(req.command.and_then(|c| c.kind))?;
        let device = self
            .store
            .get_device(&id)
            .await
            .map_err(|e| status::storage_about(e, &format!("device {id}")))?;
        let millis = |ms: u64| (ms > 0).then(|| std::time::Duration::from_millis(ms));
        let command = self
            .control
            .send(
                device.pk,
                kind,
                millis(req.ttl_millis),
                millis(req.wait_millis),
            )
            .await?;
        Ok(Response::new(command_to_pb(&command)))
    }

    async fn get_command(
        &self,
        request: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::Command>, Status> {
        let id = request.get_ref().command_id;
        let command = self
            .store
            .get_command(id)
            .await
            .map_err(|e| status::storage_about(e, &format!("command {id}")))?;
        Ok(Response::new(command_to_pb(&command)))
    }

    async fn list_commands(
        &self,
        request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let req = request.into_inner();
        let device = if req.device_id.is_empty() {
            None
        } else {
            Some(DeviceId::parse(&req.device_id)?)
        };
        let after = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                Status::invalid_argument("page_token is not one this server returned")
            })?
        };
        let page_size = page_size(req.page_size);
        let mut commands = self
            .store
            .list_commands(
                device.as_ref().map(DeviceId::as_str),
                state_from_pb(req.state),
                after,
                page_size + 1,
            )
            .await
            .map_err(status::storage)?;
        let next_page_token =
            next_page_token(&mut commands, page_size, |c| c.command_id.to_string());
        Ok(Response::new(pb::ListCommandsResponse {
            commands: commands.iter().map(command_to_pb).collect(),
            next_page_token,
        }))
    }
}

fn nothing_to_revoke() -> Status {
    Status::invalid_argument(
        "say what to revoke: token_credential_id (from ListDeviceCredentials) or certificate = true",
    )
}

//! `telemetry.v1.Ops`: the operator-facing service (device registry now;
//! alerts and commands arrive with their own modules).

use std::pin::Pin;

use futures::Stream;
use telemetry_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{convert, status};
use crate::auth::Token;
use crate::domain::time::now_unix_nanos;
use crate::domain::{DeviceId, DisplayName, Labels};
use crate::storage::{NewDevice, Store};

pub struct OpsService {
    store: Store,
}

impl OpsService {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

type AlertStream = Pin<Box<dyn Stream<Item = Result<pb::AlertEvent, Status>> + Send>>;

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("Ops.{rpc} is not available in this server version"))
}

/// Page tokens are the hex of the last id returned: opaque to clients, and
/// never mistaken for a device id typed by hand.
fn parse_page_token(token: &str) -> Result<Option<DeviceId>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token is not one this server returned");
    let bytes = hex::decode(token).map_err(|_| bad())?;
    let id = String::from_utf8(bytes).map_err(|_| bad())?;
    DeviceId::parse(&id).map(Some).map_err(|_| bad())
}

#[tonic::async_trait]
impl pb::ops_server::Ops for OpsService {
    #[tracing::instrument(skip_all, fields(device = %request.get_ref().device_id))]
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let req = request.into_inner();
        let id = DeviceId::parse(&req.device_id)?;
        let display_name = DisplayName::parse(&req.display_name, &id)?;
        let labels = Labels::parse(req.labels)?;
        let token = Token::generate("dev_");
        let device = NewDevice {
            id,
            display_name,
            labels,
            token_hash: token.hash(),
            created: now_unix_nanos(),
        };
        let record = self
            .store
            .register_device(&device)
            .await
            .map_err(|e| status::storage_about(e, &format!("device {}", device.id)))?;
        tracing::info!("device registered");
        Ok(Response::new(pb::RegisterDeviceResponse {
            device: Some(convert::device(record)),
            token: token.expose().to_owned(),
        }))
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
        Ok(Response::new(convert::device(record)))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let req = request.into_inner();
        let after = parse_page_token(&req.page_token)?;
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        // One extra row tells whether another page exists.
        let mut records = self
            .store
            .list_devices(after.as_ref(), page_size + 1)
            .await
            .map_err(status::storage)?;
        let next_page_token = if records.len() > page_size as usize {
            records.truncate(page_size as usize);
            records
                .last()
                .map(|d| hex::encode(d.id.as_str()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListDevicesResponse {
            devices: records.into_iter().map(convert::device).collect(),
            next_page_token,
        }))
    }

    type WatchAlertsStream = AlertStream;

    async fn watch_alerts(
        &self,
        _request: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        Err(not_yet("WatchAlerts"))
    }

    async fn put_alert_rule(
        &self,
        _request: Request<pb::PutAlertRuleRequest>,
    ) -> Result<Response<pb::AlertRule>, Status> {
        Err(not_yet("PutAlertRule"))
    }

    async fn list_alert_rules(
        &self,
        _request: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        Err(not_yet("ListAlertRules"))
    }

    async fn delete_alert_rule(
        &self,
        _request: Request<pb::DeleteAlertRuleRequest>,
    ) -> Result<Response<pb::DeleteAlertRuleResponse>, Status> {
        Err(not_yet("DeleteAlertRule"))
    }

    async fn list_alerts(
        &self,
        _request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        Err(not_yet("ListAlerts"))
    }

    async fn ack_alert(
        &self,
        _request: Request<pb::AckAlertRequest>,
    ) -> Result<Response<pb::Alert>, Status> {
        Err(not_yet("AckAlert"))
    }

    async fn send_command(
        &self,
        _request: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::Command>, Status> {
        Err(not_yet("SendCommand"))
    }

    async fn get_command(
        &self,
        _request: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::Command>, Status> {
        Err(not_yet("GetCommand"))
    }

    async fn list_commands(
        &self,
        _request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        Err(not_yet("ListCommands"))
    }
}

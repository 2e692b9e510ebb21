//! MQTT packets on the wire, for both protocol versions a session may
//! speak: 3.1.1 (level 4) and 5. rumqttc's codec decodes and encodes them;
//! this file turns them into the few things a session acts on
//! ([`Inbound`]) and writes the few it answers ([`Outbound`]), so the
//! session logic is written once.
//!
//! The protocol level is read from the CONNECT's variable header before
//! either codec sees it: rumqttc's 3.1.1 decoder also accepts a level-5
//! CONNECT, which would then be misread.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The protocol a session speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

/// What a CONNECT asked for.
#[derive(Debug)]
pub struct Connect {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u16,
    pub clean_start: bool,
    /// v5: how many QoS 1 PUBLISHes the client accepts unacknowledged.
    pub receive_maximum: Option<u16>,
    /// v5: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// v5: how long the session outlives the connection, in seconds.
    pub session_expiry: Option<u32>,
}

/// A packet from the client, after CONNECT.
#[derive(Debug)]
pub enum Inbound {
    Publish(Publish),
    /// Each filter with the QoS asked for.
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// The device's answer to a command the server published.
    PubAck {
        pkid: u16,
    },
    /// PUBREC, PUBREL, PUBCOMP: QoS 2, which is not offered.
    Answer(&'static str),
    /// A second CONNECT, AUTH, or a server-to-client packet.
    Unexpected(&'static str),
}

#[derive(Debug)]
pub struct Publish {
    pub topic: String,
    /// 0, 1 or 2.
    pub qos: u8,
    pub pkid: u16,
    pub payload: Bytes,
    /// v5's Content-Type property.
    pub content_type: Option<String>,
    /// v5's user property `seq`, as sent.
    pub seq_property: Option<String>,
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "the packet is larger than the server's limit of {max} bytes (--mqtt-max-packet-bytes)"
    )]
    TooLarge { max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet must be CONNECT")]
    NotConnect,
    #[error("protocol level {0} is not supported: speak MQTT 3.1.1 (4) or 5")]
    UnsupportedLevel(u8),
}

/// The remaining-length field: the bytes it takes and its value, or `None`
/// until enough bytes have come.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, ReadError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((1 + i, value)));
        }
    }
    Err(ReadError::Malformed("remaining length over 4 bytes".into()))
}

/// Whether `buf` starts with a whole packet; an error if it starts with one
/// over `max` bytes (said before the rest of it is read).
pub fn whole_packet(buf: &[u8], max: usize) -> Result<bool, ReadError> {
    let Some((len_len, len)) = remaining_length(buf)? else {
        return Ok(false);
    };
    if len > max {
        return Err(ReadError::TooLarge { max });
    }
    Ok(buf.len() >= 1 + len_len + len)
}

/// The protocol of the CONNECT at the start of `buf`, a whole packet.
pub fn connect_version(buf: &[u8]) -> Result<Version, ReadError> {
    if buf.first().map(|b| b >> 4) != Some(1) {
        return Err(ReadError::NotConnect);
    }
    let (len_len, _) = remaining_length(buf)?.ok_or(ReadError::NotConnect)?;
    // Protocol name: a two-byte length, then "MQTT" (or "MQIsdp" for 3.1).
    let at = 1 + len_len;
    let name_len = buf
        .get(at..at + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(|| ReadError::Malformed("CONNECT without a protocol name".into()))?;
    let level = *buf
        .get(at + 2 + name_len)
        .ok_or_else(|| ReadError::Malformed("CONNECT without a protocol level".into()))?;
    match level {
        4 => Ok(Version::V311),
        5 => Ok(Version::V5),
        other => Err(ReadError::UnsupportedLevel(other)),
    }
}

fn malformed(e: impl std::fmt::Display) -> ReadError {
    ReadError::Malformed(e.to_string())
}

/// Decodes the CONNECT at the start of `buf` (a whole packet).
pub fn read_connect(buf: &mut BytesMut, version: Version) -> Result<Connect, ReadError> {
    let max = buf.len();
    match version {
        Version::V311 => match v4::Packet::read(buf, max).map_err(malformed)? {
            v4::Packet::Connect(c) => Ok(Connect {
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.map(|l| l.password),
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean_start: c.clean_session,
                receive_maximum: None,
                max_packet_size: None,
                session_expiry: None,
            }),
            _ => Err(ReadError::NotConnect),
        },
        Version::V5 => match v5::Packet::read(buf, Some(max as u32)).map_err(malformed)? {
            v5::Packet::Connect(c, _, login) => Ok(Connect {
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password),
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean_start: c.clean_start,
                receive_maximum: c.properties.as_ref().and_then(|p| p.receive_maximum),
                max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
                session_expiry: c
                    .properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval),
            }),
            _ => Err(ReadError::NotConnect),
        },
    }
}

/// Decodes the packet at the start of `buf` (a whole packet).
pub fn read(buf: &mut BytesMut, version: Version) -> Result<Inbound, ReadError> {
    let max = buf.len();
    Ok(match version {
        Version::V311 => match v4::Packet::read(buf, max).map_err(malformed)? {
            v4::Packet::Publish(p) => Inbound::Publish(Publish {
                topic: p.topic,
                qos: p.qos as u8,
                pkid: p.pkid,
                payload: p.payload,
                content_type: None,
                seq_property: None,
            }),
            v4::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| (f.path, f.qos as u8))
                    .collect(),
            },
            v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            },
            v4::Packet::PingReq => Inbound::PingReq,
            v4::Packet::Disconnect => Inbound::Disconnect,
            v4::Packet::PubAck(ack) => Inbound::PubAck { pkid: ack.pkid },
            v4::Packet::PubRec(_) => Inbound::Answer("PUBREC"),
            v4::Packet::PubRel(_) => Inbound::Answer("PUBREL"),
            v4::Packet::PubComp(_) => Inbound::Answer("PUBCOMP"),
            v4::Packet::Connect(_) => Inbound::Unexpected("a second CONNECT"),
            _ => Inbound::Unexpected("a packet only a server sends"),
        },
        // A v5 DISCONNECT may be two bytes (reason 0, no properties), which
        // rumqttc's v5 decoder refuses.
        Version::V5 if buf.first().map(|b| b >> 4) == Some(14) => {
            if let Ok(Some((len_len, len))) = remaining_length(buf) {
                let _ = buf.split_to((1 + len_len + len).min(buf.len()));
            }
            Inbound::Disconnect
        }
        Version::V5 => match v5::Packet::read(buf, Some(max as u32)).map_err(malformed)? {
            v5::Packet::Publish(p) => {
                let properties = p.properties.unwrap_or_default();
                Inbound::Publish(Publish {
                    topic: String::from_utf8(p.topic.to_vec())
                        .map_err(|_| ReadError::Malformed("the topic is not UTF-8".into()))?,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    payload: p.payload,
                    content_type: properties.content_type,
                    seq_property: properties
                        .user_properties
                        .into_iter()
                        .find(|(k, _)| k == "seq")
                        .map(|(_, v)| v),
                })
            }
            v5::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| (f.path, f.qos as u8))
                    .collect(),
            },
            v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters,
            },
            v5::Packet::PingReq(_) => Inbound::PingReq,
            v5::Packet::Disconnect(_) => Inbound::Disconnect,
            v5::Packet::PubAck(ack) => Inbound::PubAck { pkid: ack.pkid },
            v5::Packet::PubRec(_) => Inbound::Answer("PUBREC"),
            v5::Packet::PubRel(_) => Inbound::Answer("PUBREL"),
            v5::Packet::PubComp(_) => Inbound::Answer("PUBCOMP"),
            v5::Packet::Connect(..) => Inbound::Unexpected("a second CONNECT"),
            v5::Packet::Auth(_) => {
                Inbound::Unexpected("AUTH (no authentication method is offered)")
            }
            _ => Inbound::Unexpected("a packet only a server sends"),
        },
    })
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnsupportedVersion,
    ClientIdNotValid,
    BadUsernameOrPassword,
    NotAuthorized,
    ServerUnavailable,
}

/// Why the server ends a session (v5 DISCONNECT reason codes; 3.1.1 has
/// none and only closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    ServerShuttingDown,
    NotAuthorized,
    KeepAliveTimeout,
    ProtocolError,
    MalformedPacket,
    PacketTooLarge,
    QosNotSupported,
    TopicNameInvalid,
    PayloadFormatInvalid,
    /// A batch could not be committed: the client resends it on its next
    /// session, as it must for an unacknowledged PUBLISH.
    UnspecifiedError,
    /// A newer connection of the same device took over.
    SessionTakenOver,
    /// The connection reached its lifetime (`--control-max-lifetime`):
    /// reconnect, perhaps to another server process.
    MaximumConnectTime,
}

/// Reason codes of a v5 PUBACK that refuses a PUBLISH for good (3.1.1 has
/// none: its session is closed instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubRefusal {
    NotAuthorized,
    TopicNameInvalid,
    PayloadFormatInvalid,
}

/// What the server writes.
#[derive(Debug)]
pub enum Outbound {
    ConnAck {
        refused: Option<Refusal>,
        /// The session existed: the client keeps what it had in flight.
        session_present: bool,
        /// v5 only: what the server allows.
        receive_maximum: u16,
        max_packet_size: u32,
        reason: Option<String>,
    },
    PubAck {
        pkid: u16,
        refused: Option<PubRefusal>,
        reason: Option<String>,
    },
    /// Every filter refused (commands over MQTT are not served yet).
    /// Per filter, the QoS granted, or `None`: refused (not authorized).
    SubAck {
        pkid: u16,
        granted: Vec<Option<u8>>,
        reason: Option<String>,
    },
    /// A PUBLISH of JSON: a command to the device (QoS 1), a batch's
    /// summary (QoS 0, packet id 0).
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    UnsubAck {
        pkid: u16,
        filters: usize,
    },
    PingResp,
    /// v5 only; on 3.1.1 the session closes without a word.
    Disconnect {
        why: Goodbye,
        reason: String,
    },
}

/// Appends `packet` to `out` in `version`'s encoding. Nothing for a
/// packet the version does not have (a 3.1.1 DISCONNECT from the server).
pub fn write(packet: &Outbound, version: Version, out: &mut BytesMut) {
    let result = match version {
        Version::V311 => v311(packet).map(|p| p.write(out, usize::MAX).map_err(|e| e.to_string())),
        Version::V5 => v5(packet).map(|p| p.write(out, None).map_err(|e| e.to_string())),
    };
    if let Some(Err(error)) = result {
        // Only a packet over the size limit fails, and none of ours is.
        tracing::error!(%error, ?packet, "could not encode an MQTT packet");
    }
}

fn v4_qos(qos: u8) -> rumqttc::mqttbytes::QoS {
    match qos {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        _ => rumqttc::mqttbytes::QoS::AtLeastOnce,
    }
}

fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        _ => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    }
}

fn v311(packet: &Outbound) -> Option<v4::Packet> {
    Some(match packet {
        Outbound::ConnAck {
            refused,
            session_present,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match refused {
                None => v4::ConnectReturnCode::Success,
                Some(Refusal::UnsupportedVersion) => v4::ConnectReturnCode::RefusedProtocolVersion,
                Some(Refusal::ClientIdNotValid) => v4::ConnectReturnCode::BadClientId,
                Some(Refusal::BadUsernameOrPassword) => v4::ConnectReturnCode::BadUserNamePassword,
                Some(Refusal::NotAuthorized) => v4::ConnectReturnCode::NotAuthorized,
                Some(Refusal::ServerUnavailable) => v4::ConnectReturnCode::ServiceUnavailable,
            },
            *session_present,
        )),
        Outbound::PubAck { pkid, refused, .. } => {
            // 3.1.1 has no refusing PUBACK: the session ends instead.
            debug_assert!(refused.is_none());
            v4::Packet::PubAck(v4::PubAck::new(*pkid))
        }
        Outbound::SubAck { pkid, granted, .. } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            granted
                .iter()
                .map(|g| match g {
                    Some(0) => v4::SubscribeReasonCode::Success(v4_qos(0)),
                    Some(_) => v4::SubscribeReasonCode::Success(v4_qos(1)),
                    None => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outbound::Publish {
            topic,
            qos,
            pkid,
            payload,
        } => {
            let mut publish =
                v4::Publish::from_bytes(topic.as_str(), v4_qos(*qos), payload.clone());
            publish.pkid = *pkid;
            v4::Packet::Publish(publish)
        }
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Disconnect { .. } => return None,
    })
}

fn v5(packet: &Outbound) -> Option<v5::Packet> {
    let reason_only = |reason: &Option<String>| reason.clone();
    Some(match packet {
        Outbound::ConnAck {
            refused,
            session_present,
            receive_maximum,
            max_packet_size,
            reason,
        } => {
            use v5::ConnectReturnCode as C;
            let code = match refused {
                None => C::Success,
                Some(Refusal::UnsupportedVersion) => C::UnsupportedProtocolVersion,
                Some(Refusal::ClientIdNotValid) => C::ClientIdentifierNotValid,
                Some(Refusal::BadUsernameOrPassword) => C::BadUserNamePassword,
                Some(Refusal::NotAuthorized) => C::NotAuthorized,
                Some(Refusal::ServerUnavailable) => C::ServerUnavailable,
            };
            let properties = v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(*receive_maximum),
                // QoS 2 is not offered: a QoS 1 PUBLISH with its batch
                // sequence is already stored exactly once.
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: Some(*max_packet_size),
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: reason_only(reason),
                user_properties: Vec::new(),
                // A device subscribes to devices/{id}/commands/+.
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: *session_present,
                code,
                properties: Some(properties),
            })
        }
        Outbound::PubAck {
            pkid,
            refused,
            reason,
        } => v5::Packet::PubAck(v5::PubAck {
            pkid: *pkid,
            reason: match refused {
                None => v5::PubAckReason::Success,
                Some(PubRefusal::NotAuthorized) => v5::PubAckReason::NotAuthorized,
                Some(PubRefusal::TopicNameInvalid) => v5::PubAckReason::TopicNameInvalid,
                Some(PubRefusal::PayloadFormatInvalid) => v5::PubAckReason::PayloadFormatInvalid,
            },
            properties: reason.as_ref().map(|r| v5::PubAckProperties {
                reason_string: Some(r.clone()),
                user_properties: Vec::new(),
            }),
        }),
        Outbound::SubAck {
            pkid,
            granted,
            reason,
        } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: granted
                .iter()
                .map(|g| match g {
                    Some(0) => v5::SubscribeReasonCode::Success(v5_qos(0)),
                    Some(_) => v5::SubscribeReasonCode::Success(v5_qos(1)),
                    None => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: reason.as_ref().map(|r| v5::SubAckProperties {
                reason_string: Some(r.clone()),
                user_properties: Vec::new(),
            }),
        }),
        Outbound::Publish {
            topic,
            qos,
            pkid,
            payload,
        } => v5::Packet::Publish(v5::Publish {
            dup: false,
            qos: v5_qos(*qos),
            retain: false,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid: *pkid,
            payload: payload.clone(),
            properties: Some(v5::PublishProperties {
                content_type: Some("application/json".into()),
                ..Default::default()
            }),
        }),
        Outbound::UnsubAck { pkid, filters } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: vec![v5::UnsubAckReason::NoSubscriptionExisted; *filters],
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Disconnect { why, reason } => {
            use v5::DisconnectReasonCode as D;
            v5::Packet::Disconnect(v5::Disconnect {
                reason_code: match why {
                    Goodbye::ServerShuttingDown => D::ServerShuttingDown,
                    Goodbye::NotAuthorized => D::NotAuthorized,
                    Goodbye::KeepAliveTimeout => D::KeepAliveTimeout,
                    Goodbye::ProtocolError => D::ProtocolError,
                    Goodbye::MalformedPacket => D::MalformedPacket,
                    Goodbye::PacketTooLarge => D::PacketTooLarge,
                    Goodbye::QosNotSupported => D::QoSNotSupported,
                    Goodbye::TopicNameInvalid => D::TopicNameInvalid,
                    Goodbye::PayloadFormatInvalid => D::PayloadFormatInvalid,
                    Goodbye::UnspecifiedError => D::UnspecifiedError,
                    Goodbye::SessionTakenOver => D::SessionTakenOver,
                    Goodbye::MaximumConnectTime => D::MaximumConnectTime,
                },
                properties: Some(v5::DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: Some(reason.clone()),
                    user_properties: Vec::new(),
                    server_reference: None,
                }),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(version: Version) -> BytesMut {
        let mut out = BytesMut::new();
        match version {
            Version::V311 => {
                let mut c = v4::Connect::new("dev-1");
                c.set_login("dev-1", "secret");
                v4::Packet::Connect(c).write(&mut out, usize::MAX).unwrap();
            }
            Version::V5 => {
                let c = v5::Connect {
                    keep_alive: 30,
                    client_id: "dev-1".into(),
                    clean_start: true,
                    properties: None,
                };
                let login = v5::Login {
                    username: "dev-1".into(),
                    password: "secret".into(),
                };
                v5::Packet::Connect(c, None, Some(login))
                    .write(&mut out, None)
                    .unwrap();
            }
        }
        out
    }

    #[test]
    fn the_level_decides_the_codec() {
        for version in [Version::V311, Version::V5] {
            let mut buf = connect_bytes(version);
            assert!(whole_packet(&buf, 1024).unwrap());
            assert_eq!(connect_version(&buf).unwrap(), version);
            let connect = read_connect(&mut buf, version).unwrap();
            assert_eq!(connect.client_id, "dev-1");
            assert_eq!(connect.password.as_deref(), Some("secret"));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_partial_packet_waits_and_an_oversized_one_is_refused_from_its_header() {
        let buf = connect_bytes(Version::V311);
        assert!(!whole_packet(&buf[..buf.len() - 1], 1024).unwrap());
        assert!(!whole_packet(&buf[..1], 1024).unwrap());
        // A PUBLISH claiming 2 MiB: refused with only its first bytes read.
        let header = [0x30, 0x80, 0x80, 0x80, 0x01];
        assert!(matches!(
            whole_packet(&header, 1024 * 1024),
            Err(ReadError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_two_byte_v5_disconnect_is_a_disconnect() {
        let mut buf = BytesMut::from(&[0xe0u8, 0x00, 0xc0, 0x00][..]);
        assert!(matches!(
            read(&mut buf, Version::V5),
            Ok(Inbound::Disconnect)
        ));
        assert_eq!(&buf[..], &[0xc0, 0x00], "the next packet stays");
    }

    #[test]
    fn other_levels_and_packets_are_named() {
        let mut buf = connect_bytes(Version::V311);
        // The level byte of "MQTT" level 4 sits after 0x10, len, 0x00 0x04 "MQTT".
        buf[8] = 3;
        assert!(matches!(
            connect_version(&buf),
            Err(ReadError::UnsupportedLevel(3))
        ));
        assert!(matches!(
            connect_version(&[0xc0, 0x00]),
            Err(ReadError::NotConnect)
        ));
    }
}

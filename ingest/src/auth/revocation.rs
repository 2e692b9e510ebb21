//! How a credential change reaches the streams it ends.
//!
//! Each change is a [`CredentialEvent`], sent after it is committed. Every
//! authenticated device call subscribes before its credential is looked up,
//! so no change committed after the lookup can slip by. An open stream
//! waits on [`CredentialWatch::ended`] beside its messages: no database
//! query per message, and one broadcast per operator action.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::domain::CertFingerprint;
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::domain::{DeviceKey, TokenHash};

/// A committed change to a device's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialEvent {
    TokenRevoked {
        device_pk: i64,
        token_pk: i64,
    },
    /// A rotation gave these tokens an expiry.
    TokensExpire {
        device_pk: i64,
        expiries: Vec<(i64, UnixNanos)>,
    },
    /// A token was added: nothing open ends, but cached state is stale.
    TokenIssued {
        device_pk: i64,
    },
    /// The certificate binding was replaced or removed, or `require_mtls`
    /// changed.
    CertificateChanged {
        device_pk: i64,
        certificate: Option<CertFingerprint>,
        require_mtls: bool,
    },
    Disabled {
        device_pk: i64,
    },
    Enabled {
        device_pk: i64,
    },
}

impl CredentialEvent {
    pub fn device_pk(&self) -> i64 {
        match self {
            Self::TokenRevoked { device_pk, .. }
            | Self::TokensExpire { device_pk, .. }
            | Self::TokenIssued { device_pk }
            | Self::CertificateChanged { device_pk, .. }
            | Self::Disabled { device_pk }
            | Self::Enabled { device_pk } => *device_pk,
        }
    }
}

impl CredentialEvent {
    /// The event as a notification payload, for the other server processes.
    pub fn to_payload(&self) -> String {
        match self {
            Self::TokenRevoked {
                device_pk,
                token_pk,
            } => format!("revoked {device_pk} {token_pk}"),
            Self::TokensExpire {
                device_pk,
                expiries,
            } => {
                let list: Vec<String> =
                    expiries.iter().map(|(t, at)| format!("{t}={at}")).collect();
                format!("expire {device_pk} {}", list.join(","))
            }
            Self::TokenIssued { device_pk } => format!("issued {device_pk}"),
            Self::CertificateChanged {
                device_pk,
                certificate,
                require_mtls,
            } => format!(
                "certificate {device_pk} {} {}",
                certificate.map_or("-".to_owned(), |c| c.to_string()),
                u8::from(*require_mtls)
            ),
            Self::Disabled { device_pk } => format!("disabled {device_pk}"),
            Self::Enabled { device_pk } => format!("enabled {device_pk}"),
        }
    }

    /// Reads [`CredentialEvent::to_payload`]; `None` if malformed.
    pub fn from_payload(payload: &str) -> Option<Self> {
        let mut words = payload.split(' ');
        let kind = words.next()?;
        let device_pk: i64 = words.next()?.parse().ok()?;
        let event = match kind {
            "revoked" => Self::TokenRevoked {
                device_pk,
                token_pk: words.next()?.parse().ok()?,
            },
            "expire" => Self::TokensExpire {
                device_pk,
                expiries: words
                    .next()?
                    .split(',')
                    .filter(|item| !item.is_empty())
                    .map(|item| {
                        let (t, at) = item.split_once('=')?;
                        Some((t.parse().ok()?, at.parse().ok()?))
                    })
                    .collect::<Option<_>>()?,
            },
            "issued" => Self::TokenIssued { device_pk },
            "certificate" => Self::CertificateChanged {
                device_pk,
                certificate: match words.next()? {
                    "-" => None,
                    hex => Some(CertFingerprint::parse_hex(hex).ok()?),
                },
                require_mtls: words.next()? == "1",
            },
            "disabled" => Self::Disabled { device_pk },
            "enabled" => Self::Enabled { device_pk },
            _ => return None,
        };
        words.next().is_none().then_some(event)
    }
}

/// What a call proved its identity with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Token {
        pk: i64,
        hash: TokenHash,
        expires: Option<UnixNanos>,
    },
    Certificate(CertFingerprint),
}

/// Why an open stream's credential stopped holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialEnded {
    TokenRevoked,
    TokenExpired,
    CertificateRevoked,
    MtlsRequired,
    DeviceDisabled,
}

impl std::fmt::Display for CredentialEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::TokenRevoked => "the device token was revoked",
            Self::TokenExpired => "the device token expired",
            Self::CertificateRevoked => "the device's certificate binding was revoked or replaced",
            Self::MtlsRequired => {
                "the device now requires mutual TLS: a token alone is no longer accepted"
            }
            Self::DeviceDisabled => "the device was disabled",
        })
    }
}

/// Re-checks a credential against the database: for a stream that fell so
/// far behind the events that some were dropped.
pub(super) type Recheck = Arc<
    dyn Fn(Credential) -> futures::future::BoxFuture<'static, Result<Option<CredentialEnded>, ()>>
        + Send
        + Sync,
>;

/// Watches one authenticated call's credential.
pub struct CredentialWatch {
    pub(super) device: DeviceKey,
    pub(super) credential: Credential,
    pub(super) events: broadcast::Receiver<CredentialEvent>,
    pub(super) recheck: Recheck,
}

/// Resolves when the stream's credential stops holding; never without one.
pub async fn until_ended(credential: &mut Option<CredentialWatch>) -> CredentialEnded {
    match credential {
        Some(watch) => watch.ended().await,
        None => std::future::pending().await,
    }
}

impl CredentialWatch {
    /// Resolves when the credential this call was authenticated with no
    /// longer holds; pending forever while it does.
    pub async fn ended(&mut self) -> CredentialEnded {
        loop {
            let expiry = match &self.credential {
                Credential::Token {
                    expires: Some(at), ..
                } => Some(until(*at)),
                _ => None,
            };
            let event = tokio::select! {
                () = async {
                    match expiry {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => std::future::pending().await,
                    }
                } => return CredentialEnded::TokenExpired,
                event = self.events.recv() => event,
            };
            match event {
                Ok(event) => {
                    if let Some(ended) = self.apply(&event) {
                        return ended;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(device = %self.device.id, missed, "credential events dropped for a slow stream; checking the database");
                    if let Ok(Some(ended)) = (self.recheck)(self.credential.clone()).await {
                        return ended;
                    }
                }
                // The server is stopping; its shutdown ends the stream.
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }

    /// What an event means for this call's credential.
    fn apply(&mut self, event: &CredentialEvent) -> Option<CredentialEnded> {
        if event.device_pk() != self.device.pk {
            return None;
        }
        match (event, &mut self.credential) {
            (CredentialEvent::Disabled { .. }, _) => Some(CredentialEnded::DeviceDisabled),
            (CredentialEvent::TokenRevoked { token_pk, .. }, Credential::Token { pk, .. })
                if token_pk == pk =>
            {
                Some(CredentialEnded::TokenRevoked)
            }
            (
                CredentialEvent::TokensExpire { expiries, .. },
                Credential::Token { pk, expires, .. },
            ) => {
                if let Some((_, at)) = expiries.iter().find(|(token, _)| token == pk) {
                    *expires = Some(expires.map_or(*at, |e| e.min(*at)));
                }
                None
            }
            (
                CredentialEvent::CertificateChanged { require_mtls, .. },
                Credential::Token { .. },
            ) if *require_mtls => Some(CredentialEnded::MtlsRequired),
            (
                CredentialEvent::CertificateChanged { certificate, .. },
                Credential::Certificate(mine),
            ) if certificate.as_ref() != Some(mine) => Some(CredentialEnded::CertificateRevoked),
            (
                CredentialEvent::TokenRevoked { .. }
                | CredentialEvent::TokenIssued { .. }
                | CredentialEvent::CertificateChanged { .. }
                | CredentialEvent::Enabled { .. },
                _,
            )
            | (CredentialEvent::TokensExpire { .. }, Credential::Certificate(_)) => None,
        }
    }
}

/// How long from now until `at` (zero if past).
fn until(at: UnixNanos) -> Duration {
    Duration::from_nanos(u64::try_from(at.saturating_sub(now_unix_nanos())).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceId;

    fn watch(credential: Credential) -> (broadcast::Sender<CredentialEvent>, CredentialWatch) {
        let (tx, events) = broadcast::channel(4);
        let recheck: Recheck = Arc::new(|_| Box::pin(async { Ok(None) }));
        let watch = CredentialWatch {
            device: DeviceKey {
                pk: 7,
                id: DeviceId::parse("dev-7").unwrap(),
            },
            credential,
            events,
            recheck,
        };
        (tx, watch)
    }

    fn token(pk: i64) -> Credential {
        Credential::Token {
            pk,
            hash: TokenHash::of("t"),
            expires: None,
        }
    }

    #[test]
    fn only_this_credentials_changes_end_it() {
        let (_tx, mut w) = watch(token(1));
        assert_eq!(
            w.apply(&CredentialEvent::TokenRevoked {
                device_pk: 8,
                token_pk: 1
            }),
            None
        );
        assert_eq!(
            w.apply(&CredentialEvent::TokenRevoked {
                device_pk: 7,
                token_pk: 2
            }),
            None
        );
        assert_eq!(
            w.apply(&CredentialEvent::TokenIssued { device_pk: 7 }),
            None
        );
        let unbound = CredentialEvent::CertificateChanged {
            device_pk: 7,
            certificate: None,
            require_mtls: false,
        };
        assert_eq!(w.apply(&unbound), None);
        assert_eq!(
            w.apply(&CredentialEvent::TokenRevoked {
                device_pk: 7,
                token_pk: 1
            }),
            Some(CredentialEnded::TokenRevoked)
        );
        assert_eq!(
            w.apply(&CredentialEvent::Disabled { device_pk: 7 }),
            Some(CredentialEnded::DeviceDisabled)
        );
        let require = CredentialEvent::CertificateChanged {
            device_pk: 7,
            certificate: None,
            require_mtls: true,
        };
        assert_eq!(w.apply(&require), Some(CredentialEnded::MtlsRequired));

        let fp = CertFingerprint::of_der(b"a");
        let (_tx, mut w) = watch(Credential::Certificate(fp));
        let same = CredentialEvent::CertificateChanged {
            device_pk: 7,
            certificate: Some(fp),
            require_mtls: true,
        };
        assert_eq!(w.apply(&same), None);
        assert_eq!(w.apply(&unbound), Some(CredentialEnded::CertificateRevoked));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotation_overlap_ends_the_old_tokens_stream_when_it_runs_out() {
        let (tx, mut w) = watch(token(1));
        let at = now_unix_nanos() + 3_000_000_000;
        tx.send(CredentialEvent::TokensExpire {
            device_pk: 7,
            expiries: vec![(1, at)],
        })
        .unwrap();
        assert_eq!(w.ended().await, CredentialEnded::TokenExpired);
    }

    fn any_event() -> impl proptest::strategy::Strategy<Value = CredentialEvent> {
        use proptest::prelude::*;
        let pk = any::<i64>();
        prop_oneof![
            (pk, any::<i64>()).prop_map(|(device_pk, token_pk)| {
                CredentialEvent::TokenRevoked {
                    device_pk,
                    token_pk,
                }
            }),
            (
                pk,
                proptest::collection::vec((any::<i64>(), any::<i64>()), 0..5)
            )
                .prop_map(|(device_pk, expiries)| CredentialEvent::TokensExpire {
                    device_pk,
                    expiries
                }),
            pk.prop_map(|device_pk| CredentialEvent::TokenIssued { device_pk }),
            (pk, proptest::option::of(any::<[u8; 32]>()), any::<bool>()).prop_map(
                |(device_pk, cert, require_mtls)| {
                    CredentialEvent::CertificateChanged {
                        device_pk,
                        certificate: cert.map(CertFingerprint::from_bytes),
                        require_mtls,
                    }
                }
            ),
            pk.prop_map(|device_pk| CredentialEvent::Disabled { device_pk }),
            pk.prop_map(|device_pk| CredentialEvent::Enabled { device_pk }),
        ]
    }

    proptest::proptest! {
        /// What another server process reads is the event this one applied.
        #[test]
        fn events_survive_the_notification_payload(event in any_event()) {
            let payload = event.to_payload();
            proptest::prop_assert!(payload.len() < 8000);
            proptest::prop_assert_eq!(CredentialEvent::from_payload(&payload), Some(event));
        }

        #[test]
        fn garbage_payloads_are_refused_not_misread(payload in "\\PC{0,60}") {
            if let Some(event) = CredentialEvent::from_payload(&payload) {
                proptest::prop_assert_eq!(event.to_payload(), payload);
            }
        }
    }
}

//! The served certificate's expiry as a Prometheus gauge, read at each
//! scrape.

use prometheus_client::registry::Registry;

use super::settings::TlsHandle;

/// `tls_certificate_expiry_timestamp_seconds`, read from the served
/// certificate at each scrape (it changes on reload). Registered only when
/// serving TLS: a plaintext server has no certificate to expire.
pub fn register_expiry_metric(registry: &mut Registry, tls: TlsHandle) {
    registry.register_collector(Box::new(TlsExpiry(tls)));
}

#[derive(Debug)]
struct TlsExpiry(TlsHandle);

impl prometheus_client::collector::Collector for TlsExpiry {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let Some(not_after) = self.0.certificate_not_after() else {
            return Ok(());
        };
        let seconds = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(seconds);
        gauge.encode(encoder.encode_descriptor(
            "tls_certificate_expiry_timestamp_seconds",
            "When the served certificate expires, unix seconds",
            None,
            gauge.metric_type(),
        )?)
    }
}

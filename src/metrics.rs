//! Prometheus metrics: HTTP requests by endpoint and status with latency, HSM calls with
//! latency and errors, and the HSM session pool (queue depth, sessions in use).

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub endpoint: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HsmLabels {
    /// "ok", "unavailable", "timeout", "busy" or "error".
    pub outcome: &'static str,
}

/// 50 µs to about 3.3 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// What the HSM pool reports.
pub struct HsmMetrics {
    pub calls: Family<HsmLabels, Counter>,
    pub latency: Histogram,
    pub queue_depth: Gauge<i64, AtomicI64>,
    pub sessions_busy: Gauge<i64, AtomicI64>,
    pub sessions: Gauge<i64, AtomicI64>,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub hsm: std::sync::Arc<HsmMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("divkey");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by endpoint and status",
            http_requests.clone(),
        );
        let http_latency: Family<EndpointLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_buckets);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by endpoint",
            http_latency.clone(),
        );
        let hsm = HsmMetrics {
            calls: Family::default(),
            latency: latency_buckets(),
            queue_depth: Gauge::default(),
            sessions_busy: Gauge::default(),
            sessions: Gauge::default(),
        };
        registry.register("hsm_calls", "HSM operations by outcome", hsm.calls.clone());
        registry.register(
            "hsm_call_duration_seconds",
            "HSM operation latency (queue wait excluded)",
            hsm.latency.clone(),
        );
        registry.register(
            "hsm_queue_depth",
            "HSM operations waiting for a session",
            hsm.queue_depth.clone(),
        );
        registry.register(
            "hsm_sessions_busy",
            "HSM sessions running an operation",
            hsm.sessions_busy.clone(),
        );
        registry.register("hsm_sessions", "HSM working sessions", hsm.sessions.clone());
        Self {
            registry,
            http_requests,
            http_latency,
            hsm: std::sync::Arc::new(hsm),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

//! `/metrics`: vLLM's metric names under the `llmd:` prefix, label `model_name`.
//!
//! Engine gauges and counters (`num_requests_running`, `prompt_tokens`...) are read from
//! [`llmd_engine::EngineStats`] at scrape time by a collector, so they can never drift from
//! the engine. Latency histograms and `request_success` are recorded by the HTTP layer as
//! requests finish.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use llmd_engine::FinishReason;

use crate::backend::ModelRegistry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SuccessLabels {
    model_name: String,
    finished_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error_type: String,
}

type HistogramFamily = Family<ModelLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // vLLM's TTFT/e2e buckets, from 1 ms to 40 minutes.
    Histogram::new([
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0, 2560.0,
    ])
}

fn token_latency_histogram() -> Histogram {
    // vLLM's inter-token buckets plus sub-10 ms ones: engines often beat 10 ms per token.
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
        7.5, 10.0, 20.0, 40.0, 80.0,
    ])
}

/// Timings of one finished request, recorded into the histograms.
#[derive(Debug, Clone, Default)]
pub struct RequestTimings {
    /// Seconds from arrival to the first generated token.
    pub ttft: Option<f64>,
    /// Seconds between consecutive tokens.
    pub inter_token: Vec<f64>,
    /// Seconds from arrival to the last event.
    pub e2e: f64,
    /// Seconds waiting before the first scheduled step.
    pub queue: Option<f64>,
    /// Tokens generated (for the mean time per output token).
    pub output_tokens: u32,
}

/// The HTTP layer's metrics and the engine-stats collector.
pub struct Metrics {
    registry: Registry,
    request_success: Family<SuccessLabels, Counter>,
    request_errors: Family<ErrorLabels, Counter>,
    ttft: HistogramFamily,
    itl: HistogramFamily,
    tpot: HistogramFamily,
    e2e: HistogramFamily,
    queue: HistogramFamily,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers everything; `models` is read at each scrape.
    pub fn new(models: Arc<dyn ModelRegistry>) -> Self {
        let mut registry = Registry::default();
        let request_success = Family::<SuccessLabels, Counter>::default();
        let request_errors = Family::<ErrorLabels, Counter>::default();
        let ttft: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let itl: HistogramFamily = Family::new_with_constructor(token_latency_histogram);
        let tpot: HistogramFamily = Family::new_with_constructor(token_latency_histogram);
        let e2e: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let queue: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register("llmd:request_success", "Finished requests by finish reason", request_success.clone());
        registry.register("llmd:request_errors", "Refused or failed requests by error type", request_errors.clone());
        registry.register("llmd:time_to_first_token_seconds", "Time to first token", ttft.clone());
        registry.register("llmd:inter_token_latency_seconds", "Time between consecutive output tokens", itl.clone());
        registry.register(
            "llmd:time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            tpot.clone(),
        );
        registry.register("llmd:e2e_request_latency_seconds", "End-to-end request latency", e2e.clone());
        registry.register("llmd:request_queue_time_seconds", "Time waiting in the queue", queue.clone());
        registry.register_collector(Box::new(EngineCollector { models }));
        Metrics { registry, request_success, request_errors, ttft, itl, tpot, e2e, queue }
    }

    /// Records one finished choice's reason.
    pub fn record_finish(&self, model: &str, reason: &str) {
        self.request_success
            .get_or_create(&SuccessLabels { model_name: model.to_string(), finished_reason: reason.to_string() })
            .inc();
    }

    /// Records a refused or failed request.
    pub fn record_error(&self, error_type: &str) {
        self.request_errors.get_or_create(&ErrorLabels { error_type: error_type.to_string() }).inc();
    }

    /// Records the timings of a finished request.
    pub fn record_timings(&self, model: &str, t: &RequestTimings) {
        let label = ModelLabel { model_name: model.to_string() };
        if let Some(ttft) = t.ttft {
            self.ttft.get_or_create(&label).observe(ttft);
            if t.output_tokens > 1 {
                self.tpot.get_or_create(&label).observe((t.e2e - ttft).max(0.0) / f64::from(t.output_tokens - 1));
            }
        }
        let itl = self.itl.get_or_create(&label);
        for gap in &t.inter_token {
            itl.observe(*gap);
        }
        self.e2e.get_or_create(&label).observe(t.e2e);
        if let Some(q) = t.queue {
            self.queue.get_or_create(&label).observe(q);
        }
    }

    /// OpenMetrics text; `extra` (the daemon's GPU gauges) goes before the `# EOF` line.
    pub fn render(&self, extra: Option<&str>) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Encoding into a String cannot fail; keep the scrape answering anyway.
            out.clear();
        }
        let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
        let mut body = body;
        if let Some(extra) = extra.filter(|e| !e.is_empty()) {
            body.push_str(extra);
            if !extra.ends_with('\n') {
                body.push('\n');
            }
        }
        body.push_str("# EOF\n");
        body
    }
}

/// Reads `EngineStats` of every served model at scrape time.
#[derive(Clone)]
struct EngineCollector {
    models: Arc<dyn ModelRegistry>,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCollector").finish_non_exhaustive()
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats: Vec<(ModelLabel, llmd_engine::EngineStats)> = self
            .models
            .list()
            .into_iter()
            .map(|m| (ModelLabel { model_name: m.name().to_string() }, m.backend.stats()))
            .collect();
        let usage = |s: &llmd_engine::EngineStats| {
            if s.kv_blocks_total == 0 { 0.0 } else { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 }
        };
        type Gauge = fn(&llmd_engine::EngineStats) -> f64;
        let gauges: [(&str, &str, Gauge); 4] = [
            ("llmd:num_requests_running", "Requests in the running batch", |s| s.running as f64),
            ("llmd:num_requests_waiting", "Requests waiting to be scheduled", |s| s.waiting as f64),
            ("llmd:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = 100%)", usage),
            ("llmd:gpu_cache_usage_perc", "Alias of kv_cache_usage_perc (older vLLM name)", usage),
        ];
        for (name, help, read) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (label, s) in &stats {
                ConstGauge::new(read(s)).encode(metric.encode_family(label)?)?;
            }
        }
        type Count = fn(&llmd_engine::EngineStats) -> u64;
        let counters: [(&str, &str, Count); 5] = [
            ("llmd:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", |s| s.prefix_cache_queries),
            ("llmd:prefix_cache_hits", "Prompt tokens found in the prefix cache", |s| s.prefix_cache_hits),
            ("llmd:num_preemptions", "Sequences preempted for lack of KV blocks", |s| s.preemptions),
            ("llmd:prompt_tokens", "Prompt tokens processed", |s| s.prompt_tokens),
            ("llmd:generation_tokens", "Tokens generated", |s| s.generation_tokens),
        ];
        for (name, help, read) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (label, s) in &stats {
                ConstCounter::new(read(s)).encode(metric.encode_family(label)?)?;
            }
        }
        Ok(())
    }
}

/// One request's account in [`Metrics`]: its token timings as events arrive, each choice's
/// finish reason, and one outcome. Dropped before an outcome was settled (the client went away,
/// the request timed out) it counts the request as aborted, so chat and completions need no
/// bookkeeping of their own for that.
#[derive(Debug)]
pub struct RequestAccount {
    metrics: Arc<Metrics>,
    model: String,
    start: std::time::Instant,
    last_token: Option<std::time::Instant>,
    timings: RequestTimings,
    /// The timings went into the histograms (once).
    recorded: bool,
    /// The request reached an outcome: usage, an error, or a stream cut short on purpose.
    settled: bool,
}

impl RequestAccount {
    /// The account of a request accepted by the engine, timed from `start` (its arrival).
    pub fn new(metrics: Arc<Metrics>, model: &str, start: std::time::Instant) -> Self {
        RequestAccount {
            metrics,
            model: model.to_string(),
            start,
            last_token: None,
            timings: RequestTimings::default(),
            recorded: false,
            settled: false,
        }
    }

    /// The served model name the request is accounted under.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// An event carrying `tokens` new tokens arrived.
    pub fn on_tokens(&mut self, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let now = std::time::Instant::now();
        match self.last_token {
            None => {
                self.timings.ttft = Some((now - self.start).as_secs_f64());
                // Tokens beyond the first in the same event arrived with no gap we can see.
                self.timings.inter_token.extend(std::iter::repeat_n(0.0, tokens - 1));
            }
            Some(last) => {
                let gap = (now - last).as_secs_f64() / tokens as f64;
                self.timings.inter_token.extend(std::iter::repeat_n(gap, tokens));
            }
        }
        self.last_token = Some(now);
    }

    /// A choice finished with `reason` (the OpenAI `finish_reason`).
    pub fn choice_finished(&self, reason: &str) {
        self.metrics.record_finish(&self.model, reason);
    }

    /// The request completed: records its timings (once) and settles it.
    pub fn finish(&mut self, output_tokens: u32, queue: Option<std::time::Duration>) {
        self.settled = true;
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.timings.e2e = self.start.elapsed().as_secs_f64();
        self.timings.output_tokens = output_tokens;
        self.timings.queue = queue.map(|q| q.as_secs_f64());
        self.metrics.record_timings(&self.model, &self.timings);
    }

    /// The engine reported an error: counts it and settles the request.
    pub fn failed(&mut self) {
        self.settled = true;
        self.metrics.record_error("internal");
    }

    /// The request ended in a way already reported elsewhere (a stream truncated on purpose,
    /// a model that stopped): no abort is counted when it is dropped.
    pub fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for RequestAccount {
    fn drop(&mut self) {
        if !self.settled {
            self.metrics.record_finish(&self.model, FinishReason::Abort.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Phase, ServedModel};

    struct NoModels;

    impl ModelRegistry for NoModels {
        fn get(&self, _: &str) -> Option<ServedModel> {
            None
        }
        fn list(&self) -> Vec<ServedModel> {
            Vec::new()
        }
        fn phase(&self) -> Phase {
            Phase::Ready
        }
    }

    fn finished(metrics: &Metrics, reason: &str) -> bool {
        let line = format!("llmd:request_success_total{{model_name=\"m\",finished_reason=\"{reason}\"}} 1");
        metrics.render(None).lines().any(|l| l == line)
    }

    #[test]
    fn a_request_dropped_before_its_outcome_counts_as_aborted() {
        let metrics = Arc::new(Metrics::new(Arc::new(NoModels)));
        drop(RequestAccount::new(metrics.clone(), "m", std::time::Instant::now()));
        assert!(finished(&metrics, "abort"), "{}", metrics.render(None));

        // Settled in any of the three ways: no abort.
        for settle in [
            |a: &mut RequestAccount| a.finish(3, None),
            |a: &mut RequestAccount| a.failed(),
            |a: &mut RequestAccount| a.settle(),
        ] {
            let metrics = Arc::new(Metrics::new(Arc::new(NoModels)));
            let mut account = RequestAccount::new(metrics.clone(), "m", std::time::Instant::now());
            account.choice_finished("stop");
            settle(&mut account);
            drop(account);
            assert!(finished(&metrics, "stop"));
            assert!(!finished(&metrics, "abort"), "{}", metrics.render(None));
        }
    }
}

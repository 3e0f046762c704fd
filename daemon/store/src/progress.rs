//! Progress of a pull: per-file counters bumped by the downloads, turned into throttled
//! [`Progress`] events (bytes, rate over the last seconds, ETA) by a ticker.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llmd_proto::{FileProgress, Progress, ProgressUnit};
use parking_lot::Mutex;

/// Events per second at most, while bytes flow.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// Rates are averaged over this window.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// Counters of one file.
#[derive(Debug)]
pub(crate) struct FileTrack {
    pub name: String,
    pub total: Option<u64>,
    /// Bytes on disk.
    pub done: Arc<AtomicU64>,
    /// Bytes received in this run (the rate is computed from these, so resumed bytes do not
    /// look like a burst of speed).
    pub fetched: Arc<AtomicU64>,
    pub started: AtomicBool,
}

/// Sliding-window rate of a monotonic counter.
#[derive(Debug, Default)]
struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    fn sample(&mut self, now: Instant, value: u64) -> f64 {
        self.samples.push_back((now, value));
        while self.samples.len() > 2 && now.duration_since(self.samples[0].0) > RATE_WINDOW {
            self.samples.pop_front();
        }
        let (t0, v0) = self.samples[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt <= 0.0 { 0.0 } else { value.saturating_sub(v0) as f64 / dt }
    }
}

fn eta(done: u64, total: Option<u64>, rate: f64) -> Option<f64> {
    let left = total?.saturating_sub(done);
    if left == 0 {
        Some(0.0)
    } else if rate > 0.0 {
        Some(left as f64 / rate)
    } else {
        None
    }
}

/// Everything the ticker needs to build events for one pull.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub operation: String,
    pub model: String,
    pub phase: Mutex<String>,
    pub files: Mutex<Vec<Arc<FileTrack>>>,
    rates: Mutex<(Rate, HashMap<String, Rate>)>,
}

impl Tracker {
    pub fn new(operation: String, model: String) -> Tracker {
        Tracker {
            operation,
            model,
            phase: Mutex::new("resolving".into()),
            files: Mutex::new(Vec::new()),
            rates: Mutex::new((Rate::default(), HashMap::new())),
        }
    }

    pub fn set_phase(&self, phase: &str) {
        *self.phase.lock() = phase.to_string();
    }

    /// Registers a file; its counters are handed to the download.
    pub fn add_file(&self, name: &str, total: Option<u64>) -> Arc<FileTrack> {
        let t = Arc::new(FileTrack {
            name: name.to_string(),
            total,
            done: Arc::new(AtomicU64::new(0)),
            fetched: Arc::new(AtomicU64::new(0)),
            started: AtomicBool::new(false),
        });
        self.files.lock().push(t.clone());
        t
    }

    /// The current state as an event. Lists files that started (in flight or finished).
    pub fn snapshot(&self) -> Progress {
        let now = Instant::now();
        let files = self.files.lock().clone();
        let mut rates = self.rates.lock();
        let (total_rate, file_rates) = &mut *rates;
        let mut done = 0;
        let mut fetched = 0;
        let mut total = Some(0u64);
        let mut per_file = Vec::new();
        for f in &files {
            let d = f.done.load(Ordering::Relaxed);
            let got = f.fetched.load(Ordering::Relaxed);
            done += d;
            fetched += got;
            total = match (total, f.total) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
            if f.started.load(Ordering::Relaxed) {
                let rate = file_rates.entry(f.name.clone()).or_default().sample(now, got);
                let finished = f.total.is_some_and(|t| d >= t);
                let rate = if finished { 0.0 } else { rate };
                per_file.push(FileProgress {
                    name: f.name.clone(),
                    done: d,
                    total: f.total,
                    rate,
                    eta_secs: eta(d, f.total, rate),
                });
            }
        }
        let rate = total_rate.sample(now, fetched);
        Progress {
            operation: self.operation.clone(),
            model: self.model.clone(),
            phase: self.phase.lock().clone(),
            done,
            total: if files.is_empty() { None } else { total },
            unit: ProgressUnit::Bytes,
            rate,
            eta_secs: eta(done, total, rate),
            files: per_file,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_rates_and_eta() {
        let t = Tracker::new("pull-1".into(), "hf:a/b".into());
        let a = t.add_file("a", Some(100));
        let b = t.add_file("b", Some(300));
        a.started.store(true, Ordering::Relaxed);
        a.done.store(100, Ordering::Relaxed);
        let p = t.snapshot();
        assert_eq!((p.done, p.total, p.files.len()), (100, Some(400), 1));
        assert_eq!(p.files[0].eta_secs, Some(0.0));
        b.started.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        b.done.store(150, Ordering::Relaxed);
        b.fetched.store(150, Ordering::Relaxed);
        let p = t.snapshot();
        assert!(p.rate > 0.0, "{p:?}");
        let eta = p.eta_secs.unwrap();
        assert!(eta > 0.0 && (eta - 150.0 / p.rate).abs() < 1e-6, "{p:?}");
        let unknown = t.add_file("c", None);
        unknown.started.store(true, Ordering::Relaxed);
        assert_eq!(t.snapshot().total, None);
    }
}

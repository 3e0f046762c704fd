//! Progress display for long operations (pull, load), driven by the daemon's progress frames.
//!
//! On a terminal: indicatif bars, one per file in flight plus a total bar whose label is the
//! phase. Elsewhere (logs, CI): one plain line per phase, so the output stays readable.
//! With `--json`: nothing, stdout carries only the final reply.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use llmd_proto::{Progress, ProgressUnit};

use crate::fmt;

#[derive(Debug)]
pub struct ProgressView {
    mode: Mode,
    operation: Option<String>,
    last_phase: Option<(String, ProgressUnit)>,
}

#[derive(Debug)]
enum Mode {
    Quiet,
    Lines,
    Bars { multi: MultiProgress, total: Option<ProgressBar>, files: HashMap<String, ProgressBar> },
}

/// Rate and ETA as the daemon measured them; it sees the whole operation even when this
/// client joined late, so its numbers beat indicatif's local estimate.
fn rate_and_eta(unit: ProgressUnit, rate: f64, eta: Option<f64>) -> String {
    let rate = match unit {
        ProgressUnit::Bytes => format!("{}/s", fmt::bytes(rate.max(0.0) as u64)),
        ProgressUnit::Tensors => format!("{rate:.0} tensors/s"),
        ProgressUnit::Steps => format!("{rate:.1} steps/s"),
    };
    match eta {
        Some(eta) => format!("{rate}, ETA {}", fmt::eta(eta)),
        None => rate,
    }
}

fn total_style(unit: ProgressUnit, known_total: bool) -> ProgressStyle {
    let template = match (unit, known_total) {
        (ProgressUnit::Bytes, true) => "{prefix:>16.bold} [{bar:32.cyan/blue}] {bytes}/{total_bytes}  {msg}",
        (ProgressUnit::Tensors, true) => "{prefix:>16.bold} [{bar:32.cyan/blue}] {pos}/{len} tensors  {msg}",
        (ProgressUnit::Steps, true) => "{prefix:>16.bold} [{bar:32.cyan/blue}] {pos}/{len}  {msg}",
        (ProgressUnit::Bytes, false) => "{spinner} {prefix:>14.bold} {bytes}  {msg}",
        (_, false) => "{spinner} {prefix:>14.bold} {pos}  {msg}",
    };
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

fn file_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix:<44} [{bar:20}] {bytes}/{total_bytes}  {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Keeps long shard names from pushing the bar off narrow terminals.
fn short_name(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= 44 {
        name.to_string()
    } else {
        format!("…{}", chars[chars.len() - 43..].iter().collect::<String>())
    }
}

impl ProgressView {
    pub fn new(json: bool) -> ProgressView {
        let mode = if json {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                total: None,
                files: HashMap::new(),
            }
        } else {
            Mode::Lines
        };
        ProgressView { mode, operation: None, last_phase: None }
    }

    /// The operation id the daemon reported, needed to cancel or to tell the user.
    pub fn operation(&self) -> Option<&str> {
        self.operation.as_deref()
    }

    pub fn update(&mut self, p: &Progress) {
        self.operation = Some(p.operation.clone());
        let phase_changed = self.last_phase.as_ref().is_none_or(|(phase, unit)| *phase != p.phase || *unit != p.unit);
        let unit_changed = self.last_phase.as_ref().is_none_or(|(_, unit)| *unit != p.unit);
        if phase_changed {
            self.last_phase = Some((p.phase.clone(), p.unit));
        }
        match &mut self.mode {
            Mode::Quiet => {}
            Mode::Lines => {
                if phase_changed {
                    let size = match (p.unit, p.total) {
                        (ProgressUnit::Bytes, Some(t)) => format!(" ({})", fmt::bytes(t)),
                        (ProgressUnit::Tensors, Some(t)) => format!(" ({t} tensors)"),
                        (ProgressUnit::Steps, Some(t)) => format!(" ({t} steps)"),
                        (_, None) => String::new(),
                    };
                    eprintln!("{}: {}{size} [operation {}]", p.model, p.phase, p.operation);
                }
            }
            Mode::Bars { multi, total, files } => {
                if unit_changed {
                    // A new kind of work (download finished, loading begins): keep the old
                    // bar's last state on screen and start a fresh one below it.
                    if let Some(old) = total.take() {
                        old.finish();
                    }
                    for (_, bar) in files.drain() {
                        bar.finish();
                    }
                }
                let bar = total.get_or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(p.total.unwrap_or(0)));
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                bar.set_style(total_style(p.unit, p.total.is_some()));
                if let Some(t) = p.total {
                    bar.set_length(t);
                }
                bar.set_position(p.done);
                bar.set_prefix(p.phase.clone());
                bar.set_message(rate_and_eta(p.unit, p.rate, p.eta_secs));
                for f in &p.files {
                    let file_bar = files.entry(f.name.clone()).or_insert_with(|| {
                        let fb = multi.insert_before(bar, ProgressBar::new(f.total.unwrap_or(0)));
                        fb.set_style(file_style());
                        fb.set_prefix(short_name(&f.name));
                        fb
                    });
                    if file_bar.is_finished() {
                        continue;
                    }
                    if let Some(t) = f.total {
                        file_bar.set_length(t);
                    }
                    file_bar.set_position(f.done);
                    if f.total.is_some_and(|t| f.done >= t) {
                        file_bar.finish_with_message("done");
                    } else {
                        file_bar.set_message(rate_and_eta(ProgressUnit::Bytes, f.rate, f.eta_secs));
                    }
                }
            }
        }
    }

    /// After Ctrl-C: stops drawing and leaves the last frame on screen as it is, so it shows
    /// how far the operation got. No final redraw: the terminal's `^C` echo has moved the
    /// cursor behind indicatif's back, and a redraw would land a line off.
    pub fn freeze(&mut self) {
        if let Mode::Bars { total, files, multi } = &mut self.mode {
            multi.set_draw_target(ProgressDrawTarget::hidden());
            for bar in files.values().chain(total.iter()) {
                bar.abandon();
            }
            eprintln!();
        }
    }

    /// Stops drawing. `keep` leaves the last state on screen (success); otherwise the bars are
    /// cleared so an error message is not buried under them.
    pub fn finish(&mut self, keep: bool) {
        if let Mode::Bars { total, files, multi } = &mut self.mode {
            if !keep {
                // Wipe the whole block first, then stop drawing: finishing bars one by one
                // redraws a shrinking block and can leave a stale line behind.
                let _ = multi.clear();
                multi.set_draw_target(ProgressDrawTarget::hidden());
            }
            for bar in files.values().chain(total.iter()) {
                // `abandon` keeps the bar at its last position; `finish` would jump to 100%.
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_use_the_daemons_numbers() {
        assert_eq!(rate_and_eta(ProgressUnit::Bytes, 3.0 * 1048576.0, Some(61.2)), "3.0 MiB/s, ETA 1m 02s");
        assert_eq!(rate_and_eta(ProgressUnit::Tensors, 120.4, None), "120 tensors/s");
        assert_eq!(short_name("model.safetensors"), "model.safetensors");
        assert_eq!(short_name(&"x".repeat(60)).chars().count(), 44);
    }

    #[test]
    fn remembers_the_operation_id() {
        let mut view = ProgressView::new(true);
        assert_eq!(view.operation(), None);
        view.update(&Progress {
            operation: "pull-7".into(),
            model: "hf:a/b".into(),
            phase: "downloading".into(),
            done: 1,
            total: Some(2),
            unit: ProgressUnit::Bytes,
            rate: 1.0,
            eta_secs: Some(1.0),
            files: vec![],
        });
        assert_eq!(view.operation(), Some("pull-7"));
    }
}

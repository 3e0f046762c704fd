//! Human formatting: sizes, durations, counts and aligned tables.

/// Binary-prefixed size with one decimal, the way `nvidia-smi` and `du -h` users read it:
/// `512 B`, `1.5 KiB`, `15.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `45s`, `3m 12s`, `2h 03m`, `4d 02h`: two units are enough to read at a glance.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Seconds as a fractional ETA from the daemon; rounds up so "0s" never shows while work remains.
pub fn eta(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_string();
    }
    duration(secs.ceil() as u64)
}

/// Parameter counts the way model cards write them: `494M`, `7.6B`, `1.2T`.
pub fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.0}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.0}M", n as f64 / 1e6),
        1_000_000_000..1_000_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        _ => format!("{:.1}T", n as f64 / 1e12),
    }
}

/// A fixed-width usage bar: `[██████░░░░]`.
pub fn bar(used: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 { 0 } else { ((used as f64 / total as f64) * width as f64).round() as usize };
    let filled = filled.min(width);
    format!("[{}{}]", "█".repeat(filled), "░".repeat(width - filled))
}

/// Percentage of `used` in `total`, `0%` when the total is unknown.
pub fn percent(used: u64, total: u64) -> u64 {
    if total == 0 { 0 } else { (used as f64 * 100.0 / total as f64).round() as u64 }
}

/// A plain text table: columns padded to their widest cell, two spaces apart, no trailing blanks.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    right: Vec<bool>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            right: vec![false; header.len()],
        }
    }

    /// Right-aligns the named columns (numbers read better that way).
    pub fn right(mut self, columns: &[usize]) -> Table {
        for &c in columns {
            self.right[c] = true;
        }
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |c: usize| {
            std::iter::once(&self.header[c]).chain(self.rows.iter().map(|r| &r[c])).map(|s| s.chars().count()).max()
        };
        let widths: Vec<usize> = (0..self.header.len()).map(|c| width(c).unwrap_or(0)).collect();
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                let pad = widths[c] - cell.chars().count();
                if self.right[c] {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(15 * 1024 * 1024 * 1024), "15.0 GiB");
        assert_eq!(bytes(80 * (1 << 30) + (1 << 29)), "80.5 GiB");
    }

    #[test]
    fn durations_and_counts() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(192), "3m 12s");
        assert_eq!(duration(7380), "2h 03m");
        assert_eq!(duration(4 * 86_400 + 7200), "4d 02h");
        assert_eq!(eta(0.2), "1s");
        assert_eq!(eta(f64::NAN), "?");
        assert_eq!(count(494_032_768), "494M");
        assert_eq!(count(7_615_616_512), "7.6B");
        assert_eq!(count(12), "12");
    }

    #[test]
    fn bars_and_tables() {
        assert_eq!(bar(50, 100, 4), "[██░░]");
        assert_eq!(bar(5, 0, 2), "[░░]");
        assert_eq!(percent(1, 3), 33);
        let mut t = Table::new(&["NAME", "SIZE", "X"]).right(&[1]);
        t.row(vec!["a".into(), "1.0 GiB".into(), String::new()]);
        t.row(vec!["longer".into(), "5 B".into(), "y".into()]);
        assert_eq!(t.render(), "NAME       SIZE  X\na       1.0 GiB\nlonger      5 B  y\n");
    }
}

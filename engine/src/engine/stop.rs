//! The stop-string scan: where a stop string matches in decoded text, and how much text must
//! be held back because it may be the start of one.

/// Outcome of looking for stop strings in decoded text.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StopScan {
    /// A stop string starts at byte `at`: emit `text[..at]`, drop the rest.
    Matched { at: usize, stop: usize },
    /// No match: emit `text[..emit]`, hold back the rest (a prefix of some stop string).
    Clear { emit: usize },
}

/// Looks for `stops` in `text`: the earliest match (ties: the earlier stop in the list), else
/// how much of `text` can go out without cutting a possible stop string short.
pub(super) fn scan_stops(text: &str, stops: &[String]) -> StopScan {
    let first = stops.iter().enumerate().filter_map(|(i, s)| text.find(s.as_str()).map(|at| (at, i))).min();
    if let Some((at, stop)) = first {
        return StopScan::Matched { at, stop };
    }
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    for k in (1..longest.min(text.len() + 1)).rev() {
        let start = text.len() - k;
        if text.is_char_boundary(start) && stops.iter().any(|s| s.len() > k && s.starts_with(&text[start..])) {
            return StopScan::Clear { emit: start };
        }
    }
    StopScan::Clear { emit: text.len() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn stop_scan_finds_earliest_match() {
        assert_eq!(scan_stops("abc END x STOP", &stops(&["STOP", "END"])), StopScan::Matched { at: 4, stop: 1 });
    }

    #[test]
    fn stop_scan_holds_back_possible_prefix() {
        assert_eq!(scan_stops("hello EN", &stops(&["END"])), StopScan::Clear { emit: 6 });
        assert_eq!(scan_stops("hello E", &stops(&["END", "xx"])), StopScan::Clear { emit: 6 });
        assert_eq!(scan_stops("hello", &stops(&["END"])), StopScan::Clear { emit: 5 });
        // Multi-byte characters: never split one.
        assert_eq!(scan_stops("日本", &stops(&["本語"])), StopScan::Clear { emit: 3 });
        assert_eq!(scan_stops("日本", &stops(&["x本"])), StopScan::Clear { emit: 6 });
    }
}

//! How values read on a page: times, durations, short ids, payloads.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// Payloads longer than this are cut on the step page.
pub const PAYLOAD_MAX: usize = 64 * 1024;

/// Errors and payloads in lists are cut to this many characters.
pub const LIST_TEXT_MAX: usize = 120;

pub use crate::ops::time as maybe_time;

/// A time as the pages print it (UTC, to the second).
pub fn time(t: DateTime<Utc>) -> String {
    maybe_time(Some(t))
}

/// A duration, compactly: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 10 min`
/// (rounded to the unit shown).
pub fn duration(d: chrono::TimeDelta) -> String {
    let ms = d.num_milliseconds().max(0);
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let tenths = (ms + 50) / 100;
    if tenths < 600 {
        return format!("{}.{} s", tenths / 10, tenths % 10);
    }
    let secs = (ms + 500) / 1000;
    if secs < 3600 {
        return format!("{} min {:02} s", secs / 60, secs % 60);
    }
    format!("{} h {:02} min", secs / 3600, secs / 60 % 60)
}

/// How long something ran: from `start` to `end`, or to now while it runs.
pub fn elapsed(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    match start {
        Some(s) => duration(end.unwrap_or_else(Utc::now) - s),
        None => "-".to_owned(),
    }
}

/// The first 8 hex digits of an id (the full id goes in a `title`).
pub fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_owned()
}

/// Text cut to `max` characters on one line (newlines become spaces).
pub fn cut(text: &str, max: usize) -> String {
    crate::ops::one_line(text, max)
}

/// A JSON value pretty-printed, cut to [`PAYLOAD_MAX`] bytes (with a note).
pub fn payload(value: &Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    if text.len() <= PAYLOAD_MAX {
        return text;
    }
    let mut end = PAYLOAD_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n… ({} bytes in all; cut at {PAYLOAD_MAX})",
        &text[..end],
        text.len()
    )
}

/// A count capped at `cap`: `10,000+` when the query stopped there.
pub fn capped(count: i64, cap: i64) -> String {
    if count > cap {
        format!("{}+", thousands(cap))
    } else {
        thousands(count)
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_compactly() {
        let ms = chrono::TimeDelta::milliseconds;
        for (millis, text) in [
            (-5, "0 ms"),
            (850, "850 ms"),
            (1_000, "1.0 s"),
            (12_340, "12.3 s"),
            (59_940, "59.9 s"),
            (59_960, "1 min 00 s"),
            (245_000, "4 min 05 s"),
            (3_599_400, "59 min 59 s"),
            (3_599_999, "1 h 00 min"),
            (7_800_000, "2 h 10 min"),
        ] {
            assert_eq!(duration(ms(millis)), text, "{millis} ms");
        }
    }

    #[test]
    fn counts_are_grouped_and_capped() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(capped(10_001, 10_000), "10,000+");
        assert_eq!(capped(42, 10_000), "42");
    }

    #[test]
    fn long_payloads_are_cut_on_a_char_boundary() {
        let v = Value::String("é".repeat(PAYLOAD_MAX));
        let text = payload(&v);
        assert!(text.contains("bytes in all"));
        assert!(text.len() < PAYLOAD_MAX + 100);
    }
}

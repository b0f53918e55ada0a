//! Terminal output: colors (plain ANSI, only on a terminal and without
//! NO_COLOR), aligned tables, humanized durations, and JSON views of the
//! protocol messages.

use std::{
    io::{self, IsTerminal, Write},
    time::{Duration, SystemTime},
};

use gpuswap::{config::format_bytes, pb};
use serde_json::{Value, json};

pub const BOLD: &str = "1";
pub const DIM: &str = "2";
pub const RED: &str = "31";
pub const GREEN: &str = "32";
pub const YELLOW: &str = "33";
pub const MAGENTA: &str = "35";
pub const CYAN: &str = "36";
/// The softer red used for a backend's stderr lines.
pub const LIGHT_RED: &str = "91";

/// Whether one output stream gets colors.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    color: bool,
}

impl Style {
    pub fn stdout(no_color: bool) -> Self {
        Self {
            color: color_allowed(no_color, io::stdout().is_terminal()),
        }
    }

    pub fn stderr(no_color: bool) -> Self {
        Self {
            color: color_allowed(no_color, io::stderr().is_terminal()),
        }
    }

    pub fn enabled(self) -> bool {
        self.color
    }

    /// `text` wrapped in an SGR sequence (`code` like "1;31"), or as is.
    pub fn paint(self, code: &str, text: &str) -> String {
        if self.color && !code.is_empty() {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// NO_COLOR (https://no-color.org) counts only when set and not empty.
fn color_allowed(no_color_flag: bool, is_terminal: bool) -> bool {
    let env_says_no = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color_flag && is_terminal && !env_says_no
}

/// The color of a model state: green ready, yellow transitions, red failed.
pub fn state_color(state: pb::ModelState) -> &'static str {
    use pb::ModelState as S;
    match state {
        S::Ready => GREEN,
        S::Starting | S::Stopping => YELLOW,
        S::Failed => "1;31",
        S::Unavailable => MAGENTA,
        S::Stopped | S::Sleeping => DIM,
        S::Unspecified => "",
    }
}

pub fn model_state(model: &pb::ModelStatus) -> pb::ModelState {
    pb::ModelState::try_from(model.state).unwrap_or(pb::ModelState::Unspecified)
}

/// One table cell: its text (measured for alignment) and an optional color.
pub struct Cell {
    text: String,
    color: &'static str,
}

impl Cell {
    pub fn plain(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            color: "",
        }
    }

    pub fn colored(text: impl Into<String>, color: &'static str) -> Self {
        Self {
            text: text.into(),
            color,
        }
    }
}

/// A table with a header row, columns padded to their widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    right_aligned: Vec<bool>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// Columns as (header, right-aligned).
    pub fn new(columns: &[(&'static str, bool)]) -> Self {
        Self {
            headers: columns.iter().map(|c| c.0).collect(),
            right_aligned: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// Two spaces between columns, no trailing spaces. Widths count chars,
    /// which is right for the ASCII and Latin text model names use.
    pub fn render(&self, style: Style) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.text.chars().count());
            }
        }
        let last = self.headers.len().saturating_sub(1);
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = (&str, &str)>| {
            let mut text = String::new();
            for (i, (cell, color)) in cells.enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if self.right_aligned[i] {
                    text.push_str(&" ".repeat(pad));
                }
                text.push_str(&style.paint(color, cell));
                if !self.right_aligned[i] && i < last {
                    text.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut self.headers.iter().map(|h| (*h, BOLD)));
        for row in &self.rows {
            line(&mut row.iter().map(|c| (c.text.as_str(), c.color)));
        }
        out
    }
}

/// A duration for people: "45s", "3m 05s", "2h 03m", "4d 02h".
pub fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}d {hours:02}h")
    } else if hours > 0 {
        format!("{hours}h {minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m {seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

pub fn humanize_ms(ms: u64) -> String {
    humanize(Duration::from_millis(ms))
}

/// Seconds with one decimal, for start times ("12.3 s").
pub fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// A text progress bar `width` cells wide: "[#########-----------]".
pub fn bar(percent: f32, width: usize) -> String {
    let filled = ((percent.clamp(0.0, 100.0) / 100.0) * width as f32).round() as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// At most `max` chars on one line, ending in "…" when cut.
pub fn truncate(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one_line = one_line.trim();
    if one_line.chars().count() <= max {
        return one_line.to_owned();
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// "-" for an empty list, else the items joined with commas.
pub fn list_or_dash<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
    }
}

/// An RFC 3339 UTC timestamp with milliseconds from Unix milliseconds.
pub fn timestamp_ms(ms: u64) -> String {
    let time = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// The current UTC time of day, "12:04:05", for event lines.
pub fn time_of_day() -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // "2026-01-02T12:04:05Z": the part between 'T' and 'Z'.
    now.get(11..19).unwrap_or(&now).to_owned()
}

/// Writes text to stdout; a closed stdout surfaces as BrokenPipe (where
/// `print!` would panic).
pub fn print(text: &str) -> io::Result<()> {
    io::stdout().lock().write_all(text.as_bytes())
}

/// Writes one line to stdout.
pub fn println(line: impl AsRef<str>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(line.as_ref().as_bytes())?;
    out.write_all(b"\n")
}

pub fn json_line(value: &Value) -> io::Result<()> {
    println(value.to_string())
}

pub fn json_pretty(value: &Value) -> io::Result<()> {
    println(serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()))
}

pub fn model_json(model: &pb::ModelStatus) -> Value {
    json!({
        "name": model.name,
        "aliases": model.aliases,
        "kind": model.kind,
        "state": gpuswap::state_name(model_state(model)),
        "pid": nonzero(model.pid.into()),
        "uptime_ms": model.uptime_ms,
        "restarts": model.restarts,
        "last_error": empty_to_null(&model.last_error),
        "gpus": model.gpus,
        "host": model.host,
        "port": model.port,
        "served_name": model.served_name,
        "generation": model.generation,
        "holders": model.holders,
        "detail": empty_to_null(&model.detail),
        "last_startup_ms": nonzero(model.last_startup_ms),
        "idle_ttl_ms": model.idle_ttl_ms,
        "progress": model.progress.as_ref().map(|p| json!({
            "phase": p.phase, "percent": p.percent, "detail": p.detail,
            "elapsed_ms": p.elapsed_ms, "eta_ms": p.eta_ms, "typical_ms": p.typical_ms,
        })),
        "vram_bytes": model.vram_bytes,
        "pinned": model.pinned,
        "last_used_ms": model.last_used_ms,
    })
}

pub fn gpu_json(gpu: &pb::GpuStatus) -> Value {
    json!({
        "index": gpu.index,
        "capacity_bytes": gpu.capacity_bytes,
        "reserved_bytes": gpu.reserved_bytes,
        "used_bytes": gpu.used_bytes,
        "models": gpu.models,
    })
}

/// What a model takes: "40 GiB", "whole GPU"; ", pinned" when it is.
pub fn vram_text(model: &pb::ModelStatus) -> String {
    let mut text = model
        .vram_bytes
        .map_or_else(|| "whole GPU".to_owned(), format_bytes);
    if model.pinned {
        text.push_str(", pinned");
    }
    text
}

/// "GPU 0: 80 GiB of 96 GiB reserved (82.3 GiB used) by a, b"
pub fn gpu_line(gpu: &pb::GpuStatus) -> String {
    let mut line = format!("GPU {}: {} ", gpu.index, format_bytes(gpu.reserved_bytes));
    match gpu.capacity_bytes {
        Some(capacity) => line.push_str(&format!("of {} reserved", format_bytes(capacity))),
        None => line.push_str("reserved"),
    }
    if let Some(used) = gpu.used_bytes {
        line.push_str(&format!(" ({} used)", format_bytes(used)));
    }
    if !gpu.models.is_empty() {
        line.push_str(&format!(" by {}", gpu.models.join(", ")));
    }
    line
}

pub fn supervisor_json(info: &pb::SupervisorInfo) -> Value {
    json!({
        "version": info.version,
        "pid": info.pid,
        "uptime_ms": info.uptime_ms,
        "queue": info.queue,
    })
}

pub fn log_stream_name(stream: i32) -> &'static str {
    match pb::LogStream::try_from(stream).unwrap_or(pb::LogStream::Unspecified) {
        pb::LogStream::Stdout => "stdout",
        pb::LogStream::Stderr => "stderr",
        pb::LogStream::Supervisor => "supervisor",
        pb::LogStream::Unspecified => "unknown",
    }
}

pub fn log_json(line: &pb::LogLine) -> Value {
    json!({
        "model": line.model,
        "stream": log_stream_name(line.stream),
        "line": line.line,
        "time_ms": line.time_ms,
        "dropped": line.dropped,
    })
}

fn nonzero(value: u64) -> Value {
    if value == 0 {
        Value::Null
    } else {
        value.into()
    }
}

fn empty_to_null(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_systemctl() {
        assert_eq!(humanize(Duration::from_millis(999)), "0s");
        assert_eq!(humanize(Duration::from_secs(45)), "45s");
        assert_eq!(humanize(Duration::from_secs(185)), "3m 05s");
        assert_eq!(humanize(Duration::from_secs(2 * 3600 + 180)), "2h 03m");
        assert_eq!(humanize(Duration::from_secs(4 * 86_400 + 7200)), "4d 02h");
        assert_eq!(seconds(1234), "1.2 s");
    }

    #[test]
    fn truncation_keeps_one_line_within_the_limit() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("line one\nline two", 100), "line one line two");
        let cut = truncate("abcdefghijkl", 5);
        assert_eq!(cut, "abcd…");
        assert_eq!(cut.chars().count(), 5);
    }

    #[test]
    fn table_columns_align_on_the_widest_cell_without_trailing_spaces() {
        let mut table = Table::new(&[("NAME", false), ("PID", true), ("NOTE", false)]);
        table.row(vec![Cell::plain("a"), Cell::plain("7"), Cell::plain("")]);
        table.row(vec![
            Cell::colored("longer-name", GREEN),
            Cell::plain("12345"),
            Cell::plain("x"),
        ]);
        let text = table.render(Style { color: false });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME           PID  NOTE");
        assert_eq!(lines[1], "a                7");
        assert_eq!(lines[2], "longer-name  12345  x");
    }

    #[test]
    fn colored_cells_pad_by_their_visible_width() {
        let mut table = Table::new(&[("S", false), ("N", false)]);
        table.row(vec![Cell::colored("ready", GREEN), Cell::plain("1")]);
        table.row(vec![Cell::plain("stopped"), Cell::plain("2")]);
        let text = table.render(Style { color: true });
        let row = text.lines().nth(1).unwrap();
        assert_eq!(row, "\x1b[32mready\x1b[0m    1");
    }
}

//! `activate` (following the Activate stream, optionally holding the model)
//! and `deactivate`.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use gpuswap::pb::{self, activate_event::Event};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::{
    Ctx,
    exit::Code,
    output::{self, Style},
};

pub async fn activate(
    mut ctx: Ctx,
    model: String,
    force: bool,
    hold: bool,
) -> anyhow::Result<Code> {
    let request = pb::ActivateRequest {
        model: model.clone(),
        hold,
        force,
        client: client_name(),
    };
    let mut stream = ctx.client.activate(request).await?.into_inner();
    let mut view = ProgressView::new(&ctx, &model);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    // Redraws the spinner so countdowns and the elapsed time move between events.
    let mut redraw = tokio::time::interval(Duration::from_millis(200));
    let mut holding = false;
    loop {
        tokio::select! {
            message = stream.message() => {
                let event = match message {
                    Ok(Some(event)) => event,
                    Ok(None) => break,
                    Err(status) => {
                        view.clear();
                        return Err(status.into());
                    }
                };
                if let Some(code) = view.on_event(&event, hold)? {
                    return Ok(code);
                }
                holding |= matches!(event.event, Some(Event::Ready(_)));
            }
            _ = &mut interrupted => {
                view.clear();
                if holding {
                    // Dropping the stream is what releases the hold.
                    view.note(&format!("released the hold on {model}"));
                    return Ok(Code::Success);
                }
                view.note(&format!("interrupted: stopped following the activation of {model}"));
                return Ok(Code::Interrupted);
            }
            _ = redraw.tick(), if view.spinner.is_some() => view.refresh(),
        }
    }
    view.clear();
    if holding {
        eprintln!(
            "{}: the supervisor ended the hold on {model}",
            ctx.err.paint("1;31", "error")
        );
    } else {
        eprintln!(
            "{}: the supervisor closed the activation of {model} before it was ready",
            ctx.err.paint("1;31", "error")
        );
    }
    Ok(Code::Failed)
}

pub async fn deactivate(
    mut ctx: Ctx,
    model: Option<String>,
    all: bool,
    force: bool,
    sleep: bool,
) -> anyhow::Result<Code> {
    let target = model.clone().unwrap_or_default();
    let verb = if sleep {
        "putting to sleep"
    } else {
        "stopping"
    };
    let spinner = interactive(&ctx).then(|| {
        let what = if all {
            "every model".to_owned()
        } else {
            target.clone()
        };
        spinner(ctx.err, format!("{verb} {what}"))
    });
    let response = ctx
        .client
        .deactivate(pb::DeactivateRequest {
            model: target.clone(),
            all,
            force,
            if_idle_generation: None,
            sleep,
        })
        .await;
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    let stopped = response?.into_inner().stopped;
    if ctx.json {
        let key = if sleep { "asleep" } else { "stopped" };
        output::json_pretty(&json!({ key: stopped }))?;
    } else if stopped.is_empty() {
        output::println(if all {
            "no model was running".to_owned()
        } else {
            format!("{target} was not running")
        })?;
    } else {
        for name in &stopped {
            output::println(if sleep {
                format!("{name} is asleep")
            } else {
                format!("stopped {name}")
            })?;
        }
    }
    Ok(Code::Success)
}

/// Spinner only for a person at a terminal; scripts get plain lines or JSON.
fn interactive(ctx: &Ctx) -> bool {
    !ctx.json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

fn spinner(style: Style, message: String) -> ProgressBar {
    let template = if style.enabled() {
        "{spinner:.cyan} {elapsed:>3} {wide_msg}"
    } else {
        "{spinner} {elapsed:>3} {wide_msg}"
    };
    let bar = ProgressBar::new_spinner().with_message(message);
    if let Ok(progress_style) = ProgressStyle::with_template(template) {
        bar.set_style(progress_style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// "gpuswapctl:alice@gpu-box", shown by the supervisor next to the hold.
fn client_name() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!("gpuswapctl:{user}@{host}")
}

/// Where the activation stands, for the spinner.
enum Phase {
    Connecting,
    Queued {
        position: u32,
        behind: String,
    },
    Draining {
        model: String,
        holders: u32,
        revoke_at: Instant,
        residency_until: Instant,
    },
    Stopping {
        model: String,
    },
    Starting {
        model: String,
        pid: u32,
        generation: u64,
        /// The load's progress as the supervisor last reported it.
        progress: Option<pb::LoadProgress>,
    },
    Holding {
        generation: u64,
    },
}

/// How the progress is shown: a spinner (terminal), one line per event on
/// stderr (pipes), or one JSON object per event on stdout (`--json`).
struct ProgressView {
    model: String,
    json: bool,
    out: Style,
    err: Style,
    spinner: Option<ProgressBar>,
    phase: Phase,
    last_log: String,
}

impl ProgressView {
    fn new(ctx: &Ctx, model: &str) -> Self {
        let spinner = interactive(ctx).then(|| spinner(ctx.err, format!("activating {model}")));
        Self {
            model: model.to_owned(),
            json: ctx.json,
            out: ctx.out,
            err: ctx.err,
            spinner,
            phase: Phase::Connecting,
            last_log: String::new(),
        }
    }

    /// Shows one event; `Some(code)` when it ends the command.
    fn on_event(&mut self, event: &pb::ActivateEvent, hold: bool) -> std::io::Result<Option<Code>> {
        let Some(kind) = &event.event else {
            return Ok(None);
        };
        if self.json {
            output::json_line(&event_json(event.elapsed_ms, kind))?;
        }
        let now = Instant::now();
        match kind {
            Event::Queued(q) => {
                self.phase = Phase::Queued {
                    position: q.position,
                    behind: q.behind.clone(),
                }
            }
            Event::Draining(d) => {
                self.phase = Phase::Draining {
                    model: d.model.clone(),
                    holders: d.holders,
                    revoke_at: now + Duration::from_millis(d.deadline_ms),
                    residency_until: now + Duration::from_millis(d.residency_ms),
                }
            }
            Event::Stopping(s) => {
                self.phase = Phase::Stopping {
                    model: s.model.clone(),
                }
            }
            Event::Starting(s) => {
                self.phase = Phase::Starting {
                    model: s.model.clone(),
                    pid: s.pid,
                    generation: s.generation,
                    progress: None,
                };
                self.last_log.clear();
            }
            Event::Progress(p) => {
                let Phase::Starting { progress, .. } = &mut self.phase else {
                    return Ok(None);
                };
                // A refresh that only moves the estimate is shown by the spinner, not as a
                // new line.
                let moved = progress
                    .as_ref()
                    .is_none_or(|old| old.percent != p.percent || old.detail != p.detail);
                *progress = Some(p.clone());
                if !moved || self.spinner.is_some() {
                    self.refresh();
                    return Ok(None);
                }
            }
            Event::Log(line) => {
                self.last_log = line.line.clone();
                if self.spinner.is_none() && !self.json {
                    self.line(
                        event.elapsed_ms,
                        &self.err.paint(output::DIM, &format!("│ {}", line.line)),
                    );
                }
                self.refresh();
                return Ok(None);
            }
            Event::Ready(ready) => {
                return self
                    .on_ready(ready, hold)
                    .map(|()| (!hold).then_some(Code::Success));
            }
            Event::Failed(failed) => {
                self.clear();
                self.report_failure(failed);
                return Ok(Some(Code::Failed));
            }
            Event::DrainRequested(drain) => {
                // A hold from the command line has no requests in flight, so it
                // honours a drain at once, as every holder must.
                self.clear();
                self.note(&format!(
                    "{} is wanted by {}: released the hold on {} (it would be revoked in {})",
                    self.model,
                    if drain.wanted_by.is_empty() {
                        "another activation"
                    } else {
                        &drain.wanted_by
                    },
                    drain.model,
                    output::humanize_ms(drain.deadline_ms)
                ));
                return Ok(Some(Code::Success));
            }
            Event::HoldLost(lost) => {
                self.clear();
                eprintln!(
                    "{}: the hold on {} was lost: {}",
                    self.err.paint("1;31", "error"),
                    lost.model,
                    lost.reason
                );
                return Ok(Some(Code::Failed));
            }
        }
        if self.spinner.is_none() && !self.json {
            self.line(event.elapsed_ms, &self.describe(now));
        }
        self.refresh();
        Ok(None)
    }

    fn on_ready(&mut self, ready: &pb::Ready, hold: bool) -> std::io::Result<()> {
        if let Some(spinner) = &self.spinner {
            spinner.finish_and_clear();
        }
        if !self.json {
            let how = if ready.startup_ms == 0 {
                "already running".to_owned()
            } else {
                format!("started in {}", output::seconds(ready.startup_ms))
            };
            output::println(format!(
                "{} {} at {} (generation {}, {how})",
                ready.model,
                self.out.paint(output::GREEN, "ready"),
                ready.address,
                ready.generation,
            ))?;
        }
        if hold {
            self.phase = Phase::Holding {
                generation: ready.generation,
            };
            self.last_log.clear();
            if self.spinner.is_some() {
                self.spinner = Some(spinner(self.err, self.describe(Instant::now())));
            } else if !self.json {
                self.note(&format!("holding {}; Ctrl-C releases it", ready.model));
            }
        }
        Ok(())
    }

    fn report_failure(&self, failed: &pb::Failed) {
        let model = if failed.model.is_empty() {
            &self.model
        } else {
            &failed.model
        };
        eprintln!(
            "{}: activation of {model} failed: {}",
            self.err.paint("1;31", "error"),
            failed.reason
        );
        if !failed.log_tail.is_empty() {
            eprintln!(
                "{}",
                self.err
                    .paint(output::BOLD, &format!("last log lines of {model}:"))
            );
            for line in &failed.log_tail {
                eprintln!("  {line}");
            }
        }
    }

    fn describe(&self, now: Instant) -> String {
        match &self.phase {
            Phase::Connecting => format!("activating {}", self.model),
            Phase::Queued { position, behind } if behind.is_empty() => {
                format!("queued #{position}")
            }
            Phase::Queued { position, behind } => format!("queued #{position} behind {behind}"),
            Phase::Draining {
                model,
                holders,
                revoke_at,
                residency_until,
            } => {
                let mut parts = Vec::new();
                if *holders > 0 {
                    let left = revoke_at.saturating_duration_since(now);
                    let plural = if *holders == 1 { "" } else { "s" };
                    parts.push(if left.is_zero() {
                        format!("{holders} holder{plural}, revoking")
                    } else {
                        format!(
                            "{holders} holder{plural}, revoked in {}",
                            output::humanize(left)
                        )
                    });
                }
                let residency = residency_until.saturating_duration_since(now);
                if !residency.is_zero() {
                    parts.push(format!(
                        "minimum residency {} left",
                        output::humanize(residency)
                    ));
                }
                if parts.is_empty() {
                    format!("draining {model}")
                } else {
                    format!("draining {model} ({})", parts.join(", "))
                }
            }
            Phase::Stopping { model } => format!("stopping {model}"),
            Phase::Starting {
                model,
                pid,
                generation,
                progress,
            } => {
                // The same pid and generation as its start: a sleeping model wakes.
                let verb = match progress {
                    Some(p) if p.phase == "waking" => "waking",
                    _ => "starting",
                };
                let mut text = format!("{verb} {model} (pid {pid}, generation {generation})");
                if let Some(progress) = progress {
                    if let Some(percent) = progress.percent {
                        text.push(' ');
                        text.push_str(&output::bar(percent, 20));
                    }
                    let said = gpuswap::progress_text(progress);
                    if !said.is_empty() {
                        text.push(' ');
                        text.push_str(&said);
                    }
                }
                text
            }
            Phase::Holding { generation } => format!(
                "holding {} (generation {generation}); Ctrl-C releases it",
                self.model
            ),
        }
    }

    fn refresh(&self) {
        if let Some(spinner) = &self.spinner {
            let mut message = self.describe(Instant::now());
            if !self.last_log.is_empty() {
                message.push_str(" · ");
                message.push_str(
                    &self
                        .err
                        .paint(output::DIM, &output::truncate(&self.last_log, 200)),
                );
            }
            spinner.set_message(message);
        }
    }

    /// One progress line on stderr: "[  1.2s] starting m1 (pid 42, generation 3)".
    fn line(&self, elapsed_ms: u64, text: &str) {
        let stamp = format!("[{:>6.1}s]", elapsed_ms as f64 / 1000.0);
        eprintln!("{} {text}", self.err.paint(output::DIM, &stamp));
    }

    /// A message for the person (stderr), never mixed into JSON on stdout.
    fn note(&self, text: &str) {
        eprintln!("{text}");
    }

    fn clear(&self) {
        if let Some(spinner) = &self.spinner {
            spinner.finish_and_clear();
        }
    }
}

fn event_json(elapsed_ms: u64, event: &Event) -> Value {
    let mut value = match event {
        Event::Queued(q) => json!({"event": "queued", "position": q.position, "behind": q.behind}),
        Event::Draining(d) => json!({
            "event": "draining", "model": d.model, "holders": d.holders,
            "deadline_ms": d.deadline_ms, "residency_ms": d.residency_ms,
        }),
        Event::Stopping(s) => json!({"event": "stopping", "model": s.model}),
        Event::Starting(s) => json!({
            "event": "starting", "model": s.model, "pid": s.pid, "generation": s.generation,
        }),
        Event::Log(line) => json!({
            "event": "log", "model": line.model,
            "stream": output::log_stream_name(line.stream), "line": line.line,
        }),
        Event::Ready(r) => json!({
            "event": "ready", "model": r.model, "address": r.address,
            "served_name": r.served_name, "generation": r.generation,
            "api_key": r.api_key, "startup_ms": r.startup_ms,
        }),
        Event::Failed(f) => json!({
            "event": "failed", "model": f.model, "reason": f.reason, "log_tail": f.log_tail,
        }),
        Event::DrainRequested(d) => json!({
            "event": "drain_requested", "model": d.model, "wanted_by": d.wanted_by,
            "deadline_ms": d.deadline_ms,
        }),
        Event::HoldLost(h) => json!({"event": "hold_lost", "model": h.model, "reason": h.reason}),
        Event::Progress(p) => json!({
            "event": "progress", "model": p.model, "phase": p.phase, "percent": p.percent,
            "detail": p.detail, "eta_ms": p.eta_ms, "typical_ms": p.typical_ms,
            "text": gpuswap::progress_text(p),
        }),
    };
    value["elapsed_ms"] = elapsed_ms.into();
    value
}

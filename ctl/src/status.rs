//! `status` and `models`: snapshots of the supervisor and its models.

use gpuswap::pb;
use serde_json::json;

use crate::{
    Ctx,
    exit::{Code, Failure},
    logs,
    output::{self, Cell, Style, Table},
};

/// Width of the LAST ERROR column; `status MODEL` prints the whole error.
const ERROR_WIDTH: usize = 48;

pub async fn status(mut ctx: Ctx, model: Option<String>, log_lines: u32) -> anyhow::Result<Code> {
    let snapshot = ctx.client.status(pb::StatusRequest {}).await?.into_inner();
    let info = snapshot.supervisor.clone().unwrap_or_default();
    let Some(wanted) = model else {
        if ctx.json {
            output::json_pretty(&json!({
                "supervisor": output::supervisor_json(&info),
                "models": snapshot.models.iter().map(output::model_json).collect::<Vec<_>>(),
                "gpus": snapshot.gpus.iter().map(output::gpu_json).collect::<Vec<_>>(),
            }))?;
        } else {
            output::println(header(&info, ctx.out))?;
            output::println("")?;
            if snapshot.models.is_empty() {
                output::println("no models configured")?;
            } else {
                output::print(&status_table(&snapshot.models, ctx.out))?;
            }
            for gpu in &snapshot.gpus {
                output::println(output::gpu_line(gpu))?;
            }
        }
        return Ok(Code::Success);
    };

    let found = find_model(&snapshot.models, &wanted)?;
    let code = if output::model_state(found) == pb::ModelState::Failed {
        Code::Failed
    } else {
        Code::Success
    };
    if ctx.json {
        output::json_pretty(&output::model_json(found))?;
        return Ok(code);
    }
    output::println(header(&info, ctx.out))?;
    output::println("")?;
    output::print(&status_table(std::slice::from_ref(found), ctx.out))?;
    for line in details(found, ctx.out) {
        output::println(line)?;
    }
    if log_lines > 0 {
        let name = found.name.clone();
        logs::print_recent(&mut ctx, &name, log_lines).await?;
    }
    Ok(code)
}

pub async fn models(mut ctx: Ctx) -> anyhow::Result<Code> {
    let snapshot = ctx.client.status(pb::StatusRequest {}).await?.into_inner();
    if ctx.json {
        let models: Vec<_> = snapshot
            .models
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "aliases": m.aliases,
                    "kind": m.kind,
                    "state": gpuswap::state_name(output::model_state(m)),
                })
            })
            .collect();
        output::json_pretty(&models.into())?;
        return Ok(Code::Success);
    }
    // No header: one model per line, whitespace-separated, for `while read`.
    let width = |field: fn(&pb::ModelStatus) -> &str| {
        snapshot
            .models
            .iter()
            .map(|m| field(m).len())
            .max()
            .unwrap_or(0)
    };
    let (name_width, kind_width) = (width(|m| &m.name), width(|m| &m.kind));
    for model in &snapshot.models {
        let state = output::model_state(model);
        let state_name = gpuswap::state_name(state);
        let line = format!(
            "{:name_width$}  {:kind_width$}  {}{}  {}",
            model.name,
            model.kind,
            ctx.out.paint(output::state_color(state), state_name),
            " ".repeat(11usize.saturating_sub(state_name.len())),
            output::list_or_dash(&model.aliases),
        );
        output::println(line)?;
    }
    Ok(Code::Success)
}

/// A model by name or alias, or exit code 4 naming the known models.
pub fn find_model<'a>(
    models: &'a [pb::ModelStatus],
    wanted: &str,
) -> anyhow::Result<&'a pb::ModelStatus> {
    models
        .iter()
        .find(|m| m.name == wanted)
        .or_else(|| {
            models
                .iter()
                .find(|m| m.aliases.iter().any(|a| a == wanted))
        })
        .ok_or_else(|| {
            let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            Failure::new(
                Code::UnknownModel,
                format!("unknown model {wanted:?} (known: {})", known.join(", ")),
            )
            .into()
        })
}

/// "gpuswap-supervisor 0.1.0 (pid 42), up 2h 03m; queue: empty"
pub fn header(info: &pb::SupervisorInfo, style: Style) -> String {
    header_with_queue(info, style, true)
}

/// The header; `watch` leaves the queue out, as Watch events do not update it.
pub fn header_with_queue(info: &pb::SupervisorInfo, style: Style, show_queue: bool) -> String {
    let mut text = format!(
        "{} {} (pid {}), up {}",
        style.paint(output::BOLD, "gpuswap-supervisor"),
        if info.version.is_empty() {
            "?"
        } else {
            &info.version
        },
        info.pid,
        output::humanize_ms(info.uptime_ms),
    );
    if show_queue {
        text.push_str("; queue: ");
        if info.queue.is_empty() {
            text.push_str("empty");
        } else {
            text.push_str(&info.queue.join(", "));
        }
    }
    text
}

/// A column of the status table: whether it is shown, its header, whether it is
/// right-aligned, and its cell for a model.
type Column = (bool, &'static str, bool, fn(&pb::ModelStatus) -> Cell);

/// The status table. ALIASES and SERVED AS appear only when some model has them.
pub fn status_table(models: &[pb::ModelStatus], style: Style) -> String {
    let show_aliases = models.iter().any(|m| !m.aliases.is_empty());
    let show_served = models
        .iter()
        .any(|m| !m.served_name.is_empty() && m.served_name != m.name);
    // Memory-aware placement in use: what each model takes.
    let show_vram = models.iter().any(|m| m.vram_bytes.is_some() || m.pinned);
    let all: [Column; 12] = [
        (true, "MODEL", false, |m| Cell::plain(&m.name)),
        (show_aliases, "ALIASES", false, |m| {
            Cell::plain(output::list_or_dash(&m.aliases))
        }),
        (show_served, "SERVED AS", false, |m| {
            Cell::plain(if m.served_name.is_empty() {
                "-"
            } else {
                &m.served_name
            })
        }),
        (true, "STATE", false, |m| {
            let state = output::model_state(m);
            Cell::colored(gpuswap::state_name(state), output::state_color(state))
        }),
        (true, "PID", true, |m| {
            Cell::plain(while_running(m, || m.pid.to_string()))
        }),
        (true, "UPTIME", true, |m| {
            Cell::plain(while_running(m, || output::humanize_ms(m.uptime_ms)))
        }),
        (true, "GPUS", false, |m| {
            Cell::plain(if m.gpus.is_empty() {
                "all".to_owned()
            } else {
                output::list_or_dash(&m.gpus)
            })
        }),
        (show_vram, "VRAM", false, |m| {
            Cell::plain(output::vram_text(m))
        }),
        (true, "PORT", true, |m| Cell::plain(m.port.to_string())),
        (true, "HOLDERS", true, |m| {
            Cell::plain(m.holders.to_string())
        }),
        (true, "RESTARTS", true, |m| {
            Cell::plain(m.restarts.to_string())
        }),
        (true, "LAST ERROR", false, last_error_cell),
    ];
    let columns: Vec<Column> = all.into_iter().filter(|&(shown, ..)| shown).collect();
    let headers: Vec<_> = columns.iter().map(|&(_, h, right, _)| (h, right)).collect();
    let mut table = Table::new(&headers);
    for model in models {
        table.row(columns.iter().map(|(.., cell)| cell(model)).collect());
    }
    table.render(style)
}

/// What `text` says of a running model; a dash for one that is not.
fn while_running(model: &pb::ModelStatus, text: impl FnOnce() -> String) -> String {
    if model.pid != 0 { text() } else { "-".into() }
}

/// The LAST ERROR cell: the error (red), or why an unavailable model is so (missing weights).
fn last_error_cell(model: &pb::ModelStatus) -> Cell {
    let error = if !model.last_error.is_empty() {
        &model.last_error
    } else {
        &model.detail
    };
    Cell::colored(
        if error.is_empty() {
            "-".to_owned()
        } else {
            output::truncate(error, ERROR_WIDTH)
        },
        if model.last_error.is_empty() {
            ""
        } else {
            output::RED
        },
    )
}

/// The lines under the table of `status MODEL`: what did not fit in it.
fn details(model: &pb::ModelStatus, style: Style) -> Vec<String> {
    let mut lines = vec![String::new()];
    let mut field = |name: &str, value: String| {
        lines.push(format!(
            "{} {value}",
            style.paint(output::DIM, &format!("{:>11}", format!("{name}:")))
        ))
    };
    field("kind", model.kind.clone());
    field("address", format!("{}:{}", model.host, model.port));
    if !model.served_name.is_empty() && model.served_name != model.name {
        field("served as", model.served_name.clone());
    }
    if !model.aliases.is_empty() {
        field("aliases", model.aliases.join(", "));
    }
    if model.generation > 0 {
        field("generation", model.generation.to_string());
    }
    if model.last_startup_ms > 0 {
        field(
            "last start",
            format!("took {}", output::seconds(model.last_startup_ms)),
        );
    }
    if model.vram_bytes.is_some() || model.pinned {
        field("vram", output::vram_text(model));
    }
    if let Some(used) = model.last_used_ms {
        let ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |now| now.as_millis() as u64)
            .saturating_sub(used);
        field("last use", format!("{} ago", output::humanize_ms(ago)));
    }
    if let Some(ttl) = model.idle_ttl_ms {
        field(
            "idle ttl",
            if ttl == 0 {
                "never".to_owned()
            } else {
                output::humanize_ms(ttl)
            },
        );
    }
    if !model.last_error.is_empty() {
        field("last error", style.paint(output::RED, &model.last_error));
    }
    if !model.detail.is_empty() {
        field("detail", model.detail.clone());
    }
    lines
}

//! `watch`: follows model state changes, one line per change, or redraws the
//! status table in place (`--table`).

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    time::{Duration, Instant},
};

use gpuswap::pb::{self, watch_event::Event};
use serde_json::json;

use crate::{Ctx, exit::Code, output, status};

pub async fn watch(mut ctx: Ctx, table: bool) -> anyhow::Result<Code> {
    let mut stream = ctx.client.watch(pb::WatchRequest {}).await?.into_inner();
    // A redraw needs a terminal; elsewhere --table falls back to lines.
    let redraw_table = table && !ctx.json && std::io::stdout().is_terminal();
    let mut view = WatchView {
        ctx: &ctx,
        models: BTreeMap::new(),
        order: Vec::new(),
        supervisor: None,
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    // Uptimes move on between events; the table redraws every second.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = stream.message() => match message? {
                Some(pb::WatchEvent { event: Some(event) }) => {
                    if ctx.json {
                        output::json_line(&event_json(&event))?;
                    }
                    let lines = view.apply(event);
                    if redraw_table {
                        view.draw_table()?;
                    } else if !ctx.json {
                        for line in lines {
                            output::println(line)?;
                        }
                    }
                }
                Some(pb::WatchEvent { event: None }) => {}
                None => {
                    eprintln!("{}", ctx.err.paint(output::DIM, "the supervisor ended the watch"));
                    return Ok(Code::Success);
                }
            },
            _ = tick.tick(), if redraw_table => view.draw_table()?,
            _ = &mut interrupted => return Ok(Code::Success),
        }
    }
}

struct WatchView<'a> {
    ctx: &'a Ctx,
    /// Each model with the moment its status arrived (to age its uptime).
    models: BTreeMap<String, (pb::ModelStatus, Instant)>,
    /// Models in the supervisor's order; new ones at the end.
    order: Vec<String>,
    supervisor: Option<(pb::SupervisorInfo, Instant)>,
}

impl WatchView<'_> {
    /// Records an event and returns the lines that describe it.
    fn apply(&mut self, event: Event) -> Vec<String> {
        let now = Instant::now();
        let time = self.ctx.out.paint(output::DIM, &output::time_of_day());
        match event {
            Event::Snapshot(snapshot) => {
                let mut lines = Vec::new();
                if let Some(info) = &snapshot.supervisor {
                    lines.push(status::header_with_queue(info, self.ctx.out, false));
                }
                self.supervisor = snapshot.supervisor.map(|info| (info, now));
                self.models.clear();
                self.order.clear();
                let width = self.name_width(&snapshot.models);
                for model in snapshot.models {
                    lines.push(format!("{time} {}", self.describe(&model, None, width)));
                    self.order.push(model.name.clone());
                    self.models.insert(model.name.clone(), (model, now));
                }
                lines
            }
            Event::Changed(model) => {
                let width = self.name_width(std::slice::from_ref(&model));
                let before = self.models.get(&model.name).map(|(m, _)| m.clone());
                let line = format!("{time} {}", self.describe(&model, before.as_ref(), width));
                if before.is_none() {
                    self.order.push(model.name.clone());
                }
                self.models.insert(model.name.clone(), (model, now));
                vec![line]
            }
            Event::Removed(name) => {
                self.models.remove(&name);
                self.order.retain(|n| *n != name);
                vec![format!("{time} {name} removed by a reload")]
            }
            Event::Gpus(memory) => memory
                .gpus
                .iter()
                .map(|gpu| format!("{time} {}", output::gpu_line(gpu)))
                .collect(),
        }
    }

    fn name_width(&self, extra: &[pb::ModelStatus]) -> usize {
        self.models
            .keys()
            .map(String::len)
            .chain(extra.iter().map(|m| m.name.len()))
            .max()
            .unwrap_or(0)
    }

    /// "m1  ready     pid 4242, generation 3, holders 0 → 1".
    fn describe(
        &self,
        model: &pb::ModelStatus,
        before: Option<&pb::ModelStatus>,
        width: usize,
    ) -> String {
        let style = self.ctx.out;
        let state = output::model_state(model);
        let name = gpuswap::state_name(state);
        let mut facts = Vec::new();
        let changed = |old: u64, new: u64| before.is_none() || old != new;
        let old = |f: fn(&pb::ModelStatus) -> u64| before.map(f).unwrap_or_default();
        if let Some(previous) = before {
            let previous_state = output::model_state(previous);
            if previous_state != state {
                facts.push(format!("was {}", gpuswap::state_name(previous_state)));
            }
        }
        if model.pid != 0 && changed(old(|m| m.pid.into()), model.pid.into()) {
            facts.push(format!("pid {}", model.pid));
        }
        // A stopped model's generation is history; show it when it moves or runs.
        let generation_moved =
            before.is_some_and(|previous| previous.generation != model.generation);
        if model.generation != 0 && (generation_moved || (before.is_none() && model.pid != 0)) {
            facts.push(format!("generation {}", model.generation));
        }
        match before {
            Some(previous) if previous.holders != model.holders => {
                facts.push(format!("holders {} → {}", previous.holders, model.holders))
            }
            None if model.holders > 0 => facts.push(format!("holders {}", model.holders)),
            _ => {}
        }
        if let Some(previous) = before
            && previous.restarts != model.restarts
        {
            facts.push(format!("restarts {}", model.restarts));
        }
        if let Some(progress) = &model.progress {
            let said = gpuswap::progress_text(progress);
            if !said.is_empty() {
                facts.push(format!("loading: {said}"));
            }
        }
        if !model.last_error.is_empty()
            && before.is_none_or(|previous| previous.last_error != model.last_error)
        {
            facts.push(style.paint(
                output::RED,
                &format!("error: {}", output::truncate(&model.last_error, 80)),
            ));
        }
        format!(
            "{:width$}  {}{}{}",
            model.name,
            style.paint(output::state_color(state), name),
            " ".repeat(11usize.saturating_sub(name.len())),
            facts.join(", "),
        )
        .trim_end()
        .to_owned()
    }

    /// Clears the screen and prints the status table with uptimes aged to now.
    fn draw_table(&self) -> std::io::Result<()> {
        let now = Instant::now();
        let models: Vec<pb::ModelStatus> = self
            .order
            .iter()
            .filter_map(|name| self.models.get(name))
            .map(|(model, seen)| {
                let mut model = model.clone();
                if model.pid != 0 {
                    model.uptime_ms += now.duration_since(*seen).as_millis() as u64;
                }
                model
            })
            .collect();
        let mut screen = String::from("\x1b[H\x1b[2J");
        if let Some((info, seen)) = &self.supervisor {
            let mut info = info.clone();
            info.uptime_ms += now.duration_since(*seen).as_millis() as u64;
            screen.push_str(&status::header_with_queue(&info, self.ctx.out, false));
            screen.push_str("\n\n");
        }
        screen.push_str(&status::status_table(&models, self.ctx.out));
        output::print(&screen)
    }
}

fn event_json(event: &Event) -> serde_json::Value {
    match event {
        Event::Snapshot(snapshot) => json!({
            "event": "snapshot",
            "supervisor": snapshot.supervisor.as_ref().map(output::supervisor_json),
            "models": snapshot.models.iter().map(output::model_json).collect::<Vec<_>>(),
            "gpus": snapshot.gpus.iter().map(output::gpu_json).collect::<Vec<_>>(),
        }),
        Event::Changed(model) => json!({"event": "changed", "model": output::model_json(model)}),
        Event::Removed(name) => json!({"event": "removed", "model": name}),
        Event::Gpus(memory) => json!({
            "event": "gpus",
            "gpus": memory.gpus.iter().map(output::gpu_json).collect::<Vec<_>>(),
        }),
    }
}

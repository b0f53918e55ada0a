//! `logs`: a model's captured output, optionally followed.

use gpuswap::pb;

use crate::{
    Ctx,
    exit::Code,
    output::{self, Style},
};

/// Prefix colors: each model keeps one, so interleaved output stays readable.
const MODEL_COLORS: [&str; 5] = [output::CYAN, "34", output::MAGENTA, "36;1", "34;1"];

pub async fn logs(
    mut ctx: Ctx,
    model: Option<String>,
    tail: u32,
    follow: bool,
    timestamps: bool,
) -> anyhow::Result<Code> {
    let request = pb::LogsRequest {
        model: model.clone().unwrap_or_default(),
        tail,
        follow,
    };
    let mut stream = ctx.client.logs(request).await?.into_inner();
    let mut printer = LogPrinter {
        prefix_models: model.is_none(),
        timestamps,
        json: ctx.json,
        out: ctx.out,
        err: ctx.err,
        prefix_width: 0,
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            message = stream.message() => match message? {
                Some(line) => printer.print(&line)?,
                None => break,
            },
            // Following ends with Ctrl-C: that is the normal way out.
            _ = &mut interrupted, if follow => return Ok(Code::Success),
        }
    }
    if follow {
        eprintln!(
            "{}",
            ctx.err
                .paint(output::DIM, "the supervisor ended the log stream")
        );
    }
    Ok(Code::Success)
}

/// The last `tail` lines of one model, after a blank line (as `systemctl status` shows them).
pub async fn print_recent(ctx: &mut Ctx, model: &str, tail: u32) -> anyhow::Result<()> {
    let request = pb::LogsRequest {
        model: model.to_owned(),
        tail,
        follow: false,
    };
    let mut stream = ctx.client.logs(request).await?.into_inner();
    let mut printer = LogPrinter {
        prefix_models: false,
        timestamps: false,
        json: false,
        out: ctx.out,
        err: ctx.err,
        prefix_width: 0,
    };
    let mut first = true;
    while let Some(line) = stream.message().await? {
        if first {
            output::println("")?;
            first = false;
        }
        printer.print(&line)?;
    }
    Ok(())
}

struct LogPrinter {
    prefix_models: bool,
    timestamps: bool,
    json: bool,
    out: Style,
    err: Style,
    /// The widest model name seen so far: prefixes line up as output goes.
    prefix_width: usize,
}

impl LogPrinter {
    fn print(&mut self, line: &pb::LogLine) -> std::io::Result<()> {
        if self.json {
            return output::json_line(&output::log_json(line));
        }
        if line.dropped > 0 {
            eprintln!(
                "{}",
                self.err.paint(
                    output::YELLOW,
                    &format!(
                        "[{} lines of {} dropped: reading too slowly]",
                        line.dropped, line.model
                    )
                )
            );
        }
        let mut text = String::new();
        if self.timestamps {
            text.push_str(
                &self
                    .out
                    .paint(output::DIM, &output::timestamp_ms(line.time_ms)),
            );
            text.push(' ');
        }
        if self.prefix_models {
            self.prefix_width = self.prefix_width.max(line.model.chars().count());
            let padded = format!("{:width$} |", line.model, width = self.prefix_width);
            text.push_str(&self.out.paint(model_color(&line.model), &padded));
            text.push(' ');
        }
        let color = match pb::LogStream::try_from(line.stream) {
            Ok(pb::LogStream::Stderr) => output::LIGHT_RED,
            Ok(pb::LogStream::Supervisor) => output::DIM,
            _ => "",
        };
        text.push_str(&self.out.paint(color, &line.line));
        output::println(text)
    }
}

fn model_color(model: &str) -> &'static str {
    // FNV-1a: stable across runs, so a model keeps its color.
    let hash = model.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    MODEL_COLORS[(hash % MODEL_COLORS.len() as u64) as usize]
}

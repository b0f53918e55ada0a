//! `reload`: the supervisor re-reads its configuration file.

use gpuswap::pb;
use serde_json::json;

use crate::{Ctx, exit::Code, output};

pub async fn reload(mut ctx: Ctx) -> anyhow::Result<Code> {
    let response = ctx.client.reload(pb::ReloadRequest {}).await?.into_inner();
    if ctx.json {
        output::json_pretty(&json!({
            "added": response.added,
            "removed": response.removed,
            "changed": response.changed,
            "needs_restart": response.needs_restart,
        }))?;
        return Ok(Code::Success);
    }
    let groups = [
        ("added", &response.added, output::GREEN),
        ("removed", &response.removed, output::RED),
        ("changed", &response.changed, output::YELLOW),
    ];
    if groups.iter().all(|(_, names, _)| names.is_empty()) {
        output::println("configuration reloaded: no model changes")?;
    } else {
        output::println("configuration reloaded:")?;
        for (label, names, color) in groups {
            for name in names {
                output::println(format!(
                    "  {}  {name}",
                    ctx.out.paint(color, &format!("{label:<7}"))
                ))?;
            }
        }
    }
    for key in &response.needs_restart {
        output::println(format!(
            "  {}  {key}: takes effect after a restart of the supervisor",
            ctx.out.paint(output::YELLOW, "restart")
        ))?;
    }
    Ok(Code::Success)
}

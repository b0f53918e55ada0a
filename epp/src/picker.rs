//! The picker's decisions over the live fleet: a placement per request, the coalescing of
//! cold placements, and the union of the boxes' catalogs for `GET /v1/models`.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use serde_json::json;

use crate::{
    fleet::{BoxEntry, Fleet, InFlight},
    placement::{self, Candidate, Placement, Reason},
};

/// What the picker does with one request.
#[derive(Debug)]
pub enum Decision {
    /// Send it to `endpoints` (`ip:port`, the chosen box first); `in_flight` counts it
    /// against the chosen box until dropped.
    Route {
        endpoints: Vec<String>,
        box_name: String,
        reason: Reason,
        in_flight: InFlight,
    },
    /// Answer it here: HTTP status and an OpenAI-style error.
    Refuse {
        status: u16,
        code: &'static str,
        message: String,
    },
}

#[derive(Debug)]
pub struct Picker {
    pub fleet: Arc<Fleet>,
    pub max_in_flight: u32,
    pub fallbacks: usize,
}

impl Picker {
    /// Places a request for `model`; None (no model in the request) goes to the routable box
    /// with the fewest requests in flight (any gateway answers `/health`, `/metrics`, ...).
    /// `subset`: the proxy allows only these endpoints (an empty list allows none: 503).
    pub fn decide(&self, model: Option<&str>, subset: Option<&[String]>) -> Decision {
        // One lock over the whole decision, from reading the boxes' counts to counting this
        // request: concurrent decisions see each other's requests (so "fewest in flight"
        // spreads them rather than sending them all to the box that looked idle to each) and
        // the record of a cold placement (so requests for one cold model coalesce onto one
        // load). A decision takes microseconds; nothing in it waits.
        let mut pending = self.fleet.pending.lock().unwrap();
        let all = self.fleet.boxes();
        let boxes: Vec<Arc<BoxEntry>> = all
            .iter()
            .filter(|b| subset.is_none_or(|s| s.contains(&b.config.gateway)))
            .cloned()
            .collect();
        let Some(model) = model else {
            return self.any_box(&boxes);
        };
        let snapshots: Vec<_> = boxes
            .iter()
            .map(|b| (b.models(), b.usage(), b.others()))
            .collect();
        let candidates: Vec<Candidate<'_>> = boxes
            .iter()
            .zip(&snapshots)
            .map(|(entry, (models, usage, others))| Candidate {
                name: &entry.config.name,
                models,
                in_flight: entry.in_flight() + others.total,
                usage,
                others,
                routable: models.watching && entry.gateway_up(),
            })
            .collect();
        let now = Instant::now();
        pending.retain(|_, (_, at)| now.duration_since(*at) < placement::PENDING_FOR);
        let placement = placement::place(
            model,
            &candidates,
            &pending,
            now,
            self.max_in_flight,
            self.fallbacks,
        );
        match placement {
            Placement::Route {
                boxes: chosen,
                reason,
                model: name,
            } => {
                let primary = &boxes[chosen[0]];
                if reason.is_cold() {
                    pending.insert(name.clone(), (primary.config.name.clone(), now));
                }
                let in_flight = primary.begin_request(Some(&name));
                drop(pending);
                tracing::debug!(model = %name, r#box = %primary.config.name, reason = reason.as_str(), "placed");
                Decision::Route {
                    endpoints: chosen
                        .iter()
                        .map(|&i| boxes[i].config.gateway.clone())
                        .collect(),
                    box_name: primary.config.name.clone(),
                    reason,
                    in_flight,
                }
            }
            Placement::Shed => Decision::Refuse {
                status: 429,
                code: "overloaded",
                message: format!(
                    "every box that serves model {model:?} is at its limit of requests in flight"
                ),
            },
            Placement::Unavailable(message) => Decision::Refuse {
                status: 503,
                code: "no_box_available",
                message,
            },
            Placement::UnknownModel => Decision::Refuse {
                status: 404,
                code: "model_not_found",
                message: format!("The model `{model}` does not exist on any box"),
            },
        }
    }

    fn any_box(&self, boxes: &[Arc<BoxEntry>]) -> Decision {
        let best = boxes
            .iter()
            .filter(|b| b.routable())
            .min_by_key(|b| b.in_flight() + b.others().total);
        match best {
            Some(entry) => Decision::Route {
                endpoints: vec![entry.config.gateway.clone()],
                box_name: entry.config.name.clone(),
                reason: Reason::Ready,
                in_flight: entry.begin_request(None),
            },
            None => Decision::Refuse {
                status: 503,
                code: "no_box_available",
                message: "no box can take requests now".into(),
            },
        }
    }

    /// `GET /v1/models`: every model (and alias) of every watched box, once, with its state
    /// on each box.
    pub fn models_json(&self) -> serde_json::Value {
        let mut ids: BTreeMap<String, (Option<String>, Vec<serde_json::Value>)> = BTreeMap::new();
        for entry in self.fleet.boxes().iter() {
            let models = entry.models();
            if !models.watching {
                continue;
            }
            for model in models.models.values() {
                let on_box = json!({
                    "box": entry.config.name,
                    "state": gpuswap::state_name(model.state),
                });
                let names = std::iter::once((model.name.clone(), None)).chain(
                    model
                        .aliases
                        .iter()
                        .map(|a| (a.clone(), Some(model.name.clone()))),
                );
                for (id, alias_of) in names {
                    let slot = ids.entry(id).or_insert_with(|| (alias_of, Vec::new()));
                    slot.1.push(on_box.clone());
                }
            }
        }
        let data: Vec<serde_json::Value> = ids
            .into_iter()
            .map(|(id, (alias_of, boxes))| {
                let mut gpuswap = json!({ "boxes": boxes });
                if let Some(of) = alias_of {
                    gpuswap["alias_of"] = json!(of);
                }
                json!({
                    "id": id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "gpuswap",
                    "gpuswap": gpuswap,
                })
            })
            .collect();
        json!({ "object": "list", "data": data })
    }
}

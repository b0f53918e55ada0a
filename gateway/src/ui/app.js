// The gpuswap status page: plain JS, no build step. Everything comes from the gateway's
// JSON and SSE API; fetch() streams the SSE so that the API key can go in a header.
"use strict";

const state = { models: new Map(), progress: new Map(), swaps: [], gpus: [], admin: false, logModel: null, logAbort: null };

function key() { return localStorage.getItem("gpuswap-key") || ""; }
function headers() { const k = key(); return k ? { Authorization: "Bearer " + k } : {}; }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function duration(ms) {
  if (!ms) return "";
  const s = Math.round(ms / 1000);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function bytes(n) {
  const gib = n / 2 ** 30;
  if (gib >= 1 || n === 0) return (Number.isInteger(gib) ? gib : gib.toFixed(1)) + " GiB";
  return Math.round(n / 2 ** 20) + " MiB";
}

function message(text) {
  const m = document.getElementById("message");
  m.textContent = text || "";
  m.hidden = !text;
}

// Reads an SSE response: calls onEvent(name, data) for each event until it ends.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function renderModel(m) {
  const tbody = document.querySelector("#models tbody");
  let row = tbody.querySelector(`tr[data-model="${CSS.escape(m.id)}"]`);
  if (!row) {
    row = el("tr", { "data-model": m.id });
    const rows = [...tbody.children];
    const after = rows.find((r) => r.dataset.model > m.id);
    tbody.insertBefore(row, after || null);
  }
  const progress = state.progress.get(m.id);
  const stateCell = el("td", {}, el("span", { class: "state state-" + m.state }, m.state));
  if (m.state === "starting" || m.state === "stopping" || m.state === "draining") {
    const text = progress ? progress.text : "";
    stateCell.append(el("div", { class: "progress" }, text));
    if (m.state === "starting" && m.last_startup_ms && progress && progress.since) {
      const fraction = Math.min(0.99, (Date.now() - progress.since) / m.last_startup_ms);
      stateCell.append(el("div", { class: "bar" }, el("div", { style: `width:${Math.round(fraction * 100)}%` })));
    }
  }
  if (m.state === "failed" && m.last_error) stateCell.append(el("div", { class: "detail" }, m.last_error));
  if (m.state === "unavailable" && m.detail) stateCell.append(el("div", { class: "detail" }, m.detail));
  const running = m.state === "ready" || m.state === "starting" || m.state === "draining";
  // A sleeping model's process lives: load wakes it, unload stops it.
  const stoppable = running || m.state === "sleeping";
  const actions = el("td", {});
  if (state.admin) {
    const buttons = [
      el("button", { class: "load", onclick: () => act(m.id, "load"), ...(running ? { disabled: "" } : {}) }, "load"),
      el("button", { class: "unload", onclick: () => act(m.id, "unload"), ...(stoppable ? {} : { disabled: "" }) }, "unload"),
      // Only a ready model with a sleep protocol can be put to sleep; load wakes it.
      m.can_sleep ? el("button", { class: "sleep", onclick: () => act(m.id, "sleep"), ...(m.state === "ready" ? {} : { disabled: "" }) }, "sleep") : null,
      el("button", { class: "logs", onclick: () => followLog(m.id) }, "logs"),
    ];
    actions.append(...buttons.filter((b) => b != null));
  }
  row.replaceChildren(
    el("td", {}, el("strong", {}, m.id), m.aliases.length ? el("div", { class: "aliases" }, m.aliases.join(", ")) : null),
    stateCell,
    el("td", {}, m.kind),
    el("td", {}, m.gpus.length ? m.gpus.join(", ") : "all"),
    // vram is per GPU; a model without it reserves its GPUs whole.
    el("td", { class: "memory" }, m.vram_bytes != null ? bytes(m.vram_bytes) : "whole GPU",
      m.pinned ? el("span", { class: "pinned", title: "never stopped to make room for another model" }, "pinned") : null),
    el("td", {}, String(m.holders)),
    el("td", {}, String(m.in_flight)),
    el("td", {}, String(m.queued)),
    el("td", {}, m.tokens_per_second ? m.tokens_per_second.toFixed(1) : ""),
    el("td", {}, duration(m.uptime_ms)),
    actions,
  );
}

function renderSwaps() {
  const tbody = document.querySelector("#swaps tbody");
  tbody.replaceChildren(...state.swaps.map((s) => el("tr", {},
    el("td", {}, s.model),
    el("td", {}, s.outcome + (s.error && s.outcome === "failed" ? ": " + s.error : "")),
    el("td", {}, (s.total_ms / 1000).toFixed(1) + " s"),
    el("td", {}, Object.entries(s.phases_ms).map(([p, ms]) => `${p} ${(ms / 1000).toFixed(1)} s`).join(", ")),
    el("td", {}, new Date(s.finished_unix_ms).toLocaleTimeString()),
  )));
}

function renderGpus() {
  document.getElementById("gpu-section").hidden = state.gpus.length === 0;
  document.querySelector("#gpus tbody").replaceChildren(...state.gpus.map((g) => {
    const capacity = g.capacity_bytes;
    const taken = Math.max(g.reserved_bytes, g.used_bytes || 0);
    const bar = capacity ? el("div", { class: "bar" }, el("div", { style: `width:${Math.min(100, Math.round((100 * taken) / capacity))}%` })) : null;
    return el("tr", { "data-gpu": String(g.index) },
      el("td", {}, "GPU " + g.index),
      el("td", { class: "total" }, capacity != null ? bytes(capacity) : "unknown"),
      el("td", { class: "reserved" }, bytes(g.reserved_bytes)),
      el("td", { class: "used" }, g.used_bytes != null ? bytes(g.used_bytes) : "no NVML"),
      el("td", { class: "free" }, g.free_bytes != null ? bytes(g.free_bytes) : "", bar),
      el("td", { class: "models" }, g.models.join(", ")),
    );
  }));
}

function snapshot(status) {
  state.admin = status.admin;
  state.swaps = status.swaps;
  const sup = status.supervisor;
  document.getElementById("supervisor").textContent = sup.connected ? "" : "supervisor unreachable: " + (sup.error || "");
  document.querySelector("#models tbody").replaceChildren();
  state.models = new Map(status.models.map((m) => [m.id, m]));
  for (const m of status.models) renderModel(m);
  state.gpus = status.gpus;
  renderGpus();
  renderSwaps();
}

function onEvent(name, data) {
  if (name === "snapshot") snapshot(data);
  else if (name === "model") {
    const before = state.models.get(data.id);
    if (data.state === "starting" && (!before || before.state !== "starting")) {
      state.progress.set(data.id, { text: "starting", since: Date.now() });
    }
    if (data.state !== "starting") state.progress.delete(data.id);
    state.models.set(data.id, data);
    renderModel(data);
    if (before && before.state === "starting" && (data.state === "ready" || data.state === "failed")) refreshSwaps();
  } else if (name === "progress") {
    const p = state.progress.get(data.model) || { since: Date.now() };
    p.text = data.text;
    state.progress.set(data.model, p);
    const m = state.models.get(data.model);
    if (m) renderModel(m);
  } else if (name === "gpus") {
    state.gpus = data.gpus;
    renderGpus();
  } else if (name === "removed") {
    state.models.delete(data.model);
    const row = document.querySelector(`#models tr[data-model="${CSS.escape(data.model)}"]`);
    if (row) row.remove();
  }
}

async function refreshSwaps() {
  const response = await fetch("/api/status", { headers: headers() });
  if (response.ok) { state.swaps = (await response.json()).swaps; renderSwaps(); }
}

async function act(model, action) {
  message("");
  const response = await fetch(`/api/models/${encodeURIComponent(model)}/${action}`, { method: "POST", headers: headers() });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    message(`${action} ${model}: ${(body.error && body.error.message) || response.status}`);
  }
}

async function followLog(model) {
  if (state.logAbort) state.logAbort.abort();
  const abort = new AbortController();
  state.logAbort = abort;
  state.logModel = model;
  document.getElementById("log-model").textContent = model;
  const log = document.getElementById("log");
  log.textContent = "";
  try {
    const response = await fetch(`/api/models/${encodeURIComponent(model)}/logs?follow=true&tail=200`, { headers: headers(), signal: abort.signal });
    if (!response.ok) { log.textContent = `logs: ${response.status}`; return; }
    await readEvents(response, (_, line) => {
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(line.line + "\n");
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
  } catch (e) {
    if (e.name !== "AbortError") log.append(`[log stream ended: ${e}]\n`);
  }
}

// Follows /api/events for ever, reconnecting; asks for a key when the API wants one.
async function follow() {
  const badge = document.getElementById("connection");
  for (;;) {
    try {
      const response = await fetch("/api/events", { headers: headers() });
      if (response.status === 401) {
        badge.textContent = "key needed"; badge.className = "badge down";
        document.getElementById("key-form").hidden = false;
        await new Promise((resolve) => { state.keyEntered = resolve; });
        continue;
      }
      if (!response.ok) throw new Error("status " + response.status);
      badge.textContent = "live"; badge.className = "badge live";
      await readEvents(response, onEvent);
    } catch (e) {
      console.log("events:", e);
    }
    badge.textContent = "reconnecting"; badge.className = "badge down";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem("gpuswap-key", document.getElementById("key").value);
  document.getElementById("key-form").hidden = true;
  if (state.keyEntered) state.keyEntered();
});

// The progress bars move between events.
setInterval(() => { for (const m of state.models.values()) if (m.state === "starting") renderModel(m); }, 1000);

follow();

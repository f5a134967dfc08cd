// The playground: a multi-turn chat over stella's NDJSON API, with Stop, timings and
// inline errors. Model output is always set with textContent: it is text, never HTML.
import { chat, models, StellaError } from "/static/stella.js";

const $ = (id) => document.getElementById(id);
const KEY = "stella.apiKey";
const state = { history: [], controller: null };

function apiKey() {
  return localStorage.getItem(KEY) || "";
}

function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = !text;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-form").querySelector("label").textContent = message || "This server needs an API key.";
  $("api-key").focus();
}

function bubble(role, text) {
  const msg = document.createElement("div");
  msg.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  msg.append(who, body);
  $("conversation").append(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

function stats(msg, parts) {
  const line = document.createElement("div");
  line.className = "stats";
  for (const p of parts) {
    const span = document.createElement("span");
    span.textContent = p;
    line.append(span);
  }
  msg.append(line);
}

function showError(msg, err) {
  const box = document.createElement("div");
  box.className = "error";
  if (err instanceof StellaError && err.status === 401) {
    box.textContent = "Unauthorized: enter an API key below, then send again.";
    askForKey(err.message);
  } else if (err instanceof StellaError && err.status === 429) {
    const wait = err.retryAfter ?? "a few";
    box.textContent = `Rate limited: try again in ${wait} s.`;
  } else if (err instanceof StellaError) {
    box.textContent = `${err.code}: ${err.message}`;
  } else {
    box.textContent = String(err && err.message || err);
  }
  msg.append(box);
}

async function loadModels() {
  const select = $("model");
  try {
    const listing = await models({ apiKey: apiKey() });
    select.replaceChildren();
    for (const m of listing.models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.loaded ? m.name : `${m.name} (not loaded)`;
      option.selected = m.name === listing.default;
      select.append(option);
    }
    notice("");
  } catch (err) {
    if (err instanceof StellaError && err.status === 401) askForKey();
    else notice(`Could not list models: ${err.message}`);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("prompt").disabled = on;
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  state.history.push({ role: "user", content: text });
  messages.push(...state.history);
  bubble("user", text);
  const msg = bubble("assistant", "");
  msg.classList.add("streaming");
  const out = msg.querySelector(".text");
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  const t0 = performance.now();
  let ttft = null;
  let answer = "";
  try {
    for await (const event of chat({ model: $("model").value || undefined, messages },
                                   { signal: controller.signal, apiKey: apiKey() })) {
      if (event.type === "delta") {
        if (ttft === null) ttft = performance.now() - t0;
        answer += event.text;
        out.textContent = answer;
        msg.scrollIntoView({ block: "end" });
      } else if (event.type === "tool_call") {
        answer += `\n[tool call] ${event.name}(${JSON.stringify(event.arguments)})`;
        out.textContent = answer;
      } else if (event.type === "done") {
        const u = event.usage || {};
        const t = event.timings || {};
        stats(msg, [
          `TTFT ${Math.round(ttft ?? t.ttft_ms ?? 0)} ms`,
          `${t.tokens_per_s ?? "–"} tok/s`,
          `${u.prompt_tokens ?? 0} in / ${u.completion_tokens ?? 0} out`,
          event.finish_reason,
          ...(event.backend ? [`via ${event.backend}`] : []),
        ]);
      }
    }
    if (controller.signal.aborted) stats(msg, ["stopped"]);
    state.history.push({ role: "assistant", content: answer });
  } catch (err) {
    state.history.pop(); // the turn failed: let the user send it again
    showError(msg, err);
  } finally {
    msg.classList.remove("streaming");
    state.controller = null;
    busy(false);
    $("prompt").focus();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  state.history = [];
  $("conversation").replaceChildren();
});
$("key-button").addEventListener("click", () => askForKey("API key for this server:"));
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-form").hidden = true;
  loadModels();
});

loadModels();

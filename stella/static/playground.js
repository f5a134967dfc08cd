// The playground: a multi-turn chat over stella's NDJSON API, with Stop, timings, a
// reasoning model's thinking and inline errors. Model output is always set with textContent: it is text, never HTML.
import { apiKeyProblem, chat, models, StellaError } from "/static/stella.js";

const $ = (id) => document.getElementById(id);
const KEY = "stella.apiKey";
// `unloaded`: the model list shown marks some model not loaded.
const state = { history: [], controller: null, unloaded: false };
// Around a pasted key: whitespace, and zero-width characters .trim() keeps (U+200B-U+200D,
// U+2060). Neither is ever part of a key.
const PADDING = /^[\s\u200b-\u200d\u2060]+|[\s\u200b-\u200d\u2060]+$/g;

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

// A 401 for the saved key (or a key no request can carry) drops it, and the form says
// why: kept, it would fail every later call. Only the key sent: another may be saved since.
// Otherwise the form keeps its own words: the server's message ("missing API key: send
// 'Authorization: Bearer <key>' ...") is for a developer, not for the reader of this page.
function refused(err, sent) {
  const dropped = sent !== "" && apiKey() === sent;
  if (dropped) localStorage.removeItem(KEY);
  askForKey(dropped ? `The saved key was refused (${err.message}); enter another.` : "");
}

function refusal(err) {
  return err instanceof StellaError && (err.status === 401 || err.code === "invalid_api_key");
}

function bubble(role, text) {
  const msg = document.createElement("div");
  msg.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.dir = "auto"; // by its own first strong character: Arabic or Hebrew reads from the right
  body.textContent = text;
  msg.append(who, body);
  $("conversation").append(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

// Tokens per second, rounded as a reader takes it in, or null when the answer is too
// short for a rate to mean anything: a single token, or a few milliseconds of generation
// (the echo backend's instant answer makes tens of thousands a second).
function rate(usage, timings) {
  const tps = timings.tokens_per_s;
  const generating = (timings.total_ms ?? 0) - (timings.ttft_ms ?? 0);
  if (typeof tps !== "number" || (usage.completion_tokens ?? 0) < 2 || generating < 50) return null;
  return `${tps >= 100 ? Math.round(tps) : tps.toFixed(1)} tok/s`;
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

// The wait a server asked for, in words: "" when it named none, or one already over (a
// Retry-After date in the past).
function waitText(seconds) {
  if (seconds === null || seconds === undefined || !(seconds > 0)) return "";
  const s = Math.ceil(seconds);
  return s < 120 ? `Try again in ${s} s.` : `Try again in ${Math.ceil(s / 60)} min.`;
}

// A sentence of `text`, ended by a full stop unless it has its own.
function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

// `started`: the answer's stream had begun, so a network error broke it rather than
// never reaching the server (so did one after the answer's headers, which name its ID).
function showError(msg, err, key, started) {
  const box = document.createElement("div");
  box.className = "error";
  if (refusal(err)) {
    box.textContent = "Unauthorized: enter an API key below, then send again.";
    refused(err, key);
  } else if (err instanceof StellaError && err.code === "network_error") {
    // fetch's own words ("Failed to fetch", "network error") say little to a reader:
    // they follow the dash, for whoever needs them.
    const broke = started || err.requestId;
    const what = broke ? "Lost the connection to the server" : "Could not reach the server";
    box.textContent = `${what} — ${err.message}`;
    box.title = err.message;
  } else if (err instanceof StellaError) {
    // The server's message names the limit hit or the reason; the wait comes from a 429's
    // or 503's Retry-After, or an in-band error line's retry_after (an upstream's rate
    // limit, a server draining), whatever the HTTP status.
    const head = err.status === 429 ? `Rate limited: ${err.message}` : `${err.code}: ${err.message}`;
    const wait = waitText(err.retryAfter);
    box.textContent = wait ? `${sentence(head)} ${wait}` : head;
  } else {
    box.textContent = String(err && err.message || err);
  }
  msg.append(box);
}

// A reasoning model's thinking, shown as it streams in a "Thinking" block above the
// answer (a details element: a button to screen readers and the keyboard). It closes once
// the answer's text starts, unless the reader opened or closed it first; it stays in the
// chat, and never goes back to the model: the next turn sends the answer's text alone.
function thinkingBlock(msg) {
  const box = document.createElement("details");
  box.className = "thinking";
  box.open = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking";
  const body = document.createElement("div");
  body.className = "reasoning";
  body.dir = "auto";
  box.append(summary, body);
  // A click (Enter and Space on the summary are clicks too) is the reader's choice: kept.
  summary.addEventListener("click", () => { box.dataset.touched = "1"; });
  msg.querySelector(".text").before(box);
  return box;
}

// Close the thinking block once the answer begins, unless the reader chose otherwise.
function answerBegins(box) {
  if (box && box.open && !box.dataset.touched) box.open = false;
}

async function loadModels() {
  const select = $("model");
  const key = apiKey();
  try {
    const listing = await models({ apiKey: key });
    // A listing again (a key was saved) keeps the model chosen, if this key may use it.
    const names = listing.models.map((m) => m.name);
    // A model marked not loaded is loaded by its first call: the listing is asked again
    // after an answer, so the mark goes.
    state.unloaded = listing.models.some((m) => !m.loaded);
    const chosen = names.includes(select.value) ? select.value : listing.default;
    select.replaceChildren();
    for (const m of listing.models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.loaded ? m.name : `${m.name} (not loaded)`;
      option.selected = m.name === chosen;
      select.append(option);
    }
    // An empty picker says nothing of why: a key's allowed models can be none.
    notice(names.length ? "" : "This key may use no models: enter another API key.");
  } catch (err) {
    if (refusal(err)) refused(err, key);
    else notice(`Could not list models: ${err.message}`);
  }
}

function busy(on) {
  $("stop").disabled = !on;
  if (on) $("stop").focus(); // before Send is disabled, so the focus never drops to the page
  $("send").disabled = on;
  $("prompt").disabled = on;
}

// Follow the answer only while its end is in view: a reader who scrolled up to read is
// left there, and one who scrolls back down to the end is followed again. Judged when the
// view scrolls (at most once a frame), not per delta. The end counts as in view a line
// past the edge, and a scroll down that stops short of it changes nothing: text that
// arrived while a scroll to the end was under way (ours, or the reader's) looks so.
let pinned = true;
let lastTop = 0;
const main = document.querySelector("main");
main.addEventListener("scroll", () => {
  const last = $("conversation").lastElementChild;
  if (!last || last.getBoundingClientRect().bottom <= main.getBoundingClientRect().bottom + 24) {
    pinned = true;
  } else if (main.scrollTop < lastTop) pinned = false;
  lastTop = main.scrollTop;
});

// Scroll to the newest text at most once a frame: a layout per token grows with the
// answer and freezes the tab on long ones.
let scrollPending = false;
function follow(msg) {
  if (scrollPending || !pinned) return;
  scrollPending = true;
  requestAnimationFrame(() => {
    scrollPending = false;
    if (pinned) msg.scrollIntoView({ block: "end" }); // scroll events run before this
  });
}

// Take a turn's question out of its chat, and put its text back in the prompt (unless
// the chat is gone, or something new is typed there).
function giveBack(history, text) {
  history.pop();
  if (history === state.history && !$("prompt").value) $("prompt").value = text;
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  // This turn's conversation: "New chat" starts another one, which this answer stays out of.
  const history = state.history;
  history.push({ role: "user", content: text });
  messages.push(...history);
  bubble("user", text);
  const msg = bubble("assistant", "");
  pinned = true; // a new question is brought into view, and its answer followed
  msg.classList.add("streaming");
  // The conversation is a live region: busy while the answer streams, so a screen reader
  // reads it once, whole, not a word at a time.
  for (const el of [msg, $("conversation")]) el.setAttribute("aria-busy", "true");
  const out = msg.querySelector(".text");
  const controller = new AbortController();
  const key = apiKey();
  state.controller = controller;
  busy(true);
  const t0 = performance.now();
  let ttft = null;
  let answer = "";
  let thought = ""; // the reasoning shown: never sent back
  let thinking = null; // its block, made by the first piece
  let started = false; // a line of the answer came
  let done = false;
  try {
    for await (const event of chat({ model: $("model").value || undefined, messages },
                                   { signal: controller.signal, apiKey: key })) {
      started = true;
      if (event.type === "delta") {
        if (ttft === null) ttft = performance.now() - t0;
        // A line's reasoning came before its text (a line may hold both).
        if (event.reasoning) {
          thinking = thinking || thinkingBlock(msg);
          thought += event.reasoning;
          thinking.querySelector(".reasoning").append(event.reasoning);
          msg.classList.add("reasoning-now");
        }
        if (event.text) {
          msg.classList.remove("reasoning-now");
          answerBegins(thinking);
          answer += event.text;
          out.append(event.text); // a text node per delta: no re-render of what is there
        }
        follow(msg);
      } else if (event.type === "tool_call") {
        msg.classList.remove("reasoning-now");
        answerBegins(thinking);
        const call = `\n[tool call] ${event.name}(${JSON.stringify(event.arguments)})`;
        answer += call;
        out.append(call);
      } else if (event.type === "done") {
        done = true;
        const u = event.usage || {};
        const t = event.timings || {};
        const speed = rate(u, t);
        stats(msg, [
          `TTFT ${Math.round(ttft ?? t.ttft_ms ?? 0)} ms`,
          ...(speed ? [speed] : []),
          `${u.prompt_tokens ?? 0} in / ${u.completion_tokens ?? 0} out`,
          event.finish_reason,
          ...(event.backend ? [`via ${event.backend}`] : []),
        ]);
      }
    }
    if (done && state.unloaded) loadModels();
    if (answer.trim()) {
      if (controller.signal.aborted) stats(msg, ["stopped"]);
      history.push({ role: "assistant", content: answer });
    } else {
      // No answer (stopped before the first token, or a model that only thought): the
      // question is left out of the chat as well and goes back to the prompt, as a failed
      // turn's does. An empty assistant turn would go out with every later one, and
      // Anthropic's API refuses such a chat. Reasoning alone stays shown, and said so.
      giveBack(history, text);
      const what = thought.trim() ? "no answer after its thinking" : "nothing answered";
      const why = `${what}: your message is back in the prompt`;
      stats(msg, controller.signal.aborted ? ["stopped", why] : [why]);
    }
  } catch (err) {
    giveBack(history, text); // the turn failed: its text goes back to the prompt, to send again
    showError(msg, err, key, started);
    // The model is gone (a route removed through the API): the list shows what is left.
    if (err instanceof StellaError && err.code === "model_not_found") loadModels();
  } finally {
    msg.classList.remove("streaming", "reasoning-now");
    for (const el of [msg, $("conversation")]) el.setAttribute("aria-busy", "false");
    follow(msg); // its stats or error line, below the text
    if (state.controller === controller) state.controller = null;
    busy(false);
    // Stop had the focus and is disabled now (Chromium may have dropped it to the page),
    // or New chat, pressed while the prompt was disabled: back to the prompt. A focus
    // anywhere else stays: the key field a 401 asked for, or a system prompt being typed,
    // whose next keys would otherwise land in the message box.
    const focused = document.activeElement;
    if (!focused || [$("stop"), $("new-chat"), document.body].includes(focused)) {
      $("prompt").focus();
    }
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value; // as typed: leading indentation may be code
  if (!text.trim() || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  // Enter while an input method composes (Chinese, Japanese, Korean) commits the text.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("stop").addEventListener("keydown", (e) => {
  // Sending moves the focus to Stop: a held Enter's auto-repeat would land there and stop
  // the answer it just sent. Only a fresh press stops (Esc does anywhere).
  if (e.key === "Enter" && e.repeat) e.preventDefault();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.controller) state.controller.abort();
});
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort(); // the running answer belongs to the old chat
  state.history = [];
  $("conversation").replaceChildren();
  $("prompt").focus();
});
$("key-button").addEventListener("click", () => askForKey("API key for this server:"));
// Saved or not, the form closes and the focus goes to the prompt (a hidden field keeps
// it otherwise, and the keyboard is left on the page).
function closeKeyForm() {
  $("api-key").value = "";
  $("key-form").hidden = true;
  $("prompt").focus();
}
$("key-cancel").addEventListener("click", closeKeyForm);
$("key-form").addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  e.stopPropagation(); // closes the form, and stops no answer
  closeKeyForm();
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.replace(PADDING, "");
  const problem = apiKeyProblem(key);
  if (problem) return askForKey(`This key cannot be used: ${problem}. Enter it again.`);
  localStorage.setItem(KEY, key);
  closeKeyForm();
  loadModels();
});

loadModels();

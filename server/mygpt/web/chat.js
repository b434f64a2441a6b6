// The chat page: a key (localStorage only), models from /v1/models, streamed answers, stop, compare.
// Model text reaches the DOM only through renderMarkdown (escapes first) or textContent.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEY = "mygpt.apiKey";
const PREFS = "mygpt.prefs"; // models, compare, temperature, max tokens

const ui = {
  key: $("api-key"), modelA: $("model-a"), modelB: $("model-b"), compare: $("compare"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), newChat: $("new-chat"),
  status: $("status"), columns: $("columns"), form: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"),
};

let columns = []; // [{select, messages: [{role, content}], log}]
let running = null; // the AbortController of the answers in flight
let modelsLoaded = false;

const api = (path) => new URL(path, document.baseURI);

function headers() {
  const key = ui.key.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, kind = "info") {
  ui.status.textContent = text;
  ui.status.className = text ? kind : "";
}

// ------------------------------------------------------------------ errors

/** A readable message for a non-2xx answer in OpenAI's error shape (or anything else). */
async function apiError(res) {
  let message = "";
  let code = "";
  try {
    const body = await res.json();
    message = body?.error?.message || "";
    code = body?.error?.code || "";
  } catch {
    message = res.statusText;
  }
  const retry = res.headers.get("Retry-After");
  const lead = {
    401: "Not authorized (401): the server refused this API key. Enter a valid key above.",
    403: "Forbidden (403).",
    404: code === "model_not_found" ? "Model not found (404)." : "Not found (404).",
    429: `Rate limited (429)${retry ? `: retry in ${retry} s` : ""}.`,
    503: `The server is not ready (503)${retry ? `: retry in ${retry} s` : ""}.`,
  }[res.status] || `Error ${res.status}.`;
  const err = new Error(message ? `${lead} ${message}` : lead);
  err.status = res.status;
  return err;
}

function networkMessage(err) {
  return err instanceof TypeError ? `Cannot reach the server (${err.message}).` : String(err.message || err);
}

// ------------------------------------------------------------------ models

let listing = 0; // answers to an older key's listing are dropped

async function loadModels() {
  const mine = ++listing;
  let res;
  try {
    res = await fetch(api("v1/models"), { headers: headers() });
  } catch (err) {
    return mine === listing && noModels(networkMessage(err));
  }
  if (mine !== listing) return;
  if (res.status === 503) {
    setTimeout(loadModels, 2000);
    return noModels("The server is still loading its model; retrying...");
  }
  if (!res.ok) {
    const err = await apiError(res);
    if (res.status === 401 && !ui.key.value.trim()) {
      return noModels("This server needs an API key: enter yours above to list its models.");
    }
    return noModels(err.message);
  }
  const models = (await res.json()).data || [];
  if (mine !== listing) return;
  const prefs = loadPrefs();
  for (const [select, wanted] of [[ui.modelA, prefs.modelA], [ui.modelB, prefs.modelB]]) {
    const previous = select.value || wanted;
    select.replaceChildren(
      ...models.map((m) => {
        const label = m.parent ? `${m.id} (adapter on ${m.parent})` : m.id;
        return new Option(label, m.id);
      }),
    );
    if (models.some((m) => m.id === previous)) select.value = previous;
  }
  if (!prefs.modelB && models.length > 1 && ui.modelB.value === ui.modelA.value) {
    ui.modelB.value = models.find((m) => m.id !== ui.modelA.value).id;
  }
  modelsLoaded = models.length > 0;
  setStatus(modelsLoaded ? "" : "This key has no models.", modelsLoaded ? "info" : "error");
  syncButtons();
}

function noModels(message) {
  ui.modelA.replaceChildren();
  ui.modelB.replaceChildren();
  modelsLoaded = false;
  setStatus(message, "error");
  syncButtons();
}

// ------------------------------------------------------------------ conversation view

function buildColumns() {
  const selects = ui.compare.checked ? [ui.modelA, ui.modelB] : [ui.modelA];
  columns = selects.map((select) => {
    const el = document.createElement("section");
    el.className = "column";
    const log = document.createElement("div");
    log.className = "log";
    el.append(log);
    return { select, messages: [], log, el };
  });
  ui.columns.replaceChildren(...columns.map((c) => c.el));
  ui.columns.classList.toggle("compare", ui.compare.checked);
}

function addUserMessage(col, text) {
  const div = document.createElement("div");
  div.className = "msg user";
  div.textContent = text;
  col.log.append(div);
}

/** An answer box: its Markdown re-rendered at most once a frame while it streams. */
function addAnswer(col, model) {
  const box = document.createElement("div");
  box.className = "msg assistant streaming";
  const head = document.createElement("div");
  head.className = "model";
  head.textContent = model;
  // a reasoning model's thinking (delta.reasoning): plain text, open while it thinks, folded after
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking";
  const thought = document.createElement("div");
  thought.className = "thought";
  thinking.append(summary, thought);
  const content = document.createElement("div");
  content.className = "content";
  const stats = document.createElement("div");
  stats.className = "stats";
  box.append(head, thinking, content, stats);
  col.log.append(box);
  scrollDown();
  let text = "";
  let pending = false;
  const paint = () => {
    pending = false;
    content.innerHTML = renderMarkdown(text); // escaped first: see markdown.js
    scrollDown();
  };
  return {
    think(t) {
      thinking.hidden = false;
      if (!text) thinking.open = true;
      thought.textContent = t; // text, never HTML
      scrollDown();
    },
    update(t) {
      if (!text) thinking.open = false;
      text = t;
      if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
    },
    finish(statsText, error) {
      paint();
      box.classList.remove("streaming");
      stats.textContent = statsText;
      if (error) {
        const p = document.createElement("p");
        p.className = "error";
        p.setAttribute("role", "alert");
        p.textContent = error;
        content.append(p);
      }
    },
  };
}

function scrollDown() {
  const el = document.scrollingElement;
  if (el.scrollHeight - el.scrollTop - el.clientHeight < 200) el.scrollTop = el.scrollHeight;
}

// ------------------------------------------------------------------ streaming

/** Yields the `data:` payloads of a server-sent event stream. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      } // ":" comments (keep-alives) and other fields are ignored
    }
  }
  if (data.length) yield data.join("\n");
}

function requestOptions() {
  const opts = {};
  const t = parseFloat(ui.temperature.value);
  if (Number.isFinite(t)) opts.temperature = t;
  const n = parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(n) && n > 0) opts.max_tokens = n;
  return opts;
}

async function answer(col, prompt, signal) {
  const model = col.select.value;
  const question = { role: "user", content: prompt };
  addUserMessage(col, prompt);
  const view = addAnswer(col, model);
  const body = {
    model, messages: [...col.messages, question], stream: true,
    stream_options: { include_usage: true }, ...requestOptions(),
  };
  const t0 = performance.now();
  let first = null;
  let text = "";
  let reasoning = "";
  let chunks = 0;
  let usage = null;
  let finish = null;
  let error = null;
  let stopped = false;
  try {
    const res = await fetch(api("v1/chat/completions"), {
      method: "POST", headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify(body), signal,
    });
    if (!res.ok) throw await apiError(res);
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`The server failed mid-answer: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const thought = choice.delta?.reasoning ?? choice.delta?.reasoning_content; // (the same text)
        if (thought) {
          first ??= performance.now();
          reasoning += thought;
          chunks += 1;
          view.think(reasoning);
        }
        if (choice.delta?.content) {
          first ??= performance.now();
          text += choice.delta.content;
          chunks += 1;
          view.update(text);
        }
        finish = choice.finish_reason || finish;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else error = err.status ? err.message : networkMessage(err);
  }
  const end = performance.now();
  if (text) col.messages.push(question, { role: "assistant", content: text });
  view.finish(statsLine({ t0, first, end, usage, chunks, finish, stopped, error }), error);
}

function statsLine({ t0, first, end, usage, chunks, finish, stopped, error }) {
  if (error && first === null) return "";
  const parts = [];
  const tokens = usage ? usage.completion_tokens : chunks;
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`);
  } else {
    parts.push(`~${chunks} tokens`);
  }
  if (first !== null) {
    parts.push(`TTFT ${((first - t0) / 1000).toFixed(2)} s`);
    const secs = (end - first) / 1000;
    if (tokens > 1 && secs > 0) parts.push(`${((tokens - 1) / secs).toFixed(1)} tokens/s`);
  }
  if (stopped) parts.push("stopped");
  else if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

async function send() {
  const prompt = ui.prompt.value.trim();
  if (!prompt || running || !modelsLoaded) return;
  ui.prompt.value = "";
  running = new AbortController();
  syncButtons();
  try {
    await Promise.all(columns.map((col) => answer(col, prompt, running.signal)));
  } finally {
    running = null;
    syncButtons();
    ui.prompt.focus();
  }
}

// ------------------------------------------------------------------ controls

function syncButtons() {
  ui.send.disabled = Boolean(running) || !modelsLoaded;
  ui.stop.disabled = !running;
  ui.modelB.hidden = !ui.compare.checked;
  for (const el of [ui.modelA, ui.modelB, ui.compare]) el.disabled = Boolean(running) || !modelsLoaded;
}

function loadPrefs() {
  try {
    return JSON.parse(localStorage.getItem(PREFS)) || {};
  } catch {
    return {};
  }
}

function savePrefs() {
  localStorage.setItem(PREFS, JSON.stringify({
    modelA: ui.modelA.value, modelB: ui.modelB.value, compare: ui.compare.checked,
    temperature: ui.temperature.value, maxTokens: ui.maxTokens.value,
  }));
}

function init() {
  const prefs = loadPrefs();
  ui.key.value = localStorage.getItem(KEY) || "";
  ui.compare.checked = Boolean(prefs.compare);
  if (prefs.temperature) ui.temperature.value = prefs.temperature;
  if (prefs.maxTokens) ui.maxTokens.value = prefs.maxTokens;

  let keyTimer;
  ui.key.addEventListener("input", () => {
    const key = ui.key.value.trim();
    if (key) localStorage.setItem(KEY, key);
    else localStorage.removeItem(KEY);
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadModels, 300);
  });
  for (const el of [ui.modelA, ui.modelB, ui.temperature, ui.maxTokens]) el.addEventListener("change", savePrefs);
  ui.compare.addEventListener("change", () => {
    savePrefs();
    buildColumns(); // two models, two conversations: start afresh
    syncButtons();
  });
  ui.newChat.addEventListener("click", () => {
    running?.abort();
    buildColumns();
  });
  ui.stop.addEventListener("click", () => running?.abort());
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  buildColumns();
  syncButtons();
  loadModels();
}

init();

// The chat page: talks to this server's OpenAI API (/v1/chat/completions, streamed). The
// conversation lives in this page only (in memory); the API key, when the server wants one,
// in sessionStorage (this tab, until it closes). Model output is rendered by markdown.js with
// DOM nodes only: nothing here assigns HTML.
import { render, stableEnd } from "./markdown.js";

const KEY_STORE = "chatglm3-api-key";
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), newChat: $("new-chat"), system: $("system"), messages: $("messages"),
  error: $("error"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
  stop: $("stop"), regenerate: $("regenerate"), keyForm: $("key-form"), key: $("key"),
  keyNote: $("key-note"),
  controls: { temperature: $("temperature"), top_p: $("top_p"), max_tokens: $("max_tokens") },
};

const state = {
  settings: null,
  history: [],      // [{role: "user" | "assistant", content, node}]
  controller: null, // the AbortController of the answer being streamed
  chat: 0,          // counts New chats: an answer cut off by one leaves the new history alone
  key: sessionStorage.getItem(KEY_STORE),
};

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = !text;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.send.disabled = busy || (state.settings?.auth && !state.key);
  const last = state.history[state.history.length - 1];
  ui.regenerate.disabled = busy || !last;
  document.body.classList.toggle("busy", busy);
}

function askForKey(note) {
  ui.keyNote.textContent = note;
  ui.keyForm.hidden = false;
  ui.key.value = "";
  ui.key.focus();
  setBusy(false);
}

// The headers of a call to this server's API: JSON, and the key when there is one.
function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = "Bearer " + state.key;
  return headers;
}

// One message's element: a role label, the body, and (assistant) a line of statistics.
function bubble(role) {
  const node = document.createElement("article");
  node.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "You" : state.settings?.model || "assistant";
  const body = document.createElement("div");
  body.className = "body";
  node.append(label, body);
  ui.messages.appendChild(node);
  return node;
}

function scrollDown() {
  ui.messages.lastElementChild?.scrollIntoView({ block: "end" });
}

// Whether the reader is at the end of the conversation (then a growing answer keeps it there;
// someone who scrolled up to read is left where they are).
function atEnd() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
}

// A streaming answer's view: blocks that are complete are rendered once; only the last,
// still growing one is rebuilt on each update.
class AnswerView {
  constructor(node) {
    this.body = node.querySelector(".body");
    this.committed = 0;
    this.tail = [];
  }
  update(text, final = false) {
    for (const n of this.tail) n.remove();
    if (final) {  // the whole answer once more, so blocks split while streaming join up
      this.body.replaceChildren();
      render(text, this.body);
      this.tail = [];
      return;
    }
    const end = stableEnd(text, this.committed);
    if (end > this.committed) {
      render(text.slice(this.committed, end), this.body);
      this.committed = end;
    }
    const before = this.body.childNodes.length;
    render(text.slice(this.committed), this.body);
    this.tail = [...this.body.childNodes].slice(before);
  }
}

function readNumber(name) {
  const input = ui.controls[name];
  const { min, max } = state.settings[name];
  const value = Number(input.value);
  const integer = name === "max_tokens";
  if (input.value.trim() === "" || !Number.isFinite(value) || value < min || value > max ||
      (integer && !Number.isInteger(value))) {
    throw new Error(`${name}: expected ${integer ? "an integer " : ""}from ${min} to ${max}, ` +
                    `got ${input.value.trim() || "nothing"}`);
  }
  return value;
}

function requestBody() {
  const messages = [];
  const system = ui.system.value;
  if (system.trim()) messages.push({ role: "system", content: system });
  for (const m of state.history) messages.push({ role: m.role, content: m.content });
  return {
    model: state.settings.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: readNumber("temperature"), top_p: readNumber("top_p"),
    max_tokens: readNumber("max_tokens"),
  };
}

// The server's error in words, for this page's user.
function describe(status, error) {
  const message = error?.message || `the server answered HTTP ${status}`;
  if (status === 401) return `Wrong or missing API key (${message}).`;
  if (error?.code === "context_length_exceeded") {
    return `The conversation is too long for the model's context: ${message}. Shorten the ` +
           "message, or start a New chat.";
  }
  if (status === 429 || status === 503) return `The server is busy: ${message}. Try again shortly.`;
  if (status >= 500) return `The server failed: ${message}.`;
  return `The server refused the request: ${message}.`;
}

function statsLine(usage, timing, finish, stopped, failed) {
  const parts = [];
  if (usage) {
    const cached = usage.prompt_tokens_details?.cached_tokens;
    parts.push(`${usage.prompt_tokens} prompt tokens` + (cached ? ` (${cached} cached)` : ""),
               `${usage.completion_tokens} answer tokens`);
  }
  if (timing) {
    parts.push(`first token ${timing.time_to_first_token.toFixed(2)} s`,
               `${timing.tokens_per_second.toFixed(1)} tokens/s`);
  }
  if (failed) parts.push("failed");
  else if (stopped) parts.push("stopped");
  else if (finish === "length") parts.push("cut at max_tokens");
  return parts.join(" · ");
}

// Events of a server-sent event stream, as they arrive: each `data:` payload.
async function* sseData(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();  // stream mode: a character split across reads waits
  let buffer = "";
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
  while (true) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = [];
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (line.startsWith("data:")) events.push(line.slice(line[5] === " " ? 6 : 5));
    }
    if (events.length) yield events;  // a batch per read: one re-render per batch
  }
}

// Streams an answer to the history as it stands (its last message is the user's).
// `fresh`: the user's message was just sent, so a refusal gives it back to the prompt box.
async function answer(fresh) {
  showError("");
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e.message);
    if (fresh) undoSend();
    return;
  }
  const chat = state.chat;
  const node = bubble("assistant");
  node.classList.add("streaming");
  const view = new AnswerView(node);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  scrollDown();
  let text = "";
  let finish = null;
  let usage = null;
  let timing = null;
  let failure = null;
  let started = false;
  let complete = false;  // the stream's [DONE] came
  const clock = { start: performance.now(), first: 0, last: 0 };  // a stopped answer's timing
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      let error = null;
      try { error = (await response.json()).error; } catch { /* not JSON */ }
      failure = describe(response.status, error);
      if (response.status === 401) {
        state.key = null;
        sessionStorage.removeItem(KEY_STORE);
        askForKey(failure + " Enter the server's key:");
      }
    } else {
      started = true;
      read: for await (const events of sseData(response, controller.signal)) {
        for (const data of events) {
          if (data === "[DONE]") { complete = true; break read; }
          const chunk = JSON.parse(data);
          if (chunk.error) { failure = describe(500, chunk.error); break read; }
          const choice = chunk.choices?.[0];
          if (choice?.delta?.content) {
            text += choice.delta.content;
            clock.last = performance.now();
            clock.first ||= clock.last;
          }
          if (choice?.finish_reason) finish = choice.finish_reason;
          if (chunk.usage) usage = chunk.usage;
          if (chunk.timings) timing = chunk.timings[0];
        }
        const follow = atEnd();
        view.update(text);
        node.answerText = text;  // the answer as the model wrote it (Markdown source)
        if (follow) scrollDown();
      }
      if (!complete && !failure && !controller.signal.aborted) {
        failure = "The answer was cut off: the connection to the server closed before the " +
                  "end (the server may have stopped).";
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      failure = "Cannot reach the server (it may have stopped, or the network is down): " +
                e.message;
    }
  }
  const stopped = controller.signal.aborted;
  state.controller = null;
  node.classList.remove("streaming");
  if (chat !== state.chat) {  // New chat was pressed meanwhile: this answer is gone with it
    setBusy(false);
    return;
  }
  if (!started && !stopped) {  // refused: nothing was answered
    node.remove();
    if (fresh) undoSend();
  } else {
    view.update(text, true);
    node.answerText = text;
    // The history keeps the answer as far as it was shown: the next turn answers to it.
    state.history.push({ role: "assistant", content: text, node });
    const stats = document.createElement("div");
    stats.className = "stats";
    const line = document.createElement("span");
    line.textContent = statsLine(usage, timing, finish, stopped, !!failure) || "no statistics";
    stats.append(line, copyButton(() => node.answerText));
    node.appendChild(stats);
    // Stopped, the stream ended before its usage chunk: the page counts the tokens itself.
    if (stopped && !failure && text) countStopped(line, body, text, clock);
  }
  if (failure) showError(failure);
  setBusy(false);
  scrollDown();
}

// A button that copies text() (the answer's Markdown source) to the clipboard.
function copyButton(text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.title = "Copy the answer";
  button.addEventListener("click", () => {
    navigator.clipboard.writeText(text()).then(() => { button.textContent = "Copied"; },
                                               () => { button.textContent = "Copy failed"; });
  });
  return button;
}

async function tokenCount(body) {
  const response = await fetch("/tokenize", {
    method: "POST", headers: apiHeaders(), body: JSON.stringify(body) });
  if (!response.ok) throw new Error("tokenize: " + response.status);
  return (await response.json()).count;
}

// A stopped answer's statistics: the prompt's and the shown answer's token counts (this
// server's /tokenize), the time to its first text and its pace as the page saw them.
async function countStopped(line, body, text, clock) {
  try {
    const [prompt, answer] = await Promise.all([
      tokenCount({ messages: body.messages }),
      tokenCount({ prompt: text, add_special_tokens: false })]);
    const span = (clock.last - clock.first) / 1000;
    const timing = clock.first ? {
      time_to_first_token: (clock.first - clock.start) / 1000,
      tokens_per_second: answer > 1 && span > 0 ? (answer - 1) / span : 0 } : null;
    line.textContent = statsLine({ prompt_tokens: prompt, completion_tokens: answer }, timing,
                                 null, true, false);
  } catch { /* the plain "stopped" stays */ }
}

function undoSend() {
  const last = state.history.pop();
  last.node.remove();
  if (!ui.prompt.value) ui.prompt.value = last.content;
}

function send() {
  const text = ui.prompt.value;
  if (!text.trim() || state.controller) return;
  if (state.settings.auth && !state.key) { askForKey("This server needs an API key:"); return; }
  const node = bubble("user");
  node.querySelector(".body").textContent = text;  // the user's text as typed, not Markdown
  state.history.push({ role: "user", content: text, node });
  ui.prompt.value = "";
  answer(true);
}

function regenerate() {
  if (state.controller) return;
  const last = state.history[state.history.length - 1];
  if (!last) return;
  try {
    requestBody();  // a bad control value: said now, before the answer is taken away
  } catch (e) {
    showError(e.message);
    return;
  }
  if (last.role === "assistant") {
    state.history.pop();
    last.node.remove();
  }
  answer(false);
}

function newChat() {
  state.chat++;
  state.controller?.abort();
  state.history = [];
  ui.messages.replaceChildren();
  showError("");
  setBusy(false);
  ui.prompt.focus();
}

async function start() {
  try {
    const response = await fetch("/webchat/settings.json");
    state.settings = await response.json();
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
    return;
  }
  const s = state.settings;
  ui.model.textContent = s.model;
  document.title = s.model + " chat";
  for (const [name, input] of Object.entries(ui.controls)) {
    input.min = s[name].min;
    input.max = s[name].max;
    input.value = s[name].default;
    input.title = `${s[name].min} to ${s[name].max} (default ${s[name].default})`;
  }
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  ui.stop.addEventListener("click", () => state.controller?.abort());
  ui.regenerate.addEventListener("click", regenerate);
  ui.newChat.addEventListener("click", newChat);
  ui.keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = ui.key.value.trim();
    if (!key) return;
    state.key = key;
    sessionStorage.setItem(KEY_STORE, key);
    ui.keyForm.hidden = true;
    showError("");
    setBusy(false);
    ui.prompt.focus();
  });
  if (s.auth && !state.key) askForKey("This server needs an API key:");
  setBusy(false);
  document.body.dataset.ready = "1";  // for the tests: the page is wired up
}

start();

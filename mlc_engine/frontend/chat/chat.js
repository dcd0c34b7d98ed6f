// The chat page: a conversation kept in this page, sent to /v1/chat/completions and streamed
// back as server-sent events. Model answers go through renderMarkdown, which sets only text.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEY = "mlc-engine.api-key";
const SAMPLING = ["temperature", "top_p"];

const state = { history: [], models: [], controller: null };

class ServerError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response) {
  let message = response.statusText || "no details";
  try {
    message = (await response.json()).error?.message || message;
  } catch {
    // Not an OpenAI-style body (a proxy's page, say): the status text stays.
  }
  return new ServerError(response.status, message, response.headers.get("Retry-After"));
}

function describe(error) {
  const message = error.message.replace(/\.?$/, ".");
  switch (error.status) {
    case undefined:
      return `Could not reach the server: ${message}`;
    case 0:
      return `The answer failed: ${message}`;
    case 401:
      return `The server refused the API key (401): ${message}`;
    case 429: {
      const wait = error.retryAfter ? `in ${error.retryAfter} s` : "in a moment";
      return `The server is busy (429): ${message} Try again ${wait}.`;
    }
    case 503:
      return `The model is not available (503): ${message}`;
    default:
      return `The server answered ${error.status}: ${message}`;
  }
}

// Each event's data, parsed, until the stream ends; `[DONE]` is left out.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

function askForKey(reason) {
  $("key-reason").textContent = reason;
  $("key").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

function setServerState(text) {
  $("server-state").textContent = text;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (error) {
    setServerState(describe(error));
    return;
  }
  if (response.status === 401) {
    const tried = sessionStorage.getItem(KEY) !== null;
    askForKey(tried ? "The server refused this key." : "This server needs an API key.");
    return;
  }
  if (!response.ok) {
    setServerState(describe(await errorOf(response)));
    return;
  }
  state.models = (await response.json()).data;
  const select = $("model");
  select.replaceChildren(
    ...state.models.map((model) => {
      const option = document.createElement("option");
      option.value = option.textContent = model.id;
      return option;
    }),
  );
  setServerState("");
  applyDefaults();
}

function currentModel() {
  return state.models.find((model) => model.id === $("model").value);
}

// The model's sampling defaults in the settings, as /v1/models reports them.
function applyDefaults() {
  const model = currentModel() || {};
  const sampling = model.sampling || {};
  for (const name of SAMPLING) {
    $(name).value = sampling[name] ?? "";
    $(name).placeholder = "Model default";
  }
  $("max_tokens").value = "";
  $("max_tokens").placeholder = model.max_model_len
    ? `Up to the context (${model.max_model_len})`
    : "Model default";
}

function requestBody(history) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if ($("model").value) body.model = $("model").value;
  for (const name of SAMPLING) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  if ($("max_tokens").value !== "") body.max_tokens = parseInt($("max_tokens").value, 10);
  if ($("regex").value) body.structured_outputs = { regex: $("regex").value };
  return body;
}

function addMessage(role) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = { user: "You", assistant: "Assistant", error: "Error" }[role];
  const content = document.createElement("div");
  content.className = "content";
  const stats = document.createElement("div");
  stats.className = "stats";
  node.append(label, content, stats);
  if (role === "error") node.setAttribute("role", "alert");
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.append(node);
  if (atBottom) list.scrollTop = list.scrollHeight;
  return { node, content, stats };
}

function showError(error) {
  addMessage("error").content.textContent = describe(error);
}

// Time to first token, then the decode rate after it, and how the answer ended.
function statsText(progress) {
  const { start, first, tokens, ending } = progress;
  if (first === null) return ending || "waiting for the first token...";
  const parts = [`TTFT ${((first - start) / 1000).toFixed(2)} s`];
  const seconds = (performance.now() - first) / 1000;
  if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tok/s`);
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (ending) parts.push(ending);
  return parts.join(" · ");
}

const ENDINGS = { length: "cut at max tokens", stop: "", tool_calls: "tool call" };

// Reads a streamed answer into `progress`, calling `update` after each piece of text.
async function readAnswer(response, progress, update) {
  for await (const event of events(response)) {
    if (event.error) throw new ServerError(0, event.error.message);
    if (event.usage) progress.tokens = event.usage.completion_tokens;
    const choice = event.choices?.[0];
    if (choice?.delta?.content) {
      progress.first ??= performance.now();
      progress.text += choice.delta.content;
      progress.tokens += 1; // one event a step: a token (the usage chunk gives the exact count)
      update();
    }
    if (choice?.finish_reason) {
      progress.ending = ENDINGS[choice.finish_reason] ?? choice.finish_reason;
    }
  }
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  const turn = { role: "user", content: text };
  const history = state.history; // New chat during the answer starts another one
  const question = addMessage("user");
  question.content.textContent = text;
  const answer = addMessage("assistant");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const progress = { start: performance.now(), first: null, text: "", tokens: 0, ending: "" };
  let frame = 0;
  const render = () => {
    frame = 0;
    answer.content.replaceChildren(renderMarkdown(progress.text));
    answer.stats.textContent = statsText(progress);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  answer.stats.textContent = statsText(progress);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody([...history, turn])),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    await readAnswer(response, progress, () => (frame ||= requestAnimationFrame(render)));
    history.push(turn, { role: "assistant", content: progress.text });
  } catch (error) {
    const stopped = error.name === "AbortError";
    if (progress.text) {
      progress.ending = stopped ? "stopped" : "failed";
      history.push(turn, { role: "assistant", content: progress.text });
    } else {
      // Nothing came back: take the question back into the box, to send again.
      question.node.remove();
      answer.node.remove();
      $("prompt").value = text;
      if (error.status === 401) askForKey(describe(error));
    }
    if (!stopped) showError(error);
  } finally {
    cancelAnimationFrame(frame);
    if (answer.node.isConnected) render();
    answer.node.dataset.done = progress.ending || "stop";
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function newChat() {
  state.controller?.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("prompt").focus();
}

function start() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("model").addEventListener("change", applyDefaults);
  $("defaults").addEventListener("click", applyDefaults);
  $("toggle-settings").addEventListener("click", () => {
    const hidden = $("settings").classList.toggle("hidden");
    $("toggle-settings").setAttribute("aria-expanded", String(!hidden));
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key-dialog").close();
    loadModels();
  });
  loadModels();
  $("prompt").focus();
}

start();

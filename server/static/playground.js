// The playground: a chat with this server's /v1/chat/completions, streamed. Plain browser JS, no
// build step. The conversation lives in the page; the API key in sessionStorage (this tab only).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} turns sent with every request
let controller = null;  // aborts the stream in flight

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = "?";
    setStatus(await errorText(response));
    return;
  }
  const models = await response.json();
  $("model").textContent = models.data.map((m) => m.id).join(", ");
  setStatus("");
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("chat").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function numberOrNull(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? null : parse(raw);
}

function requestBody() {
  const system = $("system").value.trim();
  const body = {
    messages: system ? [{ role: "system", content: system }, ...history] : [...history],
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberOrNull("temperature", parseFloat),
    top_p: numberOrNull("top-p", parseFloat),
    max_tokens: numberOrNull("max-tokens", (v) => parseInt(v, 10)),
    seed: numberOrNull("seed", (v) => parseInt(v, 10)),
  };
  for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
  return body;
}

// Reads server-sent events from a fetch body: calls onEvent(parsed JSON) per `data:` line.
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
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function showSpeed(tokens, firstAt, now) {
  const seconds = (now - firstAt) / 1000;
  if (tokens > 1 && seconds > 0) $("speed").textContent = `${((tokens - 1) / seconds).toFixed(1)} tokens/s`;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  const question = bubble("user", text);
  const reply = bubble("assistant", "");
  setStatus("");
  setBusy(true);
  controller = new AbortController();
  let answer = "";
  let tokens = 0;
  let firstAt = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage && firstAt !== null) {  // exact count at the end
        showSpeed(chunk.usage.completion_tokens, firstAt, performance.now());
      }
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        tokens += 1;  // one streamed chunk per generated token (a few carry none)
        if (firstAt === null) firstAt = performance.now();
        showSpeed(tokens, firstAt, performance.now());
        answer += delta.content;
        reply.textContent = answer;
        reply.scrollIntoView({ block: "end" });
      }
    });
  } catch (error) {
    if (error.name !== "AbortError") setStatus(error.message);
  } finally {
    controller = null;
    if (answer) {
      history.push({ role: "assistant", content: answer });
    } else {  // nothing came back: take the turn back so it can be sent again
      reply.remove();
      question.remove();
      history.pop();
      $("prompt").value = text;
    }
    setBusy(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("trellis-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("trellis-api-key", $("api-key").value.trim());
    loadModel();
  });
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { history.length = 0; $("chat").replaceChildren(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  setBusy(false);
  loadModel();
});

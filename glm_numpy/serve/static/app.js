// The chat page: keeps the conversation, streams each reply from /v1/chat/completions
// (server-sent events through fetch), and with "look inside" shows every generated token with
// the model's five likeliest alternatives (top_logprobs). No library, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // {role, content} of the finished rounds, sent back every round
let controller = null; // AbortController of the reply being streamed
let modelId = "";

fetch("/v1/models")
  .then((r) => r.json())
  .then((body) => {
    modelId = body.data[0].id;
    $("model-name").textContent = modelId;
  })
  .catch(() => {});

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

function percent(logprob) {
  return `${(100 * Math.exp(logprob)).toFixed(1)}%`;
}

function showToken(entry, span) {
  document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
  if (span) span.classList.add("selected");
  const detail = $("token-detail");
  detail.replaceChildren();
  const title = document.createElement("p");
  title.className = "chosen";
  title.textContent = `chosen: ${JSON.stringify(entry.token)} · ${percent(entry.logprob)}`;
  detail.append(title);
  const table = document.createElement("table");
  table.className = "alternatives";
  for (const alt of entry.top_logprobs) {
    const row = document.createElement("tr");
    row.className = "alt" + (alt.token === entry.token ? " is-chosen" : "");
    const name = document.createElement("td");
    name.className = "alt-token";
    name.textContent = JSON.stringify(alt.token);
    const bar = document.createElement("td");
    bar.className = "alt-bar";
    const fill = document.createElement("span");
    fill.style.width = percent(alt.logprob);
    bar.append(fill);
    const p = document.createElement("td");
    p.className = "alt-prob";
    p.textContent = percent(alt.logprob);
    row.append(name, bar, p);
    table.append(row);
  }
  detail.append(table);
}

function tokenSpan(entry) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = entry.token;
  // the likelier the chosen token, the paler its background
  span.style.setProperty("--doubt", (1 - Math.exp(entry.logprob)).toFixed(2));
  span.addEventListener("mouseenter", () => showToken(entry, span));
  span.addEventListener("click", () => showToken(entry, span));
  return span;
}

async function* serverSentEvents(response) {
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
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function requestBody(messages) {
  const number = (id) => Number($(id).value);
  return {
    model: modelId,
    messages,
    stream: true,
    temperature: number("temperature"),
    top_p: number("top-p"),
    max_tokens: Math.max(1, Math.round(number("max-tokens"))),
    logprobs: $("look-inside").checked,
    top_logprobs: $("look-inside").checked ? 5 : undefined,
    stream_options: { include_usage: true },
  };
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

async function send(query) {
  const system = $("system").value.trim();
  const messages = [
    ...(system ? [{ role: "system", content: system }] : []),
    ...history,
    { role: "user", content: query },
  ];
  addMessage("user", query);
  const reply = addMessage("assistant", "");
  reply.parentElement.classList.add("streaming");
  const lookInside = $("look-inside").checked;
  let text = "";
  let finish = null;
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "thinking…";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody(messages)),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        const u = chunk.usage;
        const cached = u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : 0;
        $("status").textContent =
          `${u.prompt_tokens} prompt tokens (${cached} from the cache) · ` +
          `${u.completion_tokens} generated · finish: ${finish}`;
      }
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      const piece = choice.delta.content || "";
      text += piece;
      if (lookInside && choice.logprobs) {
        for (const entry of choice.logprobs.content) {
          reply.append(tokenSpan(entry));
          showToken(entry, null);
        }
      } else if (piece) {
        reply.append(piece);
      }
      if (piece) $("status").textContent = "streaming…";
      reply.parentElement.scrollIntoView({ block: "end" });
    }
    history.push({ role: "user", content: query }, { role: "assistant", content: text });
  } catch (err) {
    if (err.name === "AbortError") {
      $("status").textContent = "stopped";
      // a stopped reply stays on the page but not in the conversation sent back
      reply.parentElement.classList.add("stopped");
    } else {
      $("status").textContent = `error: ${err.message}`;
      reply.parentElement.classList.add("failed");
    }
  } finally {
    reply.parentElement.classList.remove("streaming");
    reply.parentElement.classList.add("done");
    controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("prompt").value.trim();
  if (!query || controller) return;
  $("prompt").value = "";
  send(query);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller && controller.abort());

$("look-inside").addEventListener("change", () => {
  $("inspector").hidden = !$("look-inside").checked;
});

$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("token-detail").replaceChildren();
  $("status").textContent = "";
});

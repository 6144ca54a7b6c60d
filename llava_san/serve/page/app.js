// The web page's logic: keeps the conversation (OpenAI messages) in the page, sends it to
// /v1/chat/completions with the image as a data URL in the first user message, and shows the
// answer as it streams in. Each answer element has data-testid="answer" and data-done="true" once
// complete (what the browser test waits for).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, image: null, messages: [], busy: false };

function showError(text) { $("error").textContent = text || ""; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "model";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  if (role === "assistant") { div.dataset.testid = "answer"; div.dataset.done = "false"; }
  $("conversation").append(div);
  $("conversation").scrollTop = $("conversation").scrollHeight;
  return div;
}

function reset() {
  state.messages = [];
  $("conversation").replaceChildren();
  showError("");
}

async function loadModel() {
  try {
    const res = await fetch("v1/models");
    const data = await res.json();
    state.model = data.data[0].id;
    $("model").textContent = "model: " + state.model;
  } catch (err) {
    showError("cannot reach the server: " + err);
  }
}

$("image-input").addEventListener("change", () => {
  const file = $("image-input").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // data:image/...;base64,...
    $("preview").src = state.image;
    $("preview").hidden = false;
    if (state.messages.length) reset();  // LLaVA-1.5: one image per conversation
  };
  reader.onerror = () => showError("cannot read " + file.name);
  reader.readAsDataURL(file);
});

$("reset").addEventListener("click", () => {
  reset();
  state.image = null;
  $("image-input").value = "";
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
});

$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask").requestSubmit(); }
});

// The SSE stream of /v1/chat/completions: calls onData with each parsed `data:` JSON object.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
    if (done) return;
  }
}

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (state.busy || !question) return;
  showError("");
  let content = question;
  if (state.messages.length === 0 && state.image) {
    content = [{ type: "text", text: question }, { type: "image_url", image_url: { url: state.image } }];
  }
  const turn = { role: "user", content };
  const maxTokens = parseInt($("max-tokens").value, 10);
  const body = { messages: [...state.messages, turn], stream: true };
  if (state.model) body.model = state.model;
  if (maxTokens > 0) body.max_tokens = maxTokens;

  state.busy = true;
  $("send").disabled = true;
  const userDiv = addMessage("user", question);
  const answerDiv = addMessage("assistant", "");
  const text = answerDiv.querySelector(".text");
  try {
    const res = await fetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!res.ok) {
      let message = res.status + " " + res.statusText;
      try { message = (await res.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    await readEvents(res, (data) => {
      if (data.error) throw new Error(data.error.message);
      const delta = data.choices && data.choices[0] && data.choices[0].delta;
      if (delta && delta.content) text.textContent += delta.content;
    });
    state.messages.push(turn, { role: "assistant", content: text.textContent });
    answerDiv.dataset.done = "true";
    $("question").value = "";
  } catch (err) {
    // the turn was not answered: it is not part of the conversation
    userDiv.remove();
    answerDiv.remove();
    showError(String(err.message || err));
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
});

loadModel();

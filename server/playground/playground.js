// rnnserve playground: plain JS over the server's /api endpoints (server/http.py). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let current = null; // the model picked: an entry of /api/models
let session = null; // this page's session on the server: {session_id, ...}
let generating = null; // AbortController of the generation in flight
let fed = []; // classifier: the words the session has read, in order
let feeding = Promise.resolve(); // classifier: words are fed one after another

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = data.error || {};
    throw new Error(`${err.code || response.status}: ${err.message || response.statusText}`);
  }
  return data;
}

async function closeSession() {
  const old = session;
  session = null;
  if (old) {
    try {
      await api("DELETE", "/api/sessions/" + encodeURIComponent(old.session_id));
    } catch (e) {
      // expired or gone already: nothing to close
    }
  }
}

async function openSession() {
  await closeSession();
  session = await api("POST", "/api/sessions", { model: current.name, version: current.version });
  return session;
}

// -- models ------------------------------------------------------------------------------------------

// A dialogue model is a language model over its conversation's token stream: the same panel.
const isLM = (m) => m.task === "lm" || m.task === "dialogue";

function describe(m) {
  if (isLM(m)) return `${m.task === "lm" ? "language" : "dialogue"} model (${m.cell}, vocabulary ${m.vocab_size})`;
  const how = m.streams ? "streaming: word by word in a session" : "whole text: re-read at each word";
  return `classifier, ${m.labels.join(" / ")} (${how})`;
}

async function loadModels() {
  try {
    const data = await api("GET", "/api/models");
    models = data.models.filter((m) => m.latest);
  } catch (e) {
    showError("Could not list models: " + e.message);
    return;
  }
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = `${m.name} (${isLM(m) ? "language model" : "classifier"})`;
    select.appendChild(option);
  }
  if (models.length) await pick(models[0].name);
  else showError("This server holds no models.");
}

async function pick(name) {
  stopGenerating();
  showError("");
  current = models.find((m) => m.name === name) || null;
  fed = [];
  const closing = feeding.then(() => closeSession()); // the last model's session: done with
  feeding = closing;
  if (!current) return;
  $("model").value = name;
  $("model-info").textContent = describe(current);
  $("lm-panel").hidden = !isLM(current);
  $("clf-panel").hidden = isLM(current);
  $("continue").disabled = true;
  if (!isLM(current)) resetReview();
  await closing;
}

// -- language models: generate, tokens streamed as server-sent events ---------------------------------

function numberOf(id, fallback) {
  const value = $(id).value.trim();
  return value === "" ? fallback : Number(value);
}

function stopGenerating() {
  if (generating) generating.abort();
  generating = null;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("continue").disabled = busy || !session;
  $("stop").disabled = !busy;
  $("model").disabled = busy;
}

async function generate(fresh) {
  showError("");
  const status = $("lm-status");
  const prompt = $("prompt").value;
  try {
    if (fresh || !session) {
      await openSession();
      $("output-prompt").textContent = prompt;
      $("output-text").textContent = "";
    }
  } catch (e) {
    showError(e.message);
    return;
  }
  const body = {
    session_id: session.session_id,
    prompt: fresh ? prompt : "",
    max_tokens: numberOf("max-tokens", 80),
    temperature: numberOf("temperature", 0.8),
    top_k: numberOf("top-k", 0),
    top_p: numberOf("top-p", 1),
  };
  const seed = numberOf("seed", null);
  if (seed !== null) body.seed = seed;
  generating = new AbortController();
  setBusy(true);
  status.textContent = "Generating…";
  let tokens = 0;
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(body),
      signal: generating.signal,
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      const err = data.error || {};
      throw new Error(`${err.code || response.status}: ${err.message || response.statusText}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const raw = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        let data = "";
        for (const line of raw.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        const payload = data ? JSON.parse(data) : {};
        if (event === "tokens") {
          $("output-text").textContent += payload.text;
          tokens += payload.token_ids.length;
          status.textContent = `Generating… ${tokens} token(s), position ${payload.position}`;
        } else if (event === "done") {
          status.textContent = `Done: ${tokens} token(s), ended by ${payload.finish_reason || "—"}; ` +
            `the session is at position ${payload.position}.`;
        } else if (event === "error") {
          throw new Error(`${payload.code}: ${payload.message}`);
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") status.textContent = `Stopped after ${tokens} token(s).`;
    else {
      status.textContent = "";
      showError(e.message);
    }
  } finally {
    generating = null;
    setBusy(false);
  }
}

// -- classifiers: the review read word by word, a bar per class ---------------------------------------

function drawBars(labels, probs) {
  const bars = $("bars");
  if (bars.children.length !== labels.length) {
    bars.innerHTML = "";
    labels.forEach((label, i) => {
      const row = document.createElement("div");
      row.className = "bar";
      row.innerHTML =
        '<span class="label"></span><div class="track" role="progressbar" aria-valuemin="0" ' +
        'aria-valuemax="100"><div class="fill"></div></div><span class="value"></span>';
      row.querySelector(".label").textContent = label;
      row.querySelector(".track").setAttribute("aria-label", label);
      row.dataset.label = label;
      row.dataset.index = String(i);
      bars.appendChild(row);
    });
  }
  const best = probs.length ? probs.indexOf(Math.max(...probs)) : -1;
  Array.from(bars.children).forEach((row, i) => {
    const p = probs.length ? probs[i] : 0;
    row.dataset.prob = String(p);
    row.classList.toggle("best", i === best);
    row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
    row.querySelector(".track").setAttribute("aria-valuenow", (100 * p).toFixed(1));
    row.querySelector(".value").textContent = probs.length ? (100 * p).toFixed(1) + "%" : "—";
  });
}

function resetReview() {
  fed = [];
  feeding = feeding.then(() => closeSession());
  $("review").value = "";
  $("clf-status").textContent = "Type a review: the bars move after each word.";
  drawBars(current ? current.labels : [], []);
}

// The words complete so far: those a space or newline has ended.
function completeWords(text) {
  const words = text.split(/\s+/);
  if (!/\s$/.test(text)) words.pop(); // the last word is still being typed
  return words.filter((w) => w.length);
}

async function feedWord(word, index, prefix) {
  if (current.streams) {
    if (!session) await openSession();
    // The session holds the review so far: each word goes in with the space before it.
    const result = await api("POST", "/api/feed", {
      session_id: session.session_id,
      text: index === 0 ? word : " " + word,
    });
    return { probs: result.probs, label: result.label, position: result.position };
  }
  // A whole-text classifier: the review so far, read again.
  const result = await api("POST", "/api/classify", {
    model: current.name,
    version: current.version,
    text: prefix,
  });
  return { probs: result.probs, label: result.label, position: index + 1 };
}

function reviewChanged() {
  const words = completeWords($("review").value);
  const keeps = fed.length <= words.length && fed.every((w, i) => w === words[i]);
  if (!keeps) {
    // Edited before the end: start over in a fresh session.
    fed = [];
    feeding = feeding.then(() => closeSession());
  }
  const model = current;
  for (let i = fed.length; i < words.length; i++) {
    const word = words[i];
    fed.push(word);
    const index = i;
    const prefix = words.slice(0, i + 1).join(" ");
    feeding = feeding.then(async () => {
      if (current !== model || fed[index] !== word) return; // superseded meanwhile
      try {
        const r = await feedWord(word, index, prefix);
        if (current !== model) return;
        drawBars(model.labels, r.probs);
        $("clf-status").textContent =
          `${index + 1} word(s) read (position ${r.position}): ${r.label}`;
        showError("");
      } catch (e) {
        showError(e.message);
      }
    });
  }
}

// -- wiring ------------------------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", (e) => pick(e.target.value));
  $("generate").addEventListener("click", () => generate(true));
  $("continue").addEventListener("click", () => generate(false));
  $("stop").addEventListener("click", stopGenerating);
  $("review").addEventListener("input", reviewChanged);
  $("reset-review").addEventListener("click", resetReview);
  window.addEventListener("pagehide", () => {
    if (session) {
      fetch("/api/sessions/" + encodeURIComponent(session.session_id), {
        method: "DELETE",
        headers: headers(false),
        keepalive: true,
      });
    }
  });
  loadModels();
});

// The demo page: pick a model, drop an image, see the top classes, the latency and the attention overlay.
// Plain ES2020, no build step. Every URL is relative, so the page also works behind a path prefix.
"use strict";

const TOP_K = 5;
const KEY_STORAGE = "vit-serve.api-key";

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code; // the server's machine-readable code, when it sent one
  }
}

// --- API key: asked for on the first 401, kept for this tab's session, sent on every call ---

let keyRequest = null; // one pending question, whichever calls got the 401

function askForKey(message) {
  if (keyRequest === null) {
    keyRequest = new Promise((resolve) => {
      const form = $("key-form");
      const input = $("api-key");
      $("key-message").textContent = message;
      form.hidden = false;
      input.value = "";
      input.focus();
      form.addEventListener(
        "submit",
        (event) => {
          event.preventDefault();
          sessionStorage.setItem(KEY_STORAGE, input.value.trim());
          form.hidden = true;
          keyRequest = null;
          resolve();
        },
        { once: true },
      );
    });
  }
  return keyRequest;
}

async function apiError(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return new ApiError(response.status, body.error, body.code);
  } catch (_) {
    // not JSON (a proxy's error page, say): the status line says enough
  }
  return new ApiError(response.status, `${response.status} ${response.statusText}`.trim());
}

// fetch `path` with the key; on 401 ask for a key and try again. Resolves to the JSON body, the response and the
// round trip in milliseconds (to the whole body read); rejects with an ApiError carrying the server's message.
async function call(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers);
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const started = performance.now();
    const response = await fetch(path, { ...init, headers });
    if (response.status === 401) {
      await askForKey((await apiError(response)).message);
      continue;
    }
    if (!response.ok) throw await apiError(response);
    const body = await response.json();
    return { body, response, roundTripMs: performance.now() - started };
  }
}

// --- models ---

async function loadModels() {
  const select = $("model");
  try {
    const { body } = await call("v1/models");
    select.replaceChildren(
      ...body.models.map((model) => {
        const option = new Option(model.ready ? model.name : `${model.name} (not ready)`, model.name);
        option.dataset.numClasses = String(model.num_classes);
        option.dataset.weights = model.weights;
        option.selected = model.name === body.default;
        return option;
      }),
    );
    select.disabled = false;
    showNotice();
  } catch (error) {
    showError(error);
  }
}

// A model serving random weights (a smoke test: VIT_WEIGHTS=random) answers with meaningless classes: say so.
function showNotice() {
  const option = $("model").selectedOptions[0];
  const notice = $("notice");
  notice.hidden = option?.dataset.weights !== "random";
  notice.textContent = notice.hidden
    ? ""
    : `${option.value} serves random weights: its classes and scores are meaningless. ` +
      "Start the server with the model's trained weights for real predictions.";
}

// --- one image: classify and explain in parallel; the explanation never holds up or breaks the bars ---

let modelsLoaded = Promise.resolve();
let generation = 0; // results of an older image (or model) that arrive late are dropped
let currentFile = null;
let previewUrl = null;

function post(file) {
  return { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } };
}

async function run(file) {
  currentFile = file;
  const mine = ++generation;
  await modelsLoaded; // the model picker decides where the image goes
  if (mine !== generation) return;
  const select = $("model");
  if (select.disabled) {
    showError(new Error("the list of models did not load; reload the page"));
    return;
  }
  const model = encodeURIComponent(select.value);
  const topK = Math.min(TOP_K, Number(select.selectedOptions[0]?.dataset.numClasses) || TOP_K);

  // The results stay hidden until the image is classified: a file the server refuses shows one message, and no
  // preview, empty heading or explanation beside it.
  $("results").hidden = true;
  $("bars").replaceChildren();
  $("latency").textContent = "";
  $("overlay").hidden = true;
  $("overlay").removeAttribute("src");
  $("overlay-message").textContent = "Looking at where the model attends…";
  showError(null);
  $("status").textContent = `Classifying ${file.name}…`;

  const current = () => mine === generation;
  call(`v1/models/${model}/classify?top_k=${topK}&logits=false`, post(file))
    .then((result) => current() && showClassification(result, file))
    .catch((error) => current() && showError(error, file))
    .finally(() => current() && ($("status").textContent = ""));
  call(`v1/models/${model}/explain?top_k=${topK}&overlay=true`, post(file))
    .then((result) => current() && showOverlay(result.body))
    .catch((error) => current() && showNoOverlay(error.message));
}

function showClassification({ body, response, roundTripMs }, file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview-figure").hidden = false;
  $("preview").src = previewUrl;
  $("results").hidden = false;
  const top = body.predictions[0].top_k;
  $("bars").replaceChildren(...top.map(bar));
  const server = serverTimeMs(response.headers.get("Server-Timing"));
  const parts = [`round trip ${roundTripMs.toFixed(0)} ms`];
  if (server !== null) parts.push(`server ${server.toFixed(1)} ms`);
  $("latency").textContent = `${body.model}: ${parts.join(" · ")}`;
}

function bar({ label, score }) {
  const percent = score * 100;
  const item = document.createElement("li");
  item.className = "bar";
  item.dataset.testid = "bar";
  const name = document.createElement("span");
  name.className = "bar-label";
  name.textContent = label;
  name.title = label;
  const track = document.createElement("span");
  track.className = "bar-track";
  track.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = `${Math.min(100, Math.max(0, percent))}%`; // CSSOM, which the CSP allows (no inline style)
  track.append(fill);
  const value = document.createElement("span");
  value.className = "bar-score";
  value.textContent = `${percent.toFixed(1)}%`;
  item.append(name, track, value);
  return item;
}

// The server's own time: the sum of its Server-Timing stages (preprocess, queue, inference), when it sends them.
function serverTimeMs(header) {
  if (!header) return null;
  const durations = [...header.matchAll(/dur=([0-9.]+)/g)].map((match) => Number(match[1]));
  return durations.length ? durations.reduce((a, b) => a + b, 0) : null;
}

function showOverlay(body) {
  const overlay = body.explanations?.[0]?.overlay;
  if (typeof overlay !== "string" || !overlay.startsWith("data:image/")) {
    showNoOverlay("the answer has no overlay image");
    return;
  }
  const image = $("overlay");
  image.src = overlay;
  image.hidden = false;
  $("overlay-message").textContent = "";
}

function showNoOverlay(message) {
  $("overlay").hidden = true;
  $("overlay-message").textContent = `No explanation: ${message}`;
}

// "This file is not an image the model can read" (415: not an image type or format; invalid_image: one that does not
// decode), said for a person, without the API's advice on request headers (this page sets them).
function showError(error, file) {
  if (!error) {
    $("error").textContent = "";
  } else if (file && (error.status === 415 || error.code === "invalid_image")) {
    const detail = error.code === "invalid_image" ? ` (${error.message})` : "";
    $("error").textContent = `${file.name} is not an image the model can read${detail}. Choose a photo: JPEG, PNG, WebP…`;
  } else {
    $("error").textContent = error.message;
  }
}

// --- input: the file picker, drag and drop, and a change of model ---

function pick(files) {
  const file = files?.[0];
  if (file) run(file);
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => pick(event.target.files));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    pick(event.dataTransfer?.files);
  });
  $("model").addEventListener("change", () => {
    showNotice();
    if (currentFile) run(currentFile);
  });
  // A format the server reads but this browser cannot show (TIFF, say): no broken-image icon, the results alone.
  $("preview").addEventListener("error", () => ($("preview-figure").hidden = true));
  modelsLoaded = loadModels();
}

setUp();

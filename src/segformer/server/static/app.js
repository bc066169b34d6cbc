/* SegFormer web app: plain JavaScript, no build step, no third-party code.
 *
 * Talks to the REST API of the same server (relative URLs, so it works under any proxy
 * prefix: the page's <base> is set by the server). Everything shown that comes from the
 * server or from files is inserted as text, never as HTML.
 */
"use strict";

const $ = (selector) => document.querySelector(selector);
const SVG_NS = "http://www.w3.org/2000/svg";

/* ---- small helpers ------------------------------------------------------------------ */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text != null) node.textContent = text;
  return node;
}

const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
const percent = (share) => (share >= 0.1 ? (share * 100).toFixed(1) : share >= 0.001 ? (share * 100).toFixed(2) : "<0.1") + "%";

function milliseconds(ms) {
  if (ms == null || Number.isNaN(ms)) return "–";
  if (ms >= 10000) return (ms / 1000).toFixed(1) + " s";
  if (ms >= 1000) return (ms / 1000).toFixed(2) + " s";
  if (ms >= 100) return Math.round(ms) + " ms";
  return ms.toFixed(1) + " ms";
}

function count(n) {
  if (n == null) return "–";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return String(n);
}

function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 10) return seconds.toFixed(seconds < 1 ? 2 : 1) + " s";
  const s = Math.round(seconds);
  return s >= 60 ? `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}` : `${s} s`;
}

function stem(name) {
  const base = (name || "image").split(/[\\/]/).pop();
  const dot = base.lastIndexOf(".");
  return (dot > 0 ? base.slice(0, dot) : base) || "image";
}

let toastTimer = 0;
function toast(message, kind = "error") {
  const box = $("#toast");
  box.textContent = message;
  box.className = "toast " + kind;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), kind === "error" ? 8000 : 3500);
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error("cannot reach the server (" + error.message + ")");
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : `${response.status} ${response.statusText}`;
    const error = new Error(detail);
    error.status = response.status;
    error.retryAfter = Number(response.headers.get("retry-after")) || 0;
    throw error;
  }
  return body;
}

function downloadBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 2000);
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the picture could not be loaded"));
    image.src = url;
  });
}

/* ---- state ------------------------------------------------------------------------ */
const state = {
  models: [],
  model: null,
  mode: "whole",
  image: null, // { file, original (drawable), result, colored, solo, soloCanvas cache }
  video: null, // { id, poll, started, ... }
  benchLoaded: false,
  limits: null,
};

/* ---- tabs ------------------------------------------------------------------------- */
const TABS = ["image", "video", "compare"];

function showTab(name) {
  if (!TABS.includes(name)) name = "image";
  for (const tab of TABS) {
    const selected = tab === name;
    $(`#tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`#tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`#panel-${tab}`).hidden = !selected;
  }
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "compare" && !state.benchLoaded) loadBench();
}

function setUpTabs() {
  for (const tab of TABS) $(`#tab-${tab}`).addEventListener("click", () => showTab(tab));
  $(".tabs").addEventListener("keydown", (event) => {
    if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
    const current = TABS.findIndex((t) => $(`#tab-${t}`).getAttribute("aria-selected") === "true");
    const next = TABS[(current + (event.key === "ArrowRight" ? 1 : TABS.length - 1)) % TABS.length];
    showTab(next);
    $(`#tab-${next}`).focus();
  });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  showTab(location.hash.slice(1) || "image");
}

/* ---- models ----------------------------------------------------------------------- */
async function loadModels() {
  try {
    const data = await api("v1/models");
    state.models = data.models;
    const saved = localStorage.getItem("segformer.model");
    state.model = data.models.some((m) => m.name === saved) ? saved : data.default;
    const select = $("#model");
    const several = data.models.length > 1;
    select.replaceChildren(...data.models.map((m) => el("option", { value: m.name, text: m.name + (several && m.default ? " (default)" : "") })));
    select.value = state.model;
    select.disabled = data.models.length < 2;
    showDomain();
  } catch (error) {
    toast("Could not list the models: " + error.message);
  }
}

function showDomain() {
  // What the chosen model is for, beside the picker: a road-scene model says so before
  // anyone drops a photo of a cat on it.
  const info = state.models.find((m) => m.name === state.model);
  const domain = $("#model-domain");
  domain.textContent = info && info.domain ? "for " + info.domain : "";
  domain.title = domain.textContent;
  domain.hidden = !domain.textContent;
}

function setUpModelPicker() {
  $("#model").addEventListener("change", (event) => {
    state.model = event.target.value;
    localStorage.setItem("segformer.model", state.model);
    showDomain();
    if (!$("#about").hidden) renderAbout();
    if (state.image && state.image.file) segmentImage(state.image.file);
  });
  $("#about-open").addEventListener("click", openAbout);
  $("#about-close").addEventListener("click", closeAbout);
  $("#scrim").addEventListener("click", closeAbout);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("#about").hidden) closeAbout();
  });
}

function openAbout() {
  $("#about").hidden = false;
  $("#scrim").hidden = false;
  $("#about-open").setAttribute("aria-expanded", "true");
  $("#about-close").focus();
  renderAbout();
}

function closeAbout() {
  $("#about").hidden = true;
  $("#scrim").hidden = true;
  $("#about-open").setAttribute("aria-expanded", "false");
  $("#about-open").focus();
}

function inputSize(pre) {
  // How the model's processor sizes an image, from its preprocessor_config.json.
  if (!pre) return "–";
  if (pre.do_resize === false) return "original size";
  const ours = pre.segformer || {};
  if (ours.keep_ratio && ours.scale) return `keep ratio within ${ours.scale.join(" × ")}`;
  const size = pre.size || {};
  if (size.height && size.width) return `${size.height} × ${size.width}`;
  if (size.shortest_edge) return `short side ${size.shortest_edge}` + (size.longest_edge ? `, long side ≤ ${size.longest_edge}` : "");
  return "–";
}

async function renderAbout() {
  const body = $("#about-body");
  const name = state.model;
  body.replaceChildren(el("p", { class: "muted", text: `Loading ${name}…` }));
  let info;
  try {
    info = await api("v1/models/" + encodeURIComponent(name));
  } catch (error) {
    body.replaceChildren(el("p", { class: "muted", text: "Could not load the model: " + error.message }));
    return;
  }
  if (name !== state.model) return; // the user picked another one meanwhile
  const mode = info.mode ? info.mode.mode + (info.mode.crop_size ? ` (${info.mode.crop_size.join("×")} windows)` : "") : "–";
  const facts = [
    ["Name", info.name],
    ["Made for", info.domain || "not stated"],
    ["Variant", info.variant === "custom" ? "custom" : info.variant ? "MiT-" + info.variant : "–"],
    ["Parameters", count(info.parameters)],
    ["Classes", info.num_labels],
    ["Input size", inputSize(info.preprocessing)],
    ["Inference", mode],
    ["Runs on", [info.device, info.backend, info.precision].filter(Boolean).join(" · ")],
    ["Source", info.source || "–"],
    ["Licence", info.license || "not stated"],
    ["Palette", info.palette_source || "–"],
  ];
  const content = [el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) }))))];
  if (info.metrics && Object.keys(info.metrics).length) {
    content.push(el("h3", { text: "Reported metrics" }));
    const rows = Object.entries(info.metrics).map(([k, v]) =>
      el("div", {}, el("dt", { text: k }), el("dd", { text: typeof v === "number" ? (Math.abs(v) <= 1 ? (v * 100).toFixed(2) + "%" : v.toFixed(2)) : JSON.stringify(v) }))
    );
    content.push(el("dl", { class: "facts" }, rows));
  }
  content.push(el("h3", { text: `Classes (${info.labels.length})` }));
  content.push(el("div", { class: "chips" }, info.labels.map((label, i) => el("span", { class: "chip" }, el("i", { style: { background: rgb(info.palette[i]) } }), label))));
  body.replaceChildren(...content);
}

/* ---- drag and drop ---------------------------------------------------------------- */
function setUpDrop(zone, input, onFile) {
  const open = () => input.click();
  input.addEventListener("click", (event) => event.stopPropagation()); // it sits inside the zone
  zone.addEventListener("click", open);
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      open();
    }
  });
  input.addEventListener("change", () => {
    if (input.files && input.files[0]) onFile(input.files[0]);
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    event.stopPropagation(); // the page-wide drop handler would take it again
    zone.classList.remove("dragging");
    const file = event.dataTransfer.files && event.dataTransfer.files[0];
    if (file) onFile(file);
  });
}

function setUpPageDrop() {
  // Dropping anywhere works too (e.g. onto the current result to replace it).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files && event.dataTransfer.files[0];
    if (!file) return;
    if (file.type.startsWith("video/")) {
      showTab("video");
      startVideo(file);
    } else {
      showTab("image");
      segmentImage(file);
    }
  });
  window.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData ? event.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) {
      showTab("image");
      segmentImage(item.getAsFile());
    }
  });
}

/* ---- images ----------------------------------------------------------------------- */
const TIMING_PARTS = [
  ["decode_ms", "decode", "#94a3b8"],
  ["preprocess_ms", "preprocess", "#38bdf8"],
  ["model_ms", "model", "#6366f1"],
  ["postprocess_ms", "postprocess", "#f59e0b"],
];

async function decodeLocally(file) {
  // Browsers that cannot show the format (e.g. TIFF) get the server's overlay instead.
  try {
    return await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    try {
      const url = URL.createObjectURL(file);
      try {
        return await loadImage(url);
      } finally {
        URL.revokeObjectURL(url);
      }
    } catch {
      return null;
    }
  }
}

let imageRequest = 0;

async function segmentImage(file) {
  if (!file || tooLarge(file, "max_upload_bytes")) return;
  const request = ++imageRequest;
  $("#image-drop").hidden = true;
  $("#image-result").hidden = false;
  $("#image-busy").hidden = false;
  $("#image-busy-text").textContent = `Segmenting ${file.name || "image"}…`;

  const original = await decodeLocally(file);
  const form = new FormData();
  form.append("image", file, file.name || "image");
  form.append("model", state.model);
  form.append("mode", state.mode);
  form.append("output", "url");
  form.append("include", "label_map");
  form.append("include", "colored");
  if (!original) form.append("include", "overlay");
  let result;
  try {
    result = await api("v1/segment", { method: "POST", body: form });
  } catch (error) {
    if (request !== imageRequest) return;
    $("#image-busy").hidden = true;
    const retry = error.retryAfter ? ` (try again in ${error.retryAfter} s)` : "";
    toast(error.message + retry);
    if (!state.image) resetImage();
    return;
  }
  let colored, serverOverlay;
  try {
    colored = await loadImage(result.images.colored.url);
    if (!original) serverOverlay = await loadImage(result.images.overlay.url);
  } catch (error) {
    if (request === imageRequest) toast(error.message);
    return;
  }
  if (request !== imageRequest) return; // a newer image superseded this one
  state.image = { file, original, result, colored, serverOverlay, solo: null, soloCache: new Map(), sampler: null };
  $("#image-busy").hidden = true;
  prepareSampler();
  renderImageResult();
}

function resetImage() {
  imageRequest++;
  state.image = null;
  $("#image-result").hidden = true;
  $("#image-drop").hidden = false;
}

function prepareSampler() {
  // A small nearest-neighbour copy of the colour image, to name the class under the pointer.
  const { colored, result } = state.image;
  const scale = Math.min(1, Math.sqrt(2e6 / (result.width * result.height)));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(result.width * scale));
  canvas.height = Math.max(1, Math.round(result.height * scale));
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(colored, 0, 0, canvas.width, canvas.height);
  const byColor = new Map(result.classes.map((c) => [c.color.join(","), c]));
  state.image.sampler = { data: ctx.getImageData(0, 0, canvas.width, canvas.height).data, width: canvas.width, height: canvas.height, byColor };
}

function soloLayer(classInfo) {
  // The colour image with every other class made transparent.
  const cache = state.image.soloCache;
  if (cache.has(classInfo.id)) return cache.get(classInfo.id);
  const { colored, result } = state.image;
  const canvas = document.createElement("canvas");
  canvas.width = result.width;
  canvas.height = result.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(colored, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  const [r, g, b] = classInfo.color;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] !== r || data[i + 1] !== g || data[i + 2] !== b) data[i + 3] = 0;
  }
  ctx.putImageData(pixels, 0, 0);
  cache.set(classInfo.id, canvas);
  return canvas;
}

function drawImages() {
  const image = state.image;
  if (!image) return;
  const { width, height } = image.result;
  const opacity = Number($("#opacity").value) / 100;
  for (const id of ["#original-canvas", "#overlay-canvas"]) {
    const canvas = $(id);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
  }
  const originalCtx = $("#original-canvas").getContext("2d");
  const overlayCtx = $("#overlay-canvas").getContext("2d");
  const base = image.original || image.serverOverlay;
  originalCtx.clearRect(0, 0, width, height);
  originalCtx.drawImage(base, 0, 0, width, height);
  overlayCtx.globalAlpha = 1;
  overlayCtx.clearRect(0, 0, width, height);
  if (!image.original) {
    overlayCtx.drawImage(image.serverOverlay, 0, 0, width, height);
    return;
  }
  overlayCtx.drawImage(image.original, 0, 0, width, height);
  overlayCtx.globalAlpha = opacity;
  overlayCtx.drawImage(image.solo ? soloLayer(image.solo) : image.colored, 0, 0, width, height);
  overlayCtx.globalAlpha = 1;
}

let drawQueued = false;
function scheduleDraw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    drawImages();
  });
}

function renderImageResult() {
  const { result, original, file } = state.image;
  drawImages();
  $("#opacity").disabled = !original;
  if (!original) toast("This browser cannot show the format; the server's overlay is shown instead.", "info");

  const t = result.timings;
  $("#stat-time").textContent = milliseconds(t.total_ms);
  const total = TIMING_PARTS.reduce((sum, [key]) => sum + (t[key] || 0), 0) || 1;
  $("#timing-bar").replaceChildren(
    ...TIMING_PARTS.map(([key, , color]) => el("span", { style: { width: ((100 * (t[key] || 0)) / total).toFixed(2) + "%", background: color } }))
  );
  $("#timing-legend").replaceChildren(
    ...TIMING_PARTS.map(([key, label, color]) => el("div", {}, el("i", { style: { background: color } }), el("dt", { text: label }), el("dd", { text: milliseconds(t[key]) })))
  );
  $("#stat-size").textContent = `${result.width} × ${result.height}`;
  $("#stat-model").textContent = result.model;
  const notice = $("#ood-notice");
  notice.hidden = !result.out_of_domain;
  if (result.out_of_domain) {
    const about = state.models.find((m) => m.name === result.model);
    const domain = about && about.domain ? ` (${about.domain})` : "";
    notice.textContent = `This picture does not look like what the model was trained on${domain}: its labels are likely wrong. Choose a model trained on pictures like this one.`;
  }
  $("#stat-mode").textContent = result.mode;
  for (const button of document.querySelectorAll(".segmented button")) {
    button.setAttribute("aria-checked", String(button.dataset.mode === state.mode));
  }

  $("#class-count").textContent = `· ${result.classes.length}`;
  renderLegend();
  const labels = $("#download-labels");
  labels.href = result.images.label_map.url;
  labels.download = stem(file.name) + "_labels.png";
}

function renderLegend() {
  const { result, solo } = state.image;
  const biggest = result.classes.length ? result.classes[0].share : 1;
  $("#legend").replaceChildren(
    ...result.classes.map((c) =>
      el(
        "li",
        {},
        el(
          "button",
          {
            type: "button",
            "aria-pressed": String(solo != null && solo.id === c.id),
            title: `${c.name}: ${c.pixels.toLocaleString()} pixels. Click to show only this class.`,
            onclick: () => toggleSolo(c),
          },
          el("span", { class: "swatch", style: { background: rgb(c.color) } }),
          el("span", { class: "name", text: c.name }),
          el("span", { class: "share", text: percent(c.share) }),
          el("span", { class: "bar" }, el("span", { style: { width: ((100 * c.share) / biggest).toFixed(1) + "%", background: rgb(c.color) } }))
        )
      )
    )
  );
  $("#legend-clear").hidden = solo == null;
}

function toggleSolo(classInfo) {
  const image = state.image;
  if (!image.original) return;
  image.solo = image.solo && image.solo.id === classInfo.id ? null : classInfo;
  renderLegend();
  scheduleDraw();
}

function classAt(event) {
  const image = state.image;
  if (!image || !image.sampler) return null;
  const canvas = $("#overlay-canvas");
  const box = canvas.getBoundingClientRect();
  const { data, width, height, byColor } = image.sampler;
  const x = Math.floor(((event.clientX - box.left) / box.width) * width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * height);
  if (x < 0 || y < 0 || x >= width || y >= height) return null;
  const i = (y * width + x) * 4;
  return byColor.get(`${data[i]},${data[i + 1]},${data[i + 2]}`) || null;
}

function setUpImage() {
  setUpDrop($("#image-drop"), $("#image-input"), segmentImage);
  $("#opacity").addEventListener("input", () => {
    $("#opacity-value").textContent = $("#opacity").value + "%";
    scheduleDraw();
  });
  $("#image-again").addEventListener("click", () => $("#image-input").click());
  $("#legend-clear").addEventListener("click", () => {
    if (state.image) {
      state.image.solo = null;
      renderLegend();
      scheduleDraw();
    }
  });
  for (const button of document.querySelectorAll(".segmented button")) {
    button.addEventListener("click", () => {
      if (state.mode === button.dataset.mode) return;
      state.mode = button.dataset.mode;
      for (const other of document.querySelectorAll(".segmented button")) other.setAttribute("aria-checked", String(other === button));
      if (state.image) segmentImage(state.image.file);
    });
  }
  const hover = $("#hover-class");
  $("#overlay-canvas").addEventListener("pointermove", (event) => {
    const c = classAt(event);
    if (!c) {
      hover.replaceChildren();
      return;
    }
    hover.replaceChildren(el("i", { style: { background: rgb(c.color) } }), `${c.name} · ${percent(c.share)}`);
  });
  $("#overlay-canvas").addEventListener("pointerleave", () => hover.replaceChildren());
  $("#overlay-canvas").addEventListener("click", (event) => {
    const c = classAt(event);
    if (c) toggleSolo(c);
  });
  $("#download-overlay").addEventListener("click", () => {
    if (!state.image) return;
    $("#overlay-canvas").toBlob((blob) => downloadBlob(blob, stem(state.image.file.name) + "_overlay.png"), "image/png");
  });
  $("#download-json").addEventListener("click", () => {
    if (!state.image) return;
    const { images, expires_at, ...record } = state.image.result;
    const blob = new Blob([JSON.stringify({ source: state.image.file.name, ...record }, null, 2)], { type: "application/json" });
    downloadBlob(blob, stem(state.image.file.name) + ".json");
  });
}

/* ---- videos ----------------------------------------------------------------------- */
function videoFormat() {
  // H.264 MP4 where the browser plays it, else VP9 WebM (e.g. some open-source builds).
  const probe = document.createElement("video");
  return probe.canPlayType('video/mp4; codecs="avc1.42E01E"') ? "mp4" : "webm";
}

function setProgress(fraction, text) {
  const bar = $("#video-progress");
  bar.classList.toggle("indeterminate", fraction == null);
  $("#video-progress-fill").style.width = fraction == null ? "" : (fraction * 100).toFixed(1) + "%";
  if (fraction != null) bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  else bar.removeAttribute("aria-valuenow");
  $("#video-status").textContent = text;
}

function startVideo(file) {
  if (!file || tooLarge(file, "video_max_upload_bytes")) return;
  stopVideoPolling();
  $("#video-drop").hidden = true;
  $("#video-result").hidden = true;
  $("#video-job").hidden = false;
  $("#video-title").textContent = file.name || "Video";
  $("#video-cancel").textContent = "Cancel";
  setProgress(0, "Uploading…");
  showPreview(file);
  const form = new FormData();
  form.append("video", file, file.name || "video");
  form.append("model", state.model);
  form.append("format", videoFormat());
  const xhr = new XMLHttpRequest();
  state.video = { file, xhr, id: null, poll: 0, seen: [] };
  xhr.open("POST", "v1/videos");
  xhr.responseType = "json";
  xhr.upload.onprogress = (event) => {
    if (event.lengthComputable) setProgress(event.loaded / event.total, `Uploading… ${Math.round((100 * event.loaded) / event.total)}%`);
  };
  xhr.onerror = () => videoFailed("the upload failed (connection lost)");
  xhr.onload = () => {
    const body = xhr.response || {};
    if (xhr.status !== 202) {
      const retry = Number(xhr.getResponseHeader("retry-after"));
      videoFailed((body.detail || `upload refused (${xhr.status})`) + (retry ? ` (try again in ${retry} s)` : ""));
      return;
    }
    state.video.id = body.id;
    showJob(body);
    pollVideo();
  };
  xhr.send(form);
}

function showPreview(file) {
  // The original plays (muted) while the server works, where the browser can play it.
  const preview = $("#video-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = true;
  preview.onloadeddata = () => {
    preview.hidden = false;
    preview.play().catch(() => {});
  };
  preview.onerror = () => (preview.hidden = true);
  preview.src = URL.createObjectURL(file);
}

function hidePreview() {
  const preview = $("#video-preview");
  preview.pause();
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
}

function videoFailed(message) {
  toast(message);
  setProgress(0, "Failed: " + message);
  $("#video-cancel").textContent = "Choose another video";
}

function stopVideoPolling() {
  if (state.video) clearTimeout(state.video.poll);
}

function showJob(job) {
  const video = state.video;
  if (job.status === "queued") {
    setProgress(null, "Waiting for a free worker…");
    return;
  }
  if (job.status === "running") {
    // frames per second from this page's own clock (the server's may differ)
    video.seen.push([performance.now(), job.frames_done]);
    if (video.seen.length > 12) video.seen.shift();
    const [t0, f0] = video.seen[0];
    const [t1, f1] = video.seen[video.seen.length - 1];
    const fps = t1 > t0 ? ((f1 - f0) * 1000) / (t1 - t0) : 0;
    const parts = [`Segmenting · frame ${job.frames_done}` + (job.total_frames ? ` of ${job.total_frames}` : "")];
    if (fps > 0) parts.push(`${fps.toFixed(1)} fps`);
    if (fps > 0 && job.total_frames) parts.push(`about ${duration((job.total_frames - job.frames_done) / fps)} left`);
    setProgress(job.progress, parts.join(" · "));
  }
}

async function pollVideo() {
  const video = state.video;
  if (!video || !video.id) return;
  let job;
  try {
    job = await api("v1/videos/" + video.id);
  } catch (error) {
    if (state.video !== video) return;
    videoFailed(error.message);
    return;
  }
  if (state.video !== video) return;
  if (job.status === "done") {
    setProgress(1, `Done · ${job.result.frames} frames in ${duration(job.result.seconds)}`);
    showVideoResult(job);
    return;
  }
  if (job.status === "failed" || job.status === "cancelled") {
    videoFailed(job.error || "the job was cancelled");
    return;
  }
  showJob(job);
  video.poll = setTimeout(pollVideo, 700);
}

async function showVideoResult(job) {
  hidePreview();
  $("#video-job").hidden = true;
  $("#video-result").hidden = false;
  const name = stem(job.filename);
  const player = $("#video-player");
  player.src = job.links.result;
  player.play().catch(() => {});
  const download = $("#video-download");
  download.href = job.links.result + "?download=true";
  download.download = `${name}_segmented.${job.format}`;
  $("#video-csv").href = job.links.frames_csv;
  $("#video-csv").download = `${name}_frames.csv`;
  $("#video-json").href = job.links.frames;
  $("#video-json").download = `${name}_frames.json`;
  const r = job.result;
  const facts = [
    ["Frames", `${r.frames} at ${r.fps.toFixed(r.fps % 1 ? 2 : 0)} fps`],
    ["Size", `${r.width} × ${r.height}`],
    ["Processing", `${duration(r.seconds)} (${r.frames_per_second ? r.frames_per_second.toFixed(1) : "–"} fps)`],
    ["Model time", milliseconds(r.model_ms_per_frame) + " per frame"],
    ["Model", job.model],
    ["Codec", r.codec],
  ];
  $("#video-facts").replaceChildren(...facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
  try {
    const stats = await api(job.links.frames);
    drawClassTimeline(stats, job);
  } catch (error) {
    $("#video-chart").replaceChildren(el("p", { class: "muted", text: "No per-frame statistics: " + error.message }));
  }
}

function drawClassTimeline(stats, job) {
  // The six classes with the largest mean share, as lines over time.
  const box = $("#video-chart");
  if (!stats.frames.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No frames." }));
    return;
  }
  const models = state.models.find((m) => m.name === job.model);
  const palette = models && models.palette;
  const means = stats.labels.map((_, i) => stats.frames.reduce((s, f) => s + f.shares[i], 0) / stats.frames.length);
  const top = means.map((m, i) => [m, i]).filter(([m]) => m > 0).sort((a, b) => b[0] - a[0]).slice(0, 6).map(([, i]) => i);
  const fallback = ["#6366f1", "#f59e0b", "#10b981", "#ef4444", "#0ea5e9", "#a855f7"];
  const W = 300, H = 150, L = 30, B = 18, T = 6;
  const tMax = Math.max(stats.frames[stats.frames.length - 1].time_s, 1e-6);
  const x = (t) => L + ((W - L - 4) * t) / tMax;
  const y = (s) => T + (H - T - B) * (1 - s);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Share of the main classes over time" });
  for (const s of [0, 0.5, 1]) {
    chart.append(svg("line", { class: s ? "grid" : "axis", x1: L, x2: W - 4, y1: y(s), y2: y(s) }));
    chart.append(svg("text", { x: L - 4, y: y(s) + 3.5, "text-anchor": "end" }, `${s * 100}%`));
  }
  chart.append(svg("text", { x: L, y: H - 3 }, "0 s"));
  chart.append(svg("text", { x: W - 4, y: H - 3, "text-anchor": "end" }, `${tMax.toFixed(1)} s`));
  const colors = [];
  top.forEach((index, k) => {
    const color = palette && palette[index] ? rgb(palette[index]) : fallback[k];
    colors.push([stats.labels[index], color, means[index]]);
    const points = stats.frames.map((f) => `${x(f.time_s).toFixed(1)},${y(f.shares[index]).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { points, fill: "none", stroke: color, "stroke-width": 1.8, "stroke-linejoin": "round" }));
  });
  const legend = el("div", { class: "chart-legend" }, colors.map(([label, color, mean]) => el("span", {}, el("i", { style: { background: color } }), `${label} ${percent(mean)}`)));
  box.replaceChildren(chart, legend);
}

function setUpVideo() {
  setUpDrop($("#video-drop"), $("#video-input"), startVideo);
  $("#video-cancel").addEventListener("click", async () => {
    const video = state.video;
    stopVideoPolling();
    state.video = null;
    if (video && video.xhr && video.xhr.readyState !== 4) video.xhr.abort();
    if (video && video.id) api("v1/videos/" + video.id, { method: "DELETE" }).catch(() => {});
    hidePreview();
    $("#video-job").hidden = true;
    $("#video-drop").hidden = false;
  });
  $("#video-again").addEventListener("click", () => {
    const player = $("#video-player");
    player.pause();
    player.removeAttribute("src");
    player.load();
    $("#video-result").hidden = true;
    $("#video-drop").hidden = false;
    $("#video-input").click();
  });
}

/* ---- comparison --------------------------------------------------------------------- */
const BACKEND_COLORS = ["#6366f1", "#10b981", "#f59e0b", "#0ea5e9", "#ef4444", "#a855f7", "#64748b"];

function benchRecords(results) {
  // `segformer bench` JSON (schema segformer-bench/1): jobs, each with a name and one row per
  // engine (median_ms, p10/p90, images/s, ratio to transformers, accuracy, peak RSS).
  const records = [];
  for (const job of Array.isArray(results.jobs) ? results.jobs : []) {
    for (const row of Array.isArray(job.results) ? job.results : []) {
      if (!row || typeof row.median_ms !== "number") continue;
      records.push({
        group: String(job.name || job.kind || "job"),
        backend: String(row.engine || [row.backend, row.precision].filter(Boolean).join(" ") || "engine"),
        ms: row.median_ms,
        spread: typeof row.p10_ms === "number" && typeof row.p90_ms === "number" ? [row.p10_ms, row.p90_ms] : null,
        ratio: typeof row.ratio === "number" ? row.ratio : null,
        imagesPerSecond: typeof row.images_per_s === "number" ? row.images_per_s : null,
        agreement: typeof row.label_agreement === "number" ? row.label_agreement : null,
        error: typeof row.relative_error === "number" ? row.relative_error : null,
        rss: typeof row.peak_rss_mb === "number" ? row.peak_rss_mb : null,
      });
    }
  }
  return records;
}

function machineText(results) {
  const m = results.machine || {};
  const parts = [m.cpu, m.gpu];
  if (m.threads) parts.push(`${m.threads} threads`);
  if (m.allocator) parts.push(`allocator ${m.allocator}`);
  if (m.torch) parts.push(`torch ${m.torch}`);
  if (m.transformers) parts.push(`transformers ${m.transformers}`);
  return parts.filter(Boolean).join(" · ");
}

async function loadBench() {
  state.benchLoaded = true;
  const chartBox = $("#bench-chart");
  chartBox.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
  $("#bench-table-wrap").replaceChildren();
  let data;
  try {
    data = await api("v1/bench");
  } catch (error) {
    state.benchLoaded = false;
    chartBox.replaceChildren(el("p", { class: "muted", text: "Could not load the benchmark results: " + error.message }));
    return;
  }
  const records = data.available ? benchRecords(data.results) : [];
  if (!records.length) {
    chartBox.replaceChildren(
      el(
        "div",
        { class: "empty" },
        el("h3", { text: "No benchmark results yet" }),
        el("p", { text: data.available ? "The results file has no latency measurements this page understands." : "Measure the engines on this machine, then reload this page:" }),
        el("pre", {}, el("code", { text: "segformer bench" })),
        el("p", { class: "hint", text: "The server reads the file segformer bench writes by default, or the one given with segformer serve --bench-results PATH." })
      )
    );
    $("#bench-when").textContent = "";
    $("#bench-machine").textContent = "";
    return;
  }
  const created = data.results.created ? new Date(data.results.created) : data.modified_at ? new Date(data.modified_at * 1000) : null;
  $("#bench-when").textContent = created && !Number.isNaN(created.getTime()) ? "measured " + created.toLocaleString() : "";
  $("#bench-machine").textContent = machineText(data.results);
  drawBenchChart(records);
  drawBenchTable(records);
  state.benchRecords = records;
}

function drawBenchChart(records) {
  // Drawn at the container's own width, so that text keeps its size on any screen.
  const box = $("#bench-chart");
  const groups = [...new Set(records.map((r) => r.group))];
  const backends = [...new Set(records.map((r) => r.backend))];
  const color = (backend) => BACKEND_COLORS[backends.indexOf(backend) % BACKEND_COLORS.length];
  const max = Math.max(...records.map((r) => r.ms));
  const W = Math.max(300, Math.round(box.clientWidth || 720));
  const L = Math.min(150, Math.round(W * 0.34)), R = 112, barH = 18, gap = 6, groupGap = 16, head = 20;
  let height = 4;
  const layout = groups.map((group) => {
    const rows = records.filter((r) => r.group === group).sort((a, b) => a.ms - b.ms);
    const top = height;
    height += head + rows.length * (barH + gap) + groupGap;
    return { group, rows, top };
  });
  const chart = svg("svg", { viewBox: `0 0 ${W} ${height}`, width: W, height, role: "img", "aria-label": "Median latency per model and backend" });
  const x = (ms) => L + ((W - L - R) * ms) / max;
  for (const { group, rows, top } of layout) {
    chart.append(svg("text", { x: 0, y: top + 13, class: "bar-label", "font-weight": "650" }, group));
    // ratios against transformers in the same group when it was measured, else the slowest
    const reference = rows.find((r) => /transformers/i.test(r.backend)) || rows[rows.length - 1];
    rows.forEach((r, i) => {
      const y = top + head + i * (barH + gap);
      chart.append(svg("text", { x: L - 8, y: y + barH / 2 + 4, "text-anchor": "end" }, r.backend));
      chart.append(svg("rect", { x: L, y, width: Math.max(2, x(r.ms) - L), height: barH, rx: 4, fill: color(r.backend) }));
      const ratio = r.ratio != null ? Number(r.ratio) : rows.length > 1 ? r.ms / reference.ms : null;
      const label = milliseconds(r.ms) + (ratio != null && r !== reference ? `  ${ratio.toFixed(2)}×` : "");
      chart.append(svg("text", { x: x(r.ms) + 6, y: y + barH / 2 + 4, class: "bar-value" }, label));
    });
  }
  const note = el("p", { class: "hint", text: "Median time per call, measured interleaved in one process; × is the time relative to transformers on the same job (or to the slowest engine when transformers was not measured)." });
  box.replaceChildren(chart, note);
}

function drawBenchTable(records) {
  const head = ["Job", "Engine", "Median", "p10–p90", "Images/s", "× transformers", "Labels agree", "Peak RSS"];
  const rows = records.map((r) => [
    r.group,
    r.backend,
    milliseconds(r.ms),
    r.spread ? `${r.spread[0].toFixed(1)}–${r.spread[1].toFixed(1)} ms` : "–",
    r.imagesPerSecond != null ? r.imagesPerSecond.toFixed(1) : "–",
    r.ratio != null ? r.ratio.toFixed(3) : "–",
    r.agreement != null ? (r.agreement * 100).toFixed(2) + "%" : "–",
    r.rss != null ? `${Math.round(r.rss)} MiB` : "–",
  ]);
  const table = el(
    "table",
    {},
    el("thead", {}, el("tr", {}, head.map((h, i) => el("th", { class: i < 2 ? "text" : "", text: h })))),
    el("tbody", {}, rows.map((row) => el("tr", {}, row.map((v, i) => el("td", { class: i < 2 ? "text" : "", text: String(v) })))))
  );
  $("#bench-table-wrap").replaceChildren(table);
}

/* ---- start -------------------------------------------------------------------------- */
const megabytes = (bytes) => `${Math.round((bytes / 1048576) * 10) / 10} MB`;

async function describeLimits() {
  try {
    const health = await api("healthz");
    const limits = health.limits;
    state.limits = limits;
    $("#image-limits").textContent = `JPEG, PNG, WebP, TIFF, BMP up to ${megabytes(limits.max_upload_bytes)} and ${Math.round(limits.max_pixels / 1e6)} megapixels · or paste one (Ctrl+V)`;
    $("#video-limits").textContent = `MP4, MOV, WebM, MKV, AVI up to ${megabytes(limits.video_max_upload_bytes)} and ${limits.video_max_frames.toLocaleString()} frames · every frame is segmented, then you can play and download the result`;
    document.body.dataset.ready = health.status;
  } catch {
    toast("The server does not answer; is it running?");
  }
}

function tooLarge(file, limit) {
  // Refuse here what the server would refuse after the whole upload.
  if (!state.limits || file.size <= state.limits[limit]) return false;
  toast(`${file.name}: ${megabytes(file.size)} is more than this server accepts (${megabytes(state.limits[limit])}).`);
  return true;
}

let resizeTimer = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    if (state.benchRecords && !$("#panel-compare").hidden) drawBenchChart(state.benchRecords);
  }, 150);
});

document.addEventListener("DOMContentLoaded", async () => {
  setUpTabs();
  setUpModelPicker();
  setUpImage();
  setUpVideo();
  setUpPageDrop();
  await Promise.all([loadModels(), describeLimits()]);
});

// The explorer page: sends a photo to POST /encode and draws what comes back.
// Plain JavaScript, no libraries, nothing fetched but this server's own routes.
"use strict";

const OUTPUTS = "input,reconstruction,error_map,latents,level_errors,trace";
const MAP_SIDE = 256; // input, reconstruction and error are enlarged to about this many pixels
const CAUSE_SIDE = 64; // each cause's latent map to about this many
const SVG = "http://www.w3.org/2000/svg";
const PAPER_STEPS = 100; // the paper's dynamics as served before the fast defaults

const $ = (id) => document.getElementById(id);
let file = null; // the photo chosen or dropped
let last = null; // the last run shown: its response, photo and options (the stepper asks the same)
let latest = 0; // the number of the latest encode: an older answer arriving later is dropped, never drawn

// Energies run from below 1 to millions: plain digits, never exponents.
function number(value) {
  const v = Number(value);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en-US");
  return String(Number(v.toPrecision(5)));
}

// An axis label short enough for the plot's margin.
function tick(value) {
  const v = Number(value.toPrecision(6));
  if (Math.abs(v) >= 1e6) return `${Number((v / 1e6).toPrecision(4))}M`;
  if (Math.abs(v) >= 1e4) return `${Number((v / 1e3).toPrecision(4))}k`;
  return String(v);
}

// ---- arrays: {"shape", "dtype": "float32" | "float16", "data": base64 of little-endian bytes} ------

// IEEE half precision to a number (sign, 5 exponent bits, 10 fraction bits).
function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

function decodeArray(payload) {
  const width = { float32: 4, float16: 2 }[payload.dtype];
  if (!width) throw new Error(`unexpected dtype ${payload.dtype}`);
  const text = atob(payload.data);
  const view = new DataView(new ArrayBuffer(text.length));
  for (let i = 0; i < text.length; i++) view.setUint8(i, text.charCodeAt(i));
  const values = new Float32Array(text.length / width);
  for (let i = 0; i < values.length; i++) {
    values[i] = width === 4 ? view.getFloat32(4 * i, true) : half(view.getUint16(2 * i, true));
  }
  return { shape: payload.shape, values };
}

// One level's latents as per-cause maps over the whole image: (K, H, W), or in tile mode
// (T, K, h, w) with tiles row-major over tile_grid's rows x cols. Tiles overlap (every `stride` pixels,
// the first at `origin`, outside the image): the ones that start on the image's own grid of tile-sized
// steps (0, tile, 2 tile, ...) do not overlap each other and cover the image, so those are stitched side
// by side into (K, rows' * h, cols' * w); the others repeat what those show, shifted by half a tile.
function causeMaps(array, grid) {
  const { shape, values } = array;
  if (shape.length === 3) {
    const [k, h, w] = shape;
    return { k, h, w, at: (c, y, x) => values[(c * h + y) * w + x] };
  }
  const [count, k, h, w] = shape;
  const pick = (axis) => {
    if (!grid) return { first: 0, every: 1, n: axis === 0 ? 1 : count };
    const total = axis === 0 ? grid.rows : grid.cols;
    const stride = grid.stride ? grid.stride[axis] : grid.tile[axis];
    const origin = grid.origin ? grid.origin[axis] : 0;
    const every = Math.max(1, Math.round(grid.tile[axis] / stride));
    let first = 0;
    while (first < total && origin + first * stride < 0) first += 1; // the first tile starting in the image
    return { first, every, n: Math.max(1, Math.floor((total - 1 - first) / every) + 1) };
  };
  const rows = pick(0);
  const cols = pick(1);
  const gridCols = grid ? grid.cols : count;
  return {
    k,
    h: rows.n * h,
    w: cols.n * w,
    at(c, y, x) {
      const row = rows.first + Math.floor(y / h) * rows.every;
      const col = cols.first + Math.floor(x / w) * cols.every;
      const tile = row * gridCols + col;
      return values[((tile * k + c) * h + (y % h)) * w + (x % w)];
    },
  };
}

// ---- drawing --------------------------------------------------------------------------------------

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text) node.textContent = text;
  return node;
}

function enlarge(width, height, side) {
  return Math.max(1, Math.floor(side / Math.max(width, height)));
}

function showMap(img, png) {
  const url = `data:image/png;base64,${png}`;
  if (img.src === url && img.complete) return Promise.resolve(); // the same map again: already shown
  return new Promise((resolve) => {
    img.onload = () => {
      img.width = img.naturalWidth * enlarge(img.naturalWidth, img.naturalHeight, MAP_SIDE);
      img.classList.add("pixelated");
      resolve();
    };
    img.onerror = resolve;
    img.src = url;
  });
}

// Signed value in [-1, 1] -> RGB: blue (negative), white (zero), red (positive).
function diverging(t) {
  const a = Math.min(1, Math.abs(t));
  const [r, g, b] = t >= 0 ? [200, 53, 42] : [47, 102, 196];
  return [255 + (r - 255) * a, 255 + (g - 255) * a, 255 + (b - 255) * a];
}

function causeCanvas(maps, c) {
  const { h, w, at } = maps;
  let peak = 0;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) peak = Math.max(peak, Math.abs(at(c, y, x)));
  const canvas = el("canvas", { width: w, height: h, class: "pixelated latent" });
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const [r, g, b] = diverging(peak > 0 ? at(c, y, x) / peak : 0);
      image.data.set([r, g, b, 255], 4 * (y * w + x));
    }
  }
  context.putImageData(image, 0, 0);
  const scale = enlarge(w, h, CAUSE_SIDE);
  canvas.style.width = `${w * scale}px`; // CSSOM, not a style attribute: allowed by the page's CSP
  canvas.title = `cause ${c + 1}: largest |r| = ${peak.toPrecision(3)}`;
  return canvas;
}

// A level whose maps are single values (a dense level on one tile): one bar per cause.
function causeBars(maps) {
  const { k, at } = maps;
  const values = Array.from({ length: k }, (_, c) => at(c, 0, 0));
  const peak = Math.max(...values.map(Math.abs), 1e-12);
  const width = Math.min(900, Math.max(240, 6 * k));
  const height = 90;
  const step = width / k;
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "bars" });
  plot.append(svg("line", { x1: 0, x2: width, y1: height / 2, y2: height / 2, class: "axis" }));
  values.forEach((v, c) => {
    const size = (Math.abs(v) / peak) * (height / 2);
    const bar = svg("rect", {
      x: c * step + step * 0.1,
      y: v >= 0 ? height / 2 - size : height / 2,
      width: step * 0.8,
      height: Math.max(size, 0.5),
      class: v >= 0 ? "bar-positive" : "bar-negative",
    });
    bar.append(svg("title", {}, `cause ${c + 1}: r = ${v.toPrecision(3)}`));
    plot.append(bar);
  });
  // The caption is the page's text, not the picture's: the picture scales down on a phone, its text would too.
  const box = el("div");
  box.append(plot, el("p", { class: "bars-caption" }, `causes 1…${k}, largest |r| = ${peak.toPrecision(3)}`));
  return box;
}

// Level l's prediction error e_l = r_(l-1) - prediction, shown like the latents: one map per channel of
// the map below (level 1: the image's colour channels). Module levels' errors are patches: (M, C, kh,
// kw) shown side by side; in tile mode those have one axis more and are not drawn.
function drawLevelErrors(errors, grid) {
  const box = $("level-errors");
  box.replaceChildren();
  let skipped = 0;
  (errors || []).forEach((payload, index) => {
    const array = decodeArray(payload);
    if (array.shape.length > 4) {
      skipped += 1;
      return;
    }
    const below = index === 0 ? "the image" : `level ${index}'s causes`;
    drawMaps(box, causeMaps(array, grid), `Level ${index + 1} `, `error of its prediction of ${below}`, "channel");
  });
  if (skipped) {
    const what = skipped === 1 ? "one level's errors are" : `${skipped} levels' errors are`;
    box.append(el("p", { class: "note" }, `In tile mode ${what} patches per module per tile, not drawn here; the ` +
      "error map above is the image's error, and the API's level_errors has them all."));
  }
}

function drawLatents(latents, grid) {
  const box = $("latents");
  box.replaceChildren();
  latents.forEach((payload, index) => {
    const maps = causeMaps(decodeArray(payload), grid);
    drawMaps(box, maps, `Level ${index + 1} `, `${maps.k} causes, ${maps.h} × ${maps.w} positions`, "cause");
  });
}

function drawMaps(box, maps, heading, detail, unit) {
  const level = el("div", { class: "level" });
  const title = el("h3", {}, heading);
  title.append(el("span", {}, detail));
  level.append(title);
  if (maps.h * maps.w === 1) {
    level.append(causeBars(maps));
  } else {
    const causes = el("div", { class: "causes" });
    for (let c = 0; c < maps.k; c++) {
      const figure = el("figure");
      const canvas = causeCanvas(maps, c);
      canvas.title = canvas.title.replace("cause", unit);
      figure.append(canvas, el("figcaption", {}, String(c + 1)));
      causes.append(figure);
    }
    level.append(causes);
  }
  box.append(level);
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

let energyTraces = null; // what the plot shows, drawn again when its box changes width

function energyWidth() {
  return Math.round(Math.max(280, Math.min(640, $("energy-plot").clientWidth || 640)));
}

// traces: [{ values, label, kind }], kind "trace" (this run) or "paper" (the paper's dynamics from zero).
// Drawn at the box's own width (at most 640), so the labels keep their size on a phone rather than shrink
// with a scaled-down picture.
function drawEnergy(traces) {
  energyTraces = traces;
  const box = $("energy-plot");
  box.replaceChildren();
  const trace = traces[0].values;
  const all = traces.flatMap((t) => t.values);
  const width = energyWidth();
  const height = 240;
  const m = { left: 64, right: 16, top: 12, bottom: 40 };
  const steps = Math.max(...traces.map((t) => t.values.length)) - 1;
  let lo = Math.min(...all);
  let hi = Math.max(...all);
  if (hi === lo) [lo, hi] = [lo - 1, hi + 1];
  const pad = (hi - lo) * 0.05;
  [lo, hi] = [lo - pad, hi + pad];
  const x = (i) => m.left + (i / Math.max(steps, 1)) * (width - m.left - m.right);
  const y = (v) => m.top + ((hi - v) / (hi - lo)) * (height - m.top - m.bottom);
  const full = height + 16 * traces.length + 4; // the legend goes below the axis: labels of any length fit
  const plot = svg("svg", { viewBox: `0 0 ${width} ${full}`, width, height: full, role: "img", id: "energy-svg" });
  plot.append(svg("title", {}, `energy from ${number(trace[0])} to ${number(trace[trace.length - 1])}`));
  for (const t of niceTicks(lo, hi, 5)) {
    plot.append(svg("line", { x1: m.left, x2: width - m.right, y1: y(t), y2: y(t), class: "grid" }));
    plot.append(svg("text", { x: m.left - 6, y: y(t) + 4, "text-anchor": "end" }, tick(t)));
  }
  for (const t of niceTicks(0, steps, 6)) {
    plot.append(svg("line", { x1: x(t), x2: x(t), y1: height - m.bottom, y2: height - m.bottom + 4, class: "axis" }));
    plot.append(svg("text", { x: x(t), y: height - m.bottom + 16, "text-anchor": "middle" }, String(t)));
  }
  plot.append(svg("line", { x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom, class: "axis" }));
  plot.append(svg("line", { x1: m.left, x2: m.left, y1: m.top, y2: height - m.bottom, class: "axis" }));
  plot.append(svg("text", { x: (m.left + width - m.right) / 2, y: height - 6, "text-anchor": "middle" }, "inference step"));
  const middle = (m.top + height - m.bottom) / 2;
  plot.append(svg("text", { x: 14, y: middle, "text-anchor": "middle", transform: `rotate(-90 14 ${middle})` }, "energy E"));
  traces.forEach((t, index) => {
    const points = t.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    plot.append(svg("polyline", { points, class: t.kind }));
    const row = height + 14 + 16 * index;
    plot.append(svg("line", { x1: m.left, x2: m.left + 20, y1: row - 4, y2: row - 4, class: t.kind }));
    plot.append(svg("text", { x: m.left + 26, y: row, class: "legend" }, t.label));
  });
  box.append(plot);
}

function rms(payload) {
  const { values } = decodeArray(payload);
  let sum = 0;
  for (const v of values) sum += v * v;
  return Math.sqrt(sum / values.length);
}

function drawSummary(result, timing) {
  const { energy } = result;
  const drop = energy.initial ? (100 * (energy.initial - energy.final)) / Math.abs(energy.initial) : 0;
  const rows = [
    ["steps", String(result.steps)],
    ["dynamics", `${result.solver}, from ${result.init === "zero" ? "r = 0" : `the ${result.init} start`}`],
    ["size mode", result.size_mode + (result.tile_grid ? `: ${result.tile_grid.rows} × ${result.tile_grid.cols} tiles` : "")],
    ["input", result.input.array.shape.join(" × ") + " (channels × height × width)"],
    ["energy", `${number(energy.initial)} → ${number(energy.final)} (${drop.toFixed(1)} % lower)`],
    ["error RMS", `${rms(result.error_map.array).toPrecision(3)} (input RMS ${rms(result.input.array).toPrecision(3)})`],
  ];
  if (timing) rows.push(["time", timing]);
  const list = $("summary");
  list.replaceChildren();
  for (const [name, value] of rows) list.append(el("dt", {}, name), el("dd", {}, value));
}

// ---- the request -----------------------------------------------------------------------------------

function serverTiming(header) {
  const parts = Object.fromEntries(
    (header || "").split(",").map((p) => p.trim().split(";dur=")).filter((p) => p.length === 2),
  );
  if (!("total" in parts)) return "";
  return `model ${Number(parts.model).toFixed(1)} ms, in the server ${Number(parts.total).toFixed(1)} ms`;
}

// With PC_API_KEY set, the service answers 401 until a request carries the key: the page asks once and
// keeps it for this tab only (sessionStorage), then sends it with every request.
const KEY_NAME = "pc-api-key";

async function authFetch(url, options = {}) {
  const send = () => {
    const key = sessionStorage.getItem(KEY_NAME);
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    return fetch(url, { ...options, headers: { ...(options.headers || {}), ...headers } });
  };
  let response = await send();
  if (response.status === 401) {
    const key = window.prompt("This service needs an API key (it is kept for this tab only):");
    if (key) {
      sessionStorage.setItem(KEY_NAME, key.trim());
      response = await send();
    }
  }
  return response;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

// The options as the form has them now; solver and init are left out while the model card has not filled
// their menus (the model's own dynamics then).
function formOptions() {
  const options = { steps: $("steps").value, size_mode: $("size-mode").value };
  if ($("solver").value) options.solver = $("solver").value;
  if ($("init").value) options.init = $("init").value;
  return options;
}

function requestForm(sent, outputs) {
  const form = new FormData();
  form.append("image", sent.file, sent.file.name);
  for (const [name, value] of Object.entries(sent.options)) form.append(name, value);
  form.append("outputs", outputs);
  return form;
}

async function encode() {
  if (!file) return;
  const mine = ++latest;
  const sent = { file, options: formOptions() }; // what this run asks, whatever the form says later
  $("error").hidden = true;
  $("encode").disabled = true;
  $("step-through").disabled = true;
  $("status").textContent = `Encoding ${sent.file.name}…`;
  try {
    const response = await authFetch("/encode", { method: "POST", body: requestForm(sent, OUTPUTS) });
    const body = await response.json().catch(() => null);
    if (mine !== latest) return; // a newer request is on its way: its answer is the one to show
    if (!response.ok || !body) {
      $("status").textContent = "";
      // The API's own message says what was wrong and what to send instead.
      showError(body && body.error ? body.error : `the service answered ${response.status}`);
      $("error").dataset.reason = (body && body.reason) || "";
      return;
    }
    await Promise.all([
      showMap($("input-map"), body.input.png),
      showMap($("reconstruction-map"), body.reconstruction.png),
      showMap($("error-map"), body.error_map.png),
    ]);
    if (mine !== latest) return;
    drawSummary(body, serverTiming(response.headers.get("server-timing")));
    drawEnergy([{ values: body.energy.trace, label: `${body.solver}, ${body.steps} steps`, kind: "trace" }]);
    drawLatents(body.latents, body.tile_grid);
    drawLevelErrors(body.level_errors, body.tile_grid);
    last = { body, ...sent };
    $("snapshot-box").hidden = true;
    $("results").hidden = false;
    $("status").textContent = `Encoded ${sent.file.name}.`;
    await drawPaper(body, sent, mine);
  } catch (error) {
    if (mine !== latest) return;
    $("status").textContent = "";
    showError(`the request failed: ${error.message}`);
  } finally {
    if (mine === latest) {
      $("encode").disabled = false;
      $("step-through").disabled = !last;
    }
  }
}

// The same photo under the paper's dynamics (gradient steps from zero), drawn beside the run: fast and slow.
async function drawPaper(body, sent, mine) {
  if (body.solver === "gradient" && body.init === "zero") return;
  const paperOptions = { steps: String(PAPER_STEPS), size_mode: body.size_mode, solver: "gradient", init: "zero" };
  const form = requestForm({ file: sent.file, options: paperOptions }, "trace");
  const response = await authFetch("/encode", { method: "POST", body: form });
  const paper = await response.json().catch(() => null);
  if (mine !== latest || !response.ok || !paper) return;
  drawEnergy([
    { values: body.energy.trace, label: `${body.solver}, ${body.steps} steps`, kind: "trace" },
    { values: paper.energy.trace, label: `the paper's: gradient from 0`, kind: "paper" },
  ]);
}

// outputs=snapshots: the states the run shown passed through (its photo and options), on a slider over its steps.
async function stepThrough() {
  if (!last) return;
  const run = last;
  $("step-through").disabled = true;
  $("error").hidden = true;
  $("status").textContent = "Asking for the states inference passes through…";
  try {
    const response = await authFetch("/encode", { method: "POST", body: requestForm(run, "snapshots") });
    const body = await response.json().catch(() => null);
    if (run !== last) return; // another photo was encoded meanwhile
    if (!response.ok || !body) {
      $("status").textContent = "";
      showError(body && body.error ? body.error : `the service answered ${response.status}`);
      return;
    }
    const snapshots = body.snapshots;
    const slider = $("snapshot");
    slider.max = String(snapshots.length - 1);
    slider.value = slider.max;
    const show = async () => {
      const snap = snapshots[Number(slider.value)];
      $("snapshot-label").textContent = `step ${snap.step} of ${body.steps}: energy ${number(snap.energy)}`;
      await Promise.all([showMap($("reconstruction-map"), snap.reconstruction), showMap($("error-map"), snap.error_map)]);
      drawLatents(snap.latents, run.body.tile_grid);
    };
    slider.oninput = show;
    await show();
    $("snapshot-box").hidden = false;
    $("status").textContent = `${snapshots.length} states of inference: move the slider.`;
  } catch (error) {
    $("status").textContent = "";
    showError(`the request for the states failed: ${error.message}`);
  } finally {
    $("step-through").disabled = !last;
  }
}

function choose(chosen) {
  if (!chosen) return;
  file = chosen;
  $("drop-text").textContent = `${file.name} (${(file.size / 1024).toFixed(1)} KiB)`;
  $("encode").disabled = false;
  encode();
}

// ---- the model card --------------------------------------------------------------------------------

function describeLevel(level, index) {
  const parts = [`${level.causes} causes`, level.kind];
  if (level.kernel) parts.push(`kernel ${level.kernel.join(" × ")}`);
  if (level.stride) parts.push(`stride ${level.stride.join(" × ")}`);
  parts.push(`f = ${level.f}`, `${level.prior} prior`);
  return [`level ${index + 1}`, parts.join(", ")];
}

async function loadModel() {
  const response = await authFetch("/model");
  const card = await response.json().catch(() => null);
  if (!response.ok || !card || card.error) {
    // The model is still loading (503) or the service restarting: ask again until it answers.
    $("model-line").textContent = `The model card is not available yet: ${card ? card.error : response.status}. Trying again…`;
    setTimeout(() => loadModel().catch(retryModel), MODEL_RETRY_MS);
    return;
  }
  $("model-line").textContent = `${card.name} (${card.preset}), sha256 ${card.sha256.slice(0, 12)}, on ${card.device} with the ${card.backend} backend`;
  const steps = $("steps");
  steps.value = card.steps.default;
  steps.max = card.steps.max;
  // Offer only the modes this model takes (a model with a dense level has no full mode).
  const modes = card.input.size_mode;
  for (const option of [...$("size-mode").options]) option.hidden = !modes.choices.includes(option.value);
  $("size-mode").value = modes.default;
  for (const [id, choice] of [["solver", card.solver], ["init", card.init]]) {
    const select = $(id);
    select.replaceChildren(...choice.choices.map((c) => el("option", { value: c }, c)));
    if (choice.choices.includes(choice.default.split("(")[0])) select.value = choice.default.split("(")[0];
  }
  const config = card.config;
  const pre = config.preprocess;
  const rows = [
    ["name", `${card.name} (preset ${card.preset})`],
    ["source", card.source],
    ["native input", card.input.native_shape.join(" × ")],
    ["preprocessing", `${pre.color}, values in [${pre.value_range.join(", ")}], filter ${pre.filter}, normalize ${pre.normalize}`],
    ...config.levels.map(describeLevel),
    ["inference", `step size k1 = ${config.k1}` +
      // Per-level steps (k1 x k1_scale): shown where a level has its own.
      (config.levels.some((l) => (l.k1_scale ?? 1) !== 1)
        ? ` (per level: ${config.levels.map((l) => +(config.k1 * (l.k1_scale ?? 1)).toPrecision(3)).join(", ")})`
        : "") +
      `, ${card.steps.default} steps by default (at most ${card.steps.max})`],
    ["device, backend", `${card.device}, ${card.backend}`],
    ["sha256", card.sha256],
  ];
  const table = $("card");
  table.replaceChildren();
  for (const [name, value] of rows) {
    const row = el("tr");
    row.append(el("th", { scope: "row" }, name), el("td", {}, value));
    table.append(row);
  }
  $("card-json").textContent = JSON.stringify(card, null, 2);
  const basis = $("basis");
  basis.onload = () => {
    basis.width = basis.naturalWidth * enlarge(basis.naturalWidth, basis.naturalHeight, 240);
    basis.classList.add("pixelated");
  };
  // An <img> cannot send the key: fetch the picture, then show it from a blob: URL.
  const picture = await authFetch("/model/basis");
  if (picture.ok) basis.src = URL.createObjectURL(await picture.blob());
}

// ---- wiring ----------------------------------------------------------------------------------------

const MODEL_RETRY_MS = 2000;

function retryModel(error) {
  $("model-line").textContent = `The model card could not be read (${error.message}). Trying again…`;
  setTimeout(() => loadModel().catch(retryModel), MODEL_RETRY_MS);
}

function main() {
  $("image").addEventListener("change", (event) => choose(event.target.files[0]));
  $("step-through").addEventListener("click", () => stepThrough().catch((error) => showError(error.message)));
  $("encode-form").addEventListener("submit", (event) => {
    event.preventDefault();
    encode();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  // The plot is first drawn while its box is hidden (no width yet), and a phone turns: draw it again at the
  // width the box now has.
  new ResizeObserver(() => {
    const drawn = $("energy-svg");
    if (energyTraces && drawn && Number(drawn.getAttribute("width")) !== energyWidth()) drawEnergy(energyTraces);
  }).observe($("energy-plot"));
  loadModel().catch(retryModel);
}

main();

// The playground: a form over POST /v1/generate. Bounds and defaults come from the server (/openapi.json and
// /playground/config.json), never from this file. Results of this session stay in this browser (sessionStorage);
// the token, when the server wants one, in localStorage.
"use strict";

const TOKEN_KEY = "punks.token";
const GALLERY_KEY = "punks.gallery";
const NUMBER_FIELDS = ["seed", "num_outputs", "num_inference_steps", "guidance_scale"];
const FIELDS = [
  ...["prompt", ...NUMBER_FIELDS, "sampler", "lora", "upscaler", "integer_scale"],
  ...["palette", "background", "image", "strength"],
];

const $ = (id) => document.getElementById(id);
// start: the data: URL of the image a variation starts from (an uploaded file, or a result's sprite), or null
const state = { loraDefault: null, busy: false, shown: null, start: null };

// --- the schema -------------------------------------------------------------------------------------------

// A property's constraints, also when it is optional (pydantic writes `anyOf: [{...}, {type: null}]`).
function constraints(property) {
  const merged = { ...property };
  for (const option of property.anyOf || []) {
    if (option.type !== "null") Object.assign(merged, option, { default: property.default });
  }
  return merged;
}

function applySchema(schema, config) {
  const properties = schema.components.schemas.GenerateRequest.properties;
  const bounds = Object.fromEntries(Object.entries(properties).map(([name, p]) => [name, constraints(p)]));
  const prompt = $("prompt");
  if (bounds.prompt.maxLength) prompt.maxLength = bounds.prompt.maxLength;
  for (const name of NUMBER_FIELDS) {
    const input = $(name);
    const b = bounds[name];
    if (b.minimum !== undefined) input.min = b.minimum;
    if (b.maximum !== undefined) input.max = b.maximum;
    input.step = b.type === "integer" ? "1" : "any";
    const fallback = config.defaults[name];  // the server's setting where the schema's default is null
    const value = b.default ?? fallback;
    if (value !== undefined && value !== null) input.value = value;
    const range = b.minimum !== undefined ? ` (${b.minimum}\u2013${b.maximum})` : "";
    input.title = (b.description || name) + range;
    document.querySelector(`label[for=${name}]`).dataset.range = range.trim();
  }
  $("integer_scale").checked = Boolean(config.defaults.integer_scale);
  const strength = $("strength");
  strength.min = bounds.strength.minimum;
  strength.max = bounds.strength.maximum;
  strength.step = "any";
  strength.value = config.defaults.strength;
  strength.title = bounds.strength.description;
  $("palette-presets").replaceChildren(...config.palette_presets.map((name) => new Option(name, name)));
  const sampler = $("sampler");  // the samplers /v1/generate accepts: its OpenAPI enum
  sampler.replaceChildren(new Option("server default", ""));
  for (const name of bounds.sampler.enum || []) sampler.append(new Option(name, name));
  const upscaler = $("upscaler");
  upscaler.replaceChildren(new Option("server default", ""));
  for (const name of bounds.upscaler.enum || []) upscaler.append(new Option(name, name));
  $("upscaler-field").hidden = !config.upscaler_enabled;
  $("prompt-prefix").textContent = config.prompt_prefix.trim();
  $("prompt-suffix").textContent = config.prompt_suffix.replace(/^,\s*/, "").trim();
}

// --- talking to the API ------------------------------------------------------------------------------------

function saveToken() {
  const value = $("token").value.trim();
  if (value) localStorage.setItem(TOKEN_KEY, value);
  else localStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function loadLoras() {
  const select = $("lora");
  let response;
  try {
    response = await fetch("/v1/loras", { headers: headers() });
  } catch (error) {
    showNotice("The server cannot be reached; retrying in 5 s.");
    setTimeout(loadLoras, 5000);
    return;
  }
  if (response.status === 401) {
    $("token-box").open = true;
    setError("token", "This server wants a bearer token (PUNKS_API_TOKEN).");
    return;
  }
  if (response.status === 503) {
    const wait = retryAfter(response);
    showNotice(`The engine is loading; retrying in ${wait} s.`);
    setTimeout(loadLoras, wait * 1000);
    return;
  }
  if (!response.ok) {
    setError("form", `GET /v1/loras: ${response.status}`);
    return;
  }
  const body = await response.json();
  hideNotice();
  setError("token", "");
  state.loraDefault = body.default;
  const previous = select.value;
  select.replaceChildren(new Option(body.default ? `${body.default} (served)` : "served LoRA", ""));
  for (const name of body.loras) {
    if (name !== body.default) select.append(new Option(name, name));
  }
  if ([...select.options].some((option) => option.value === previous)) select.value = previous;
}

function retryAfter(response) {
  const seconds = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return Number.isFinite(seconds) && seconds > 0 ? seconds : 5;
}

// The request body, or null when a field cannot even be sent (its message is then shown next to it).
function requestBody() {
  const body = { prompt: $("prompt").value, return_sprites: true };
  let ok = true;
  for (const name of NUMBER_FIELDS) {
    const input = $(name);
    if (input.validity.badInput) {
      setError(name, "Not a number.");
      ok = false;
    } else if (input.value.trim() !== "") {
      const value = Number(input.value);
      if (!Number.isFinite(value)) {
        setError(name, "Not a finite number.");
        ok = false;
      } else {
        body[name] = value;  // the server checks the bounds and says which one was broken
      }
    }
  }
  body.integer_scale = $("integer_scale").checked;
  if ($("lora").value) body.lora = $("lora").value;
  if ($("sampler").value) body.sampler = $("sampler").value;
  if (!$("upscaler-field").hidden && $("upscaler").value) body.upscaler = $("upscaler").value;
  const palette = $("palette").value.trim();  // a preset's name, or colours separated by commas or spaces
  if (palette) body.palette = palette.includes("#") ? palette.split(/[\s,]+/).filter(Boolean) : palette;
  const background = $("background").value;
  body.background = background === "colour" ? $("background-colour").value : background;
  if (state.start) {
    body.image = state.start;
    const strength = $("strength");
    if (strength.validity.badInput || !Number.isFinite(Number(strength.value)) || strength.value.trim() === "") {
      setError("strength", "Not a number.");
      ok = false;
    } else {
      body.strength = Number(strength.value);
    }
  }
  return ok ? body : null;
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  clearErrors();
  hideNotice();
  saveToken();  // Enter in the token field submits, maybe before its change event
  const body = requestBody();
  if (body === null) return;
  setBusy(true);
  let response;
  try {
    response = await fetch("/v1/generate", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "application/json" }),
      body: JSON.stringify(body),
    });
  } catch (error) {
    setBusy(false);
    showNotice("The server cannot be reached; retry in a moment.");
    return;
  }
  const elapsed = (performance.now() - state.started) / 1000;
  try {
    if (response.ok) {
      const result = await response.json();
      const request = { ...body, image: undefined };  // the start image stays out of sessionStorage (its quota)
      const entry = { at: Date.now(), request, elapsed_s: elapsed, ...result };
      addToGallery(entry);
      showResult(entry);
      if ($("lora").options.length === 0) loadLoras();  // the token was given only now
    } else {
      await showFailure(response);
    }
  } finally {
    setBusy(false);
  }
}

async function showFailure(response) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch (error) {
    detail = null;
  }
  if (response.status === 429 || response.status === 503) {
    const why = typeof detail === "string" ? detail : response.status === 429 ? "the queue is full" : "unavailable";
    showNotice(`Busy (${response.status}: ${why}). Retry in ${retryAfter(response)} s.`);
  } else if (response.status === 401) {
    $("token-box").open = true;
    setError("token", "Missing or wrong bearer token.");
    $("token").focus();
  } else if (response.status === 422 && Array.isArray(detail)) {
    let first = null;
    for (const item of detail) {
      const loc = item.loc || [];
      const field = loc[0] === "body" && FIELDS.includes(loc[1]) ? loc[1] : "form";
      const where = field === "form" && loc.length ? `${loc.join(".")}: ` : "";
      setError(field, where + item.msg, true);
      first = first || field;
    }
    if (first && first !== "form") $(first).focus();
  } else {
    const text = typeof detail === "string" ? detail : response.statusText;
    setError("form", `${response.status}: ${text}`);
  }
}

// --- showing results ---------------------------------------------------------------------------------------

function dataUrl(mediaType, base64) {
  return `data:${mediaType};base64,${base64}`;
}

function fixed(value) {
  return typeof value === "number" ? value.toFixed(3) : String(value);
}

function showResult(entry) {
  state.shown = entry;
  $("result").hidden = false;
  const t = entry.timings;
  $("result-meta").textContent =
    `${entry.images.length} image${entry.images.length > 1 ? "s" : ""}, steps ${entry.num_inference_steps}, ` +
    `guidance ${entry.guidance_scale}; total ${fixed(t.total_s)} s (queue ${fixed(t.queue_wait_s)}, ` +
    `diffusion ${fixed(t.pipeline_s)}, snap ${fixed(t.postprocess_s)}, encode ${fixed(t.encode_s)})`;
  const dropped = $("dropped");
  dropped.hidden = !entry.dropped_words;
  dropped.textContent = entry.dropped_words ? `Too long for CLIP, dropped: \u201c${entry.dropped_words}\u201d` : "";
  const extension = entry.media_type.split("/")[1] || "png";
  const cards = entry.images.map((image) => {
    const card = $("image-card").content.firstElementChild.cloneNode(true);
    const full = card.querySelector(".full");
    full.src = dataUrl(entry.media_type, image.image);
    full.alt = `punk, seed ${image.seed}`;
    const sprite = card.querySelector(".sprite");
    const download = card.querySelector(".download-image");
    download.href = full.src;
    download.download = `punk-${image.seed}.${extension}`;
    const spriteLink = card.querySelector(".download-sprite");
    if (image.sprite) {
      sprite.src = dataUrl(entry.media_type, image.sprite);
      spriteLink.href = sprite.src;
      spriteLink.download = `punk-${image.seed}-sprite.${extension}`;
    } else {
      sprite.hidden = spriteLink.hidden = true;
    }
    if (image.smooth) {
      const smooth = card.querySelector(".download-smooth");
      smooth.hidden = false;
      smooth.href = dataUrl(entry.media_type, image.smooth);
      smooth.download = `punk-${image.seed}-smooth.${extension}`;
    }
    card.querySelector(".seed").textContent = image.seed;
    const q = image.quality;
    const verdict = card.querySelector(".verdict");
    verdict.textContent = q.is_pixel_art ? "pixel art" : "not pixel art";
    verdict.classList.add(q.is_pixel_art ? "good" : "bad");
    card.querySelector(".grid_fit").textContent = fixed(q.grid_fit);
    card.querySelector(".edge_alignment").textContent = fixed(q.edge_alignment);
    card.querySelector(".palette_size").textContent = q.palette_size;
    card.querySelector(".background_cells").textContent =
      image.background_cells === null ? "kept" : `${image.background_cells} cells`;
    const palette = card.querySelector(".palette");
    for (const hex of image.palette) {
      const swatch = document.createElement("li");
      swatch.className = "swatch";
      swatch.innerHTML = `<span class="chip"></span><code></code>`;
      swatch.firstChild.style.background = hex;
      swatch.lastChild.textContent = hex;
      palette.append(swatch);
    }
    card.querySelector(".reuse").addEventListener("click", () => {
      $("seed").value = image.seed;
      $("prompt").focus();
    });
    const vary = card.querySelector(".vary");
    vary.hidden = !image.sprite;
    vary.addEventListener("click", () => {
      setStart(dataUrl(entry.media_type, image.sprite));
      $("prompt").focus();
    });
    return card;
  });
  $("images").replaceChildren(...cards);
}

// --- the image a variation starts from ----------------------------------------------------------------------

function setStart(url) {
  state.start = url;
  $("start").hidden = url === null;
  $("start-image").src = url || "";
  if (url === null) $("image").value = "";
}

function readStart() {
  const file = $("image").files[0];
  setError("image", "");
  if (!file) return setStart(null);
  const reader = new FileReader();  // the server checks the file and says what is wrong with it
  reader.addEventListener("load", () => setStart(reader.result));
  reader.addEventListener("error", () => setError("image", "This file cannot be read."));
  reader.readAsDataURL(file);
}

// --- the gallery (this browser tab's session) --------------------------------------------------------------

function readGallery() {
  try {
    return JSON.parse(sessionStorage.getItem(GALLERY_KEY) || "[]");
  } catch (error) {
    return [];
  }
}

function writeGallery(entries) {
  while (entries.length) {
    try {
      sessionStorage.setItem(GALLERY_KEY, JSON.stringify(entries));
      return entries;
    } catch (error) {
      entries.shift();  // over the browser's quota: the oldest results go first
    }
  }
  sessionStorage.removeItem(GALLERY_KEY);
  return entries;
}

function addToGallery(entry) {
  const entries = readGallery();
  entries.push(entry);
  renderGallery(writeGallery(entries));
}

function renderGallery(entries = readGallery()) {
  $("gallery-section").hidden = entries.length === 0;
  const items = entries
    .slice()
    .reverse()
    .map((entry) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "thumb";
      const first = entry.images[0];
      const img = document.createElement("img");
      img.className = "pixelated";
      img.src = dataUrl(entry.media_type, first.sprite || first.image);
      img.alt = "";
      const caption = document.createElement("span");
      caption.textContent = `${entry.request.prompt} \u00b7 ${first.seed}`;
      button.append(img, caption);
      button.title = `show: ${entry.request.prompt} (seed ${first.seed})`;
      button.addEventListener("click", () => {
        $("prompt").value = entry.request.prompt;
        showResult(entry);
      });
      item.append(button);
      return item;
    });
  $("gallery").replaceChildren(...items);
}

// --- small UI pieces ---------------------------------------------------------------------------------------

function setError(field, message, append = false) {
  const element = $(`error-${field}`);
  if (!element) return setError("form", `${field}: ${message}`, append);
  element.textContent = append && element.textContent ? `${element.textContent} ${message}` : message;
  const input = $(field);
  if (input) input.setAttribute("aria-invalid", message ? "true" : "false");
}

function clearErrors() {
  for (const element of document.querySelectorAll(".error")) element.textContent = "";
  for (const element of document.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
  $("notice").textContent = "";
}

function setBusy(busy) {
  state.busy = busy;
  const button = $("submit");
  button.disabled = busy;
  document.body.classList.toggle("busy", busy);
  clearInterval(state.timer);
  if (busy) {
    state.started = performance.now();
    const tick = () => {
      $("busy").textContent = `Rendering\u2026 ${((performance.now() - state.started) / 1000).toFixed(1)} s`;
    };
    tick();
    state.timer = setInterval(tick, 100);
  } else {
    const took = ((performance.now() - state.started) / 1000).toFixed(1);
    $("busy").textContent = `Done in ${took} s.`;
  }
}

// Enter submits from every control; text and number inputs already do, selects and checkboxes do not.
function enterSubmits(event) {
  const target = event.target;
  if (event.key !== "Enter" || event.isComposing) return;
  if (target.tagName === "SELECT" || (target.tagName === "INPUT" && target.type === "checkbox")) {
    event.preventDefault();
    $("form").requestSubmit();
  }
}

async function start() {
  const form = $("form");
  form.addEventListener("submit", generate);
  form.addEventListener("keydown", enterSubmits);
  const token = $("token");
  token.value = localStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("change", () => {
    saveToken();
    loadLoras();
  });
  $("image").addEventListener("change", readStart);
  $("clear-start").addEventListener("click", () => setStart(null));
  $("background").addEventListener("change", () => {
    $("background-colour").hidden = $("background").value !== "colour";
  });
  $("clear-gallery").addEventListener("click", () => {
    sessionStorage.removeItem(GALLERY_KEY);
    renderGallery([]);
  });
  renderGallery();
  const [schema, config] = await Promise.all(
    ["/openapi.json", "/playground/config.json"].map((url) => fetch(url).then((response) => response.json())),
  );
  applySchema(schema, config);
  if (config.token_required) $("token-box").open = true;
  document.body.dataset.ready = "true";
  await loadLoras();
}

start().catch((error) => setError("form", `The page could not start: ${error}`));

// The harmon page: POST /api/generate and read its Server-Sent Events (progress with live
// previews, then the images); POST /api/answer with the uploaded file. No framework, no build.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_body_bytes: 20 * 1024 * 1024 };

// ---- helpers ---------------------------------------------------------------------------------

function message(box, kind, text) {
  const p = document.createElement("p");
  p.className = `banner ${kind}`;
  p.textContent = text;
  box.appendChild(p);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error) return body.error;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// Server-Sent Events from a fetch() response (EventSource cannot POST a JSON body).
async function* readEvents(response) {
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
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim()).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

// small images (the tiny test model makes 32 px ones) are scaled up crisply, not blurred
function showImage(img, src) {
  img.onload = () => img.classList.toggle("pixelated", img.naturalWidth < 128);
  img.src = src;
}

// ---- model info --------------------------------------------------------------------------------

async function loadInfo() {
  try {
    const r = await fetch("api/info");
    if (!r.ok) throw new Error(await errorText(r));
    const info = await r.json();
    const params = (info.total_parameters / 1e6).toFixed(1);
    $("model-info").textContent =
      `${info.name} · ${info.device} · ${info.dtype} · ${params}M parameters`;
    if (info.warning) {
      $("model-warning").textContent = info.warning;
      $("model-warning").hidden = false;
    }
    limits = info.limits;
    const d = info.defaults;
    $("n").value = d.n; $("n").max = limits.max_images;
    $("seed").value = d.seed; $("cfg").value = d.cfg; $("steps").value = d.steps;
    $("candidates").value = d.candidates; $("candidates").max = limits.max_candidates;
    $("refine").value = d.refine; $("refine").max = limits.max_refine;
    $("name-colors").checked = d.name_colors;
    document.body.dataset.ready = "1";
  } catch (e) {
    $("model-info").textContent = `could not reach the server: ${e.message}`;
  }
}

// ---- text to image -----------------------------------------------------------------------------

function makeSlots(count) {
  const box = $("images");
  box.replaceChildren();
  box.dataset.previews = "0";
  const slots = [];
  for (let i = 0; i < count; i++) {
    const fig = document.createElement("figure");
    fig.className = "slot pending";
    const img = document.createElement("img");
    img.alt = `image ${i + 1}`;
    const cap = document.createElement("figcaption");
    cap.textContent = "waiting…";
    fig.append(img, cap);
    box.appendChild(fig);
    slots.push(fig);
  }
  return slots;
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  const messages = $("gen-messages");
  messages.replaceChildren();
  $("gen-status").textContent = "";
  const body = {
    prompt: $("prompt").value,
    n: $("n").value, seed: $("seed").value, cfg: $("cfg").value, steps: $("steps").value,
    candidates: $("candidates").value, refine: $("refine").value,
    name_colors: $("name-colors").checked,
  };
  button.disabled = true;
  button.textContent = "Generating…";
  const bar = $("progress-bar");
  $("progress").hidden = true;
  bar.style.width = "0%";
  let finished = false;
  try {
    const r = await fetch("api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!r.ok) throw new Error(await errorText(r));
    const n = Math.max(1, parseInt(body.n, 10) || 1);
    // every candidate fills in live; the model's picks replace them when done
    let slots = makeSlots(n * Math.max(1, parseInt(body.candidates, 10) || 1));
    $("progress").hidden = false;
    $("gen-status").textContent = "starting…";
    for await (const ev of readEvents(r)) {
      if (ev.type === "queued") {
        $("gen-status").textContent = "queued: " + ev.message;
      } else if (ev.type === "warning") {
        message(messages, "warn", ev.message);
      } else if (ev.type === "progress") {
        bar.style.width = `${(100 * ev.step) / ev.steps}%`;
        $("gen-status").textContent = `step ${ev.step} of ${ev.steps}`;
        if (ev.previews) {
          ev.previews.forEach((src, i) => {
            if (!slots[i]) return;
            showImage(slots[i].querySelector("img"), src);
            slots[i].querySelector("figcaption").textContent = `preview · step ${ev.step}`;
          });
          $("images").dataset.previews = String(Number($("images").dataset.previews) + 1);
        }
      } else if (ev.type === "done") {
        finished = true;
        bar.style.width = "100%";
        if (slots.length !== ev.images.length) {
          const previews = $("images").dataset.previews;
          slots = makeSlots(ev.images.length);
          $("images").dataset.previews = previews;
        }
        ev.images.forEach((src, i) => {
          const fig = slots[i];
          if (!fig) return;
          fig.classList.remove("pending");
          const img = fig.querySelector("img");
          img.classList.add("final");
          showImage(img, src);
          const link = document.createElement("a");
          link.href = src;
          link.download = `harmon_seed${ev.seed}_${i}.png`;
          link.textContent = "download";
          const cap = fig.querySelector("figcaption");
          cap.textContent = `seed ${ev.seed} · #${i + 1} · `;
          cap.appendChild(link);
          // the text this image was drawn from, where the model named colours the prompt left free
          const drawn = ev.prompts && ev.prompts[i];
          if (drawn && drawn !== body.prompt) {
            const as = document.createElement("span");
            as.className = "drawn-as";
            as.textContent = `drawn as “${drawn}”`;
            cap.append(document.createElement("br"), as);
          }
        });
        $("gen-status").textContent =
          `${ev.images.length} image(s)` +
          (ev.candidates > 1 ? `, each the best of ${ev.candidates}` : "") +
          (ev.refine > 0 ? `, ${ev.refine} round(s) of self-correction` : "") +
          `, ${ev.size} px, ${ev.steps} steps, cfg ${ev.cfg}, ` +
          `seed ${ev.seed} · ${ev.seconds} s`;
      } else if (ev.type === "error") {
        finished = true;
        throw new Error(ev.message);
      }
    }
    if (!finished) throw new Error("the connection closed before the images were done");
  } catch (e) {
    message(messages, "error", e.message);
    $("gen-status").textContent = "";
    $("progress").hidden = true;
    document.querySelectorAll("#images .pending").forEach((f) => f.remove());
  } finally {
    button.disabled = false;
    button.textContent = "Generate";
  }
}

// ---- image questions ---------------------------------------------------------------------------

function chooseFile(file) {
  const preview = $("upload-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  if (!file) {
    preview.hidden = true;
    $("drop-text").textContent = "Choose or drop an image";
    return;
  }
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; };
  $("drop-text").textContent = file.name;
}

async function ask(event) {
  event.preventDefault();
  const button = $("ask");
  const messages = $("ask-messages");
  const out = $("answer");
  messages.replaceChildren();
  out.textContent = "";
  out.dataset.state = "busy";
  const file = $("image").files[0];
  try {
    if (!file) throw new Error("choose an image first");
    if (file.size > limits.max_body_bytes) {
      const mb = (limits.max_body_bytes / 1048576).toFixed(0);
      const size = (file.size / 1048576).toFixed(1);
      throw new Error(`${file.name} is ${size} MB; the limit is ${mb} MB`);
    }
    button.disabled = true;
    button.textContent = "Thinking…";
    const form = new FormData();
    form.append("image", file);
    form.append("question", $("question").value);
    const r = await fetch("api/answer", { method: "POST", body: form });
    if (!r.ok) throw new Error(await errorText(r));
    const res = await r.json();
    res.warnings.forEach((w) => message(messages, "warn", w));
    out.textContent = res.answer.trim() || "(the model gave an empty answer)";
    out.dataset.state = "done";
  } catch (e) {
    message(messages, "error", e.message);
    out.dataset.state = "error";
  } finally {
    button.disabled = false;
    button.textContent = "Ask";
  }
}

// ---- wiring ----------------------------------------------------------------------------------

$("generate-form").addEventListener("submit", generate);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate-form").requestSubmit();
});
$("answer-form").addEventListener("submit", ask);
$("image").addEventListener("change", () => chooseFile($("image").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) {
    $("image").files = e.dataTransfer.files;
    chooseFile(e.dataTransfer.files[0]);
  }
});
loadInfo();

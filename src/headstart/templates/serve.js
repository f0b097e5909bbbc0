// headstart serve: the page's behaviour. Every name from the run (classes, files) is set as text, never as markup.
"use strict";

const boot = JSON.parse(document.getElementById("boot").textContent);
const state = { run: boot.default, mistakes: null, cell: null };
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const pct = (p) => (100 * p).toFixed(1) + "%";
const q = (params) => "?" + new URLSearchParams(params).toString();

// ------------------------------------------------------------------------------------------------ runs

function setupRuns() {
  if (boot.runs.length > 1) {
    $("run-pick").hidden = false;
    for (const name of boot.runs) $("run").append(el("option", { value: name, text: name }));
    $("run").value = state.run;
    $("run").addEventListener("change", () => chooseRun($("run").value));
  }
  if (boot.leaderboard) drawBoard(boot.leaderboard);
}

function drawBoard(board) {
  $("board-section").hidden = false;
  const table = $("board");
  table.replaceChildren(el("tr", {}, board.headings.map((h) => el("th", { text: h }))));
  for (const row of board.rows) {
    const tr = el("tr", { class: row.run ? "pick" : "" }, row.cells.map((c) => el("td", { text: c })));
    if (row.run) {
      tr.dataset.run = row.run;
      tr.title = "try " + row.run;
      tr.addEventListener("click", () => chooseRun(row.run));
    }
    table.append(tr);
  }
  markBoard();
}

function markBoard() {
  for (const tr of $("board").querySelectorAll("tr")) tr.classList.toggle("current", tr.dataset.run === state.run);
}

function chooseRun(name) {
  state.run = name;
  if ($("run")) $("run").value = name;
  markBoard();
  loadMistakes();
}

// ------------------------------------------------------------------------------------------------ try it

async function tryFiles(files) {
  for (const file of files) {
    if (file.type && !file.type.startsWith("image/")) continue;
    if (file.size > boot.max_upload) {
      showResult(file, { error: "larger than the " + (boot.max_upload / 1e6).toFixed(0) + " MB limit" });
      continue;
    }
    await tryOne(file);
  }
}

async function tryOne(file) {
  const card = showResult(file, null);
  let answer;
  try {
    const res = await fetch("/api/predict" + q({ run: state.run }), { method: "POST", body: file });
    answer = await res.json();
  } catch (e) {
    answer = { error: "the server did not answer (" + e + ")" };
  }
  fillAnswer(card, answer);
  if (!answer.error) drawCam(card, file);
}

function showResult(file, answer) {
  const photo = el("img", { class: "photo", alt: file.name || "pasted photo" });
  photo.src = URL.createObjectURL(file);
  const cam = el("img", { class: "cam", alt: "Grad-CAM of " + (file.name || "the photo") });
  cam.hidden = true;
  const card = el("div", { class: "result" }, [
    el("figure", {}, [photo, el("figcaption", { text: "the photo" })]),
    el("figure", { class: "cam-box" }, [cam, el("figcaption", { class: "cam-note", text: "Grad-CAM: waiting for the answer…" })]),
    el("div", { class: "answer" }, [el("div", { class: "name", text: file.name || "pasted photo" }), el("div", { class: "bars", text: "predicting…" })]),
  ]);
  $("results").prepend(card);
  if (answer) fillAnswer(card, answer);
  return card;
}

function fillAnswer(card, answer) {
  const bars = card.querySelector(".bars");
  if (answer.error) {
    bars.replaceChildren(el("div", { class: "error", text: answer.error }));
    card.querySelector(".cam-note").textContent = "";
    return;
  }
  bars.replaceChildren(...answer.top.map((t) => {
    const fill = el("span", { class: "fill" });
    fill.style.width = pct(t.probability);
    return el("div", { class: "bar" }, [el("span", { class: "label", text: t.label, title: t.label }), el("span", { class: "track" }, [fill]),
      el("span", { class: "pct", text: pct(t.probability) })]);
  }));
  card.querySelector(".answer").append(el("div", { class: "latency", text: answer.latency_ms.toFixed(1) + " ms on the server · " + answer.run }));
}

async function drawCam(card, file) {
  const note = card.querySelector(".cam-note");
  note.textContent = "Grad-CAM: drawing (the first one loads the network)…";
  try {
    const res = await fetch("/api/gradcam" + q({ run: state.run }), { method: "POST", body: file });
    if (!res.ok) throw new Error((await res.json()).error);
    const cam = card.querySelector("img.cam");
    cam.src = URL.createObjectURL(await res.blob());
    cam.hidden = false;
    note.textContent = "Grad-CAM: where the network looked, on the centre crop it sees";
  } catch (e) {
    note.textContent = "no Grad-CAM: " + e.message;
  }
}

function setupDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", () => { tryFiles([...$("file").files]); $("file").value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); tryFiles([...e.dataTransfer.files]); });
  document.addEventListener("paste", (e) => {
    const files = [...e.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) tryFiles(files);
  });
}

// ------------------------------------------------------------------------------------------------ mistakes

async function loadMistakes() {
  const res = await fetch("/api/mistakes" + q({ run: state.run }));
  state.mistakes = await res.json();
  state.cell = null;
  const split = $("split");
  split.replaceChildren(...(state.mistakes.splits || []).map((s) => el("option", { value: s.name, text: s.name })));
  const filter = $("class-filter");
  filter.replaceChildren(el("option", { value: "", text: "every class" }), ...state.mistakes.classes.map((c) => el("option", { value: c, text: c })));
  drawMistakes();
}

function currentSplit() {
  return (state.mistakes.splits || []).find((s) => s.name === $("split").value);
}

function drawMistakes() {
  const split = currentSplit();
  if (!split) {
    $("confusion").replaceChildren();
    $("gallery").replaceChildren(el("p", { class: "hint", text: "this run recorded no evaluated photos" }));
    return;
  }
  drawConfusion(split);
  drawGallery(split);
}

function drawConfusion(split) {
  const classes = state.mistakes.classes;
  const table = $("confusion");
  table.replaceChildren(el("tr", {}, [el("th", { text: "true \\ predicted" }), ...classes.map((c) => el("th", { text: c }))]));
  classes.forEach((t, i) => {
    const tr = el("tr", {}, [el("th", { text: t })]);
    classes.forEach((p, j) => {
      const n = split.matrix[i][j];
      const td = el("td", { text: String(n), class: n === 0 ? "zero" : i === j ? "diag" : "off", title: t + " predicted as " + p });
      td.dataset.true = t;
      td.dataset.predicted = p;
      if (state.cell && state.cell.true === t && state.cell.predicted === p) td.classList.add("chosen");
      td.addEventListener("click", () => { state.cell = { true: t, predicted: p }; drawMistakes(); });
      tr.append(td);
    });
    table.append(tr);
  });
}

function drawGallery(split) {
  const cls = $("class-filter").value;
  let shown;
  let note;
  if (state.cell) {
    shown = split.photos.filter((x) => x.true === state.cell.true && x.predicted === state.cell.predicted);
    note = shown.length + " photo(s) of " + state.cell.true + " predicted as " + state.cell.predicted + ", most confident first";
  } else {
    shown = split.photos.filter((x) => x.true !== x.predicted && (!cls || x.true === cls || x.predicted === cls));
    note = shown.length + " error(s)" + (cls ? " involving " + cls : "") + ", most confident first; click a photo for its Grad-CAM";
  }
  shown.sort((a, b) => b.confidence - a.confidence);
  $("gallery-note").textContent = note;
  $("gallery").replaceChildren(...shown.map(card));
}

function card(x) {
  const img = el("img", { alt: x.name, loading: "lazy" });
  img.src = x.photo;
  const run = state.run;
  img.title = "click: Grad-CAM (where the network looked) / the photo";
  img.addEventListener("click", () => {
    img.src = img.src.includes("/api/gradcam") ? x.photo : "/api/gradcam" + q({ run, photo: x.photo });
  });
  const wrong = x.true !== x.predicted;
  return el("figure", { title: x.name }, [img, el("figcaption", {}, [
    el("div", { text: "true: " + x.true }),
    el("div", { class: wrong ? "wrong" : "", text: "predicted: " + x.predicted + " (" + pct(x.confidence) + ")" }),
  ])]);
}

function setupMistakes() {
  $("split").addEventListener("change", () => { state.cell = null; drawMistakes(); });
  $("class-filter").addEventListener("change", () => { state.cell = null; drawMistakes(); });
  $("show-errors").addEventListener("click", () => { state.cell = null; $("class-filter").value = ""; drawMistakes(); });
}

// ------------------------------------------------------------------------------------------------ audit

async function loadAudit() {
  const res = await fetch("/api/audit");
  const { audit } = await res.json();
  if (!audit) return;
  $("audit-section").hidden = false;
  const summary = Object.entries(audit.summary || {}).map(([k, n]) => n + " " + k).join(", ");
  const box = $("audit");
  box.replaceChildren(el("p", { text: summary ? "findings: " + summary : "no findings" }));
  for (const f of audit.findings.slice(0, 200)) {
    const pics = f.photos.map((p) => {
      const fig = el("figure", {}, []);
      if (p.photo) {
        const img = el("img", { alt: p.name, loading: "lazy" });
        img.src = p.photo;
        fig.append(img);
      }
      fig.append(el("figcaption", { text: p.name }));
      return fig;
    });
    const said = [f.kind, f.labels.length ? "labels: " + f.labels.join(", ") : "", f.suggested ? "suggested: " + f.suggested : ""].filter(Boolean);
    box.append(el("div", { class: "finding" }, [el("div", { text: said.join(" · ") }), el("div", { class: "hint", text: f.rule }), el("div", { class: "pics" }, pics)]));
  }
  if (audit.findings.length > 200) box.append(el("p", { class: "hint", text: "… and " + (audit.findings.length - 200) + " more in audit.json" }));
}

setupRuns();
setupDrop();
setupMistakes();
loadMistakes();
loadAudit();

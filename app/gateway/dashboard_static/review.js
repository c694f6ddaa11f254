"use strict";
// The review desk: draws GET /v1/review/queue and posts a reviewer's labels to
// POST /v1/review/{app}/{example}. Every text from the queue enters the page only through
// textContent, never as HTML: the conversations are users' words.

const state = { drawn: 0, posted: 0 };
window.feedloopReview = state;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function field(labelText, input) {
  const label = el("label", labelText + " ");
  label.appendChild(input);
  return label;
}

function turn(role, text, className) {
  const node = el("div", null, "turn " + (className || ""));
  node.appendChild(el("b", role));
  node.appendChild(document.createTextNode(text));
  return node;
}

function why(item) {
  const terms = Object.entries(item.terms || {}).map(([name, value]) => `${name} ${value.toFixed(2)}`);
  const rewards = Object.entries(item.example.rewards)
    .filter(([, value]) => value !== null).map(([name, value]) => `${name} ${value.toFixed(2)}`);
  const threshold = item.threshold === null || item.threshold === undefined ? "" : ` (threshold ${item.threshold.toFixed(2)})`;
  return `Picked with score ${item.score.toFixed(2)}${threshold}` + (terms.length ? `: ${terms.join(", ")}` : "") +
    `. Rewards: ${rewards.join(", ") || "none"}. Feedback: ${item.example.feedback_kinds.join(", ") || "none"}.`;
}

function card(item) {
  const ex = item.example;
  const id = `${ex.app_id}/${ex.example_id}`;
  const article = el("article");
  article.dataset.exampleId = ex.example_id;
  article.dataset.appId = ex.app_id;
  article.setAttribute("aria-label", `Example ${id}`);
  article.appendChild(el("h2", `${id} `)).appendChild(el("small", `${ex.adapter} · ${ex.domain} · ${ex.cohort} · ${ex.occurred_at}`));
  article.appendChild(el("p", why(item), "why"));
  for (const message of ex.prompt) article.appendChild(turn(message.role, message.content));
  article.appendChild(turn("response", ex.response, "response"));
  if (ex.edit) article.appendChild(turn("the user's correction", ex.edit));
  for (const comment of ex.comments) article.appendChild(turn("comment", comment));

  const form = el("form");
  form.setAttribute("aria-label", `Label ${id}`);
  const thumbs = el("fieldset");
  thumbs.appendChild(el("legend", "Thumbs"));
  for (const [value, text] of [["", "none"], ["1", "up"], ["-1", "down"]]) {
    const radio = el("input");
    Object.assign(radio, { type: "radio", name: "thumbs", value, checked: value === "" });
    thumbs.appendChild(field(text, radio));
  }
  form.appendChild(thumbs);
  const rating = el("select");
  rating.name = "rating";
  for (const value of ["", "1", "2", "3", "4", "5"]) rating.appendChild(el("option", value || "none")).value = value;
  form.appendChild(field("Rating (1-5)", rating));
  const correction = el("textarea");
  correction.name = "correction";
  form.appendChild(field("Corrected answer", correction));
  const report = el("textarea");
  report.name = "report";
  form.appendChild(field("Report (why it is harmful or wrong)", report));
  const notes = el("textarea");
  notes.name = "notes";
  form.appendChild(field("Notes (kept with the annotation)", notes));
  const save = el("button", "Save review");
  save.type = "submit";
  form.appendChild(save);
  const problem = el("p", null, "problem");
  problem.setAttribute("role", "alert");
  form.appendChild(problem);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(ex, form, problem);
  });
  article.appendChild(form);
  return article;
}

async function submit(ex, form, problem) {
  const data = new FormData(form);
  const labels = {};
  if (data.get("thumbs")) labels.thumbs = Number(data.get("thumbs"));
  if (data.get("rating")) labels.rating = Number(data.get("rating"));
  for (const name of ["correction", "report", "notes"]) {
    const text = String(data.get(name) || "").trim();
    if (text) labels[name] = text;
  }
  problem.textContent = "";
  const answer = await fetch(`/v1/review/${encodeURIComponent(ex.app_id)}/${encodeURIComponent(ex.example_id)}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(labels),
    credentials: "same-origin",
  });
  if (answer.ok || answer.status === 409) {  // 409: another reviewer was first; it left the queue either way
    await refresh();
    state.posted += 1;  // after the redraw: what a waiting test reads is the queue without it
    return;
  }
  const body = await answer.json().catch(() => ({}));
  problem.textContent = `Not saved (${answer.status}): ${body.detail || answer.statusText}`;
}

async function refresh() {
  const status = document.getElementById("status");
  const answer = await fetch("/v1/review/queue", { credentials: "same-origin" });
  if (!answer.ok) {
    const body = await answer.json().catch(() => ({}));
    status.textContent = `queue unavailable (${answer.status}): ${body.detail || answer.statusText}`;
    status.classList.add("stale");
    return;
  }
  const queue = await answer.json();
  const scope = queue.app_id ? `app ${queue.app_id}` : "every app";
  document.getElementById("title").textContent = `feedloop review desk · ${scope}`;
  status.textContent = `${queue.items.length} waiting · signed in as ${queue.reviewer}`;
  status.classList.remove("stale");
  const main = document.getElementById("queue");
  main.replaceChildren(...queue.items.map(card));
  if (!queue.items.length) main.appendChild(el("p", "Nothing waiting for review.", "empty"));
  state.drawn += 1;
}

// No polling: redrawing the queue would wipe a label being typed. Saving reloads it.
document.getElementById("reload").addEventListener("click", refresh);
refresh();

// The rating page. Model outputs arrive as JSON and enter the DOM only through
// textContent: nothing here parses HTML (the server's Trusted Types policy would
// refuse it anyway).
"use strict";

(() => {
  const POLL_MS = 5000;
  const LABELS = "ABCDEFGHI";
  const $ = (id) => document.getElementById(id);
  const state = { item: null, order: [], scores: [], busy: false, poll: null };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  async function api(method, path, body) {
    const options = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      const error = new Error(data && data.error ? data.error : `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function raterName() { return (localStorage.getItem("rater") || "").trim(); }

  function showCounts(counts) {
    const parts = [];
    if (counts.rated_by_rater !== null) parts.push(`${counts.rated_by_rater} rated by you`);
    if (counts.waiting !== null) parts.push(`${counts.waiting} waiting for you`);
    parts.push(`${counts.ratings} ${counts.ratings === 1 ? "rating" : "ratings"} in all`);
    $("counts").textContent = parts.join(" · ");
  }

  function shuffled(n) {
    // Completions are shown in a random order per item so that position bias
    // does not line up with the producer's order; the order is stored with the rating.
    const order = Array.from({ length: n }, (_, i) => i);
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    return order;
  }

  function metaLine(item) {
    const parts = [`item ${item.id}`];
    if (item.step !== null) parts.push(`step ${item.step}`);
    if (item.example_id !== null) parts.push(`example ${item.example_id}`);
    const why = [];
    if (item.spread !== null) why.push(`reward-model spread ${item.spread.toFixed(2)}`);
    if (item.judge_confidence !== null) why.push(`judge confidence ${item.judge_confidence.toFixed(2)}`);
    parts.push(`priority ${item.priority.toFixed(2)}` + (why.length ? ` (${why.join(", ")})` : ""));
    return parts.join(" · ");
  }

  function completionCard(item, index, position) {
    const card = el("article", "completion");
    card.dataset.index = String(index);
    const head = el("header", "completion-head");
    head.append(el("span", "label", LABELS[position]));
    if (item.mode === "pairwise") head.append(el("span", "hint", `key ${position + 1}`));
    card.append(head);
    const text = item.completions[index];
    const body = el("pre", text ? "text" : "text empty", text || "(empty completion)");
    card.append(body);
    if (item.mode === "pairwise") {
      const choose = el("button", "choose primary", `${LABELS[position]} is better`);
      choose.type = "button";
      choose.addEventListener("click", () => submit({ choice: index }));
      card.append(choose);
    } else {
      const scale = el("div", "scale");
      scale.setAttribute("role", "group");
      scale.setAttribute("aria-label", `score for ${LABELS[position]}`);
      for (let s = item.score_min; s <= item.score_max; s++) {
        const button = el("button", "score", String(s));
        button.type = "button";
        button.setAttribute("aria-pressed", "false");
        button.addEventListener("click", () => {
          state.scores[index] = s;
          for (const other of scale.children) other.setAttribute("aria-pressed", String(other === button));
          $("submit-scores").disabled = state.scores.some((v) => v === null);
        });
        scale.append(button);
      }
      card.append(el("span", "scale-ends", `${item.score_min} worst … ${item.score_max} best`), scale);
    }
    return card;
  }

  function render(item) {
    state.item = item;
    $("welcome").hidden = true;
    $("empty").hidden = item !== null;
    $("item").hidden = item === null;
    if (item === null) return;
    state.order = shuffled(item.completions.length);
    state.scores = item.completions.map(() => null);
    $("meta").textContent = metaLine(item);
    $("prompt").textContent = item.prompt;
    $("instructions").textContent = item.mode === "pairwise"
      ? "Which completion is better?"
      : `Score each completion from ${item.score_min} to ${item.score_max}`;
    const cards = state.order.map((index, position) => completionCard(item, index, position));
    $("completions").replaceChildren(...cards);
    $("submit-scores").hidden = item.mode !== "pointwise";
    $("submit-scores").disabled = true;
    $("keys").textContent = item.mode === "pairwise"
      ? `Keys: 1–${item.completions.length} pick a completion · S skips`
      : "Keys: S skips";
  }

  async function loadNext() {
    clearTimeout(state.poll);
    const rater = raterName();
    if (!rater) {
      $("welcome").hidden = false;
      $("item").hidden = true;
      $("empty").hidden = true;
      $("rater").focus();
      return;
    }
    try {
      const data = await api("GET", `/api/next?rater=${encodeURIComponent(rater)}`);
      showError("");
      showCounts(data.counts);
      render(data.item);
      if (data.item === null) state.poll = setTimeout(loadNext, POLL_MS);
    } catch (error) {
      showError(`Could not load the next item: ${error.message}`);
      state.poll = setTimeout(loadNext, POLL_MS);
    }
  }

  async function submit(fields) {
    if (state.busy || state.item === null) return;
    state.busy = true;
    const body = { item_id: state.item.id, rater: raterName(), order: state.order, ...fields };
    try {
      const data = await api("POST", "/api/ratings", body);
      showError("");
      $("status").textContent = data.rating.skipped
        ? `Skipped item ${data.rating.item_id}.`
        : `Saved rating ${data.rating.id} of item ${data.rating.item_id}.`;
      await loadNext();
    } catch (error) {
      // Already rated (elsewhere) or gone: move on, then say why this one was not saved.
      if (error.status === 409 || error.status === 404) await loadNext();
      showError(`The rating was not saved: ${error.message}`);
    } finally {
      state.busy = false;
    }
  }

  function saveRater() {
    const name = $("rater").value.trim();
    if (!name) { showError("Type your name first."); return; }
    localStorage.setItem("rater", name);
    showError("");
    loadNext();
  }

  function onKey(event) {
    if (event.target instanceof HTMLInputElement || event.ctrlKey || event.metaKey || event.altKey) return;
    const item = state.item;
    if (item === null || $("item").hidden) return;
    if (event.key === "s" || event.key === "S") { submit({ skip: true }); return; }
    const n = Number.parseInt(event.key, 10);
    if (item.mode === "pairwise" && n >= 1 && n <= item.completions.length) submit({ choice: state.order[n - 1] });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("rater").value = raterName();
    $("rater-save").addEventListener("click", saveRater);
    $("rater").addEventListener("keydown", (event) => { if (event.key === "Enter") saveRater(); });
    $("skip").addEventListener("click", () => submit({ skip: true }));
    $("submit-scores").addEventListener("click", () => submit({ scores: state.scores }));
    document.addEventListener("keydown", onKey);
    loadNext();
  });
})();

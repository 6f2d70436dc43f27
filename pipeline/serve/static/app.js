// captioner search page. Plain JavaScript, no build step, no dependencies.
// Everything shown comes from the JSON API (/api/...); text from the index is
// only ever set with textContent, never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, children = []) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  };

  const state = {
    info: null,
    source: { kind: "none" }, // {kind: "query", q, mode} | {kind: "similar", id, uri} | {kind: "image", file, url}
    hits: [],
    more: false,
    request: 0, // id of the newest request; older answers are dropped
    viewerIndex: -1,
  };

  // -- API --------------------------------------------------------------------

  async function api(url, options) {
    const response = await fetch(url, options);
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    return body;
  }

  function filterParams() {
    const params = new URLSearchParams();
    let yesNo = false;
    for (const box of document.querySelectorAll(".probe-filter")) {
      const question = box.dataset.question;
      const picked = box.querySelector("input:checked, select");
      const value = picked ? picked.value : "";
      if (value) {
        params.append("probe", `${question}=${value}`);
        if (box.dataset.kind === "bool") yesNo = true;
      }
    }
    const confidence = Number($("confidence").value);
    if (state.info && state.info.confidence && yesNo && confidence > 0) params.set("confidence", String(confidence));
    const text = document.querySelector('input[name="text"]:checked');
    if (text && text.value) params.set("text", text.value);
    return params;
  }

  function currentMode() {
    const checked = document.querySelector('input[name="mode"]:checked');
    return checked ? checked.value : state.info.default_mode;
  }

  // -- searching ----------------------------------------------------------------

  async function run(reset) {
    const source = state.source;
    if (source.kind === "none") return;
    const offset = reset ? 0 : state.hits.length;
    const params = filterParams();
    params.set("offset", String(offset));
    params.set("limit", String(state.info.page_size));
    let url;
    let options;
    if (source.kind === "query") {
      params.set("q", source.q);
      params.set("mode", source.mode);
      url = `/api/search?${params}`;
    } else if (source.kind === "similar") {
      url = `/api/images/${source.id}/similar?${params}`;
    } else {
      url = `/api/search/image?${params}`;
      options = { method: "POST", body: source.file, headers: { "Content-Type": source.file.type || "application/octet-stream" } };
    }
    const request = ++state.request;
    const started = performance.now();
    $("grid").setAttribute("aria-busy", "true");
    setStatus(reset ? "Searching…" : "Loading more…");
    try {
      const page = await api(url, options);
      if (request !== state.request) return;
      if (await noticeRefresh(page.index)) {
        if (request !== state.request) return;
        // Ids of the old index mean nothing in the new one: start this search again, from the top.
        if (!reset) { run(true); return; }
      }
      if (reset) {
        state.hits = [];
        $("grid").replaceChildren();
        window.scrollTo({ top: 0 });
      }
      const first = state.hits.length;
      state.hits.push(...page.hits);
      state.more = page.more;
      $("grid").append(...page.hits.map((hit, n) => card(hit, first + n)));
      $("more").hidden = !page.more;
      const took = Math.round(performance.now() - started);
      setStatus(state.hits.length
        ? `${state.hits.length}${page.more ? "+" : ""} results · ${describeSource()} · ${took} ms`
        : `No matches · ${describeSource()}`);
      if (!reset && page.hits.length) focusCard(first);
    } catch (error) {
      if (request !== state.request) return;
      setStatus(error.message, true);
      if (reset) { state.hits = []; $("grid").replaceChildren(); $("more").hidden = true; }
    } finally {
      if (request === state.request) $("grid").removeAttribute("aria-busy");
    }
  }

  // -- a rebuilt index ----------------------------------------------------------

  // Every search answer says which index answered it (its generation). When
  // the server has reopened a rebuilt index file, take the new index's facts
  // (and filters, when they changed) and say so; true when that happened.
  async function noticeRefresh(facts) {
    if (!facts || !state.info || facts.generation === state.info.generation) return false;
    let info;
    try {
      info = await api("/api/info");
    } catch (_) {
      return false;
    }
    const filtersDiffer = JSON.stringify([info.probes, info.confidence]) !== JSON.stringify([state.info.probes, state.info.confidence]);
    state.info = info;
    if (filtersDiffer) buildFilters(info);
    showFacts(info);
    const notice = $("refreshed");
    notice.textContent = `index refreshed: ${info.searchable_rows.toLocaleString()} images`;
    notice.title = `the index file was rebuilt (${info.built_at}) and reopened by the server`;
    notice.hidden = false;
    return true;
  }

  function showFacts(info) {
    $("facts").textContent = `${info.index}: ${info.searchable_rows.toLocaleString()} searchable images` +
      (info.embed_model ? `, embeddings from ${info.embed_model}` : ", no embeddings");
  }

  function describeSource() {
    const s = state.source;
    if (s.kind === "query") return `${s.mode} “${s.q}”`;
    if (s.kind === "similar") return `like ${basename(s.uri)}`;
    return `like the dropped image`;
  }

  function setStatus(text, isError = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function scoreLabel() {
    const s = state.source;
    if (s.kind === "query" && s.mode === "text") return "BM25 score";
    if (s.kind === "query" && s.mode === "hybrid") return "reciprocal-rank-fusion score";
    return "cosine similarity";
  }

  function card(hit, index) {
    const img = el("img", { src: hit.thumb, alt: hit.caption || basename(hit.uri), loading: "lazy", decoding: "async", width: "320", height: "320" });
    const button = el("button", { type: "button", class: "card", "data-index": String(index), title: hit.uri }, [
      el("span", { class: "thumb" }, [
        img,
        el("span", { class: "rank", text: `#${hit.rank}` }),
        el("span", { class: "score", title: scoreLabel(), text: formatScore(hit.score) }),
      ]),
      el("p", { class: "cap", text: hit.caption || basename(hit.uri) }),
    ]);
    button.addEventListener("click", () => openViewer(index));
    return el("li", {}, [button]);
  }

  function formatScore(score) {
    return Math.abs(score) < 0.1 ? score.toFixed(4) : score.toFixed(3);
  }

  function basename(uri) {
    return String(uri).split(/[\\/]/).pop();
  }

  function startQuery(event) {
    if (event) event.preventDefault();
    const q = $("q").value.trim();
    if (!q) { $("q").focus(); return; }
    state.source = { kind: "query", q, mode: currentMode() };
    showBanner();
    saveUrl();
    run(true);
  }

  function startSimilar(hit) {
    state.source = { kind: "similar", id: hit.id, uri: hit.uri };
    showBanner(`/api/images/${hit.id}/thumb?size=s`, `More like ${basename(hit.uri)}`);
    saveUrl();
    run(true).then(() => focusCard(0));
  }

  function startImage(file) {
    if (!file) return;
    if (state.info.modes.indexOf("semantic") < 0) {
      setStatus(state.info.semantic_error || "this index cannot search by image", true);
      return;
    }
    if (state.source.kind === "image") URL.revokeObjectURL(state.source.url);
    const url = URL.createObjectURL(file);
    state.source = { kind: "image", file, url };
    showBanner(url, `Images like ${file.name || "the dropped image"}`);
    saveUrl();
    run(true);
  }

  function showBanner(thumb, text) {
    const banner = $("source-banner");
    banner.hidden = !thumb;
    if (thumb) {
      $("source-thumb").src = thumb;
      $("source-text").textContent = text;
    }
  }

  function saveUrl() {
    const s = state.source;
    const params = new URLSearchParams();
    if (s.kind === "query") { params.set("q", s.q); params.set("mode", s.mode); }
    if (s.kind === "similar") params.set("like", String(s.id));
    const query = params.toString();
    history.replaceState(null, "", query ? `?${query}` : location.pathname);
  }

  // -- filters ----------------------------------------------------------------

  function buildFilters(info) {
    const box = $("probe-filters");
    box.replaceChildren();
    info.probes.forEach((probe, n) => {
      const fieldset = el("fieldset", { class: "probe-filter", "data-question": probe.question, "data-kind": probe.kind });
      fieldset.append(el("legend", { text: probe.question }));
      if (probe.kind === "bool") {
        const group = el("div", { class: "choices" });
        for (const [value, label] of [["", "any"], ["yes", "yes"], ["no", "no"]]) {
          const input = el("input", { type: "radio", name: `probe-${n}`, value, "aria-label": `${probe.question} ${label}` });
          if (!value) input.checked = true;
          input.addEventListener("change", filtersChanged);
          group.append(el("label", {}, [input, el("span", { text: label })]));
        }
        fieldset.append(group);
      } else {
        const select = el("select", { "aria-label": probe.question });
        select.append(el("option", { value: "", text: "any" }));
        for (const answer of probe.answers) select.append(el("option", { value: answer, text: answer }));
        select.addEventListener("change", filtersChanged);
        fieldset.append(select);
      }
      box.append(fieldset);
    });
    if (!info.probes.length) box.append(el("p", { class: "muted", text: "This index has no probe answers." }));
    $("confidence-box").hidden = !info.confidence;
    $("reset-filters").hidden = !info.probes.length;
  }

  function filtersChanged() {
    if (state.source.kind !== "none") run(true);
  }

  function resetFilters() {
    for (const input of document.querySelectorAll('.probe-filter input[value=""]')) input.checked = true;
    for (const select of document.querySelectorAll(".probe-filter select")) select.value = "";
    $("confidence").value = "0";
    document.querySelector('input[name="text"][value=""]').checked = true;
    $("confidence-out").textContent = "off";
    filtersChanged();
  }

  // -- the image view -------------------------------------------------------------

  async function openViewer(index) {
    const hit = state.hits[index];
    if (!hit) return;
    state.viewerIndex = index;
    const dialog = $("viewer");
    $("viewer-title").textContent = basename(hit.uri);
    $("viewer-caption").textContent = hit.caption || "";
    $("viewer-img").src = `/api/images/${hit.id}/thumb?size=l&v=${new URL(hit.thumb, location.href).searchParams.get("v") || ""}`;
    $("viewer-img").alt = hit.caption || basename(hit.uri);
    $("viewer-prev").disabled = index === 0;
    $("viewer-next").disabled = index >= state.hits.length - 1 && !state.more;
    if (!dialog.open) dialog.showModal();
    try {
      const row = await api(`/api/images/${hit.id}`);
      if (state.viewerIndex !== index) return;
      fillViewer(row);
    } catch (error) {
      $("viewer-caption").textContent = error.message;
    }
  }

  function fillViewer(row) {
    $("viewer-caption").textContent = row.caption || (row.error ? `(error: ${row.error})` : "(no caption)");
    const body = $("viewer-probes").tBodies[0];
    body.replaceChildren();
    for (const probe of row.probes) {
      const answer = el("td");
      const cls = probe.answer_bool === true ? "answer-yes" : probe.answer_bool === false ? "answer-no" : "";
      answer.append(el("span", { class: cls, text: probe.answer ?? "" }));
      if (typeof probe.yes_prob === "number") {
        answer.append(" ", el("span", { class: "prob", title: "probability of yes", text: `p(yes) ${probe.yes_prob.toFixed(2)}` }));
      }
      body.append(el("tr", {}, [el("td", { text: probe.question }), answer]));
    }
    $("viewer-probes").hidden = !row.probes.length;
    // The text OCR read in the image, line by line (white-space: pre-line keeps its lines).
    $("viewer-text").textContent = row.text || "";
    $("viewer-text").hidden = !row.text;
    const facts = $("viewer-facts");
    facts.replaceChildren();
    const size = [row.width && row.height ? `${row.width} × ${row.height}` : null, row.bytes != null ? formatBytes(row.bytes) : null, row.format]
      .filter(Boolean).join(" · ");
    for (const [name, value] of [["uri", row.uri], ["size", size], ["status", row.status + (row.error_kind ? ` (${row.error_kind})` : "")],
                                 ["id", String(row.id)], ["sha256", row.image_id || ""]]) {
      if (value) facts.append(el("dt", { text: name }), el("dd", { text: value }));
    }
    const like = $("viewer-like");
    like.disabled = !row.has_embedding || !state.info.similar;
    like.title = like.disabled ? "this image has no stored embedding" : "images nearest to this one's stored embedding";
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 ** 2).toFixed(1)} MB`;
  }

  async function step(delta) {
    const next = state.viewerIndex + delta;
    if (next < 0) return;
    if (next >= state.hits.length) {
      if (!state.more) return;
      await run(false);
    }
    openViewer(next);
  }

  function closeViewer() {
    const dialog = $("viewer");
    if (dialog.open) dialog.close();
  }

  // -- keyboard -----------------------------------------------------------------

  function focusCard(index) {
    const button = document.querySelector(`.card[data-index="${index}"]`);
    if (button) button.focus();
  }

  function gridColumns() {
    const cards = document.querySelectorAll(".card");
    if (cards.length < 2) return 1;
    const top = cards[0].getBoundingClientRect().top;
    let n = 0;
    for (const c of cards) { if (c.getBoundingClientRect().top !== top) break; n++; }
    return Math.max(1, n);
  }

  function onGridKey(event) {
    const current = event.target.closest(".card");
    if (!current) return;
    const index = Number(current.dataset.index);
    const columns = gridColumns();
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const target = index + moves[event.key];
    if (target >= 0 && target < state.hits.length) focusCard(target);
    else if (target >= state.hits.length && state.more) run(false).then(() => focusCard(Math.min(target, state.hits.length - 1)));
  }

  function onKey(event) {
    const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(event.target.tagName) && event.target.type !== "radio" && event.target.type !== "range";
    if ($("viewer").open) {
      if (event.key === "ArrowRight") { event.preventDefault(); step(1); }
      else if (event.key === "ArrowLeft") { event.preventDefault(); step(-1); }
      else if ((event.key === "l" || event.key === "L") && !$("viewer-like").disabled) { event.preventDefault(); $("viewer-like").click(); }
      return;
    }
    if (event.key === "/" && !typing) { event.preventDefault(); $("q").focus(); $("q").select(); }
  }

  // -- drag and drop --------------------------------------------------------------

  function setupDrop() {
    let depth = 0;
    const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
    document.addEventListener("dragenter", (event) => { if (hasFiles(event)) { depth++; $("drop-zone").hidden = false; } });
    document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) $("drop-zone").hidden = true; });
    document.addEventListener("dragover", (event) => { if (hasFiles(event)) event.preventDefault(); });
    document.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth = 0;
      $("drop-zone").hidden = true;
      startImage(event.dataTransfer.files[0]);
    });
  }

  // -- start --------------------------------------------------------------------

  async function init() {
    let info;
    try {
      info = await api("/api/info");
    } catch (error) {
      setStatus(`cannot reach the server: ${error.message}`, true);
      return;
    }
    state.info = info;
    for (const input of document.querySelectorAll('input[name="mode"]')) {
      const available = info.modes.includes(input.value);
      input.disabled = !available;
      if (!available) input.parentElement.title = info.semantic_error || "not available for this index";
      input.checked = input.value === info.default_mode;
      input.addEventListener("change", () => { if (state.source.kind === "query" && $("q").value.trim()) startQuery(); });
    }
    $("file-label").hidden = !info.modes.includes("semantic");
    buildFilters(info);
    showFacts(info);

    $("search-form").addEventListener("submit", startQuery);
    $("more").addEventListener("click", () => run(false));
    $("grid").addEventListener("keydown", onGridKey);
    document.addEventListener("keydown", onKey);
    $("file").addEventListener("change", (event) => { startImage(event.target.files[0]); event.target.value = ""; });
    $("source-clear").addEventListener("click", () => { showBanner(); if ($("q").value.trim()) startQuery(); else { state.source = { kind: "none" }; saveUrl(); } $("q").focus(); });
    $("reset-filters").addEventListener("click", resetFilters);
    $("confidence").addEventListener("input", () => {
      const value = Number($("confidence").value);
      $("confidence-out").textContent = value > 0 ? value.toFixed(2) : "off";
    });
    $("confidence").addEventListener("change", filtersChanged);
    for (const input of document.querySelectorAll('input[name="text"]')) input.addEventListener("change", filtersChanged);
    $("viewer-close").addEventListener("click", closeViewer);
    $("viewer-prev").addEventListener("click", () => step(-1));
    $("viewer-next").addEventListener("click", () => step(1));
    $("viewer-like").addEventListener("click", () => {
      const hit = state.hits[state.viewerIndex];
      closeViewer();
      if (hit) startSimilar(hit);
    });
    $("viewer").addEventListener("close", () => focusCard(state.viewerIndex));
    $("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) closeViewer(); });
    setupDrop();

    const params = new URLSearchParams(location.search);
    const mode = params.get("mode");
    if (mode && info.modes.includes(mode)) document.querySelector(`input[name="mode"][value="${mode}"]`).checked = true;
    if (params.get("like") && /^\d+$/.test(params.get("like"))) {
      startSimilar({ id: Number(params.get("like")), uri: `image ${params.get("like")}` });
    } else if (params.get("q")) {
      $("q").value = params.get("q");
      startQuery();
    } else {
      setStatus("Type a query, or drop an image anywhere on the page.");
    }
  }

  document.addEventListener("DOMContentLoaded", init);
})();

// Rater page. Text from the server (prompt, answers) is only ever set with textContent.
(() => {
  "use strict";
  const TOKEN = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
  const DIMS = ["accuracy", "completeness", "logic", "fluency"];
  const FIELDS = ["1", "2"].flatMap((s) => DIMS.map((d) => s + "." + d)).concat(["preference"]);
  const STRINGS = {
    en: {
      title: "Blind comparison", prompt: "Prompt", answer1: "Answer 1", answer2: "Answer 2",
      accuracy: "Accuracy", completeness: "Completeness", logic: "Logic", fluency: "Fluency",
      preference: "Overall, which answer is better?", prefer1: "Answer 1", prefer2: "Answer 2",
      tie: "Tie", comment: "Comment (optional)", prev: "← Previous", next: "Next →",
      submit: "Save and continue (Enter)", switchTo: "中文",
      progress: (i, n, d) => `Item ${i} of ${n} · ${d} rated`,
      saved: "Saved.", missing: (f) => `Please rate: ${f}.`, failed: (m) => `Not saved: ${m}`,
      finishedTitle: "All items rated — thank you!",
      finishedText: "Your ratings are saved. You can still review and change them.",
      review: "Review my ratings", fatal: "This link is not valid or the server is unreachable.",
      scale: "1 = poor, 5 = excellent",
      help: "Keys: 1–5 score the highlighted row and move on · ↑/↓ choose a row · ←/→ lower/raise (from 3)" +
        " · on the last row 1, 2 or 0 (tie) · Enter saves and continues · PageUp/PageDown previous/next" +
        " · c comment (Esc leaves it, Ctrl+Enter saves)",
    },
    zh: {
      title: "盲评对比", prompt: "问题", answer1: "回答 1", answer2: "回答 2",
      accuracy: "准确性", completeness: "完整性", logic: "逻辑性", fluency: "流畅性",
      preference: "总体来看，哪个回答更好？", prefer1: "回答 1", prefer2: "回答 2",
      tie: "不相上下", comment: "评语（可选）", prev: "← 上一题", next: "下一题 →",
      submit: "保存并继续（Enter）", switchTo: "English",
      progress: (i, n, d) => `第 ${i} / ${n} 题 · 已评 ${d} 题`,
      saved: "已保存。", missing: (f) => `请评分：${f}。`, failed: (m) => `未保存：${m}`,
      finishedTitle: "全部评完，谢谢！",
      finishedText: "评分已保存。您仍可回看并修改。",
      review: "回看我的评分", fatal: "链接无效或无法连接服务器。",
      scale: "1 = 很差，5 = 很好",
      help: "快捷键：1–5 为高亮行打分并跳到下一行 · ↑/↓ 选择行 · ←/→ 降低/提高分数（从 3 开始）" +
        " · 最后一行按 1、2 或 0（不相上下）· Enter 保存并继续 · PageUp/PageDown 上一题/下一题" +
        " · c 写评语（Esc 退出，Ctrl+Enter 保存）",
    },
  };

  const $ = (id) => document.getElementById(id);
  let lang = localStorage.getItem("blind.lang") || (document.documentElement.lang === "zh" ? "zh" : "en");
  let state = null;      // {total, done, next, items: [{item_id, done}]}
  let pos = 0;           // index into state.items
  let values = {};       // field -> "1".."5" | "1" | "2" | "tie"
  let focus = 0;         // index into FIELDS
  let busy = false;

  const t = (key, ...args) => {
    const s = STRINGS[lang][key];
    return typeof s === "function" ? s(...args) : s;
  };

  async function api(method, path, body) {
    const res = await fetch(path, {
      method, cache: "no-store",
      headers: Object.assign({ Authorization: "Bearer " + TOKEN },
        body ? { "Content-Type": "application/json" } : {}),
      body: body ? JSON.stringify(body) : undefined,
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || res.status + " " + res.statusText);
    return data;
  }

  function buildScores() {
    for (const slot of ["1", "2"]) {
      const box = $("scores-" + slot);
      for (const dim of DIMS) {
        const fs = document.createElement("fieldset");
        fs.className = "field";
        fs.dataset.field = slot + "." + dim;
        const legend = document.createElement("legend");
        legend.dataset.i18n = dim;
        fs.appendChild(legend);
        for (let v = 1; v <= 5; v++) {
          const label = document.createElement("label");
          const input = document.createElement("input");
          input.type = "radio";
          input.name = "f-" + slot + "-" + dim;
          input.value = String(v);
          label.appendChild(input);
          label.appendChild(document.createTextNode(" " + v));
          fs.appendChild(label);
        }
        box.appendChild(fs);
      }
      const scale = document.createElement("p");
      scale.className = "scale";
      scale.dataset.i18n = "scale";
      box.appendChild(scale);
    }
    document.querySelectorAll("fieldset.field").forEach((fs) => {
      fs.addEventListener("change", (e) => {
        values[fs.dataset.field] = e.target.value;
        setFocus(FIELDS.indexOf(fs.dataset.field));
      });
      fs.addEventListener("click", () => setFocus(FIELDS.indexOf(fs.dataset.field)));
    });
  }

  function applyLanguage() {
    document.documentElement.lang = lang;
    document.title = t("title");
    document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
    $("lang-switch").textContent = t("switchTo");
    renderProgress();
  }

  function renderProgress() {
    if (!state) return;
    $("progress").textContent = t("progress", pos + 1, state.total, state.done);
    $("progress-bar").max = state.total;
    $("progress-bar").value = state.done;
  }

  function renderValues() {
    for (const f of FIELDS) {
      const name = f === "preference" ? "preference" : "f-" + f.replace(".", "-");
      document.querySelectorAll(`input[name="${name}"]`).forEach((r) => { r.checked = r.value === values[f]; });
    }
  }

  function setFocus(i) {
    focus = Math.max(0, Math.min(FIELDS.length - 1, i));
    document.querySelectorAll("fieldset.field").forEach((fs) => {
      fs.classList.toggle("current", fs.dataset.field === FIELDS[focus]);
    });
  }

  function status(msg, kind) {
    $("status").textContent = msg || "";
    $("status").className = kind || "";
  }

  async function show(i) {
    pos = (i + state.total) % state.total;
    const item = await api("GET", "/api/rater/items/" + encodeURIComponent(state.items[pos].item_id));
    $("prompt").textContent = item.prompt;
    $("answer-1").textContent = item.answers[0].text;
    $("answer-2").textContent = item.answers[1].text;
    const r = item.rating;
    values = {};
    if (r) {
      for (const d of DIMS) { values["1." + d] = String(r.answer1[d]); values["2." + d] = String(r.answer2[d]); }
      values.preference = r.preference;
    }
    $("comment").value = r ? r.comment : "";
    renderValues();
    setFocus(r ? FIELDS.length - 1 : 0);
    $("finished").hidden = true;
    $("rating").hidden = false;
    status("");
    renderProgress();
    window.scrollTo(0, 0);
  }

  function go(i) {
    show(i).catch((e) => status(t("failed", e.message), "error"));
  }

  function finished() {
    $("rating").hidden = true;
    $("finished").hidden = false;
    renderProgress();
  }

  async function submit() {
    if (busy) return;
    const missing = FIELDS.filter((f) => !values[f]);
    if (missing.length) {
      setFocus(FIELDS.indexOf(missing[0]));
      const names = missing.map((f) => f === "preference" ? t("preference")
        : t("answer" + f[0]) + " " + t(f.slice(2)));
      status(t("missing", names.join(", ")), "error");
      return;
    }
    const score = (s) => Object.fromEntries(DIMS.map((d) => [d, Number(values[s + "." + d])]));
    busy = true;
    try {
      const res = await api("PUT", "/api/rater/items/" + encodeURIComponent(state.items[pos].item_id) + "/rating", {
        answer1: score("1"), answer2: score("2"), preference: values.preference, comment: $("comment").value,
      });
      state.items[pos].done = true;
      state.done = res.done;
      status(t("saved"), "ok");
      const after = state.items.findIndex((it, k) => k > pos && !it.done);
      const next = after >= 0 ? after : state.items.findIndex((it) => !it.done);
      if (next >= 0) await show(next);
      else finished();
    } catch (e) {
      status(t("failed", e.message), "error");
    } finally {
      busy = false;
    }
  }

  function step(delta) {
    const f = FIELDS[focus];
    if (f === "preference") {
      const order = ["1", "tie", "2"];
      const k = order.indexOf(values[f]);
      values[f] = order[Math.max(0, Math.min(2, k < 0 ? 1 : k + delta))];
    } else {
      const v = Number(values[f] || 3 - delta);
      values[f] = String(Math.max(1, Math.min(5, v + delta)));
    }
    renderValues();
  }

  function onKey(e) {
    if (busy || $("rating").hidden) return;
    if (e.target.id === "comment") {
      if (e.key === "Escape") e.target.blur();
      else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); }
      return;
    }
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    const f = FIELDS[focus];
    let handled = true;
    if (f === "preference" && ["1", "2", "0", "3", "t"].includes(e.key)) {
      values.preference = e.key === "1" || e.key === "2" ? e.key : "tie";
      renderValues();
    } else if (f !== "preference" && /^[1-5]$/.test(e.key)) {
      values[f] = e.key;
      renderValues();
      setFocus(focus + 1);
    } else if (e.key === "ArrowDown") setFocus(focus + 1);
    else if (e.key === "ArrowUp") setFocus(focus - 1);
    else if (e.key === "ArrowRight") step(1);
    else if (e.key === "ArrowLeft") step(-1);
    else if (e.key === "Enter") submit();
    else if (e.key === "PageDown") go(pos + 1);
    else if (e.key === "PageUp") go(pos - 1);
    else if (e.key === "c") $("comment").focus();
    else handled = false;
    if (handled) e.preventDefault();
  }

  async function start() {
    buildScores();
    applyLanguage();
    $("lang-switch").addEventListener("click", () => {
      lang = lang === "zh" ? "en" : "zh";
      localStorage.setItem("blind.lang", lang);
      applyLanguage();
    });
    $("submit").addEventListener("click", submit);
    $("prev").addEventListener("click", () => go(pos - 1));
    $("next").addEventListener("click", () => go(pos + 1));
    $("review").addEventListener("click", () => go(0));
    document.addEventListener("keydown", onKey);
    try {
      state = await api("GET", "/api/rater/state");
      if (state.next === null) finished();
      else await show(state.items.findIndex((it) => it.item_id === state.next));
    } catch (e) {
      $("fatal").textContent = t("fatal") + " (" + e.message + ")";
      $("fatal").hidden = false;
    }
  }

  start();
})();

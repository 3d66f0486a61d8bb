// stevedore dashboard: local times, the task page's live log and status, the overview's
// charts. Plain script, no build step; htmx and Chart.js are served beside it.
"use strict";

(function () {
  // === times and durations ===

  const pad = (n) => String(n).padStart(2, "0");

  function localTime(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return iso;
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
      `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  }

  function humanDuration(ms) {
    if (ms < 1000) return `${ms} ms`;
    const seconds = ms / 1000;
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  function prettify(root) {
    root.querySelectorAll("time[datetime]").forEach((node) => {
      node.title = node.getAttribute("datetime");
      node.textContent = localTime(node.getAttribute("datetime"));
    });
    root.querySelectorAll(".duration[data-ms]").forEach((node) => {
      node.textContent = humanDuration(Number(node.dataset.ms));
    });
  }

  // === the task page ===

  function setStatus(status) {
    const badge = document.getElementById("task-status");
    if (!badge) return;
    badge.textContent = status;
    badge.className = `badge status-${status}`;
  }

  function setProgress(percent, msg) {
    const bar = document.getElementById("task-progress");
    if (bar && percent !== null && percent !== undefined) {
      bar.value = percent;
      bar.hidden = false;
    }
    const text = document.getElementById("task-msg");
    if (text && msg) text.textContent = msg;
  }

  function showFinished(task) {
    setStatus(task.status);
    const fields = {
      start_time: task.start_time && `<time datetime="${task.start_time}"></time>`,
      end_time: task.end_time && `<time datetime="${task.end_time}"></time>`,
      duration: task.duration !== null && task.duration !== undefined &&
        `<span class="duration" data-ms="${Number(task.duration)}"></span>`,
      exit_code: task.exit_code !== null && task.exit_code !== undefined && String(Number(task.exit_code)),
      peak_memory_bytes: task.peak_memory_bytes && `${Number(task.peak_memory_bytes)} bytes`,
      cpu_time_ms: task.cpu_time_ms && `${Number(task.cpu_time_ms)} ms`,
    };
    for (const [field, html] of Object.entries(fields)) {
      const node = document.querySelector(`[data-field="${field}"]`);
      if (node && html) node.innerHTML = html;
    }
    const msg = document.getElementById("task-msg");
    if (msg) msg.textContent = task.msg || "";
    document.querySelectorAll("[data-while=live]").forEach((node) => { node.hidden = true; });
    document.querySelectorAll("[data-while=finished]").forEach((node) => { node.hidden = false; });
    prettify(document);
  }

  function followTask(section) {
    const log = document.getElementById("task-log");
    const state = document.getElementById("log-state");
    const source = new EventSource(section.dataset.events);
    const stickToBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    state.textContent = "live";
    source.addEventListener("log", (event) => {
      const data = JSON.parse(event.data);
      const follow = stickToBottom();
      log.append(document.createTextNode(data.text));
      if (follow) log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("status", (event) => {
      const data = JSON.parse(event.data);
      setStatus(data.status);
      setProgress(data.percent, data.msg);
    });
    source.addEventListener("end", (event) => {
      source.close();
      showFinished(JSON.parse(event.data));
      state.textContent = log.textContent.length ? "" : "the task printed nothing";
    });
    // EventSource reconnects by itself and resumes after the last offset it got.
    source.onerror = () => { state.textContent = "reconnecting…"; };
    source.onopen = () => { state.textContent = "live"; };
  }

  // === start ===

  document.addEventListener("DOMContentLoaded", () => {
    prettify(document);
    const task = document.getElementById("task");
    if (task) followTask(task);
    const charts = document.getElementById("charts");
    if (charts && window.stevedoreCharts) window.stevedoreCharts(charts);
  });
  document.addEventListener("htmx:afterSwap", (event) => prettify(event.target));
})();

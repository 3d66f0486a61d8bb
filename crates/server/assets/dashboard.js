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

  function humanBytes(count) {
    if (count < 1024) return `${count} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = count / 1024;
    let unit = 0;
    while (value >= 1024 && unit + 1 < units.length) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(1)} ${units[unit]}`;
  }

  function prettify(root) {
    root.querySelectorAll("time[datetime]").forEach((node) => {
      node.title = node.getAttribute("datetime");
      node.textContent = localTime(node.getAttribute("datetime"));
    });
    root.querySelectorAll(".duration[data-ms]").forEach((node) => {
      node.textContent = humanDuration(Number(node.dataset.ms));
    });
    root.querySelectorAll(".bytes[data-bytes]").forEach((node) => {
      node.title = `${node.dataset.bytes} bytes`;
      node.textContent = humanBytes(Number(node.dataset.bytes));
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
      peak_memory_bytes: task.peak_memory_bytes &&
        `<span class="bytes" data-bytes="${Number(task.peak_memory_bytes)}"></span>`,
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

  // === the overview's charts ===

  // Each window asks for buckets fine enough to show its shape and few enough to draw.
  const WINDOWS = {
    "1h": { seconds: 3600, bucket: "minute" },
    "24h": { seconds: 86400, bucket: "hour" },
    "7d": { seconds: 7 * 86400, bucket: "hour" },
    "30d": { seconds: 30 * 86400, bucket: "day" },
  };
  const COLORS = {
    complete: "#1a7f37", failures: "#cf222e", error: "#cf222e", timeout: "#bc4c00",
    cancelled: "#8c959f", queued: "#d4a72c", preparing: "#54aeff", running: "#1f6feb",
  };
  const PALETTE = ["#1f6feb", "#8250df", "#1a7f37", "#bf3989", "#bc4c00", "#0a7ea4", "#6e7781", "#d4a72c"];

  function bucketLabel(iso, bucketSecs) {
    const date = new Date(iso);
    if (bucketSecs >= 86400) return `${date.getMonth() + 1}-${pad(date.getDate())}`;
    if (bucketSecs >= 3600 && bucketSecs * 48 > 86400) {
      return `${date.getMonth() + 1}-${pad(date.getDate())} ${pad(date.getHours())}:00`;
    }
    return `${pad(date.getHours())}:${pad(date.getMinutes())}`;
  }

  function humanSeconds(seconds) {
    return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : humanDuration(Math.round(seconds * 1000));
  }

  function setTotals(report) {
    const set = (name, text) => {
      const node = document.querySelector(`[data-total="${name}"]`);
      if (node) node.textContent = text;
    };
    set("tasks", String(report.totals.tasks));
    set("failures", String(report.totals.failures));
    set("compute", humanSeconds(report.totals.compute_seconds));
    const wait = report.queue_wait;
    set("wait", wait.samples ? `${humanDuration(wait.p50_ms)} / ${humanDuration(wait.p99_ms)}` : "no starts");
  }

  function chartData(report) {
    const labels = report.buckets.map((bucket) => bucketLabel(bucket.start, report.bucket_secs));
    const series = (pick) => report.buckets.map(pick);
    const statuses = ["queued", "preparing", "running", "complete", "error", "timeout", "cancelled"]
      .filter((status) => report.status_mix[status] > 0);
    const stackNames = report.stacks.map((stack) => stack.stack);
    return {
      throughput: {
        labels,
        datasets: ["complete", "failures", "cancelled"].map((outcome) => ({
          label: outcome, data: series((bucket) => bucket.totals[outcome]),
          backgroundColor: COLORS[outcome], stack: "tasks",
        })),
      },
      status: {
        labels: statuses,
        datasets: [{
          data: statuses.map((status) => report.status_mix[status]),
          backgroundColor: statuses.map((status) => COLORS[status]),
        }],
      },
      stacks: {
        labels,
        datasets: stackNames.map((name, index) => ({
          label: name,
          data: series((bucket) => {
            const found = bucket.stacks.find((stack) => stack.stack === name);
            return found ? Number(found.compute_seconds.toFixed(3)) : 0;
          }),
          backgroundColor: PALETTE[index % PALETTE.length], stack: "compute",
        })),
      },
      wait: {
        labels,
        datasets: [
          { label: "p50 (ms)", data: series((bucket) => bucket.queue_wait.p50_ms), borderColor: "#1f6feb", backgroundColor: "#1f6feb" },
          { label: "p99 (ms)", data: series((bucket) => bucket.queue_wait.p99_ms), borderColor: "#cf222e", backgroundColor: "#cf222e" },
        ],
      },
    };
  }

  const CHART_TYPES = { throughput: "bar", status: "doughnut", stacks: "bar", wait: "line" };

  function chartOptions(name) {
    const options = { responsive: true, maintainAspectRatio: false, animation: false, plugins: { legend: { position: "bottom" } } };
    if (name === "throughput" || name === "stacks") {
      options.scales = { x: { stacked: true }, y: { stacked: true, beginAtZero: true } };
    }
    if (name === "stacks") options.scales.y.title = { display: true, text: "compute seconds" };
    if (name === "wait") {
      options.spanGaps = true;
      options.scales = { y: { beginAtZero: true, title: { display: true, text: "milliseconds" } } };
    }
    return options;
  }

  window.stevedoreCharts = function (section) {
    const drawn = {};
    const select = document.getElementById("window-select");
    const problem = document.getElementById("usage-error");
    async function refresh() {
      const choice = WINDOWS[select.value] || WINDOWS["24h"];
      const from = Math.floor(Date.now() / 1000) - choice.seconds;
      const response = await fetch(`${section.dataset.usage}?from=${from}&bucket=${choice.bucket}`, { credentials: "same-origin" });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        problem.textContent = `The usage report failed: ${body.msg || response.status}`;
        problem.hidden = false;
        return;
      }
      problem.hidden = true;
      const report = await response.json();
      setTotals(report);
      const data = chartData(report);
      for (const name of Object.keys(CHART_TYPES)) {
        if (drawn[name]) {
          drawn[name].data = data[name];
          drawn[name].update();
        } else {
          const canvas = document.getElementById(`chart-${name}`);
          drawn[name] = new window.Chart(canvas, { type: CHART_TYPES[name], data: data[name], options: chartOptions(name) });
        }
      }
      section.dataset.loaded = "true";
    }
    select.addEventListener("change", refresh);
    refresh();
    setInterval(refresh, 15000);
  };

  // === start ===

  document.addEventListener("DOMContentLoaded", () => {
    prettify(document);
    const task = document.getElementById("task");
    // A log that retention removed has nothing to follow; the page says so.
    if (task && task.dataset.events) followTask(task);
    const charts = document.getElementById("charts");
    if (charts && window.stevedoreCharts) window.stevedoreCharts(charts);
  });
  // Content htmx swaps in (the task rows, the clusters) gets the same treatment.
  document.addEventListener("htmx:load", (event) => prettify(event.target));
})();

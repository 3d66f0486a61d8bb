// The dashboard (`/ui`) in a real headless browser: Debian's Chromium, driven by playwright-core
// (which never downloads a browser of its own), against a live `stevedore serve` that runs tasks
// in Docker. Run by crates/cli/tests/cli/dashboard.rs, which starts the server and passes:
//
//   STEVEDORE_URL             the server's base URL, e.g. http://127.0.0.1:41234
//   STEVEDORE_TOKEN           a token of the project the test works in
//   STEVEDORE_OTHER_TOKEN     a token of a second project, which must not see the first's tasks
//   STEVEDORE_CODE            the name of a code of the first project whose task prints its payload
//   STEVEDORE_PAYLOAD         the payload to queue the task with
//   STEVEDORE_EXPECTED_LOG    text the task's log must contain once it is complete
//   STEVEDORE_SCREENSHOTS     the directory the screenshots (full pages) are written to
//   STEVEDORE_CHROMIUM        the Chromium executable (scripts/ensure-browser.sh prints it)
//   STEVEDORE_TASK_TIMEOUT_S  how long the task may take to complete (default 90)
//
// Every step prints `ok - …`; the first failure prints `FAIL - …` with the page's address, saves
// a screenshot and the page's HTML as failure-*.png/.html, and exits 1. Any console error, any
// uncaught page error, any unexpected HTTP error status and any request to a host other than the
// server's fails the run too: the dashboard must fetch nothing from the internet.

import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const FINAL_STATUSES = ['complete', 'error', 'timeout', 'cancelled'];
const ACTION_TIMEOUT_MS = 15_000;
const NAV_PAGES = [
  { href: '/ui/', screenshot: '02-overview.png' },
  { href: '/ui/codes', screenshot: '03-codes.png' },
  { href: '/ui/tasks', screenshot: '04-tasks.png' },
  { href: '/ui/schedules', screenshot: '05-schedules.png' },
  { href: '/ui/runners', screenshot: '06-runners.png' },
];
const CHARTS = ['#chart-throughput', '#chart-status', '#chart-stacks', '#chart-wait'];

const env = readEnvironment();
const origin = new URL(env.url).origin;
const problems = [];
let currentStep = 'start';
let currentPage = null;
let browser = null;

class StepFailure extends Error {}
class BrowserProblems extends StepFailure {}

function readEnvironment() {
  const names = {
    url: 'STEVEDORE_URL',
    token: 'STEVEDORE_TOKEN',
    otherToken: 'STEVEDORE_OTHER_TOKEN',
    code: 'STEVEDORE_CODE',
    payload: 'STEVEDORE_PAYLOAD',
    expectedLog: 'STEVEDORE_EXPECTED_LOG',
    screenshots: 'STEVEDORE_SCREENSHOTS',
    chromium: 'STEVEDORE_CHROMIUM',
  };
  const values = {};
  const missing = [];
  for (const [key, name] of Object.entries(names)) {
    values[key] = process.env[name];
    if (!values[key]) missing.push(name);
  }
  if (missing.length > 0) {
    console.error(`FAIL - environment: ${missing.join(', ')} not set (dashboard.rs sets them)`);
    process.exit(2);
  }
  values.taskTimeoutMs = Number(process.env.STEVEDORE_TASK_TIMEOUT_S || '90') * 1000;
  return values;
}

function check(condition, message) {
  if (!condition) throw new StepFailure(message);
}

// Fails the step that is running when the browser reported something wrong meanwhile (the
// listeners below cannot throw into the step themselves).
function checkNoProblems() {
  if (problems.length > 0) {
    throw new BrowserProblems(`the browser reported:\n  ${problems.join('\n  ')}`);
  }
}

async function step(name, body) {
  currentStep = name;
  await body();
  checkNoProblems();
  console.log(`ok - ${name}`);
}

async function screenshot(page, file) {
  await page.screenshot({ path: path.join(env.screenshots, file), fullPage: true });
}

function pathOf(page) {
  const url = new URL(page.url());
  return url.pathname + url.search;
}

// A browser context that may talk to the server only, with every page's console errors, page
// errors, HTTP error statuses and failed requests collected in `problems`. A test step that
// expects an error status names it in `allowed` (`"401 /ui/login"`) before causing it.
async function isolatedContext() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  context.allowed = new Set();
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (new URL(url).origin === origin) return route.continue();
    problems.push(`request to another host, blocked: ${route.request().method()} ${url}`);
    return route.abort('blockedbyclient');
  });
  return context;
}

async function watchedPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(ACTION_TIMEOUT_MS);
  const allowedUrl = (status, url) => {
    const parsed = new URL(url);
    return parsed.origin === origin && context.allowed.has(`${status} ${parsed.pathname}`);
  };
  page.on('console', (message) => {
    if (message.type() !== 'error') return;
    const location = message.location()?.url || '';
    const status = /status of (\d{3})/.exec(message.text())?.[1];
    if (status && location && allowedUrl(status, location)) return;
    problems.push(`console error on ${page.url()}: ${message.text()} (${location})`);
  });
  page.on('pageerror', (error) => {
    problems.push(`uncaught error on ${page.url()}: ${error.message}`);
  });
  page.on('response', (response) => {
    const status = response.status();
    if (status >= 400 && !allowedUrl(status, response.url())) {
      problems.push(`HTTP ${status} for ${response.request().method()} ${response.url()}`);
    }
  });
  page.on('requestfailed', (request) => {
    const reason = request.failure()?.errorText || 'unknown';
    // Leaving a page aborts what it still had open (a live log's event stream): not an error.
    // Blocked requests to other hosts are reported by the route above.
    if (reason.includes('ERR_ABORTED') || reason.includes('ERR_BLOCKED_BY_CLIENT')) return;
    problems.push(`request failed: ${request.method()} ${request.url()}: ${reason}`);
  });
  page.on('websocket', (socket) => {
    if (new URL(socket.url()).host !== new URL(origin).host) {
      problems.push(`web socket to another host: ${socket.url()}`);
    }
  });
  currentPage = page;
  return page;
}

// Submits a form by clicking its submit button and returns the response of the form's own
// request (a redirect included) together with the page's response after any redirects.
async function submit(page, formSelector, action) {
  const formResponse = page.waitForResponse(
    (response) =>
      response.request().method() === 'POST' && new URL(response.url()).pathname === action,
  );
  const navigation = page.waitForNavigation({ waitUntil: 'load' });
  await page.click(`${formSelector} button[type="submit"]`);
  const [posted, landed] = await Promise.all([formResponse, navigation]);
  return { posted, landed };
}

async function signIn(page, token) {
  await page.goto(`${origin}/ui/login`);
  await page.fill('#sign-in #token', token);
  return submit(page, '#sign-in', '/ui/login');
}

async function textOf(page, selector) {
  return (await page.locator(selector).first().textContent({ timeout: ACTION_TIMEOUT_MS })) ?? '';
}

async function main() {
  fs.mkdirSync(env.screenshots, { recursive: true });
  browser = await chromium.launch({
    executablePath: env.chromium,
    headless: true,
    // CI runs as root, where Chromium's sandbox cannot start; containers have a small /dev/shm.
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  console.log(`ok - launched ${env.chromium} (Chromium ${browser.version()}), headless`);

  const context = await isolatedContext();
  const page = await watchedPage(context);

  // The browser, the server and the screenshot directory work, whatever the dashboard does.
  await step('the server answers the browser (/health)', async () => {
    const response = await page.goto(`${origin}/health`);
    check(response?.ok(), `GET /health answered ${response?.status()}`);
    await screenshot(page, '00-health.png');
  });

  await step('signed out, /ui/ leads to the sign-in page', async () => {
    await page.goto(`${origin}/ui/`);
    check(
      new URL(page.url()).pathname === '/ui/login',
      `GET /ui/ signed out ended on ${pathOf(page)}, not /ui/login`,
    );
    for (const selector of [
      'form#sign-in[method="post"][action="/ui/login"]',
      '#sign-in input#token[name="token"][type="password"]',
      '#sign-in button[type="submit"]',
    ]) {
      check((await page.locator(selector).count()) === 1, `the sign-in page lacks ${selector}`);
    }
  });

  await step('a wrong token is refused with a message', async () => {
    context.allowed.add('401 /ui/login');
    const { posted } = await signIn(page, `wrong-${Date.now()}`);
    check(posted.status() === 401, `a wrong token answered ${posted.status()}, not 401`);
    check(
      new URL(page.url()).pathname === '/ui/login',
      `a wrong token ended on ${pathOf(page)}, not the sign-in page`,
    );
    const message = (await textOf(page, '.error')).trim();
    check(message.length > 0, 'the refused sign-in shows no .error message');
    check(await page.locator('#sign-in').isVisible(), 'the refused sign-in shows no form again');
    await screenshot(page, '01-sign-in.png');
    context.allowed.delete('401 /ui/login');
    console.log(`# the message: ${JSON.stringify(message)}`);
  });

  await step('the right token signs in and lands on the overview', async () => {
    const { posted } = await signIn(page, env.token);
    check(posted.status() === 303, `a good token answered ${posted.status()}, not 303`);
    check(
      new URL(page.url()).pathname === '/ui/',
      `a good token ended on ${pathOf(page)}, not /ui/`,
    );
    const cookies = await context.cookies(`${origin}/ui/`);
    check(cookies.length > 0, 'signing in set no cookie');
  });

  for (const { href, screenshot: file } of NAV_PAGES) {
    await step(`the navigation leads to ${href}`, async () => {
      const link = page.locator(`nav#nav a[href="${href}"]`);
      check((await link.count()) === 1, `nav#nav has no single a[href="${href}"]`);
      await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), link.click()]);
      check(
        new URL(page.url()).pathname === href,
        `the ${href} link ended on ${pathOf(page)}`,
      );
      if (href === '/ui/') {
        for (const chart of CHARTS) {
          await page.locator(`canvas${chart}`).waitFor({ state: 'visible' });
        }
        // Chart.js animates its first drawing; let it finish before the picture is taken.
        await page.waitForTimeout(1500);
      }
      if (href === '/ui/runners') {
        // serve's embedded runner announces itself in the default cluster.
        const runners = await page.locator('section[data-cluster="default"] tr.runner').count();
        check(runners >= 1, `the default cluster lists ${runners} runners, not serve's own`);
        const capacity = Number((await textOf(page, 'section[data-cluster="default"] .capacity')).trim());
        check(capacity > 0, `the default cluster shows a capacity of ${capacity}`);
        // The clusters reload themselves every 5 s; the runner is still listed after that.
        const reloaded = await page
          .waitForResponse((response) => new URL(response.url()).pathname === '/ui/runners', {
            timeout: 10_000,
          })
          .catch(() => null);
        check(reloaded && reloaded.status() === 200, 'the Runners page did not reload its clusters');
        await page.waitForTimeout(300);
        const after = await page.locator('#clusters section[data-cluster="default"] tr.runner').count();
        check(after >= 1, `after reloading, the default cluster lists ${after} runners`);
      }
      if (href === '/ui/codes') {
        const body = await page.locator('body').innerText();
        check(body.includes(env.code), `the codes page does not list ${env.code}`);
      }
      await screenshot(page, file);
    });
  }

  await step("a code's page shows its definition and its queue form", async () => {
    await page.goto(`${origin}/ui/codes`);
    const link = page.locator('tr.code a.code-link', { hasText: env.code });
    check((await link.count()) === 1, `the codes page has no link to ${env.code}`);
    await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), link.click()]);
    check(/^\/ui\/codes\/[^/]+$/.test(new URL(page.url()).pathname), `the code link ended on ${pathOf(page)}`);
    const facts = await textOf(page, 'dl.facts');
    check(facts.includes('stevedore/busybox:local'), `the code page does not show its image: ${facts}`);
    check((await page.locator('form#queue-task').count()) === 1, 'the code page has no queue form');
    await screenshot(page, '13-code.png');
  });

  let taskId = null;
  let firstStatus = null;
  await step('a task queued from /ui/tasks lands on its page', async () => {
    await page.goto(`${origin}/ui/tasks`);
    const form = 'form#queue-task[method="post"][action="/ui/tasks"]';
    check((await page.locator(form).count()) === 1, `the tasks page lacks ${form}`);
    await page.selectOption('#queue-task select[name="code"]', env.code);
    await page.fill('#queue-task textarea[name="payload"]', env.payload);
    const { posted } = await submit(page, '#queue-task', '/ui/tasks');
    check(posted.status() === 303, `queueing answered ${posted.status()}, not 303`);
    const match = /^\/ui\/tasks\/([^/]+)$/.exec(new URL(page.url()).pathname);
    check(match, `queueing ended on ${pathOf(page)}, not /ui/tasks/{id}`);
    taskId = decodeURIComponent(match[1]);
    firstStatus = (await textOf(page, '#task-status')).trim();
    // Marks this document: the marker survives live updates but not a reload.
    await page.evaluate(() => {
      window.stevedoreTestMarker = true;
    });
    await screenshot(page, '07-task-queued.png');
    console.log(`# task ${taskId}, first shown as ${JSON.stringify(firstStatus)}`);
  });

  await step('the task page shows the task complete and its log, live', async () => {
    check(
      !FINAL_STATUSES.includes(firstStatus),
      `the task page first showed ${JSON.stringify(firstStatus)}; the test's code sleeps ` +
        'so that the page sees it before it ends',
    );
    try {
      await page.waitForFunction(
        (finals) => {
          const status = document.querySelector('#task-status')?.textContent?.trim();
          return finals.includes(status);
        },
        FINAL_STATUSES,
        { timeout: env.taskTimeoutMs, polling: 200 },
      );
    } catch (error) {
      const status = (await textOf(page, '#task-status')).trim();
      throw new StepFailure(
        `#task-status did not reach a final status in ${env.taskTimeoutMs / 1000} s; ` +
          `it shows ${JSON.stringify(status)} (${error.message.split('\n')[0]})`,
      );
    }
    const status = (await textOf(page, '#task-status')).trim();
    check(status === 'complete', `the task ended ${JSON.stringify(status)}, not complete`);
    // The log may trail the status by one event; give it a moment.
    try {
      await page.waitForFunction(
        (expected) => document.querySelector('pre#task-log')?.textContent?.includes(expected),
        env.expectedLog,
        { timeout: 10_000, polling: 200 },
      );
    } catch {
      const log = await textOf(page, '#task-log');
      throw new StepFailure(
        `pre#task-log does not contain ${JSON.stringify(env.expectedLog)}; it shows ` +
          JSON.stringify(log.slice(0, 2000)),
      );
    }
    const sameDocument = await page.evaluate(() => window.stevedoreTestMarker === true);
    check(sameDocument, 'the task page reloaded to show the result instead of updating live');
    // Peak memory reads as a size a person can take in (KiB or MiB), not a count of bytes.
    const peak = (await textOf(page, '[data-field="peak_memory_bytes"]')).trim();
    check(
      peak === '' || /^\d+(\.\d)? (B|KiB|MiB|GiB)$/.test(peak),
      `peak memory shows ${JSON.stringify(peak)}, not a size such as "1.2 MiB"`,
    );
    await screenshot(page, '08-task-complete.png');
  });

  await step('the overview counts the finished task in its totals and charts', async () => {
    await page.goto(`${origin}/ui/`);
    try {
      await page.waitForSelector('#charts[data-loaded="true"]', { timeout: 15_000 });
    } catch {
      const problem = await textOf(page, '#usage-error');
      throw new StepFailure(`the charts never loaded their data: ${JSON.stringify(problem)}`);
    }
    const finished = Number((await textOf(page, '[data-total="tasks"]')).trim());
    check(finished >= 1, `the overview counts ${finished} finished tasks, not at least 1`);
    const drawn = await page.evaluate(() => {
      const sum = (id) => {
        const chart = window.Chart.getChart(document.getElementById(id));
        if (!chart) return -1;
        return chart.data.datasets
          .flatMap((dataset) => dataset.data)
          .reduce((total, value) => total + (Number(value) || 0), 0);
      };
      return {
        throughput: sum('chart-throughput'),
        status: sum('chart-status'),
        stacks: sum('chart-stacks'),
        wait: window.Chart.getChart(document.getElementById('chart-wait'))
          ? window.Chart.getChart(document.getElementById('chart-wait')).data.datasets.length
          : -1,
      };
    });
    check(drawn.throughput >= 1, `the throughput chart shows ${drawn.throughput} tasks`);
    check(drawn.status >= 1, `the status chart shows ${drawn.status} tasks`);
    check(drawn.stacks > 0, `the stack chart shows ${drawn.stacks} compute seconds`);
    check(drawn.wait === 2, `the queue-wait chart has ${drawn.wait} series, not p50 and p99`);
    await screenshot(page, '12-overview-with-a-task.png');
  });

  await step('the finished task is listed under ?status=complete, and not under ?status=error', async () => {
    const link = `tr.task a.task-link[href="/ui/tasks/${taskId}"]`;
    await page.goto(`${origin}/ui/tasks?status=complete`);
    check((await page.locator(link).count()) === 1, `/ui/tasks?status=complete lacks ${link}`);
    await screenshot(page, '09-tasks-complete.png');
    await page.goto(`${origin}/ui/tasks?status=error`);
    check((await page.locator(link).count()) === 0, `/ui/tasks?status=error lists ${taskId}`);
    await page.goto(`${origin}/ui/tasks?status=complete`);
    await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.locator(link).click()]);
    check(
      new URL(page.url()).pathname === `/ui/tasks/${taskId}`,
      `the task's link ended on ${pathOf(page)}`,
    );
  });

  await step("another project's token does not see the task (404)", async () => {
    const otherContext = await isolatedContext();
    const otherPage = await watchedPage(otherContext);
    const { posted } = await signIn(otherPage, env.otherToken);
    check(posted.status() === 303, `the other project's token answered ${posted.status()}`);
    otherContext.allowed.add(`404 /ui/tasks/${taskId}`);
    const response = await otherPage.goto(`${origin}/ui/tasks/${taskId}`);
    check(
      response?.status() === 404,
      `the other project got ${response?.status()} for the task's page, not 404`,
    );
    await screenshot(otherPage, '10-other-project-404.png');
    await otherPage.goto(`${origin}/ui/tasks`);
    check(
      (await otherPage.locator(`a.task-link[href="/ui/tasks/${taskId}"]`).count()) === 0,
      "the other project's task list shows the task",
    );
    await otherContext.close();
    currentPage = page;
  });

  await step('signing out ends the session', async () => {
    await page.goto(`${origin}/ui/`);
    await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('#sign-out')]);
    await page.goto(`${origin}/ui/`);
    check(
      new URL(page.url()).pathname === '/ui/login',
      `after signing out /ui/ ended on ${pathOf(page)}, not /ui/login`,
    );
    await screenshot(page, '11-signed-out.png');
  });

  await context.close();
}

async function recordFailure(error) {
  const message = error instanceof StepFailure ? error.message : error.stack || String(error);
  console.error(`FAIL - ${currentStep}: ${message}`);
  if (!(error instanceof BrowserProblems) && problems.length > 0) {
    console.error(`  the browser also reported:\n    ${problems.join('\n    ')}`);
  }
  if (currentPage && !currentPage.isClosed()) {
    console.error(`  page: ${currentPage.url()}`);
    const base = `failure-${currentStep.replace(/[^a-z0-9]+/gi, '-').replace(/^-|-$/g, '')}`;
    try {
      await currentPage.screenshot({
        path: path.join(env.screenshots, `${base}.png`),
        fullPage: true,
        timeout: 5_000,
      });
      fs.writeFileSync(path.join(env.screenshots, `${base}.html`), await currentPage.content());
      console.error(`  saved ${base}.png and ${base}.html`);
    } catch (saveError) {
      console.error(`  could not save the page: ${saveError.message.split('\n')[0]}`);
    }
  }
}

let failed = false;
try {
  await main();
} catch (error) {
  failed = true;
  await recordFailure(error);
} finally {
  await browser?.close().catch(() => {});
}
console.log(`screenshots: ${env.screenshots}`);
process.exit(failed ? 1 : 0);

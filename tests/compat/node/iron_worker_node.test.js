// The official IronWorker Node client (npm `iron_worker` 0.1.8, with `iron_core` 0.2.7)
// against a live stevedore server. IRON_WORKER_NODE.md describes what it sends.
//
//   STEVEDORE_IRON_JSON   the iron.json the server wrote (required; the suite skips without it)
//   STEVEDORE_RUNS_TASKS  "1" when the server runs tasks in real containers
//
// Run: node --test iron_worker_node.test.js (top-level tests run one after another)
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const childProcess = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const zlib = require('node:zlib');

const IRON_JSON = process.env.STEVEDORE_IRON_JSON;
const RUNS_TASKS = process.env.STEVEDORE_RUNS_TASKS === '1';
const RUN_ID = Math.random().toString(16).slice(2, 10);
const LONG_DELAY = 3600;
const FINISHED = ['complete', 'error', 'timeout', 'cancelled'];

const live = { skip: IRON_JSON ? false : 'STEVEDORE_IRON_JSON is not set' };
const containers = {
  skip: !IRON_JSON ? 'STEVEDORE_IRON_JSON is not set'
    : RUNS_TASKS ? false : 'set STEVEDORE_RUNS_TASKS=1 to run tasks in containers',
};

// iron_core reads IRON_* / IRON_WORKER_* variables and iron.json files from the working
// directory and HOME; keep a developer's real Iron.io settings out of the way.
for (const key of Object.keys(process.env)) {
  if (key.startsWith('IRON_')) delete process.env[key];
}
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'ironnode-'));
process.env.HOME = scratch;
process.chdir(scratch);

const ironWorker = require('iron_worker');
const iron = IRON_JSON ? JSON.parse(fs.readFileSync(IRON_JSON, 'utf8')) : {};
let worker;

// The client is callback-style: (error, body). Turn a call into a promise.
function call(method, ...args) {
  return new Promise((resolve, reject) => {
    worker[method](...args, (error, body) => (error ? reject(error) : resolve(body)));
  });
}

// zlib.crc32 arrived in Node 20.15; older ones (Debian's 18) get the table version.
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(buffer) {
  if (zlib.crc32) return zlib.crc32(buffer);
  let c = 0xffffffff;
  for (const byte of buffer) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function raw(method, rel, body, headers = {}) {
  const url = `http://${iron.host}:${iron.port}/2/projects/${iron.project_id}/${rel}`;
  return fetch(url, {
    method,
    body,
    headers: { Authorization: `OAuth ${iron.token}`, ...headers },
  });
}

async function waitStatus(id, wanted, timeoutMs = 90000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const task = await call('tasksGet', id);
    if (wanted.includes(task.status)) return task;
    assert.ok(Date.now() < deadline, `task ${id} stayed ${task.status}, wanted ${wanted}`);
    await sleep(300);
  }
}

// A stored zip, written here: the client's adm-zip cannot write most files on today's Node
// (see codesUpload below).
function zipOf(entries) {
  const locals = [];
  const centrals = [];
  let offset = 0;
  for (const [name, text, mode] of entries) {
    const data = Buffer.from(text);
    const fileName = Buffer.from(name);
    const crc = crc32(data);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(data.length, 18);
    local.writeUInt32LE(data.length, 22);
    local.writeUInt16LE(fileName.length, 26);
    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(0x0314, 4); // made by unix, so the mode below counts
    central.writeUInt16LE(20, 6);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(data.length, 20);
    central.writeUInt32LE(data.length, 24);
    central.writeUInt16LE(fileName.length, 28);
    central.writeUInt32LE(((0o100000 | mode) << 16) >>> 0, 38);
    central.writeUInt32LE(offset, 42);
    locals.push(local, fileName, data);
    centrals.push(central, fileName);
    offset += local.length + fileName.length + data.length;
  }
  const centralSize = centrals.reduce((n, b) => n + b.length, 0);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(entries.length, 8);
  end.writeUInt16LE(entries.length, 10);
  end.writeUInt32LE(centralSize, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, ...centrals, end]);
}

// Registers a zip code with the raw API: the client's own upload can only send `sh` codes
// that end in `node <file>`, and no config.
async function uploadZip(name, fileName, script, extra = {}) {
  const form = new FormData();
  form.append('data', JSON.stringify({ name, runtime: 'binary', file_name: fileName, ...extra }));
  form.append('file', new Blob([zipOf([[fileName, script, 0o755]])]), `${name}.zip`);
  const response = await raw('POST', 'codes', form);
  assert.equal(response.status, 200, await response.text());
}

const WORKER_SH = `#!/bin/sh
pf="$PAYLOAD_FILE"
mode=$(sed -n 's/.*"mode":"\\([a-z]*\\)".*/\\1/p' "$pf")
case "$mode" in
  fail) echo "failing on purpose"; exit 3 ;;
  sleep) echo "sleeping"; sleep 120 ;;
  silent) exit 0 ;;
  *) echo "task_id=$TASK_ID"; cat "$pf"; echo ;;
esac
`;

// Prints what the container got: argv, the contract's env vars, the working directory, and
// the payload and config files in base64.
const CAPTURE_SH = `#!/bin/sh
for a in "$@"; do printf 'arg=%s\\n' "$a"; done
for v in TASK_ID TASK_DIR PAYLOAD_FILE CONFIG_FILE; do eval "printf 'env=%s=%s\\n' $v \\"\\$$v\\""; done
printf 'pwd=%s\\n' "$(pwd)"
printf 'payload64=%s\\n' "$(base64 -w0 < "$PAYLOAD_FILE")"
printf 'config64=%s\\n' "$(base64 -w0 < "$CONFIG_FILE")"
`;

const CODE = `nodeclient-${RUN_ID}`;
const WORKER = `nodeclient-worker-${RUN_ID}`;

before(async () => {
  if (!IRON_JSON) return;
  worker = new ironWorker.Client({ config: IRON_JSON });
  await uploadZip(CODE, 'worker.sh', WORKER_SH);
  if (RUNS_TASKS) await uploadZip(WORKER, 'worker.sh', WORKER_SH);
});

after(() => fs.rmSync(scratch, { recursive: true, force: true }));

// ---------------------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------------------

test('the client reads iron.json, scheme included', live, () => {
  assert.equal(worker.api.options.scheme, 'http', 'iron.json must carry "scheme"');
  assert.equal(worker.api.url(), `http://${iron.host}:${iron.port}/2/`);
  assert.equal(worker.api.options.project_id, iron.project_id);
  assert.match(worker.api.headers()['User-Agent'], /^iron_worker_node-0\.1\.8 \(iron_core_node-0\.2\.7\)$/);
});

// ---------------------------------------------------------------------------------------
// codes
// ---------------------------------------------------------------------------------------

// codesUpload copies ./upload_files (relative to the working directory, not to the package)
// into the given folder, appends `node <fileName>` to its __runner__.sh, zips the folder
// with adm-zip 0.4.4 and posts it as runtime "sh". adm-zip writes each entry's CRC-32 with
// writeInt32LE, which today's Node refuses for a CRC of 2^31 or more: the upload throws for
// about half of all files. Contents are chosen here so that every CRC stays below 2^31.
function crcSafe(text) {
  return crc32(Buffer.from(text)) < 2 ** 31;
}

test('codesUpload, codesGet, codesList, codesRevisions, codesDownload, codesDelete', live, async () => {
  const packageDir = path.dirname(require.resolve('iron_worker/package.json'));
  const runner = fs.readFileSync(path.join(packageDir, 'upload_files', '__runner__.sh'), 'utf8');
  fs.cpSync(path.join(packageDir, 'upload_files'), path.join(scratch, 'upload_files'), { recursive: true });
  let fileName = 'hello.js';
  while (!crcSafe(`${runner}\nnode ${fileName}`)) fileName = `./${fileName}`;
  let hello = 'console.log("hello from node");\n';
  for (let n = 0; !crcSafe(hello); n += 1) hello = `console.log("hello from node"); // ${n}\n`;
  const dest = path.join(scratch, 'nodecode');
  fs.mkdirSync(dest);
  fs.writeFileSync(path.join(dest, 'hello.js'), hello);

  const name = `nodeclient-upload-${RUN_ID}`;
  const uploaded = await call('codesUpload', name, dest, fileName);
  assert.equal(uploaded.msg, 'Upload successful.', 'needle parses the JSON reply itself');
  const { id } = uploaded;
  assert.ok(id);
  assert.ok(fs.existsSync(path.join(dest, '__runner__.sh')), 'the runner is copied into the folder');

  const code = await call('codesGet', id);
  assert.equal(code.name, name);
  assert.equal(code.runtime, 'sh');
  assert.equal(code.file_name, '__runner__.sh');
  assert.equal(code.rev, 1);
  assert.equal(typeof code.latest_change, 'string');

  const codes = await call('codesList', { per_page: 100 });
  assert.ok(codes.some((c) => c.id === id && c.name === name));
  const page = await call('codesList', { page: 0, per_page: 1 });
  assert.equal(page.length, 1);

  const again = await call('codesUpload', name, dest, fileName);
  assert.equal(again.id, id, 'the same name makes a new revision');
  const revisions = await call('codesRevisions', id, {});
  assert.deepEqual(revisions.map((r) => r.rev).sort(), [1, 2]);
  assert.ok(revisions.every((r) => r.code_id === id));

  // codesDownload hands back the zip decoded as UTF-8 text, which mangles it; the server's
  // bytes are checked raw.
  const mangled = await call('codesDownload', id, { revision: 1 });
  assert.equal(typeof mangled, 'string');
  const response = await raw('GET', `codes/${id}/download?revision=1`);
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('content-type'), 'application/zip');
  assert.equal(response.headers.get('content-disposition'), `attachment; filename="${name}_1.zip"`);
  const AdmZip = require('adm-zip');
  const zip = new AdmZip(Buffer.from(await response.arrayBuffer()));
  const entries = Object.fromEntries(zip.getEntries().map((e) => [e.entryName, e.getData().toString()]));
  assert.equal(entries['hello.js'], hello);
  assert.ok(entries['__runner__.sh'].endsWith(`\nnode ${fileName}`), entries['__runner__.sh']);
  assert.notEqual(Buffer.from(mangled).length, zip.toBuffer().length);

  if (RUNS_TASKS) {
    // `sh` with no stack runs on the default stack, which has Node: the runner script cds
    // into -d and runs `node hello.js`.
    const task = await call('tasksCreate', name, { x: 1 }, { timeout: 60 });
    const done = await waitStatus(task.id, FINISHED);
    assert.equal(done.status, 'complete', await call('tasksLog', task.id));
    assert.match(await call('tasksLog', task.id), /hello from node/);
  }

  const deleted = await call('codesDelete', id);
  assert.deepEqual(deleted, { msg: 'Deleted' });
  await assert.rejects(call('codesGet', id), /not found/);
});

// ---------------------------------------------------------------------------------------
// tasks (queued with a delay, so nothing runs)
// ---------------------------------------------------------------------------------------

test('tasksCreate, tasksGet, tasksList with filters and paging, tasksCancel', live, async () => {
  const payload = { hello: 'world', n: [1, 2] };
  const created = await call('tasksCreate', CODE, payload,
    { delay: LONG_DELAY, priority: 2, timeout: 120, label: 'node-label', cluster: 'default' });
  assert.ok(created.id);
  const task = await call('tasksGet', created.id);
  assert.equal(task.status, 'queued');
  assert.equal(task.code_name, CODE);
  assert.equal(task.payload, JSON.stringify(payload), 'payload goes up as a JSON string');
  assert.equal(task.priority, 2);
  assert.equal(task.timeout, 120);
  assert.equal(task.delay, LONG_DELAY);
  assert.equal(task.label, 'node-label');
  assert.equal(task.run_times, 0);

  const text = await call('tasksCreate', CODE, 'plain text', { delay: LONG_DELAY });
  assert.equal((await call('tasksGet', text.id)).payload, 'plain text');

  // tasksCreateBulk sends every task but hands back only the first id.
  const first = await call('tasksCreateBulk', [
    { codeName: CODE, payload: { i: 0 }, options: { delay: LONG_DELAY } },
    { codeName: CODE, payload: { i: 1 }, options: { delay: LONG_DELAY } },
  ]);
  assert.ok(first.id);

  const mine = await call('tasksList', { code_name: CODE, per_page: 100 });
  const ids = new Set(mine.map((t) => t.id));
  for (const id of [created.id, text.id, first.id]) assert.ok(ids.has(id));
  assert.ok(mine.length >= 4, 'both bulk tasks were queued');
  const queued = await call('tasksList', { code_name: CODE, queued: 1, per_page: 100 });
  assert.ok(queued.every((t) => t.status === 'queued'));
  const now = Math.floor(Date.now() / 1000);
  assert.ok((await call('tasksList', { code_name: CODE, from_time: now - 600 })).length >= 4);
  assert.equal((await call('tasksList', { code_name: CODE, to_time: now - 600 })).length, 0);
  const pages = [];
  for (let page = 0; page < mine.length; page += 1) {
    const got = await call('tasksList', { code_name: CODE, page, per_page: 1 });
    assert.equal(got.length, 1);
    pages.push(got[0].id);
  }
  assert.equal(new Set(pages).size, mine.length);

  assert.deepEqual(await call('tasksCancel', created.id), { msg: 'Cancelled' });
  assert.equal((await call('tasksGet', created.id)).status, 'cancelled');
  const cancelled = await call('tasksList', { code_name: CODE, cancelled: 1 });
  assert.ok(cancelled.some((t) => t.id === created.id));
  assert.ok(cancelled.every((t) => t.status === 'cancelled'));
  // Cancelling twice is a conflict; POST errors carry the server's msg.
  await assert.rejects(call('tasksCancel', created.id), /cancelled/);
});

test('tasksSetProgress, tasksRetry, tasksCancelAll', live, async () => {
  const task = await call('tasksCreate', CODE, { p: 1 }, { delay: LONG_DELAY });
  assert.deepEqual(await call('tasksSetProgress', task.id, { percent: 42, msg: 'most' }),
    { msg: 'Progress set' });
  const got = await call('tasksGet', task.id);
  assert.equal(got.percent, 42);
  assert.equal(got.msg, 'most');
  await assert.rejects(call('tasksSetProgress', task.id, { percent: 101 }), /percent/);

  // As on IronWorker, a task still queued can be retried too: a copy is queued beside it.
  const copy = await call('tasksRetry', task.id, LONG_DELAY);
  assert.notEqual(copy.tasks[0].id, task.id);
  assert.equal((await call('tasksGet', copy.tasks[0].id)).status, 'queued');
  await call('tasksCancel', copy.tasks[0].id);
  await call('tasksCancel', task.id);
  const retried = await call('tasksRetry', task.id, LONG_DELAY);
  assert.equal(retried.msg, 'Queued up');
  const retryId = retried.tasks[0].id;
  const retry = await call('tasksGet', retryId);
  assert.equal(retry.status, 'queued');
  assert.equal(retry.payload, '{"p":1}');
  assert.equal(retry.original_task_id, task.id);

  const { id: codeId } = (await call('codesList', { per_page: 100 })).find((c) => c.name === CODE);
  const reply = await call('tasksCancelAll', codeId);
  assert.match(reply.msg, /^Cancelled \d+ tasks$/);
  assert.equal((await call('tasksList', { code_name: CODE, queued: 1 })).length, 0);
});

test('errors: unknown ids, unknown codes and clusters', live, async () => {
  // GET errors come back as the raw JSON text of the body, POST errors as its msg.
  await assert.rejects(call('tasksGet', '000000000000000000000000'), /"msg":"task .* not found"/);
  await assert.rejects(call('tasksCreate', 'no-such-code', {}, {}), /no-such-code/);
  await assert.rejects(call('clustersGet', 'no-such-cluster'), /not found/);
  await assert.rejects(call('tasksCreate', CODE, {}, { cluster: 'no-such-cluster' }), /cluster/);
});

test('clustersCreate, clustersGet, clustersList, clustersUpdate, clustersStats, clustersDelete', live, async () => {
  const name = `node-pool-${process.pid}`;
  const created = await call('clustersCreate', name, 1024, 2048, {});
  assert.ok(created.id);
  assert.equal(created.cluster.name, name);
  assert.equal(created.cluster.memory, 1024);
  assert.equal(created.cluster.disk, 2048);

  const { cluster } = await call('clustersGet', created.id);
  assert.equal(cluster.id, created.id);
  const { clusters } = await call('clustersList', {});
  assert.deepEqual(clusters.map((c) => c.name).filter((n) => n === 'default' || n === name),
    ['default', name]);

  const updated = await call('clustersUpdate', created.id, { memory: 4096 });
  assert.equal(updated.cluster.memory, 4096);
  assert.equal(updated.cluster.disk, 2048, 'an update changes only the fields it names');

  // A task for the cluster waits for that pool's runners: none serve it here.
  const task = await call('tasksCreate', CODE, {}, { cluster: name });
  const stats = await call('clustersStats', created.id);
  assert.equal(stats.name, name);
  assert.equal(stats.queued, 1);
  assert.equal(stats.runners_online, 0);
  await assert.rejects(call('clustersDelete', created.id), /tasks/);
  await call('tasksCancel', task.id);
  await call('clustersDelete', created.id);
  await assert.rejects(call('clustersGet', created.id), /not found/);
});

// ---------------------------------------------------------------------------------------
// schedules
// ---------------------------------------------------------------------------------------

test('schedulesCreate, schedulesGet, schedulesList, schedulesCancel', live, async () => {
  const startAt = new Date(Date.now() + 2 * 3600 * 1000);
  const endAt = new Date(startAt.getTime() + 7 * 24 * 3600 * 1000);
  const created = await call('schedulesCreate', CODE, { s: 1 },
    { run_every: 3600, start_at: startAt, end_at: endAt, run_times: 10, priority: 1, label: 'nightly' });
  assert.ok(created.id);
  const schedule = await call('schedulesGet', created.id);
  assert.equal(schedule.status, 'scheduled');
  assert.equal(schedule.code_name, CODE);
  assert.equal(schedule.payload, '{"s":1}');
  assert.equal(schedule.run_every, 3600);
  assert.equal(schedule.run_times, 10);
  assert.equal(Date.parse(schedule.start_at), startAt.getTime());
  assert.equal(Date.parse(schedule.end_at), endAt.getTime());
  const listed = await call('schedulesList', { per_page: 100 });
  assert.ok(listed.some((s) => s.id === created.id));
  assert.deepEqual(await call('schedulesCancel', created.id), { msg: 'Cancelled' });
  assert.equal((await call('schedulesGet', created.id)).status, 'cancelled');
  await assert.rejects(call('schedulesCreate', CODE, {}, { run_every: 5 }), /run_every/);
});

// ---------------------------------------------------------------------------------------
// real tasks in real containers
// ---------------------------------------------------------------------------------------

test('tasksRun waits and hands back the output', containers, async () => {
  const out = await call('tasksRun', WORKER, { mode: 'hello', run: 1 }, { timeout: 60 });
  assert.equal(typeof out, 'string');
  assert.match(out, /"run":1/);
});

test('tasksRun of a task that prints nothing hands back ""', containers, async () => {
  const started = Date.now();
  assert.equal(await call('tasksRun', WORKER, { mode: 'silent' }, { timeout: 60 }), '');
  assert.ok(Date.now() - started < 60000);
});

test('tasksWaitFor, tasksWaitForLog, tasksLog, tasksStdout', containers, async () => {
  const task = await call('tasksCreate', WORKER, { wait: 1 }, { timeout: 60 });
  const done = await call('tasksWaitFor', task.id, {});
  assert.equal(done.status, 'complete');
  assert.equal(done.exit_code, 0);
  assert.equal(done.run_times, 1);
  assert.equal(typeof done.duration, 'number');
  await call('tasksWaitForLog', task.id, {});
  const log = await call('tasksLog', task.id);
  assert.match(log, new RegExp(`task_id=${task.id}`));
  assert.match(log, /"wait":1/);
  assert.equal(await call('tasksStdout', task.id), log);
});

test('a failing task, its retry, and cancelling a running task', containers, async () => {
  const failed = await call('tasksCreate', WORKER, { mode: 'fail' }, { timeout: 60 });
  assert.equal((await call('tasksWaitFor', failed.id, {})).status, 'error');
  assert.match(await call('tasksLog', failed.id), /failing on purpose/);
  const retried = await call('tasksRetry', failed.id, 0);
  const again = await waitStatus(retried.tasks[0].id, FINISHED);
  assert.equal(again.status, 'error');
  assert.equal(again.retry_count, 1);

  const long = await call('tasksCreate', WORKER, { mode: 'sleep' }, { timeout: 300 });
  await waitStatus(long.id, ['running']);
  const running = await call('tasksList', { code_name: WORKER, running: 1 });
  assert.ok(running.some((t) => t.id === long.id));
  const sent = Date.now();
  await call('tasksCancel', long.id);
  assert.equal((await waitStatus(long.id, FINISHED, 20000)).status, 'cancelled');
  assert.ok(Date.now() - sent < 15000);

  const slow = await call('tasksCreate', WORKER, { mode: 'sleep' }, { timeout: 2 });
  assert.equal((await waitStatus(slow.id, FINISHED)).status, 'timeout');
  for (const [flag, status] of [['error', 'error'], ['timeout', 'timeout'], ['complete', 'complete']]) {
    const got = await call('tasksList', { code_name: WORKER, [flag]: 1, per_page: 100 });
    assert.ok(got.every((t) => t.status === status), flag);
  }
});

test('a schedule fires a real task', containers, async () => {
  const created = await call('schedulesCreate', WORKER, { from: 'schedule' },
    { start_at: new Date(), run_times: 1 });
  const deadline = Date.now() + 60000;
  let fired;
  while (!fired) {
    assert.ok(Date.now() < deadline, 'the schedule made no task');
    await sleep(500);
    fired = (await call('tasksList', { code_name: WORKER, per_page: 100 }))
      .find((t) => t.schedule_id === created.id);
  }
  assert.equal((await call('tasksWaitFor', fired.id, {})).status, 'complete');
  assert.match(await call('tasksLog', fired.id), /"from":"schedule"/);
  const schedule = await call('schedulesGet', created.id);
  assert.equal(schedule.run_count, 1);
  assert.equal(schedule.status, 'complete');
});

// The worker-side helpers (params, config, taskId, taskDir) run inside a task. The stacks
// have no Node, so a shell worker captures its argv, env and files, and the helpers run
// here against that copy, with the container's paths moved under a scratch root.
// A copy of `file` whose CRC-32 stays below 2^31, so that adm-zip can zip it: `comment`
// makes a line the file's language ignores, appended until the CRC fits.
function crcSafeCopy(file, comment) {
  let text = fs.readFileSync(file, 'utf8');
  for (let n = 0; !crcSafe(text); n += 1) text = `${text}${comment(n)}`;
  return text;
}

test('a worker uploaded with codesUpload runs under node, and its helpers see payload, config and id', containers, async () => {
  // A worker that ships the client's in-task helpers in its own node_modules, as users
  // ship their dependencies (the copies differ from the originals only by trailing comments
  // or blanks that keep their CRC-32s below 2^31, see crcSafe).
  const modules = path.join(__dirname, 'node_modules');
  const dest = path.join(scratch, 'helperworker');
  const vendored = [
    ['node_modules/iron_worker/lib/helper.js', (n) => `\n// ${n}`],
    ['node_modules/underscore/underscore.js', (n) => `\n// ${n}`],
    ['node_modules/underscore/package.json', () => ' '],
  ];
  for (const [file, comment] of vendored) {
    fs.mkdirSync(path.dirname(path.join(dest, file)), { recursive: true });
    const original = path.join(modules, file.slice('node_modules/'.length));
    fs.writeFileSync(path.join(dest, file), crcSafeCopy(original, comment));
  }
  let source = `const worker = require('iron_worker/lib/helper');
console.log('node ' + process.versions.node.split('.')[0] + ' runs the worker');
console.log('params=' + JSON.stringify(worker.params()));
console.log('config=' + JSON.stringify(worker.config()));
console.log('taskId=' + worker.taskId());
`;
  for (let n = 0; !crcSafe(source); n += 1) source = `${source}// ${n}\n`;
  fs.writeFileSync(path.join(dest, 'worker.js'), source);
  const packageDir = path.dirname(require.resolve('iron_worker/package.json'));
  const runner = fs.readFileSync(path.join(packageDir, 'upload_files', '__runner__.sh'), 'utf8');
  fs.cpSync(path.join(packageDir, 'upload_files'), path.join(scratch, 'upload_files'), { recursive: true, force: true });
  let fileName = 'worker.js';
  while (!crcSafe(`${runner}\nnode ${fileName}`)) fileName = `./${fileName}`;

  const name = `nodeclient-helpers-${RUN_ID}`;
  const uploaded = await call('codesUpload', name, dest, fileName);
  const code = await call('codesGet', uploaded.id);
  assert.equal(code.runtime, 'sh');
  assert.equal(code.stack, 'default', 'sh without a stack runs on the stack with every language');
  // The client cannot send a code's config; an options update adds it and keeps the zip.
  const config = { greeting: 'from the config' };
  const response = await raw('POST', 'codes', JSON.stringify({ name, config: JSON.stringify(config) }),
    { 'Content-Type': 'application/json' });
  assert.equal(response.status, 200, await response.text());

  const payload = { hello: 'world', n: 3 };
  const task = await call('tasksCreate', name, payload, { timeout: 60 });
  const done = await waitStatus(task.id, FINISHED);
  const log = await call('tasksLog', task.id);
  assert.equal(done.status, 'complete', log);
  assert.match(log, /^node 18 runs the worker$/m);
  assert.ok(log.includes(`params=${JSON.stringify(payload)}`), log);
  assert.ok(log.includes(`config=${JSON.stringify(config)}`), log);
  assert.ok(log.includes(`taskId=${task.id}`), log);
});

const HELPER_PROBE = `
const args = JSON.parse(process.argv[1]);
process.argv.splice(1, process.argv.length, ...args);
const w = require('iron_worker');
console.log(JSON.stringify({ taskId: w.taskId(), taskDir: w.taskDir(), params: w.params(), config: w.config() }));
`;

test('params, config, taskId and taskDir read what the container got', containers, async () => {
  const name = `nodeclient-capture-${RUN_ID}`;
  const config = { db: 'postgres://example', n: 2 };
  await uploadZip(name, 'capture.sh', CAPTURE_SH, { config: JSON.stringify(config) });
  const payload = { hello: 'world', list: [1, 2] };
  const task = await call('tasksCreate', name, payload, { timeout: 60 });
  assert.equal((await call('tasksWaitFor', task.id, {})).status, 'complete');
  const lines = (await call('tasksLog', task.id)).split('\n');
  const args = lines.filter((l) => l.startsWith('arg=')).map((l) => l.slice(4));
  const env = Object.fromEntries(lines.filter((l) => l.startsWith('env='))
    .map((l) => { const [k, ...v] = l.slice(4).split('='); return [k, v.join('=')]; }));
  const field = (key) => lines.find((l) => l.startsWith(`${key}=`)).slice(key.length + 1);

  assert.deepEqual(args, ['-id', task.id, '-d', env.TASK_DIR, '-payload', env.PAYLOAD_FILE,
    '-config', env.CONFIG_FILE]);
  assert.equal(env.TASK_ID, task.id);
  assert.equal(field('pwd'), env.TASK_DIR);
  const payloadBytes = Buffer.from(field('payload64'), 'base64');
  const configBytes = Buffer.from(field('config64'), 'base64');
  assert.deepEqual(JSON.parse(payloadBytes), payload);
  assert.deepEqual(JSON.parse(configBytes), config);

  const root = fs.mkdtempSync(path.join(scratch, 'root-'));
  const moved = (p) => (p.startsWith('/') ? root + p : p);
  fs.mkdirSync(moved(env.TASK_DIR), { recursive: true });
  for (const [p, bytes] of [[env.PAYLOAD_FILE, payloadBytes], [env.CONFIG_FILE, configBytes]]) {
    fs.mkdirSync(path.dirname(moved(p)), { recursive: true });
    fs.writeFileSync(moved(p), bytes);
  }
  const contractEnv = {
    TASK_ID: env.TASK_ID,
    TASK_DIR: moved(env.TASK_DIR),
    PAYLOAD_FILE: moved(env.PAYLOAD_FILE),
    CONFIG_FILE: moved(env.CONFIG_FILE),
  };
  const clean = { ...process.env };
  for (const key of Object.keys(contractEnv)) delete clean[key];
  const expected = { taskId: task.id, taskDir: moved(env.TASK_DIR), params: payload, config };
  const movedArgs = args.map(moved);
  for (const [label, argv, extra] of [
    ['argv and env, as in the container', movedArgs, contractEnv],
    ['argv flags alone', movedArgs, {}],
    ['env vars alone', [], contractEnv],
  ]) {
    const out = childProcess.execFileSync(process.execPath,
      ['-e', HELPER_PROBE, JSON.stringify(['worker.js', ...argv])],
      { env: { ...clean, ...extra, NODE_PATH: path.join(__dirname, 'node_modules') }, encoding: 'utf8' });
    assert.deepEqual(JSON.parse(out.trim().split('\n').pop()), expected, label);
  }
});

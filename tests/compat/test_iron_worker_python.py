"""Drive a live stevedore server with the official IronWorker Python client
(iron-worker 1.3.8 / iron-core 1.2.1, see requirements.txt).

Server location: see conftest.py (STEVEDORE_IRON_JSON, or STEVEDORE_HOST /
STEVEDORE_PORT / STEVEDORE_PROJECT_ID / STEVEDORE_TOKEN). Without it every
server test is skipped; the `test_offline_*` tests always run and pin down
client quirks the server must cope with (see IRON_WORKER_PYTHON.md).

Tests marked `runs_containers` (enabled by STEVEDORE_RUNS_TASKS=1) run real
tasks in real containers and check their results: status, exit, log, output,
retries, cancellation, schedules firing, and the worker-side helpers against
what a container really got. Every task queued by the other tests is delayed,
so a server with a real runner does not pick them up.

IRON_WORKER_PYTHON.md maps every public call of the client to the tests here.
"""
import contextlib
import datetime as dt
import io
import json
import os
import random
import time
import uuid
import zipfile

import base64
import subprocess
import sys

import pytest
import requests
from requests.exceptions import HTTPError

from iron_worker import CodePackage, IronWorker, Task

HELLO_SH = """#!/bin/sh
# Iron passes -id/-payload/-d/-config args and TASK_ID/PAYLOAD_FILE env vars.
id="$TASK_ID"
pf="$PAYLOAD_FILE"
while [ $# -gt 0 ]; do
  case "$1" in
    -id) id="$2"; shift ;;
    -payload) pf="$2"; shift ;;
  esac
  shift
done
echo "task_id=$id"
echo "payload_file=$pf"
echo "payload:"
cat "$pf"
echo
"""

# One worker for the container tests; the payload's "mode" picks what it does.
WORKER_SH = r"""#!/bin/sh
id="$TASK_ID"
pf="$PAYLOAD_FILE"
while [ $# -gt 0 ]; do
  case "$1" in
    -id) id="$2"; shift ;;
    -payload) pf="$2"; shift ;;
  esac
  shift
done
mode=$(sed -n 's/.*"mode": *"\([a-z]*\)".*/\1/p' "$pf")
case "$mode" in
  fail) echo "failing on purpose"; exit 3 ;;
  sleep) echo "sleeping"; sleep 120 ;;
  silent) exit 0 ;;
  *) echo "task_id=$id"; echo "payload:"; cat "$pf"; echo ;;
esac
"""

# Prints exactly what the container was given: argv, the contract's env vars, the working
# directory, and the payload and config files (base64), one `key=value` a line.
CAPTURE_SH = r"""#!/bin/sh
echo "argc=$#"
for a in "$@"; do printf 'arg=%s\n' "$a"; done
printf 'env=TASK_ID=%s\n' "$TASK_ID"
printf 'env=TASK_DIR=%s\n' "$TASK_DIR"
printf 'env=PAYLOAD_FILE=%s\n' "$PAYLOAD_FILE"
printf 'env=CONFIG_FILE=%s\n' "$CONFIG_FILE"
printf 'pwd=%s\n' "$(pwd)"
printf 'payload64=%s\n' "$(base64 -w0 < "$PAYLOAD_FILE")"
printf 'config64=%s\n' "$(base64 -w0 < "$CONFIG_FILE")"
"""

RUN_ID = uuid.uuid4().hex[:8]
CODE_NAME = "pyclient-hello-%s" % RUN_ID
LONG_DELAY = 3600  # seconds; keeps "queued" tasks from ever being picked up
CLUSTER = os.environ.get("STEVEDORE_CLUSTER", "default")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def decode_py_bytes_repr(data):
    """Reference decoder for the iron-worker Python-3 upload bug: the zip part
    arrives as the text of Python's repr(bytes), e.g. b'PK\\x03\\x04...'.
    Returns the original bytes, or `data` unchanged if it is not such a repr."""
    if len(data) < 3 or data[:1] != b"b" or data[1:2] not in (b"'", b'"') \
            or data[-1:] != data[1:2]:
        return data
    body, out, i = data[2:-1], bytearray(), 0
    simple = {ord("\\"): 0x5C, ord("'"): 0x27, ord('"'): 0x22,
              ord("t"): 0x09, ord("n"): 0x0A, ord("r"): 0x0D}
    while i < len(body):
        c = body[i]
        if c != 0x5C:
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt == ord("x"):
            out.append(int(body[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(simple[nxt])
            i += 2
    return bytes(out)


@contextlib.contextmanager
def _in_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _isolated_config(home):
    """iron_core also reads ~/.iron.json, ./iron.json and IRON_* / IRON_WORKER_*
    env vars; keep the developer's real Iron.io settings out of the way."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith("IRON_"):
            del os.environ[k]
    os.environ["HOME"] = str(home)
    try:
        with _in_dir(home):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _hello_package(workdir, name):
    script = os.path.join(str(workdir), "hello.sh")
    with open(script, "w") as f:
        f.write(HELLO_SH)
    os.chmod(script, 0o755)
    code = CodePackage(name=name, runtime="binary")
    code.merge(script)  # single file -> zip entry "hello.sh", executable "hello.sh"
    assert code.executable == "hello.sh"
    return code


def _upload_hello(worker, workdir, name):
    # upload() writes "<name>.zip" into the CWD and deletes it afterwards.
    with _in_dir(workdir):
        return worker.upload(_hello_package(workdir, name))


def _aware(value):
    assert isinstance(value, dt.datetime), value
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _queue_delayed(worker, **extra):
    args = dict(code_name=CODE_NAME, payload={"n": random.randint(0, 10**6)},
                delay=LONG_DELAY)
    args.update(extra)
    t = worker.queue(**args)
    assert isinstance(t, Task)
    assert isinstance(t.id, str) and t.id
    assert t.scheduled is False
    return t


def _write_script(workdir, name, text):
    path = os.path.join(str(workdir), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def _upload_worker(worker, workdir, name):
    """Uploads WORKER_SH as a `binary` zip code, the way upload(path_to_file) does it."""
    sub = os.path.join(str(workdir), name)
    os.makedirs(sub, exist_ok=True)
    script = _write_script(sub, "worker.sh", WORKER_SH)
    code = CodePackage(name=name, runtime="binary")  # upload(path) alone would say "python"
    code.merge(script)
    with _in_dir(sub):
        return worker.upload(code)


def _raw(worker):
    """The client's base URL and auth, for what the client itself cannot send."""
    c = worker.client
    return c.base_url, {"Authorization": "OAuth %s" % c.token}


def _wait_status(worker, task_id, wanted, timeout=90):
    deadline = time.time() + timeout
    task = worker.task(task_id)
    while task.status not in wanted:
        assert time.time() < deadline, "task %s stayed %s, wanted %s" % (
            task_id, task.status, wanted)
        time.sleep(0.3)
        task = worker.task(task_id)
    return task


FINISHED = ("complete", "error", "timeout", "cancelled")


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ironpy")


@pytest.fixture(scope="module")
def worker(stevedore_settings, workdir):
    s = stevedore_settings
    with _isolated_config(workdir):
        if s["iron_json"]:
            w = IronWorker(config_file=s["iron_json"])
        else:
            w = IronWorker(host=s["host"], port=s["port"], protocol=s["protocol"],
                           project_id=s["project_id"], token=s["token"], api_version=2)
    return w


@pytest.fixture(scope="module")
def uploaded(worker, workdir):
    up = _upload_hello(worker, workdir, CODE_NAME)
    return up


@pytest.fixture(scope="module")
def runner_code(worker, workdir):
    """A code that really runs; its payload's "mode" says how (see WORKER_SH)."""
    name = "pyclient-worker-%s" % RUN_ID
    _upload_worker(worker, workdir, name)
    return name


# --------------------------------------------------------------------------
# offline: client quirks (no server needed)
# --------------------------------------------------------------------------
def test_offline_multipart_body_carries_python_bytes_repr(tmp_path):
    code = _hello_package(tmp_path, "x")
    with _in_dir(tmp_path):
        assert code.zip()
        with open(code.zip_path, "rb") as f:
            zip_bytes = f.read()
    ctype, body = IronWorker.encode_multipart_formdata(
        [("data", json.dumps({"name": "x", "runtime": "binary", "file_name": "hello.sh"}))],
        [("file", code.zip_path, zip_bytes)])
    assert ctype == "multipart/form-data; boundary=----------ThIs_Is_tHe_bouNdaRY_$"
    assert isinstance(body, str)
    assert "Content-Type: application/zip\r\n\r\nb'PK\\x03\\x04" in body
    part = body.split("Content-Type: application/zip\r\n\r\n", 1)[1]
    part = part.rsplit("\r\n------------ThIs_Is_tHe_bouNdaRY_$--\r\n", 1)[0]
    decoded = decode_py_bytes_repr(part.encode("latin-1"))
    assert decoded == zip_bytes
    names = zipfile.ZipFile(io.BytesIO(decoded)).namelist()
    assert names == ["hello.sh"]


@pytest.mark.parametrize("blob", [
    bytes(range(256)), b"", b"'", b'"', b"'\"", b"PK\x03\x04'abc\\",
    bytes(random.Random(7).getrandbits(8) for _ in range(4096)),
])
def test_offline_bytes_repr_decoder_roundtrip(blob):
    assert decode_py_bytes_repr(repr(blob).encode("ascii")) == blob


def test_offline_task_parsing_quirks():
    # any schedule-ish key, even null, flips Task.scheduled -> cancel()/log() misroute
    assert Task({"id": "t", "start_at": None}).scheduled is True
    assert Task({"id": "t", "status": "queued"}).scheduled is False
    # "msg" -> .message; "message" ignored; payload JSON string decoded
    t = Task({"id": "t", "msg": "m", "message": "x", "payload": '{"a": 1}'})
    assert t.message == "m" and t.payload == {"a": 1}
    # empty-string timestamps crash the client
    with pytest.raises(ValueError):
        Task({"id": "t", "created_at": ""})


def test_offline_static_helpers():
    assert IronWorker.get_content_type("x.zip") == "application/zip"
    assert IronWorker.get_content_type("x.unknown-ext") == "application/octet-stream"
    # run()/wait_for_*: 0.5 s doubling, held once it reaches 60 s or more
    assert IronWorker.sleep_between_retries(0.5) == 1
    assert IronWorker.sleep_between_retries(32) == 64
    assert IronWorker.sleep_between_retries(64) == 64


def test_offline_merge_ignore_root_dir_mangles_names(tmp_path):
    """Client bug: merge(dir, ignoreRootDir=True) uses str.lstrip(target), which strips a
    set of characters, not a prefix; names starting with one of them lose letters."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "gopher.sh").write_text("x")
    (pkg / "run.sh").write_text("x")
    with _in_dir(tmp_path):
        code = CodePackage(name="x")
        code.merge("./pkg", ignoreRootDir=True)
    assert sorted(code.files) == ["opher.sh", "run.sh"]
    with _in_dir(tmp_path):
        code = CodePackage(name="x")
        code.merge("pkg")
    assert sorted(code.files) == ["pkg/gopher.sh", "pkg/run.sh"]
    assert code.executable is None  # only a single file sets it


def test_offline_merge_dependency_keeps_one_file_per_directory(capsys):
    """Client bug: merge_dependency() tests the path after the inner loop, so it packs
    only the last file of every directory of the module (and prints to stdout)."""
    import dateutil
    code = CodePackage(name="x")
    code.merge_dependency("dateutil")
    root = os.path.dirname(dateutil.__file__)
    dirs_with_files = sum(1 for _, _, files in os.walk(root) if files)
    all_files = sum(len(files) for _, _, files in os.walk(root))
    assert len(code.files) == dirs_with_files < all_files
    assert capsys.readouterr().out  # the module's location, printed


# --------------------------------------------------------------------------
# live server: configuration
# --------------------------------------------------------------------------
def test_client_points_at_server(worker, stevedore_settings):
    s = stevedore_settings
    c = worker.client
    assert c.project_id == s["project_id"]
    assert c.token == s["token"]
    if c.protocol == "https" and c.port == 443:
        expected = "https://%s/%s/projects/%s/" % (s["host"], s["api_version"], s["project_id"])
    else:
        expected = "%s://%s:%s/%s/projects/%s/" % (s["protocol"], s["host"], s["port"],
                                                  s["api_version"], s["project_id"])
    assert c.base_url == expected
    assert c.headers["User-Agent"] == "iron_worker_python (version: 1.3.8)"


# --------------------------------------------------------------------------
# live server: code packages
# --------------------------------------------------------------------------
def test_upload_zip_code(uploaded):
    assert isinstance(uploaded, CodePackage)
    assert isinstance(uploaded.id, str) and uploaded.id


def test_get_code(worker, uploaded, stevedore_settings):
    c = worker.code(uploaded.id)
    assert c.id == uploaded.id
    assert c.name == CODE_NAME
    assert c.runtime == "binary"
    assert c.project == stevedore_settings["project_id"]  # from "project_id"
    assert isinstance(c.revision, int) and c.revision >= 1  # from "rev"
    raw = worker.client.get("codes/%s" % uploaded.id)["body"]
    assert isinstance(raw.get("latest_change"), str)  # must be an RFC 3339 string
    assert isinstance(c.latest_change, dt.datetime)


def test_list_codes(worker, uploaded):
    codes = worker.codes()
    assert codes, "GET codes returned no codes"
    for c in codes:
        assert isinstance(c, CodePackage) and c.id and c.name
    if len(codes) < 30:  # client cannot page codes; Iron's default page is 30
        mine = [c for c in codes if c.name == CODE_NAME]
        assert [c.id for c in mine] == [uploaded.id]


def test_download_returns_real_zip(worker, uploaded):
    """IronWorker.download() itself is broken (calls Response.getheader); use
    the client's transport. Proves the server decoded the bytes-repr upload."""
    resp = worker.client.get("codes/%s/download" % uploaded.id)["resp"]
    assert resp.status_code == 200
    zf = zipfile.ZipFile(io.BytesIO(resp.content))
    assert "hello.sh" in zf.namelist()
    assert zf.read("hello.sh").decode() == HELLO_SH


def test_reupload_adds_revision(worker, workdir, uploaded):
    before = worker.code(uploaded.id).revision
    again = _upload_hello(worker, workdir, CODE_NAME)
    assert again.id == uploaded.id  # same name -> same code, new revision
    after = worker.code(uploaded.id)
    assert after.revision == before + 1
    revs = worker.revisions(uploaded.id)
    assert all(isinstance(r, CodePackage) for r in revs)
    numbers = {r.revision for r in revs}
    assert {before, before + 1} <= numbers


def test_delete_code(worker, workdir):
    name = "pyclient-doomed-%s" % RUN_ID
    up = _upload_hello(worker, workdir, name)
    assert worker.deleteCode(up.id) is True
    with pytest.raises(HTTPError) as exc:
        worker.code(up.id)
    assert exc.value.response.status_code == 404


def test_download_is_broken_in_the_client_but_served(worker, workdir, uploaded):
    """download() fails before it reads anything: it calls the http.client method
    Response.getheader on a requests Response (and would then write the str body of a
    non-JSON reply into a binary file). The server side it would use is checked raw."""
    with pytest.raises(AttributeError, match="getheader"):
        worker.download(uploaded.id)
    base, auth = _raw(worker)
    code = worker.code(uploaded.id)
    for rev in sorted({1, code.revision}):
        r = requests.get(base + "codes/%s/download?revision=%s" % (uploaded.id, rev),
                         headers=auth)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/zip"
        assert r.headers["Content-Disposition"] == 'attachment; filename="%s_%s.zip"' % (CODE_NAME, rev)
        assert zipfile.ZipFile(io.BytesIO(r.content)).read("hello.sh").decode() == HELLO_SH
    r = requests.get(base + "codes/%s/download?revision=999" % uploaded.id, headers=auth)
    assert r.status_code == 404 and "msg" in r.json()


def test_revisions_follow_the_documented_shape(worker, uploaded):
    revs = worker.revisions(uploaded.id)
    assert revs and all(r.name == CODE_NAME for r in revs)
    raw = worker.client.get("codes/%s/revisions" % uploaded.id)["body"]["revisions"]
    assert all(r["code_id"] == uploaded.id for r in raw)
    assert len({r["id"] for r in raw}) == len(raw), "each revision has an id of its own"


def test_post_code_with_an_explicit_zip(worker, workdir):
    name = "pyclient-postcode-%s" % RUN_ID
    sub = os.path.join(str(workdir), name)
    os.makedirs(sub)
    script = _write_script(sub, "hello.sh", HELLO_SH)
    code = CodePackage(name=name, runtime="binary")
    code.merge(script)
    with _in_dir(sub):
        assert code.zip(destination="custom.zip")
        posted = worker.postCode(code, zipFilename="custom.zip")
        with open("custom.zip", "rb") as f:
            zip_bytes = f.read()
    assert isinstance(posted, CodePackage) and posted.id
    got = worker.code(posted.id)
    assert (got.name, got.runtime, got.revision) == (name, "binary", 1)
    base, auth = _raw(worker)
    r = requests.get(base + "codes/%s/download" % posted.id, headers=auth)
    assert r.content == zip_bytes
    with pytest.raises(ValueError):  # checked client-side: no request is made
        worker.postCode(CodePackage(name=name))


def test_upload_directory_form_registers_python(worker, workdir):
    """upload(dir, name, executable) keeps the walked paths (with the directory) and,
    given no CodePackage, always registers runtime "python"."""
    name = "pyclient-dir-%s" % RUN_ID
    base_dir = os.path.join(str(workdir), name)
    os.makedirs(os.path.join(base_dir, "app", "lib"))
    _write_script(os.path.join(base_dir, "app"), "main.py", "print('hi')\n")
    with open(os.path.join(base_dir, "app", "lib", "data.txt"), "w") as f:
        f.write("data\n")
    with _in_dir(base_dir):
        up = worker.upload("app", name=name, executable="app/main.py")
        assert not os.path.exists(name + ".zip"), "upload() removes its zip"
    got = worker.code(up.id)
    assert got.runtime == "python"
    raw = worker.client.get("codes/%s" % up.id)["body"]
    assert raw["file_name"] == "app/main.py"
    base, auth = _raw(worker)
    r = requests.get(base + "codes/%s/download" % up.id, headers=auth)
    assert sorted(zipfile.ZipFile(io.BytesIO(r.content)).namelist()) == [
        "app/lib/data.txt", "app/main.py"]
    worker.deleteCode(up.id)


@pytest.mark.skip(reason="iron-worker 1.3.8 cannot register image codes: postCode() "
                         "only sends name/runtime/file_name plus a zip file")
def test_upload_image_code():
    pass


# --------------------------------------------------------------------------
# live server: tasks
# --------------------------------------------------------------------------
def test_queue_task_and_get_it(worker, uploaded):
    payload = {"hello": "world", "nested": {"n": [1, 2, 3]}, "unicode": "h\u00e9"}
    t = _queue_delayed(worker, payload=payload, priority=2, timeout=120,
                       label="pyclient-label", cluster=CLUSTER)
    g = worker.task(t.id)
    assert g.scheduled is False, "task JSON must not carry schedule keys (start_at, ...)"
    assert g.id == t.id
    assert g.status == "queued"
    assert g.code_name == CODE_NAME
    assert g.payload == payload  # payload is a JSON string; client json.loads it
    assert g.priority == 2
    assert g.timeout == 120
    assert g.label == "pyclient-label"
    assert g.cluster == CLUSTER
    assert isinstance(g.created_at, dt.datetime)
    assert abs((_aware(g.created_at) - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 300
    worker.cancel(t.id)


def test_queue_defaults_and_string_payload(worker, uploaded):
    t = worker.queue(code_name=CODE_NAME, payload="not json at all", delay=LONG_DELAY)
    g = worker.task(t.id)
    assert g.payload == "not json at all"
    assert g.priority == 0
    assert g.timeout == 3600  # client always sends timeout (default 3600)
    worker.cancel(t.id)


def test_queue_many_tasks_returns_list(worker, uploaded):
    tasks = [Task(code_name=CODE_NAME, payload={"i": i}, delay=LONG_DELAY) for i in range(3)]
    out = worker.queue(tasks=tasks)
    assert isinstance(out, list) and len(out) == 3
    ids = [t.id for t in out]
    assert len(set(ids)) == 3
    assert [worker.task(i).payload for i in ids] == [{"i": 0}, {"i": 1}, {"i": 2}]
    for i in ids:
        worker.cancel(i)


def test_list_tasks(worker, uploaded):
    mine = {_queue_delayed(worker).id for _ in range(3)}
    listed = worker.tasks(code_name=CODE_NAME, per_page=100)
    assert mine <= {t.id for t in listed}
    assert all(isinstance(t, Task) and t.code_name == CODE_NAME for t in listed)
    assert mine <= {t.id for t in worker.tasks_by_code_name(CODE_NAME)}
    queued = worker.tasks(code_name=CODE_NAME, queued=True, per_page=100)
    assert mine <= {t.id for t in queued}
    assert all(t.status == "queued" for t in queued)
    now = int(time.time())
    assert mine <= {t.id for t in worker.tasks(code_name=CODE_NAME, per_page=100,
                                               from_time=now - 600)}
    assert not mine & {t.id for t in worker.tasks(code_name=CODE_NAME, per_page=100,
                                                  to_time=now - 600)}
    # pagination: page is 0-based and omitted by the client when 0
    total = len(listed)
    seen = []
    for page in range(total):
        got = worker.tasks(code_name=CODE_NAME, page=page, per_page=1)
        assert len(got) == 1
        seen.append(got[0].id)
    assert len(set(seen)) == total
    assert worker.tasks(code_name=CODE_NAME, page=total, per_page=1) == []
    for i in mine:
        worker.cancel(i)


def test_cancel_queued_task(worker, uploaded):
    t = _queue_delayed(worker)
    fetched = worker.task(t.id)
    assert worker.cancel(fetched) is True  # routed by fetched.scheduled
    g = worker.task(t.id)
    assert g.status == "cancelled"
    cancelled = worker.tasks(code_name=CODE_NAME, cancelled=True, per_page=100)
    assert t.id in {x.id for x in cancelled}
    assert all(x.status == "cancelled" for x in cancelled)


def test_set_progress(worker, uploaded):
    t = _queue_delayed(worker)
    worker.setProgress(t.id, 42, "almost there")
    g = worker.task(t.id)
    assert g.percent == 42
    assert g.message == "almost there"  # read from the task's "msg" key
    worker.cancel(t.id)


def test_retry_cancelled_task(worker, uploaded):
    t = _queue_delayed(worker, payload={"retry": True})
    worker.cancel(t.id)
    body = worker.retry(t.id, delay=LONG_DELAY)
    assert isinstance(body, dict)
    new_ids = [x["id"] for x in body["tasks"]]
    assert len(new_ids) == 1 and new_ids[0] != t.id
    g = worker.task(new_ids[0])
    assert g.status == "queued"
    assert g.code_name == CODE_NAME
    assert g.payload == {"retry": True}
    worker.cancel(new_ids[0])


def test_unknown_task_is_404(worker):
    with pytest.raises(HTTPError) as exc:
        worker.task("000000000000000000000000")
    assert exc.value.response.status_code == 404


# --------------------------------------------------------------------------
# live server: schedules
# --------------------------------------------------------------------------
def test_schedule_lifecycle(worker, uploaded):
    ist = dt.timezone(dt.timedelta(hours=5, minutes=30))
    start_at = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)).astimezone(ist)
    end_at = start_at + dt.timedelta(days=7)
    s = worker.queue(code_name=CODE_NAME, payload={"sched": 1}, run_every=3600,
                     start_at=start_at, end_at=end_at, run_times=10, priority=1,
                     label="pyclient-sched")
    assert isinstance(s, Task) and s.scheduled is True
    assert isinstance(s.id, str) and s.id

    g = worker.task(s.id, scheduled=True)
    assert g.scheduled is True, "schedule JSON must carry start_at/run_every/next_start/..."
    assert g.id == s.id
    assert g.status == "scheduled"
    assert g.code_name == CODE_NAME
    assert g.run_every == 3600
    assert g.run_times == 10
    assert g.priority == 1
    assert g.payload == {"sched": 1}
    assert abs((_aware(g.start_at) - start_at).total_seconds()) < 1.0
    assert abs((_aware(g.end_at) - end_at).total_seconds()) < 1.0

    found = []
    for page in range(50):  # client default per_page=30; page through to be safe
        batch = worker.tasks(scheduled=True, page=page, per_page=100)
        found += [x for x in batch if x.id == s.id]
        if found or len(batch) < 100:
            break
    assert len(found) == 1 and found[0].scheduled is True
    assert found[0].code_name == CODE_NAME

    assert worker.cancel(g) is True  # routed to schedules/{id}/cancel by g.scheduled
    assert worker.task(s.id, scheduled=True).status == "cancelled"


def test_schedule_with_naive_start_at(worker, uploaded):
    # naive datetimes are stamped with the client's local zone before sending
    start_at = dt.datetime.now() + dt.timedelta(hours=3)
    s = worker.queue(code_name=CODE_NAME, run_every=3600, start_at=start_at)
    g = worker.task(s.id, scheduled=True)
    expected = start_at.astimezone(dt.timezone.utc)
    assert abs((_aware(g.start_at) - expected).total_seconds()) < 1.0
    worker.cancel(s.id, scheduled=True)
    assert worker.task(s.id, scheduled=True).status == "cancelled"


# --------------------------------------------------------------------------
# live server: actually running a task
# --------------------------------------------------------------------------
@pytest.mark.runs_containers
def test_run_zip_task_and_read_log(worker, workdir):
    name = "pyclient-run-%s" % RUN_ID
    _upload_hello(worker, workdir, name)
    t = worker.queue(code_name=name, payload={"hello": "world"}, timeout=60)
    deadline = time.time() + 60
    status = None
    while time.time() < deadline:
        status = worker.task(t.id).status
        if status not in ("queued", "preparing", "running"):
            break
        time.sleep(1)
    assert status == "complete"
    log = worker.log(t.id)
    assert isinstance(log, str), "log must be served as text/plain, not JSON"
    assert "task_id=%s" % t.id in log
    assert '{"hello": "world"}' in log


@pytest.mark.runs_containers
def test_upload_directory_and_run_it(worker, workdir):
    name = "pyclient-dirrun-%s" % RUN_ID
    base_dir = os.path.join(str(workdir), name)
    os.makedirs(os.path.join(base_dir, "app", "lib"))
    _write_script(os.path.join(base_dir, "app"), "run.sh",
                  "#!/bin/sh\ncat app/lib/data.txt\necho \"cwd=$(pwd)\"\n")
    with open(os.path.join(base_dir, "app", "lib", "data.txt"), "w") as f:
        f.write("data from the package\n")
    code = CodePackage(name=name, runtime="binary")
    with _in_dir(base_dir):
        code.merge("app")  # relative: the zip keeps "app/..." as walked
        worker.upload(code, executable="app/run.sh")
    t = worker.queue(code_name=name, timeout=60)
    done = worker.wait_for_task(t)
    assert done.status == "complete"
    log = worker.log(t.id)
    assert "data from the package" in log
    assert "cwd=/mnt/task" in log


@pytest.mark.runs_containers
def test_run_waits_and_returns_the_output(worker, runner_code):
    out = worker.run(code_name=runner_code, payload={"sync": "yes"}, timeout=60)
    assert isinstance(out, str)
    assert "payload:" in out and '{"sync": "yes"}' in out
    mine = worker.tasks(code_name=runner_code, complete=True, per_page=100)
    assert any(t.payload == {"sync": "yes"} for t in mine)


@pytest.mark.runs_containers
def test_run_of_a_silent_task_returns_empty_output(worker, runner_code):
    """A task that prints nothing: outlog must answer "" once it is finished, or run()
    retries the 404 sixty times with sleeps of up to a minute."""
    started = time.time()
    out = worker.run(code_name=runner_code, payload={"mode": "silent"}, timeout=60)
    assert out == ""
    assert time.time() - started < 60


@pytest.mark.runs_containers
def test_wait_for_task_and_its_log_and_stdout(worker, runner_code):
    t = worker.queue(code_name=runner_code, payload={"wait": 1}, timeout=60)
    assert worker.task(t.id).status in ("queued", "preparing", "running", "complete")
    done = worker.wait_for_task(t)  # a Task or an id
    assert isinstance(done, Task) and done.id == t.id
    assert done.status == "complete"
    assert done.scheduled is False
    assert isinstance(done.duration, int) and done.duration >= 0  # milliseconds
    assert isinstance(done.start_time, str) and isinstance(done.end_time, str)
    assert isinstance(done.updated_at, dt.datetime)
    assert done.run_times == 1
    log = worker.wait_for_task_log(t.id)
    assert "task_id=%s" % t.id in log and '{"wait": 1}' in log
    assert worker.wait_for_task_stdout(done) == log
    assert worker.stdout(t.id) == log


@pytest.mark.runs_containers
def test_every_status_flag_retry_progress_and_cancel(worker, runner_code):
    """Real tasks in every end state, listed by each status flag the client has."""
    ok = worker.queue(code_name=runner_code, payload={"mode": "ok"}, timeout=60)
    failed = worker.queue(code_name=runner_code, payload={"mode": "fail"}, timeout=60)
    slow = worker.queue(code_name=runner_code, payload={"mode": "sleep"}, timeout=2)
    assert _wait_status(worker, ok.id, FINISHED).status == "complete"
    bad = _wait_status(worker, failed.id, FINISHED)
    assert bad.status == "error"
    assert "failing on purpose" in worker.log(failed.id)
    assert _wait_status(worker, slow.id, FINISHED).status == "timeout"

    # A running task: progress from outside, then cancel kills its container.
    long = worker.queue(code_name=runner_code, payload={"mode": "sleep"}, timeout=300)
    _wait_status(worker, long.id, ("running",))
    running = worker.tasks(code_name=runner_code, running=True, per_page=100)
    assert long.id in {t.id for t in running}
    assert all(t.status == "running" for t in running)
    worker.setProgress(long.id, 30, "a third")
    g = worker.task(long.id)
    assert (g.percent, g.message) == (30, "a third")
    cancel_sent = time.time()
    assert worker.cancel(long.id) is True
    assert _wait_status(worker, long.id, FINISHED, timeout=20).status == "cancelled"
    assert time.time() - cancel_sent < 15

    def listed(**flag):
        got = worker.tasks(code_name=runner_code, per_page=100, **flag)
        return got, {t.id for t in got}

    for flag, task, status in [("complete", ok, "complete"), ("error", failed, "error"),
                               ("timeout", slow, "timeout"), ("cancelled", long, "cancelled"),
                               ("killed", long, "cancelled")]:
        got, ids = listed(**{flag: True})
        assert task.id in ids, flag
        assert all(t.status == status for t in got), flag
    got, ids = listed(queued=True)
    assert not ids & {ok.id, failed.id, slow.id, long.id}
    # flags combine as "any of"
    _, ids = listed(complete=True, error=True)
    assert {ok.id, failed.id} <= ids and slow.id not in ids

    # retry: a new task with the same payload, which really runs again
    body = worker.retry(failed.id, delay=0)
    new_id = body["tasks"][0]["id"]
    assert new_id != failed.id
    again = _wait_status(worker, new_id, FINISHED)
    assert again.status == "error" and again.payload == {"mode": "fail"}
    raw = worker.client.get("tasks/%s" % new_id)["body"]
    assert raw["original_task_id"] == failed.id and raw["retry_count"] == 1
    body = worker.retry(ok.id)  # the client's default delay is 1 s
    assert _wait_status(worker, body["tasks"][0]["id"], FINISHED).status == "complete"
    # as on IronWorker, a task still queued can be retried too: a copy is queued beside it
    waiting = _queue_delayed(worker)
    body = worker.retry(waiting.id)
    copy = worker.task(body["tasks"][0]["id"])
    assert copy.id != waiting.id and copy.status == "queued"
    assert worker.task(waiting.id).status == "queued"
    worker.cancel(copy.id)
    worker.cancel(waiting.id)


@pytest.mark.runs_containers
def test_a_schedule_fires_real_tasks(worker, runner_code):
    start_at = dt.datetime.now(dt.timezone.utc)
    s = worker.queue(code_name=runner_code, payload={"from": "schedule"},
                     start_at=start_at, run_times=1)
    assert s.scheduled is True
    deadline = time.time() + 60
    fired = []
    while not fired:
        assert time.time() < deadline, "the schedule made no task"
        time.sleep(0.5)
        fired = [t for t in worker.tasks(code_name=runner_code, per_page=100)
                 if t.schedule_id == s.id]
    done = worker.wait_for_task(fired[0].id)
    assert done.status == "complete" and done.scheduled is False
    assert '{"from": "schedule"}' in worker.log(done.id)
    sched = worker.task(s.id, scheduled=True)
    assert sched.run_count == 1
    assert sched.status == "complete"
    assert isinstance(sched.last_run_time, dt.datetime)


HELPER_PROBE = """
import json, sys
sys.argv = json.loads(sys.argv[1])
from iron_worker import IronWorker
assert not IronWorker.loaded()
out = {"task_id": IronWorker.task_id(), "task_dir": IronWorker.task_dir(),
       "payload": IronWorker.payload(), "config": IronWorker.config()}
assert IronWorker.loaded()
assert IronWorker.args()["task_id"] == out["task_id"]
print(json.dumps(out))
"""


@pytest.mark.runs_containers
def test_worker_helpers_read_what_the_container_got(worker, workdir, tmp_path):
    """payload(), config(), task_id() and task_dir() run inside a task; here a shell worker
    captures its argv, env and files, and the helpers run against that copy, with the
    container's paths moved under a scratch root, each way of passing them alone (the
    helpers inside a real Python task: the test after this one)."""
    name = "pyclient-capture-%s" % RUN_ID
    config = {"db": "postgres://example", "n": 2}
    zip_buf = io.BytesIO()
    with zipfile.ZipFile(zip_buf, "w") as z:
        info = zipfile.ZipInfo("capture.sh")
        info.external_attr = 0o100755 << 16
        z.writestr(info, CAPTURE_SH)
    base, auth = _raw(worker)
    # the client cannot send a code's config, so this upload is raw
    data = {"name": name, "runtime": "binary", "file_name": "capture.sh",
            "config": json.dumps(config)}
    r = requests.post(base + "codes", headers=auth,
                      files={"data": (None, json.dumps(data)),
                             "file": ("capture.zip", zip_buf.getvalue(), "application/zip")})
    assert r.status_code == 200, r.text
    payload = {"hello": "world", "list": [1, 2], "unicode": "h\u00e9"}
    t = worker.queue(code_name=name, payload=payload, timeout=60)
    assert worker.wait_for_task(t).status == "complete"
    lines = worker.log(t.id).splitlines()

    args = [l[len("arg="):] for l in lines if l.startswith("arg=")]
    env = dict(l[len("env="):].split("=", 1) for l in lines if l.startswith("env="))
    fields = dict(l.split("=", 1) for l in lines if "=" in l and not l.startswith(("arg=", "env=")))
    # the contract: argv flags and env vars agree, the working directory is TASK_DIR
    assert args[0::2] == ["-id", "-d", "-payload", "-config"]
    flags = dict(zip(args[0::2], args[1::2]))
    assert flags == {"-id": t.id, "-d": env["TASK_DIR"], "-payload": env["PAYLOAD_FILE"],
                     "-config": env["CONFIG_FILE"]}
    assert env["TASK_ID"] == t.id and fields["pwd"] == env["TASK_DIR"] == "/mnt/task"
    payload_bytes = base64.b64decode(fields["payload64"])
    config_bytes = base64.b64decode(fields["config64"])
    assert json.loads(payload_bytes) == payload and json.loads(config_bytes) == config

    root = str(tmp_path / "root")
    moved = lambda p: root + p if p.startswith("/") else p
    os.makedirs(moved(env["TASK_DIR"]))
    for path, blob in ((env["PAYLOAD_FILE"], payload_bytes), (env["CONFIG_FILE"], config_bytes)):
        os.makedirs(os.path.dirname(moved(path)), exist_ok=True)
        with open(moved(path), "wb") as f:
            f.write(blob)
    contract_env = {k: moved(v) if k != "TASK_ID" else v for k, v in env.items()}
    moved_args = [moved(a) for a in args]
    clean = {k: v for k, v in os.environ.items() if k not in contract_env}
    expected = {"task_id": t.id, "task_dir": moved(env["TASK_DIR"]),
                "payload": payload, "config": config}
    for label, argv, extra in [("argv and env, as in the container", moved_args, contract_env),
                               ("argv flags alone", moved_args, {}),
                               ("env vars alone", [], contract_env)]:
        out = subprocess.run([sys.executable, "-c", HELPER_PROBE,
                              json.dumps(["worker.sh"] + argv)],
                             env=dict(clean, **extra), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, (label, out.stderr)
        assert json.loads(out.stdout.splitlines()[-1]) == expected, label


# A worker as users ship one: it imports the client and its dependencies from its own zip and
# reads its task through the client's in-task helpers.
HELPER_WORKER_PY = r"""import sys
from dateutil import parser
from iron_worker import IronWorker

payload = IronWorker.payload()
print("python %d.%d runs the worker" % sys.version_info[:2])
print("payload=%s" % json_dumps(payload))
print("config=%s" % json_dumps(IronWorker.config()))
print("task_id=%s" % IronWorker.task_id())
print("weekday=%s" % parser.isoparse(payload["when"]).strftime("%A"))
"""


def _vendor(module, destination):
    """Copies an installed module or package into `destination`, as `pip install --target`
    would lay it out, without caches."""
    import importlib
    import shutil
    location = importlib.import_module(module).__file__
    if os.path.basename(location) == "__init__.py":
        source = os.path.dirname(location)
        shutil.copytree(source, os.path.join(destination, os.path.basename(source)),
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(location, destination)


@pytest.mark.runs_containers
def test_a_python_worker_with_vendored_dependencies_reads_its_task_through_the_helpers(
        worker, workdir):
    """The client uploads `runtime: "python"` and no stack: the worker runs under python3 on
    the python stack, importing iron_worker, iron_core, requests and dateutil from its zip."""
    name = "pyclient-helpers-%s" % RUN_ID
    base_dir = os.path.join(str(workdir), name)
    os.makedirs(base_dir)
    with open(os.path.join(base_dir, "worker.py"), "w") as f:
        f.write("import json\njson_dumps = lambda v: json.dumps(v, sort_keys=True)\n")
        f.write(HELPER_WORKER_PY)
    for module in ("iron_worker", "iron_core", "requests", "urllib3", "idna",
                   "charset_normalizer", "certifi", "dateutil"):
        _vendor(module, base_dir)
    code = CodePackage(name=name)
    with _in_dir(base_dir):
        code.merge(".")
        uploaded = worker.upload(code, executable="worker.py")
    assert uploaded.id
    info = worker.code(uploaded.id)
    assert info.runtime == "python"
    # the client cannot send a code's config: an options update adds it and keeps the zip
    base, auth = _raw(worker)
    config = {"greeting": "from the config"}
    r = requests.post(base + "codes", headers=auth,
                      json={"name": name, "config": json.dumps(config)})
    assert r.status_code == 200, r.text
    raw_code = requests.get(base + "codes/%s" % uploaded.id, headers=auth).json()
    assert raw_code["stack"] == "python-3.11", raw_code

    payload = {"hello": "world", "when": "2026-12-04T10:00:00Z"}
    t = worker.queue(code_name=name, payload=payload, timeout=60)
    done = worker.wait_for_task(t)
    log = worker.log(t.id)
    assert done.status == "complete", log
    assert "python 3.11 runs the worker" in log
    assert "payload=%s" % json.dumps(payload, sort_keys=True) in log
    assert "config=%s" % json.dumps(config, sort_keys=True) in log
    assert "task_id=%s" % t.id in log
    assert "weekday=Friday" in log

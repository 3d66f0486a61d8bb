"""Drive a live stevedore server with the official IronWorker Python client
(iron-worker 1.3.8 / iron-core 1.2.1, see requirements.txt).

Server location: see conftest.py (STEVEDORE_IRON_JSON, or STEVEDORE_HOST /
STEVEDORE_PORT / STEVEDORE_PROJECT_ID / STEVEDORE_TOKEN). Without it every
server test is skipped; the `test_offline_*` tests always run and pin down
client quirks the server must cope with (see IRON_WORKER_PYTHON.md).

Nothing here waits for a task to run, except the `runs_containers` test
(enabled by STEVEDORE_RUNS_TASKS=1). Every task queued by the other tests is
delayed, so a server with a real runner will not pick them up either.
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

import pytest
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

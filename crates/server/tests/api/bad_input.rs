use reqwest::Method;
use serde_json::json;
use stevedore_server::ServerConfig;

use crate::support::{TestServer, code_form, zip_of};

async fn task_count(server: &TestServer) -> usize {
    server.get("tasks?per_page=100").await.json()["tasks"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test]
async fn bad_tasks_are_refused_with_a_message_and_nothing_is_queued() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;

    let reply = server.post_raw("tasks", "{\"tasks\": [").await;
    assert!(reply.error(400).contains("invalid JSON"));
    let reply = server
        .post_raw(
            "tasks",
            "{\"tasks\": [{\"code_name\": \"hello\", \"priority\": \"high\"}]}",
        )
        .await;
    assert!(reply.error(400).contains("invalid type"));
    let reply = server.post("tasks", json!({"tasks": []})).await;
    assert!(reply.error(400).contains("at least one"));
    // A field stevedore cannot honour is refused, not dropped.
    let reply = server
        .post(
            "tasks",
            json!({"tasks": [{"code_name": "hello"}, {"code_name": "hello", "encrypted": true}]}),
        )
        .await;
    assert!(reply.error(400).contains("unknown field `encrypted`"));

    let cases = [
        (
            json!({"code_name": "hello", "priority": 3}),
            400,
            "priority",
        ),
        (
            json!({"code_name": "hello", "priority": 7}),
            400,
            "priority",
        ),
        (json!({"code_name": "hello", "timeout": -5}), 400, "timeout"),
        (
            json!({"code_name": "hello", "timeout": 86_401}),
            400,
            "timeout",
        ),
        (json!({"code_name": "hello", "delay": -1}), 400, "delay"),
        (
            json!({"code_name": "hello", "delay": 604_801}),
            400,
            "delay",
        ),
        (json!({"payload": "x"}), 400, "code_name"),
        (json!({"code_name": "nope"}), 404, "nope"),
        (
            json!({"code_name": "hello", "payload": "x".repeat(64 * 1024 + 1)}),
            413,
            "payload",
        ),
    ];
    for (task, status, needle) in cases {
        // A valid task first: the batch is all or nothing.
        let reply = server
            .post("tasks", json!({"tasks": [{"code_name": "hello"}, task]}))
            .await;
        let msg = reply.error(status);
        assert!(msg.contains(needle), "{msg:?} should mention {needle}");
        assert!(msg.contains("tasks[1]"), "{msg:?} should name the task");
    }
    assert_eq!(
        task_count(&server).await,
        0,
        "a refused batch queues nothing"
    );

    // Exactly at the limit is fine.
    server
        .queue(json!([{"code_name": "hello", "payload": "x".repeat(64 * 1024)}]))
        .await;
    assert_eq!(task_count(&server).await, 1);
}

#[tokio::test]
async fn the_payload_limit_is_configurable() {
    let server = TestServer::start_with(ServerConfig {
        max_payload_bytes: 10,
        ..ServerConfig::default()
    })
    .await;
    server.image_code("hello", json!({})).await;
    server
        .post(
            "tasks",
            json!({"tasks": [{"code_name": "hello", "payload": "01234567890"}]}),
        )
        .await
        .error(413);
    let url = format!("{}?code_name=hello", server.url("tasks/webhook"));
    let reply = server
        .send(
            server
                .http
                .post(url)
                .header("Authorization", format!("OAuth {}", server.token))
                .body("01234567890"),
        )
        .await;
    reply.error(413);
}

#[tokio::test]
async fn unknown_things_are_404_with_json() {
    let server = TestServer::start().await;
    server.get("tasks/0000").await.error(404);
    server.get("codes/0000").await.error(404);
    server.get("schedules/0000").await.error(404);
    server.post("tasks/0000/cancel", json!({})).await.error(404);
    server.get("no/such/endpoint").await.error(404);
    server.get("tasks?per_page=101").await.error(400);
    server.get("tasks?page=-1").await.error(400);
    server.get("tasks?from_time=soon").await.error(400);
}

#[tokio::test]
async fn bad_codes_are_refused() {
    let server = TestServer::start().await;
    let cases = [
        (json!({"image": "busybox"}), "name"),
        (json!({"name": "x"}), "image"),
        (json!({"name": "x", "image": "Not Valid"}), "image"),
        (
            json!({"name": "x", "image": "busybox", "memory": 1}),
            "memory",
        ),
        (
            json!({"name": "x", "image": "busybox", "default_priority": 5}),
            "default_priority",
        ),
        (
            json!({"name": "x", "image": "busybox", "max_concurrency": -7}),
            "max_concurrency",
        ),
        (
            json!({"name": "x", "image": "busybox", "env_vars": {"TASK_ID": "1"}}),
            "TASK_ID",
        ),
        (
            json!({"name": "x", "runtime": "cobol", "file_name": "a"}),
            "cobol",
        ),
        (
            json!({"name": "x", "runtime": "binary", "file_name": "a"}),
            "zip",
        ),
    ];
    for (data, needle) in cases {
        let reply = server.post("codes", data.clone()).await;
        let msg = reply.error(400);
        assert!(
            msg.contains(needle),
            "{data}: {msg:?} should mention {needle}"
        );
    }
    assert_eq!(server.get("codes").await.json()["codes"], json!([]));
}

#[tokio::test]
async fn hostile_zip_packages_are_refused() {
    let server = TestServer::start_with({
        let mut config = ServerConfig::default();
        config.package.max_bytes = 256 * 1024;
        config.package.max_unpacked_bytes = 1024 * 1024;
        config
    })
    .await;
    let data = json!({"name": "z", "runtime": "binary", "file_name": "run.sh"});
    let upload = |zip: Vec<u8>| {
        server
            .request(Method::POST, "codes")
            .multipart(code_form(data.clone(), Some(zip)))
    };

    let traversal = zip_of(&[
        ("run.sh", b"x", 0o755),
        ("../../etc/cron.d/evil", b"x", 0o644),
    ]);
    assert!(
        server
            .send(upload(traversal))
            .await
            .error(400)
            .contains("..")
    );
    let absolute = zip_of(&[("run.sh", b"x", 0o755), ("/etc/passwd", b"x", 0o644)]);
    server.send(upload(absolute)).await.error(400);
    let symlink = {
        let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        writer
            .add_symlink("run.sh", "/etc/shadow", options)
            .unwrap();
        writer.finish().unwrap().into_inner()
    };
    assert!(
        server
            .send(upload(symlink))
            .await
            .error(400)
            .contains("symbolic link")
    );
    let bomb = {
        use std::io::Write;
        let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        writer.start_file("run.sh", options).unwrap();
        writer.write_all(&vec![b' '; 8 * 1024 * 1024]).unwrap();
        writer.finish().unwrap().into_inner()
    };
    assert!(
        server
            .send(upload(bomb))
            .await
            .error(413)
            .contains("unpacks")
    );
    let too_big: Vec<u8> = (0u64..300 * 1024).map(|i| (i * 7919 % 251) as u8).collect();
    let large = zip_of(&[("run.sh", &too_big, 0o755)]);
    server.send(upload(large)).await.error(413);
    server.send(upload(b"not a zip".to_vec())).await.error(400);
    let missing = zip_of(&[("other.sh", b"x", 0o755)]);
    assert!(
        server
            .send(upload(missing))
            .await
            .error(400)
            .contains("run.sh")
    );

    assert_eq!(
        server.get("codes").await.json()["codes"],
        json!([]),
        "nothing half-written"
    );
}

/// Issue 15, item 8: a cron expression of any length was stored, and one that never fires
/// was refused as "end_at is in the past" with no end_at given.
#[tokio::test]
async fn overlong_and_never_firing_cron_expressions_are_refused_as_such() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let long = format!("0 0 * * {}", "1,".repeat(400_000));
    let msg = server
        .post(
            "schedules",
            json!({"schedules": [{"code_name": "hello", "cron": long}]}),
        )
        .await
        .error(400);
    assert!(msg.contains("cron") && msg.contains("256 bytes"), "{msg}");
    assert!(msg.len() < 200, "the message does not echo the expression");

    let msg = server
        .post(
            "schedules",
            json!({"schedules": [{"code_name": "hello", "cron": "0 0 30 2 *"}]}),
        )
        .await
        .error(400);
    assert!(msg.contains("never fires"), "{msg}");
    assert!(!msg.contains("end_at"), "{msg}");
    assert_eq!(server.get("schedules").await.json()["schedules"], json!([]));
}

/// Issue 15, item 8: `?status=bogus` listed every task.
#[tokio::test]
async fn an_unknown_task_status_filter_is_refused_with_the_known_ones() {
    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    server.queue(json!([{"code_name": "hello"}])).await;

    let msg = server.get("tasks?status=bogus").await.error(400);
    assert!(msg.contains("\"bogus\""), "{msg}");
    for status in ["queued", "running", "complete", "cancelled"] {
        assert!(msg.contains(status), "{msg} should list {status}");
    }
    assert!(
        server
            .get("tasks?queued=bogus")
            .await
            .error(400)
            .contains("queued")
    );

    let listed = |reply: crate::support::Reply| reply.json()["tasks"].as_array().unwrap().len();
    assert_eq!(listed(server.get("tasks?status=queued").await), 1);
    assert_eq!(listed(server.get("tasks?status=complete,error").await), 0);
    assert_eq!(listed(server.get("tasks?queued=0&complete=1").await), 0);
    assert_eq!(listed(server.get("tasks?queued=1").await), 1);
}

/// Issue 15, item 8: FIFOs, devices and two entries of one name were accepted in a package.
#[tokio::test]
async fn zip_packages_with_fifos_or_duplicate_names_are_refused() {
    let server = TestServer::start().await;
    let data = json!({"name": "z", "runtime": "binary", "file_name": "run.sh"});
    let upload = |zip: Vec<u8>| {
        server
            .request(Method::POST, "codes")
            .multipart(code_form(data.clone(), Some(zip)))
    };
    // The writer records permission bits only: set a FIFO's type bits in the central
    // directory, with "made by" unix so that they are read.
    let mut fifo = zip_of(&[("run.sh", b"x", 0o755), ("pipe", b"", 0o644)]);
    let header = fifo
        .windows(4)
        .rposition(|window| window == b"PK\x01\x02")
        .unwrap();
    fifo[header + 5] = 3;
    fifo[header + 38..header + 42].copy_from_slice(&(0o010_644u32 << 16).to_le_bytes());
    let msg = server.send(upload(fifo)).await.error(400);
    assert!(msg.contains("FIFO") && msg.contains("pipe"), "{msg}");

    // The writer refuses a name twice: write two names of one length and make them one.
    let mut twice = zip_of(&[
        ("run.sh", b"echo good", 0o755),
        ("run.sX", b"echo evil", 0o755),
    ]);
    for at in 0..twice.len() - 6 {
        if &twice[at..at + 6] == b"run.sX" {
            twice[at..at + 6].copy_from_slice(b"run.sh");
        }
    }
    let msg = server.send(upload(twice)).await.error(400);
    assert!(msg.contains("twice"), "{msg}");
    assert_eq!(server.get("codes").await.json()["codes"], json!([]));
}

/// Issue 15, item 8: the 413 named a 64 MiB limit while four times that and more was read
/// first. Each part of an upload is refused as soon as it passes its own limit, and the 413
/// names that limit; the whole body's limit stays for what the parts leave.
#[tokio::test]
async fn an_upload_over_the_named_limit_is_refused_at_that_limit() {
    let upload_dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.package.max_bytes = 256 * 1024;
    config.upload_dir = upload_dir.path().to_owned();
    let named = config.max_upload_bytes();
    assert_eq!(named, 256 * 1024 + ServerConfig::UPLOAD_FORM_OVERHEAD_BYTES);
    let server = TestServer::start_with(config).await;
    let data = json!({"name": "z", "runtime": "binary", "file_name": "run.sh"});
    let send = |form: reqwest::multipart::Form| {
        server.send(server.request(Method::POST, "codes").multipart(form))
    };

    // The package part: at the package limit, as sent.
    let msg = send(code_form(data.clone(), Some(vec![b'x'; named + 1])))
        .await
        .error(413);
    assert!(
        msg.contains(&format!("limit of {} bytes", 256 * 1024)),
        "{msg}"
    );
    let package: Vec<u8> = (0u64..300 * 1024).map(|i| (i * 7919 % 251) as u8).collect();
    let msg = send(code_form(
        data.clone(),
        Some(zip_of(&[("run.sh", &package, 0o755)])),
    ))
    .await
    .error(413);
    assert!(
        msg.contains(&format!("limit of {} bytes", 256 * 1024)),
        "{msg}"
    );
    // The Python client's repr counts as sent, and the message says so.
    let repr = format!("b'{}'", "\\x00".repeat(70 * 1024));
    let form = reqwest::multipart::Form::new()
        .text("data", data.to_string())
        .part(
            "file",
            reqwest::multipart::Part::text(repr).file_name("z.zip"),
        );
    let msg = send(form).await.error(413);
    assert!(
        msg.contains("bytes repr") && msg.contains(&format!("limit of {} bytes", 256 * 1024)),
        "{msg}"
    );

    // The `data` part, and any other part, at 1 MiB.
    let part_limit = ServerConfig::MAX_FORM_PART_BYTES;
    let long = json!({"name": "z", "runtime": "binary", "file_name": "run.sh", "config": "x".repeat(part_limit)});
    let msg = send(code_form(long, None)).await.error(413);
    assert!(
        msg.contains("`data` part") && msg.contains(&format!("limit of {part_limit} bytes")),
        "{msg}"
    );
    let form = code_form(data.clone(), None).text("extra", "x".repeat(part_limit + 1));
    let msg = send(form).await.error(413);
    assert!(msg.contains("`extra` part"), "{msg}");

    // Parts each within their limits that add up past the body's limit meet that one.
    let form = code_form(data.clone(), None)
        .text("one", "x".repeat(part_limit - 1024))
        .text("two", "x".repeat(part_limit - 1024));
    let msg = send(form).await.error(413);
    assert!(msg.contains(&format!("limit of {named} bytes")), "{msg}");

    // Two parts of one name are refused rather than one silently chosen.
    let form = code_form(data.clone(), None).text("data", data.to_string());
    assert!(
        send(form)
            .await
            .error(400)
            .contains("more than one `data` part")
    );

    assert_eq!(server.get("codes").await.json()["codes"], json!([]));
    let leftovers: Vec<_> = std::fs::read_dir(upload_dir.path()).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "spooled uploads are removed: {leftovers:?}"
    );
}

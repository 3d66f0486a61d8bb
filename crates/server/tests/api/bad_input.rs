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

use reqwest::Method;
use serde_json::json;

use crate::support::{TestServer, code_form, redactions, zip_of};

#[tokio::test]
async fn image_code_lifecycle() {
    let server = TestServer::start().await;
    let id = server
        .image_code("hello", json!({"env_vars": {"GREETING": "hi"}, "max_concurrency": 2, "retries": 3, "memory": 64}))
        .await;
    let code = server.get(&format!("codes/{id}")).await.json();
    redactions().bind(|| insta::assert_json_snapshot!("image_code", code));

    // The same name makes a new revision of the same code.
    let second = server
        .image_code("hello", json!({"command": "echo again"}))
        .await;
    assert_eq!(second, id);
    let code = server.get(&format!("codes/{id}")).await.json();
    assert_eq!(code["rev"], 2);
    assert_eq!(code["command"], "echo again");
    let revisions = server.get(&format!("codes/{id}/revisions")).await.json();
    let revs: Vec<_> = revisions["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rev"].clone())
        .collect();
    assert_eq!(revs, [json!(2), json!(1)]);

    let list = server.get("codes").await.json();
    assert_eq!(list["codes"].as_array().unwrap().len(), 1);

    // Pause, resume, stats, cancel_all, delete.
    assert_eq!(
        server
            .post(&format!("codes/{id}/pause_task_queue"), json!({}))
            .await
            .json()["msg"],
        "Paused"
    );
    assert_eq!(
        server.get(&format!("codes/{id}")).await.json()["paused"],
        true
    );
    assert_eq!(
        server
            .post(&format!("codes/{id}/resume_task_queue"), json!({}))
            .await
            .json()["msg"],
        "Resumed"
    );
    server
        .queue(json!([{"code_name": "hello"}, {"code_name": "hello"}]))
        .await;
    let stats = server.get(&format!("codes/{id}/stats")).await.json();
    assert_eq!(stats["queued"], 2);
    let reply = server
        .post(&format!("codes/{id}/cancel_all"), json!({}))
        .await;
    assert_eq!(reply.json()["msg"], "Cancelled 2 tasks");
    let stats = server.get(&format!("codes/{id}/stats")).await.json();
    assert_eq!(stats["cancelled"], 2);
    assert_eq!(stats["queued"], 0);

    let reply = server
        .send(server.request(Method::DELETE, &format!("codes/{id}")))
        .await;
    assert_eq!(reply.json()["msg"], "Deleted");
    server.get(&format!("codes/{id}")).await.error(404);
    let reply = server
        .post("tasks", json!({"tasks": [{"code_name": "hello"}]}))
        .await;
    assert!(reply.error(404).contains("hello"));
}

#[tokio::test]
async fn zip_code_upload_and_download() {
    let server = TestServer::start().await;
    let zip = zip_of(&[
        ("hello.sh", b"#!/bin/sh\necho hello\n", 0o755),
        ("lib/data.txt", b"x", 0o644),
    ]);
    let data = json!({"name": "zipped", "runtime": "binary", "file_name": "hello.sh", "config": {"key": "value"}});
    let reply = server
        .send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip.clone()))),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let uploaded = reply.json();
    assert_eq!(uploaded["msg"], "Upload successful.");
    let id = uploaded["id"].as_str().unwrap();
    let code = server.get(&format!("codes/{id}")).await.json();
    assert_eq!(code["runtime"], "binary");
    assert_eq!(code["file_name"], "hello.sh");
    assert_eq!(code["config"], r#"{"key":"value"}"#);
    assert_eq!(code["latest_checksum"].as_str().unwrap().len(), 64);

    let download = server.get(&format!("codes/{id}/download")).await;
    assert_eq!(download.status, 200);
    assert_eq!(download.content_type, "application/zip");
    assert_eq!(download.body, zip);
    let download = server.get(&format!("codes/{id}/download?revision=1")).await;
    assert_eq!(download.body, zip);
    server
        .get(&format!("codes/{id}/download?revision=9"))
        .await
        .error(404);
}

#[tokio::test]
async fn the_python_clients_bytes_repr_upload_is_understood() {
    let server = TestServer::start().await;
    let zip = zip_of(&[("run.sh", b"echo 'hi'\n", 0o755)]);
    let mut repr = String::from("b'");
    for &byte in &zip {
        match byte {
            b'\\' => repr.push_str("\\\\"),
            b'\'' => repr.push_str("\\'"),
            b'\n' => repr.push_str("\\n"),
            0x20..=0x7e => repr.push(byte as char),
            _ => repr.push_str(&format!("\\x{byte:02x}")),
        }
    }
    repr.push('\'');
    let form = reqwest::multipart::Form::new()
        .text(
            "data",
            json!({"name": "py", "runtime": "binary", "file_name": "run.sh"}).to_string(),
        )
        .part(
            "file",
            reqwest::multipart::Part::text(repr).file_name("py.zip"),
        );
    let reply = server
        .send(server.request(Method::POST, "codes").multipart(form))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(server.get(&format!("codes/{id}/download")).await.body, zip);
}

/// An options update (IronWorker's: a known name without image, runtime or package) keeps
/// the latest revision's package by its checksum: nothing is read back or stored again.
#[tokio::test]
async fn an_options_update_keeps_the_package_without_a_copy() {
    let server = TestServer::start().await;
    let zip = zip_of(&[("hello.sh", b"#!/bin/sh\necho hello\n", 0o755)]);
    let data = json!({"name": "zipped", "runtime": "binary", "file_name": "hello.sh"});
    let reply = server
        .send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip.clone()))),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        server.store.package_bytes().await.unwrap(),
        zip.len() as u64
    );

    let options = json!({"name": "zipped", "env_vars": {"MODE": "fast"}});
    let reply = server
        .send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(options, None)),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["rev"], 2);
    assert_eq!(
        server.store.package_bytes().await.unwrap(),
        zip.len() as u64,
        "stored once"
    );
    let revisions = server.get(&format!("codes/{id}/revisions")).await.json();
    let checksums: Vec<_> = revisions["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|revision| revision["latest_checksum"].clone())
        .collect();
    assert_eq!(checksums.len(), 2);
    assert_eq!(checksums[0], checksums[1]);
    assert_eq!(checksums[0].as_str().unwrap().len(), 64);
    let download = server.get(&format!("codes/{id}/download?revision=2")).await;
    assert_eq!(download.body, zip);
}

/// A package pruned by retention answers 404 with what to do, and the revision stays.
#[tokio::test]
async fn a_pruned_package_is_404_with_what_to_do() {
    let server = TestServer::start().await;
    let push = |contents: &'static [u8]| {
        let zip = zip_of(&[("run.sh", contents, 0o755)]);
        let data = json!({"name": "pruned", "runtime": "binary", "file_name": "run.sh"});
        server.send(
            server
                .request(Method::POST, "codes")
                .multipart(code_form(data, Some(zip))),
        )
    };
    let first = push(b"echo one").await.json();
    push(b"echo two").await;
    let id = first["id"].as_str().unwrap();
    let pruned = server.store.prune_packages(1, 100).await.unwrap();
    assert_eq!((pruned.revisions, pruned.packages), (1, 1));
    let msg = server
        .get(&format!("codes/{id}/download?revision=1"))
        .await
        .error(404);
    assert_eq!(
        msg,
        "the package of revision 1 of code pruned was removed by retention; push the code again or use a newer revision"
    );
    assert_eq!(
        server.get(&format!("codes/{id}/download")).await.status,
        200
    );
    let revisions = server.get(&format!("codes/{id}/revisions")).await.json();
    assert_eq!(revisions["revisions"].as_array().unwrap().len(), 2);
}

/// The Python client's bytes repr of a package larger than one network read is decoded as
/// it arrives, escapes cut anywhere between reads.
#[tokio::test]
async fn a_large_bytes_repr_upload_is_decoded_as_it_arrives() {
    let upload_dir = tempfile::tempdir().unwrap();
    let config = stevedore_server::ServerConfig {
        upload_dir: upload_dir.path().to_owned(),
        ..stevedore_server::ServerConfig::default()
    };
    let server = TestServer::start_with(config).await;
    let noise: Vec<u8> = (0u64..600 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let zip = zip_of(&[("run.sh", b"echo 'hi'\n", 0o755), ("noise", &noise, 0o644)]);
    let mut repr = String::from("b'");
    for &byte in &zip {
        match byte {
            b'\\' => repr.push_str("\\\\"),
            b'\'' => repr.push_str("\\'"),
            b'\n' => repr.push_str("\\n"),
            b'\t' => repr.push_str("\\t"),
            b'\r' => repr.push_str("\\r"),
            0x20..=0x7e => repr.push(byte as char),
            _ => repr.push_str(&format!("\\x{byte:02x}")),
        }
    }
    repr.push('\'');
    assert!(repr.len() > 2 * zip.len());
    let form = reqwest::multipart::Form::new()
        .text(
            "data",
            json!({"name": "py", "runtime": "binary", "file_name": "run.sh"}).to_string(),
        )
        .part(
            "file",
            reqwest::multipart::Part::text(repr).file_name("py.zip"),
        );
    let reply = server
        .send(server.request(Method::POST, "codes").multipart(form))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(server.get(&format!("codes/{id}/download")).await.body, zip);
    let leftovers: Vec<_> = std::fs::read_dir(upload_dir.path()).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "the spooled upload is removed: {leftovers:?}"
    );
}

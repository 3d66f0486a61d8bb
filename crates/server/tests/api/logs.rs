//! Live task logs: the Server-Sent Events stream (`log/stream`) and the chunked plain-text
//! follow (`log?follow=true`), fed by a runner's writes through the store while a client reads.
//!
//! Timeouts here are safety nets against a hung test, never assertions about speed: every
//! wait is for something that must arrive.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use stevedore_model::{Clock, SystemClock, TaskOutcome};
use stevedore_server::ServerConfig;
use stevedore_server::config::LogStreamConfig;
use stevedore_store::{LeaseRequest, RunReport, TaskData};

use crate::support::TestServer;

/// How long a test waits for something that must come before it calls the test hung.
const SAFETY: Duration = Duration::from_secs(20);

/// A server whose streams poll often, so the tests run quickly.
async fn server() -> TestServer {
    server_with(LogStreamConfig {
        poll_interval: Duration::from_millis(20),
        ..LogStreamConfig::default()
    })
    .await
}

async fn server_with(log_stream: LogStreamConfig) -> TestServer {
    TestServer::start_with(ServerConfig {
        log_stream,
        ..ServerConfig::default()
    })
    .await
}

/// A task leased as a runner would lease it; the test writes its log and finishes it.
struct Leased {
    id: String,
    token: i64,
}

impl Leased {
    async fn new(server: &TestServer) -> Leased {
        server.image_code("hello", json!({})).await;
        let id = server
            .queue(json!([{"code_name": "hello", "payload": "p"}]))
            .await
            .remove(0);
        let request = LeaseRequest {
            runner_id: "runner-1".to_owned(),
            clusters: vec!["default".to_owned()],
            max_tasks: 1,
            lease_secs: 600,
            owner: None,
        };
        let leased = server
            .store
            .lease(&request, SystemClock.now())
            .await
            .unwrap()
            .remove(0);
        assert_eq!(leased.task.id, id);
        Leased {
            id,
            token: leased.lease.token,
        }
    }

    async fn log(&self, server: &TestServer, bytes: &[u8]) {
        self.log_capped(server, bytes, 1 << 20).await;
    }

    async fn log_capped(&self, server: &TestServer, bytes: &[u8], cap: u64) {
        server
            .store
            .append_log(&self.id, self.token, bytes, cap, SystemClock.now())
            .await
            .unwrap();
    }

    async fn start(&self, server: &TestServer) {
        let now = SystemClock.now();
        server
            .store
            .mark_running(&self.id, self.token, now, now)
            .await
            .unwrap();
    }

    async fn complete(&self, server: &TestServer) {
        server
            .store
            .complete(
                &self.id,
                self.token,
                &TaskOutcome::Exited { exit_code: 0 },
                &RunReport::default(),
                SystemClock.now(),
            )
            .await
            .unwrap();
    }
}

// === a Server-Sent Events client ===

#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|error| panic!("{error}: {self:?}"))
    }
}

/// Reads an event stream frame by frame, as the SSE specification parses it.
struct SseClient {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: String,
    /// Comment lines seen (keep-alives).
    comments: usize,
}

enum Frame {
    Event(SseEvent),
    Comment,
}

impl SseClient {
    async fn connect(request: reqwest::RequestBuilder) -> SseClient {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(content_type, "text/event-stream");
        assert_eq!(response.headers()["x-accel-buffering"], "no");
        SseClient {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
            comments: 0,
        }
    }

    async fn open(server: &TestServer, task_id: &str) -> SseClient {
        Self::connect(server.request(Method::GET, &format!("tasks/{task_id}/log/stream"))).await
    }

    /// The next event, or `None` once the server closed the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            match self.next_frame().await? {
                Frame::Event(event) => return Some(event),
                Frame::Comment => {}
            }
        }
    }

    /// The next event or comment, or `None` once the server closed the stream.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                if let Some(frame) = self.parse(&frame) {
                    return Some(frame);
                }
                continue;
            }
            let chunk = tokio::time::timeout(SAFETY, self.body.next())
                .await
                .expect("the stream went silent");
            match chunk {
                Some(chunk) => {
                    let text = std::str::from_utf8(&chunk.unwrap()).unwrap().to_owned();
                    self.buffer.push_str(&text.replace("\r\n", "\n"));
                }
                None => {
                    assert!(
                        self.buffer.trim().is_empty(),
                        "cut mid-frame: {:?}",
                        self.buffer
                    );
                    return None;
                }
            }
        }
    }

    fn parse(&mut self, frame: &str) -> Option<Frame> {
        let mut event = SseEvent {
            event: "message".to_owned(),
            id: None,
            data: String::new(),
        };
        let (mut has_data, mut comment) = (false, false);
        for line in frame.lines().filter(|line| !line.is_empty()) {
            if line.starts_with(':') {
                comment = true;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event.event = value.to_owned(),
                "id" => event.id = Some(value.to_owned()),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
        if has_data {
            Some(Frame::Event(event))
        } else if comment {
            self.comments += 1;
            Some(Frame::Comment)
        } else {
            None
        }
    }

    /// Reads to the end of the stream.
    async fn rest(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// What a client makes of `log` events: the text, checking that each starts where the last
/// one ended (`id`).
fn log_text(events: &[SseEvent], mut offset: u64) -> String {
    let mut text = String::new();
    for event in events.iter().filter(|event| event.event == "log") {
        let data = event.json();
        assert_eq!(data["offset"], offset, "{event:?}");
        text.push_str(data["text"].as_str().unwrap());
        offset = event.id.as_deref().unwrap().parse().unwrap();
    }
    text
}

fn names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|event| event.event.as_str()).collect()
}

fn assert_log(event: &SseEvent, offset: u64, text: &str, id: u64) {
    assert_eq!(event.event, "log", "{event:?}");
    assert_eq!(event.json(), json!({"offset": offset, "text": text}));
    assert_eq!(event.id, Some(id.to_string()));
}

fn assert_status(event: &SseEvent, id: &str, status: &str) -> Value {
    assert_eq!(event.event, "status", "{event:?}");
    let data = event.json();
    assert_eq!(
        (data["id"].as_str(), data["status"].as_str()),
        (Some(id), Some(status))
    );
    data
}

// === the event stream ===

#[tokio::test]
async fn a_live_stream_delivers_every_byte_then_the_end() {
    let server = server().await;
    let task = Leased::new(&server).await;
    let mut client = SseClient::open(&server, &task.id).await;
    assert_status(&client.next().await.unwrap(), &task.id, "preparing");

    task.log(&server, b"hello ").await;
    assert_log(&client.next().await.unwrap(), 0, "hello ", 6);
    task.start(&server).await;
    assert_status(&client.next().await.unwrap(), &task.id, "running");
    server
        .store
        .runner_progress(
            &task.id,
            task.token,
            Some(50),
            Some("half"),
            SystemClock.now(),
        )
        .await
        .unwrap();
    let progress = assert_status(&client.next().await.unwrap(), &task.id, "running");
    assert_eq!(
        (progress["percent"].as_u64(), progress["msg"].as_str()),
        (Some(50), Some("half"))
    );
    task.log(&server, b"world\n").await;
    assert_log(&client.next().await.unwrap(), 6, "world\n", 12);

    // Output written right before completion still arrives, before the end.
    task.log(&server, b"last ").await;
    task.log(&server, b"words\n").await;
    task.complete(&server).await;
    let rest = client.rest().await;
    assert_eq!(log_text(&rest, 12), "last words\n");
    let tail: Vec<_> = names(&rest)
        .into_iter()
        .filter(|name| *name != "log")
        .collect();
    assert_eq!(tail, ["status", "end"], "{rest:?}");
    assert_status(&rest[rest.len() - 2], &task.id, "complete");
    let end = rest.last().unwrap().json();
    assert_eq!(end["id"], task.id.as_str());
    assert_eq!(end["status"], "complete");
    assert_eq!(end["log_size"], 23);
    // The task as `GET tasks/{id}` shows it, but for its attempts, which only that call lists.
    let mut shown = server.get(&format!("tasks/{}", task.id)).await.json();
    assert_eq!(
        shown["attempts"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
    shown.as_object_mut().unwrap().remove("attempts");
    assert_eq!(end, shown);
    assert!(
        client.next().await.is_none(),
        "the stream closed after the end"
    );
}

#[tokio::test]
async fn a_finished_task_streams_its_whole_log_and_ends() {
    let server = server().await;
    let task = Leased::new(&server).await;
    task.start(&server).await;
    task.log(&server, b"line one\n").await;
    task.log(&server, b"line two\n").await;
    task.complete(&server).await;
    let events = SseClient::open(&server, &task.id).await.rest().await;
    assert_eq!(log_text(&events, 0), "line one\nline two\n");
    assert_eq!(names(&events), ["log", "status", "end"]);
    assert_eq!(events[2].json()["status"], "complete");

    // A task cancelled before it ran has no log: just its status and the end.
    let queued = server
        .queue(json!([{"code_name": "hello"}]))
        .await
        .remove(0);
    server
        .post(&format!("tasks/{queued}/cancel"), json!({}))
        .await;
    let events = SseClient::open(&server, &queued).await.rest().await;
    assert_eq!(names(&events), ["status", "end"]);
    assert_status(&events[0], &queued, "cancelled");
}

#[tokio::test]
async fn a_stream_resumes_from_last_event_id_or_offset() {
    let server = server().await;
    let task = Leased::new(&server).await;
    task.start(&server).await;
    task.log(&server, b"hello ").await;
    let mut client = SseClient::open(&server, &task.id).await;
    assert_log(&client.next().await.unwrap(), 0, "hello ", 6);
    drop(client);

    // The client went away; more output came; it reconnects with the last id it saw.
    task.log(&server, b"world\n").await;
    let stream = |last_event_id: Option<&str>, query: &str| {
        let mut request =
            server.request(Method::GET, &format!("tasks/{}/log/stream{query}", task.id));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request
    };
    let mut client = SseClient::connect(stream(Some("6"), "")).await;
    assert_log(&client.next().await.unwrap(), 6, "world\n", 12);
    assert_status(&client.next().await.unwrap(), &task.id, "running");
    task.complete(&server).await;
    assert_eq!(names(&client.rest().await), ["status", "end"]);

    let events = SseClient::connect(stream(None, "?offset=3"))
        .await
        .rest()
        .await;
    assert_eq!(log_text(&events, 3), "lo world\n");
    // A reconnecting browser keeps its URL and sends its progress: the header wins.
    let events = SseClient::connect(stream(Some("9"), "?offset=3"))
        .await
        .rest()
        .await;
    assert_eq!(log_text(&events, 9), "ld\n");
    let events = SseClient::connect(stream(Some("12"), ""))
        .await
        .rest()
        .await;
    assert_eq!(names(&events), ["status", "end"]);

    for (header, query) in [
        (Some("six"), ""),
        (Some("-1"), ""),
        (None, "?offset=x"),
        (None, "?offset=13"),
    ] {
        let msg = server.send(stream(header, query)).await.error(400);
        assert!(
            msg.contains("offset") || msg.contains("Last-Event-ID"),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn a_character_split_across_writes_arrives_whole() {
    let server = server().await;
    let task = Leased::new(&server).await;
    task.start(&server).await;
    let mut client = SseClient::open(&server, &task.id).await;
    assert_status(&client.next().await.unwrap(), &task.id, "running");

    // "é" is C3 A9: the first write ends inside it.
    task.log(&server, b"caf\xc3").await;
    assert_log(&client.next().await.unwrap(), 0, "caf", 3);
    task.log(&server, b"\xa9 \xff!").await;
    assert_log(&client.next().await.unwrap(), 3, "\u{e9} \u{fffd}!", 8);
    // A log that ends inside a character ends with U+FFFD.
    task.log(&server, b"\xe2\x82").await;
    task.complete(&server).await;
    let rest = client.rest().await;
    assert_eq!(log_text(&rest, 8), "\u{fffd}");
    assert_eq!(rest.last().unwrap().event, "end");
}

#[tokio::test]
async fn a_log_cut_back_for_its_marker_is_sent_again_from_the_cut() {
    let server = server().await;
    let task = Leased::new(&server).await;
    task.start(&server).await;
    let mut client = SseClient::open(&server, &task.id).await;
    assert_status(&client.next().await.unwrap(), &task.id, "running");
    let cap = 100;
    let a = "a".repeat(90);
    task.log_capped(&server, a.as_bytes(), cap).await;
    assert_log(&client.next().await.unwrap(), 0, &a, 90);

    // The next write passes the cap: the store cuts the log back to fit its marker, over
    // bytes the client already has. They are sent again from the cut.
    task.log_capped(&server, b"bbbbbbbbbbbbbbbbbbbb", cap).await;
    let marker = format!("\n[stevedore: log truncated at {cap} bytes]\n");
    let cut = cap - marker.len() as u64;
    assert_log(&client.next().await.unwrap(), cut, &marker, cap);
    task.complete(&server).await;
    assert_eq!(names(&client.rest().await), ["status", "end"]);
    let whole = server.get(&format!("tasks/{}/log", task.id)).await.text();
    assert_eq!(whole, format!("{}{marker}", &a[..cut as usize]));
}

#[tokio::test]
async fn an_idle_stream_sends_keep_alives() {
    let server = server_with(LogStreamConfig {
        poll_interval: Duration::from_millis(20),
        keep_alive: Duration::from_millis(50),
        ..LogStreamConfig::default()
    })
    .await;
    let task = Leased::new(&server).await;
    let mut client = SseClient::open(&server, &task.id).await;
    assert_status(&client.next().await.unwrap(), &task.id, "preparing");
    assert!(matches!(client.next_frame().await, Some(Frame::Comment)));
    assert_eq!(client.comments, 1);
}

#[tokio::test]
async fn a_stream_is_cut_short_at_its_lifetime() {
    let server = server_with(LogStreamConfig {
        poll_interval: Duration::from_millis(20),
        max_lifetime: Duration::from_secs(1),
        ..LogStreamConfig::default()
    })
    .await;
    let task = Leased::new(&server).await;
    task.log(&server, b"abc").await;
    // The task never ends; the server closes the stream anyway, without an end event.
    let events = SseClient::open(&server, &task.id).await.rest().await;
    assert_eq!(log_text(&events, 0), "abc");
    assert_eq!(names(&events), ["log", "status"]);
}

#[tokio::test]
async fn shutting_down_ends_live_streams() {
    let mut server = server().await;
    let task = Leased::new(&server).await;
    let mut client = SseClient::open(&server, &task.id).await;
    assert_status(&client.next().await.unwrap(), &task.id, "preparing");
    tokio::time::timeout(SAFETY, server.stop())
        .await
        .expect("the server waited for a live stream");
    assert!(client.next().await.is_none());
}

// === the plain-text follow ===

/// Reads a followed log until it holds `want` (or ends).
async fn read_until(
    body: &mut Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    got: &mut Vec<u8>,
    want: &[u8],
) {
    while got.len() < want.len() {
        let chunk = tokio::time::timeout(SAFETY, body.next())
            .await
            .expect("the followed log went silent");
        match chunk {
            Some(chunk) => got.extend_from_slice(&chunk.unwrap()),
            None => break,
        }
    }
    assert_eq!(String::from_utf8_lossy(got), String::from_utf8_lossy(want));
}

#[tokio::test]
async fn follow_streams_plain_text_until_the_task_ends() {
    let server = server().await;
    let task = Leased::new(&server).await;
    task.start(&server).await;
    let log = format!("tasks/{}/log", task.id);
    // Without follow, nothing changed: 404 while there is no log.
    server.get(&log).await.error(404);
    server.get(&format!("{log}?follow=false")).await.error(404);

    let response = server
        .request(Method::GET, &format!("{log}?follow=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(headers["transfer-encoding"], "chunked");
    let mut body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>> =
        Box::pin(response.bytes_stream());
    let mut got = Vec::new();
    task.log(&server, b"one\n").await;
    read_until(&mut body, &mut got, b"one\n").await;
    task.log(&server, b"two \xc3").await;
    read_until(&mut body, &mut got, b"one\ntwo \xc3").await;
    task.log(&server, b"\xa9\n").await;
    task.complete(&server).await;
    let rest = tokio::time::timeout(SAFETY, body.collect::<Vec<_>>())
        .await
        .expect("the followed log did not end");
    for chunk in rest {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(
        got,
        "one\ntwo \u{e9}\n".as_bytes(),
        "the same bytes, then the end"
    );

    let whole = server.get(&format!("{log}?follow=1")).await;
    assert_eq!(whole.body, got);
    let tail = server.get(&format!("{log}?follow=1&offset=4")).await;
    assert_eq!(tail.text(), "two \u{e9}\n");
    assert_eq!(
        server.get(&log).await.body,
        got,
        "and the whole log as before"
    );
}

#[tokio::test]
async fn follow_refuses_bad_queries() {
    let server = server().await;
    let task = Leased::new(&server).await;
    task.log(&server, b"abc").await;
    let log = format!("tasks/{}/log", task.id);
    for (query, naming) in [
        ("?follow=maybe", "follow"),
        ("?follow=1&offset=-3", "offset"),
        ("?follow=1&offset=4", "past the end"),
        ("?offset=1", "follow"),
    ] {
        let msg = server.get(&format!("{log}{query}")).await.error(400);
        assert!(msg.contains(naming), "{query}: {msg}");
    }
}

// === access ===

#[tokio::test]
async fn live_logs_need_a_token_and_a_task_of_the_project() {
    let server = server().await;
    let task = Leased::new(&server).await;
    let (other_project, other_token) = server.other_project("other").await;
    for path in ["log/stream", "log?follow=true"] {
        let unknown = server.get(&format!("tasks/no-such-task/{path}")).await;
        assert!(unknown.error(404).contains("no-such-task"));

        let url = server.url(&format!("tasks/{}/{path}", task.id));
        server.send(server.http.get(&url)).await.error(401);
        let wrong = server
            .http
            .get(&url)
            .header("Authorization", format!("OAuth {other_token}"));
        server.send(wrong).await.error(403);

        // Another project's own token, asking for this project's task in its project.
        let elsewhere = format!(
            "{}/2/projects/{other_project}/tasks/{}/{path}",
            server.base, task.id
        );
        let request = server
            .http
            .get(elsewhere)
            .header("Authorization", format!("OAuth {other_token}"));
        server.send(request).await.error(404);
    }
}

/// Retention: a finished task's log and payload removed answer 410 (log, outlog, follow,
/// stream) and 409 (retry) with a message saying so; the task itself still answers, saying
/// when each was removed; a task still running is untouched.
#[tokio::test]
async fn what_retention_removed_is_gone_and_said_to_be() {
    let server = server().await;
    let done = Leased::new(&server).await;
    done.start(&server).await;
    done.log(&server, b"old output\n").await;
    done.complete(&server).await;
    // Queued after the first finished, so the lease takes it second.
    let silent = Leased::new(&server).await;
    silent.start(&server).await;
    silent.complete(&server).await;
    let running = Leased::new(&server).await;
    running.start(&server).await;
    running.log(&server, b"going on\n").await;

    let now = SystemClock.now();
    let later = now + chrono::TimeDelta::seconds(1);
    for data in [TaskData::Log, TaskData::Payload] {
        let pruned = server
            .store
            .prune_task_data(data, later, None, 100, now)
            .await
            .unwrap();
        assert_eq!((pruned.passed, pruned.next), (2, None), "{data:?}");
    }

    let base = "tasks";
    let task = server.get(&format!("{base}/{}", done.id)).await.json();
    assert_eq!(task["status"], "complete");
    assert_eq!(task["payload"], "");
    assert_eq!(task["log_size"], 11);
    assert!(task["log_removed_at"].is_string(), "{task}");
    assert!(task["payload_removed_at"].is_string(), "{task}");
    for path in ["log", "outlog", "log?follow=true", "log/stream"] {
        let msg = server
            .get(&format!("{base}/{}/{path}", done.id))
            .await
            .error(410);
        assert!(
            msg.contains(&done.id) && msg.contains("removed by retention"),
            "{path}: {msg}"
        );
    }
    let msg = server
        .post(&format!("{base}/{}/retry", done.id), json!({}))
        .await
        .error(409);
    assert!(msg.contains("payload"), "{msg}");

    // A task that printed nothing lost nothing: its log is still empty, and not said removed.
    let task = server.get(&format!("{base}/{}", silent.id)).await.json();
    assert!(task.get("log_removed_at").is_none(), "{task}");
    let log = server.get(&format!("{base}/{}/log", silent.id)).await;
    assert_eq!((log.status.as_u16(), log.text()), (200, String::new()));

    let task = server.get(&format!("{base}/{}", running.id)).await.json();
    assert_eq!(task["payload"], "p");
    assert!(task.get("log_removed_at").is_none(), "{task}");
    assert_eq!(
        server
            .get(&format!("{base}/{}/log", running.id))
            .await
            .text(),
        "going on\n"
    );
}

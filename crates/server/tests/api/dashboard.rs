//! The dashboard over HTTP: sign-in, what a session may see and do, the forms' errors, the
//! embedded assets. A real browser drives it end to end in the CLI crate's `dashboard` test.

use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::json;
use stevedore_store::TokenRole;

use crate::support::{Reply, TestServer};

/// A browser-like client of the dashboard: it keeps no cookie jar and follows no redirect,
/// so each test says what it sends and sees what it gets.
struct Browser<'a> {
    server: &'a TestServer,
    http: reqwest::Client,
    cookie: Option<String>,
}

impl<'a> Browser<'a> {
    fn new(server: &'a TestServer) -> Browser<'a> {
        Browser {
            server,
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    /// Signs in with `token` and keeps the session cookie.
    async fn signed_in(server: &'a TestServer, token: &str) -> Browser<'a> {
        let mut browser = Browser::new(server);
        let reply = browser.post("/ui/login", &format!("token={token}")).await;
        assert_eq!(reply.status, 303, "{}", reply.text());
        browser.cookie = Some(format!("stevedore_session={token}"));
        browser
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.server.base));
        match &self.cookie {
            Some(cookie) => request.header("Cookie", cookie),
            None => request,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.server
            .send(self.request(reqwest::Method::GET, path))
            .await
    }

    async fn post(&self, path: &str, form: &str) -> Reply {
        self.server
            .send(
                self.request(reqwest::Method::POST, path)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .header("Sec-Fetch-Site", "same-origin")
                    .body(form.to_owned()),
            )
            .await
    }

    /// Sends the request and returns the response itself, for its headers.
    async fn raw(&self, request: reqwest::RequestBuilder) -> reqwest::Response {
        request.send().await.unwrap()
    }
}

fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(LOCATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn signed_out_pages_lead_to_the_sign_in_page() {
    let server = TestServer::start().await;
    let browser = Browser::new(&server);
    for path in [
        "/ui/",
        "/ui/codes",
        "/ui/tasks",
        "/ui/schedules",
        "/ui/runners",
    ] {
        let response = browser
            .raw(browser.request(reqwest::Method::GET, path))
            .await;
        assert_eq!(response.status(), 303, "{path}");
        assert_eq!(location(&response), "/ui/login", "{path}");
    }
    // htmx swaps fragments; it is told to load the sign-in page instead.
    let response = browser
        .raw(
            browser
                .request(reqwest::Method::GET, "/ui/tasks/rows")
                .header("HX-Request", "true"),
        )
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["hx-redirect"], "/ui/login");
    let page = browser.get("/ui/login").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains(r#"<form id="sign-in""#));
    // A stale cookie is no session either.
    let mut stale = Browser::new(&server);
    stale.cookie = Some("stevedore_session=0123456789abcdef".into());
    let response = stale.raw(stale.request(reqwest::Method::GET, "/ui/")).await;
    assert_eq!(location(&response), "/ui/login");
}

#[tokio::test]
async fn only_a_project_token_signs_in() {
    let server = TestServer::start().await;
    let browser = Browser::new(&server);
    let unknown = browser.post("/ui/login", "token=not-a-token").await;
    assert_eq!(unknown.status, 401);
    assert!(unknown.text().contains(r#"class="error""#));
    assert!(unknown.text().contains("not known"));
    let empty = browser.post("/ui/login", "token=").await;
    assert_eq!(empty.status, 401);
    assert!(empty.text().contains("enter a project token"));
    for role in [TokenRole::Admin, TokenRole::Runner] {
        let token = server.token_of(role).await;
        let refused = browser.post("/ui/login", &format!("token={token}")).await;
        assert_eq!(refused.status, 401, "{role:?}");
        assert!(
            refused.text().contains("sign in with a project token"),
            "{role:?}"
        );
    }

    let response = browser
        .raw(
            browser
                .request(reqwest::Method::POST, "/ui/login")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(format!("token={}", server.token)),
        )
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/ui/");
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with(&format!("stevedore_session={};", server.token)),
        "{cookie}"
    );
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }

    let signed_in = Browser::signed_in(&server, &server.token).await;
    let overview = signed_in.get("/ui/").await;
    assert_eq!(overview.status, 200);
    assert!(overview.text().contains(r#"<nav id="nav">"#));
    let response = signed_in
        .raw(
            signed_in
                .request(reqwest::Method::POST, "/ui/logout")
                .header("Sec-Fetch-Site", "same-origin"),
        )
        .await;
    assert_eq!(location(&response), "/ui/login");
    assert!(
        response.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn a_session_sees_and_touches_only_its_own_project() {
    let server = TestServer::start().await;
    let code_id = server.image_code("private-work", json!({})).await;
    let task_id = server
        .queue(json!([{"code_name": "private-work", "payload": "secret payload"}]))
        .await
        .remove(0);
    let owner = Browser::signed_in(&server, &server.token).await;
    let page = owner.get(&format!("/ui/tasks/{task_id}")).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("secret payload"));
    assert!(owner.get("/ui/tasks").await.text().contains(&task_id));
    assert!(owner.get("/ui/codes").await.text().contains("private-work"));

    let (_, other_token) = server.other_project("elsewhere").await;
    let other = Browser::signed_in(&server, &other_token).await;
    for path in [
        format!("/ui/tasks/{task_id}"),
        format!("/ui/tasks/{task_id}/events"),
        format!("/ui/codes/{code_id}"),
    ] {
        let reply = other.get(&path).await;
        assert_eq!(reply.status, 404, "{path}: {}", reply.text());
        assert!(!reply.text().contains("secret payload"));
    }
    assert!(!other.get("/ui/tasks").await.text().contains(&task_id));
    assert!(!other.get("/ui/codes").await.text().contains("private-work"));
    for path in [
        format!("/ui/tasks/{task_id}/cancel"),
        format!("/ui/codes/{code_id}/pause"),
    ] {
        assert_eq!(other.post(&path, "").await.status, 404, "{path}");
    }
    let queued = other.post("/ui/tasks", "code=private-work&payload=x").await;
    assert_eq!(queued.status, 404, "{}", queued.text());
    let usage = other.get("/ui/usage.json").await;
    assert_eq!(usage.status, 200);
    assert_eq!(usage.json()["status_mix"]["queued"], 0);
    // The owner's task is untouched by all of that.
    let task = server.get(&format!("tasks/{task_id}")).await.json();
    assert_eq!(task["status"], "queued");
}

#[tokio::test]
async fn the_queue_form_queues_through_the_api_and_explains_mistakes() {
    let server = TestServer::start().await;
    server
        .image_code("greeter", json!({"default_priority": 1, "timeout": 120}))
        .await;
    let browser = Browser::signed_in(&server, &server.token).await;

    let response = browser
        .raw(
            browser
                .request(reqwest::Method::POST, "/ui/tasks")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("Sec-Fetch-Site", "same-origin")
                .body("code=greeter&payload=%7B%22n%22%3A+1%7D&label=from+the+page&delay=0"),
        )
        .await;
    assert_eq!(response.status(), 303);
    let task_id = location(&response)
        .strip_prefix("/ui/tasks/")
        .unwrap()
        .to_owned();
    let task = server.get(&format!("tasks/{task_id}")).await.json();
    assert_eq!(task["payload"], r#"{"n": 1}"#);
    assert_eq!(task["label"], "from the page");
    assert_eq!(task["priority"], 1, "the code's default priority");
    assert_eq!(task["timeout"], 120, "the code's timeout");

    let cases = [
        ("code=&payload=x", 400, "choose a code"),
        (
            "code=greeter&delay=soon",
            400,
            "delay must be a whole number",
        ),
        ("code=greeter&priority=7", 400, "priority"),
        ("code=nobody&payload=x", 404, "not found"),
        ("payload=x", 400, "choose a code"),
    ];
    for (form, status, message) in cases {
        let reply = browser.post("/ui/tasks", form).await;
        assert_eq!(reply.status.as_u16(), status, "{form}: {}", reply.text());
        assert!(reply.text().contains(message), "{form}: {}", reply.text());
    }

    // What is not a form, or not a page number, gets an error page that says so.
    let json_body = server
        .send(
            browser
                .request(reqwest::Method::POST, "/ui/tasks")
                .header(CONTENT_TYPE, "application/json")
                .header("Sec-Fetch-Site", "same-origin")
                .body(r#"{"code": "greeter"}"#),
        )
        .await;
    assert_eq!(json_body.status, 415, "{}", json_body.text());
    assert!(json_body.text().contains("the form could not be read"));
    let bad_page = browser.get("/ui/tasks?page=last").await;
    assert_eq!(bad_page.status, 400);
    assert!(bad_page.content_type.starts_with("text/html"));
    assert!(bad_page.text().contains("invalid query parameters"));

    // A form posted from another site is refused before anything happens.
    let before = server.get("tasks").await.json()["tasks"]
        .as_array()
        .unwrap()
        .len();
    let forged = server
        .send(
            browser
                .request(reqwest::Method::POST, "/ui/tasks")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("Origin", "http://evil.example")
                .body("code=greeter&payload=forged"),
        )
        .await;
    assert_eq!(forged.status, 403);
    assert!(forged.text().contains("another site"));
    let after = server.get("tasks").await.json()["tasks"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after);
}

#[tokio::test]
async fn task_pages_cancel_and_retry() {
    let server = TestServer::start().await;
    server.image_code("work", json!({})).await;
    let task_id = server
        .queue(json!([{"code_name": "work", "payload": "p"}]))
        .await
        .remove(0);
    let browser = Browser::signed_in(&server, &server.token).await;
    let page = browser.get(&format!("/ui/tasks/{task_id}")).await.text();
    assert!(page.contains(r#"id="task-status""#));
    assert!(page.contains(">queued<"));

    let cancelled = browser
        .post(&format!("/ui/tasks/{task_id}/cancel"), "")
        .await;
    assert_eq!(cancelled.status, 303);
    let task = server.get(&format!("tasks/{task_id}")).await.json();
    assert_eq!(task["status"], "cancelled");
    let again = browser
        .post(&format!("/ui/tasks/{task_id}/cancel"), "")
        .await;
    assert_eq!(again.status, 409, "{}", again.text());

    let response = browser
        .raw(
            browser
                .request(reqwest::Method::POST, &format!("/ui/tasks/{task_id}/retry"))
                .header("Sec-Fetch-Site", "same-origin"),
        )
        .await;
    assert_eq!(response.status(), 303);
    let retry_id = location(&response)
        .strip_prefix("/ui/tasks/")
        .unwrap()
        .to_owned();
    assert_ne!(retry_id, task_id);
    let retry = server.get(&format!("tasks/{retry_id}")).await.json();
    assert_eq!(retry["original_task_id"], task_id.as_str());

    let rows = browser.get("/ui/tasks/rows?status=cancelled").await.text();
    assert!(
        rows.contains(&task_id) && !rows.contains(&retry_id),
        "{rows}"
    );
    assert!(
        !rows.contains("<html"),
        "rows come without the page around them"
    );
    let bad = browser.get("/ui/tasks?status=finished").await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("status must be one of"));
}

#[tokio::test]
async fn usage_json_carries_the_api_report_and_its_errors() {
    let server = TestServer::start().await;
    let browser = Browser::signed_in(&server, &server.token).await;
    server.image_code("counted", json!({})).await;
    server
        .queue(json!([{"code_name": "counted", "payload": "p"}]))
        .await;
    let window = "from=2026-01-01T00:00:00Z&to=2026-01-01T06:00:00Z&bucket=hour";
    let report = browser.get(&format!("/ui/usage.json?{window}")).await;
    assert_eq!(report.status, 200, "{}", report.text());
    let report = report.json();
    assert_eq!(report["bucket_secs"], 3600);
    assert_eq!(report["buckets"].as_array().unwrap().len(), 6);
    assert_eq!(report, server.get(&format!("usage?{window}")).await.json());
    // The default window ends now, so it sees the task just queued.
    let recent = browser.get("/ui/usage.json").await.json();
    assert_eq!(recent["status_mix"]["queued"], 1);
    let bad = browser.get("/ui/usage.json?bucket=fortnight").await;
    assert!(bad.error(400).contains("bucket"));
}

#[tokio::test]
async fn assets_are_served_from_the_binary() {
    let server = TestServer::start().await;
    let browser = Browser::new(&server);
    for (path, kind) in [
        ("/ui/assets/dashboard.js", "text/javascript"),
        ("/ui/assets/dashboard.css", "text/css"),
        ("/ui/assets/vendor/htmx.min.js", "text/javascript"),
        ("/ui/assets/vendor/chart.umd.min.js", "text/javascript"),
    ] {
        let response = browser
            .raw(browser.request(reqwest::Method::GET, path))
            .await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()[CONTENT_TYPE], kind, "{path}");
        assert!(
            response.headers()[CACHE_CONTROL]
                .to_str()
                .unwrap()
                .contains("max-age")
        );
        assert!(!response.bytes().await.unwrap().is_empty(), "{path}");
    }
    for missing in [
        "/ui/assets/nope.js",
        "/ui/assets/vendor/README.md",
        "/ui/assets/../Cargo.toml",
    ] {
        assert_eq!(browser.get(missing).await.status, 404, "{missing}");
    }
}

/// The server's address opened in a browser leads to the dashboard; a client that asks for
/// JSON is told where the API, its description and the dashboard are (it was a bare 404).
#[tokio::test]
async fn the_front_door_sends_a_browser_to_the_dashboard_and_tells_a_client_where_things_are() {
    let server = TestServer::start().await;
    let browser = Browser::new(&server);
    let page = browser
        .server
        .send(
            browser
                .request(reqwest::Method::GET, "/")
                .header("Accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
        )
        .await;
    assert_eq!(page.status, 303, "{}", page.text());

    let client = server
        .send(server.http.get(format!("{}/", server.base)))
        .await;
    assert_eq!(client.status, 200, "{}", client.text());
    let body = client.json();
    assert_eq!(body["dashboard"], "/ui/");
    assert_eq!(body["openapi"], "/openapi.json");
    assert_eq!(body["api"], "/2");
}

/// A task whose payload and log retention removed: the page says so, follows no log and
/// offers no retry.
#[tokio::test]
async fn a_task_page_says_what_retention_removed() {
    use stevedore_model::{Clock, SystemClock};
    use stevedore_store::TaskData;

    let server = TestServer::start().await;
    server.image_code("hello", json!({})).await;
    let task_id = server
        .queue(json!([{"code_name": "hello", "payload": "the payload"}]))
        .await
        .remove(0);
    let browser = Browser::signed_in(&server, &server.token).await;
    let page = browser.get(&format!("/ui/tasks/{task_id}")).await.text();
    assert!(page.contains("the payload") && page.contains("data-events"));

    // Run as a runner would: it prints, and ends.
    let now = SystemClock.now();
    let request = stevedore_store::LeaseRequest {
        runner_id: "runner-1".to_owned(),
        clusters: vec!["default".to_owned()],
        max_tasks: 1,
        lease_secs: 600,
        owner: None,
    };
    let token = server.store.lease(&request, now).await.unwrap()[0]
        .lease
        .token;
    let store = &server.store;
    store.mark_running(&task_id, token, now, now).await.unwrap();
    store
        .append_log(&task_id, token, b"printed\n", 1 << 20, now)
        .await
        .unwrap();
    let exited = stevedore_model::TaskOutcome::Exited { exit_code: 0 };
    let report = stevedore_store::RunReport::default();
    store
        .complete(&task_id, token, &exited, &report, now)
        .await
        .unwrap();
    for data in [TaskData::Log, TaskData::Payload] {
        server
            .store
            .prune_task_data(data, now + chrono::TimeDelta::seconds(1), None, 10, now)
            .await
            .unwrap();
    }
    let page = browser.get(&format!("/ui/tasks/{task_id}")).await.text();
    assert!(page.contains("Removed by retention"), "{page}");
    assert!(!page.contains("the payload"), "{page}");
    assert!(!page.contains("/retry"), "{page}");
    assert!(page.contains("removed by retention at"), "{page}");
    assert!(!page.contains("data-events"), "{page}");
}

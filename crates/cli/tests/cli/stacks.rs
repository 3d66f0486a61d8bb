//! Real workers on every stack, against the real binary and Docker, on the images
//! `stack build-local` made from Debian's archive: a Ruby worker uploaded exactly as
//! IronWorker's Ruby client (`iron_worker_ng`) uploads one, PHP, Java (a jar) and Go
//! workers, plain Python and Node workers, and an image code shipped with a zip. The official Python
//! and Node clients' own workers run in `python_client.rs` and `node_client.rs`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    Api, ServerProcess, docker_available, ensure_local_image, host_has, unique, zip_of,
};

/// How long one worker may take, start-up of a JVM on a busy machine included.
const TASK_WAIT: Duration = Duration::from_secs(180);

/// `__runner__.sh` as iron_worker_ng writes it for a Ruby worker: change into the directory
/// given after `-d`, put the package's own `lib`, `bin` and unpacked `.deb`s on the paths, and
/// hand every argument to `__runner__.rb`.
const NG_RUNNER_SH: &str = r#"#!/bin/sh
# written as iron_worker_ng writes its runner

root() {
  while [ $# -gt 1 ]; do
    if [ "$1" = "-d" ]; then
      printf "%s" "$2"
      break
    fi
    shift
  done
}

cd "$(root "$@")"

LD_LIBRARY_PATH=.:./lib:./__debs__/usr/lib:./__debs__/usr/lib/x86_64-linux-gnu:./__debs__/lib:./__debs__/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH

PATH=.:./bin:./__debs__/usr/bin:./__debs__/bin:$PATH
export PATH

ruby __runner__.rb "$@"
"#;

/// `__runner__.rb` doing what iron_worker_ng's does: read `-d`, `-payload`, `-config` and
/// `-id` from the arguments, parse the payload (and config) as JSON, offer them as
/// `params`, `config`, `payload` and `iron_task_id`, and load the worker file.
const NG_RUNNER_RB: &str = r#"# written as iron_worker_ng writes its runner
require 'json'

flags = {}
ARGV.each_cons(2) { |flag, value| flags[flag] = value if flag.start_with?('-') }
root = flags['-d']
$LOAD_PATH.unshift(root)

@iron_task_id = flags['-id']
@payload = File.read(flags['-payload'])
@params = begin
  JSON.parse(@payload)
rescue JSON::ParserError
  {}
end
@config = nil
if flags['-config']
  text = File.read(flags['-config'])
  @config = begin
    JSON.parse(text)
  rescue JSON::ParserError
    text
  end
end

def payload
  @payload
end

def params
  @params
end

def config
  @config
end

def iron_task_id
  @iron_task_id
end

require 'hello_worker.rb'
"#;

const RUBY_WORKER: &str = r#"puts "ruby #{RUBY_VERSION} says hello to #{params['name']} in task #{iron_task_id} with #{config['greeting']}"
"#;

const PHP_WORKER: &str = r#"<?php
$flags = [];
for ($i = 1; $i + 1 < count($argv); $i++) {
    $flags[$argv[$i]] = $argv[$i + 1];
}
$payload = json_decode(file_get_contents($flags['-payload']), true);
echo "php " . PHP_MAJOR_VERSION . "." . PHP_MINOR_VERSION . " says hello to " . $payload['name'] . " in task " . $flags['-id'] . "\n";
"#;

const JAVA_WORKER: &str = r#"import java.nio.file.Files;
import java.nio.file.Paths;

public class Hello {
    public static void main(String[] args) throws Exception {
        String payload = "";
        String task = "";
        for (int i = 0; i + 1 < args.length; i++) {
            if (args[i].equals("-payload")) {
                payload = new String(Files.readAllBytes(Paths.get(args[i + 1])), "UTF-8");
            }
            if (args[i].equals("-id")) {
                task = args[i + 1];
            }
        }
        System.out.println("java " + System.getProperty("java.specification.version")
            + " says hello with " + payload + " in task " + task);
    }
}
"#;

const PYTHON_WORKER: &str = r#"import json, sys
flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(flags["-payload"]) as f:
    payload = json.load(f)
print("python %d.%d says hello to %s in task %s" % (sys.version_info[0], sys.version_info[1], payload["name"], flags["-id"]))
"#;

const NODE_WORKER: &str = r#"const fs = require('fs');
const flags = {};
for (let i = 2; i + 1 < process.argv.length; i++) flags[process.argv[i]] = process.argv[i + 1];
const payload = JSON.parse(fs.readFileSync(flags['-payload'], 'utf8'));
console.log(`node ${process.versions.node.split('.')[0]} says hello to ${payload.name} in task ${flags['-id']}`);
"#;

const GO_WORKER: &str = r#"package main

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strings"
)

func main() {
	flags := map[string]string{}
	for i := 1; i+1 < len(os.Args); i++ {
		flags[os.Args[i]] = os.Args[i+1]
	}
	raw, err := os.ReadFile(flags["-payload"])
	if err != nil {
		panic(err)
	}
	var payload map[string]string
	if err := json.Unmarshal(raw, &payload); err != nil {
		panic(err)
	}
	release := strings.Join(strings.SplitN(runtime.Version(), ".", 3)[:2], ".")
	fmt.Printf("%s says hello to %s in task %s\n", release, payload["name"], flags["-id"])
}
"#;

/// One worker to upload and the line its log must hold (`{task}` stands for the task's id).
struct Worker {
    data: Value,
    zip: Vec<u8>,
    payload: Value,
    expected: &'static str,
}

#[tokio::test]
async fn real_workers_run_on_every_stack() {
    if !docker_available() || !host_has("javac", "scripts/test.sh") {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_running(data.path(), &unique("stacks"), &[]);
    let api = Api::new(&server);

    let ruby_zip = zip_of(&[
        ("__runner__.sh", NG_RUNNER_SH.as_bytes(), 0o644),
        ("__runner__.rb", NG_RUNNER_RB.as_bytes(), 0o644),
        ("hello_worker.rb", RUBY_WORKER.as_bytes(), 0o644),
    ]);
    let php_zip = zip_of(&[("worker.php", PHP_WORKER.as_bytes(), 0o644)]);
    let jar = build_jar(data.path());
    let java_zip = zip_of(&[("hello.jar", &jar, 0o644)]);
    let python_zip = zip_of(&[("worker.py", PYTHON_WORKER.as_bytes(), 0o644)]);
    let node_zip = zip_of(&[("worker.js", NODE_WORKER.as_bytes(), 0o644)]);
    let go_zip = zip_of(&[("hello.go", GO_WORKER.as_bytes(), 0o644)]);
    // The Ruby client's upload: `runtime: "sh"`, `__runner__.sh`, its options, and `stack`
    // only when the worker names one.
    let ng = |name: &str, stack: Option<&str>| {
        let mut data = json!({
            "name": name, "runtime": "sh", "file_name": "__runner__.sh",
            "config": "{\"greeting\":\"a config\"}",
        });
        if let Some(stack) = stack {
            data["stack"] = json!(stack);
        }
        data
    };
    let workers = [
        Worker {
            data: ng("ruby-ng", None),
            zip: ruby_zip.clone(),
            payload: json!({"name": "ng"}),
            expected: "says hello to ng in task {task} with a config",
        },
        Worker {
            data: ng("ruby-ng-stack", Some("ruby-2.1")),
            zip: ruby_zip,
            payload: json!({"name": "ng on ruby-2.1"}),
            expected: "says hello to ng on ruby-2.1 in task {task} with a config",
        },
        Worker {
            data: json!({"name": "php", "runtime": "php", "file_name": "worker.php"}),
            zip: php_zip.clone(),
            payload: json!({"name": "php-8.2"}),
            expected: "php 8.2 says hello to php-8.2 in task {task}",
        },
        Worker {
            data: json!({"name": "php-default", "runtime": "php", "stack": "default",
                         "file_name": "worker.php"}),
            zip: php_zip,
            payload: json!({"name": "the default stack"}),
            expected: "php 8.2 says hello to the default stack in task {task}",
        },
        Worker {
            data: json!({"name": "java", "runtime": "java", "file_name": "hello.jar"}),
            zip: java_zip.clone(),
            payload: json!({"n": 17}),
            expected: "java 17 says hello with {\"n\":17} in task {task}",
        },
        Worker {
            data: json!({"name": "java-old", "runtime": "java", "stack": "java-1.7",
                         "file_name": "hello.jar"}),
            zip: java_zip,
            payload: json!({"n": 7}),
            expected: "java 17 says hello with {\"n\":7} in task {task}",
        },
        Worker {
            data: json!({"name": "python", "runtime": "python", "file_name": "worker.py"}),
            zip: python_zip,
            payload: json!({"name": "python-3.11"}),
            expected: "python 3.11 says hello to python-3.11 in task {task}",
        },
        Worker {
            data: json!({"name": "node", "runtime": "node", "stack": "node-0.10",
                         "file_name": "worker.js"}),
            zip: node_zip,
            payload: json!({"name": "node-18"}),
            expected: "node 18 says hello to node-18 in task {task}",
        },
        Worker {
            data: json!({"name": "go", "runtime": "go", "file_name": "hello.go"}),
            zip: go_zip,
            payload: json!({"name": "go-1.19"}),
            expected: "go1.19 says hello to go-1.19 in task {task}",
        },
    ];
    let mut queued = Vec::new();
    for worker in &workers {
        api.upload(worker.data.clone(), worker.zip.clone()).await;
        let name = worker.data["name"].as_str().unwrap();
        let ids = api
            .queue(json!([{"code_name": name, "payload": worker.payload.to_string()}]))
            .await;
        queued.push((worker, ids[0].clone()));
    }
    for (worker, id) in queued {
        let task = api.wait_finished(&id, TASK_WAIT).await;
        let log = api.log(&id).await.unwrap_or_default();
        assert_eq!(task["status"], "complete", "{}: {task}\n{log}", worker.data);
        let expected = worker.expected.replace("{task}", &id);
        assert!(
            log.contains(&expected),
            "{}: wanted {expected:?} in\n{log}",
            worker.data
        );
    }
}

/// IronWorker's `iron worker upload --zip x.zip IMAGE CMD`: the image runs the command in
/// `/mnt/task`, where the zip is unpacked, as for runtime codes.
#[tokio::test]
async fn an_image_code_runs_its_command_beside_the_unpacked_zip() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_running(data.path(), &unique("imagezip"), &[]);
    let api = Api::new(&server);
    let zip = zip_of(&[
        (
            "run.sh",
            b"echo \"script in $(pwd)\"; cat data/greeting.txt\n",
            0o644,
        ),
        ("data/greeting.txt", b"hello from the zip\n", 0o644),
    ]);
    api.upload(
        json!({"name": "image-zip", "image": "stevedore/busybox:local", "command": "sh run.sh"}),
        zip.clone(),
    )
    .await;
    let ids = api
        .queue(json!([{"code_name": "image-zip", "payload": "{}"}]))
        .await;
    let task = api.wait_finished(&ids[0], TASK_WAIT).await;
    let log = api.log(&ids[0]).await.unwrap_or_default();
    assert_eq!(task["status"], "complete", "{task}\n{log}");
    assert!(log.contains("script in /mnt/task"), "{log}");
    assert!(log.contains("hello from the zip"), "{log}");

    // `code push --image --zip DIR` ships the same way.
    let dir = data.path().join("image-zip");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("run.sh"), "cat data/greeting.txt\n").unwrap();
    std::fs::write(dir.join("data/greeting.txt"), "pushed from a directory\n").unwrap();
    let cli = crate::client::Cli::new(&server);
    cli.ok(&[
        "code",
        "push",
        "image-dir",
        "--image",
        "stevedore/busybox:local",
        "--command",
        "sh run.sh",
        "--zip",
        dir.to_str().unwrap(),
    ]);
    let ids = api
        .queue(json!([{"code_name": "image-dir", "payload": "{}"}]))
        .await;
    let task = api.wait_finished(&ids[0], TASK_WAIT).await;
    let log = api.log(&ids[0]).await.unwrap_or_default();
    assert_eq!(task["status"], "complete", "{task}\n{log}");
    assert!(log.contains("pushed from a directory"), "{log}");

    // An options update keeps the zip with the image.
    api.post("codes", json!({"name": "image-zip", "retries": 1}))
        .await;
    let ids = api
        .queue(json!([{"code_name": "image-zip", "payload": "{}"}]))
        .await;
    let task = api.wait_finished(&ids[0], TASK_WAIT).await;
    let log = api.log(&ids[0]).await.unwrap_or_default();
    assert_eq!(task["status"], "complete", "{task}\n{log}");
    assert!(log.contains("hello from the zip"), "{log}");
}

/// Compiles the Java worker into an executable jar with the host's JDK, for Java 17.
fn build_jar(scratch: &Path) -> Vec<u8> {
    let source_dir = scratch.join("java");
    std::fs::create_dir_all(&source_dir).unwrap();
    std::fs::write(source_dir.join("Hello.java"), JAVA_WORKER).unwrap();
    let javac = Command::new("javac")
        .args(["--release", "17", "Hello.java"])
        .current_dir(&source_dir)
        .status()
        .unwrap();
    assert!(javac.success(), "javac failed");
    let jar = Command::new("jar")
        .args(["cfe", "hello.jar", "Hello", "Hello.class"])
        .current_dir(&source_dir)
        .status()
        .unwrap();
    assert!(jar.success(), "jar failed");
    std::fs::read(source_dir.join("hello.jar")).unwrap()
}

/// `stack build-local` reuses every image whose recipe is unchanged (the tests' set-up has
/// built them all), and names the stacks when asked for one it does not know.
#[test]
fn building_the_local_stacks_again_reuses_them() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let built: Value =
        serde_json::from_str(&crate::support::run_ok(&["stack", "build-local"])).unwrap();
    let built = built.as_array().unwrap();
    let images: Vec<&str> = built
        .iter()
        .map(|entry| entry["image"].as_str().unwrap())
        .collect();
    for image in [
        "stevedore/busybox:local",
        "stevedore/debian:bookworm-local",
        "stevedore/stack-default:local",
        "stevedore/stack-python:3.11-local",
        "stevedore/stack-node:18-local",
        "stevedore/stack-ruby:3.1-local",
        "stevedore/stack-php:8.2-local",
        "stevedore/stack-java:17-local",
        "stevedore/stack-go:1.19-local",
    ] {
        assert!(images.contains(&image), "{image} missing from {built:?}");
    }
    assert!(
        built.iter().all(|entry| entry["built"] == false),
        "{built:?}"
    );
    let output = Command::new(crate::support::binary())
        .args(["stack", "build-local", "cobol-85"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cobol-85") && stderr.contains("python-3.11"),
        "{stderr}"
    );
}

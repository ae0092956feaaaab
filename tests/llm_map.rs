//! `llm_map` against an in-process OpenAI-compatible server: caching per item,
//! faults, resume after SIGKILL, and secrets.

mod common;
#[allow(dead_code)]
#[path = "support/mock_openai.rs"]
mod mock_openai;

use std::time::Duration;

use common::*;
use mock_openai::{Config, Fault, FaultKind, MockServer};
use serde_json::Value;

fn server(latency_ms: u64, faults: Vec<Fault>) -> MockServer {
    MockServer::start(Config {
        latency_ms,
        faults,
        ..Config::default()
    })
}

/// A project with `n` rows and a pipeline that sends each to the server at `url`.
fn project(n: usize, url: &str, params: &str) -> Project {
    let p = Project::new();
    let rows: String = (0..n)
        .map(|i| format!("{{\"id\": {i}, \"extra_info\": {{\"question\": \"question {i}\", \"answer\": \"a{i}\"}}}}\n"))
        .collect();
    p.write("rows.jsonl", &rows);
    p.write("template.txt", "Summarize: {extra_info.question}");
    p.write(
        "p.yaml",
        &format!(
            "stages:\n  summarize:\n    kind: llm_map\n    deps: {{rows: rows.jsonl, template: template.txt}}\n    params: {{base_url: \"{url}\", model: m, api_key_env: MOCK_KEY, retry_base_s: 0.05{params}}}\n    outs: {{rows: out.jsonl}}\n"
        ),
    );
    p
}

fn out_rows(p: &Project) -> Vec<Value> {
    p.read("out.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn report(p: &Project) -> Value {
    p.anneal(&["status", "p.yaml", "--json"]).json()["stages"][0]["report"].clone()
}

#[test]
fn every_row_gets_its_reply_and_reruns_call_nothing() {
    let s = server(5, vec![]);
    let p = project(30, &s.url, "");
    p.run_ok("p.yaml", &[]);
    let rows = out_rows(&p);
    assert_eq!(rows.len(), 30);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["id"], i, "input order is kept");
        assert!(
            r["summary"].as_str().unwrap().starts_with("summary:"),
            "{r}"
        );
        assert_eq!(s.requests_for(&format!("Summarize: question {i}")), 1);
    }
    assert_eq!(s.requests(), 30);
    let rep = report(&p);
    assert_eq!(
        (
            rep["called"].as_u64(),
            rep["requests"].as_u64(),
            rep["rows_out"].as_u64()
        ),
        (Some(30), Some(30), Some(30))
    );
    assert!(rep["prompt_tokens"].as_u64().unwrap() > 0);

    // Cached stage: nothing runs. Forced: the journal answers every item.
    assert_eq!(p.run_ok("p.yaml", &[]), pairs(&[("summarize", "cached")]));
    p.run_ok("p.yaml", &["--force", "summarize"]);
    assert_eq!(s.requests(), 30);
    assert_eq!(report(&p)["cached"], 30);

    // Three changed rows: three calls.
    let changed = p
        .read("rows.jsonl")
        .replace("question 3\"", "question 3b\"")
        .replace("question 7\"", "question 7b\"")
        .replace("question 9\"", "question 9b\"");
    p.write("rows.jsonl", &changed);
    p.run_ok("p.yaml", &[]);
    assert_eq!(s.requests(), 33);
    assert_eq!(s.requests_for("Summarize: question 7b"), 1);

    // A new template changes every item's key.
    p.write("template.txt", "Summarize briefly: {extra_info.question}");
    let plan = p.plan("p.yaml");
    assert_eq!(plan[0].2, ["input changed: template.txt"]);
    p.run_ok("p.yaml", &[]);
    assert_eq!(s.requests(), 63);
    // So does a sampling param.
    p.write(
        "p.yaml",
        &p.read("p.yaml")
            .replace("retry_base_s: 0.05", "retry_base_s: 0.05, temperature: 0.9"),
    );
    p.run_ok("p.yaml", &[]);
    assert_eq!(s.requests(), 93);
    assert!(
        out_rows(&p)[0]["summary"]
            .as_str()
            .unwrap()
            .ends_with(":0.9")
    );
}

#[test]
fn transient_faults_are_retried_and_the_rest_is_not() {
    let s = server(
        5,
        vec![
            Fault::new("question 1\n", FaultKind::TooMany { retry_after_s: 1 }, 1),
            Fault::new("question 2\n", FaultKind::ServerError, 2),
            Fault::new("question 3\n", FaultKind::Hang { ms: 3000 }, 1),
            Fault::new("question 4\n", FaultKind::Garbage, 1),
        ],
    );
    let p = project(6, &s.url, ", timeout_s: 0.5");
    p.write("template.txt", "Summarize: {extra_info.question}\n");
    let t0 = std::time::Instant::now();
    p.run_ok("p.yaml", &[]);
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
    let n = |i: usize| s.requests_for(&format!("Summarize: question {i}\n"));
    assert_eq!((n(0), n(1), n(2), n(3), n(4), n(5)), (1, 2, 3, 2, 2, 1));
    let rep = report(&p);
    assert_eq!(rep["retries"], 5);
    assert_eq!(rep["failed"], 0);
    assert_eq!(out_rows(&p).len(), 6);
}

#[test]
fn a_client_error_fails_the_item_which_is_never_written() {
    let s = server(
        5,
        vec![Fault::new("question 2", FaultKind::BadRequest, 100)],
    );
    let p = project(5, &s.url, "");
    let r = p.anneal(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("1 item(s) failed (max_failures: 0)"),
        "{r:?}"
    );
    assert!(r.stderr.contains("rows.jsonl:3: HTTP 400"), "{r:?}");
    assert_eq!(
        s.requests_for("Summarize: question 2"),
        1,
        "a 400 is not retried"
    );
    assert!(!p.exists("out.jsonl"));
    assert_eq!(s.requests(), 5);

    // Tolerated: the stage succeeds without that row. Completed items are not called again.
    p.write(
        "p.yaml",
        &p.read("p.yaml")
            .replace("retry_base_s: 0.05", "retry_base_s: 0.05, max_failures: 1"),
    );
    p.run_ok("p.yaml", &[]);
    assert_eq!(s.requests(), 6);
    let rows = out_rows(&p);
    assert_eq!(
        rows.iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1, 3, 4]
    );
    assert_eq!(report(&p)["failed"], 1);
}

#[test]
fn sigkill_mid_stage_then_rerun_calls_each_item_once() {
    let s = server(40, vec![]);
    let p = project(150, &s.url, ", max_concurrent: 4");
    let mut child = p.spawn(&["run", "p.yaml"]);
    wait_for("40 answered requests", || s.answered_total() >= 40);
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = s.requests();
    assert!(before < 150, "finished before the kill");
    assert!(!p.exists("out.jsonl"));

    p.run_ok("p.yaml", &[]);
    assert_eq!(out_rows(&p).len(), 150);
    let answered = s.answered();
    assert_eq!(answered.len(), 150, "every item was answered");
    let twice: Vec<_> = answered.iter().filter(|(_, n)| **n > 1).collect();
    // Only calls holding one of the max_concurrent slots at the kill (in
    // flight, or answered and not yet journaled) may repeat.
    assert!(twice.len() <= 4, "items answered twice: {twice:?}");
    assert!(
        s.requests() <= 150 + 4,
        "{} requests for 150 items ({before} before the kill)",
        s.requests()
    );
    assert!(report(&p)["cached"].as_u64().unwrap() >= 36);
}

#[test]
fn the_api_key_is_sent_but_stored_nowhere() {
    let key = "sk-test-SECRET-8c1f2e";
    let s = MockServer::start(Config {
        latency_ms: 1,
        require_key: Some(key.into()),
        ..Config::default()
    });
    let p = project(3, &s.url, "");
    let r = p.anneal_env(&["run", "p.yaml"], &[("MOCK_KEY", key)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        s.auth_headers()
            .iter()
            .all(|h| h == &format!("Bearer {key}"))
    );
    assert!(!r.stderr.contains(key) && !r.stdout.contains(key));
    let mut stack = vec![p.path(".anneal")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(key),
                    "the key is in {}",
                    path.display()
                );
            }
        }
    }
    assert!(!p.read("out.jsonl").contains(key));
    // Without the key the server refuses, and a 401 is not retried.
    let q = project(1, &s.url, "");
    let r = q.anneal(&["run", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("HTTP 401"), "{r:?}");
}

#[test]
fn filter_passes_rows_through_and_requests_per_minute_paces_calls() {
    let s = server(1, vec![]);
    let p = project(
        8,
        &s.url,
        ", filter: \"id >= 2\", requests_per_minute: 1200",
    );
    let t0 = std::time::Instant::now();
    p.run_ok("p.yaml", &[]);
    // Six calls spaced 50 ms apart take at least 250 ms.
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!(s.requests(), 6);
    let rows = out_rows(&p);
    assert_eq!(rows.len(), 8);
    assert!(rows[0].get("summary").is_none() && rows[1].get("summary").is_none());
    assert!(rows[2..].iter().all(|r| r["summary"].is_string()));
    assert_eq!(report(&p)["filtered_out"], 2);
}

#[test]
fn replies_journaled_by_llm_map_v1_are_reused() {
    let s = server(1, vec![]);
    let p = project(4, &s.url, "");
    // Lines as llm_map v1 wrote them: {key, reply}, the key over model, template,
    // system, sampling and the rendered prompt.
    let params: anneal_stages::generation::GenParams = serde_json::from_value(serde_json::json!({
        "base_url": s.url, "model": "m", "api_key_env": "MOCK_KEY", "retry_base_s": 0.05
    }))
    .unwrap();
    let sampling = anneal_stages::generation::Sampling {
        temperature: 0.3,
        max_tokens: 2000,
        top_p: None,
        top_k: None,
        seed: None,
        stop: vec![],
        chat_template_kwargs: Default::default(),
    };
    let template = p.read("template.txt");
    let lines: String = (0..4)
        .map(|i| {
            let key = anneal_stages::llm_map::legacy_key(
                &params,
                &sampling,
                &template,
                &format!("Summarize: question {i}"),
            );
            format!("{{\"key\":\"{key}\",\"reply\":\"old reply {i}\"}}\n")
        })
        .collect();
    p.write(".anneal/cache/llm_map/summarize.jsonl", &lines);
    p.run_ok("p.yaml", &[]);
    assert_eq!(s.requests(), 0, "every reply came from the v1 journal");
    let rows = out_rows(&p);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["summary"], format!("old reply {i}"));
    }
    assert_eq!(report(&p)["cached"], 4);
}

/// Kills the child process it holds when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The client speaks TLS (rustls on ring): an HTTPS server whose certificate
/// a test CA signed is refused while that CA is not trusted, and answers
/// every row once `SSL_CERT_FILE` names it.
#[test]
fn https_certificates_are_verified_and_trusted_servers_answer() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let tls = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let path = |name: &str| tls.path().join(name).to_str().unwrap().to_string();
    std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/https_openai.py");
    let mut server = KillOnDrop(
        Command::new("python3")
            .args([script, &path("cert.pem"), &path("key.pem")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut port = String::new();
    std::io::BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url = format!("https://localhost:{}/v1", port.trim());
    let p = project(3, &url, ", max_retries: 0");

    // The server's CA, or none: then the system's roots, which lack it. No
    // proxy between the client and localhost.
    let run = |ca: Option<&str>| {
        let mut c = p.cmd(&["run", "p.yaml"]);
        c.env("MOCK_KEY", "k");
        for var in [
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            c.env_remove(var);
        }
        if let Some(ca) = ca {
            c.env("SSL_CERT_FILE", ca);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = run(None);
    assert!(
        !ok && stderr.contains("invalid peer certificate"),
        "{stderr}"
    );
    assert!(!p.exists("out.jsonl"));

    let (ok, stderr) = run(Some(&path("ca.pem")));
    assert!(ok, "{stderr}");
    let rows = out_rows(&p);
    assert_eq!(rows.len(), 3);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["summary"], format!("tls: Summarize: question {i}"), "{r}");
    }
}

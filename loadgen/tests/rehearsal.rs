//! Rehearsals of the real `loadgen` binary on tiny scenarios (`tests/scenarios/`): a run end to
//! end against the in-process gateway, scenario errors, the report's JSON schema, thresholds and
//! exit codes, coordinated omission against a fake gateway that stalls, and shards merged.
//!
//! Each run lasts a few seconds. Runs against the in-process gateway pass a generous
//! `--max-lag-ms`: in a debug build the gateway's first phone number takes about half a second
//! to parse (libphonenumber's metadata loads then), which stalls the whole process, so the few
//! users due meanwhile start late; these tests are not about the load generator's own lag.
//! (`tiny.toml` brings its crowd after that stall.)

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};

use loadgen::rehearsal::measure::{Count, Series};
use loadgen::rehearsal::report::Report;
use loadgen::rehearsal::scenario::Scenario;
use loadgen::rehearsal::schedule::{self, Arrival};

/// The longest any one `loadgen` process may take before the test kills it and fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Scheduler lag allowed in runs against the in-process gateway (see the module docs).
const MAX_LAG_MS: &str = "5000";

#[test]
fn tiny_scenario_runs_end_to_end() {
    let run = tiny_run();
    assert_eq!(run.outcome.code, Some(0), "{}", run.outcome);
    assert!(
        run.outcome.stdout.contains("result: passed"),
        "{}",
        run.outcome
    );
    let report = &run.report;
    let arrivals = schedule_of(&scenario_path("tiny.toml"));
    assert!(
        arrivals[0].at < Duration::from_secs(1),
        "tiny.toml's seed brings no user in the trickle before the crowd"
    );
    let scheduled = arrivals.len() as u64;
    assert!(
        scheduled >= 30,
        "the scenario schedules only {scheduled} users"
    );
    assert_eq!(report.scenario.scheduled_arrivals, scheduled);
    assert_eq!(report.count(Count::Arrived), scheduled);
    assert_eq!(report.count(Count::Started), scheduled);
    let verified = report.count(Count::Verified);
    assert!(
        verified * 10 >= scheduled * 9,
        "only {verified} of {scheduled} users verified"
    );
    for count in [
        Count::ExpiredSessions,
        Count::LostSms,
        Count::DuplicateSms,
        Count::TransportErrors,
        Count::Unfinished,
    ] {
        assert_eq!(report.count(count), 0, "{}", count.name());
    }
    assert!(report.rejections.is_empty(), "{:?}", report.rejections);
    assert_eq!(report.target, "in-process");
    assert_eq!(
        (report.shards.as_slice(), report.shard_count),
        (&[0][..], 1)
    );
    assert_eq!(report.result, "passed");
    assert!(report.self_watch.valid, "{:?}", report.self_watch.problems);
    assert_eq!(report.latency(Series::Start).count, scheduled);
    assert_eq!(report.carriers.len(), 1);
    assert!(report.carriers[0].accepted >= verified);
    // The marks count the users verified before them, in scenario time.
    let marks: Vec<(&str, u64)> = report
        .marks
        .iter()
        .map(|mark| (mark.label.as_str(), mark.verified))
        .collect();
    let trickle = arrivals
        .iter()
        .filter(|arrival| arrival.at < Duration::from_secs(2))
        .count() as u64;
    assert_eq!(marks, [("before the crowd", marks[0].1), ("end", verified)]);
    assert!(marks[0].1 <= trickle, "{marks:?}, {trickle} in the trickle");
    assert!(
        run.outcome.stdout.contains("before the crowd (2 s)"),
        "{}",
        run.outcome
    );
}

/// The same users with an SMSC beside the HTTP carrier: the in-process gateway binds to the
/// simulator, and every SMS sent over SMPP reaches its handset once, with its receipt.
#[test]
fn tiny_scenario_runs_end_to_end_over_smpp_and_http() {
    let dir = work_dir("tiny-smpp");
    let outcome = loadgen(
        &dir,
        [
            OsStr::new("run"),
            scenario_path("tiny-smpp.toml").as_os_str(),
            OsStr::new("--progress=off"),
            OsStr::new("--max-lag-ms"),
            OsStr::new(MAX_LAG_MS),
            OsStr::new("--report"),
            OsStr::new("report.json"),
        ],
    );
    assert_eq!(outcome.code, Some(0), "{outcome}");
    let (report, _) = read_report(&dir.join("report.json"));
    for count in [
        Count::LostSms,
        Count::DuplicateSms,
        Count::TransportErrors,
        Count::Unfinished,
    ] {
        assert_eq!(report.count(count), 0, "{}: {outcome}", count.name());
    }
    let smsc = report
        .carriers
        .iter()
        .find(|carrier| carrier.name == "smsc")
        .expect("the SMSC in the report");
    assert!(smsc.accepted > 0, "the SMSC took no SMS: {outcome}");
    assert_eq!(smsc.receipts_sent, smsc.accepted, "{outcome}");
    assert_eq!(smsc.receipts_failed, 0, "{outcome}");
    assert_eq!(
        report.count(Count::SmsReceived),
        report
            .carriers
            .iter()
            .map(|carrier| carrier.accepted)
            .sum::<u64>(),
        "{outcome}"
    );
}

#[test]
fn scenario_errors_name_the_file_and_the_key() {
    let dir = work_dir("scenario_errors");
    let tiny = std::fs::read_to_string(scenario_path("tiny.toml")).unwrap();
    for (name, from, to, expected) in [
        (
            "wrong_type",
            "capacity_per_sec = 200",
            "capacity_per_sec = \"fast\"",
            &["key carriers[0].capacity_per_sec", "invalid type"][..],
        ),
        (
            "unknown_key",
            "window = 20",
            "window = 20\ncolour = \"red\"",
            &["key carriers[0].colour", "unknown field `colour`"],
        ),
        (
            "bad_capacity",
            "capacity_per_sec = 200",
            "capacity_per_sec = -5",
            &["key carriers[0].capacity_per_sec", "must be positive"],
        ),
        (
            "bad_rate",
            "per_sec = 30",
            "per_sec = -1",
            &["key arrivals[3].per_sec", "must be between"],
        ),
        (
            "short_code_ttl",
            "code_ttl_secs = 30",
            "code_ttl_secs = 5",
            &["key gateway.code_ttl_secs", "must be between 10 and"],
        ),
        ("not_toml", "seed = 7", "seed = 7\n[[", &["scenario "]),
    ] {
        assert!(tiny.contains(from), "{name}: tiny.toml has no {from:?}");
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, tiny.replacen(from, to, 1)).unwrap();
        let outcome = loadgen(&dir, [OsStr::new("run"), path.as_os_str()]);
        assert_eq!(outcome.code, Some(2), "{name}: {outcome}");
        assert!(
            outcome.stderr.contains(&path.display().to_string()),
            "{name}: the message names no file: {outcome}"
        );
        for needle in expected {
            assert!(
                outcome.stderr.contains(needle),
                "{name}: {needle:?}: {outcome}"
            );
        }
        assert!(outcome.stdout.is_empty(), "{name}: it ran: {outcome}");
    }

    let missing = dir.join("missing.toml");
    let outcome = loadgen(&dir, [OsStr::new("run"), missing.as_os_str()]);
    assert_eq!(outcome.code, Some(2), "{outcome}");
    assert!(
        outcome.stderr.contains(&missing.display().to_string())
            && outcome.stderr.contains("cannot read it"),
        "{outcome}"
    );
}

#[test]
fn report_matches_the_schema() {
    let schema = report_schema();
    jsonschema::draft202012::meta::validate(&schema)
        .unwrap_or_else(|error| panic!("report.schema.json is no draft 2020-12 schema: {error}"));
    let validator = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();

    // The schema names every counter and series, and documents every field.
    let names = |pointer: &str| -> Vec<String> {
        let mut names: Vec<String> = schema
            .pointer(pointer)
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("the schema has no {pointer}"))
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    };
    let mut counters: Vec<String> = Count::ALL.map(|c| c.name().to_owned()).to_vec();
    counters.sort();
    assert_eq!(names("/properties/counts/properties"), counters);
    let mut series: Vec<String> = Series::ALL.map(|s| s.name().to_owned()).to_vec();
    series.sort();
    assert_eq!(names("/properties/latency/properties"), series);
    assert_eq!(names("/properties/histograms/properties"), series);
    let mut undocumented = Vec::new();
    find_undocumented(&schema, "", &mut undocumented);
    assert!(undocumented.is_empty(), "no description: {undocumented:?}");

    let report = &tiny_run().json;
    let errors: Vec<String> = validator
        .iter_errors(report)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "the report breaks the schema: {errors:#?}"
    );

    // Broken copies must not validate, or the check above proves nothing.
    type Break = fn(&mut Value);
    let breaks: [(&str, Break); 12] = [
        ("without counts", |r| {
            r.as_object_mut().unwrap().remove("counts");
        }),
        ("a result of maybe", |r| r["result"] = json!("maybe")),
        ("schema version 2", |r| r["schema_version"] = json!(2)),
        ("an unknown top-level field", |r| r["colour"] = json!("red")),
        ("an unknown counter", |r| r["counts"]["sneezes"] = json!(1)),
        ("without the arrived counter", |r| {
            r["counts"].as_object_mut().unwrap().remove("arrived");
        }),
        ("a negative counter", |r| {
            r["counts"]["verified"] = json!(-1)
        }),
        ("a latency as text", |r| {
            r["latency"]["start"]["p99_ms"] = json!("fast")
        }),
        ("without a histogram", |r| {
            r["histograms"].as_object_mut().unwrap().remove("check");
        }),
        ("a histogram not in base64", |r| {
            r["histograms"]["start"] = json!("not base64!")
        }),
        ("an unknown carrier field", |r| {
            r["carriers"][0]["colour"] = json!("red")
        }),
        ("a start time that is no time", |r| {
            r["started_at"] = json!("yesterday")
        }),
    ];
    for (name, break_it) in breaks {
        let mut broken = report.clone();
        break_it(&mut broken);
        assert_ne!(&broken, report, "{name}: nothing changed");
        assert!(
            !validator.is_valid(&broken),
            "a report with {name} validates"
        );
    }
}

#[test]
fn thresholds_decide_the_exit_code() {
    let dir = work_dir("thresholds");
    // The trickle and half a second of the crowd are enough: users check codes within a second.
    let tiny = std::fs::read_to_string(scenario_path("tiny.toml")).unwrap();
    assert!(tiny.contains("duration_secs = 4"));
    let scenario = dir.join("short.toml");
    std::fs::write(
        &scenario,
        tiny.replacen("duration_secs = 4", "duration_secs = 3", 1),
    )
    .unwrap();
    let run_with = |threshold: &str, report: &str| {
        let outcome = loadgen(
            &dir,
            [
                OsStr::new("run"),
                scenario.as_os_str(),
                OsStr::new("--progress=off"),
                OsStr::new("--max-lag-ms"),
                OsStr::new(MAX_LAG_MS),
                OsStr::new("--threshold"),
                OsStr::new(threshold),
                OsStr::new("--report"),
                OsStr::new(report),
            ],
        );
        (outcome, dir.join(report))
    };
    let ((kept, kept_report), (broken, broken_report)) = std::thread::scope(|scope| {
        let kept = scope.spawn(|| run_with("expired_sessions==0", "kept.json"));
        let broken = scope.spawn(|| run_with("p99(check)<0.001ms", "broken.json"));
        (kept.join().unwrap(), broken.join().unwrap())
    });

    assert_eq!(kept.code, Some(0), "{kept}");
    let (report, _) = read_report(&kept_report);
    assert_eq!(report.result, "passed");
    assert_eq!(report.thresholds.len(), 1);
    assert_eq!(report.thresholds[0].threshold, "expired_sessions==0");
    assert!(report.thresholds[0].passed);
    assert_eq!(report.thresholds[0].value, Some(0.0));

    assert_eq!(broken.code, Some(1), "{broken}");
    assert!(broken.stdout.contains("BROKEN"), "{broken}");
    let (report, _) = read_report(&broken_report);
    assert_eq!(report.result, "thresholds_broken");
    assert!(report.self_watch.valid, "{:?}", report.self_watch.problems);
    assert!(
        report.latency(Series::Check).count > 0,
        "no user checked a code"
    );
    assert!(!report.thresholds[0].passed);
    assert!(
        report.thresholds[0]
            .value
            .is_some_and(|value| value >= 0.001)
    );

    // A threshold that does not parse is refused before anything runs.
    let outcome = loadgen(
        &dir,
        [
            OsStr::new("run"),
            scenario.as_os_str(),
            OsStr::new("--threshold"),
            OsStr::new("p99(chek)<5ms"),
            OsStr::new("--report"),
            OsStr::new("refused.json"),
        ],
    );
    // 2: bad configuration, clap's code for a bad flag too.
    assert_eq!(
        outcome.code,
        Some(2),
        "an unparsable threshold was not refused: {outcome}"
    );
    assert!(
        outcome.stderr.contains("p99(chek)<5ms") && outcome.stderr.contains("unknown series"),
        "{outcome}"
    );
    assert!(!dir.join("refused.json").exists());
}

/// When the fake gateway stops answering, from its first request on.
const STALL_FROM: Duration = Duration::from_millis(1000);
/// When it answers again.
const STALL_UNTIL: Duration = Duration::from_millis(2500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_gateway_shows_in_every_start_it_delayed() {
    let dir = work_dir("stall");
    let fake = FakeGateway::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, fake.router()).into_future());

    let scenario = scenario_path("stall.toml");
    let run_dir = dir.clone();
    let run_scenario = scenario.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        loadgen(
            &run_dir,
            [
                OsStr::new("run"),
                run_scenario.as_os_str(),
                OsStr::new("--target"),
                OsStr::new(&url),
                OsStr::new("--connections=1"),
                OsStr::new("--progress=off"),
                OsStr::new("--report=report.json"),
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(outcome.code, Some(0), "{outcome}");
    let (report, _) = read_report(&dir.join("report.json"));

    let arrivals = schedule_of(&scenario);
    let n_users = arrivals.len() as u64;
    assert_eq!(report.count(Count::Arrived), n_users);
    assert_eq!(report.count(Count::Started), n_users);
    assert_eq!(
        report.count(Count::GaveUp),
        n_users,
        "the fake sends no SMS"
    );
    assert_eq!(report.count(Count::TransportErrors), 0);
    assert_eq!(report.count(Count::LostSms), 0);

    // The fake's clock starts at its first request, the first user's start.
    let first = arrivals[0].at;
    let arrived_between = |from: Duration, until: Duration| {
        arrivals
            .iter()
            .filter(|arrival| first + from <= arrival.at && arrival.at < first + until)
            .count() as u64
    };
    // Users who arrived during the stall waited for its end; those who arrived more than half
    // a second before it ended waited at least that long (with a margin for clock offsets).
    let during_stall = arrived_between(STALL_FROM, STALL_UNTIL);
    let surely_slow = arrived_between(
        STALL_FROM + Duration::from_millis(100),
        STALL_UNTIL - Duration::from_millis(600),
    );
    let start = report
        .histogram(Series::Start)
        .expect("the start histogram decodes");
    assert_eq!(start.len(), n_users);
    let slow: u64 = start
        .iter_recorded()
        .filter(|value| value.value_iterated_to() >= 500_000)
        .map(|value| value.count_at_value())
        .sum();
    let stalled_requests = fake.state.stalled.load(Ordering::Relaxed);
    let summary = format!(
        "{slow} of {n_users} starts took 500 ms or more; {during_stall} users arrived during the \
         stall, {surely_slow} at least 600 ms before its end; the fake stalled \
         {stalled_requests} requests; start latency {:?}",
        report.latency(Series::Start)
    );
    eprintln!("{summary}");
    assert!(during_stall >= 20, "{summary}");
    assert!(slow >= surely_slow, "{summary}");
    assert!(slow * 10 >= during_stall * 6, "{summary}");
    assert!(
        slow <= during_stall + 5,
        "the stall spread too far: {summary}"
    );
    assert!(
        report.latency(Series::Start).p90_ms > 500.0,
        "p90 shows no stall: {summary}"
    );
    assert!(
        report.quantile_ms(Series::Start, 0.99) >= 1000.0,
        "p99 shows no stall: {summary}"
    );
    // What a tool timing requests from their sending would have seen: one slow request, since
    // the one connection was busy with it while every other user waited.
    assert!((1..=2).contains(&stalled_requests), "{summary}");
}

#[test]
fn shards_merge_to_the_totals_of_one_run() {
    let dir = work_dir("shards");
    let scenario = scenario_path("tiny.toml");
    let run_shard = |shard: &str, report: &str| {
        let outcome = loadgen(
            &dir,
            [
                OsStr::new("run"),
                scenario.as_os_str(),
                OsStr::new("--progress=off"),
                OsStr::new("--max-lag-ms"),
                OsStr::new(MAX_LAG_MS),
                OsStr::new("--shard"),
                OsStr::new(shard),
                OsStr::new("--report"),
                OsStr::new(report),
            ],
        );
        assert_eq!(outcome.code, Some(0), "shard {shard}: {outcome}");
        read_report(&dir.join(report)).0
    };
    let (a, b, whole) = std::thread::scope(|scope| {
        let a = scope.spawn(|| run_shard("0/2", "a.json"));
        let b = scope.spawn(|| run_shard("1/2", "b.json"));
        let whole = scope.spawn(|| run_shard("0/1", "whole.json"));
        (a.join().unwrap(), b.join().unwrap(), whole.join().unwrap())
    });
    for shard in [&a, &b, &whole] {
        assert_eq!(
            shard.count(Count::Arrived),
            shard.scenario.scheduled_arrivals
        );
    }
    assert!(a.count(Count::Arrived) > 0 && b.count(Count::Arrived) > 0);

    let outcome = loadgen(
        &dir,
        ["merge", "a.json", "b.json", "--report", "merged.json"],
    );
    assert_eq!(outcome.code, Some(0), "{outcome}");
    assert!(outcome.stdout.contains("2 shards merged"), "{outcome}");
    let (merged, json) = read_report(&dir.join("merged.json"));
    assert_eq!(
        (merged.shards.as_slice(), merged.shard_count),
        (&[0, 1][..], 2)
    );
    // A shard merged twice, or a shard missing, is refused.
    let twice = loadgen(&dir, ["merge", "a.json", "a.json"]);
    assert_eq!(twice.code, Some(2), "{twice}");
    assert!(
        twice.stderr.contains("shard 0 is in another report"),
        "{twice}"
    );
    let half = loadgen(&dir, ["merge", "a.json"]);
    assert_eq!(half.code, Some(2), "{half}");
    assert!(half.stderr.contains("missing"), "{half}");
    assert_eq!(
        merged.scenario.scheduled_arrivals,
        whole.scenario.scheduled_arrivals
    );
    assert_eq!(merged.count(Count::Arrived), whole.count(Count::Arrived));
    let starts = |report: &Report| report.histogram(Series::Start).unwrap().len();
    assert_eq!(starts(&merged), starts(&a) + starts(&b));
    assert_eq!(starts(&merged), merged.latency(Series::Start).count);
    assert_eq!(starts(&merged), whole.count(Count::Arrived));
    // Second by second, the shards' schedules add up to the whole one.
    let scheduled = |report: &Report| -> Vec<u64> {
        let mut seconds: Vec<u64> = report.timeline.iter().map(|s| s.scheduled).collect();
        while seconds.last() == Some(&0) {
            seconds.pop();
        }
        seconds
    };
    assert_eq!(scheduled(&merged), scheduled(&whole));
    assert_eq!(merged.result, "passed");

    let validator = jsonschema::draft202012::new(&report_schema()).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&json)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "the merged report breaks the schema: {errors:#?}"
    );
}

// === helpers ===

/// How a `loadgen` process ended, and what it printed.
struct Outcome {
    /// `None` when a signal ended it.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `loadgen ARGS` in `dir` (relative paths are relative to it); kills it and fails the test
/// past [`RUN_TIMEOUT`].
fn loadgen<I, S>(dir: &Path, args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    static N_RUNS: AtomicU64 = AtomicU64::new(0);
    let n = N_RUNS.fetch_add(1, Ordering::Relaxed);
    let stdout_path = dir.join(format!("run-{n}.stdout"));
    let stderr_path = dir.join(format!("run-{n}.stderr"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    // Flags come from the test alone, not from the environment it runs in.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LOADGEN_") {
            command.env_remove(name);
        }
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "loadgen ran longer than {RUN_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: std::fs::read_to_string(&stdout_path).unwrap(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap(),
    }
}

/// A fresh, empty directory for one test's files.
fn work_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("rehearsal")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn scenario_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
}

/// The whole arrival schedule of a scenario file (one shard), as `loadgen run` draws it.
fn schedule_of(path: &Path) -> Vec<Arrival> {
    let scenario = Scenario::load(path).unwrap();
    schedule::arrivals(&scenario.arrivals, scenario.duration, scenario.seed, 0, 1)
}

fn report_schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("report.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A report file, typed (as `loadgen merge` reads it) and as JSON.
fn read_report(path: &Path) -> (Report, Value) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("report {}: {error}", path.display()));
    (
        serde_json::from_str(&text).unwrap(),
        serde_json::from_str(&text).unwrap(),
    )
}

/// Every subschema under `properties` or `$defs` that has no `description`, by JSON pointer.
fn find_undocumented(schema: &Value, pointer: &str, found: &mut Vec<String>) {
    let Some(object) = schema.as_object() else {
        return;
    };
    for keyword in ["properties", "$defs"] {
        for (name, subschema) in object
            .get(keyword)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let pointer = format!("{pointer}/{keyword}/{name}");
            if subschema.get("description").is_none() {
                found.push(pointer.clone());
            }
            find_undocumented(subschema, &pointer, found);
        }
    }
    if let Some(items) = object.get("items") {
        find_undocumented(items, &format!("{pointer}/items"), found);
    }
}

/// The run of `tiny.toml` that several tests look at, made once.
struct TinyRun {
    outcome: Outcome,
    report: Report,
    json: Value,
}

fn tiny_run() -> &'static TinyRun {
    static RUN: OnceLock<TinyRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = work_dir("tiny");
        let outcome = loadgen(
            &dir,
            [
                OsStr::new("run"),
                scenario_path("tiny.toml").as_os_str(),
                OsStr::new("--progress=off"),
                OsStr::new("--max-lag-ms"),
                OsStr::new(MAX_LAG_MS),
                OsStr::new("--report"),
                OsStr::new("report.json"),
            ],
        );
        assert!(
            dir.join("report.json").exists(),
            "no report written: {outcome}"
        );
        let (report, json) = read_report(&dir.join("report.json"));
        TinyRun {
            outcome,
            report,
            json,
        }
    })
}

/// A gateway that answers like otpgate, sends no SMS, and stops answering from
/// [`STALL_FROM`] to [`STALL_UNTIL`] after its first request.
#[derive(Clone, Default)]
struct FakeGateway {
    state: Arc<FakeState>,
}

#[derive(Default)]
struct FakeState {
    first_request: OnceLock<Instant>,
    next_id: AtomicU64,
    /// Requests that arrived during the stall.
    stalled: AtomicU64,
}

impl FakeGateway {
    fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/verifications", post(start))
            .route("/v1/verifications/{id}", get(read))
            .route("/v1/verifications/{id}/resend", post(resend))
            .route("/v1/verifications/{id}/check", post(check))
            .with_state(self.clone())
    }

    /// Holds a request that arrives during the stall until the stall ends.
    async fn stall(&self) {
        let first = *self.state.first_request.get_or_init(Instant::now);
        let since = first.elapsed();
        if (STALL_FROM..STALL_UNTIL).contains(&since) {
            self.state.stalled.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep_until((first + STALL_UNTIL).into()).await;
        }
    }
}

/// A pending verification whose SMS is still queued, as otpgate shows it.
fn pending(id: &str) -> Value {
    json!({
        "id": id,
        "status": "pending",
        "delivery": { "state": "queued", "carrier": null, "attempts": 0, "eta_seconds": null },
        "attempts_left": 5,
    })
}

async fn start(
    State(fake): State<FakeGateway>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    fake.stall().await;
    let id = format!("v{}", fake.state.next_id.fetch_add(1, Ordering::Relaxed));
    let mut view = pending(&id);
    view["phone"] = body["phone"].clone();
    (StatusCode::ACCEPTED, Json(view))
}

async fn read(State(fake): State<FakeGateway>, UrlPath(id): UrlPath<String>) -> Json<Value> {
    fake.stall().await;
    Json(pending(&id))
}

async fn resend(
    State(fake): State<FakeGateway>,
    UrlPath(id): UrlPath<String>,
) -> (StatusCode, Json<Value>) {
    fake.stall().await;
    (StatusCode::ACCEPTED, Json(pending(&id)))
}

async fn check(State(fake): State<FakeGateway>, UrlPath(_id): UrlPath<String>) -> Json<Value> {
    fake.stall().await;
    Json(json!({ "valid": false, "status": "pending", "attempts_left": 4 }))
}

/// Two shards drive one external gateway: each shard's users own whole number prefixes, the
/// gateway routes them to that shard's carriers, and every SMS reaches its user's handset.
#[test]
fn shards_against_one_gateway_get_their_own_users_sms() {
    let dir = work_dir("shards-target");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let ports = [free_port(), free_port()];
    let base = std::fs::read_to_string(scenario_path("tiny.toml")).unwrap();
    let token = "receipt-token-of-the-shard-carriers";
    let mut files = Vec::new();
    for (shard, port) in ports.iter().enumerate() {
        let text = base.replace(
            "name = \"alpha\"\n",
            &format!(
                "name = \"alpha\"\nlisten = \"127.0.0.1:{port}\"\nreceipt_token = \"{token}\"\n"
            ),
        );
        let file = dir.join(format!("shard{shard}.toml"));
        std::fs::write(&file, text).unwrap();
        files.push(file);
    }
    let scenario = Scenario::load(&files[0]).unwrap();

    // The external gateway, with a carrier per shard routed by the shards' prefixes.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (api, admin) = runtime.block_on(async {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (api, admin)
    });
    let (api_addr, admin_addr) = (api.local_addr().unwrap(), admin.local_addr().unwrap());
    let mut config = format!("public_url = \"http://{api_addr}\"\n");
    for (shard, port) in ports.iter().enumerate() {
        let prefixes: Vec<String> = scenario
            .shard_prefixes(shard as u64, 2)
            .iter()
            .map(|prefix| format!("\"{prefix}\""))
            .collect();
        config.push_str(&format!(
            "[[carriers]]\nname = \"shard{shard}\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/sms\"\n\
             pace_per_sec = 1000\nwindow = 20\nreceipt_token = \"{token}\"\nprefixes = [{}]\n",
            prefixes.join(", ")
        ));
    }
    let config = gateway::config::Config::from_toml(&config).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = runtime.spawn(gateway::run(
        gateway::Listeners { api, admin },
        config,
        gateway::clock::Clock::system(),
        async move {
            let _ = stopped.await;
        },
    ));

    let run_shard = |shard: usize| {
        let report = format!("shard{shard}.json");
        let outcome = loadgen(
            &dir,
            [
                OsStr::new("run"),
                files[shard].as_os_str(),
                OsStr::new("--progress=off"),
                OsStr::new("--max-lag-ms"),
                OsStr::new(MAX_LAG_MS),
                OsStr::new("--target"),
                OsStr::new(&format!("http://{api_addr}")),
                OsStr::new("--gateway-admin"),
                OsStr::new(&format!("http://{admin_addr}")),
                OsStr::new("--shard"),
                OsStr::new(&format!("{shard}/2")),
                OsStr::new("--report"),
                OsStr::new(&report),
            ],
        );
        assert_eq!(outcome.code, Some(0), "shard {shard}: {outcome}");
        assert!(
            outcome
                .stderr
                .contains("the gateway must route numbers starting with"),
            "{outcome}"
        );
        read_report(&dir.join(report)).0
    };
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| run_shard(0));
        let b = scope.spawn(|| run_shard(1));
        (a.join().unwrap(), b.join().unwrap())
    });
    for report in [&a, &b] {
        let arrived = report.count(Count::Arrived);
        assert!(arrived > 0);
        // Every user got its SMS: none went to the other shard's handsets.
        assert_eq!(
            report.count(Count::SmsReceived),
            arrived,
            "{}",
            report.summary()
        );
        assert_eq!(report.handsets.to_strangers, 0, "{}", report.summary());
        assert_eq!(report.count(Count::GaveUp), 0, "{}", report.summary());
        assert_eq!(report.count(Count::LostSms), 0);
        assert!(report.gateway.is_some(), "--gateway-admin was read");
    }
    let _ = stop.send(());
    runtime.block_on(gateway).unwrap().unwrap();
}

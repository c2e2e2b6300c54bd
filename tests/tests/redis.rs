//! The redis back-end with several gateway instances on one real redis-server (or a 3-master
//! Redis Cluster), each started by the test on a free port: shared limits and verifications,
//! a shared queue drained by all, an instance dying mid-load, Redis going away and coming back.

use std::collections::HashSet;
use std::time::Duration;

use tests::process::OtpgateProcess;
use tests::redis::{RedisCluster, RedisOptions, RedisServer, require_redis};
use tests::{FakeCarrier, Gateway, Reply, on_redis, phone};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn instance(config: &str, url: &str) -> Gateway {
    let gateway =
        Gateway::start_configured(&on_redis(config, url), gateway::clock::Clock::system()).await;
    gateway.wait_ready().await;
    gateway
}

fn accepted_by(text: &str) -> f64 {
    tests::metric_value(
        text,
        r#"otpgate_sms_submitted_total{carrier="alpha",outcome="accepted"}"#,
    )
    .unwrap_or(0.0)
}

/// Three `otpgate` processes on one Redis: a phone's send limit and its live verification hold
/// across them; a code sent through one is checked on another; all three take jobs from the
/// shared queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_limits_verifications_and_the_queue() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_millis(20))]);
    let config = format!(
        "sweep_interval_ms = 50\n[limits]\nphone_sends = [{{ max = 2, per_secs = 3600 }}]\n{}",
        carrier.config("alpha", 1000, 4)
    );
    let processes = [
        OtpgateProcess::start(&on_redis(&config, &redis.url())).await,
        OtpgateProcess::start(&on_redis(&config, &redis.url())).await,
        OtpgateProcess::start(&on_redis(&config, &redis.url())).await,
    ];
    let gateways: Vec<&Gateway> = processes.iter().map(|process| &process.gateway).collect();

    // Started on one; a second caller on another gets its own verification, with the code.
    let number = phone(1);
    let first = gateways[0].start_verification(&number).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let second = gateways[1].start_verification(&number).await;
    assert_eq!(second.status, 202, "{}", second.text);
    assert_ne!(second.id(), first.id(), "{}", second.text);

    // Both SMS carry one code, which checks on a third instance, for either verification.
    carrier.wait_for(2, TIMEOUT).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let codes: HashSet<String> = carrier
        .received()
        .iter()
        .filter_map(|sms| tests::extract_code(&sms.text))
        .collect();
    assert_eq!(codes.len(), 1, "one code in both SMS");
    let checked = gateways[2].check(&first.id(), &code).await;
    assert_eq!(checked.body["valid"], true, "{}", checked.text);
    let checked = gateways[2].check(&second.id(), &code).await;
    assert_eq!(checked.body["valid"], true, "{}", checked.text);

    // The phone's limit (2 an hour) counts sends made through any instance.
    let third = gateways[2].start_verification(&number).await;
    assert_eq!(third.status, 429, "{}", third.text);
    assert_eq!(third.error_code(), "rate_limited_phone", "{}", third.text);

    // Jobs started on one instance are sent by all three.
    let n = 90;
    for i in 0..n {
        let answer = gateways[0].start_verification(&phone(1000 + i)).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
    }
    let received = carrier.wait_for(n as usize + 2, TIMEOUT).await;
    let distinct: HashSet<&str> = received.iter().map(|sms| sms.message_id.as_str()).collect();
    assert_eq!(distinct.len(), received.len(), "no SMS twice");
    for gateway in &gateways {
        let sent = accepted_by(&gateway.metrics().await);
        assert!(sent >= 1.0, "every instance sent some: {sent}");
    }
}

/// On Redis, a start is refused with `503` once the shared queue is full, as measured at the
/// last sweep by any instance.
#[tokio::test]
async fn admission_follows_the_shared_backlog() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_secs(3))]);
    let config = format!(
        "sweep_interval_ms = 50\n[queue]\ncapacity = 2\n{}",
        carrier.config("alpha", 1, 1)
    );
    let gateway = instance(&config, &redis.url()).await;
    for i in 0..2 {
        let answer = gateway.start_verification(&phone(10 + i)).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = gateway.start_verification(&phone(20)).await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.error_code(), "overloaded", "{}", refused.text);
    assert!(refused.retry_after().is_some());
    gateway.stop().await.unwrap();
}

/// A carrier dropped from the configuration stops nothing: what Redis still holds for it (a
/// receipt held for a submit answer that never came) is skipped by the next instance's sweep,
/// which goes on expiring verifications.
#[tokio::test]
async fn a_carrier_removed_from_the_config_stops_nothing() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let (alpha, beta) = (FakeCarrier::start().await, FakeCarrier::start().await);
    let token = "receipt-token-of-beta-0123456789";
    let both = format!(
        "sweep_interval_ms = 50\n{}{}receipt_token = \"{token}\"\nprefixes = [\"+44\"]\n",
        alpha.config("alpha", 100, 4),
        beta.config("beta", 100, 4)
    );
    let before = instance(&both, &redis.url()).await;
    // A receipt for an SMS beta never answered for: held in Redis, under beta's id.
    let body = serde_json::json!({ "carrier_message_id": "b-1", "status": "delivered" });
    let held = before
        .request_with_bearer(
            http::Method::POST,
            "/v1/carriers/beta/receipts",
            body.to_string().into_bytes(),
            Some(token),
        )
        .await;
    assert_eq!(held.status, 200, "{}", held.text);
    before.stop().await.unwrap();

    // The next configuration has alpha only; its clock runs past the hold.
    let clock = gateway::clock::Clock::system();
    let only_alpha = format!("sweep_interval_ms = 50\n{}", alpha.config("alpha", 100, 4));
    let after =
        Gateway::start_configured(&on_redis(&only_alpha, &redis.url()), clock.clone()).await;
    after.wait_ready().await;
    // Only the sweep ends a verification nobody reads: one sweep meets beta's receipt, and the
    // sweeps after it must still run.
    let expired = r#"otpgate_verifications_ended_total{outcome="expired"}"#;
    for n in 1..=2 {
        let started = after.start_verification(&phone(30 + n)).await;
        assert_eq!(started.status, 202, "{}", started.text);
        alpha.wait_for(n as usize, TIMEOUT).await;
        clock.advance(Duration::from_secs(60 * 60));
        after
            .wait_for_metric(expired, |ended| ended >= f64::from(n))
            .await;
    }
    after.stop().await.unwrap();
}

/// `kill -9` of an `otpgate` process mid-load (no shutdown, no acknowledgements) leaves its jobs
/// pending in the streams; another process takes them over after `claim_after_secs` and every
/// verification gets its SMS. Duplicates are at most what the dead one had in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_instance_loses_no_sms() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_millis(50))]);
    let window = 5;
    let config = format!(
        "sweep_interval_ms = 50\n{}",
        carrier.config("alpha", 100, window)
    );
    // on_redis ends with the `[redis]` table: a key added after it lands in it.
    let fast_claim = format!("{}claim_after_secs = 1\n", on_redis(&config, &redis.url()));
    let mut doomed = OtpgateProcess::start(&fast_claim).await;
    let n = 150u32;
    let mut ids = HashSet::new();
    for i in 0..n {
        let answer = doomed.gateway.start_verification(&phone(3000 + i)).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        ids.insert(answer.id());
    }
    // Let it take some jobs, then kill it.
    carrier.wait_for(10, TIMEOUT).await;
    doomed.kill();
    let at_death = carrier.received().len();
    let survivor = OtpgateProcess::start(&fast_claim).await;

    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let received = carrier.received();
        let served: HashSet<String> = received
            .iter()
            .filter_map(|sms| sms.message_id.split('.').next().map(str::to_owned))
            .collect();
        if ids.iter().all(|id| served.contains(id)) {
            let duplicates = received.len() - served.len();
            assert!(
                duplicates <= window as usize,
                "{duplicates} duplicates, more than the dead instance's window of {window} \
                 (it died after {at_death} SMS)"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} verifications got an SMS",
            ids.iter().filter(|id| served.contains(*id)).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        survivor.log().contains("took over SMS jobs"),
        "{}",
        survivor.log()
    );
}

/// Redis stopped and started again (append-only file on): calls that need it answer `503`
/// with `Retry-After` meanwhile and `/readyz` says not ready; nothing accepted before is lost,
/// and the gateway recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_and_coming_back_loses_nothing() {
    if !require_redis() {
        return;
    }
    let mut redis = RedisServer::start_with(RedisOptions { appendonly: true });
    let carrier = FakeCarrier::start().await;
    // Slow enough that jobs are still queued when Redis goes away.
    let config = format!("sweep_interval_ms = 50\n{}", carrier.config("alpha", 10, 1));
    let gateway = instance(&config, &redis.url()).await;
    let n = 30u32;
    let mut ids = Vec::new();
    for i in 0..n {
        let answer = gateway.start_verification(&phone(5000 + i)).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        ids.push(answer.id());
    }
    redis.stop();
    let refused = gateway.start_verification(&phone(6000)).await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(
        refused.error_code(),
        "store_unavailable",
        "{}",
        refused.text
    );
    assert_eq!(refused.retry_after(), Some(1));
    let read = gateway.get(&format!("/v1/verifications/{}", ids[0])).await;
    assert_eq!(read.status, 503, "{}", read.text);
    let ready = gateway.admin_get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(ready.body["checks"]["store"]["ok"], false, "{}", ready.text);
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.restart();
    gateway.wait_ready().await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let served: HashSet<String> = carrier
            .received()
            .iter()
            .filter_map(|sms| sms.message_id.split('.').next().map(str::to_owned))
            .collect();
        if ids.iter().all(|id| served.contains(id)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} verifications got their SMS after Redis came back",
            ids.iter().filter(|id| served.contains(*id)).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = gateway.start_verification(&phone(6001)).await;
    assert_eq!(after.status, 202, "{}", after.text);
    gateway.stop().await.unwrap();
}

/// The same calls against a 3-master Redis Cluster: every script touches one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_serves_the_whole_journey() {
    if !require_redis() {
        return;
    }
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls().join(",");
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{}",
        carrier.config("alpha", 1000, 10)
    );
    let toml = format!("{}cluster = true\n", on_redis(&config, &urls));
    let gateway = Gateway::start_configured(&toml, gateway::clock::Clock::system()).await;
    gateway.wait_ready().await;
    let n = 40u32;
    let mut started = Vec::new();
    for i in 0..n {
        let answer = gateway.start_verification(&phone(7000 + i)).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        started.push((phone(7000 + i), answer.id()));
    }
    carrier.wait_for(n as usize, TIMEOUT).await;
    for (number, id) in &started {
        let code = carrier.code_for(number).expect("a code in the SMS");
        let wrong = if code.starts_with('0') { "1" } else { "0" };
        let bad = gateway.check(id, &format!("{wrong}{}", &code[1..])).await;
        assert_eq!(bad.body["valid"], false, "{}", bad.text);
        let good = gateway.check(id, &code).await;
        assert_eq!(good.body["valid"], true, "{}", good.text);
    }
    let numbers: Vec<String> = started.iter().map(|(number, _)| number.clone()).collect();
    let keys: Vec<String> = cluster.nodes().iter().flat_map(key_names).collect();
    // Every verification was approved: only the send limits are left of its phone's keys.
    assert_no_key_names_a_phone(&keys, &numbers, &[":pl:"]);
    gateway.stop().await.unwrap();
}

/// Every key name on `redis`.
fn key_names(redis: &RedisServer) -> Vec<String> {
    redis
        .command(&["KEYS", "*"])
        .lines()
        .filter(|line| *line != "(empty array)")
        .map(str::to_owned)
        .collect()
}

/// No key name spells one of `numbers` (their national digits, in any key), though keys for
/// phones are there: `kinds` such as `:l:` (live index), `:pl:` (send limits), `:f:` (wrong
/// codes).
fn assert_no_key_names_a_phone(keys: &[String], numbers: &[String], kinds: &[&str]) {
    for kind in kinds {
        assert!(
            keys.iter().any(|key| key.contains(kind)),
            "a {kind} key among {keys:?}"
        );
    }
    for number in numbers {
        let national = &number[3..];
        let named: Vec<&String> = keys.iter().filter(|key| key.contains(national)).collect();
        assert!(named.is_empty(), "keys naming {number}: {named:?}");
    }
}

/// Phones are named in Redis keys by a keyed hash, never by their digits: whoever can list the
/// keys learns no number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_redis_key_names_a_phone() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n[verification]\nmax_attempts = 5\n{}",
        carrier.config("alpha", 1000, 10)
    );
    let gateway = instance(&config, &redis.url()).await;
    let numbers = [phone(9101), phone(9102)];
    let mut ids = Vec::new();
    for number in &numbers {
        let started = gateway.start_verification(number).await;
        assert_eq!(started.status, 202, "{}", started.text);
        ids.push(started.id());
    }
    carrier.wait_for(numbers.len(), TIMEOUT).await;
    // A verification as an earlier version wrote it (its record naming the phone's digits, and
    // wrong codes under them) is still checked: the old count is no longer read. (Once its
    // SMS is recorded as submitted, so that nothing rewrites it before the check.)
    for id in &ids {
        gateway.wait_for_delivery(id, "submitted").await;
    }
    let record = key_names(&redis)
        .into_iter()
        .find(|key| key.ends_with(&format!(":v:{}", ids[0])))
        .expect("the record's key");
    let digits = &numbers[0][1..];
    let group = &record[..record.find(":v:").expect("a record key")];
    assert_eq!(redis.command(&["HSET", &record, "p", digits]), "0");
    let now_ms = gateway::clock::Clock::system().now_ms().to_string();
    let old_failed = format!("{group}:f:{digits}");
    redis.command(&["SET", &old_failed, &format!("1:{now_ms}")]);
    redis.command(&["EXPIRE", &old_failed, "600"]);
    for (number, id) in numbers.iter().zip(&ids) {
        // A wrong code: the failed checks of the phone and client are written.
        let code = carrier.code_for(number).expect("a code in the SMS");
        let wrong = if code == "000000" { "111111" } else { "000000" };
        let checked = gateway.check(id, wrong).await;
        assert_eq!(checked.body["valid"], false, "{}", checked.text);
    }
    let keys: Vec<String> = key_names(&redis)
        .into_iter()
        .filter(|key| *key != old_failed)
        .collect();
    assert_no_key_names_a_phone(&keys, &numbers, &[":l:", ":pl:", ":f:"]);
    gateway.stop().await.unwrap();
}

/// A webhook event is written to Redis with the change that raised it: when the instance that
/// was delivering it dies (`kill -9`) while the client's endpoint is failing, another instance
/// takes it over and delivers it, under the same event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instances_webhook_events_are_delivered_by_another() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let carrier = FakeCarrier::start().await;
    let receiver = tests::WebhookReceiver::start().await;
    receiver.answer(&[503]);
    let api_key = "test-key-redis-webhooks";
    let config = format!(
        "sweep_interval_ms = 50\n[webhooks]\nmax_attempts = 100\nretry_base_ms = 100\nretry_max_ms = 200\n\
         [[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nwebhook_url = \"{}\"\n\
         webhook_secret = \"0123456789abcdef0123\"\n\n{}",
        tests::sha256_hex(api_key),
        receiver.url(),
        carrier.config("alpha", 1000, 10)
    );
    let config = format!("{}claim_after_secs = 1\n", on_redis(&config, &redis.url()));
    let mut doomed = OtpgateProcess::start(&config).await;
    doomed.gateway.api_key = Some(api_key.to_owned());
    let started = doomed.gateway.start_verification(&phone(8000)).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let refused = receiver
        .wait_for(TIMEOUT, |post| {
            post.status == 503 && post.event_type.as_deref() == Some("verification.submitted")
        })
        .await;
    doomed.kill();
    receiver.answer(&[200]);

    let _survivor = OtpgateProcess::start(&config).await;
    let delivered = receiver
        .wait_for(TIMEOUT, |post| {
            post.status == 200 && post.event_type.as_deref() == Some("verification.submitted")
        })
        .await;
    assert_eq!(delivered.event_id, refused.event_id, "the same event");
    assert!(delivered.signed_with("0123456789abcdef0123", now_secs()));
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A gateway started before its Redis, and a Redis that loses its data, are recovered: the
/// streams' consumer groups are created when Redis can take them, and SMS flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_or_emptied_redis_is_recovered() {
    if !require_redis() {
        return;
    }
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.stop();
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{}",
        carrier.config("alpha", 1000, 10)
    );
    let gateway =
        Gateway::start_configured(&on_redis(&config, &url), gateway::clock::Clock::system()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = gateway.admin_get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text);

    redis.restart();
    gateway.wait_ready().await;
    let first = gateway.start_verification(&phone(9000)).await;
    assert_eq!(first.status, 202, "{}", first.text);
    carrier.wait_for(1, TIMEOUT).await;

    assert_eq!(redis.command(&["FLUSHALL"]), "OK");
    let second = gateway.start_verification(&phone(9001)).await;
    assert_eq!(second.status, 202, "{}", second.text);
    carrier.wait_for(2, TIMEOUT).await;
    gateway.stop().await.unwrap();
}

/// The calls to Lua scripts (`EVALSHA`, `EVAL`) Redis has answered so far.
fn script_calls(node: &RedisServer) -> u64 {
    node.command(&["INFO", "commandstats"])
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            let calls = line.split_once("calls=")?.1;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// `n` verifications started on `gateway` and accepted by `carrier`, by id.
async fn submitted(
    gateway: &Gateway,
    carrier: &FakeCarrier,
    first_phone: u32,
    n: u32,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let answer = gateway.start_verification(&phone(first_phone + i)).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        ids.push(answer.id());
    }
    carrier.wait_for(n as usize, TIMEOUT).await;
    for id in &ids {
        gateway.wait_for_delivery(id, "submitted").await;
    }
    ids
}

/// Long-polls `ids` on `gateway` (`?wait=` `wait_secs`), each in a task: what each answered,
/// and after how long.
fn long_polls(
    gateway: &Gateway,
    ids: &[String],
    wait_secs: u32,
) -> tokio::task::JoinSet<(String, u16, serde_json::Value, Duration)> {
    let client = reqwest::Client::new();
    let mut polls = tokio::task::JoinSet::new();
    for id in ids {
        let url = gateway.url(&format!("/v1/verifications/{id}?wait={wait_secs}"));
        let (client, id) = (client.clone(), id.clone());
        polls.spawn(async move {
            let started = std::time::Instant::now();
            let answer = client.get(url).send().await.expect("the gateway answers");
            let status = answer.status().as_u16();
            let body = answer.json().await.unwrap_or_default();
            (id, status, body, started.elapsed())
        });
    }
    polls
}

/// Long-polls cost Redis nothing while they wait: 200 of them held on one instance add no
/// script calls a second (they used to cost one `LOAD` every 250 ms each: 800 a second); and a
/// change made through another instance wakes its poll at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_cost_redis_nothing_and_wake_on_other_instances_changes() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 200\nmax_connections_per_ip = 0\n[limits]\nip_sends = []\n{}",
        carrier.config("alpha", 5000, 16)
    );
    let waiting = instance(&config, &redis.url()).await;
    let changing = instance(&config, &redis.url()).await;
    let ids = submitted(&waiting, &carrier, 3000, 200).await;

    // What the two instances cost with nobody waiting (sweeps, keep-alives), over 2 s.
    let before = script_calls(&redis);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = script_calls(&redis) - before;

    let mut polls = long_polls(&waiting, &ids, 8);
    // Every poll has made its reads and waits by then.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = script_calls(&redis);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = script_calls(&redis) - before;
    assert!(
        held <= idle + 20,
        "200 long-polls held for 2 s cost {held} script calls (idle: {idle})"
    );
    assert_eq!(polls.len(), 200, "every poll still waits");

    // Canceled through the other instance: the poll on this one answers within a second.
    let canceled = changing
        .delete(&format!("/v1/verifications/{}", ids[7]))
        .await;
    assert_eq!(canceled.status, 200, "{}", canceled.text);
    let woken = std::time::Instant::now();
    let (id, status, body, _) = polls.join_next().await.unwrap().unwrap();
    assert!(
        woken.elapsed() < Duration::from_secs(1),
        "woken after {:?}",
        woken.elapsed()
    );
    assert_eq!((id.as_str(), status), (ids[7].as_str(), 200));
    assert_eq!(body["status"], "canceled", "{body}");
    // The others wait out their 8 s, unchanged.
    while let Some(poll) = polls.join_next().await {
        let (_, status, body, waited) = poll.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["status"], "pending", "{body}");
        assert!(waited >= Duration::from_millis(7900), "{waited:?}");
    }
    waiting.stop().await.unwrap();
    changing.stop().await.unwrap();
}

/// On a Redis Cluster, changes written on every master (verifications of many groups) reach
/// the one subscription of another instance: each of its long-polls is woken at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_wake_on_changes_from_every_cluster_node() {
    if !require_redis() {
        return;
    }
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls().join(",");
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 200\n{}",
        carrier.config("alpha", 1000, 10)
    );
    let toml = format!("{}cluster = true\n", on_redis(&config, &urls));
    let start = async || {
        let gateway = Gateway::start_configured(&toml, gateway::clock::Clock::system()).await;
        gateway.wait_ready().await;
        gateway
    };
    let waiting = start().await;
    let changing = start().await;
    let ids = submitted(&waiting, &carrier, 8000, 48).await;
    let groups: HashSet<u8> = ids
        .iter()
        .map(|id| gateway::store::redis::group(&gateway::ids::VerificationId::parse(id).unwrap()))
        .collect();
    assert!(
        groups.len() >= 8,
        "verifications of many groups: {groups:?}"
    );

    let mut polls = long_polls(&waiting, &ids, 8);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let canceled_at = std::time::Instant::now();
    for id in &ids {
        let canceled = changing.delete(&format!("/v1/verifications/{id}")).await;
        assert_eq!(canceled.status, 200, "{}", canceled.text);
    }
    let canceling = canceled_at.elapsed();
    while let Some(poll) = polls.join_next().await {
        let (id, status, body, _) = poll.unwrap();
        assert_eq!(status, 200, "{id}");
        assert_eq!(body["status"], "canceled", "{body}");
    }
    let woken = canceled_at.elapsed();
    assert!(
        woken < canceling + Duration::from_secs(1),
        "the last poll answered {woken:?} after the first cancel ({canceling:?} to cancel all)"
    );
    waiting.stop().await.unwrap();
    changing.stop().await.unwrap();
}

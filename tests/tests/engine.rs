//! The engine at its own boundary: `Verifier` called directly, without HTTP and without sleeps,
//! on the back-end `OTPGATE_TEST_STORE` names (embedded by default; a redis-server, or a 3-master
//! Redis Cluster, of the test's own). The time rules move with `Clock::advance`.

use std::time::Duration;

use gateway::clock::Clock;
use gateway::config::{Config, StoreKind};
use gateway::metrics::{Metrics, Started};
use gateway::phone::Phone;
use gateway::queue::{Job, Queue};
use gateway::receipt::ReceiptStatus;
use gateway::store::redis::RedisStore;
use gateway::verification::{DeliveryState, Status, View};
use gateway::verifier::{Completion, NewVerification, Prepared, ReceiptMatch, Verifier};
use gateway::webhook::Webhooks;
use tests::redis::{RedisCluster, RedisServer, require_redis};
use tests::{on_redis, testing_cluster, testing_redis};

/// A verifier on the back-end of this run, with the servers it needs.
struct Engine {
    verifier: Verifier,
    clock: Clock,
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
}

const CONFIG: &str = "[[carriers]]\nname = \"alpha\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/sms\"\npace_per_sec = 100\nwindow = 10\nfrom = \"SaluteRL\"\n";

async fn engine() -> Engine {
    let (toml, redis, cluster) = if testing_cluster() && require_redis() {
        let cluster = RedisCluster::start(3);
        let toml = format!(
            "{}cluster = true\n",
            on_redis(CONFIG, &cluster.urls().join(","))
        );
        (toml, None, Some(cluster))
    } else if testing_redis() && require_redis() {
        let server = RedisServer::start();
        (on_redis(CONFIG, &server.url()), Some(server), None)
    } else {
        (CONFIG.to_owned(), None, None)
    };
    let config = Config::from_toml(&toml).expect("the test's config is valid");
    let clock = Clock::system();
    let lanes = Verifier::lanes(&config);
    let carriers: Vec<(String, bool)> = config
        .carriers
        .iter()
        .map(|carrier| (carrier.name.clone(), false))
        .collect();
    let metrics = Metrics::new(&lanes, &carriers, &[], &[]);
    let weights: Vec<_> = config.carriers.iter().map(|c| c.weight).collect();
    let queue = Queue::with_policy(
        config.queue_capacity,
        &weights,
        config.overload.map(|policy| (policy, clock.clone())),
    );
    let webhooks = Webhooks::new(
        &config.clients,
        config.webhooks.clone(),
        clock.clone(),
        metrics.clone(),
    )
    .expect("webhooks");
    let store = match &config.store {
        StoreKind::Embedded => None,
        StoreKind::Redis(redis) => Some(
            RedisStore::connect(redis, config.secret.as_deref().unwrap_or_default(), &lanes)
                .await
                .expect("redis answers"),
        ),
    };
    let verifier = Verifier::new(&config, clock.clone(), metrics, queue, webhooks, store);
    Engine {
        verifier,
        clock,
        _redis: redis,
        _cluster: cluster,
    }
}

fn request(phone: &str, idempotency: Option<(&str, u64)>) -> NewVerification {
    let (phone, region, number_type) = Phone::parse_typed(phone).expect("a valid number");
    NewVerification {
        phone,
        region,
        number_type,
        ip: Some("192.0.2.7".parse().expect("an IP")),
        locale: None,
        web_origin_host: None,
        app_hash: None,
        idempotency: idempotency.map(|(key, fingerprint)| (key.to_owned(), fingerprint)),
    }
}

impl Engine {
    async fn start(&self, phone: &str) -> View {
        let (started, view) = self
            .verifier
            .start(0, request(phone, None))
            .await
            .expect("started");
        assert_eq!(started, Started::Created);
        view
    }

    /// The carrier accepts the first SMS of `view` under `carrier_message_id`.
    async fn accept(&self, view: &View, carrier_message_id: &str) {
        let id = gateway::ids::VerificationId::parse(&view.id).expect("an id");
        let now = self.clock.now_ms();
        let job = Job::first(id, 0, now + 60_000, 1, now);
        let (prepared, snapshot) = self.verifier.prepare_keeping(&job, 0).await;
        assert!(matches!(prepared, Prepared::Send(_)), "{prepared:?}");
        let job = Job { snapshot, ..job };
        self.verifier
            .complete(
                &job,
                0,
                Completion::Accepted {
                    carrier_message_id: Some(carrier_message_id.to_owned()),
                },
            )
            .await;
    }

    async fn view(&self, view: &View) -> View {
        let id = gateway::ids::VerificationId::parse(&view.id).expect("an id");
        self.verifier.get(0, &id).await.expect("found").0
    }
}

/// Two SMS whose carrier ids share a reading: `"100"` and `"256"` (`0x100`). Each receipt
/// reaches the SMS whose own reading it carries, on either back-end, by the one rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_for_ids_that_share_a_reading_find_their_own_sms() {
    let engine = engine().await;
    let first = engine.start("+393331234567").await;
    let second = engine.start("+393339876543").await;
    engine.accept(&first, "100").await;
    engine.accept(&second, "256").await;

    // "0x100" can only be 256: the second SMS's own reading.
    let matched = engine
        .verifier
        .receipt(0, "0x100", ReceiptStatus::Delivered)
        .await
        .expect("applied");
    assert_eq!(matched, ReceiptMatch::Matched);
    assert_eq!(
        engine.view(&second).await.delivery.state,
        DeliveryState::Delivered
    );
    assert_eq!(
        engine.view(&first).await.delivery.state,
        DeliveryState::Submitted
    );

    // "0100" reads as 100 first: the first SMS.
    let matched = engine
        .verifier
        .receipt(0, "0100", ReceiptStatus::Delivered)
        .await
        .expect("applied");
    assert_eq!(matched, ReceiptMatch::Matched);
    assert_eq!(
        engine.view(&first).await.delivery.state,
        DeliveryState::Delivered
    );
}

/// An id read both ways (all digits, so also hex) is found by a receipt that spells the other
/// reading: `"1234"` accepted, `"4660"` (0x1234) in the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_finds_an_id_by_its_other_reading() {
    let engine = engine().await;
    let view = engine.start("+393331234567").await;
    engine.accept(&view, "1234").await;
    let matched = engine
        .verifier
        .receipt(0, "4660", ReceiptStatus::Undeliverable)
        .await
        .expect("applied");
    assert_eq!(matched, ReceiptMatch::Matched);
    assert_eq!(
        engine.view(&view).await.delivery.state,
        DeliveryState::Undeliverable
    );
}

/// A receipt that beats its submit answer is held, then applied when the answer names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_receipt_waits_for_its_submit_answer() {
    let engine = engine().await;
    let view = engine.start("+393331234567").await;
    let held = engine
        .verifier
        .receipt(0, "A1F3", ReceiptStatus::Delivered)
        .await
        .expect("held");
    assert_eq!(held, ReceiptMatch::Held);
    engine.accept(&view, "00a1f3").await;
    assert_eq!(
        engine.view(&view).await.delivery.state,
        DeliveryState::Delivered
    );
}

/// The same `Idempotency-Key` and request replays the verification; another request with the
/// key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_replays_and_refuses_another_request() {
    let engine = engine().await;
    let (started, view) = engine
        .verifier
        .start(0, request("+393331234567", Some(("k-1", 7))))
        .await
        .expect("started");
    assert_eq!(started, Started::Created);
    let (again, replayed) = engine
        .verifier
        .start(0, request("+393331234567", Some(("k-1", 7))))
        .await
        .expect("replayed");
    assert_eq!(again, Started::Replayed);
    assert_eq!(replayed.id, view.id);
    let refused = engine
        .verifier
        .start(0, request("+393339876543", Some(("k-1", 8))))
        .await
        .expect_err("another request with the key");
    assert!(
        matches!(refused, gateway::error::ApiError::IdempotencyMismatch),
        "{refused:?}"
    );
}

/// The code's clock starts at the carrier's acceptance, not at the start: time spent queued
/// moves the expiry, and once accepted the code lives `code_ttl` (10 minutes by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_in_the_queue_does_not_count_against_the_code() {
    let engine = engine().await;
    let view = engine.start("+393331234567").await;
    // Nine minutes in the queue: still pending, its expiry moved with the clock.
    engine.clock.advance(Duration::from_secs(9 * 60));
    assert_eq!(engine.view(&view).await.status, Status::Pending);
    engine.accept(&view, "m-1").await;
    // Nine more minutes after the acceptance: the code still works.
    engine.clock.advance(Duration::from_secs(9 * 60));
    assert_eq!(engine.view(&view).await.status, Status::Pending);
    // Past ten minutes after the acceptance: expired.
    engine.clock.advance(Duration::from_secs(61));
    assert_eq!(engine.view(&view).await.status, Status::Expired);
}

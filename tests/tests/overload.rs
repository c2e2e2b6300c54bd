//! The adaptive queue policy of docs/DESIGN.md section 4 (*Overload*), end to end: admission
//! by patience (`max_wait`), the queue switching to newest-first while its oldest job has waited
//! too long and back once it has not, and SMS held while nobody looks at their verification.
//!
//! One fake carrier with a window of 1: a slow first answer keeps the window busy while the
//! test queues SMS behind it, and `gateway.clock.advance` ages them. The sweeper (every 50 ms)
//! reads the queue's mode, so each step waits for `otpgate_queue_overloaded` to say where it is.

use std::time::Duration;

use tests::{FakeCarrier, Gateway, Reply, phone};

/// Upper bound on any wait for the gateway to reach a state; never a fixed delay.
const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway sweeping every 50 ms with one fake carrier at this pace and a window of 1, and
/// these `[queue]` keys.
async fn gateway_with(carrier: &FakeCarrier, pace_per_sec: u32, queue: &str) -> Gateway {
    let carrier = carrier
        .config("alpha", pace_per_sec, 1)
        .replace("timeout_ms = 2000", "timeout_ms = 10000");
    Gateway::start(&format!(
        "sweep_interval_ms = 50\n[queue]\n{queue}\n{carrier}"
    ))
    .await
}

/// Ages what is queued by `congested` (past the target), lets the sweeper notice, then by
/// `after` more, and waits until the queue says it is in overload.
async fn into_overload(gateway: &Gateway, congested: Duration, after: Duration) {
    gateway.clock.advance(congested);
    // The sweeper's reading starts the congested spell: wait for one, then let it last.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        gateway.registered_metric("otpgate_queue_overloaded").await,
        0.0,
        "not in overload before the spell has lasted overload_after_ms"
    );
    gateway.clock.advance(after);
    gateway
        .wait_for_metric("otpgate_queue_overloaded", |overloaded| overloaded == 1.0)
        .await;
}

/// The numbers the carrier was sent, in order.
fn sent_to(carrier: &FakeCarrier) -> Vec<String> {
    carrier.received().into_iter().map(|sms| sms.to).collect()
}

/// A start whose SMS would wait longer than `max_wait` is refused at once with `503`,
/// `come_back_later` and a `Retry-After`, counted as `max_wait`; what fits is accepted.
#[tokio::test]
async fn a_start_that_would_wait_past_max_wait_is_refused_at_once() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_secs(5)), Reply::Accept]);
    // 1 SMS a second and a patience of 2 s: about two SMS may wait.
    let gateway = gateway_with(&carrier, 1, "max_wait_ms = 2000").await;
    gateway.start_ok(&phone(3001)).await;
    carrier.wait_for_submits(1, PATIENCE).await;

    let mut statuses = Vec::new();
    for n in 0..6 {
        // On Redis, admission reads the shared backlog as of the last sweep (every 50 ms).
        tokio::time::sleep(Duration::from_millis(120)).await;
        let answer = gateway.start_verification(&phone(3002 + n)).await;
        statuses.push(answer.status);
        if answer.status == 503 {
            assert_eq!(answer.error_code(), "come_back_later", "{}", answer.text);
            let retry_after = answer.retry_after().unwrap_or_default();
            assert!(retry_after >= 1, "{:?}", answer.headers);
        }
    }
    let accepted = statuses.iter().filter(|status| **status == 202).count();
    assert!((1..=3).contains(&accepted), "{statuses:?}");
    let first_refusal = statuses.iter().position(|status| *status == 503);
    let first_refusal = first_refusal.unwrap_or_else(|| panic!("none refused: {statuses:?}"));
    assert!(
        statuses[first_refusal..]
            .iter()
            .all(|status| *status == 503),
        "{statuses:?}"
    );
    let refused = (statuses.len() - accepted) as f64;
    let series = |reason: &str| format!("otpgate_queue_rejected_total{{reason=\"{reason}\"}}");
    assert_eq!(
        gateway.registered_metric(&series("max_wait")).await,
        refused
    );
    assert_eq!(
        gateway.registered_metric(&series("predicted_wait")).await,
        0.0
    );
    assert_eq!(gateway.registered_metric(&series("full")).await, 0.0);
    gateway.stop().await.unwrap();
}

/// While the oldest SMS has waited longer than `overload_wait_ms` for `overload_after_ms`, the
/// queue serves the newest first; once it has drained, it is back to earliest deadline first.
#[tokio::test]
async fn under_overload_the_newest_sms_goes_first_and_order_returns_after() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_millis(1500)), Reply::Accept]);
    let gateway = gateway_with(
        &carrier,
        1000,
        "overload_wait_ms = 1000\noverload_after_ms = 1000\nunseen_after_ms = 0",
    )
    .await;
    let first = phone(3101);
    gateway.start_ok(&first).await;
    carrier.wait_for_submits(1, PATIENCE).await;
    // Four SMS queue behind the slow one, oldest first.
    let queued: Vec<String> = (3102..3106).map(phone).collect();
    for number in &queued {
        gateway.start_ok(number).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    into_overload(&gateway, Duration::from_secs(5), Duration::from_secs(2)).await;

    carrier.wait_for(5, PATIENCE).await;
    let mut newest_first: Vec<String> = queued.iter().rev().cloned().collect();
    newest_first.insert(0, first);
    assert_eq!(sent_to(&carrier), newest_first);
    // Three were taken ahead of the oldest; the last one taken was the oldest itself.
    let out_of_order = gateway
        .wait_for_metric("otpgate_queue_out_of_order_total", |n| n >= 3.0)
        .await;
    assert_eq!(out_of_order, 3.0);
    gateway
        .wait_for_metric("otpgate_queue_overloaded", |overloaded| overloaded == 0.0)
        .await;

    // Out of overload, the order is earliest deadline first again.
    carrier.script(&[Reply::Slow(Duration::from_millis(500)), Reply::Accept]);
    let blocker = phone(3110);
    gateway.start_ok(&blocker).await;
    carrier.wait_for_submits(6, PATIENCE).await;
    let later: Vec<String> = (3111..3114).map(phone).collect();
    for number in &later {
        gateway.start_ok(number).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    carrier.wait_for(9, PATIENCE).await;
    assert_eq!(sent_to(&carrier)[5..], [vec![blocker], later].concat());
    assert_eq!(
        gateway
            .registered_metric("otpgate_queue_out_of_order_total")
            .await,
        3.0
    );
    gateway.stop().await.unwrap();
}

/// Under overload, an SMS whose verification nobody has read for `unseen_after_ms` is held
/// (counted as dropped, `abandoned`), while one whose frontend reads it is sent; the held one
/// goes out as soon as its frontend reads it again, and its code works.
#[tokio::test]
async fn under_overload_an_sms_nobody_looks_at_is_held_until_someone_does() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_millis(1500)), Reply::Accept]);
    let gateway = gateway_with(
        &carrier,
        1000,
        "overload_wait_ms = 1000\noverload_after_ms = 1000\nunseen_after_ms = 3000",
    )
    .await;
    gateway.start_ok(&phone(3201)).await;
    carrier.wait_for_submits(1, PATIENCE).await;
    let (absent, present) = (phone(3202), phone(3203));
    let absent_id = gateway.start_ok(&absent).await;
    let present_id = gateway.start_ok(&present).await;
    into_overload(&gateway, Duration::from_secs(5), Duration::from_secs(2)).await;
    // The present citizen's frontend reads its verification; nobody reads the other.
    let view = gateway.read(&present_id).await;
    assert_eq!(view.body["delivery"]["state"], "queued", "{}", view.text);

    carrier.wait_for(2, PATIENCE).await;
    let abandoned = r#"otpgate_queue_dropped_total{reason="abandoned"}"#;
    gateway.wait_for_metric(abandoned, |n| n >= 1.0).await;
    assert_eq!(&sent_to(&carrier)[1..], std::slice::from_ref(&present));
    assert_eq!(
        gateway
            .registered_metric("otpgate_queue_resumed_total")
            .await,
        0.0
    );

    // The absent citizen comes back: the read queues the SMS again, and it goes out.
    let back = gateway.read(&absent_id).await;
    assert_eq!(back.body["status"], "pending", "{}", back.text);
    assert_eq!(back.body["delivery"]["state"], "queued", "{}", back.text);
    carrier.wait_for(3, PATIENCE).await;
    assert_eq!(sent_to(&carrier)[1..], [present, absent.clone()]);
    assert_eq!(
        gateway
            .registered_metric("otpgate_queue_resumed_total")
            .await,
        1.0
    );
    assert_eq!(gateway.registered_metric(abandoned).await, 1.0);
    let code = carrier
        .code_for(&absent)
        .expect("the held SMS carries the code");
    let checked = gateway.check(&absent_id, &code).await;
    assert_eq!(checked.status, 200, "{}", checked.text);
    assert_eq!(checked.body["valid"], true, "{}", checked.text);
    gateway.stop().await.unwrap();
}

/// The deadline policy keeps today's order whatever the queue's age, and holds nothing.
#[tokio::test]
async fn the_deadline_policy_never_reorders_or_holds() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_millis(1500)), Reply::Accept]);
    let gateway = gateway_with(&carrier, 1000, "policy = \"deadline\"").await;
    let first = phone(3301);
    gateway.start_ok(&first).await;
    carrier.wait_for_submits(1, PATIENCE).await;
    let queued: Vec<String> = (3302..3305).map(phone).collect();
    for number in &queued {
        gateway.start_ok(number).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gateway.clock.advance(Duration::from_secs(400));
    carrier.wait_for(4, PATIENCE).await;
    assert_eq!(sent_to(&carrier), [vec![first], queued].concat());
    assert_eq!(
        gateway.registered_metric("otpgate_queue_overloaded").await,
        0.0
    );
    let abandoned = r#"otpgate_queue_dropped_total{reason="abandoned"}"#;
    assert_eq!(gateway.registered_metric(abandoned).await, 0.0);
    gateway.stop().await.unwrap();
}

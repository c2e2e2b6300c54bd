//! Secrets stay secret: codes and API keys never appear in logs, metrics or responses, and
//! phone numbers appear only masked.

use std::time::Duration;

use tests::{FakeCarrier, Gateway, WebhookReceiver, capture_logs, sha256_hex};

/// A whole journey (start, wrong code, resend, right code) logged at trace level and scraped:
/// neither the code, nor the API key, nor the webhook secret, nor the full phone number shows up
/// anywhere but in the SMS the carrier received: not in logs, metrics, responses or webhook
/// events.
#[tokio::test]
async fn codes_keys_and_phones_never_leak() {
    let (logs, _guard) = capture_logs();
    let carrier = FakeCarrier::start().await;
    let receiver = WebhookReceiver::start().await;
    let api_key = "sk_live_secret_key_0123456789";
    let webhook_secret = "whsec_secret_0123456789abcdef";
    // Nine-digit codes: a chance match against other digits in the logs is negligible.
    let config = format!(
        "sweep_interval_ms = 50\n[verification]\ncode_length = 9\n[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nrate_per_sec = 100\nwebhook_url = \"{}\"\nwebhook_secret = \"{webhook_secret}\"\n{}",
        sha256_hex(api_key),
        receiver.url(),
        carrier.config("alpha", 1000, 10)
    );
    let gateway = Gateway::start(&config).await.with_api_key(api_key);
    let number = "+393471234567";

    let started = gateway.start_verification(number).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();
    carrier.wait_for(1, Duration::from_secs(5)).await;
    let code = carrier.code_for(number).expect("code in the SMS");
    assert_eq!(code.len(), 9);
    // Recorded as submitted before the resend below, or the resend finds it still queued.
    gateway.wait_for_delivery(&id, "submitted").await;

    let mut answers = vec![started.text.clone()];
    answers.push(gateway.check(&id, "000000000").await.text);
    gateway.clock.advance(Duration::from_secs(31));
    answers.push(
        gateway
            .post(
                &format!("/v1/verifications/{id}/resend"),
                serde_json::json!({}),
            )
            .await
            .text,
    );
    carrier.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(
        carrier.code_for(number).as_deref(),
        Some(code.as_str()),
        "a resend carries the same code"
    );
    answers.push(gateway.get(&format!("/v1/verifications/{id}")).await.text);
    answers.push(gateway.check(&id, &code).await.text);
    receiver.wait_for_event("verification.approved").await;
    let metrics = gateway.metrics().await;
    gateway.stop().await.unwrap();

    let logs = logs.text();
    assert!(
        logs.contains("otpgate listening"),
        "logs were not captured: {logs:?}"
    );
    let national = &number[3..];
    let events: Vec<String> = receiver
        .posts()
        .iter()
        .map(|post| String::from_utf8_lossy(&post.body).into_owned())
        .collect();
    assert!(
        events.len() >= 3,
        "submitted (twice) and approved: {events:?}"
    );
    for (place, text) in [("logs", logs.as_str()), ("metrics", metrics.as_str())]
        .into_iter()
        .chain(answers.iter().map(|answer| ("a response", answer.as_str())))
        .chain(
            events
                .iter()
                .map(|event| ("a webhook event", event.as_str())),
        )
    {
        assert!(!text.contains(&code), "the code appears in {place}: {text}");
        assert!(!text.contains(api_key), "the API key appears in {place}");
        assert!(
            !text.contains(webhook_secret),
            "the webhook secret appears in {place}"
        );
        assert!(
            !text.contains(national),
            "the full phone number appears in {place}: {text}"
        );
    }
    assert!(
        answers[0].contains("+39347****567"),
        "responses show the phone masked"
    );
}

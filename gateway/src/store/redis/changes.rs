//! Long-polls woken by changes other instances make: one pub/sub subscription per instance to
//! the changes channel (`P:changed`), on which every `COMMIT` that wakes long-polls publishes
//! the verification's id. A long-poll then costs Redis nothing while it waits, however many
//! there are: one `GET` when it starts and one each time its verification changes.
//!
//! A plain `PUBLISH` reaches the subscribers of every node of a Cluster, so one connection to
//! any node (the first of `urls` that answers) hears every group's changes. A subscription
//! that drops, or stops answering pings, is made again (on the next URL); since changes may
//! have been missed meanwhile, every waiting long-poll is then woken to read again.

use std::time::Duration;

use deadpool_redis::redis;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::ids::VerificationId;

/// How often the subscription is checked with a `PING`.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Pauses between attempts to subscribe again: doubling from the first, up to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What to wake: one verification's long-polls, or (`None`) all of them.
pub type Wake = std::sync::Arc<dyn Fn(Option<&VerificationId>) + Send + Sync>;

/// Listens on `channel` through one of `urls` until `stop` fires, calling `wake` with each
/// published id, and with `None` each time the subscription is made again. `timeout` bounds
/// connecting, subscribing and each ping.
pub async fn listen(
    urls: Vec<String>,
    channel: String,
    timeout: Duration,
    wake: Wake,
    stop: CancellationToken,
) {
    let mut attempt = 0usize;
    let mut pause = RETRY_FIRST;
    loop {
        let url = &urls[attempt % urls.len().max(1)];
        attempt += 1;
        match subscribe(url, &channel, timeout).await {
            Ok(pubsub) => {
                pause = RETRY_FIRST;
                // Whatever changed while nobody listened: every long-poll reads again.
                wake(None);
                if attempt > 1 {
                    tracing::info!("subscribed again to redis changes");
                }
                let dropped = tokio::select! {
                    () = serve(pubsub, timeout, &wake) => true,
                    () = stop.cancelled() => false,
                };
                if !dropped {
                    return;
                }
                tracing::warn!("the subscription to redis changes dropped; subscribing again");
                wake(None);
            }
            Err(error) => {
                tracing::debug!(%error, "subscribing to redis changes failed; trying again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

async fn subscribe(
    url: &str,
    channel: &str,
    timeout: Duration,
) -> Result<redis::aio::PubSub, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let timed_out = || redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
    let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out())??;
    tokio::time::timeout(timeout, pubsub.subscribe(channel))
        .await
        .map_err(|_| timed_out())??;
    Ok(pubsub)
}

/// Wakes the long-polls of each id published, until the subscription drops or a ping goes
/// unanswered.
async fn serve(pubsub: redis::aio::PubSub, timeout: Duration, wake: &Wake) {
    let (mut sink, mut messages) = pubsub.split();
    let mut pings = tokio::time::interval(PING_EVERY);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pings.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return };
                let payload: Result<String, _> = message.get_payload();
                if let Some(id) = payload.ok().and_then(|text| VerificationId::parse(&text)) {
                    wake(Some(&id));
                }
            }
            _ = pings.tick() => {
                let answer: Result<Result<redis::Value, _>, _> =
                    tokio::time::timeout(timeout, sink.ping()).await;
                if !matches!(answer, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

//! otpgate: a high-throughput SMS one-time-passcode gateway.
//!
//! Frontends start a verification over the HTTP API; the gateway answers at once, queues the
//! SMS, paces it to each carrier, and checks the code the user types. See docs/DESIGN.md for the
//! contract and ARCHITECTURE.md for the map of this crate.
//!
//! # Layout
//! - [`run`]: the testable entry point; `main.rs` only parses flags and binds.
//! - [`routes`] and [`admin`]: the API and admin listeners, over [`server`]'s accept loop.
//! - [`verifier`]: the engine behind every call, over [`store`], [`ratelimit`] and [`queue`].
//! - [`dispatch`] and [`carrier`]: from the queue to the carriers.
//! - [`verification`], [`otp`], [`phone`], [`sms`], [`receipt`]: the domain.
//! - [`config`], [`metrics`], [`clock`], [`error`], [`shutdown`]: the plumbing.

pub mod admin;
pub mod breaker;
pub mod budget;
pub mod carrier;
pub mod citizen_ip;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod error;
pub mod fraud_guard;
pub mod guess_caps;
pub mod http_client;
pub mod ids;
pub mod metrics;
pub mod otp;
pub mod pace;
pub mod phone;
pub mod queue;
pub mod ratelimit;
pub mod receipt;
pub mod routes;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod sms;
pub mod sms_wire;
pub mod store;
pub mod supervise;
pub mod sync;
pub mod verification;
pub mod verifier;
pub mod webhook;

use std::future::Future;
use std::num::NonZeroU32;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::carrier::Connector;
use crate::clock::Clock;
use crate::config::{CarrierConfig, CarrierKind, Config};
use crate::dispatch::Carrier;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::supervise::supervise;
use crate::verifier::Verifier;

/// The two bound listeners the gateway serves.
#[derive(Debug)]
pub struct Listeners {
    /// The frontend API.
    pub api: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: TcpListener,
}

/// Log targets never printed, whatever `RUST_LOG` says: rusmpp (the SMPP codec) logs every PDU
/// it encodes or decodes at debug level, binds' passwords and SMS texts (codes) included, and
/// rusmppc (its client) prints whole PDUs in some errors. The connector logs what matters itself.
pub const SILENCED_LOG_TARGETS: &[&str] = &["rusmpp", "rusmppc"];

/// Whether events of `target` may be logged (see [`SILENCED_LOG_TARGETS`]).
pub fn log_target_allowed(target: &str) -> bool {
    !SILENCED_LOG_TARGETS.iter().any(|silenced| {
        target
            .strip_prefix(silenced)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Runs the gateway until `shutdown` resolves, then shuts down gracefully: stop accepting, finish
/// in-flight requests, hand queued SMS to carriers, all within `config.shutdown_grace`.
///
/// # Errors
/// Fails only at start-up, when a carrier connector cannot be built.
pub async fn run(
    listeners: Listeners,
    mut config: Config,
    clock: Clock,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if config.carriers.is_empty() {
        tracing::warn!(
            "no carriers configured: using the built-in console carrier, which prints every SMS \
             (codes included) on standard output; a development aid, never for production"
        );
        config.carriers.push(CarrierConfig {
            name: "console".to_owned(),
            kind: CarrierKind::Console,
            pace_per_sec: NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
            window: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            from: "otpgate".to_owned(),
            receipt_token_sha256: None,
            receipt_timeout: None,
            breaker: breaker::BreakerPolicy {
                failures: 5,
                error_ratio: 0.5,
                open_for: std::time::Duration::from_secs(10),
                probes: 1,
            },
            prefixes: Vec::new(),
            exclude_prefixes: Vec::new(),
            weight: NonZeroU32::MIN,
            standby: false,
        });
    }
    if !config.is_unauthenticated() && config.limits.countries.allows_every_region() {
        tracing::warn!(
            "NO COUNTRY ALLOW-LIST: [limits] countries is empty, so SMS go to every region, \
             premium-rate and satellite ranges included (the SMS pumping risk); list the \
             regions your citizens' numbers belong to, e.g. countries = [\"IT\"]"
        );
    }
    if config.is_unauthenticated() {
        tracing::warn!(
            "NO API KEYS CONFIGURED: the API accepts unauthenticated calls. This is allowed only \
             because every listener is on loopback; configure [[clients]] before exposing it"
        );
    }

    // libphonenumber's metadata loads on the first number parsed (half a second in a debug
    // build): load it now, off the runtime's workers, rather than in the first request.
    tokio::task::spawn_blocking(phone::warm_up).await?;

    let carrier_names: Vec<(String, bool)> = config
        .carriers
        .iter()
        .map(|c| (c.name.clone(), matches!(c.kind, CarrierKind::Smpp(_))))
        .collect();
    let webhook_clients: Vec<String> = config
        .clients
        .iter()
        .filter(|client| client.webhook.is_some())
        .map(|client| client.name.clone())
        .collect();
    let client_names: Vec<String> = config
        .clients
        .iter()
        .map(|client| client.name.clone())
        .collect();
    let metrics = Metrics::new(
        &Verifier::lanes(&config),
        &carrier_names,
        &client_names,
        &webhook_clients,
    );
    metrics.register_countries(&config.limits.countries.metric_labels());
    metrics.set_policy(
        config.verification.code_ttl,
        config.verification.max_extension,
    );
    let weights: Vec<_> = config.carriers.iter().map(|c| c.weight).collect();
    let queue = Queue::with_policy(
        config.queue_capacity,
        &weights,
        config.overload.map(|policy| (policy, clock.clone())),
    );
    let webhooks = webhook::Webhooks::new(
        &config.clients,
        config.webhooks.clone(),
        clock.clone(),
        metrics.clone(),
    )
    .map_err(|error| anyhow::anyhow!("webhooks: cannot build their client: {error}"))?;
    let lanes = Verifier::lanes(&config);
    let redis = match &config.store {
        config::StoreKind::Embedded => None,
        config::StoreKind::Redis(redis_config) => Some(
            // The redis back-end's configuration requires a secret (`config/redis.rs`).
            store::redis::RedisStore::connect(
                redis_config,
                config.secret.as_deref().unwrap_or_default(),
                &lanes,
            )
            .await
            .map_err(|error| anyhow::anyhow!("redis: {error}"))?,
        ),
    };
    let verifier = Verifier::new(
        &config,
        clock,
        metrics.clone(),
        queue.clone(),
        webhooks.clone(),
        redis.clone(),
    );

    let mut carriers = Vec::with_capacity(config.carriers.len());
    let mut breakers = Vec::with_capacity(config.carriers.len());
    // SMPP sessions outlive the dispatchers, to take receipts until the end, then unbind.
    let mut smpp_links = Vec::new();
    for (index, carrier_config) in config.carriers.iter().enumerate() {
        let breaker = std::sync::Arc::new(breaker::Breaker::new(carrier_config.breaker));
        breakers.push((carrier_config.name.clone(), breaker.clone()));
        let receipts: carrier::ReceiptSink = {
            let verifier = verifier.clone();
            let carrier = index as u8;
            std::sync::Arc::new(move |id: String, status| {
                let verifier = verifier.clone();
                Box::pin(async move {
                    // An id no carrier could have sent is taken and dropped: refusing it would
                    // only have the SMSC send it again.
                    receipt::readings(&id).is_empty()
                        || verifier.receipt(carrier, &id, status).await.is_ok()
                })
            })
        };
        let connector =
            Connector::new(carrier_config, receipts, metrics.carrier(index)).map_err(|error| {
                anyhow::anyhow!(
                    "carrier {}: cannot build its client: {error}",
                    carrier_config.name
                )
            })?;
        if let Connector::Smpp(smpp) = &connector {
            smpp_links.push(smpp.clone());
        }
        carriers.push(Carrier {
            id: index as u8,
            config: carrier_config.clone(),
            connector,
            metrics: metrics.carrier(index),
            breaker,
        });
    }
    let mut dispatchers = dispatch::spawn(verifier.clone(), carriers);

    let background = CancellationToken::new();
    let feeding = CancellationToken::new();
    let draining = CancellationToken::new();
    let feeder = match (&redis, &config.store) {
        (Some(redis), config::StoreKind::Redis(redis_config)) => {
            // Enough jobs on hand for a quarter of a second at every carrier's pace, plus their
            // windows: the rest stays in Redis for the other instances.
            let prefetch = config
                .carriers
                .iter()
                .map(|c| c.window.get() as usize + c.pace_per_sec.get() as usize / 4)
                .sum::<usize>()
                .clamp(64, 20_000);
            // Every task of the gateway ends with `run`, even when `run` is dropped mid-way (a
            // test's stand-in for a crash), as they would with the process. Each background
            // task is supervised: started again should it ever end or panic before its stop.
            let feed = store::redis::Feed {
                store: redis.clone(),
                queue: queue.clone(),
                webhooks: webhooks.clone(),
                clock: verifier.clock().clone(),
                lanes: lanes.clone(),
                prefetch,
                claim_after: redis_config.claim_after,
                draining: draining.clone(),
            };
            let stop = feeding.clone();
            let feeder = AbortOnDropHandle::new(tokio::spawn(supervise(
                metrics::Task::Feed,
                metrics.clone(),
                feeding.clone(),
                move || store::redis::feed(feed.clone(), stop.clone()),
            )));
            // Long-polls here wake on changes other instances publish.
            let wake: store::redis::changes::Wake = {
                let verifier = verifier.clone();
                std::sync::Arc::new(move |id| match id {
                    Some(id) => verifier.backend().watchers().notify(id),
                    None => verifier.backend().watchers().notify_all(),
                })
            };
            let (urls, channel, timeout) = (
                redis_config.urls.clone(),
                redis.changes_channel(),
                redis_config.timeout,
            );
            let stop = background.clone();
            let listener = AbortOnDropHandle::new(tokio::spawn(supervise(
                metrics::Task::Changes,
                metrics.clone(),
                background.clone(),
                move || {
                    store::redis::changes::listen(
                        urls.clone(),
                        channel.clone(),
                        timeout,
                        wake.clone(),
                        stop.clone(),
                    )
                },
            )));
            Some((feeder, listener))
        }
        _ => None,
    };
    let webhooks_stop = CancellationToken::new();
    let webhook_sender = AbortOnDropHandle::new(tokio::spawn(supervise(
        metrics::Task::Webhooks,
        metrics.clone(),
        webhooks_stop.clone(),
        {
            let (webhooks, stop) = (webhooks.clone(), webhooks_stop.clone());
            move || webhooks.clone().run(stop.clone())
        },
    )));
    let sweeper = AbortOnDropHandle::new(tokio::spawn(supervise(
        metrics::Task::Sweeper,
        metrics.clone(),
        background.clone(),
        {
            let (verifier, interval, stop) =
                (verifier.clone(), config.sweep_interval, background.clone());
            move || sweep(verifier.clone(), interval, stop.clone())
        },
    )));

    let api_shutdown = CancellationToken::new();
    let api_addr = listeners.api.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let api = AbortOnDropHandle::new(tokio::spawn(server::serve(
        listeners.api,
        routes::router(routes::ApiState {
            verifier: verifier.clone(),
            max_body_bytes: config.max_body_bytes,
            shutdown: api_shutdown.clone(),
        }),
        config.connections,
        metrics.listener(metrics::Listener::Api),
        api_shutdown.clone(),
        config.shutdown_grace,
    )));
    let admin = AbortOnDropHandle::new(tokio::spawn(server::serve(
        listeners.admin,
        admin::router(admin::AdminState {
            verifier: verifier.clone(),
            carriers: breakers,
        }),
        config.connections.for_admin(),
        metrics.listener(metrics::Listener::Admin),
        background.clone(),
        std::time::Duration::from_secs(1),
    )));
    tracing::info!(api = %api_addr, admin = %admin_addr, carriers = config.carriers.len(), "otpgate listening");

    shutdown.await;
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    tracing::info!(
        grace_secs = config.shutdown_grace.as_secs(),
        "shutting down: no new verifications"
    );
    verifier.stop_accepting();
    api_shutdown.cancel();
    match api.await {
        Ok(true) => tracing::info!("in-flight requests finished"),
        Ok(false) => tracing::warn!("some connections were still open when the grace period ended"),
        Err(error) => tracing::error!(%error, "api listener task failed"),
    }

    // On Redis the queue is shared: keep taking jobs from it until it is empty (every instance's
    // jobs: this one helps drain them) or three quarters of the grace period are gone, leaving
    // the last quarter for what this instance holds. What is
    // still there then is for the other instances, or this one's next start. The feeder keeps
    // what this instance holds claimed, and acknowledges delivered events, until the end.
    if let Some(redis) = &redis {
        let until = deadline
            .checked_sub(config.shutdown_grace / 4)
            .unwrap_or(deadline);
        while tokio::time::Instant::now() < until {
            let mut backlog = 0;
            for &lane in &lanes {
                backlog += redis.backlog(lane).await.unwrap_or(1);
            }
            if backlog == 0 && queue.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    draining.cancel();
    let queued = queue.len();
    queue.close();
    tracing::info!(queued, "handing queued SMS to carriers");
    let drained = tokio::time::timeout_at(deadline, async {
        while dispatchers.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("every queued SMS was handed to a carrier"),
        Err(_) => {
            let n_left = queue.clear();
            dispatchers.abort_all();
            tracing::warn!(n_left, "grace period over: SMS still queued were not sent");
        }
    }

    // SMPP sessions unbind: receipts that arrive until the SMSC answers are still applied, and
    // their events go out below.
    let _ = tokio::time::timeout_at(
        deadline,
        futures_util::future::join_all(smpp_links.iter().map(carrier::SmppConnector::close)),
    )
    .await;

    // Events raised by the last SMS get the rest of the grace period to go out.
    let flushed = tokio::time::timeout_at(deadline, async {
        while !webhooks.is_idle() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    if flushed.is_ok() {
        tracing::info!("every webhook event was delivered or given up");
    }
    webhooks_stop.cancel();
    let _ = webhook_sender.await;
    let listener = match feeder {
        Some((feeder, listener)) => {
            // One more pass acknowledges the events delivered last.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            feeding.cancel();
            let _ = feeder.await;
            Some(listener)
        }
        None => None,
    };

    background.cancel();
    let _ = sweeper.await;
    if let Some(listener) = listener {
        let _ = listener.await;
    }
    let _ = admin.await;
    tracing::info!("otpgate stopped");
    Ok(())
}

/// The sweeper: expiry, retention, limiter housekeeping and gauges, on a timer, until cancelled;
/// a sweep that panics does not stop the ones after it.
async fn sweep(verifier: Verifier, interval: std::time::Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                // Each sweep in a task of its own: should one ever panic (a bug), it is logged
                // and the next runs on time, since expiry and receipt timeouts must not stop.
                let verifier = verifier.clone();
                if let Err(error) = tokio::spawn(async move { verifier.sweep().await }).await {
                    if error.is_panic() {
                        tracing::error!("a sweep panicked; the next one runs on time");
                    }
                }
            }
            _ = cancel.cancelled() => return,
        }
    }
}

//! A virtual user's journey: start a verification, wait for the SMS on the handset, type the
//! code after a human delay, check it. Some mistype, some press resend, some give up, some
//! never come back; a session that expires before the code could be used is counted. While the
//! user waits, its frontend may read the verification now and then (`users.poll_secs`): the
//! gateway's sign that the user is still there. A user who gives up just stops, like a closed
//! browser tab: nothing tells the gateway.
//!
//! Each user is one small task, alive from its scheduled arrival to the end of its journey.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use serde_json::json;

use crate::carriers::Network;
use crate::carriers::standard_normal;
use crate::rehearsal::api::Api;
use crate::rehearsal::measure::{Count, Measurements, Series};
use crate::rehearsal::scenario::{Scenario, Users};

/// What every user shares.
#[derive(Debug)]
pub struct World {
    pub scenario: Arc<Scenario>,
    pub api: Api,
    pub measurements: Arc<Measurements>,
    pub network: Arc<Network>,
    /// API keys by client, in scenario order (`None`: unauthenticated gateway).
    pub api_keys: Vec<Option<String>>,
}

/// How a journey ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Verified,
    /// The start was refused (status) or failed (no answer).
    Rejected,
    GaveUp,
    NeverTyped,
    ExpiredSession,
    /// The code reached the user in time, but was typed after it expired.
    ExpiredWhileTyping,
    /// The verification failed (too many wrong codes, undeliverable).
    Failed,
}

/// Plays user `user`, who arrives at `intended` as a user of client `client`; after a failed
/// sign-up the user may come back and start again (the scenario's `users.retry`), within the
/// scenario's arrivals and at most `users.retries` times. Returns how the last attempt ended.
pub async fn journey(world: Arc<World>, user: u64, client: usize, intended: Instant) -> Outcome {
    let measurements = &world.measurements;
    let behaviour = &world.scenario.users;
    let arrivals_end = measurements.started() + world.scenario.duration;
    measurements.record(Series::SchedulerLag, intended.elapsed());
    measurements.count(Count::Arrived);
    let mut intended = intended;
    let mut attempt = 0;
    loop {
        measurements.user_entered();
        let outcome = run(&world, user, client, intended).await;
        measurements.user_left();
        match outcome {
            Outcome::Verified => measurements.count(Count::Verified),
            Outcome::GaveUp => measurements.count(Count::GaveUp),
            Outcome::NeverTyped => measurements.count(Count::NeverTyped),
            Outcome::ExpiredSession => measurements.count(Count::ExpiredSessions),
            Outcome::ExpiredWhileTyping => measurements.count(Count::ExpiredWhileTyping),
            Outcome::Rejected | Outcome::Failed => {}
        }
        let Some(again) = comes_back(behaviour, outcome, attempt, &mut rand::rng()) else {
            return outcome;
        };
        let again = Instant::now() + again;
        if again >= arrivals_end {
            return outcome;
        }
        tokio::time::sleep_until(again.into()).await;
        measurements.count(Count::Retries);
        intended = again;
        attempt += 1;
    }
}

/// Whether a user whose attempt number `attempt` (from 0) ended so comes back to start again,
/// and after how long.
fn comes_back(
    behaviour: &Users,
    outcome: Outcome,
    attempt: u32,
    rng: &mut impl Rng,
) -> Option<Duration> {
    let failed = !matches!(outcome, Outcome::Verified | Outcome::NeverTyped);
    (failed && attempt < behaviour.retries && rng.random::<f64>() < behaviour.retry)
        .then(|| behaviour.retry_after.sample(rng))
}

async fn run(world: &World, user: u64, client: usize, intended: Instant) -> Outcome {
    let scenario = &world.scenario;
    let behaviour = &scenario.users;
    let measurements = &world.measurements;
    let key = world.api_keys.get(client).and_then(Option::as_deref);
    let phone = scenario.phone(user);
    // The handset is on before the request goes out, so no SMS can beat it.
    let mut inbox = world.network.handsets.register(user);

    let body = json!({ "phone": phone, "client_ip": citizen_ip(user).to_string() });
    let answer = world.api.post("/v1/verifications", key, &body).await;
    measurements.latency_since(Series::Start, intended);
    let accepted = answer.as_ref().is_some_and(|answer| answer.status == 202);
    measurements.answered("start", answer.as_ref().map(|a| a.status), accepted);
    if let Some(refused) = answer.as_ref().filter(|answer| answer.status == 503) {
        measurements.count(Count::RefusedAtStart);
        match refused.body["error"]["code"].as_str() {
            Some("come_back_later") => measurements.count(Count::RefusedComeBackLater),
            Some("overloaded") => measurements.count(Count::RefusedOverloaded),
            _ => {}
        }
    }
    let Some(answer) = answer.filter(|_| accepted) else {
        return Outcome::Rejected;
    };
    measurements.count(Count::Started);
    let Some(id) = answer.body["id"].as_str().map(str::to_owned) else {
        return Outcome::Rejected;
    };

    // Wait for the SMS; press resend once if it is slow, and give up past patience. Meanwhile
    // the frontend reads the verification every so often, if it does.
    let give_up_at = intended + behaviour.give_up_after;
    let mut resend_at = Some(intended + behaviour.resend_after);
    let next_poll = || {
        behaviour
            .poll_every
            .map(|every| Instant::now() + every.mul_f64(rand::rng().random_range(0.8..=1.2)))
    };
    let mut poll_at = next_poll();
    let sms = loop {
        let wake = [resend_at, poll_at]
            .into_iter()
            .flatten()
            .fold(give_up_at, Instant::min);
        match tokio::time::timeout_at(wake.into(), inbox.recv()).await {
            Ok(Some(sms)) => break sms,
            Ok(None) => return Outcome::GaveUp,
            Err(_) if resend_at.is_some_and(|at| Instant::now() >= at) => {
                // Measured from the moment the user meant to press it, not when the timer ran.
                let pressed = resend_at.take().unwrap_or_else(Instant::now);
                if rand::rng().random::<f64>() < behaviour.resend {
                    measurements.count(Count::Resends);
                    world.network.resend_pressed(user);
                    let answer = world
                        .api
                        .post(&format!("/v1/verifications/{id}/resend"), key, &json!({}))
                        .await;
                    measurements.latency_since(Series::Resend, pressed);
                    // A cooldown answer (429) is an expected outcome for an impatient user.
                    let status = answer.as_ref().map(|answer| answer.status);
                    measurements.answered(
                        "resend",
                        status,
                        matches!(status, Some(202 | 429 | 409)),
                    );
                }
            }
            Err(_)
                if poll_at.is_some_and(|at| Instant::now() >= at)
                    && Instant::now() < give_up_at =>
            {
                let due = poll_at.unwrap_or_else(Instant::now);
                poll(world, &id, key, due).await;
                poll_at = next_poll();
            }
            Err(_) => {
                // One look at the verification tells a lost SMS and an expired session apart.
                let view = world
                    .api
                    .get(&format!("/v1/verifications/{id}"), key)
                    .await
                    .map(|answer| answer.body);
                let Some(view) = view else {
                    return Outcome::GaveUp;
                };
                note_missing_sms(world, user, &view);
                return if view["status"] == "expired" {
                    Outcome::ExpiredSession
                } else {
                    Outcome::GaveUp
                };
            }
        }
    };
    // Counted from when the SMS reached the handset, even if the user was busy (a poll, a
    // resend) when it came.
    let on_handset = sms.arrived.elapsed();
    measurements.record(
        Series::TimeToSms,
        sms.arrived.saturating_duration_since(intended),
    );
    let sms_at = SystemTime::now() - on_handset;

    let (delay, mistype, never) = {
        let mut rng = rand::rng();
        (
            behaviour.type_delay.sample_with(standard_normal(&mut rng)),
            rng.random::<f64>() < behaviour.mistype,
            rng.random::<f64>() < behaviour.never_type,
        )
    };
    if never {
        return Outcome::NeverTyped;
    }
    // The user decides to type at `typed`: latency counts from then, however late the timer.
    let typed = sms.arrived + delay;
    tokio::time::sleep_until(typed.into()).await;
    let Some(code) = code_in(&sms) else {
        return Outcome::Failed;
    };
    if mistype {
        let wrong = mistyped(&code);
        match check(world, &id, key, &wrong, sms_at, typed).await {
            Checked::Invalid => measurements.count(Count::WrongCodes),
            Checked::Valid => return Outcome::Verified,
            Checked::Ended(outcome) => return outcome,
        }
    }
    // After a typo the user types again at once; otherwise this is the first attempt.
    let retyped = if mistype { Instant::now() } else { typed };
    match check(world, &id, key, &code, sms_at, retyped).await {
        Checked::Valid => {
            measurements.latency_since(Series::TimeToVerified, intended);
            Outcome::Verified
        }
        Checked::Invalid => {
            measurements.count(Count::WrongCodes);
            Outcome::Failed
        }
        Checked::Ended(outcome) => outcome,
    }
}

/// The frontend reads the verification, as it meant to at `due`: the gateway sees that its user
/// is still there.
async fn poll(world: &World, id: &str, key: Option<&str>, due: Instant) {
    let measurements = &world.measurements;
    measurements.count(Count::Polls);
    let answer = world.api.get(&format!("/v1/verifications/{id}"), key).await;
    measurements.latency_since(Series::Read, due);
    let status = answer.as_ref().map(|answer| answer.status);
    measurements.answered("read", status, status == Some(200));
}

enum Checked {
    Valid,
    Invalid,
    Ended(Outcome),
}

/// Checks `code`; an expired verification is told apart by whether the code reached the user
/// (at `sms_at`) before it expired.
async fn check(
    world: &World,
    id: &str,
    key: Option<&str>,
    code: &str,
    sms_at: SystemTime,
    typed: Instant,
) -> Checked {
    let answer = world
        .api
        .post(
            &format!("/v1/verifications/{id}/check"),
            key,
            &json!({ "code": code }),
        )
        .await;
    world.measurements.latency_since(Series::Check, typed);
    let status = answer.as_ref().map(|answer| answer.status);
    world
        .measurements
        .answered("check", status, matches!(status, Some(200 | 409)));
    match answer {
        Some(answer) if answer.status == 200 => {
            if answer.body["valid"] == true {
                Checked::Valid
            } else {
                Checked::Invalid
            }
        }
        Some(answer) if answer.status == 409 => match expired_at(world, id, key).await {
            Some(Some(expired)) if sms_at < expired => Checked::Ended(Outcome::ExpiredWhileTyping),
            Some(_) => Checked::Ended(Outcome::ExpiredSession),
            None => Checked::Ended(Outcome::Failed),
        },
        _ => Checked::Ended(Outcome::Failed),
    }
}

/// `Some` if the gateway says the verification expired, with when (if it says).
async fn expired_at(world: &World, id: &str, key: Option<&str>) -> Option<Option<SystemTime>> {
    let answer = world
        .api
        .get(&format!("/v1/verifications/{id}"), key)
        .await?;
    (answer.body["status"] == "expired").then(|| {
        answer.body["expires_at"]
            .as_str()
            .and_then(|at| humantime::parse_rfc3339(at).ok())
    })
}

/// A user who never got an SMS: if the gateway's `view` of the verification says it was sent
/// but no carrier ever received it, the SMS was lost.
fn note_missing_sms(world: &World, user: u64, view: &serde_json::Value) {
    if world.network.accepted_for(user) > 0 {
        return;
    }
    let state = &view["delivery"]["state"];
    if state == "submitted" || state == "delivered" {
        world.measurements.count(Count::LostSms);
    }
}

/// The citizen's own address, passed as `client_ip` as a portal would: one per user, so the
/// gateway's per-IP limit sees citizens, not the load generator.
fn citizen_ip(user: u64) -> Ipv4Addr {
    let n = (user % (1 << 24)) as u32;
    Ipv4Addr::from(0x0A00_0000 | n)
}

/// The first run of 4 to 9 digits in an SMS text.
fn code_in(text: &str) -> Option<String> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|run| (4..=9).contains(&run.len()))
        .map(str::to_owned)
}

/// The code with its last digit changed.
fn mistyped(code: &str) -> String {
    let mut digits: Vec<char> = code.chars().collect();
    if let Some(last) = digits.last_mut() {
        *last = if *last == '9' {
            '0'
        } else {
            ((*last as u8) + 1) as char
        };
    }
    digits.into_iter().collect()
}

/// How long a journey may last at most: patience, typing, and a margin for the checks.
pub fn longest_journey(scenario: &Scenario) -> Duration {
    scenario.users.give_up_after
        + scenario.users.type_delay.sample_with(4.0)
        + Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_users_come_back_as_the_scenario_says() {
        let scenario = crate::rehearsal::scenario::Scenario::parse(
            &include_str!("../../../scenarios/smoke.toml").replace(
                "[users]",
                "[users]\nretry = 0.25\nretries = 1\nretry_after_secs = { min = 60, max = 120 }",
            ),
        )
        .unwrap();
        let behaviour = &scenario.users;
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let mut back = 0;
        for _ in 0..4000 {
            if let Some(after) = comes_back(behaviour, Outcome::ExpiredSession, 0, &mut rng) {
                back += 1;
                let secs = after.as_secs_f64() * scenario.time_compression;
                assert!((59.9..=120.1).contains(&secs), "{secs}");
            }
        }
        assert!((900..1100).contains(&back), "{back} of 4000 came back");
        for outcome in [Outcome::Verified, Outcome::NeverTyped] {
            assert_eq!(comes_back(behaviour, outcome, 0, &mut rng), None);
        }
        // Past `retries`, nobody comes back.
        assert!((0..100).all(|_| comes_back(behaviour, Outcome::GaveUp, 1, &mut rng).is_none()));
    }

    #[test]
    fn codes_and_typos() {
        assert_eq!(
            code_in("Your code is 123456. It expires in 10 min").as_deref(),
            Some("123456")
        );
        assert_eq!(mistyped("123459"), "123450");
        assert_ne!(mistyped("000000"), "000000");
        assert_eq!(citizen_ip(1), Ipv4Addr::new(10, 0, 0, 1));
    }
}

#[cfg(test)]
mod size {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A user waiting for its SMS holds its whole future: it must stay small for 100,000 of them
    /// to fit in 10 KB each (the future is 1.7 KB in a debug build).
    #[test]
    fn a_journey_is_a_small_future() {
        let scenario = Arc::new(
            crate::rehearsal::scenario::Scenario::parse(include_str!(
                "../../../scenarios/smoke.toml"
            ))
            .unwrap(),
        );
        let measurements = Arc::new(crate::rehearsal::measure::Measurements::new(Instant::now()));
        let network = Arc::new(crate::carriers::Network::new(
            scenario.phones.clone(),
            scenario.handsets.clone(),
            measurements.clone(),
            1,
        ));
        let world = Arc::new(super::World {
            scenario,
            api: crate::rehearsal::api::Api::new(
                "http://127.0.0.1:1",
                crate::rehearsal::connect::Connector::default(),
                1,
                Duration::from_secs(1),
            ),
            measurements,
            network,
            api_keys: vec![None],
        });
        let future = super::journey(world, 0, 0, Instant::now());
        let size = std::mem::size_of_val(&future);
        assert!(size <= 4096, "a journey's future is {size} bytes");
    }
}

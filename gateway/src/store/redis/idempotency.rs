//! `Idempotency-Key`s: claimed while their request runs, then settled with the verification it
//! created.

use std::time::Duration;

use deadpool_redis::redis;

use super::error::StoreError;
use super::pool::RedisStore;
use crate::ids::{ClientId, VerificationId};

/// How long a claimed `Idempotency-Key` waits for its request to settle it.
const IDEMPOTENCY_CLAIM: Duration = Duration::from_secs(30);

/// Who holds an `Idempotency-Key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotencyHolder {
    /// A request still creating its verification.
    Pending { fingerprint: u64 },
    Done {
        fingerprint: u64,
        id: VerificationId,
    },
}

impl RedisStore {
    /// Claims an `Idempotency-Key` for a request (`None`), or returns what holds it already.
    pub async fn claim_idempotency(
        &self,
        client: ClientId,
        key: &str,
        fingerprint: u64,
        ttl: Duration,
    ) -> Result<Option<IdempotencyHolder>, StoreError> {
        let redis_key = self.keys().idempotency(client, key);
        let claimed: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(format!("{fingerprint}:pending"))
                    .arg("NX")
                    .arg("PX")
                    // Only while the request runs: one that dies mid-way must not hold the key
                    // for its whole lifetime. The settled key gets the full `ttl`.
                    .arg(ttl.min(IDEMPOTENCY_CLAIM).as_millis().max(1) as u64),
            )
            .await?;
        if claimed.is_some() {
            return Ok(None);
        }
        let held: Option<String> = self.run(redis::cmd("GET").arg(&redis_key)).await?;
        let Some(held) = held else {
            // Expired between the two calls: claim again next time round.
            return Ok(Some(IdempotencyHolder::Pending { fingerprint }));
        };
        let (held_fingerprint, what) = held
            .split_once(':')
            .ok_or_else(|| StoreError::Protocol("idempotency entry".to_owned()))?;
        let held_fingerprint: u64 = held_fingerprint
            .parse()
            .map_err(|_| StoreError::Protocol("idempotency fingerprint".to_owned()))?;
        Ok(Some(match VerificationId::parse(what) {
            Some(id) => IdempotencyHolder::Done {
                fingerprint: held_fingerprint,
                id,
            },
            None => IdempotencyHolder::Pending {
                fingerprint: held_fingerprint,
            },
        }))
    }

    /// Records the verification an `Idempotency-Key` stands for.
    pub async fn settle_idempotency(
        &self,
        client: ClientId,
        key: &str,
        fingerprint: u64,
        id: VerificationId,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.set_for(
            self.keys().idempotency(client, key),
            format!("{fingerprint}:{id}"),
            ttl,
        )
        .await?;
        Ok(())
    }

    /// Lets go of a claimed key whose request failed, so a retry may use it.
    pub async fn release_idempotency(&self, client: ClientId, key: &str) -> Result<(), StoreError> {
        let _: () = self
            .run(redis::cmd("DEL").arg(self.keys().idempotency(client, key)))
            .await?;
        Ok(())
    }
}

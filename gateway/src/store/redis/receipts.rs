//! Delivery receipts on Redis: the index from carrier message ids to verifications, and the
//! receipts held because they came before their submit answer.

use std::time::Duration;

use deadpool_redis::redis;

use super::error::StoreError;
use super::pool::RedisStore;
use crate::clock::Millis;
use crate::ids::{CarrierId, VerificationId};

impl RedisStore {
    /// Indexes a carrier's message id under each of its readings, by the one rule.
    pub async fn index_receipt(
        &self,
        carrier: CarrierId,
        carrier_message_id: &str,
        id: VerificationId,
        keep: Duration,
    ) -> Result<(), StoreError> {
        // The one matching rule (`receipt::index_readings`): the id's own reading replaces
        // whatever held its key; its other readings only fill keys nobody holds.
        let keep_ms = keep.as_millis().max(1) as u64;
        for (reading, own) in crate::receipt::index_readings(carrier_message_id) {
            let mut set = redis::cmd("SET");
            set.arg(self.keys().receipt(carrier, &reading))
                .arg(id.to_string())
                .arg("PX")
                .arg(keep_ms);
            if !own {
                set.arg("NX");
            }
            let _: Option<String> = self.run(&set).await?;
        }
        Ok(())
    }

    /// The verification a carrier message id was indexed for.
    pub async fn find_receipt(
        &self,
        carrier: CarrierId,
        carrier_message_id: &str,
    ) -> Result<Option<VerificationId>, StoreError> {
        for reading in crate::receipt::readings(carrier_message_id) {
            let found: Option<String> = self
                .run(redis::cmd("GET").arg(self.keys().receipt(carrier, &reading)))
                .await?;
            if let Some(id) = found.as_deref().and_then(VerificationId::parse) {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Holds a receipt that matched nothing yet, for `keep`; until `now + keep` it is due in
    /// the held set, where [`RedisStore::expired_receipts`] finds it if it is never taken.
    pub async fn hold_receipt(
        &self,
        carrier: CarrierId,
        carrier_message_id: &str,
        status: u8,
        keep: Duration,
        now: Millis,
    ) -> Result<(), StoreError> {
        let _: () = self
            .run(
                redis::cmd("ZADD")
                    .arg(self.keys().held_receipts())
                    .arg(now + keep.as_millis() as Millis)
                    .arg(format!("{carrier}:{carrier_message_id}")),
            )
            .await?;
        for reading in crate::receipt::readings(carrier_message_id) {
            self.set_for(
                self.keys().held_receipt(carrier, &reading),
                format!("{status}:{carrier_message_id}"),
                keep,
            )
            .await?;
        }
        Ok(())
    }

    /// Takes a held receipt for this message id, if one came early: `(status, its id)`.
    pub async fn take_held_receipt(
        &self,
        carrier: CarrierId,
        carrier_message_id: &str,
    ) -> Result<Option<(u8, String)>, StoreError> {
        for reading in crate::receipt::readings(carrier_message_id) {
            let held: Option<String> = self
                .run(redis::cmd("GETDEL").arg(self.keys().held_receipt(carrier, &reading)))
                .await?;
            if let Some((status, id)) = held.as_deref().and_then(|held| held.split_once(':')) {
                if let Ok(status) = status.parse() {
                    let _: () = self
                        .run(
                            redis::cmd("ZREM")
                                .arg(self.keys().held_receipts())
                                .arg(format!("{carrier}:{id}")),
                        )
                        .await?;
                    return Ok(Some((status, id.to_owned())));
                }
            }
        }
        Ok(None)
    }

    /// Held receipts whose time ran out untaken, each counted by exactly one instance: the
    /// carriers they came from.
    pub async fn expired_receipts(&self, now: Millis) -> Result<Vec<CarrierId>, StoreError> {
        let due: Vec<String> = self
            .due_members(self.keys().held_receipts(), now, 1000)
            .await?;
        let mut carriers = Vec::new();
        for member in due {
            let removed: u64 = self
                .run(
                    redis::cmd("ZREM")
                        .arg(self.keys().held_receipts())
                        .arg(&member),
                )
                .await?;
            if removed == 1 {
                if let Some(carrier) = member
                    .split_once(':')
                    .and_then(|(carrier, _)| carrier.parse().ok())
                {
                    carriers.push(carrier);
                }
            }
        }
        Ok(carriers)
    }
}

//! Deadlines: when each verification next needs the sweeper, and the `verification.delayed`
//! watches.

use deadpool_redis::redis;

use super::error::StoreError;
use super::keys::GROUPS;
use super::pool::RedisStore;
use crate::clock::Millis;
use crate::ids::VerificationId;

impl RedisStore {
    /// `verification.delayed` watches of a group that are due: `(id, send)`.
    pub async fn due_delays(
        &self,
        group: u8,
        now: Millis,
        count: usize,
    ) -> Result<Vec<(VerificationId, u8)>, StoreError> {
        let members: Vec<String> = self
            .due_members(self.keys().delays(group), now, count)
            .await?;
        Ok(members
            .iter()
            .filter_map(|member| {
                let (id, send) = member.split_once(':')?;
                Some((VerificationId::parse(id)?, send.parse().ok()?))
            })
            .collect())
    }

    /// Pending verifications, every group (each has a deadline until it ends).
    pub async fn pending_count(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for group in 0..GROUPS {
            let n: u64 = self
                .run(redis::cmd("ZCARD").arg(self.keys().deadlines(group)))
                .await?;
            total += n;
        }
        Ok(total)
    }

    /// Verifications of a group whose deadline has come, at most `count`.
    pub async fn due(
        &self,
        group: u8,
        now: Millis,
        count: usize,
    ) -> Result<Vec<VerificationId>, StoreError> {
        let ids: Vec<String> = self
            .due_members(self.keys().deadlines(group), now, count)
            .await?;
        Ok(ids
            .iter()
            .filter_map(|id| VerificationId::parse(id))
            .collect())
    }
}

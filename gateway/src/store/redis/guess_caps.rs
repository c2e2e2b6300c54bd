//! The caps on wrong codes per citizen IP and per client (`crate::guess_caps`) on Redis's
//! clock: the same GCRA as the send limits, each guesser under its own hash tag, peeked before a
//! check and spent after a wrong code by the `GUESSES` script.

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_redis::redis;

use super::error::StoreError;
use super::limits::gcra_rules;
use super::pool::RedisStore;
use crate::config::Rule;
use crate::guess_caps::Guesser;

/// What `GUESSES` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuessOp {
    /// Whether one more wrong code would be allowed; spends nothing.
    Peek,
    /// Spends one wrong code of every rule, or none when one is full.
    Spend,
}

impl RedisStore {
    /// Peeks or spends `guesser`'s `rules`; `Some((rule index, retry))` when a rule refuses.
    pub async fn guesses(
        &self,
        guesser: Guesser,
        rules: &[Rule],
        op: GuessOp,
        clock_offset_ms: i64,
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        if rules.is_empty() {
            return Ok(None);
        }
        let mut invocation = GUESSES_SCRIPT.prepare_invoke();
        for rule in 0..rules.len() {
            invocation.key(self.keys().guess_cap(guesser, rule));
        }
        invocation
            .arg(gcra_rules(rules))
            .arg(clock_offset_ms)
            .arg(match op {
                GuessOp::Peek => "peek",
                GuessOp::Spend => "spend",
            });
        let answer: Vec<i64> = self.invoke(&invocation).await?;
        match answer.as_slice() {
            [1, ..] => Ok(None),
            [2, retry, rule] => Ok(Some((
                (*rule).max(1) as usize - 1,
                Duration::from_millis((*retry).max(1) as u64),
            ))),
            _ => Err(StoreError::Protocol(format!("guesses answered {answer:?}"))),
        }
    }
}

/// `GUESSES` (`lua/guesses.lua`, after the GCRA function, `lua/gcra.lua`).
static GUESSES_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        include_str!("lua/gcra.lua"),
        include_str!("lua/guesses.lua")
    ))
});

//! Send limits on Redis's clock: GCRA, one theoretical arrival time per rule. The client and IP
//! limits are spent here, by the `GCRA` script; the phone's limit is spent by `COMMIT`, with
//! the write it limits.

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use deadpool_redis::redis;

use super::error::StoreError;
use super::keys::Keys;
use super::pool::RedisStore;
use crate::config::Rule;
use crate::ids::ClientId;

impl RedisStore {
    /// Spends one send of a client's rules (all or nothing), on Redis's clock.
    pub async fn limit_client(
        &self,
        client: ClientId,
        rules: &[Rule],
        clock_offset_ms: i64,
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        let key = |keys: &Keys, rule| keys.client_limit(client, rule);
        self.limit(key, rules, clock_offset_ms).await
    }

    /// Spends one send of an IP's rules (all or nothing), on Redis's clock.
    pub async fn limit_ip(
        &self,
        ip: IpAddr,
        rules: &[Rule],
        clock_offset_ms: i64,
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        let key = |keys: &Keys, rule| keys.ip_limit(ip, rule);
        self.limit(key, rules, clock_offset_ms).await
    }

    /// Spends one verification of a phone country's `country_rules` and of its number
    /// prefix's `prefix_rules`, all or nothing, in one script (the keys share the country's
    /// hash tag). The index of the rule that refused counts the country's rules first.
    pub async fn limit_destination(
        &self,
        country: &str,
        prefix: &str,
        country_rules: &[Rule],
        prefix_rules: &[Rule],
        clock_offset_ms: i64,
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        let n_country = country_rules.len();
        let key = |keys: &Keys, rule: usize| {
            if rule < n_country {
                keys.country_limit(country, rule)
            } else {
                keys.prefix_limit(country, prefix, rule - n_country)
            }
        };
        let rules: Vec<Rule> = country_rules.iter().chain(prefix_rules).copied().collect();
        self.limit(key, &rules, clock_offset_ms).await
    }

    /// Spends one SMS of every budget in `budgets`, or none; the index of the one that refused.
    pub async fn spend_budgets(
        &self,
        budgets: &[crate::budget::BudgetKey],
        clock_offset_ms: i64,
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        let key = |keys: &Keys, index: usize| keys.budget(&budgets[index]);
        let rules: Vec<Rule> = budgets.iter().map(|budget| budget.rule).collect();
        self.limit(key, &rules, clock_offset_ms).await
    }

    /// Spends one send of `rules`, the key of each rule by its index.
    async fn limit(
        &self,
        key: impl Fn(&Keys, usize) -> String,
        rules: &[Rule],
        clock_offset_ms: i64,
    ) -> Result<Option<(usize, Duration)>, StoreError> {
        if rules.is_empty() {
            return Ok(None);
        }
        let mut invocation = GCRA_SCRIPT.prepare_invoke();
        for rule in 0..rules.len() {
            invocation.key(key(self.keys(), rule));
        }
        invocation.arg(gcra_rules(rules)).arg(clock_offset_ms);
        let answer: Vec<i64> = self.invoke(&invocation).await?;
        match answer.as_slice() {
            [1, ..] => Ok(None),
            [2, retry, rule] => Ok(Some((
                (*rule).max(1) as usize - 1,
                Duration::from_millis((*retry).max(1) as u64),
            ))),
            _ => Err(StoreError::Protocol(format!("limit answered {answer:?}"))),
        }
    }
}

/// The rules as the scripts read them: `emission,tolerance` (ms) per rule, joined by `;`.
pub(crate) fn gcra_rules(rules: &[Rule]) -> String {
    rules
        .iter()
        .map(|rule| {
            let (emission, tolerance) = gcra_params(rule);
            format!("{emission},{tolerance}")
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// GCRA's emission interval and tolerance, in ms, for `max` sends per `per`.
fn gcra_params(rule: &Rule) -> (u64, u64) {
    let per = rule.per.as_millis().max(1) as u64;
    let emission = (per / u64::from(rule.max.get())).max(1);
    (emission, emission * u64::from(rule.max.get() - 1))
}

/// `GCRA`: spends one send of every rule, or none (`lua/limits.lua`, after the GCRA function
/// it shares with `COMMIT`, `lua/gcra.lua`).
static GCRA_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        include_str!("lua/gcra.lua"),
        include_str!("lua/limits.lua")
    ))
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_the_whole_burst_then_one_per_emission() {
        let rule = Rule {
            max: std::num::NonZeroU32::new(3).unwrap(),
            per: Duration::from_secs(60),
        };
        assert_eq!(gcra_params(&rule), (20_000, 40_000));
    }

    #[test]
    fn the_scripts_read_rules_as_emission_and_tolerance() {
        let rule = |max, secs| Rule {
            max: std::num::NonZeroU32::new(max).unwrap(),
            per: Duration::from_secs(secs),
        };
        assert_eq!(
            gcra_rules(&[rule(3, 60), rule(1, 30)]),
            "20000,40000;30000,0"
        );
        assert_eq!(gcra_rules(&[]), "");
    }
}

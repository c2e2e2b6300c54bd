//! SMS budgets: at most so many SMS per client (`[[clients]] sms_budget`) and per phone country
//! (`[limits] country_budgets`) over a period, whatever else allows them.
//!
//! A budget counts SMS, not segments: it is spent when the gateway decides to send (a new
//! verification's first SMS, a resend; not yet the gateway's own reroutes), before the text is rendered, so that a start can be
//! refused (`429 budget_exhausted`) while nothing has gone out; one verification's SMS is as
//! long as its client's template makes it, so a budget in SMS is a budget in segments times a
//! constant the operator knows (`otpgate_sms_segments_total` shows it).
//!
//! Each budget is a GCRA bucket of `max` SMS that refills evenly over `per`, like every other
//! limit. The client's and the country's budgets of one SMS are spent together, all or nothing:
//! here under one lock (embedded), on Redis in one script over keys that share the `{budget}`
//! hash tag (`store/redis/limits.rs`), so every instance spends the same budgets.

use std::collections::HashMap;
use std::time::Duration;

use crate::clock::Millis;
use crate::config::{ClientConfig, Limits, Rule};
use crate::ids::ClientId;

/// Whose budget refused an SMS: the closed set behind the `scope` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetScope {
    Client,
    Country,
}

/// Which SMS a budget refused: the closed set behind the `send` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetedSend {
    /// A new verification's first SMS.
    First,
    /// A resend the frontend asked for, or that a start for the live verification caused.
    Resend,
}

/// The budgets of the configuration, and on the embedded back-end their buckets.
#[derive(Debug)]
pub struct Budgets {
    /// By [`ClientId`].
    clients: Vec<Option<Rule>>,
    /// By region code (`crate::ratelimit::country_key`).
    countries: HashMap<String, Rule>,
    /// Embedded: each bucket's theoretical arrival time (ms, gateway clock). One entry per
    /// configured budget at most, so it needs no housekeeping.
    tats: std::sync::Mutex<HashMap<(BudgetScope, String), Millis>>,
}

/// One budget an SMS spends: whose, under which key, and its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetKey {
    pub scope: BudgetScope,
    /// The client id, or the region code.
    pub key: String,
    pub rule: Rule,
}

/// An SMS a budget refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetRefusal {
    pub scope: BudgetScope,
    pub rule: Rule,
    /// When the budget has room for one SMS again.
    pub retry_after: Duration,
}

// === impl Budgets ===

impl Budgets {
    pub fn new(clients: &[ClientConfig], limits: &Limits) -> Budgets {
        Budgets {
            clients: clients.iter().map(|client| client.sms_budget).collect(),
            countries: limits.country_budgets.iter().cloned().collect(),
            tats: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Whether any budget is configured.
    pub fn is_configured(&self) -> bool {
        !self.countries.is_empty() || self.clients.iter().any(Option::is_some)
    }

    /// The budgets an SMS of `client` to a phone of `country` spends: the client's, then the
    /// country's.
    pub fn keys_for(&self, client: ClientId, country: &str) -> Vec<BudgetKey> {
        let client_budget = self
            .clients
            .get(client as usize)
            .copied()
            .flatten()
            .map(|rule| BudgetKey {
                scope: BudgetScope::Client,
                key: client.to_string(),
                rule,
            });
        let country_budget = self.countries.get(country).map(|rule| BudgetKey {
            scope: BudgetScope::Country,
            key: country.to_owned(),
            rule: *rule,
        });
        client_budget.into_iter().chain(country_budget).collect()
    }

    /// Spends one SMS of every budget in `keys`, or none (the embedded back-end's buckets).
    pub fn spend_here(&self, keys: &[BudgetKey], now: Millis) -> Result<(), BudgetRefusal> {
        let mut tats = crate::sync::lock(&self.tats);
        let mut spent = Vec::with_capacity(keys.len());
        for budget in keys {
            let tat = tats
                .get(&(budget.scope, budget.key.clone()))
                .copied()
                .unwrap_or(now);
            match gcra(tat, now, &budget.rule) {
                Ok(next) => spent.push(next),
                Err(retry_after) => {
                    return Err(BudgetRefusal {
                        scope: budget.scope,
                        rule: budget.rule,
                        retry_after,
                    });
                }
            }
        }
        for (budget, next) in keys.iter().zip(spent) {
            tats.insert((budget.scope, budget.key.clone()), next);
        }
        Ok(())
    }
}

/// GCRA for `max` SMS per `per` (the same arithmetic as `store/redis/lua/gcra.lua`): the next
/// theoretical arrival time if one SMS fits now, else how long until one does.
fn gcra(tat: Millis, now: Millis, rule: &Rule) -> Result<Millis, Duration> {
    let per = rule.per.as_millis().max(1) as u64;
    let emission = (per / u64::from(rule.max.get())).max(1);
    let tolerance = emission * u64::from(rule.max.get() - 1);
    let tat = tat.max(now);
    if now + tolerance < tat {
        return Err(Duration::from_millis(tat - tolerance - now));
    }
    Ok(tat + emission)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn rule(max: u32, per_secs: u64) -> Rule {
        Rule {
            max: NonZeroU32::new(max).unwrap(),
            per: Duration::from_secs(per_secs),
        }
    }

    fn budgets(client: Option<Rule>, country: Option<Rule>) -> Budgets {
        Budgets {
            clients: vec![client, None],
            countries: country
                .map(|rule| ("IT".to_owned(), rule))
                .into_iter()
                .collect(),
            tats: std::sync::Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn a_budget_allows_its_whole_bucket_then_refills_evenly() {
        let budgets = budgets(Some(rule(3, 3600)), None);
        let keys = budgets.keys_for(0, "IT");
        for _ in 0..3 {
            assert!(budgets.spend_here(&keys, 1_000).is_ok());
        }
        let refused = budgets.spend_here(&keys, 1_000).unwrap_err();
        assert_eq!(refused.scope, BudgetScope::Client);
        assert_eq!(refused.retry_after, Duration::from_secs(1200));
        // One SMS refills every 20 minutes.
        assert!(budgets.spend_here(&keys, 1_000 + 1_200_000).is_ok());
        assert!(budgets.spend_here(&keys, 1_000 + 1_200_000).is_err());
        // Client 1 has no budget.
        assert!(budgets.keys_for(1, "FR").is_empty());
    }

    #[test]
    fn the_client_and_country_budgets_are_spent_all_or_nothing() {
        let budgets = budgets(Some(rule(5, 60)), Some(rule(1, 60)));
        let keys = budgets.keys_for(0, "IT");
        assert_eq!(keys.len(), 2);
        assert!(budgets.spend_here(&keys, 0).is_ok());
        // The country's budget refuses: the client's is left as it was.
        for _ in 0..10 {
            let refused = budgets.spend_here(&keys, 0).unwrap_err();
            assert_eq!(refused.scope, BudgetScope::Country);
        }
        let french = budgets.keys_for(0, "FR");
        for _ in 0..4 {
            assert!(budgets.spend_here(&french, 0).is_ok());
        }
        assert_eq!(
            budgets.spend_here(&french, 0).unwrap_err().scope,
            BudgetScope::Client
        );
    }
}

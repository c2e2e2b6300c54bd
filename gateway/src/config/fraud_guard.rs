//! `[fraud_guard]`: the conversion monitor that slows, then blocks, starts to a country or a
//! number prefix whose verifications almost never end approved (`crate::fraud_guard`).

use std::time::Duration;

use serde::Deserialize;

use super::Rule;
use super::error::{ConfigError, invalid, secs};
use super::limits::RawRule;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFraudGuard {
    pub enabled: Option<bool>,
    pub window_secs: Option<u64>,
    pub min_volume: Option<u32>,
    pub slow_below: Option<f64>,
    pub block_below: Option<f64>,
    pub cool_off_secs: Option<u64>,
    pub slowed_sends: Option<RawRule>,
}

/// How the conversion monitor judges a country or a prefix.
#[derive(Debug, Clone)]
pub struct FraudGuardPolicy {
    pub enabled: bool,
    /// The endings judged: those of the last `window`.
    pub window: Duration,
    /// Endings (of verifications whose SMS reached the phone) needed before a key is judged.
    pub min_volume: u32,
    /// A conversion (approved / ended) below this slows new starts to `slowed_sends`.
    pub slow_below: f64,
    /// A conversion below this blocks new starts for `cool_off`.
    pub block_below: f64,
    pub cool_off: Duration,
    /// Starts a slowed key may take.
    pub slowed_sends: Rule,
}

impl RawFraudGuard {
    pub(crate) fn validate(self) -> Result<FraudGuardPolicy, ConfigError> {
        let window = secs(
            "fraud_guard.window_secs",
            self.window_secs,
            3600,
            60,
            86_400,
        )?;
        let min_volume = self.min_volume.unwrap_or(50);
        if !(5..=1_000_000).contains(&min_volume) {
            return invalid("fraud_guard.min_volume", "must be between 5 and 1000000");
        }
        let fraction = |key: &str, value: Option<f64>, default: f64| {
            let value = value.unwrap_or(default);
            if (0.0..=1.0).contains(&value) {
                Ok(value)
            } else {
                invalid(key, "must be a fraction between 0 and 1")
            }
        };
        let slow_below = fraction("fraud_guard.slow_below", self.slow_below, 0.2)?;
        let block_below = fraction("fraud_guard.block_below", self.block_below, 0.05)?;
        if block_below > slow_below {
            return invalid(
                "fraud_guard.block_below",
                "must not exceed fraud_guard.slow_below",
            );
        }
        let cool_off = secs(
            "fraud_guard.cool_off_secs",
            self.cool_off_secs,
            1800,
            10,
            86_400,
        )?;
        let slowed_sends = self
            .slowed_sends
            .unwrap_or(RawRule {
                max: 10,
                per_secs: 600,
            })
            .validate("fraud_guard.slowed_sends")?;
        Ok(FraudGuardPolicy {
            enabled: self.enabled.unwrap_or(true),
            window,
            min_volume,
            slow_below,
            block_below,
            cool_off,
            slowed_sends,
        })
    }
}

//! Every key the redis back-end uses, named in one place.
//!
//! Everything one engine call touches for one phone lives under one hash tag, the phone's
//! *group* (`{0}` … `{f}`, the low nibble of the verification id's first byte), so every script
//! runs on one Cluster slot. `P` is the configured key prefix. No key name spells a phone
//! number: `<phone>` is the phone's keyed hash ([`crate::otp::PhoneKeys`], 32 hex digits), which
//! only holders of the secret can compute; the group still comes from the phone itself.
//!
//! | key                         | what                                                        |
//! |-----------------------------|-------------------------------------------------------------|
//! | `P:{G}:v:<id>`              | a verification: hash of `r` (revision), `b` (the record) and `p` (`<phone>:<client>`, its failed-checks key's tail) |
//! | `P:{G}:l:<phone>:<client>`  | the phone's live verification for a client                  |
//! | `P:{G}:f:<phone>:<client>`  | wrong codes typed for the phone through a client, `count:window_start` |
//! | `P:{G}:pl:<phone>:<rule>`   | the phone's send limit (GCRA theoretical arrival time)      |
//! | `P:{G}:d`                   | sorted set: each verification's next deadline               |
//! | `P:{G}:q:<lane>`            | the SMS jobs of a lane: a stream with one consumer group    |
//! | `P:{G}:w`                   | webhook events raised by the group's verifications: a stream |
//! | `P:{G}:dw`                  | sorted set: `id:send` watches for `verification.delayed`    |
//! | `P:{G}:none`                | never written: stands in a script's key list for a key it does not use |
//! | `P:{c:<client>}:<rule>`     | a client's send limit                                       |
//! | `P:{ip:<ip>}:<rule>`        | a citizen IP's send limit                                   |
//! | `P:{cc:<country>}:<rule>`   | a phone country's velocity limit (`country_sends`)          |
//! | `P:{cc:<country>}:px:<prefix>:<rule>` | a number prefix's velocity limit (`prefix_sends`), under its country's tag so both are spent in one script |
//! | `P:{budget}:c:<client>`     | a client's SMS budget (GCRA), beside every other budget so one script spends a client's and a country's together |
//! | `P:{budget}:cc:<country>`   | a phone country's SMS budget                                |
//! | `P:{gi:<ip>}:<rule>`        | a citizen IP's wrong codes (`failed_checks_per_ip`)         |
//! | `P:{gc:<client>}:<rule>`    | a client's wrong codes (`failed_checks_per_client`)         |
//! | `P:{i:<client>:<hash>}`     | an `Idempotency-Key`                                        |
//! | `P:rc:<carrier>:<reading>`  | a carrier message id, for receipts                          |
//! | `P:er:<carrier>:<reading>`  | a receipt that came before its submit answer                |
//! | `P:er:due`                  | sorted set: `carrier:message id` of each held receipt, by when it runs out |
//!
//! Beside the keys, one pub/sub channel, `P:changed`: `COMMIT` publishes on it the id of each
//! verification whose long-polls a change wakes (a plain `PUBLISH`, which a Cluster forwards to
//! every node).

use std::fmt;
use std::net::IpAddr;

use crate::guess_caps::Guesser;
use crate::ids::{CarrierId, ClientId, VerificationId, shard_byte};
use crate::otp::PhoneKeys;
use crate::phone::Phone;
use crate::receipt::Reading;

/// Hash-tag groups: a verification's keys and its lane's stream share one.
pub const GROUPS: u8 = 16;

/// The hash-tag group of a verification (and of its phone).
pub fn group(id: &VerificationId) -> u8 {
    id.shard_byte() % GROUPS
}

/// The hash-tag group of every verification of `phone`.
pub fn phone_group(phone: &Phone) -> u8 {
    shard_byte(phone) % GROUPS
}

/// The consumer group every instance reads the SMS and webhook streams in.
pub(crate) const CONSUMER_GROUP: &str = "otpgate";

/// The keys under one prefix.
#[derive(Debug)]
pub(crate) struct Keys {
    prefix: String,
    /// How phones are named in keys.
    phones: PhoneKeys,
}

impl Keys {
    pub(crate) fn new(prefix: String, phones: PhoneKeys) -> Keys {
        Keys { prefix, phones }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn tagged(&self, group: u8, rest: fmt::Arguments<'_>) -> String {
        format!("{}:{{{:x}}}:{}", self.prefix, group, rest)
    }

    pub(crate) fn record(&self, id: &VerificationId) -> String {
        self.tagged(group(id), format_args!("v:{id}"))
    }

    /// What a record key of `group` starts with: the id follows.
    pub(crate) fn records_of(&self, group: u8) -> String {
        self.tagged(group, format_args!("v:"))
    }

    pub(crate) fn placeholder(&self, group: u8) -> String {
        self.tagged(group, format_args!("none"))
    }

    /// `<phone>:<client>`: how a phone and client are named in keys (and in a record's `p`).
    pub(crate) fn phone_client(&self, phone: u64, client: ClientId) -> String {
        format!("{}:{client}", self.phones.name(phone))
    }

    pub(crate) fn live(&self, group: u8, phone: u64, client: ClientId) -> String {
        self.tagged(
            group,
            format_args!("l:{}", self.phone_client(phone, client)),
        )
    }

    pub(crate) fn failed(&self, group: u8, phone: u64, client: ClientId) -> String {
        self.tagged(
            group,
            format_args!("f:{}", self.phone_client(phone, client)),
        )
    }

    /// What a failed-checks key of `group` starts with: `<phone>:<client>` follows.
    pub(crate) fn failed_of(&self, group: u8) -> String {
        self.tagged(group, format_args!("f:"))
    }

    pub(crate) fn phone_limit(&self, group: u8, phone: u64, rule: usize) -> String {
        let phone = self.phones.name(phone);
        self.tagged(group, format_args!("pl:{phone}:{rule}"))
    }

    pub(crate) fn deadlines(&self, group: u8) -> String {
        self.tagged(group, format_args!("d"))
    }

    pub(crate) fn stream(&self, group: u8, lane: u8) -> String {
        self.tagged(group, format_args!("q:{lane}"))
    }

    pub(crate) fn outbox(&self, group: u8) -> String {
        self.tagged(group, format_args!("w"))
    }

    pub(crate) fn delays(&self, group: u8) -> String {
        self.tagged(group, format_args!("dw"))
    }

    pub(crate) fn client_limit(&self, client: ClientId, rule: usize) -> String {
        format!("{}:{{c:{client}}}:{rule}", self.prefix)
    }

    pub(crate) fn ip_limit(&self, ip: IpAddr, rule: usize) -> String {
        format!("{}:{{ip:{ip}}}:{rule}", self.prefix)
    }

    /// A guessing cap's rule for `guesser` (`guess_caps.rs`).
    pub(crate) fn guess_cap(&self, guesser: Guesser, rule: usize) -> String {
        match guesser {
            Guesser::Ip(ip) => format!("{}:{{gi:{ip}}}:{rule}", self.prefix),
            Guesser::Client(client) => format!("{}:{{gc:{client}}}:{rule}", self.prefix),
        }
    }

    pub(crate) fn country_limit(&self, country: &str, rule: usize) -> String {
        format!("{}:{{cc:{country}}}:{rule}", self.prefix)
    }

    /// A number prefix's velocity limit: under its country's hash tag, so that the country's
    /// and the prefix's rules are spent together, all or nothing. A prefix never names a whole
    /// number (`crate::ratelimit::prefix_key`).
    pub(crate) fn prefix_limit(&self, country: &str, prefix: &str, rule: usize) -> String {
        format!("{}:{{cc:{country}}}:px:{prefix}:{rule}", self.prefix)
    }

    /// An SMS budget (`crate::budget`): every budget under one hash tag, so that the client's
    /// and the country's budgets of one SMS are spent in one script, all or nothing.
    pub(crate) fn budget(&self, budget: &crate::budget::BudgetKey) -> String {
        let scope = match budget.scope {
            crate::budget::BudgetScope::Client => "c",
            crate::budget::BudgetScope::Country => "cc",
        };
        format!("{}:{{budget}}:{scope}:{}", self.prefix, budget.key)
    }

    pub(crate) fn idempotency(&self, client: ClientId, key: &str) -> String {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes());
        format!(
            "{}:{{i:{client}:{}}}",
            self.prefix,
            hex::encode(&digest[..16])
        )
    }

    /// The receipt index: a carrier message id, by one of its readings.
    pub(crate) fn receipt(&self, carrier: CarrierId, reading: &Reading) -> String {
        format!("{}:rc:{carrier}:{reading}", self.prefix)
    }

    /// A receipt held until its submit answer comes, by one of its readings.
    pub(crate) fn held_receipt(&self, carrier: CarrierId, reading: &Reading) -> String {
        format!("{}:er:{carrier}:{reading}", self.prefix)
    }

    /// The pub/sub channel of changed verifications' ids.
    pub(crate) fn changes(&self) -> String {
        format!("{}:changed", self.prefix)
    }

    /// When each held receipt runs out.
    pub(crate) fn held_receipts(&self) -> String {
        format!("{}:er:due", self.prefix)
    }
}

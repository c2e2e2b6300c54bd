//! Configuration files: any text is refused with an error or accepted, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = gateway::config::Config::from_toml(text);
});

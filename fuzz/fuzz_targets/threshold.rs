//! Thresholds from the command line: parsed or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = text.parse::<loadgen::rehearsal::threshold::Threshold>();
});

//! Carriers' message ids: every spelling reduces to readings without panicking, and an id
//! always shares a reading with itself in upper case.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|id: &str| {
    let readings = gateway::receipt::readings(id);
    let upper = gateway::receipt::readings(&id.to_ascii_uppercase());
    if !readings.is_empty() {
        assert!(readings.iter().any(|reading| upper.contains(reading)), "{id:?}");
    }
});

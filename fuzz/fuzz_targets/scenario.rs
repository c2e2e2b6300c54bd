//! Scenario files: any text is refused with an error naming what is wrong, or accepted; an
//! accepted scenario's phone numbers map back to their users.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match loadgen::rehearsal::scenario::Scenario::parse(text) {
        Ok(scenario) => {
            for user in [0, 1, 999] {
                let phone = scenario.phone(user);
                assert_eq!(scenario.user_of(&phone), Some(user), "{phone}");
            }
            let _ = scenario.expected_arrivals();
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});

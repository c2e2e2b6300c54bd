//! Phone numbers as frontends send them: parsing never panics, and a parsed number is E.164
//! and masks at least a third of its digits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok((phone, _region)) = gateway::phone::Phone::parse(input) {
        let e164 = phone.e164();
        assert!(e164.starts_with('+') && e164.len() <= 16, "{e164}");
        let masked = phone.to_string();
        let hidden = masked.chars().filter(|c| *c == '*').count();
        assert!(hidden * 3 >= e164.len() - 1 - 3, "{masked} hides too little of {e164}");
    }
});

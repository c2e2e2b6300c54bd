//! Operators' templates and frontends' locales, origins and app hashes: a template is accepted
//! or refused without a panic, and a rendered SMS always carries the code and counts at least
//! one segment.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, &str, &str)| {
    let (template, locale, origin, app_hash) = input;
    let Ok(templates) = gateway::sms::Templates::new([("en".to_owned(), template.to_owned())], "en")
    else {
        return;
    };
    let host = gateway::sms::web_otp_host(origin).ok();
    let sms = templates.render(
        Some(locale),
        &gateway::sms::RenderParams {
            code: "123456",
            ttl_minutes: 10,
            web_origin_host: host.as_deref(),
            app_hash: Some(app_hash),
        },
    );
    assert!(sms.segments() >= 1);
    assert!(sms.text().contains("123456"));
});

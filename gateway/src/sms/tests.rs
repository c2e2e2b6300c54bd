use proptest::prelude::*;

use super::template::{BUILTIN_EN, BUILTIN_IT};
use super::*;

fn params(code: &str) -> RenderParams<'_> {
    RenderParams {
        code,
        ttl_minutes: 10,
        web_origin_host: None,
        app_hash: None,
    }
}

fn parse_templates(
    entries: &[(&str, &str)],
    default_locale: &str,
) -> Result<Templates, TemplateError> {
    let by_locale = entries
        .iter()
        .map(|&(locale, source)| (locale.to_owned(), source.to_owned()));
    Templates::new(by_locale, default_locale)
}

/// The cost of a piece of text in `encoding`, computed independently of the segmenter.
fn cost(encoding: Encoding, text: &str) -> usize {
    match encoding {
        Encoding::Gsm7 => gsm7_unpacked(text).map_or(usize::MAX, |septets| septets.len()),
        Encoding::Ucs2 => text.encode_utf16().count(),
    }
}

/// Checks every property `segment_ranges` promises, for any text.
fn check_segmentation(text: &str) {
    let sms = SmsText::new(text.to_owned());
    let ranges = sms.segment_ranges();
    assert_eq!(usize::from(sms.segments()), ranges.len());
    assert_eq!(
        sms.encoding() == Encoding::Gsm7,
        gsm7_unpacked(text).is_some()
    );
    assert_eq!(sms.units(), cost(sms.encoding(), text));

    let mut expected_start = 0;
    for range in &ranges {
        assert_eq!(range.start, expected_start, "ranges must be contiguous");
        assert!(range.start <= range.end);
        assert!(text.is_char_boundary(range.start) && text.is_char_boundary(range.end));
        expected_start = range.end;
    }
    assert_eq!(expected_start, text.len(), "ranges must cover the text");

    let limit = if ranges.len() == 1 {
        sms.encoding().single_segment_units()
    } else {
        sms.encoding().multipart_segment_units()
    };
    let mut total = 0;
    for (index, range) in ranges.iter().enumerate() {
        let segment_cost = cost(sms.encoding(), &text[range.clone()]);
        assert!(
            segment_cost <= limit,
            "segment {index} costs {segment_cost} > {limit}"
        );
        if ranges.len() > 1 {
            assert!(!range.is_empty());
        }
        // Greedy packing: the next character would not have fitted.
        if let Some(next) = text[range.end..].chars().next() {
            let next_cost = cost(sms.encoding(), next.encode_utf8(&mut [0; 4]));
            assert!(
                segment_cost + next_cost > limit,
                "segment {index} was cut short"
            );
        }
        total += segment_cost;
    }
    assert_eq!(total, sms.units());
}

#[test]
fn encoding_units_and_segments_at_the_boundaries() {
    let a = |n: usize| "a".repeat(n);
    let euro = |n: usize| "€".repeat(n);
    let a_acute = |n: usize| "á".repeat(n);
    let cases: Vec<(&str, String, Encoding, usize, u16)> = vec![
        ("empty", String::new(), Encoding::Gsm7, 0, 1),
        ("one char", a(1), Encoding::Gsm7, 1, 1),
        ("160 septets", a(160), Encoding::Gsm7, 160, 1),
        ("161 septets", a(161), Encoding::Gsm7, 161, 2),
        ("306 septets", a(306), Encoding::Gsm7, 306, 2),
        ("307 septets", a(307), Encoding::Gsm7, 307, 3),
        ("80 escapes", euro(80), Encoding::Gsm7, 160, 1),
        ("80 escapes and one", euro(80) + "a", Encoding::Gsm7, 161, 2),
        (
            "escape ends segment",
            a(151) + "€" + &a(153),
            Encoding::Gsm7,
            306,
            2,
        ),
        (
            "escape straddles",
            a(152) + "€" + &a(152),
            Encoding::Gsm7,
            306,
            3,
        ),
        ("70 units", a_acute(70), Encoding::Ucs2, 70, 1),
        ("71 units", a_acute(71), Encoding::Ucs2, 71, 2),
        ("134 units", a_acute(134), Encoding::Ucs2, 134, 2),
        ("135 units", a_acute(135), Encoding::Ucs2, 135, 3),
        (
            "emoji fits single",
            a_acute(68) + "😀",
            Encoding::Ucs2,
            70,
            1,
        ),
        ("emoji after 69", a_acute(69) + "😀", Encoding::Ucs2, 71, 2),
        (
            "pair ends segment",
            a_acute(65) + "😀" + &a_acute(67),
            Encoding::Ucs2,
            134,
            2,
        ),
        (
            "pair straddles",
            a_acute(66) + "😀" + &a_acute(66),
            Encoding::Ucs2,
            134,
            3,
        ),
        (
            "extension in ucs2 costs one",
            "€á".to_owned(),
            Encoding::Ucs2,
            2,
            1,
        ),
        (
            "emoji is two units",
            "Ciao 😀".to_owned(),
            Encoding::Ucs2,
            7,
            1,
        ),
        ("brackets", "[]".to_owned(), Encoding::Gsm7, 4, 1),
    ];
    for (name, text, encoding, units, segments) in cases {
        let sms = SmsText::new(text.clone());
        assert_eq!(
            (sms.encoding(), sms.units(), sms.segments()),
            (encoding, units, segments),
            "{name}"
        );
        check_segmentation(&text);
    }
}

#[test]
fn straddling_characters_move_to_the_next_segment() {
    let text = "a".repeat(152) + "€" + &"a".repeat(152);
    let ranges = SmsText::new(text).segment_ranges();
    assert_eq!(ranges, vec![0..152, 152..306, 306..307]);

    let text = "á".repeat(66) + "😀" + &"á".repeat(66);
    let ranges = SmsText::new(text).segment_ranges();
    assert_eq!(ranges, vec![0..132, 132..266, 266..268]);
}

#[test]
fn gsm7_alphabet() {
    for (index, &c) in GSM7_BASIC.iter().enumerate() {
        let expected = if index == usize::from(GSM7_ESCAPE) {
            None
        } else {
            Some(vec![u8::try_from(index).unwrap()])
        };
        assert_eq!(gsm7_unpacked(c.encode_utf8(&mut [0; 4])), expected, "{c:?}");
    }
    for &(c, code) in &GSM7_EXTENSION {
        let text = c.to_string();
        assert_eq!(gsm7_unpacked(&text), Some(vec![GSM7_ESCAPE, code]), "{c:?}");
        assert_eq!(SmsText::new(text).units(), 2, "{c:?}");
    }
    let mut seen: Vec<char> = GSM7_BASIC.to_vec();
    seen.extend(GSM7_EXTENSION.iter().map(|&(c, _)| c));
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 128 + 10, "every character appears once");

    assert_eq!(gsm7_unpacked("@£$"), Some(vec![0x00, 0x01, 0x02]));
    assert_eq!(
        gsm7_unpacked("Ciao è€"),
        Some(vec![0x43, 0x69, 0x61, 0x6F, 0x20, 0x04, 0x1B, 0x65])
    );
    assert_eq!(gsm7_unpacked(""), Some(vec![]));
}

#[test]
fn lookalikes_force_ucs2() {
    // Each of these resembles a GSM-7 character but is not one.
    let lookalikes = [
        ('á', "a with acute"),
        ('ê', "e with circumflex"),
        ('`', "grave accent"),
        ('ç', "lowercase c cedilla; only uppercase Ç is basic"),
        ('\u{2126}', "ohm sign; GSM-7 has the Greek capital omega"),
        ('\u{2206}', "increment; GSM-7 has the Greek capital delta"),
        ('È', "uppercase E grave"),
        ('’', "typographic apostrophe"),
        ('“', "typographic quote"),
        ('\u{A0}', "no-break space"),
        ('\t', "tab"),
        ('\u{1B}', "the escape itself"),
    ];
    for (c, name) in lookalikes {
        let sms = SmsText::new(format!("Code {c}"));
        assert_eq!(sms.encoding(), Encoding::Ucs2, "{name}");
    }
    let genuine = [
        'Ç', 'Ω', 'Δ', 'É', 'è', 'é', 'ù', 'ì', 'ò', 'à', '¤', '§', '¿', '¡', '€',
    ];
    for c in genuine {
        let sms = SmsText::new(format!("Code {c}"));
        assert_eq!(sms.encoding(), Encoding::Gsm7, "{c:?}");
    }
}

#[test]
fn encoding_names() {
    assert_eq!(Encoding::Gsm7.as_str(), "gsm7");
    assert_eq!(Encoding::Ucs2.as_str(), "ucs2");
}

#[test]
fn builtin_templates_are_gsm7_and_one_segment() {
    let templates = Templates::builtin();
    assert_eq!(templates.default_locale(), "en");
    let cases = [
        (
            "en",
            "Your verification code is 123456. It expires in 10 minutes. Never share it with anyone.",
        ),
        (
            "it",
            "Il tuo codice di verifica è 123456. Scade tra 10 minuti. Non condividerlo con nessuno.",
        ),
    ];
    for (locale, expected) in cases {
        let sms = templates.render(Some(locale), &params("123456"));
        assert_eq!(sms.text(), expected, "{locale}");
        assert_eq!(sms.encoding(), Encoding::Gsm7, "{locale}");
        assert_eq!(sms.segments(), 1, "{locale}");

        let with_lines = RenderParams {
            web_origin_host: Some("portal.example.it"),
            app_hash: Some("FA+9qCX9VSu"),
            ..params("123456")
        };
        let sms = templates.render(Some(locale), &with_lines);
        assert_eq!(sms.encoding(), Encoding::Gsm7, "{locale} with extra lines");
        assert_eq!(sms.segments(), 1, "{locale} with extra lines");
    }
}

#[test]
fn template_errors() {
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        (
            "missing code",
            "en",
            "Hello",
            "template for locale \"en\": missing the {code} placeholder",
        ),
        (
            "duplicate code",
            "en",
            "{code} {code}",
            "template for locale \"en\": the {code} placeholder appears more than once",
        ),
        (
            "unknown placeholder",
            "en",
            "{code} {name}",
            "template for locale \"en\": unknown placeholder {name}",
        ),
        (
            "empty",
            "en",
            "",
            "template for locale \"en\": empty template",
        ),
        (
            "blank",
            "en",
            "  \n",
            "template for locale \"en\": empty template",
        ),
        (
            "unclosed",
            "en",
            "{code} {ttl",
            "template for locale \"en\": unclosed '{' at byte 7",
        ),
        (
            "stray close",
            "en",
            "{code} }",
            "template for locale \"en\": unmatched '}' at byte 7",
        ),
        (
            "brace in name",
            "en",
            "{a{code}",
            "template for locale \"en\": unknown placeholder {a{code}",
        ),
        (
            "bad locale",
            "e n",
            "{code}",
            "locale \"e n\": not a language tag (ASCII letters and digits separated by '-' or '_')",
        ),
        (
            "empty locale",
            "",
            "{code}",
            "locale \"\": not a language tag (ASCII letters and digits separated by '-' or '_')",
        ),
    ];
    for (name, locale, source, message) in cases {
        let error = parse_templates(&[(locale, source)], locale).unwrap_err();
        assert_eq!(error.to_string(), message, "{name}");
    }

    let long = format!("{{code}} {}", "a".repeat(3 * 153));
    let error = parse_templates(&[("en", &long)], "en").unwrap_err();
    assert!(
        matches!(error, TemplateError::TooLong { segments: 4, .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "template for locale \"en\": a sample with a 10-digit code takes 4 segments, over the limit of 3"
    );
    // Exactly three segments with the 10-digit sample code is still accepted.
    let longest = format!("{{code}}{}", "a".repeat(3 * 153 - 10));
    assert!(parse_templates(&[("en", &longest)], "en").is_ok());

    let error = parse_templates(&[("en", "{code}")], "it").unwrap_err();
    assert_eq!(
        error.to_string(),
        "default locale \"it\": no template for it"
    );

    let error = parse_templates(&[("it", "{code}"), ("IT", "{code}")], "it").unwrap_err();
    assert_eq!(error.to_string(), "locale \"it\": more than one template");
}

#[test]
fn custom_templates_render_placeholders() {
    let templates = parse_templates(
        &[
            ("el", "Ο κωδικός σας: {code} ({ttl_minutes}')"),
            ("de_AT", "Code {code}"),
        ],
        "EL",
    )
    .unwrap();
    assert_eq!(templates.default_locale(), "el");
    let sms = templates.render(
        None,
        &RenderParams {
            ttl_minutes: 5,
            ..params("42")
        },
    );
    assert_eq!(sms.text(), "Ο κωδικός σας: 42 (5')");
    assert_eq!(sms.encoding(), Encoding::Ucs2);
    assert_eq!(
        templates.render(Some("de-at"), &params("42")).text(),
        "Code 42"
    );
    assert_eq!(
        templates.render(Some("de"), &params("42")).encoding(),
        Encoding::Ucs2
    );
}

#[test]
fn locale_fallback() {
    let templates = Templates::builtin();
    let cases = [
        (None, "en"),
        (Some("it"), "it"),
        (Some("IT"), "it"),
        (Some("it-IT"), "it"),
        (Some("it_IT"), "it"),
        (Some("it-it"), "it"),
        (Some("it-Latn-IT"), "it"),
        (Some("en-GB"), "en"),
        (Some("fr"), "en"),
        (Some("fr-IT"), "en"),
        (Some(""), "en"),
        (Some("it-"), "en"),
        (Some("i t"), "en"),
        (Some("ït"), "en"),
    ];
    for (locale, expected) in cases {
        assert_eq!(templates.resolve_locale(locale), expected, "{locale:?}");
        let rendered = templates.render(locale, &params("123456"));
        let reference = templates.render(Some(expected), &params("123456"));
        assert_eq!(rendered.text(), reference.text(), "{locale:?}");
    }
    assert!(templates.has_locale("it"));
    assert!(templates.has_locale("It_it"));
    assert!(templates.has_locale("EN"));
    assert!(!templates.has_locale("fr"));
    assert!(!templates.has_locale(""));

    let italian_default = parse_templates(&[("it", BUILTIN_IT), ("en", BUILTIN_EN)], "IT").unwrap();
    assert_eq!(italian_default.default_locale(), "it");
    assert_eq!(italian_default.resolve_locale(Some("fr")), "it");
    assert_eq!(italian_default.resolve_locale(None), "it");
    assert_eq!(italian_default.resolve_locale(Some("en-US")), "en");
}

#[test]
fn webotp_and_app_hash_lines() {
    let templates = Templates::builtin();
    let base = templates.render(Some("en"), &params("123456")).into_text();

    let both = RenderParams {
        web_origin_host: Some("portal.example.it"),
        app_hash: Some("FA+9qCX9VSu"),
        ..params("123456")
    };
    let sms = templates.render(Some("en"), &both);
    assert_eq!(
        sms.text(),
        format!("{base}\nFA+9qCX9VSu\n@portal.example.it #123456")
    );
    assert_eq!(
        sms.text().lines().last(),
        Some("@portal.example.it #123456")
    );

    let origin_only = RenderParams {
        web_origin_host: Some("a.b:8443"),
        ..params("123456")
    };
    let sms = templates.render(Some("en"), &origin_only);
    assert_eq!(sms.text(), format!("{base}\n@a.b:8443 #123456"));

    let hash_only = RenderParams {
        app_hash: Some("FA+9qCX9VSu"),
        ..params("123456")
    };
    let sms = templates.render(Some("en"), &hash_only);
    assert_eq!(sms.text(), format!("{base}\nFA+9qCX9VSu"));

    // Values that could add arbitrary lines are left out.
    let hostile = RenderParams {
        web_origin_host: Some("evil.example\nClick here"),
        app_hash: Some("FA+9qCX9VS\n"),
        ..params("123456")
    };
    assert_eq!(templates.render(Some("en"), &hostile).text(), base);
    let uppercase = RenderParams {
        web_origin_host: Some("Portal.Example.IT"),
        ..params("123456")
    };
    let sms = templates.render(Some("en"), &uppercase);
    assert_eq!(
        sms.text().lines().last(),
        Some("@portal.example.it #123456")
    );
}

#[test]
fn debug_and_display_redact_the_text() {
    let sms = Templates::builtin().render(Some("en"), &params("987654"));
    for printed in [format!("{sms:?}"), format!("{sms:#?}"), format!("{sms}")] {
        assert!(!printed.contains("987654"), "{printed}");
        assert!(printed.contains("**REDACTED**"), "{printed}");
    }
    assert_eq!(
        format!("{sms:?}"),
        format!(
            "SmsText {{ encoding: Gsm7, units: {}, segments: 1, text: **REDACTED** }}",
            sms.units()
        )
    );
    assert_eq!(sms.to_string(), "**REDACTED** (gsm7, 1 segment)");

    let printed = format!("{:?}", params("987654"));
    assert!(!printed.contains("987654"), "{printed}");
}

#[test]
fn web_otp_host_cases() {
    let labels = vec!["a".repeat(63); 3].join(".");
    let long_host = format!("{labels}.{}", "b".repeat(61));
    let too_long_host = format!("{labels}.{}", "b".repeat(62));
    let cases: Vec<(&str, Result<&str, OriginError>)> = vec![
        ("https://portal.example.it", Ok("portal.example.it")),
        ("https://a.b:8443", Ok("a.b:8443")),
        ("HTTPS://Portal.Example.IT", Ok("portal.example.it")),
        ("https://a.b:443", Ok("a.b")),
        ("https://127.0.0.1", Ok("127.0.0.1")),
        ("https://xn--80ak6aa92e.com", Ok("xn--80ak6aa92e.com")),
        ("http://localhost", Ok("localhost")),
        ("http://localhost:3000", Ok("localhost:3000")),
        ("http://127.0.0.1:8080", Ok("127.0.0.1:8080")),
        ("http://localhost:80", Ok("localhost")),
        ("http://portal.example.it", Err(OriginError::NotHttps)),
        ("ftp://portal.example.it", Err(OriginError::NotHttps)),
        ("portal.example.it", Err(OriginError::NotHttps)),
        ("", Err(OriginError::NotHttps)),
        (" https://a.b", Err(OriginError::NotHttps)),
        ("https://a.b/", Err(OriginError::Path)),
        ("https://a.b/login", Err(OriginError::Path)),
        ("https://a.b?x=1", Err(OriginError::QueryOrFragment)),
        ("https://a.b#top", Err(OriginError::QueryOrFragment)),
        ("https://user@a.b", Err(OriginError::UserInfo)),
        ("https://user:pw@a.b", Err(OriginError::UserInfo)),
        ("https://", Err(OriginError::EmptyHost)),
        ("https://:8443", Err(OriginError::EmptyHost)),
        ("https://a.b:", Err(OriginError::InvalidPort)),
        ("https://a.b:0", Err(OriginError::InvalidPort)),
        ("https://a.b:65536", Err(OriginError::InvalidPort)),
        ("https://a.b:+443", Err(OriginError::InvalidPort)),
        ("https://a.b:1:2", Err(OriginError::InvalidHost)),
        ("https://[::1]", Err(OriginError::InvalidHost)),
        ("https://a..b", Err(OriginError::InvalidHost)),
        ("https://.a.b", Err(OriginError::InvalidHost)),
        ("https://a.b.", Err(OriginError::InvalidHost)),
        ("https://-a.b", Err(OriginError::InvalidHost)),
        ("https://a b.it", Err(OriginError::InvalidHost)),
        ("https://a.b\n", Err(OriginError::InvalidHost)),
        ("https://città.it", Err(OriginError::InvalidHost)),
        ("https://a_b.it", Err(OriginError::InvalidHost)),
        ("https://a.b\\evil", Err(OriginError::InvalidHost)),
    ];
    for (origin, expected) in cases {
        assert_eq!(
            web_otp_host(origin),
            expected.map(str::to_owned),
            "{origin:?}"
        );
    }
    assert_eq!(long_host.len(), 253);
    assert_eq!(
        web_otp_host(&format!("https://{long_host}")),
        Ok(long_host.clone())
    );
    assert_eq!(
        web_otp_host(&format!("https://{too_long_host}")),
        Err(OriginError::HostTooLong { len: 254 })
    );
    assert_eq!(
        web_otp_host(&format!("https://{}.it", "a".repeat(64))),
        Err(OriginError::InvalidHost)
    );
    assert_eq!(
        OriginError::NotHttps.to_string(),
        "web origin: scheme must be https (http only for localhost and 127.0.0.1)"
    );
}

#[test]
fn app_hash_validation() {
    let cases = [
        ("FA+9qCX9VSu", true),
        ("abcdefghijk", true),
        ("0123456789/", true),
        ("FA+9qCX9VS", false),
        ("FA+9qCX9VSu1", false),
        ("FA+9qCX9VS=", false),
        ("FA+9qCX9VS ", false),
        ("FA+9qCX9VSé", false),
        ("", false),
    ];
    for (hash, expected) in cases {
        assert_eq!(is_valid_app_hash(hash), expected, "{hash:?}");
    }
}

fn extension_chars() -> Vec<char> {
    GSM7_EXTENSION.iter().map(|&(c, _)| c).collect()
}

/// Characters that exercise every cost: basic, extension, BMP outside GSM-7, and astral.
fn sms_char() -> impl Strategy<Value = char> {
    prop_oneof![
        8 => prop::sample::select(GSM7_BASIC.to_vec()),
        3 => prop::sample::select(extension_chars()),
        1 => prop::sample::select(vec!['á', 'ç', '`', 'Ж', '中']),
        1 => prop::sample::select(vec!['😀', '𝄞', '🇮']),
    ]
}

/// Text drawn from the GSM-7 alphabet only, so long GSM-7 texts with escapes are common.
fn gsm7_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(GSM7_BASIC.to_vec()),
            1 => prop::sample::select(extension_chars()),
        ],
        0..500,
    )
    .prop_map(|chars| chars.into_iter().filter(|&c| c != '\u{1B}').collect())
}

fn mixed_text() -> impl Strategy<Value = String> {
    prop::collection::vec(sms_char(), 0..300).prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #[test]
    fn segmentation_of_gsm7_text(text in gsm7_text()) {
        check_segmentation(&text);
    }

    #[test]
    fn segmentation_of_mixed_text(text in mixed_text()) {
        check_segmentation(&text);
    }

    #[test]
    fn segmentation_of_any_text(text in "\\PC{0,400}") {
        check_segmentation(&text);
    }

    #[test]
    fn templates_never_panic(source in "[{}a-z_ ]{0,40}", locale in "\\PC{0,8}") {
        if let Ok(templates) = parse_templates(&[(&locale, &source)], &locale) {
            let sms = templates.render(Some(&locale), &params("123456"));
            prop_assert!(sms.text().contains("123456"));
        }
    }

    #[test]
    fn web_otp_host_never_panics(origin in "(https?://)?\\PC{0,40}") {
        if let Ok(host) = web_otp_host(&origin) {
            prop_assert!(!host.is_empty());
            prop_assert_eq!(web_otp_host(&format!("https://{host}")), Ok(host));
        }
    }

    #[test]
    fn webotp_line_is_last(
        host in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20}){0,3}",
        code in "[0-9]{4,10}",
    ) {
        let with_lines = RenderParams {
            web_origin_host: Some(&host),
            app_hash: Some("FA+9qCX9VSu"),
            ..params(&code)
        };
        let sms = Templates::builtin().render(Some("it"), &with_lines);
        let expected = format!("@{host} #{code}");
        prop_assert_eq!(sms.text().lines().last(), Some(expected.as_str()));
    }
}

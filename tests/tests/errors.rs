//! Every error path of the API v1 end to end: its status, its stable code, and the one JSON shape
//! `{"error": {"code", "message"}}` (docs/DESIGN.md section 3), for bad bodies, bad fields, unknown
//! ids, oversized bodies, unknown routes and methods; and proof that no bad request takes the
//! gateway down.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tests::{Answer, FakeCarrier, Gateway, phone};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every error code some test in this binary asserts; [`assert_error`] refuses any other, so the
/// OpenAPI test can check the document against codes really seen over HTTP.
pub(crate) const OBSERVED_CODES: &[&str] = &[
    "malformed_json",
    "invalid_field",
    "invalid_phone",
    "invalid_client_ip",
    "missing_client_ip",
    "invalid_locale",
    "invalid_web_origin",
    "invalid_app_hash",
    "invalid_idempotency_key",
    "invalid_code",
    "invalid_wait",
    "country_not_allowed",
    "not_found",
    "no_route",
    "method_not_allowed",
    "payload_too_large",
    // Asserted by the connections module.
    "body_timeout",
    // Asserted by the api module.
    "unauthorized",
    "not_pending",
    "resend_cooldown",
    "idempotency_key_reused",
    "rate_limited_phone",
    // Asserted by the guessing module.
    "too_many_failed_checks_ip",
    "too_many_failed_checks_client",
];

/// A verification id that is well formed but was never handed out.
pub(crate) const UNKNOWN_ID: &str = "0123456789abcdef0123456789abcdef";

const TIMEOUT: Duration = Duration::from_secs(5);

/// Start bodies that must be refused with 400, with the code and a piece of the message.
const BAD_START_BODIES: &[(&str, &[u8], &str, &str)] = &[
    ("truncated JSON", br#"{"phone": "+39"#, "malformed_json", ""),
    ("an empty body", b"", "malformed_json", ""),
    ("only whitespace", b"  \n ", "malformed_json", ""),
    (
        "not JSON at all",
        b"phone=+393331234567",
        "malformed_json",
        "",
    ),
    (
        "garbage bytes",
        b"\xff\xfe\x00\x80garbage\xc3",
        "malformed_json",
        "",
    ),
    (
        "non-UTF-8 inside a string",
        b"{\"phone\": \"+39333\xff\xfe\"}",
        "malformed_json",
        "",
    ),
    ("a JSON array", b"[\"+393331234567\"]", "invalid_field", ""),
    ("a JSON string", b"\"+393331234567\"", "invalid_field", ""),
    ("a JSON number", b"42", "invalid_field", ""),
    ("JSON null", b"null", "invalid_field", ""),
    ("an empty object", b"{}", "invalid_field", "phone"),
    (
        "a misspelt phone",
        br#"{"phon": "+393331234567"}"#,
        "invalid_field",
        "phon",
    ),
    (
        "an unknown field",
        br#"{"phone": "+393331234567", "colour": "blue"}"#,
        "invalid_field",
        "colour",
    ),
    (
        "a numeric phone",
        br#"{"phone": 393331234567}"#,
        "invalid_field",
        "phone",
    ),
    (
        "a null phone",
        br#"{"phone": null}"#,
        "invalid_field",
        "phone",
    ),
    (
        "a numeric locale",
        br#"{"phone": "+393331234567", "locale": 7}"#,
        "invalid_field",
        "locale",
    ),
];

/// Phone numbers that must be refused with `400 invalid_phone`.
const BAD_PHONES: &[(&str, &str)] = &[
    ("no plus", "393331234567"),
    ("letters", "+39333abc4567"),
    ("too short", "+39333"),
    ("too long", "+3933312345678901234"),
    ("empty", ""),
    ("a plus alone", "+"),
    ("a Rome landline", "+390612345678"),
    ("an Italian premium-rate number", "+39899123456"),
];

/// Optional start fields that must be refused, with the code and the field the message names.
fn bad_optional_fields() -> Vec<(Value, &'static str, &'static str)> {
    let number = phone(700);
    vec![
        (
            json!({"phone": number, "client_ip": "not-an-ip"}),
            "invalid_client_ip",
            "client_ip",
        ),
        (
            json!({"phone": number, "client_ip": "300.1.1.1"}),
            "invalid_client_ip",
            "client_ip",
        ),
        (
            json!({"phone": number, "locale": "it;rm -rf /"}),
            "invalid_locale",
            "locale",
        ),
        (
            json!({"phone": number, "locale": "x".repeat(36)}),
            "invalid_locale",
            "locale",
        ),
        (
            json!({"phone": number, "web_origin": "http://evil.example"}),
            "invalid_web_origin",
            "web_origin",
        ),
        (
            json!({"phone": number, "web_origin": "https://portal.example.it/login"}),
            "invalid_web_origin",
            "web_origin",
        ),
        (
            json!({"phone": number, "web_origin": "https://user@portal.example.it"}),
            "invalid_web_origin",
            "web_origin",
        ),
        (
            json!({"phone": number, "app_hash": "short"}),
            "invalid_app_hash",
            "app_hash",
        ),
        (
            json!({"phone": number, "app_hash": "FA+9qCX9VS\n"}),
            "invalid_app_hash",
            "app_hash",
        ),
    ]
}

/// Asserts that `answer` is the API's error `code` with `status`, in exactly the documented shape.
pub(crate) fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert!(
        OBSERVED_CODES.contains(&code),
        "add {code:?} to OBSERVED_CODES so the OpenAPI test checks it"
    );
    assert_eq!(
        answer.status, status,
        "expected {status} {code}, got {}",
        answer.text
    );
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "an error is JSON: {}",
        answer.text
    );
    let top: Vec<&String> = answer
        .body
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        top,
        ["error"],
        "an error has one top-level key: {}",
        answer.text
    );
    let detail = answer.body["error"]
        .as_object()
        .expect("error is an object");
    let mut keys: Vec<&String> = detail.keys().collect();
    keys.sort();
    assert_eq!(keys, ["code", "message"], "{}", answer.text);
    assert_eq!(answer.error_code(), code, "{}", answer.text);
    let message = answer.body["error"]["message"]
        .as_str()
        .expect("message is a string");
    assert!(
        !message.trim().is_empty(),
        "the message says something: {}",
        answer.text
    );
}

/// The error message of an error answer.
fn message(answer: &Answer) -> &str {
    answer.body["error"]["message"].as_str().unwrap_or("")
}

/// A gateway with one carrier, plus `extra_tables` (TOML tables such as `[limits]`).
async fn gateway(extra_tables: &str) -> (Gateway, FakeCarrier) {
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\nshutdown_grace_secs = 5\n{}\n{extra_tables}",
        carrier.config("alpha", 1000, 10)
    );
    (Gateway::start(&config).await, carrier)
}

/// Posts `body` as it is, bytes and all.
async fn post_raw(gateway: &Gateway, path: &str, body: &[u8]) -> Answer {
    gateway
        .request(Method::POST, path, Some(body.to_vec()), &[])
        .await
}

/// Starts a verification and returns its id, after its SMS reached the carrier.
async fn started(gateway: &Gateway, carrier: &FakeCarrier, number: &str) -> String {
    let answer = gateway.start_verification(number).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let id = answer.id();
    let n_before = carrier.received().len();
    carrier.wait_for(n_before + 1, TIMEOUT).await;
    id
}

/// Sends a request whose body is chunked (no Content-Length) over a raw connection, and returns
/// the status and the JSON body of the answer.
async fn post_chunked(addr: SocketAddr, path: &str, chunks: &[Vec<u8>]) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in chunks {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    // The gateway may answer and close before reading everything; that is its right, so a
    // failed write is not an error here.
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read_all)
        .await
        .expect("the gateway answers a chunked body");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Bodies that are not JSON, not an object, or miss, misspell or mistype a field are refused
/// with 400 and the right code; messages about a field name it.
/// A path segment that is not UTF-8 once decoded names no verification and no carrier: the
/// answer is the API's JSON, `404 not_found` or `401 unauthorized`, never a plain-text 400.
#[tokio::test]
async fn an_undecodable_path_segment_gets_the_apis_json_error() {
    let (gateway, _carrier) = gateway("").await;
    for (method, path, status, code) in [
        (http::Method::GET, "/v1/verifications/%FF", 404, "not_found"),
        (
            http::Method::DELETE,
            "/v1/verifications/%C3%28",
            404,
            "not_found",
        ),
        (
            http::Method::POST,
            "/v1/verifications/%FF/resend",
            404,
            "not_found",
        ),
        (
            http::Method::POST,
            "/v1/carriers/%FF/receipts",
            401,
            "unauthorized",
        ),
    ] {
        let answer = gateway
            .request(method.clone(), path, Some(b"{}".to_vec()), &[])
            .await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.text);
        assert_eq!(
            answer.error_code(),
            code,
            "{method} {path}: {}",
            answer.text
        );
    }
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn bad_start_bodies_are_400_with_the_field_named() {
    let (gateway, _carrier) = gateway("").await;
    let mut unnamed = Vec::new();
    for (what, body, code, names) in BAD_START_BODIES {
        let answer = post_raw(&gateway, "/v1/verifications", body).await;
        assert_error(&answer, 400, code);
        if !message(&answer).contains(names) {
            unnamed.push(format!("{what}: {}", answer.text));
        }
    }
    assert!(
        unnamed.is_empty(),
        "messages that do not name the field: {unnamed:#?}"
    );
    gateway.stop().await.unwrap();
}

/// A body that is JSON but not an object is refused without naming the gateway's internal types
/// (error.rs: a message "never [names] anything internal").
#[tokio::test]
async fn messages_for_non_object_bodies_reveal_no_internals() {
    let (gateway, carrier) = gateway("").await;
    let id = started(&gateway, &carrier, &phone(705)).await;
    let mut revealing = Vec::new();
    for (path, body) in [
        ("/v1/verifications".to_owned(), &b"[1]"[..]),
        ("/v1/verifications".to_owned(), b"\"text\""),
        ("/v1/verifications".to_owned(), b"42"),
        ("/v1/verifications".to_owned(), b"null"),
        ("/v1/verifications".to_owned(), b"true"),
        (format!("/v1/verifications/{id}/check"), b"\"123456\""),
    ] {
        let answer = post_raw(&gateway, &path, body).await;
        assert_error(&answer, 400, "invalid_field");
        let text = message(&answer);
        if text.contains("Body") || text.contains("struct") {
            revealing.push(text.to_owned());
        }
    }
    assert!(
        revealing.is_empty(),
        "messages that name a Rust type: {revealing:#?}"
    );
    gateway.stop().await.unwrap();
}

/// A JSON array is not a body, even one whose items line up with the fields (serde would read
/// it as a struct by position): the API takes JSON objects only (OpenAPI: "Bodies are JSON
/// objects").
#[tokio::test]
async fn json_arrays_are_not_accepted_as_bodies() {
    let (gateway, carrier) = gateway("").await;
    let id = started(&gateway, &carrier, &phone(706)).await;
    let number = phone(707);
    let start = format!(r#"["{number}", null, null, null, null]"#);
    let answer = post_raw(&gateway, "/v1/verifications", start.as_bytes()).await;
    assert_error(&answer, 400, "invalid_field");
    let code = carrier.code_for(&phone(706)).expect("a code in the SMS");
    let check = format!(r#"["{code}"]"#);
    let answer = post_raw(
        &gateway,
        &format!("/v1/verifications/{id}/check"),
        check.as_bytes(),
    )
    .await;
    assert_error(&answer, 400, "invalid_field");
    gateway.stop().await.unwrap();
}

/// An error message never echoes a phone number back unmasked (docs/DESIGN.md section 4: "Phone
/// numbers are masked in logs and responses"), even one sent with the wrong JSON type.
#[tokio::test]
async fn error_messages_never_echo_a_phone_number() {
    let (gateway, _carrier) = gateway("").await;
    let bodies: [&[u8]; 4] = [
        br#"{"phone": 393331234567}"#,
        br#"{"phone": 393331234567.0}"#,
        br#""+393331234567""#,
        br#"{"phone": "+393331234567", "client_ip": 393331234567}"#,
    ];
    for body in bodies {
        let answer = post_raw(&gateway, "/v1/verifications", body).await;
        assert_error(&answer, 400, "invalid_field");
        assert!(
            !answer.text.contains("3331234567"),
            "the answer to {} echoes the phone number: {}",
            String::from_utf8_lossy(body),
            answer.text
        );
    }
    gateway.stop().await.unwrap();
}

/// Check bodies get the same treatment as start bodies, and the message names `code`.
#[tokio::test]
async fn bad_check_bodies_are_400_with_the_field_named() {
    let (gateway, carrier) = gateway("").await;
    let id = started(&gateway, &carrier, &phone(710)).await;
    let path = format!("/v1/verifications/{id}/check");
    let cases: &[(&[u8], &str, &str)] = &[
        (b"{", "malformed_json", ""),
        (b"", "malformed_json", ""),
        (b"\xff\xfe", "malformed_json", ""),
        (b"{}", "invalid_field", "code"),
        (
            br#"{"code": "123456", "phone": "+393331234567"}"#,
            "invalid_field",
            "phone",
        ),
        (br#"{"code": 123456}"#, "invalid_field", "code"),
    ];
    for (body, code, names) in cases {
        let answer = post_raw(&gateway, &path, body).await;
        assert_error(&answer, 400, code);
        assert!(
            message(&answer).contains(names),
            "{:?}: the message names {names:?}: {}",
            String::from_utf8_lossy(body),
            answer.text
        );
    }
    // None of those used up an attempt.
    let read = gateway.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(read.body["attempts_left"], 5, "{}", read.text);
    gateway.stop().await.unwrap();
}

/// Numbers that are not E.164, not valid, or cannot receive SMS are `400 invalid_phone`, and no
/// SMS is sent for them.
#[tokio::test]
async fn invalid_phones_are_400_invalid_phone() {
    let (gateway, carrier) = gateway("").await;
    for (what, number) in BAD_PHONES {
        let answer = gateway.start_verification(number).await;
        assert_error(&answer, 400, "invalid_phone");
        assert!(
            message(&answer).contains("phone"),
            "{what}: {}",
            answer.text
        );
    }
    // A valid number goes through, and is the only SMS the carrier ever sees.
    started(&gateway, &carrier, &phone(720)).await;
    assert_eq!(carrier.received().len(), 1, "{:?}", carrier.received());
    gateway.stop().await.unwrap();
}

/// With `countries = ["IT"]`, a US number is `403 country_not_allowed` and an Italian one passes.
#[tokio::test]
async fn a_country_off_the_allow_list_is_403() {
    let (gateway, carrier) = gateway("[limits]\ncountries = [\"IT\"]\n").await;
    let answer = gateway.start_verification("+12015550123").await;
    assert_error(&answer, 403, "country_not_allowed");
    started(&gateway, &carrier, &phone(730)).await;
    assert!(
        carrier
            .received()
            .iter()
            .all(|sms| sms.to != "+12015550123")
    );
    gateway.stop().await.unwrap();
}

/// An unknown id, well formed or not, is `404 not_found` on every route that takes one, with one
/// and the same body.
#[tokio::test]
async fn unknown_and_malformed_ids_are_404_not_found() {
    let (gateway, _carrier) = gateway("").await;
    let ids = [
        UNKNOWN_ID,
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef",
        "not-an-id",
        "0123456789abcdef0123456789abcdeg",
        "%F0%9F%99%82",
    ];
    let mut bodies = Vec::new();
    for id in ids {
        let path = format!("/v1/verifications/{id}");
        let answers = [
            gateway.get(&path).await,
            gateway.get(&format!("{path}?wait=1")).await,
            gateway.delete(&path).await,
            gateway.check(id, "123456").await,
            gateway.post(&format!("{path}/resend"), json!({})).await,
        ];
        for answer in answers {
            assert_error(&answer, 404, "not_found");
            bodies.push(answer.text);
        }
    }
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        1,
        "every unknown id gets the same body: {bodies:?}"
    );
    gateway.stop().await.unwrap();
}

/// A body over `max_body_bytes` is `413 payload_too_large`, whether its Content-Length says so
/// or it arrives chunked without one.
#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let (gateway, carrier) = gateway("").await;
    let padding = "x".repeat(9000);
    let big = json!({"phone": phone(740), "locale": padding})
        .to_string()
        .into_bytes();
    let answer = post_raw(&gateway, "/v1/verifications", &big).await;
    assert_error(&answer, 413, "payload_too_large");
    assert!(
        message(&answer).contains("8192"),
        "the message names the limit: {}",
        answer.text
    );

    let id = started(&gateway, &carrier, &phone(741)).await;
    let answer = post_raw(&gateway, &format!("/v1/verifications/{id}/check"), &big).await;
    assert_error(&answer, 413, "payload_too_large");

    let chunks: Vec<Vec<u8>> = big.chunks(1000).map(<[u8]>::to_vec).collect();
    let (status, body) = post_chunked(gateway.api, "/v1/verifications", &chunks).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    // A chunked body under the limit is read normally.
    let small = json!({"phone": phone(742)}).to_string().into_bytes();
    let chunks: Vec<Vec<u8>> = small.chunks(5).map(<[u8]>::to_vec).collect();
    let (status, body) = post_chunked(gateway.api, "/v1/verifications", &chunks).await;
    assert_eq!(status, 202, "{body}");
    gateway.stop().await.unwrap();
}

/// Bad optional start fields each get their own code and a message naming the field.
#[tokio::test]
async fn invalid_optional_fields_are_400_and_named() {
    let (gateway, carrier) = gateway("").await;
    for (body, code, field) in bad_optional_fields() {
        let answer = gateway.post("/v1/verifications", body.clone()).await;
        assert_error(&answer, 400, code);
        assert!(message(&answer).contains(field), "{body}: {}", answer.text);
    }
    let long_key = "k".repeat(256);
    for key in ["", "  ", long_key.as_str()] {
        let body = json!({"phone": phone(750)}).to_string().into_bytes();
        let answer = gateway
            .request(
                Method::POST,
                "/v1/verifications",
                Some(body),
                &[("idempotency-key", key)],
            )
            .await;
        assert_error(&answer, 400, "invalid_idempotency_key");
    }
    // Nothing above started a verification.
    started(&gateway, &carrier, &phone(751)).await;
    assert_eq!(carrier.received().len(), 1, "{:?}", carrier.received());
    gateway.stop().await.unwrap();
}

/// A code that is not 6 digits is `400 invalid_code` and does not use up an attempt.
#[tokio::test]
async fn a_malformed_code_is_400_and_uses_no_attempt() {
    let (gateway, carrier) = gateway("").await;
    let number = phone(760);
    let id = started(&gateway, &carrier, &number).await;
    for code in [
        "",
        "12345",
        "1234567",
        "12a456",
        "١٢٣٤٥٦",
        "123 456",
        "+12345",
    ] {
        let answer = gateway.check(&id, code).await;
        assert_error(&answer, 400, "invalid_code");
        assert!(
            message(&answer).contains("code"),
            "{code:?}: {}",
            answer.text
        );
    }
    let read = gateway.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(read.body["attempts_left"], 5, "{}", read.text);
    assert_eq!(read.body["status"], "pending", "{}", read.text);
    // The right code still works: the malformed ones changed nothing.
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let answer = gateway.check(&id, &code).await;
    assert_eq!(
        answer.body,
        json!({"valid": true, "status": "approved", "attempts_left": 5})
    );
    gateway.stop().await.unwrap();
}

/// `?wait=` outside whole seconds 0 to 60 is `400 invalid_wait`.
#[tokio::test]
async fn a_wait_out_of_range_is_400_invalid_wait() {
    let (gateway, carrier) = gateway("").await;
    let id = started(&gateway, &carrier, &phone(770)).await;
    for wait in ["99", "61", "-1", "abc", "1.5", ""] {
        let answer = gateway
            .get(&format!("/v1/verifications/{id}?wait={wait}"))
            .await;
        assert_error(&answer, 400, "invalid_wait");
        assert!(
            message(&answer).contains("wait"),
            "{wait:?}: {}",
            answer.text
        );
    }
    let answer = gateway.get(&format!("/v1/verifications/{id}?wait=0")).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    gateway.stop().await.unwrap();
}

/// An unknown path is `404 no_route` and a known path with the wrong method is
/// `405 method_not_allowed`, both as JSON errors.
#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let (gateway, _carrier) = gateway("").await;
    let body = Some(b"{}".to_vec());
    for (method, path) in [
        (Method::GET, "/"),
        (Method::GET, "/v1/nothing"),
        (Method::POST, "/v2/verifications"),
        (Method::GET, "/v1/verifications/x/y/z"),
        (
            Method::POST,
            &format!("/v1/verifications/{UNKNOWN_ID}/approve"),
        ),
        (Method::GET, "/metrics"),
    ] {
        let answer = gateway
            .request(method.clone(), path, body.clone(), &[])
            .await;
        assert_error(&answer, 404, "no_route");
    }
    for (method, path) in [
        (Method::PUT, "/v1/verifications".to_owned()),
        (Method::GET, "/v1/verifications".to_owned()),
        (Method::DELETE, "/v1/verifications".to_owned()),
        (Method::PATCH, format!("/v1/verifications/{UNKNOWN_ID}")),
        (Method::POST, format!("/v1/verifications/{UNKNOWN_ID}")),
        (Method::GET, format!("/v1/verifications/{UNKNOWN_ID}/check")),
        (
            Method::DELETE,
            format!("/v1/verifications/{UNKNOWN_ID}/resend"),
        ),
        (Method::POST, "/v1/openapi.json".to_owned()),
    ] {
        let answer = gateway
            .request(method.clone(), &path, body.clone(), &[])
            .await;
        assert_error(&answer, 405, "method_not_allowed");
        let allow = answer.header("allow").unwrap_or_default();
        assert!(
            !allow.is_empty(),
            "{method} {path}: a 405 names the allowed methods"
        );
        assert!(
            !allow.contains(method.as_str()),
            "{method} {path}: Allow {allow:?}"
        );
    }
    gateway.stop().await.unwrap();
}

/// A 7 KB phone string (under the body limit) is a clean `400 invalid_phone`, not a panic.
#[tokio::test]
async fn a_huge_phone_string_is_a_clean_400() {
    let (gateway, carrier) = gateway("").await;
    for number in [
        format!("+39{}", "3".repeat(7000)),
        "🙂".repeat(1700),
        format!("+{}", "(".repeat(7000)),
    ] {
        let answer = gateway.start_verification(&number).await;
        assert_error(&answer, 400, "invalid_phone");
        assert!(
            answer.text.len() < 512,
            "the answer does not echo the input: {}",
            answer.text
        );
    }
    started(&gateway, &carrier, &phone(780)).await;
    gateway.stop().await.unwrap();
}

/// After every bad request above, on one gateway, a normal verification still goes end to end,
/// and each 400 on the start route was counted under its route template.
#[tokio::test]
async fn the_gateway_survives_every_bad_request() {
    let (gateway, carrier) = gateway("").await;
    let mut n_start_400 = 0;
    for (_, body, code, _) in BAD_START_BODIES {
        assert_error(
            &post_raw(&gateway, "/v1/verifications", body).await,
            400,
            code,
        );
        n_start_400 += 1;
    }
    for (_, number) in BAD_PHONES {
        assert_error(
            &gateway.start_verification(number).await,
            400,
            "invalid_phone",
        );
        n_start_400 += 1;
    }
    for (body, code, _) in bad_optional_fields() {
        assert_error(&gateway.post("/v1/verifications", body).await, 400, code);
        n_start_400 += 1;
    }
    let huge = format!("+39{}", "3".repeat(7000));
    assert_error(
        &gateway.start_verification(&huge).await,
        400,
        "invalid_phone",
    );
    n_start_400 += 1;
    let big = json!({"phone": phone(790), "locale": "x".repeat(9000)})
        .to_string()
        .into_bytes();
    assert_error(
        &post_raw(&gateway, "/v1/verifications", &big).await,
        413,
        "payload_too_large",
    );
    let chunks: Vec<Vec<u8>> = big.chunks(1000).map(<[u8]>::to_vec).collect();
    assert_eq!(
        post_chunked(gateway.api, "/v1/verifications", &chunks)
            .await
            .0,
        413
    );
    assert_error(
        &gateway
            .get(&format!("/v1/verifications/{UNKNOWN_ID}"))
            .await,
        404,
        "not_found",
    );
    assert_error(&gateway.get("/v1/nothing").await, 404, "no_route");
    let put = gateway
        .request(Method::PUT, "/v1/verifications", None, &[])
        .await;
    assert_error(&put, 405, "method_not_allowed");

    // The gateway still does its job.
    let number = phone(791);
    let id = started(&gateway, &carrier, &number).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let answer = gateway.check(&id, &code).await;
    assert_eq!(
        answer.body,
        json!({"valid": true, "status": "approved", "attempts_left": 5})
    );
    assert!(
        carrier.violations().is_empty(),
        "{:?}",
        carrier.violations()
    );

    let series =
        r#"otpgate_http_requests_total{route="/v1/verifications",method="POST",status="400"}"#;
    let counted = gateway.metric(series).await;
    assert_eq!(counted, Some(f64::from(n_start_400)), "{series}");
    let series =
        r#"otpgate_http_requests_total{route="/v1/verifications",method="POST",status="413"}"#;
    assert_eq!(gateway.metric(series).await, Some(2.0), "{series}");
    gateway.stop().await.unwrap();
}

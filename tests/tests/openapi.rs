//! The OpenAPI document served at `GET /v1/openapi.json` against the gateway that serves it:
//! its paths are exactly the API's routes, every documented route answers, its error codes are
//! the ones the gateway produces, and every `$ref` in it resolves.

use std::collections::BTreeSet;

use http::Method;
use serde_json::Value;
use tests::{FakeCarrier, Gateway};

use crate::errors::{OBSERVED_CODES, UNKNOWN_ID};

/// The gateway sources that build error answers: every code the document lists must appear in
/// one of them as a string literal.
const ERROR_SOURCES: &[(&str, &str)] = &[
    (
        "gateway/src/error.rs",
        include_str!("../../gateway/src/error.rs"),
    ),
    (
        "gateway/src/citizen_ip.rs",
        include_str!("../../gateway/src/citizen_ip.rs"),
    ),
    (
        "gateway/src/routes.rs",
        include_str!("../../gateway/src/routes.rs"),
    ),
    (
        "gateway/src/verifier/mod.rs",
        include_str!("../../gateway/src/verifier/mod.rs"),
    ),
    (
        "gateway/src/verifier/rules.rs",
        include_str!("../../gateway/src/verifier/rules.rs"),
    ),
];

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

async fn gateway() -> Gateway {
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{}",
        carrier.config("alpha", 1000, 10)
    );
    Gateway::start(&config).await
}

/// Fetches the document and checks it is served as JSON.
async fn document(gateway: &Gateway) -> Value {
    let answer = gateway.get("/v1/openapi.json").await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(
        answer.body.is_object(),
        "not a JSON object: {}",
        answer.text
    );
    answer.body
}

/// Every `(METHOD, path)` operation the document describes.
fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let paths = document["paths"].as_object().expect("paths is an object");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("a path item is an object");
            item.keys()
                .filter(|key| HTTP_METHODS.contains(&key.as_str()))
                .map(move |method| (method.to_ascii_uppercase(), path.clone()))
        })
        .collect()
}

/// Every `$ref` value anywhere in `value`, with the JSON pointer of where it was found.
fn refs(value: &Value, at: &str, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                let here = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                match (key.as_str(), child) {
                    ("$ref", Value::String(target)) => found.push((here, target.clone())),
                    _ => refs(child, &here, found),
                }
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                refs(child, &format!("{at}/{index}"), found);
            }
        }
        _ => {}
    }
}

/// The codes of the `Error` schema's `error.code` enum.
fn error_codes(document: &Value) -> BTreeSet<String> {
    document
        .pointer("/components/schemas/Error/properties/error/properties/code/enum")
        .and_then(Value::as_array)
        .expect("the Error schema lists its codes")
        .iter()
        .map(|code| code.as_str().expect("codes are strings").to_owned())
        .collect()
}

/// The document is OpenAPI 3 JSON, served with `application/json`.
#[tokio::test]
async fn the_document_is_openapi_3_json() {
    let gateway = gateway().await;
    let document = document(&gateway).await;
    let version = document["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3."), "openapi {version:?}");
    assert!(document["info"]["title"].is_string());
    assert!(document["info"]["version"].is_string());
    assert_eq!(
        document,
        serde_json::from_str::<Value>(gateway::routes::OPENAPI_JSON).unwrap()
    );
    gateway.stop().await.unwrap();
}

/// The document's operations are exactly `gateway::routes::API_ROUTES`, no more and no fewer.
#[tokio::test]
async fn the_documented_paths_are_exactly_the_api_routes() {
    let gateway = gateway().await;
    let documented = operations(&document(&gateway).await);
    let routed: BTreeSet<(String, String)> = gateway::routes::API_ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(
        gateway::routes::API_ROUTES.len(),
        routed.len(),
        "API_ROUTES has duplicates"
    );
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the document: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented operations that are not routes: {unrouted:?}"
    );
    gateway.stop().await.unwrap();
}

/// Every documented operation, called over HTTP with its method (and an unknown id for `{id}`),
/// reaches a handler: never `no_route` nor `method_not_allowed`.
#[tokio::test]
async fn every_documented_route_is_served() {
    let gateway = gateway().await;
    let operations = operations(&document(&gateway).await);
    assert!(!operations.is_empty());
    for (method, path) in operations {
        let url = path.replace("{id}", UNKNOWN_ID);
        let method = Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let body = (method == Method::POST).then(|| b"{}".to_vec());
        let answer = gateway.request(method.clone(), &url, body, &[]).await;
        assert!(
            answer.status != 405
                && !["no_route", "method_not_allowed"].contains(&answer.error_code()),
            "{method} {url} is documented but not served: {} {}",
            answer.status,
            answer.text
        );
        assert!(
            answer.body.is_object(),
            "{method} {url} answers JSON: {}",
            answer.text
        );
    }
    gateway.stop().await.unwrap();
}

/// Every error code the tests observed over HTTP is listed in the `Error` schema, and every code
/// listed there is one the gateway's error-building code can produce.
#[tokio::test]
async fn the_error_schema_lists_the_codes_the_gateway_produces() {
    let gateway = gateway().await;
    let listed = error_codes(&document(&gateway).await);
    let missing: Vec<&&str> = OBSERVED_CODES
        .iter()
        .filter(|code| !listed.contains(**code))
        .collect();
    assert!(
        missing.is_empty(),
        "codes seen over HTTP but not in the Error schema: {missing:?}"
    );
    let invented: Vec<&String> = listed
        .iter()
        .filter(|code| {
            let literal = format!("\"{code}\"");
            !ERROR_SOURCES
                .iter()
                .any(|(_, source)| source.contains(&literal))
        })
        .collect();
    let files: Vec<&str> = ERROR_SOURCES.iter().map(|(file, _)| *file).collect();
    assert!(
        invented.is_empty(),
        "codes in the Error schema that none of {files:?} produces: {invented:?}"
    );
    gateway.stop().await.unwrap();
}

/// Every `$ref` in the document is local and resolves inside it, and every response of every
/// operation resolves to a description (and, with content, a schema).
#[tokio::test]
async fn every_ref_resolves_inside_the_document() {
    let gateway = gateway().await;
    let document = document(&gateway).await;
    let mut found = Vec::new();
    refs(&document, "", &mut found);
    assert!(!found.is_empty(), "the document uses $ref");
    for (at, target) in &found {
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{at}: {target} is not local"));
        assert!(
            document.pointer(pointer).is_some(),
            "{at}: {target} does not resolve"
        );
    }

    let resolve = |value: &Value| -> Value {
        let mut value = value.clone();
        while let Some(target) = value.get("$ref").and_then(Value::as_str) {
            value = document
                .pointer(&target[1..])
                .cloned()
                .unwrap_or(Value::Null);
        }
        value
    };
    for (method, path) in operations(&document) {
        let operation = &document["paths"][&path][method.to_ascii_lowercase()];
        let responses = operation["responses"]
            .as_object()
            .expect("an operation has responses");
        assert!(!responses.is_empty(), "{method} {path} has no responses");
        for (status, response) in responses {
            let response = resolve(response);
            let place = format!("{method} {path} {status}");
            assert!(
                response["description"].is_string(),
                "{place}: no description"
            );
            if let Some(content) = response.get("content").and_then(Value::as_object) {
                for (media_type, media) in content {
                    let schema = resolve(&media["schema"]);
                    assert!(
                        schema.is_object(),
                        "{place} {media_type}: the schema does not resolve"
                    );
                }
            }
        }
    }
    gateway.stop().await.unwrap();
}

/// A body made of the first example of every property a request schema documents.
fn example_body(document: &Value, schema: &str) -> Value {
    let properties = document["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{schema} has properties"));
    properties
        .iter()
        .map(|(name, property)| {
            let example = property["examples"][0].clone();
            assert!(!example.is_null(), "{schema}.{name} has no example");
            (name.clone(), example)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Every field the request schemas document is one the gateway takes: a start and a check sent
/// with all of their documented fields are served, not refused as unknown fields.
#[tokio::test]
async fn the_documented_request_fields_are_accepted() {
    let gateway = gateway().await;
    let document = document(&gateway).await;
    let started = gateway
        .post("/v1/verifications", example_body(&document, "StartRequest"))
        .await;
    assert_eq!(started.status, 202, "{}", started.text);
    let checked = gateway
        .post(
            &format!("/v1/verifications/{}/check", started.id()),
            example_body(&document, "CheckRequest"),
        )
        .await;
    assert_eq!(checked.status, 200, "{}", checked.text);
    assert!(checked.body["valid"].is_boolean(), "{}", checked.text);
    gateway.stop().await.unwrap();
}

//! API errors and their one mapping to HTTP responses.
//!
//! Every error a frontend can see is an [`ApiError`] variant with a stable machine code, a
//! status and a message that names what was wrong (a field, a limit) but never anything internal,
//! and never whether a phone number is known. 4xx are not logged; 5xx are logged once, here.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::config::Rule;

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("missing or unknown API key")]
    Unauthorized,
    #[error("numbers in this country are not allowed")]
    CountryNotAllowed,
    #[error("no configured carrier serves this number")]
    NumberNotServed,
    #[error("no such verification")]
    NotFound,
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("verification is {status}, no longer pending")]
    NotPending { status: &'static str },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body was not complete within `body_timeout_ms` of the request's headers.
    #[error("request body did not arrive in time")]
    BodyTimeout,
    #[error("Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    #[error("{message}")]
    RateLimited {
        code: &'static str,
        message: &'static str,
        retry_after: Duration,
        rule: Option<Rule>,
    },
    /// `overloaded` (the queue is full, or busy for a moment), or `come_back_later` (the SMS
    /// would wait longer than the queue's `max_wait`: refused at once, to try again later).
    #[error("{message}")]
    Overloaded {
        code: &'static str,
        message: &'static str,
        retry_after: Duration,
    },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("the store is unreachable; try again shortly")]
    StoreUnavailable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

// === impl ApiError ===

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::CountryNotAllowed | ApiError::NumberNotServed => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotPending { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded { .. } | ApiError::ShuttingDown | ApiError::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::CountryNotAllowed => "country_not_allowed",
            ApiError::NumberNotServed => "number_not_served",
            ApiError::NotFound => "not_found",
            ApiError::NoRoute => "no_route",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::NotPending { .. } => "not_pending",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::IdempotencyMismatch => "idempotency_key_reused",
            ApiError::RateLimited { code, .. } => code,
            ApiError::Overloaded { code, .. } => code,
            ApiError::ShuttingDown => "shutting_down",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(error) = &self {
            tracing::error!(error = %format!("{error:#}"), "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        let retry_after = match &self {
            ApiError::RateLimited { retry_after, .. }
            | ApiError::Overloaded { retry_after, .. } => Some(*retry_after),
            ApiError::ShuttingDown | ApiError::StoreUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        };
        if let Some(retry_after) = retry_after {
            // Whole seconds, rounded up, and never 0: a client told "0" retries at once.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let secs = secs.max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if let ApiError::RateLimited {
                rule: Some(rule), ..
            } = &self
            {
                // draft-ietf-httpapi-ratelimit-headers: the policy that refused, nothing left,
                // and when to come back.
                headers.insert("ratelimit-limit", HeaderValue::from(rule.max.get()));
                headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
                headers.insert("ratelimit-reset", HeaderValue::from(secs));
                if let Ok(policy) =
                    HeaderValue::from_str(&format!("{};w={}", rule.max, rule.per.as_secs()))
                {
                    headers.insert("ratelimit-policy", policy);
                }
            }
        }
        response
    }
}

impl From<crate::ratelimit::Rejection> for ApiError {
    fn from(rejection: crate::ratelimit::Rejection) -> ApiError {
        use crate::ratelimit::LimitKind;
        let (code, message) = match rejection.limit {
            LimitKind::Phone => (
                "rate_limited_phone",
                "too many SMS to this phone number; try again later",
            ),
            LimitKind::Ip => (
                "rate_limited_ip",
                "too many verifications from this IP address; try again later",
            ),
            LimitKind::Client => (
                "rate_limited_client",
                "this API key is over its request rate",
            ),
            LimitKind::FailedChecks => (
                "too_many_failed_checks",
                "too many wrong codes for this phone number; try again later",
            ),
            LimitKind::ResendCooldown => (
                "resend_cooldown",
                "a resend is not allowed yet; see Retry-After",
            ),
            LimitKind::CountryRate => (
                "rate_limited_country",
                "too many verifications to this country's numbers; try again later",
            ),
            LimitKind::PrefixRate => (
                "rate_limited_prefix",
                "too many verifications to numbers of this range; try again later",
            ),
            LimitKind::Budget => (
                "budget_exhausted",
                "the SMS budget for this client or country is spent; try again later",
            ),
            LimitKind::FraudGuard => (
                "fraud_suspected",
                "verifications to numbers of this range are paused: almost none are completed; \
                 try again later",
            ),
            LimitKind::Country => (
                "country_not_allowed",
                "numbers in this country are not allowed",
            ),
            LimitKind::FailedChecksIp => (
                "too_many_failed_checks_ip",
                "too many wrong codes from this IP address; try again later",
            ),
            LimitKind::FailedChecksClient => (
                "too_many_failed_checks_client",
                "too many wrong codes through this API key; try again later",
            ),
        };
        ApiError::RateLimited {
            code,
            message,
            retry_after: rejection.retry_after,
            rule: Some(rejection.rule),
        }
    }
}

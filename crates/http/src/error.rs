//! Every HTTP error the server returns, and the one table that maps them to status codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use ortserve_core::app::InferError;

/// An error answered to a client. Bodies are `{"error": "...", "error_type": "..."}`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(test, derive(strum::EnumIter))]
pub(crate) enum ApiError {
    /// The body is not valid JSON or not a valid request of the protocol.
    MalformedBody(String),
    /// Well-formed, but does not fit the model: input name, dtype, shape, element count.
    InvalidInput(String),
    /// Auth is on and the request has no valid bearer token.
    Unauthorized,
    /// No such route.
    NotFound(String),
    /// The route exists, for other methods.
    MethodNotAllowed,
    /// The body did not arrive within `body_timeout` (or the request's deadline).
    RequestTimeout(String),
    /// A request head over the connection's read buffer (the connection is then closed).
    HeadTooLarge {
        bytes: usize,
        limit: usize,
    },
    ModelNotFound(String),
    VersionNotFound {
        model: String,
        version: String,
    },
    PayloadTooLarge {
        limit: u64,
    },
    /// An image (or the number of images) over a configured limit.
    ImageTooLarge(String),
    UnsupportedMediaType(String),
    QueueFull(String),
    /// Not ready, draining, or no healthy device.
    Unavailable(String),
    DeadlineExceeded,
    /// A model run failed; details are logged with the request id, never returned.
    Internal,
}

impl ApiError {
    /// The status table: one row per variant. Documented in README.md ("Errors").
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedBody(_) | ApiError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_)
            | ApiError::ModelNotFound(_)
            | ApiError::VersionNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::PayloadTooLarge { .. } | ApiError::ImageTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable name for the error.
    pub(crate) fn error_type(&self) -> &'static str {
        match self {
            ApiError::MalformedBody(_) => "malformed_body",
            ApiError::InvalidInput(_) => "invalid_input",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::HeadTooLarge { .. } => "header_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::ModelNotFound(_) | ApiError::VersionNotFound { .. } => "model_not_found",
            ApiError::PayloadTooLarge { .. } | ApiError::ImageTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::QueueFull(_) => "queue_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DeadlineExceeded => "deadline_exceeded",
            ApiError::Internal => "internal",
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            ApiError::MalformedBody(m)
            | ApiError::InvalidInput(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::NotFound(m)
            | ApiError::ImageTooLarge(m) => m.clone(),
            ApiError::ModelNotFound(m) => format!("unknown model {m:?}"),
            ApiError::VersionNotFound { model, version } => {
                format!("model {model:?} has no version {version:?}")
            }
            ApiError::PayloadTooLarge { limit } => {
                format!("request body is larger than the limit of {limit} bytes")
            }
            ApiError::QueueFull(m) => m.clone(),
            ApiError::HeadTooLarge { bytes, limit } => {
                format!("the request head has {bytes} bytes; the limit is {limit}")
            }
            ApiError::RequestTimeout(m) => m.clone(),
            ApiError::Unavailable(m) => m.clone(),
            ApiError::Unauthorized => {
                "a valid `Authorization: Bearer <token>` header is required".into()
            }
            ApiError::MethodNotAllowed => {
                "this route does not take that method; the Allow header lists those it takes".into()
            }
            ApiError::DeadlineExceeded => {
                "the request's deadline passed before it could be answered".into()
            }
            ApiError::Internal => {
                "the model run failed; the server log has details under this request's x-request-id"
                    .into()
            }
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> ApiError {
        match e {
            InferError::Input(_)
            | InferError::TooManyRows { .. }
            | InferError::Rejected(_)
            | InferError::InvalidImage(_) => ApiError::InvalidInput(e.to_string()),
            InferError::ImageTooLarge(m) => ApiError::ImageTooLarge(m),
            InferError::QueueFull(_) => ApiError::QueueFull(e.to_string()),
            InferError::DeadlineExceeded => ApiError::DeadlineExceeded,
            InferError::NoHealthyDevice(_) | InferError::ShuttingDown => {
                ApiError::Unavailable(e.to_string())
            }
            InferError::RunFailed(_) | InferError::Reassembly(_) => {
                tracing::error!(error = %e, "inference failed");
                ApiError::Internal
            }
        }
    }
}

/// Seconds a client should wait after a 429 or a 503.
pub(super) const RETRY_AFTER_SECS: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({"error": self.message(), "error_type": self.error_type()});
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
            // As hyper does for a head that fills its buffer: the connection is not reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // 429 and 503 are both worth a retry: say when.
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status table of README.md ("Errors"), row by row.
    pub(crate) fn table() -> Vec<(ApiError, u16, &'static str)> {
        vec![
            (ApiError::MalformedBody("x".into()), 400, "malformed_body"),
            (ApiError::InvalidInput("x".into()), 400, "invalid_input"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::NotFound("x".into()), 404, "not_found"),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
            (ApiError::RequestTimeout("x".into()), 408, "request_timeout"),
            (
                ApiError::HeadTooLarge { bytes: 2, limit: 1 },
                431,
                "header_too_large",
            ),
            (ApiError::ModelNotFound("m".into()), 404, "model_not_found"),
            (
                ApiError::VersionNotFound {
                    model: "m".into(),
                    version: "2".into(),
                },
                404,
                "model_not_found",
            ),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                413,
                "payload_too_large",
            ),
            (
                ApiError::ImageTooLarge("x".into()),
                413,
                "payload_too_large",
            ),
            (
                ApiError::UnsupportedMediaType("x".into()),
                415,
                "unsupported_media_type",
            ),
            (ApiError::QueueFull("x".into()), 429, "queue_full"),
            (ApiError::Unavailable("x".into()), 503, "unavailable"),
            (ApiError::DeadlineExceeded, 504, "deadline_exceeded"),
            (ApiError::Internal, 500, "internal"),
        ]
    }

    #[test]
    fn every_variant_is_listed() {
        // `iter` yields every variant (derived, so a new one is in it at once); each must have
        // a row above.
        use strum::IntoEnumIterator;
        let listed: Vec<_> = table()
            .iter()
            .map(|(e, _, _)| std::mem::discriminant(e))
            .collect();
        for variant in ApiError::iter() {
            assert!(
                listed.contains(&std::mem::discriminant(&variant)),
                "{variant:?} has no row in the status table"
            );
        }
    }

    #[tokio::test]
    async fn status_table() {
        use http_body_util::BodyExt;
        for (e, status, kind) in table() {
            let resp = e.clone().into_response();
            assert_eq!(resp.status().as_u16(), status, "{e:?}");
            assert_eq!(
                resp.headers().contains_key(header::RETRY_AFTER),
                status == 429 || status == 503,
                "{e:?}"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error_type"], kind);
            assert!(!v["error"].as_str().unwrap().is_empty());
        }
    }

    #[test]
    fn internal_details_are_not_returned() {
        let e = ApiError::from(InferError::RunFailed("CUDA error 700 at 0xdeadbeef".into()));
        assert_eq!(e, ApiError::Internal);
        assert!(!e.message().contains("deadbeef"));
        let e = ApiError::from(InferError::Rejected("idx=99 out of range".into()));
        assert!(matches!(e, ApiError::InvalidInput(m) if m.contains("idx=99")));
    }
}

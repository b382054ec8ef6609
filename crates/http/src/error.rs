//! The HTTP front door's one table: every [`CallError`] to its status code, with the body and
//! headers each answer carries.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use ortserve_core::app::InferError;
pub(crate) use ortserve_core::call::CallError;

/// A [`CallError`] answered over HTTP. Bodies are `{"error": "...", "error_type": "..."}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError(pub(crate) CallError);

impl ApiError {
    /// The status table: one row per error. Documented in README.md ("Errors").
    pub(crate) fn status(&self) -> StatusCode {
        match &self.0 {
            CallError::MalformedBody(_) | CallError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            CallError::Unauthorized => StatusCode::UNAUTHORIZED,
            CallError::NotFound(_)
            | CallError::ModelNotFound(_)
            | CallError::VersionNotFound { .. } => StatusCode::NOT_FOUND,
            CallError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            CallError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            CallError::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            CallError::PayloadTooLarge { .. } | CallError::ImageTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            CallError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            CallError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            CallError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            CallError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            CallError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> ApiError {
        ApiError(e)
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> ApiError {
        ApiError(e.into())
    }
}

/// Seconds a client should wait after a 429 or a 503.
pub(super) const RETRY_AFTER_SECS: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({"error": self.0.message(), "error_type": self.0.error_type()});
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
    pub(crate) fn table() -> Vec<(CallError, u16, &'static str)> {
        vec![
            (CallError::MalformedBody("x".into()), 400, "malformed_body"),
            (CallError::InvalidInput("x".into()), 400, "invalid_input"),
            (CallError::Unauthorized, 401, "unauthorized"),
            (CallError::NotFound("x".into()), 404, "not_found"),
            (CallError::MethodNotAllowed, 405, "method_not_allowed"),
            (
                CallError::RequestTimeout("x".into()),
                408,
                "request_timeout",
            ),
            (
                CallError::HeadTooLarge { bytes: 2, limit: 1 },
                431,
                "header_too_large",
            ),
            (CallError::ModelNotFound("m".into()), 404, "model_not_found"),
            (
                CallError::VersionNotFound {
                    model: "m".into(),
                    version: "2".into(),
                },
                404,
                "model_not_found",
            ),
            (
                CallError::PayloadTooLarge { limit: 10 },
                413,
                "payload_too_large",
            ),
            (
                CallError::ImageTooLarge("x".into()),
                413,
                "payload_too_large",
            ),
            (
                CallError::UnsupportedMediaType("x".into()),
                415,
                "unsupported_media_type",
            ),
            (CallError::QueueFull("x".into()), 429, "queue_full"),
            (CallError::Unavailable("x".into()), 503, "unavailable"),
            (CallError::DeadlineExceeded, 504, "deadline_exceeded"),
            (CallError::Internal, 500, "internal"),
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
        for variant in CallError::iter() {
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
            let resp = ApiError(e.clone()).into_response();
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
        let ApiError(e) =
            ApiError::from(InferError::RunFailed("CUDA error 700 at 0xdeadbeef".into()));
        assert_eq!(e, CallError::Internal);
        assert!(!e.message().contains("deadbeef"));
        let ApiError(e) = ApiError::from(InferError::Rejected("idx=99 out of range".into()));
        assert!(matches!(e, CallError::InvalidInput(m) if m.contains("idx=99")));
    }
}

//! The one table from the request core's error kinds to gRPC status codes (README.md, "gRPC").

use ortserve_core::call::{CallError, ErrorKind};
use tonic::{Code, Status};

/// The gRPC code for an error kind. Clients' default retry policies retry `UNAVAILABLE` (the
/// server is loading, draining or shedding load) and nothing else; `RESOURCE_EXHAUSTED` (a full
/// queue) is retried by clients configured to.
pub(crate) fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Unimplemented => Code::Unimplemented,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The status a call that failed with `e` ends with: its kind's code and its message.
pub fn status_of(e: &CallError) -> Status {
    Status::new(code_of(e.kind()), e.message())
}

/// The code's name as the metrics label it (`OK`, `INVALID_ARGUMENT`, ...).
pub(crate) fn label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    /// Every error the core can give maps to a code that says what a client may do next: only
    /// the kinds a retry can cure are UNAVAILABLE or RESOURCE_EXHAUSTED.
    #[test]
    fn every_core_error_has_its_code() {
        for e in CallError::iter() {
            let s = status_of(&e);
            let retry = matches!(s.code(), Code::Unavailable | Code::ResourceExhausted);
            let curable = matches!(
                e.kind(),
                ErrorKind::Unavailable | ErrorKind::ResourceExhausted
            );
            assert_eq!(retry, curable, "{e:?} → {:?}", s.code());
            assert_ne!(s.code(), Code::Ok, "{e:?}");
            assert_eq!(s.message(), e.message());
        }
    }
}

//! The API's errors: one enum, one JSON body (`{"error":"<code>","message":"..."}`), one
//! `recover` that turns every rejection (ours and warp's) into it.
//!
//! Internal failures are logged here, once, and reach the client only as `unavailable`.

use std::convert::Infallible;

use thiserror::Error;
use tracing::{debug, error};
use warp::http::StatusCode;
use warp::reject::Rejection;
use warp::reply::{Reply, Response};

use crate::model::{InvalidJobId, InvalidUpdate};
use crate::store::StoreError;
use crate::subscription::SubscriptionError;
use crate::writer::WriteError;

#[derive(Clone, Debug, Error)]
pub enum ApiError {
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidBody(String),
    #[error("a batch holds at most {1} updates, got {0}")]
    BatchTooLarge(usize, usize),
    #[error(transparent)]
    InvalidJobId(#[from] InvalidJobId),
    #[error("cursor {0:?} is not a job id from a previous page")]
    InvalidCursor(String),
    #[error("resume point {0:?} is not a non-negative integer")]
    InvalidLastEventId(String),
    #[error(transparent)]
    Unauthorized(#[from] crate::auth::AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error(transparent)]
    JobFinished(WriteError),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("temporarily unavailable, try again")]
    Unavailable,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidBody(_)
            | ApiError::BatchTooLarge(..)
            | ApiError::InvalidJobId(_)
            | ApiError::InvalidCursor(_)
            | ApiError::InvalidLastEventId(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::JobNotFound(_) | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::JobFinished(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidBody(_) | ApiError::BatchTooLarge(..) => "invalid_body",
            ApiError::InvalidJobId(_) => "invalid_job_id",
            ApiError::InvalidCursor(_) => "invalid_cursor",
            ApiError::InvalidLastEventId(_) => "invalid_last_event_id",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::JobNotFound(_) => "job_not_found",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::JobFinished(_) => "job_finished",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unavailable => "unavailable",
        }
    }

    /// The JSON body, as text (WebSocket `error` frames reuse it).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.code(), "message": self.to_string()})
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let mut res = warp::reply::with_status(warp::reply::json(&self.body()), self.status())
            .into_response();
        if matches!(self, ApiError::Unavailable) {
            res.headers_mut().insert(
                warp::http::header::RETRY_AFTER,
                warp::http::HeaderValue::from_static("1"),
            );
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            res.headers_mut().insert(
                warp::http::header::WWW_AUTHENTICATE,
                warp::http::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

impl From<InvalidUpdate> for ApiError {
    fn from(e: InvalidUpdate) -> ApiError {
        ApiError::InvalidBody(e.to_string())
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::JobFinished(_) => ApiError::JobFinished(e),
            WriteError::Unavailable => ApiError::Unavailable,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        error!(error = %e, "store read failed");
        ApiError::Unavailable
    }
}

impl From<crate::backup::BackupError> for ApiError {
    fn from(e: crate::backup::BackupError) -> ApiError {
        error!(error = %e, "export failed");
        ApiError::Unavailable
    }
}

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> ApiError {
        match e {
            SubscriptionError::Store(e) => e.into(),
            SubscriptionError::Write(e) => e.into(),
        }
    }
}

/// Turns an [`ApiError`] into a rejection, for `and_then` handlers.
pub fn reject(e: ApiError) -> Rejection {
    warp::reject::custom(e)
}

/// The one place rejections become responses.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let err = if let Some(e) = rejection.find::<ApiError>() {
        return Ok(e.clone().into_response());
    } else if rejection.is_not_found() {
        ApiError::NotFound
    } else if let Some(e) = rejection.find::<warp::cors::CorsForbidden>() {
        ApiError::Forbidden(format!("CORS: {e}"))
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::PayloadTooLarge(0)
    } else if rejection
        .find::<warp::reject::UnsupportedMediaType>()
        .is_some()
    {
        ApiError::UnsupportedMediaType
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::InvalidBody(e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::MissingHeader>() {
        // The WebSocket endpoints without an upgrade request land here.
        ApiError::InvalidBody(format!("{e}; this endpoint expects a WebSocket upgrade"))
    } else {
        // A request warp refused for a reason we do not name (e.g. a WebSocket endpoint
        // called without a proper upgrade).
        debug!(?rejection, "unhandled rejection");
        ApiError::InvalidBody(
            "the request does not fit this endpoint (WebSocket endpoints expect an upgrade \
             request)"
                .into(),
        )
    };
    Ok(err.into_response())
}

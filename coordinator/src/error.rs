//! The one place where query errors become HTTP statuses and gRPC codes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chainidx_core::chain::AddressError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<AddressError> for ApiError {
    fn from(error: AddressError) -> ApiError {
        ApiError::BadRequest(error.to_string())
    }
}

impl From<tonic::Status> for ApiError {
    /// A worker's answer: its own client errors are ours too; anything else means the shard is not serving.
    fn from(status: tonic::Status) -> ApiError {
        let message = format!("worker: {}", status.message());
        match status.code() {
            tonic::Code::InvalidArgument => ApiError::BadRequest(message),
            tonic::Code::NotFound => ApiError::NotFound(message),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                ApiError::Unavailable(message)
            }
            _ => ApiError::Internal(message),
        }
    }
}

impl ApiError {
    pub fn http_status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_) | ApiError::Unavailable(_)) {
            tracing::warn!(error = %self, "query failed");
        }
        let body =
            serde_json::json!({"error": self.to_string(), "status": self.http_status().as_u16()});
        (self.http_status(), Json(body)).into_response()
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> tonic::Status {
        let message = error.to_string();
        match error {
            ApiError::BadRequest(_) => tonic::Status::invalid_argument(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

//! Error bodies in each server's own shape.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::cli::Flavor;

/// An error with an OpenAI `type` and `code`; rendered per flavor.
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequestError", message)
    }

    pub fn model_not_found(requested: &str) -> Self {
        Self {
            code: Some("model_not_found"),
            param: Some("model"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{requested}` does not exist."),
            )
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Invalid API key",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            message,
        )
    }

    pub fn render(&self, flavor: Flavor) -> Response {
        let code = self
            .code
            .map_or_else(|| json!(self.status.as_u16()), |code| json!(code));
        let body: Value = match flavor {
            Flavor::Sglang => json!({
                "object": "error",
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": code,
            }),
            Flavor::Tabbyapi => json!({ "detail": self.message }),
            // vLLM 0.32 names a model it does not serve `NotFoundError` with its status as the
            // code (the gateway turns that into OpenAI's `model_not_found`).
            Flavor::Vllm if self.code == Some("model_not_found") => json!({
                "error": {
                    "message": self.message,
                    "type": "NotFoundError",
                    "param": self.param,
                    "code": self.status.as_u16(),
                }
            }),
            Flavor::Vllm => json!({
                "error": {
                    "message": self.message,
                    "type": self.kind,
                    "param": self.param,
                    "code": code,
                }
            }),
            Flavor::LlamaServer => json!({
                "error": {
                    "code": code,
                    "message": self.message,
                    "type": self.kind,
                }
            }),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

//! Errors as HTTP responses: OpenAI's JSON shape on the OpenAI routes
//! (`{"error": {"message", "type", "param", "code"}}`), Ollama's (`{"error": "..."}`) on
//! its routes, with the status code and, when busy, `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API's error shape to answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Ollama,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    pub flavor: Flavor,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            code: None,
            param: None,
            retry_after: None,
            flavor: Flavor::OpenAi,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    pub fn flavor(mut self, flavor: Flavor) -> ApiError {
        self.flavor = flavor;
        self
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            s if s.is_client_error() => "invalid_request_error",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable_error",
            _ => "server_error",
        }
    }

    /// The body as JSON.
    pub fn body(&self) -> serde_json::Value {
        match self.flavor {
            Flavor::Ollama => json!({ "error": self.message }),
            Flavor::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": self.kind(),
                    "param": self.param,
                    "code": self.code,
                }
            }),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl ApiError {
    /// The error as a client may see it: a server-side failure (500) is
    /// logged with its detail (file paths, engine messages) under a new request id, and the
    /// client gets a generic message naming that id; other errors pass unchanged.
    pub fn for_client(self) -> ApiError {
        if self.status != StatusCode::INTERNAL_SERVER_ERROR {
            return self;
        }
        let id = crate::gen::new_id("req");
        tracing::error!(request_id = %id, status = self.status.as_u16(), "{}", self.message);
        ApiError {
            message: format!("internal server error (request id {id}; details in the server log)"),
            ..self
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.for_client();
        let mut r = (e.status, axum::Json(e.body())).into_response();
        if let Some(s) = e.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl From<capy_engine::Error> for ApiError {
    fn from(e: capy_engine::Error) -> ApiError {
        use capy_engine::Error as E;
        match &e {
            E::PromptTooLong { .. } => ApiError::bad_request(e.to_string())
                .code("context_length_exceeded")
                .param("messages"),
            E::TooManyChoices { .. } => ApiError::bad_request(e.to_string())
                .code("too_many_choices")
                .param("n"),
            E::EmptyPrompt | E::BadToken { .. } | E::Template(_) | E::Tokenizer(_) => {
                ApiError::bad_request(e.to_string())
            }
            E::QueueFull { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
                .code("queue_full")
                .retry_after(1),
            E::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).retry_after(1)
            }
            _ => ApiError::internal(e.to_string()),
        }
    }
}

/// Parses a JSON request body of a route without a field table: nulls mean "not given",
/// malformed input is a 400 that says what is wrong (axum's own extractor answers in plain
/// text).
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    flavor: Flavor,
) -> Result<T, ApiError> {
    crate::params::parse(body, &[], flavor)
}

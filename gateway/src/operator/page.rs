//! The status page (`/ui/`): its files, built into the binary.

use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};

pub(super) async fn ui_redirect() -> Response {
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/ui/")]).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page is open (it holds no data): it asks for a key when the API wants one.
pub(super) async fn ui_page() -> Response {
    asset("text/html; charset=utf-8", include_str!("../ui/index.html"))
}

pub(super) async fn ui_script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    )
}

pub(super) async fn ui_style() -> Response {
    asset("text/css; charset=utf-8", include_str!("../ui/style.css"))
}

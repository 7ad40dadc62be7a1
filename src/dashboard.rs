//! The dashboard: one self-contained page (`dashboard/index.html`: HTML, CSS and JS inline,
//! nothing fetched from elsewhere) built into the binary and served at `/`.
//!
//! The page is the reference browser client of the API: it lists the jobs and follows them
//! live over `/v1/stream`, shows one job's history and stream, and asks for a token when the
//! API answers 401. This module owns only the page's bytes and the headers it is served
//! with; the page holds no data, so serving it needs no token (the API calls it makes are
//! checked like any other client's).

use warp::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use warp::http::HeaderValue;
use warp::reply::{Reply, Response};

/// The page, as built into the binary.
pub const PAGE: &str = include_str!("dashboard/index.html");

/// The page's only script and style are inline and it talks to nothing but the daemon that
/// served it: nothing may load from elsewhere, and it may not be framed.
pub const CSP: &str = "default-src 'none'; \
    script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// GET / (and HEAD /): the page, revalidated on every load so an upgraded daemon serves its
/// own page at once.
pub fn page() -> Response {
    let mut res = warp::reply::html(PAGE).into_response();
    let headers = res.headers_mut();
    for (name, value) in [
        (CACHE_CONTROL, "no-cache"),
        (CONTENT_SECURITY_POLICY, CSP),
        (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // The page's URL may carry `?access_token=`.
        (REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    res
}

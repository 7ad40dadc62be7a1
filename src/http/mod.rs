//! HTTP: the routes of the API (v1), as warp filters.
//!
//! Each filter is named for its resource and documented with its route line; handlers are in
//! [`jobs`] (REST), `sse.rs` and `ws.rs` (streams). Paths are matched before methods so that a
//! known path with the wrong method is `405`, not `404`. Every rejection ends in
//! [`error::recover`], which writes the contract's JSON error body.

pub mod error;
pub mod jobs;

use std::convert::Infallible;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use warp::filters::path::FullPath;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

use crate::auth::{Auth, Grant};
use crate::config::Config;
use crate::model::JobId;
use crate::subscription::Source;
use crate::supervisor::Supervisor;
use crate::{sse, ws};
use error::ApiError;

/// What every handler shares: a handle, one reference count to clone (warp clones it into
/// every request).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What an [`AppState`] handle points to.
pub struct Shared {
    pub src: Source,
    pub config: Arc<Config>,
    pub supervisor: Supervisor,
    pub auth: Auth,
}

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// All routes, with CORS when origins are configured, and errors recovered into JSON bodies.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let origins = state.config.cors_origins.clone();
    let api = probes(state.clone())
        .or(job_events(state.clone()))
        .unify()
        .or(job_stream(state.clone()))
        .unify()
        .or(job_ws(state.clone()))
        .unify()
        .or(job(state.clone()))
        .unify()
        .or(jobs(state.clone()))
        .unify()
        .or(stream(state.clone()))
        .unify()
        .or(ws_many(state.clone()))
        .unify()
        .or(export(state))
        .unify()
        .or(openapi())
        .unify()
        .or(dashboard())
        .unify()
        .or(wrong_method())
        .unify();
    if origins.is_empty() {
        // No CORS filter at all: a same-origin page's requests carry an Origin header too,
        // and must not be refused for it.
        return api.recover(error::recover).unify().boxed();
    }
    let cors = warp::cors()
        .allow_origins(origins.iter().map(String::as_str))
        .allow_methods(["GET", "POST", "DELETE", "OPTIONS"])
        .allow_headers([
            "authorization",
            "content-type",
            "idempotency-key",
            "last-event-id",
        ])
        .allow_credentials(true)
        .max_age(600);
    api.with(cors)
        .map(Reply::into_response)
        .recover(error::recover)
        .unify()
        .boxed()
}

fn with_state(state: AppState) -> impl Filter<Extract = (AppState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The raw query string, empty when there is none.
fn raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// The grant of the request's token: `Authorization: Bearer`, else `?access_token=`, else
/// the `progressd_token` cookie.
fn grant(state: AppState) -> impl Filter<Extract = (Grant,), Error = warp::Rejection> + Clone {
    // Headers read as bytes: a cookie or header that is not plain text must not fail the
    // request when it is not ours to read.
    warp::header::headers_cloned().and(raw_query()).and_then(
        move |headers: warp::http::HeaderMap, query: String| {
            let auth = state.auth.clone();
            async move {
                let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
                let from_header = text("authorization").and_then(|h| {
                    let (scheme, token) = h.split_once(' ')?;
                    scheme
                        .eq_ignore_ascii_case("bearer")
                        .then(|| token.trim().to_owned())
                });
                let from_cookie = || {
                    headers.get_all("cookie").iter().find_map(|v| {
                        String::from_utf8_lossy(v.as_bytes())
                            .split(';')
                            .filter_map(|kv| kv.trim().split_once('='))
                            .find(|(k, _)| *k == "progressd_token")
                            .map(|(_, v)| v.to_owned())
                    })
                };
                let token = from_header
                    .or_else(|| {
                        query_value(&query_pairs(&query), "access_token").map(str::to_owned)
                    })
                    .or_else(from_cookie);
                auth.grant(token.as_deref())
                    .map_err(|e| error::reject(ApiError::Unauthorized(e)))
            }
        },
    )
}

/// Handlers return `Result<Response, ApiError>`; warp wants rejections.
macro_rules! handle {
    ($call:expr) => {
        async move { $call.await.map_err(error::reject) }
    };
}

/// GET /healthz, GET /readyz, GET /metrics
fn probes(state: AppState) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_owned()));
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state.clone()))
        .map(|state: AppState| {
            if state.supervisor.health().is_ready() {
                json_response(StatusCode::OK, r#"{"status":"ready"}"#.to_owned())
            } else {
                ApiError::Unavailable.into_response()
            }
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: AppState| jobs::metrics(&state));
    healthz.or(readyz).unify().or(metrics).unify()
}

/// POST /v1/jobs/{job}/events  (publish one update or a batch)
/// GET  /v1/jobs/{job}/events?after=N&limit=L  (history)
fn job_events(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let path = warp::path!("v1" / "jobs" / String / "events");
    // Read raw, so that a header that is not valid text is our 400, not warp's rejection.
    let headers = warp::header::headers_cloned().map(jobs::PublishHeaders::from);
    let publish = path
        .and(warp::post())
        .and(grant(state.clone()))
        .and(headers)
        .and(warp::body::stream())
        .and(with_state(state.clone()))
        .and_then(|job, grant, headers, body, state| {
            handle!(jobs::publish(job, grant, headers, body, state))
        });
    let history = path
        .and(warp::get())
        .and(grant(state.clone()))
        .and(raw_query())
        .and(with_state(state))
        .and_then(|job, grant, query, state| handle!(jobs::history(job, grant, query, state)));
    publish.or(history).unify()
}

/// GET    /v1/jobs/{job}  (snapshot)
/// DELETE /v1/jobs/{job}
fn job(state: AppState) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let path = warp::path!("v1" / "jobs" / String);
    let get = path
        .and(warp::get())
        .and(grant(state.clone()))
        .and(with_state(state.clone()))
        .and_then(|job, grant, state| handle!(jobs::snapshot(job, grant, state)));
    let delete = path
        .and(warp::delete())
        .and(grant(state.clone()))
        .and(with_state(state))
        .and_then(|job, grant, state| handle!(jobs::delete(job, grant, state)));
    get.or(delete).unify()
}

/// GET /v1/jobs?status=&prefix=&limit=&cursor=
fn jobs(state: AppState) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "jobs")
        .and(warp::get())
        .and(grant(state.clone()))
        .and(raw_query())
        .and(with_state(state))
        .and_then(|grant, query, state| handle!(jobs::list(grant, query, state)))
}

/// GET /v1/jobs/{job}/stream  (Server-Sent Events; resume with Last-Event-ID or ?after=)
fn job_stream(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "jobs" / String / "stream")
        .and(warp::get())
        .and(grant(state.clone()))
        .and(warp::header::optional::<String>("last-event-id"))
        .and(raw_query())
        .and(with_state(state))
        .and_then(|job, grant, last, query, state| {
            handle!(sse::job_stream(job, grant, last, query, state))
        })
}

/// GET /v1/stream?job=a&job=b | ?prefix=p  (Server-Sent Events for many jobs, ids are offsets)
fn stream(state: AppState) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "stream")
        .and(warp::get())
        .and(grant(state.clone()))
        .and(warp::header::optional::<String>("last-event-id"))
        .and(raw_query())
        .and(with_state(state))
        .and_then(|grant, last, query, state| handle!(sse::many_stream(grant, last, query, state)))
}

/// GET /v1/jobs/{job}/ws?after=N  (WebSocket for one job)
fn job_ws(state: AppState) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "jobs" / String / "ws")
        .and(warp::get())
        .and(grant(state.clone()))
        .and(raw_query())
        .and(with_state(state))
        .and_then(|job, grant, query, state| handle!(ws::check_job(job, grant, query, state)))
        .and(ws::upgrade())
        .map(ws::job_session)
}

/// GET /v1/ws  (WebSocket for many jobs, subscribed by message)
fn ws_many(state: AppState) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "ws")
        .and(warp::get())
        .and(grant(state.clone()))
        .and(with_state(state))
        .and(ws::upgrade())
        .map(ws::many_session)
}

/// Any route with a method it does not serve: `405` with the `Allow` header (RFC 9110).
/// Tried last, so it only answers what every route above refused.
fn wrong_method() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and_then(|method: Method, path: FullPath| async move {
            match allowed_methods(path.as_str()) {
                Some(allowed) if !allowed.contains(&method) => {
                    let allow = allowed
                        .iter()
                        .map(Method::as_str)
                        .collect::<Vec<_>>()
                        .join(", ");
                    let mut res = ApiError::MethodNotAllowed.into_response();
                    if let Ok(value) = warp::http::HeaderValue::from_str(&allow) {
                        res.headers_mut().insert(warp::http::header::ALLOW, value);
                    }
                    Ok(res)
                }
                Some(_) | None => Err(warp::reject::not_found()),
            }
        })
}

/// The methods each route serves (mirrors the filters above).
fn allowed_methods(path: &str) -> Option<&'static [Method]> {
    const GET: &[Method] = &[Method::GET];
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        [""] => Some(&[Method::GET, Method::HEAD]),
        ["healthz"] | ["readyz"] | ["metrics"] => Some(GET),
        ["v1", "jobs"] | ["v1", "stream"] | ["v1", "ws"] => Some(GET),
        ["v1", "admin", "export"] | ["v1", "openapi.json"] => Some(GET),
        ["v1", "jobs", _, "stream"] | ["v1", "jobs", _, "ws"] => Some(GET),
        ["v1", "jobs", _, "events"] => Some(&[Method::GET, Method::POST]),
        ["v1", "jobs", _] => Some(&[Method::GET, Method::DELETE]),
        _ => None,
    }
}

/// GET /v1/openapi.json  (the API's OpenAPI 3.1 description, kept in openapi/)
fn openapi() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    const DOC: &str = include_str!("../../openapi/openapi.json");
    warp::path!("v1" / "openapi.json")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, DOC.to_owned()))
}

/// GET / and HEAD /  (the dashboard page; it needs no token, its API calls do)
fn dashboard() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path::end()
        .and(warp::get().or(warp::head()).unify())
        .map(crate::dashboard::page)
}

/// GET /v1/admin/export?cursor=&limit=  (a page of the backup, as JSON lines)
fn export(state: AppState) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "admin" / "export")
        .and(warp::get())
        .and(grant(state.clone()))
        .and(raw_query())
        .and(with_state(state))
        .and_then(|grant, query, state| handle!(jobs::export(grant, query, state)))
}

/// A job id from a path segment: percent-decoded (browsers send `:` as `%3A`), then validated.
pub fn job_from_path(raw: &str) -> Result<JobId, ApiError> {
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::InvalidJobId(crate::model::InvalidJobId(raw.to_owned())))?;
    Ok(JobId::parse(&decoded)?)
}

/// `name=value` pairs of a query string, decoded.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The value of the last `name=` in `pairs`.
pub fn query_value<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A resume point: the `Last-Event-ID` header wins over `?after=`; either must be a
/// non-negative integer.
pub fn resume_point(header: Option<&str>, after: Option<&str>) -> Result<Option<u64>, ApiError> {
    match header.or(after) {
        None => Ok(None),
        Some(raw) => parse_u64(raw)
            .map(Some)
            .ok_or_else(|| ApiError::InvalidLastEventId(raw.chars().take(64).collect())),
    }
}

/// Digits only: no sign, no spaces.
pub fn parse_u64(raw: &str) -> Option<u64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

/// A JSON body we rendered ourselves.
pub fn json_response(status: StatusCode, body: String) -> Response {
    warp::reply::with_status(
        warp::reply::with_header(body, "content-type", "application/json"),
        status,
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_points() {
        assert_eq!(resume_point(None, None).unwrap(), None);
        assert_eq!(resume_point(Some("7"), Some("3")).unwrap(), Some(7));
        assert_eq!(resume_point(None, Some("3")).unwrap(), Some(3));
        for bad in ["-1", "+1", "x", "", " 1", "1.0", "99999999999999999999999"] {
            assert!(resume_point(Some(bad), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_ids_in_paths_are_decoded() {
        assert_eq!(job_from_path("a%3Ab").unwrap().as_str(), "a:b");
        assert!(job_from_path("a%2Fb").is_err());
        assert!(job_from_path("%FF").is_err());
    }
}

//! What wraps the router when `ouro serve` runs it: request ids (header and
//! tracing span), CORS, API keys, the concurrency cap and the per-request
//! timeout. Each is a layer around [`crate::router`], configured by
//! [`GuardArgs`] (flags of `ouro serve`).
//!
//! Layer order, outermost first: request id (so every answer, errors
//! included, carries `x-request-id` and every log line of the request its
//! span), CORS (preflights are answered before any key check), API key,
//! limits (concurrency, timeout), then the routes.
//!
//! The API-key layer resolves every request to a [`Caller`] (see
//! [`crate::access`]) that routes read to decide what it may do; it refuses
//! only what needs a key at all (the API, when API keys are configured).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tracing::Instrument;

use crate::access::{self, Caller, KeyRing};
use crate::errors::ApiError;

/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// Security and limit flags of `ouro serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GuardArgs {
    /// An API key clients must send (`Authorization: Bearer <key>`) on the
    /// /v1 routes and /tokenize, /detokenize (repeatable; comma-separated in
    /// OURO_API_KEY). Without any key those routes are open. These keys may
    /// read experience libraries but not change them.
    #[arg(long = "api-key", env = "OURO_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line, each optionally followed by its
    /// scopes: `KEY scopes=experiences:write,admin` (blank lines and `#`
    /// comments skipped).
    #[arg(long, env = "OURO_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Require an API key for GET /metrics too (/health stays open).
    #[arg(long, env = "OURO_PROTECT_METRICS")]
    pub protect_metrics: bool,
    /// An origin browsers may call the API from (CORS; repeatable; `*` for any).
    #[arg(long = "cors-allow-origin", env = "OURO_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,
    /// Most seconds a request may take (streams are ended at the deadline;
    /// 0: no limit). An expired non-streamed request answers 504.
    #[arg(long, env = "OURO_REQUEST_TIMEOUT_S", default_value_t = 0)]
    pub request_timeout_s: u64,
    /// Most completion requests served at once (streams count until they
    /// end); beyond it, 429 with Retry-After (0: no limit beyond --max-waiting).
    #[arg(long, env = "OURO_MAX_CONCURRENT", default_value_t = 0)]
    pub max_concurrent: usize,
    /// Seconds running requests get to finish after SIGTERM or ctrl-c before
    /// they are cancelled.
    #[arg(long, env = "OURO_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace: u64,
}

impl GuardArgs {
    /// Every credential: `--api-key` values (no scopes), the lines of
    /// `--api-key-file` with their scopes, and `admin_key`.
    pub fn key_ring(&self, admin_key: Option<&str>) -> anyhow::Result<KeyRing> {
        let mut keys: Vec<(String, Vec<access::Scope>)> =
            self.api_keys.iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).map(|k| (k, Vec::new())).collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", path.display()))?;
            let file = access::parse_key_file(&text).map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", path.display()))?;
            anyhow::ensure!(!file.is_empty(), "--api-key-file {} holds no key", path.display());
            keys.extend(file);
        }
        Ok(KeyRing::new(keys, admin_key.map(str::trim).map(str::to_string)))
    }
}

/// The resolved configuration the layers share.
#[derive(Debug)]
struct Guard {
    ring: KeyRing,
    protect_metrics: bool,
    timeout: Option<Duration>,
    slots: Option<Arc<Semaphore>>,
    max_concurrent: usize,
}

/// Wraps `router` in the request-id, CORS, API-key and limit layers;
/// `ring` is every credential the server accepts.
pub fn apply(router: Router, args: &GuardArgs, ring: KeyRing) -> anyhow::Result<Router> {
    if ring.has_api_keys() {
        tracing::info!(keys = ring.api_keys(), protect_metrics = args.protect_metrics, "API keys required on /v1, /tokenize, /detokenize");
    }
    let guard = Arc::new(Guard {
        ring,
        protect_metrics: args.protect_metrics,
        timeout: (args.request_timeout_s > 0).then(|| Duration::from_secs(args.request_timeout_s)),
        slots: (args.max_concurrent > 0).then(|| Arc::new(Semaphore::new(args.max_concurrent))),
        max_concurrent: args.max_concurrent,
    });
    let mut app = router.layer(middleware::from_fn_with_state(guard.clone(), limits)).layer(middleware::from_fn_with_state(guard, auth));
    if let Some(cors) = cors(&args.cors_allow_origins)? {
        app = app.layer(cors);
    }
    Ok(app.layer(middleware::from_fn(request_id)))
}

fn cors(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::from(Any)
    } else {
        let list = origins
            .iter()
            .map(|o| HeaderValue::from_str(o.trim()).map_err(|e| anyhow::anyhow!("--cors-allow-origin {o:?}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE, Method::OPTIONS])
            .allow_headers(Any)
            .expose_headers([HeaderName::from_static(REQUEST_ID), HeaderName::from_static("retry-after")])
            .max_age(Duration::from_secs(600)),
    ))
}

/// Whether `path` is an API route that needs a key when keys are set.
fn needs_key(path: &str, protect_metrics: bool) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize" || (protect_metrics && path == "/metrics")
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

async fn auth(State(g): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let caller = g.ring.caller(bearer(req.headers()));
    let guarded = g.ring.has_api_keys() && req.method() != Method::OPTIONS && needs_key(req.uri().path(), g.protect_metrics);
    if guarded && !caller.is_authenticated() {
        let msg =
            if caller.sent_a_key() { "the API key is not valid" } else { "an API key is required: send `Authorization: Bearer <key>`" };
        return ApiError::Unauthorized(msg.into()).into_response();
    }
    req.extensions_mut().insert::<Caller>(caller);
    next.run(req).await
}

/// Whether `path` is a generation route (counted by `--max-concurrent`).
fn is_generation(path: &str) -> bool {
    path == "/v1/completions" || path == "/v1/chat/completions"
}

async fn limits(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let api = needs_key(path, false);
    let permit = match (&g.slots, is_generation(path)) {
        (Some(slots), true) => match slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return ApiError::Overloaded(format!(
                    "{} completion requests are running already (--max-concurrent); retry later",
                    g.max_concurrent
                ))
                .into_response()
            }
        },
        _ => None,
    };
    let deadline = g.timeout.filter(|_| api).map(|t| (t, tokio::time::Instant::now() + t));
    let resp = match deadline {
        Some((t, at)) => match tokio::time::timeout_at(at, next.run(req)).await {
            Ok(r) => r,
            Err(_) => {
                return ApiError::Timeout(format!("the request took longer than {} s (--request-timeout-s)", t.as_secs())).into_response()
            }
        },
        None => next.run(req).await,
    };
    if (permit.is_none() && deadline.is_none()) || !is_stream(&resp) {
        return resp;
    }
    // The permit is held, and the deadline applies, until the body ends
    // (a stream ends at the deadline; dropping it cancels its sequences).
    let (parts, body) = resp.into_parts();
    let stream = body.into_data_stream();
    let stream = match deadline {
        Some((_, at)) => stream.take_until(tokio::time::sleep_until(at)).boxed(),
        None => stream.boxed(),
    };
    let stream = stream.map(move |chunk| {
        let _held = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Whether `resp` is a server-sent event stream (other bodies are complete
/// when the handler returns, and keep their Content-Length).
fn is_stream(resp: &Response) -> bool {
    resp.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"))
}

/// A client's request id if it is sane (1 to 128 visible ASCII characters
/// from a conservative set), else a fresh one.
fn request_id_of(req: &Request) -> String {
    let given = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or("");
    let sane = !given.is_empty()
        && given.len() <= 128
        && given.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'='));
    if sane {
        given.to_string()
    } else {
        uuid::Uuid::new_v4().simple().to_string()
    }
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = request_id_of(&req);
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID, v);
    }
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    // Probes and scrapes are logged at debug level only.
    let quiet = matches!(req.uri().path(), "/health" | "/metrics");
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        let (status, ms) = (resp.status().as_u16(), started.elapsed().as_secs_f64() * 1e3);
        if quiet {
            tracing::debug!(status, ms, "answered");
        } else {
            tracing::info!(status, ms, "answered");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    if !is_stream(&resp) {
        return resp;
    }
    // Log lines written while the body streams belong to the request too.
    let (parts, body) = resp.into_parts();
    let mut inner = body.into_data_stream();
    let stream = futures::stream::poll_fn(move |cx| {
        let _enter = span.enter();
        inner.poll_next_unpin(cx)
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_api_routes_need_a_key() {
        assert!(needs_key("/v1/chat/completions", false));
        assert!(needs_key("/v1/models", false));
        assert!(needs_key("/tokenize", false));
        assert!(!needs_key("/health", true));
        assert!(!needs_key("/metrics", false));
        assert!(needs_key("/metrics", true));
        assert!(!needs_key("/v1x", false));
        assert!(!needs_key("/admin/speculator", false));
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let with = |v: &str| Request::builder().header(REQUEST_ID, v).body(Body::empty()).unwrap();
        assert_eq!(request_id_of(&with("abc-123_x.y")), "abc-123_x.y");
        assert_eq!(request_id_of(&with(&"a".repeat(129))).len(), 32);
        assert_eq!(request_id_of(&with("bad id\twith spaces")).len(), 32);
        assert_eq!(request_id_of(&Request::builder().body(Body::empty()).unwrap()).len(), 32);
    }
}

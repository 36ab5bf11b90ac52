//! The CS's HTTPS server: TCP accept, a bounded rustls handshake, HTTP/1.1 through hyper
//! with the axum router. Every `/api/` request's body is read up to
//! [`BODY_BYTES_MAX`] and its signature checked against those exact bytes before any
//! handler runs; the passphrase principal is checked with the passphrase key, a machine
//! principal with that machine's credential from the database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::db::Db;
use super::metrics::Metrics;
use super::{now_ms, CsConfig, CsError};
use crate::control::api::{self, ApiError, BODY_BYTES_MAX};
use crate::control::auth::{self, AuthError, Principal};
use crate::control::{parse_version, VERSION};
use crate::protocol::auth::AuthKey;

/// A TLS handshake that takes longer is dropped (a stalled client holds no slot).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; beyond that a new connection is closed at once.
pub const CONNECTIONS_MAX: usize = 4096;

/// Who made a request, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    Passphrase,
    Machine(String),
    /// The status page's view token: `GET /api/v1/status` only.
    Viewer,
}

#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

struct AppState {
    db: Db,
    key: AuthKey,
    metrics: Metrics,
    heartbeat_interval_seconds: u64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self)).into_response()
    }
}

fn unauthorized(e: impl std::fmt::Display) -> ApiError {
    ApiError::new("unauthorized", e.to_string())
}

/// A running configuration server.
pub struct ConfigServer {
    /// Where it listens (the port it picked when told port 0).
    pub local_addr: SocketAddr,
    /// Its TLS certificate (PEM): what callers pin.
    pub cert_pem: String,
    view_token: String,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
    state: Arc<AppState>,
}

impl ConfigServer {
    /// Opens (and migrates) the database, loads or creates the TLS identity, and starts
    /// serving on `config.listen`.
    pub async fn start(config: CsConfig) -> Result<ConfigServer, CsError> {
        crate::control::check_passphrase(&config.passphrase)?;
        let key = AuthKey::from_passphrase(&config.passphrase);
        let (tls, cert_pem) = crate::tls::server_config(&config.tls_dir, &config.tls_names)?;
        let db = Db::open(&config.db, config.heartbeat_timeout).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| CsError::Listen { address: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| CsError::Listen { address: config.listen, source })?;
        let state = Arc::new(AppState {
            db,
            metrics: Metrics::new()?,
            heartbeat_interval_seconds: (config.heartbeat_timeout.as_secs() / 5).clamp(1, 60),
            key: key.clone(),
        });
        let router = router(state.clone());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(listener, tokio_rustls::TlsAcceptor::from(tls), router, stop_rx));
        tracing::info!(%local_addr, db = ?state.db.backend(), "configuration server listening");
        Ok(ConfigServer {
            local_addr,
            cert_pem,
            view_token: auth::status_view_token(&key),
            stop: Some(stop),
            task: Some(task),
            state,
        })
    }

    /// The token the status page reads from its URL (`/status#view=TOKEN`).
    pub fn status_view_token(&self) -> String {
        self.view_token.clone()
    }

    /// Stops accepting, closes every connection and the database.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.state.db.close().await;
    }
}

impl Drop for ConfigServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => a,
        };
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{CONNECTIONS_MAX} connections open: refusing another");
            continue;
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        connections.spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                router.clone().oneshot(req.map(Body::new))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    connections.shutdown().await;
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(api::PATH_PS_REGISTER, post(ps_register))
        .route(api::PATH_PS_HEARTBEAT, post(ps_heartbeat))
        .route(api::PATH_PS_UNREGISTER, post(ps_unregister))
        .route(api::PATH_PS_DECOMMISSION, post(ps_decommission))
        .route(api::PATH_MACHINE_REGISTER, post(machine_register))
        .route(api::PATH_MACHINE_ASSIGNMENT, get(machine_assignment))
        .route(api::PATH_MACHINE_REASSIGN, post(machine_reassign))
        .route(api::PATH_MIGRATE, post(migrate))
        .route(api::PATH_STATUS, get(status))
        .route(api::PATH_STATUS_PAGE, get(status_page))
        .route(api::PATH_METRICS, get(metrics))
        .fallback(|| async { ApiError::new("not_found", "no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The endpoint label of a path (known paths only, so a scan cannot grow the metrics).
fn endpoint_of(path: &str) -> &'static str {
    [
        api::PATH_PS_REGISTER,
        api::PATH_PS_HEARTBEAT,
        api::PATH_PS_UNREGISTER,
        api::PATH_PS_DECOMMISSION,
        api::PATH_MACHINE_REGISTER,
        api::PATH_MACHINE_ASSIGNMENT,
        api::PATH_MACHINE_REASSIGN,
        api::PATH_MIGRATE,
        api::PATH_STATUS,
        api::PATH_STATUS_PAGE,
        api::PATH_METRICS,
    ]
    .into_iter()
    .find(|p| *p == path)
    .unwrap_or("other")
}

async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = endpoint_of(req.uri().path());
    let response = next.run(req).await;
    st.metrics.observe_request(endpoint, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// Reads the body (capped), and for `/api/` checks the signature or view token and
/// records the caller for the handler.
async fn authenticate(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let peer = parts.extensions.get::<Peer>().map(|p| p.0);
    let bytes = match axum::body::to_bytes(body, BODY_BYTES_MAX).await {
        Ok(b) => b,
        Err(_) => {
            let e = ApiError::bad_request(format!("request body over {BODY_BYTES_MAX} bytes (or unreadable)"));
            return (StatusCode::PAYLOAD_TOO_LARGE, Json(e)).into_response();
        }
    };
    if !parts.uri.path().starts_with("/api/") {
        return next.run(Request::from_parts(parts, Body::from(bytes))).await;
    }
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let caller = match check(&st, &parts.method, &path_and_query, header, &bytes).await {
        Ok(c) => c,
        // The database failing (a nonce not recorded) is not the caller's fault: 503, which
        // clients retry, not 401, which agents take as final.
        Err(CheckError::Db(e)) => {
            tracing::error!(peer = ?peer, method = %parts.method, path = %path_and_query, "cannot check a request: {e}");
            return ApiError::new("unavailable", format!("the configuration server cannot check requests now: {e}"))
                .into_response();
        }
        Err(e) => {
            tracing::warn!(peer = ?peer, method = %parts.method, path = %path_and_query, "refused a request: {e}");
            return unauthorized(e).into_response();
        }
    };
    parts.extensions.insert(caller);
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the status view token grants GET {} only", api::PATH_STATUS)]
    ViewOnly,
    #[error("authentication failed")]
    BadToken,
    #[error("database: {0}")]
    Db(#[from] CsError),
}

async fn check(st: &AppState, method: &Method, path: &str, header: &str, body: &[u8]) -> Result<Caller, CheckError> {
    if header.is_empty() {
        return Err(AuthError::Missing.into());
    }
    if let Some(token) = header.strip_prefix("Bearer ") {
        if *method != Method::GET || path != api::PATH_STATUS {
            return Err(CheckError::ViewOnly);
        }
        return if auth::verify_status_view_token(&st.key, token.trim()) {
            Ok(Caller::Viewer)
        } else {
            Err(CheckError::BadToken)
        };
    }
    let sig = auth::parse(header)?;
    let (key, caller) = match &sig.principal {
        Principal::Passphrase => (st.key.clone(), Caller::Passphrase),
        Principal::Machine(name) => {
            // An unknown or released machine fails like a wrong MAC: no name oracle.
            let credential = st.db.machine_credential(name).await?;
            let mut bytes = [0u8; 32];
            match credential.map(|c| hex::decode_to_slice(c, &mut bytes)) {
                Some(Ok(())) => (AuthKey::from_bytes(bytes), Caller::Machine(name.clone())),
                _ => return Err(AuthError::BadMac.into()),
            }
        }
    };
    sig.verify(&key, method.as_str(), path, body)?;
    // Recorded in the database, not in this process: a replay to any CS instance sharing
    // it is refused.
    if !st.db.remember_nonce(&sig.nonce, sig.nonce_expires_at(), auth::now_unix()).await? {
        return Err(AuthError::Replayed.into());
    }
    Ok(caller)
}

/// Operator and process-server endpoints take the passphrase.
fn need_passphrase(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Passphrase => Ok(()),
        _ => Err(unauthorized("this endpoint takes the passphrase")),
    }
}

fn json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

type Reply<T> = Result<Json<T>, ApiError>;

/// Logs a refusal (info) or failure (error, in `to_api`) and makes it the reply.
fn refused(what: &str, e: CsError) -> ApiError {
    let api = e.to_api();
    if api.code != "internal" {
        tracing::info!("{what} refused: {api}");
    }
    api
}

async fn ps_register(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Reply<api::PsRegistered> {
    need_passphrase(&c)?;
    let reg: api::PsRegistration = json(&body)?;
    api::check_name("process server id", &reg.id)?;
    check_version(&reg.id, &reg.version)?;
    if reg.address.trim().is_empty() || reg.address.len() > 256 {
        return Err(ApiError::bad_request("address: host:port, at most 256 characters"));
    }
    // Agents will pin this certificate: refuse one they could not use.
    crate::tls::client_config(&reg.cert_pem)
        .map_err(|e| ApiError::bad_request(format!("cert_pem is not a usable certificate: {e}")))?;
    st.db.register_ps(&reg, now_ms()).await.map_err(|e| refused("register", e))?;
    tracing::info!(ps = %reg.id, address = %reg.address, version = %reg.version, "process server registered");
    Ok(Json(api::PsRegistered {
        cs_version: VERSION.to_string(),
        heartbeat_interval_seconds: st.heartbeat_interval_seconds,
    }))
}

/// The seed's rule: a process server newer than the CS is refused.
fn check_version(id: &str, version: &str) -> Result<(), ApiError> {
    let cs = parse_version(VERSION).expect("the crate version is MAJOR.MINOR.PATCH");
    let ps = parse_version(version)
        .ok_or_else(|| ApiError::bad_request(format!("version {version:?} is not MAJOR.MINOR.PATCH")))?;
    if ps > cs {
        return Err(ApiError::new(
            "version",
            format!(
                "process server {id} runs churnlog {version}, newer than this configuration server's {VERSION}: \
                 upgrade the configuration server first (order: configuration server, process servers, agents)"
            ),
        ));
    }
    Ok(())
}

async fn ps_heartbeat(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Reply<api::HeartbeatReply> {
    need_passphrase(&c)?;
    let hb: api::Heartbeat = json(&body)?;
    api::check_name("process server id", &hb.id)?;
    check_version(&hb.id, &hb.version)?;
    Ok(Json(st.db.heartbeat(&hb, now_ms()).await.map_err(|e| refused("heartbeat", e))?))
}

async fn machine_register(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Reply<api::MachineRegistered> {
    need_passphrase(&c)?;
    let reg: api::MachineRegistration = json(&body)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| ApiError::new("internal", format!("random: {e}")))?;
    let credential = hex::encode(raw);
    let ps =
        st.db.register_machine(&reg.name, &credential, now_ms()).await.map_err(|e| refused("machine register", e))?;
    tracing::info!(machine = %reg.name, ps = ?ps, "machine registered");
    Ok(Json(api::MachineRegistered { credential }))
}

async fn machine_assignment(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
) -> Reply<api::Assignment> {
    let Caller::Machine(name) = c else {
        return Err(unauthorized("this endpoint takes a machine's credential"));
    };
    Ok(Json(st.db.assignment(&name, now_ms()).await.map_err(|e| refused("assignment", e))?))
}

async fn machine_reassign(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Reply<api::Reassign> {
    need_passphrase(&c)?;
    let r: api::Reassign = json(&body)?;
    st.db.reassign(&r.name).await.map_err(|e| refused("reassign", e))?;
    tracing::info!(machine = %r.name, "machine name released by an operator");
    Ok(Json(r))
}

async fn migrate(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Reply<api::Migrated> {
    need_passphrase(&c)?;
    let m: api::Migrate = json(&body)?;
    let done = st.db.migrate(&m, now_ms()).await.map_err(|e| refused("migrate", e))?;
    tracing::info!(to = %m.to, machines = done.machines.len(), "migration started");
    Ok(Json(done))
}

async fn ps_decommission(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Reply<api::Migrated> {
    need_passphrase(&c)?;
    let d: api::Decommission = json(&body)?;
    let done = st.db.decommission(&d.ps, now_ms()).await.map_err(|e| refused("decommission", e))?;
    tracing::info!(ps = %d.ps, machines = done.machines.len(), "decommissioning");
    Ok(Json(done))
}

async fn ps_unregister(
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Reply<api::Unregistered> {
    need_passphrase(&c)?;
    let u: api::Unregister = json(&body)?;
    let done = st.db.unregister(&u, now_ms()).await.map_err(|e| refused("unregister", e))?;
    tracing::info!(ps = %u.ps, purge = u.purge, moved = done.moved.len(), resync = done.resync_required.len(), "process server unregistered");
    Ok(Json(done))
}

async fn report(st: &AppState) -> Result<api::StatusReport, ApiError> {
    let snapshot = st.db.snapshot().await.map_err(|e| e.to_api())?;
    Ok(super::status::build(&snapshot, now_ms(), st.db.heartbeat_timeout_ms()))
}

async fn status(State(st): State<Arc<AppState>>, Extension(c): Extension<Caller>) -> Reply<api::StatusReport> {
    if matches!(c, Caller::Machine(_)) {
        return Err(unauthorized("status takes the passphrase or the status view token"));
    }
    Ok(Json(report(&st).await?))
}

async fn status_page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store"), (header::REFERRER_POLICY, "no-referrer")], Html(super::page::HTML))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let status = match report(&st).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    st.metrics.update(&status);
    match st.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::new("internal", format!("metrics: {e}")).into_response(),
    }
}

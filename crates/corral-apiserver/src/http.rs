//! HTTPS for the API: TLS with optional client certificates from the cluster CA, HTTP/1.1
//! and HTTP/2, authentication, and the dispatch of each request to discovery or a verb.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use corral_api::ApiError;
use corral_api::patch::PatchType;
use corral_api::table::IncludeObject;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::api::{Api, Output, Query, Reply};
use crate::discovery;
use crate::route::{self, Route};

/// Request bodies above this are refused with 413, as kube-apiserver does.
pub const MAX_BODY_BYTES: usize = 3 << 20;

type Body = BoxBody<Bytes, Infallible>;

/// Who made a request.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// Static bearer tokens (`--token-auth-file`, lines of `token,user,uid,"group1,group2"`).
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, User>);

impl Tokens {
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let mut map = HashMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let fields: Vec<&str> = line.splitn(4, ',').collect();
            if fields.len() < 2 {
                continue;
            }
            let groups = fields
                .get(3)
                .map(|g| {
                    g.trim_matches('"').split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
                })
                .unwrap_or_default();
            map.insert(fields[0].to_string(), User { name: fields[1].to_string(), groups });
        }
        Ok(Tokens(map))
    }
}

/// The API server's settings.
pub struct ServerConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub tokens: Tokens,
    /// host:port that clients reach this server at (for `/api`).
    pub advertise: String,
    /// The agent endpoint, for pods' logs, exec, attach and port-forward.
    pub agents: Option<Arc<crate::agents::AgentEndpoint>>,
}

/// Builds the TLS settings from a directory of PEM files: our certificate, and client
/// certificates from the cluster CA accepted but not required (bearer tokens also work).
pub fn tls_config(dir: &Path, name: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use corral_transport::tls::{ClientCerts, server_config};
    server_config(dir, name, ClientCerts::Optional, &[b"h2", b"http/1.1"]).map_err(|e| e.to_string())
}

/// The user a client certificate names: CN is the user, O the groups.
fn cert_user(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let groups = subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
    Some(User { name, groups })
}

/// Serves until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    api: Arc<Api>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let shared = Arc::new((config, api));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = stop.changed() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let (config, _) = &*shared;
            match &config.tls {
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                    let Some(stream) = corral_transport::tls::accept(&acceptor, tcp, peer).await else { return };
                    let user =
                        stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| cert_user(c));
                    connection(TokioIo::new(stream), shared.clone(), user, peer).await;
                }
                None => connection(TokioIo::new(tcp), shared.clone(), None, peer).await,
            }
        });
    }
}

async fn connection<I>(io: I, shared: Arc<(ServerConfig, Arc<Api>)>, user: Option<User>, peer: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let user = user.clone();
        async move { Ok::<_, Infallible>(handle(req, &shared.0, &shared.1, user).await) }
    });
    if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, service)
        .await
    {
        tracing::debug!(%peer, error = %e, "API connection ended");
    }
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())).boxed())
        .expect("valid response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code(), &e.to_status())
}

/// What the Accept header (and the includeObject parameter) ask for.
fn output(accept: &str, q: &Query) -> Output {
    let table = accept.split(',').any(|part| part.contains("as=Table"));
    let include = q
        .get("includeObject")
        .or_else(|| accept.split(',').flat_map(|p| p.split(';')).find_map(|p| p.trim().strip_prefix("includeObject=")));
    let include = match include {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    };
    Output { table, include }
}

async fn handle(req: Request<Incoming>, config: &ServerConfig, api: &Api, cert: Option<User>) -> Response<Body> {
    let span = tracing::debug_span!("api", method = %req.method(), path = req.uri().path());
    tracing::Instrument::instrument(handle_in_span(req, config, api, cert), span).await
}

async fn handle_in_span(
    req: Request<Incoming>,
    config: &ServerConfig,
    api: &Api,
    cert: Option<User>,
) -> Response<Body> {
    let user = match cert {
        Some(u) => Some(u),
        None => req
            .headers()
            .get("authorization")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .and_then(|t| config.tokens.0.get(t.trim()).cloned()),
    };
    let path = req.uri().path().to_string();
    let route = route::parse(&path);
    if user.is_none() && config.tls.is_some() && !matches!(route, Route::Health(_) | Route::Version) {
        return error_response(&ApiError::Unauthorized);
    }
    match dispatch(req, route, config, api).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<(Value, Option<PatchType>), ApiError> {
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::TooLarge("Request entity too large: limit is 3145728".into())
            } else {
                ApiError::BadRequest(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    let patch = PatchType::from_content_type(&content_type);
    if content_type.starts_with(corral_api::protobuf::CONTENT_TYPE) {
        return Ok((corral_api::protobuf::decode(&bytes)?, patch));
    }
    if bytes.is_empty() {
        return Ok((Value::Null, patch));
    }
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body of the request could not be decoded as JSON: {e}")))?;
    Ok((value, patch))
}

async fn dispatch(
    req: Request<Incoming>,
    route: Route,
    config: &ServerConfig,
    api: &Api,
) -> Result<Response<Body>, ApiError> {
    let get = req.method() == Method::GET;
    let ok = |v: Value| Ok(json_response(200, &v));
    let accept = req.headers().get("accept").and_then(|v| v.to_str().ok()).unwrap_or("");
    let aggregated = discovery::aggregated_version(accept);
    match route {
        Route::Version if get => ok(discovery::version()),
        Route::Health(_) if get => Ok(Response::builder()
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(b"ok")).boxed())
            .expect("valid response")),
        Route::CoreVersions | Route::Groups if get => {
            let core = matches!(route, Route::CoreVersions);
            match aggregated {
                Some((version, content_type)) => {
                    let mut resp = json_response(200, &discovery::aggregated(core, version));
                    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static(content_type));
                    Ok(resp)
                }
                None if core => ok(discovery::core_versions(&config.advertise)),
                None => ok(discovery::groups()),
            }
        }
        Route::Group(g) if get => discovery::group(&g).map(|d| json_response(200, &d)).ok_or(ApiError::NoRoute),
        Route::Resources { group, version } if get => {
            discovery::resource_list(&group, &version).map(|d| json_response(200, &d)).ok_or(ApiError::NoRoute)
        }
        Route::OpenApiV3(None) if get => ok(discovery::openapi_v3_index()),
        Route::OpenApiV3(Some(path)) if get => {
            discovery::openapi_v3_group(&path).map(|d| json_response(200, &d)).ok_or(ApiError::NoRoute)
        }
        // kubectl 1.27 and 1.28 fetch this before apply, create and explain; an empty
        // document (with the protobuf type, dot form) lets them go on to OpenAPI v3.
        Route::OpenApiV2 if get => Ok(Response::builder()
            .header("content-type", "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
            .body(Full::new(Bytes::new()).boxed())
            .expect("valid response")),
        Route::Object(route) => object(req, route, api, config).await,
        Route::NotFound => Err(ApiError::NoRoute),
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn object(
    req: Request<Incoming>,
    route: route::ObjectRoute,
    api: &Api,
    config: &ServerConfig,
) -> Result<Response<Body>, ApiError> {
    let mut q = Query::parse(req.uri().query());
    if q.get("fieldManager").is_none_or(str::is_empty) {
        // As kube-apiserver: writes without a field manager are recorded under the
        // client's name, the user agent up to its first `/`.
        let agent = req.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("unknown");
        let manager = agent.split('/').next().filter(|m| !m.is_empty()).unwrap_or("unknown");
        q.0.insert("fieldManager".into(), manager.to_string());
    }
    let accept = req.headers().get("accept").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let out = output(&accept, &q);
    let method = req.method().clone();
    if let Some(sub) = &route.sub
        && route.resource.subresource(sub).is_none()
    {
        return Err(ApiError::NoRoute);
    }
    if route.namespace.is_some() && !route.resource.namespaced {
        return Err(ApiError::NoRoute);
    }
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !route.resource.stored() && (method != Method::GET || watch) {
        // Metrics are computed on read: get and list only, as metrics-server.
        return Err(ApiError::MethodNotAllowed);
    }
    let name = route.name.clone();
    if let (Some(sub @ ("log" | "exec" | "attach" | "portforward")), Some(name)) =
        (route.sub.as_deref(), name.as_deref())
    {
        let agents = config
            .agents
            .as_deref()
            .ok_or_else(|| ApiError::Unavailable("this server has no agent endpoint (it runs without TLS)".into()))?;
        return match (sub, &method) {
            ("log", &Method::GET) => crate::node_streams::logs(api, agents, &route, name, &q).await,
            ("log", _) => Err(ApiError::MethodNotAllowed),
            _ => crate::node_streams::upgrade(api, agents, req, &route, name, &q).await,
        };
    }
    let reply = match (method, name.as_deref()) {
        (Method::GET, None) if watch => api.watch(&route, &q, out).await?,
        (Method::GET, None) => api.list(&route, &q, out).await?,
        (Method::GET, Some(_)) if watch => api.watch(&route, &q, out).await?,
        (Method::GET, Some(name)) => api.get(&route, name, &q, out).await?,
        (Method::POST, None) => {
            let (body, _) = read_body(req).await?;
            api.create(&route, body, &q, out).await?
        }
        (Method::POST, Some(name)) if route.sub.as_deref() == Some("binding") => {
            let (body, _) = read_body(req).await?;
            api.bind(&route, name, &body, &q).await?
        }
        (Method::POST, Some(name)) if route.sub.as_deref() == Some("eviction") => {
            let (body, _) = read_body(req).await?;
            api.evict(&route, name, &body, &q).await?
        }
        (Method::PUT, Some(name)) => {
            let (body, _) = read_body(req).await?;
            api.update(&route, name, body, &q, out).await?
        }
        (Method::PATCH, Some(name)) => {
            let (body, kind) = read_body(req).await?;
            let kind = kind.ok_or_else(|| ApiError::UnsupportedMediaType(PatchType::ACCEPTED.into()))?;
            api.patch(&route, name, kind, body, &q, out).await?
        }
        (Method::DELETE, Some(name)) => {
            let (options, _) = read_body(req).await?;
            api.delete(&route, name, &options, &q).await?
        }
        (Method::DELETE, None) => {
            let (options, _) = read_body(req).await?;
            api.delete_collection(&route, &options, &q).await?
        }
        _ => return Err(ApiError::MethodNotAllowed),
    };
    Ok(match reply {
        Reply::Object(code, value) => json_response(code, &value),
        Reply::Watch(rx) => {
            let lines = tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(|event| Ok::<_, Infallible>(Frame::data(Bytes::from(event.to_line()))));
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(BodyExt::boxed(StreamBody::new(lines)))
                .expect("valid response")
        }
    })
}

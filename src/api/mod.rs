//! HTTP: routing of the CM API (prefix matched case-insensitively), authentication,
//! input parsing and response shapes. Knows nothing of PKCS#11.

mod error;
mod wire;

use std::sync::Arc;
use std::time::Instant;

use actix_web::error::PayloadError;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde_json::Value;
use tracing::{Instrument, info};
use uuid::Uuid;
use zeroize::Zeroizing;

pub use error::ApiError;

use crate::audit::AuditEvent;
use crate::domain::{Atr, CardId, RequestType, enum_from_json, parse_guid};
use crate::metrics::{EndpointLabels, HttpLabels, Metrics};
use crate::policy::{Caller, ClientCertificate, Policy};
use crate::ratelimit::KeyReleaseLimiter;
use crate::service::{CallContext, KeyRelease, NewRequest, Service};

pub const PREFIX: &str = "/certificatemanagement/api/v1.0";
pub const MAX_BODY: usize = 64 * 1024;
/// Longest wait for a request body once the headers are in.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct AppState {
    pub service: Service,
    pub policy: Policy,
    pub limiter: Option<KeyReleaseLimiter>,
    pub metrics: Metrics,
}

/// The endpoints, resolved from method and path.
enum Route {
    ProfileTemplates,
    TemplateSmartcardConfig(String),
    CreateRequest,
    GetRequest(String),
    PutRequest(String),
    BindCard,
    GetCard(String),
    FindCards,
    DiversifiedKey(String, String),
    AuthenticationResponse(String, String),
    PutCard(String, String),
    Healthz,
    Readyz,
    Metrics,
}

impl Route {
    fn name(&self) -> &'static str {
        match self {
            Self::ProfileTemplates => "profiletemplates",
            Self::TemplateSmartcardConfig(_) => "profiletemplate_config",
            Self::CreateRequest => "create_request",
            Self::GetRequest(_) => "get_request",
            Self::PutRequest(_) => "put_request",
            Self::BindCard => "bind_card",
            Self::GetCard(_) => "get_card",
            Self::FindCards => "find_cards",
            Self::DiversifiedKey(..) => "diversifiedkey",
            Self::AuthenticationResponse(..) => "authenticationresponse",
            Self::PutCard(..) => "put_card",
            Self::Healthz => "healthz",
            Self::Readyz => "readyz",
            Self::Metrics => "metrics",
        }
    }
}

/// Matches the path: the prefix and the fixed segments in any case, IDs as sent.
fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such endpoint");
    let not_allowed = || {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        )
    };
    let m = method;
    match path {
        "/healthz" | "/readyz" | "/metrics" if m != Method::GET && m != Method::HEAD => {
            return Err(not_allowed());
        }
        "/healthz" => return Ok(Route::Healthz),
        "/readyz" => return Ok(Route::Readyz),
        "/metrics" => return Ok(Route::Metrics),
        _ => {}
    }
    let rest = path
        .get(..PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PREFIX))
        .map(|_| &path[PREFIX.len()..])
        .ok_or_else(not_found)?;
    let rest = rest.strip_prefix('/').ok_or_else(not_found)?;
    let segs: Vec<String> = rest
        .trim_end_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let r = match l.as_slice() {
        ["profiletemplates"] if m == Method::GET => Route::ProfileTemplates,
        ["profiletemplates", _, "configuration", "smartcards"] if m == Method::GET => {
            Route::TemplateSmartcardConfig(segs[1].clone())
        }
        ["requests"] if m == Method::POST => Route::CreateRequest,
        ["requests", _] if m == Method::GET => Route::GetRequest(segs[1].clone()),
        ["requests", _] if m == Method::PUT => Route::PutRequest(segs[1].clone()),
        ["smartcards"] if m == Method::POST => Route::BindCard,
        ["smartcards"] if m == Method::GET => Route::FindCards,
        ["smartcards", _] if m == Method::GET => Route::GetCard(segs[1].clone()),
        ["requests", _, "smartcards", _, "diversifiedkey"] if m == Method::GET => {
            Route::DiversifiedKey(segs[1].clone(), segs[3].clone())
        }
        ["requests", _, "smartcards", _, "authenticationresponse"] if m == Method::GET => {
            Route::AuthenticationResponse(segs[1].clone(), segs[3].clone())
        }
        ["requests", _, "smartcards", _] if m == Method::PUT => {
            Route::PutCard(segs[1].clone(), segs[3].clone())
        }
        ["profiletemplates"]
        | ["profiletemplates", _, "configuration", "smartcards"]
        | ["requests"]
        | ["requests", _]
        | ["smartcards"]
        | ["smartcards", _]
        | ["requests", _, "smartcards", _]
        | [
            "requests",
            _,
            "smartcards",
            _,
            "diversifiedkey" | "authenticationresponse",
        ] => {
            return Err(not_allowed());
        }
        _ => return Err(not_found()),
    };
    Ok(r)
}

/// A correlation id: the client's `X-Correlation-Id` if it is short and plain, else a new one.
fn correlation_id(req: &HttpRequest) -> String {
    req.headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned)
}

/// The caller behind the request's client certificate and/or bearer token.
fn authenticate<'a>(req: &HttpRequest, policy: &'a Policy) -> Result<&'a Caller, ApiError> {
    let mut values = req.headers().get_all(header::AUTHORIZATION);
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::unauthorized("more than one Authorization header"));
    }
    let token = match first {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or_else(|| ApiError::unauthorized("use Authorization: Bearer <token>"))?,
        ),
    };
    let cert = req.conn_data::<ClientCertificate>();
    policy
        .authenticate(token.map(str::as_bytes), cert)
        .map_err(|e| ApiError::unauthorized(e.to_string()))
}

/// Query parameters, names matched in any case; a repeated parameter is refused.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(req: &HttpRequest) -> Result<Self, ApiError> {
        serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string())
            .map(Self)
            .map_err(|_| ApiError::bad_request("malformed query string"))
    }
    fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut found = self.0.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        let first = found.next().map(|(_, v)| v.as_str());
        if found.next().is_some() {
            return Err(ApiError::bad_request(format!(
                "{name} is given more than once"
            )));
        }
        Ok(first)
    }
}

fn guid(what: &str, text: &str) -> Result<Uuid, ApiError> {
    parse_guid(text).map_err(|e| ApiError::bad_request(format!("{what} is not a GUID: {e}")))
}

fn card_id(text: Option<&str>) -> Result<CardId, ApiError> {
    let text = text.ok_or_else(|| ApiError::bad_request("cardid is required"))?;
    CardId::parse(text).map_err(|e| ApiError::bad_request(format!("cardid is not a GUID: {e}")))
}

fn atr(text: Option<&str>) -> Result<Option<Atr>, ApiError> {
    text.map(|t| Atr::parse(t).map_err(|e| ApiError::bad_request(format!("atr: {e}"))))
        .transpose()
}

/// A JSON object body with property names matched in any case.
struct Body(serde_json::Map<String, Value>);

/// A JSON object's members in order, repeats kept: a map keeps only the last of a repeated
/// name, and `{"cardid": A, "cardid": B}` must be refused, not read as B.
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = a.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Object)
    }
}

impl Body {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let Ok(Members(members)) = serde_json::from_slice(bytes) else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        // Names match in any case, so two spellings of one name would be ambiguous; so is
        // one name given twice.
        let mut names: Vec<String> = members
            .iter()
            .map(|(k, _)| k.to_ascii_lowercase())
            .collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ApiError::bad_request(format!(
                "property {} appears twice",
                w[0]
            )));
        }
        Ok(Self(members.into_iter().collect()))
    }
    fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, v)| k.eq_ignore_ascii_case(name) && !v.is_null())
            .map(|(_, v)| v)
    }
    fn string(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad_request(format!("{name} must be a string"))),
        }
    }
    fn guid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        self.string(name)?.map(|s| guid(name, s)).transpose()
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    HttpResponse::build(status).json(value)
}

/// 201 with the MIM-style relative location as a JSON string.
fn created(kind: &str, id: Uuid) -> HttpResponse {
    let relative = format!("api/v1.0/{kind}/{id}");
    HttpResponse::Created()
        .insert_header((
            header::LOCATION,
            format!("/CertificateManagement/{relative}"),
        ))
        .json(relative)
}

fn no_store(mut resp: HttpResponse) -> HttpResponse {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// The request body, at most [`MAX_BODY`] bytes.
async fn read_body(req: &HttpRequest, payload: web::Payload) -> Result<web::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("the body exceeds {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, payload.to_bytes_limited(MAX_BODY));
    match read.await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "RequestTimeout",
            "the body did not arrive in time",
        )),
        Ok(Ok(Ok(bytes))) => Ok(bytes),
        Ok(Err(_)) => Err(too_large()),
        Ok(Ok(Err(e))) if matches!(e.as_error::<PayloadError>(), Some(PayloadError::Overflow)) => {
            Err(too_large())
        }
        Ok(Ok(Err(_))) => Err(ApiError::bad_request("the body could not be read")),
    }
}

/// Every request enters here.
pub async fn dispatch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<Arc<AppState>>,
) -> HttpResponse {
    let started = Instant::now();
    let cid = correlation_id(&req);
    let span = tracing::info_span!("request", correlation_id = %cid);
    async move {
        let route = route(req.method(), req.path());
        let name = route.as_ref().map_or("unmatched", Route::name);
        let mut caller_name = None;
        let result = match route {
            Ok(route) => handle(&req, payload, &state, route, &cid, &mut caller_name).await,
            Err(e) => Err(e),
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => e.response(&cid),
        };
        if let Ok(v) = HeaderValue::from_str(&cid) {
            resp.headers_mut()
                .insert(header::HeaderName::from_static("x-correlation-id"), v);
        }
        let elapsed = started.elapsed();
        state
            .metrics
            .http_requests
            .get_or_create(&HttpLabels {
                endpoint: name,
                status: resp.status().as_u16(),
            })
            .inc();
        state
            .metrics
            .http_latency
            .get_or_create(&EndpointLabels { endpoint: name })
            .observe(elapsed.as_secs_f64());
        info!(
            method = %req.method(),
            endpoint = name,
            status = resp.status().as_u16(),
            caller = caller_name.as_deref().unwrap_or("-"),
            peer = %req.peer_addr().map_or_else(|| "-".to_owned(), |a| a.ip().to_string()),
            micros = elapsed.as_micros() as u64,
            "handled"
        );
        resp
    }
    .instrument(span)
    .await
}

async fn handle(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    route: Route,
    correlation_id: &str,
    caller_name: &mut Option<String>,
) -> Result<HttpResponse, ApiError> {
    let service = &state.service;
    match route {
        Route::Healthz => return Ok(json(StatusCode::OK, &serde_json::json!({"Status": "ok"}))),
        Route::Metrics => {
            return Ok(HttpResponse::Ok()
                .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
                .body(state.metrics.render()));
        }
        Route::Readyz => {
            return Ok(match service.ready().await {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({"Ready": true})),
                Err(e) => {
                    tracing::warn!(error = %e, "not ready");
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"Ready": false}),
                    )
                }
            });
        }
        _ => {}
    }
    let source = req.peer_addr().map(|a| a.ip().to_string());
    let caller = match authenticate(req, &state.policy) {
        Ok(caller) => caller,
        Err(e) => {
            if let Route::DiversifiedKey(reqid, scid) | Route::AuthenticationResponse(reqid, scid) =
                &route
            {
                // Denials on the key endpoint are audited, unauthenticated ones included.
                let event = AuditEvent {
                    source,
                    correlation_id: Some(correlation_id.to_owned()),
                    action: match route {
                        Route::AuthenticationResponse(..) => "key.authenticate",
                        _ => "key.release",
                    }
                    .into(),
                    request: parse_guid(reqid).ok(),
                    smartcard: parse_guid(scid).ok(),
                    outcome: "denied:Unauthorized".into(),
                    ..AuditEvent::default()
                };
                if let Err(audit) = service.record(event).await {
                    tracing::error!(error = %audit, "audit write failed");
                }
            }
            return Err(e);
        }
    };
    *caller_name = Some(caller.name.clone());
    let ctx = CallContext {
        caller,
        source,
        correlation_id: correlation_id.to_owned(),
    };
    // Malformed key requests are refused with 400 and audited like any other refusal.
    let key_input = KeyInput::of(&route);
    let refuse = |e: ApiError| key_input.refuse(service, &ctx, e);
    let query = match Query::parse(req) {
        Ok(q) => q,
        Err(e) => return Err(refuse(e).await),
    };
    // Bodies are read only for authenticated callers, within a size and a time limit.
    let body = match read_body(req, payload).await {
        Ok(b) => b,
        Err(e) => return Err(refuse(e).await),
    };
    let body = body.as_ref();
    Ok(match route {
        Route::ProfileTemplates => {
            let list: Vec<wire::ProfileTemplate> = service
                .templates_for(caller)
                .into_iter()
                .map(Into::into)
                .collect();
            json(StatusCode::OK, &list)
        }
        Route::TemplateSmartcardConfig(id) => {
            let id = guid("profile template id", &id)?;
            let t = service.template_for(caller, &id)?;
            no_store(json(StatusCode::OK, &wire::SmartcardConfiguration::from(t)))
        }
        Route::CreateRequest => {
            let b = Body::parse(body)?;
            let request_type = b
                .get("type")
                .ok_or_else(|| ApiError::bad_request("type is required"))
                .and_then(|v| {
                    enum_from_json(v, RequestType::from_name, RequestType::from_number)
                        .ok_or_else(|| ApiError::bad_request("type is not a known request type"))
                })?;
            let priority = match b.get("priority") {
                None => 0,
                Some(v) => v
                    .as_i64()
                    .ok_or_else(|| ApiError::bad_request("priority must be an integer"))?,
            };
            let new = NewRequest {
                request_type,
                template: b.guid("profiletemplateuuid")?,
                smartcard: b.guid("smartcard")?,
                target: b.string("target")?.map(str::to_owned),
                comment: b.string("comment")?.map(str::to_owned),
                priority,
            };
            let r = service.create_request(&ctx, new).await?;
            info!(request = %r.uuid, template = %r.template, status = r.status.name(), "request created");
            created("requests", r.uuid)
        }
        Route::GetRequest(id) => {
            let id = guid("request id", &id)?;
            let r = service.get_request(caller, id).await?;
            json(StatusCode::OK, &wire::RequestBody::from(&r))
        }
        Route::PutRequest(id) => {
            let id = guid("request id", &id)?;
            let b = Body::parse(body)?;
            let status = b
                .string("status")?
                .ok_or_else(|| ApiError::bad_request("status is required"))?;
            let r = service.set_request_status(&ctx, id, status).await?;
            info!(request = %r.uuid, status = r.status.name(), "request status changed");
            json(StatusCode::OK, &wire::RequestBody::from(&r))
        }
        Route::BindCard => {
            let b = Body::parse(body)?;
            let request = b
                .guid("requestid")?
                .ok_or_else(|| ApiError::bad_request("requestid is required"))?;
            let card = card_id(b.string("cardid")?)?;
            let atr = atr(b.string("atr")?)?;
            let c = service.bind_card(&ctx, request, card, atr).await?;
            info!(request = %request, smartcard = %c.uuid, card_id = %c.card_id, "card bound");
            created("smartcards", c.uuid)
        }
        Route::GetCard(id) => {
            let id = guid("smart card id", &id)?;
            let c = service.get_card(caller, id).await?;
            json(StatusCode::OK, &wire::SmartcardBody::from(&c))
        }
        Route::FindCards => {
            let card = card_id(query.get("cardid")?)?;
            let cards = service.find_cards(caller, card).await?;
            let list: Vec<wire::SmartcardBody> = cards.iter().map(Into::into).collect();
            json(StatusCode::OK, &list)
        }
        Route::DiversifiedKey(reqid, scid) => {
            const ACTION: &str = "key.release";
            let parsed = (|| {
                Ok::<_, ApiError>((
                    guid("request id", &reqid)?,
                    guid("smart card id", &scid)?,
                    card_id(query.get("cardid")?)?,
                    atr(query.get("atr")?)?,
                ))
            })();
            let (reqid, scid, card, atr) = match parsed {
                Ok(p) => p,
                Err(e) => return Err(refuse(e).await),
            };
            if let Some(wait) = state
                .limiter
                .as_ref()
                .and_then(|l| l.take(&caller.name).err())
            {
                return Err(rate_limited(service, &ctx, ACTION, reqid, scid, card, wait).await);
            }
            match service.release_key(&ctx, reqid, scid, card).await? {
                KeyRelease::NotDiversified => {
                    info!(request = %reqid, smartcard = %scid, card_id = %card, "no diversification: default key applies");
                    no_store(HttpResponse::NoContent().finish())
                }
                KeyRelease::Key {
                    key,
                    master_key_label,
                    version,
                } => {
                    let encoded = Zeroizing::new(
                        base64::engine::general_purpose::STANDARD.encode(key.expose()),
                    );
                    let body = Zeroizing::new(format!("\"{}\"", encoded.as_str()));
                    info!(
                        request = %reqid,
                        smartcard = %scid,
                        card_id = %card,
                        atr = atr.as_ref().map_or("-", Atr::as_str),
                        master_key = %master_key_label,
                        version,
                        key_type = key.key_type().name(),
                        "admin key released"
                    );
                    no_store(
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body(body.as_bytes().to_vec()),
                    )
                }
            }
        }
        Route::AuthenticationResponse(reqid, scid) => {
            const ACTION: &str = "key.authenticate";
            let parsed = (|| {
                let reqid = guid("request id", &reqid)?;
                let scid = guid("smart card id", &scid)?;
                let card = card_id(query.get("cardid")?)?;
                let _atr = atr(query.get("atr")?)?;
                let challenge = query
                    .get("challenge")?
                    .ok_or_else(|| ApiError::bad_request("challenge is required"))
                    .and_then(|c| {
                        // A client that left `+` unencoded sent a space after form decoding;
                        // base64 has no spaces, so this reads what it meant.
                        base64::engine::general_purpose::STANDARD
                            .decode(c.replace(' ', "+"))
                            .map(Zeroizing::new)
                            .map_err(|_| ApiError::bad_request("challenge is not standard base64"))
                    })?;
                if challenge.len() != 8 && challenge.len() != 16 {
                    return Err(ApiError::bad_request("challenge must be 8 or 16 bytes"));
                }
                let diversified = match query
                    .get("diversified")?
                    .map(str::to_ascii_lowercase)
                    .as_deref()
                {
                    Some("true") => true,
                    Some("false") => false,
                    _ => return Err(ApiError::bad_request("diversified must be true or false")),
                };
                Ok((reqid, scid, card, challenge, diversified))
            })();
            let (reqid, scid, card, challenge, diversified) = match parsed {
                Ok(p) => p,
                Err(e) => return Err(refuse(e).await),
            };
            if let Some(wait) = state
                .limiter
                .as_ref()
                .and_then(|l| l.take(&caller.name).err())
            {
                return Err(rate_limited(service, &ctx, ACTION, reqid, scid, card, wait).await);
            }
            let response = service
                .authentication_response(&ctx, reqid, scid, card, challenge, diversified)
                .await?;
            info!(request = %reqid, smartcard = %scid, card_id = %card, diversified, "challenge answered");
            let encoded = base64::engine::general_purpose::STANDARD.encode(response);
            no_store(json(StatusCode::OK, &encoded))
        }
        Route::PutCard(reqid, scid) => {
            let reqid = guid("request id", &reqid)?;
            let scid = guid("smart card id", &scid)?;
            let b = Body::parse(body)?;
            let status = b
                .string("status")?
                .ok_or_else(|| ApiError::bad_request("status is required"))?;
            let c = service.set_card_status(&ctx, reqid, scid, status).await?;
            info!(request = %reqid, smartcard = %c.uuid, status = c.status.name(), "card status changed");
            json(StatusCode::OK, &wire::SmartcardBody::from(&c))
        }
        Route::Healthz | Route::Readyz | Route::Metrics => unreachable_route(),
    })
}

/// What the audit record of a refused key request can say before its input is parsed.
struct KeyInput {
    /// `None` for routes that release no key.
    action: Option<&'static str>,
    request: Option<Uuid>,
    smartcard: Option<Uuid>,
}

impl KeyInput {
    fn of(route: &Route) -> Self {
        let (action, ids) = match route {
            Route::DiversifiedKey(r, s) => (Some("key.release"), Some((r, s))),
            Route::AuthenticationResponse(r, s) => (Some("key.authenticate"), Some((r, s))),
            _ => (None, None),
        };
        Self {
            action,
            request: ids.and_then(|(r, _)| parse_guid(r).ok()),
            smartcard: ids.and_then(|(_, s)| parse_guid(s).ok()),
        }
    }

    /// Audits a key request refused for its input (a no-op on other routes); returns `e`.
    async fn refuse(&self, service: &Service, ctx: &CallContext<'_>, e: ApiError) -> ApiError {
        if let Some(action) = self.action {
            let mut event = ctx.event(action);
            event.request = self.request;
            event.smartcard = self.smartcard;
            // `bad_request`, or what else refused the input (a body too large or too slow).
            event.outcome = if e.status == StatusCode::BAD_REQUEST {
                "bad_request".into()
            } else {
                format!("refused:{}", e.code)
            };
            if let Err(audit) = service.record(event).await {
                tracing::error!(error = %audit, "audit write failed");
            }
        }
        e
    }
}

/// A key request over the caller's rate limit: audited, then 429.
async fn rate_limited(
    service: &Service,
    ctx: &CallContext<'_>,
    action: &str,
    request: Uuid,
    smartcard: Uuid,
    card: CardId,
    wait: std::time::Duration,
) -> ApiError {
    let event = AuditEvent {
        caller: Some(ctx.caller.name.clone()),
        source: ctx.source.clone(),
        correlation_id: Some(ctx.correlation_id.clone()),
        action: action.into(),
        request: Some(request),
        smartcard: Some(smartcard),
        card_id: Some(card.to_string()),
        outcome: "denied:RateLimited".into(),
        ..AuditEvent::default()
    };
    if let Err(audit) = service.record(event).await {
        tracing::error!(error = %audit, "audit write failed");
    }
    ApiError::rate_limited(wait)
}

/// Health routes return before authentication; this arm only satisfies the match.
fn unreachable_route() -> HttpResponse {
    HttpResponse::NotFound().finish()
}

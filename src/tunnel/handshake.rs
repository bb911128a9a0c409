//! The HTTP/1.1 Upgrade that opens a tunnel: `GET /ferry/v1/tunnel` with `Upgrade: ferry/1`, the
//! bearer token and the agent id; answered `101 Switching Protocols` or a refusal with a reason.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{AGENT_ID_HEADER, TUNNEL_PATH, UPGRADE_PROTOCOL};

#[cfg(any(feature = "agent", feature = "gateway"))]
/// Longest agent id accepted: a DNS name.
pub(crate) const MAX_AGENT_ID_LEN: usize = 253;

#[cfg(any(feature = "agent", feature = "gateway"))]
/// Whether `id` can be an agent id: it must work as the host of a URL Prometheus scrapes.
pub(crate) fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !id.starts_with(['-', '.'])
}

#[cfg(any(feature = "agent", feature = "gateway"))]
/// The gateway's label for scrapes of agents that are not connected (and targets no agent
/// lists): an agent with this id would share those series, and reset them when it left.
pub(crate) const RESERVED_AGENT_ID: &str = "unknown";

#[cfg(any(feature = "agent", feature = "gateway"))]
/// Why `id`, a valid host name, still cannot be an agent id (in canonical form).
pub(crate) fn reserved_agent_id(id: &str) -> Option<String> {
    (canonical_agent_id(id) == RESERVED_AGENT_ID).then(|| {
        format!("agent id {RESERVED_AGENT_ID:?} is reserved (the gateway counts scrapes of agents not connected under it): choose another")
    })
}

#[cfg(any(feature = "agent", feature = "gateway"))]
/// The form of an agent id the gateway knows it by (`NODE-1` and `node-1.` are `node-1`): both
/// the claim in an upgrade request and the host of a scrape are compared in this form.
pub(crate) use crate::http_util::canonical_host_name as canonical_agent_id;

#[cfg(feature = "gateway")]
/// What an upgrade request claims.
#[derive(Clone)]
pub(crate) struct UpgradeRequest {
    /// The bearer token presented.
    pub token: String,
    /// The agent id claimed.
    pub agent_id: String,
}

#[cfg(feature = "gateway")]
impl std::fmt::Debug for UpgradeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeRequest")
            .field("token", &"***")
            .field("agent_id", &self.agent_id)
            .finish()
    }
}

#[cfg(feature = "gateway")]
/// A refusal the gateway sends instead of `101`, with its one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// 400, 401, 403, 404, 405, 409 or 426.
    pub status: StatusCode,
    /// One line, shown in the agent's log.
    pub reason: String,
}

#[cfg(feature = "gateway")]
impl Refusal {
    /// A refusal with `status` and `reason`.
    pub(crate) fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

#[cfg(feature = "gateway")]
/// Reads the credentials out of an upgrade request, or says why it is not one.
pub(crate) fn parse_upgrade_request<B>(req: &Request<B>) -> Result<UpgradeRequest, Refusal> {
    if req.uri().path() != TUNNEL_PATH {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "not a ferry tunnel endpoint",
        ));
    }
    if req.method() != http::Method::GET {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "the tunnel upgrade is a GET",
        ));
    }
    // HTTP/1.0 has no Upgrade: hyper would send the 101 and then have no connection to hand over.
    if req.version() != http::Version::HTTP_11 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the tunnel upgrade needs HTTP/1.1",
        ));
    }
    if !upgrade_offers(req.headers(), UPGRADE_PROTOCOL) {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            format!("expected Upgrade: {UPGRADE_PROTOCOL}"),
        ));
    }
    let token = bearer_token(only_one(req.headers(), "Authorization")?)?;
    let agent_id = only_one(req.headers(), "Ferry-Agent-Id")?
        .ok_or_else(|| Refusal::new(StatusCode::BAD_REQUEST, "missing Ferry-Agent-Id header"))?
        .to_str()
        .map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "the agent id is not a valid host name (not ASCII)",
            )
        })?;
    if !valid_agent_id(agent_id) {
        // Quoted back shortened: the reason is one line in the agent's log, whatever was sent.
        let shown: String = agent_id.chars().take(64).collect();
        let more = if shown.len() < agent_id.len() {
            "…"
        } else {
            ""
        };
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("agent id {shown:?}{more} is not a valid host name"),
        ));
    }
    if let Some(reason) = reserved_agent_id(agent_id) {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, reason));
    }
    Ok(UpgradeRequest {
        token: token.to_owned(),
        agent_id: canonical_agent_id(agent_id).into_owned(),
    })
}

#[cfg(feature = "gateway")]
/// Whether the `Upgrade` headers list `protocol` among the protocols offered (RFC 9110 7.8: a
/// client may offer several, in order of preference).
fn upgrade_offers(headers: &http::HeaderMap, protocol: &str) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(protocol))
}

#[cfg(feature = "gateway")]
/// The one value of header `name` (any case), if any. Sent twice, it is refused rather than
/// one of the two picked: the credential checked and the id claimed must be the ones meant.
fn only_one<'a>(
    headers: &'a http::HeaderMap,
    name: &'static str,
) -> Result<Option<&'a HeaderValue>, Refusal> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("more than one {name} header"),
        ));
    }
    Ok(first)
}

#[cfg(feature = "gateway")]
/// The token of an `Authorization: Bearer <token>` header, the scheme in any case, or a 401
/// saying what is wrong with it: absent, another scheme, or malformed (an agent that sent a
/// broken header must not be told it sent none).
fn bearer_token(value: Option<&HeaderValue>) -> Result<&str, Refusal> {
    let refuse = |reason: &str| Err(Refusal::new(StatusCode::UNAUTHORIZED, reason));
    let Some(value) = value else {
        return refuse("missing bearer token");
    };
    let Ok(value) = value.to_str() else {
        return refuse("malformed Authorization header: not visible ASCII");
    };
    let Some(token) = crate::auth_header::credentials(value, "bearer") else {
        return refuse("the Authorization header is not Bearer <token>");
    };
    if token.is_empty() {
        return refuse("malformed Authorization header: Bearer without a token");
    }
    // A bearer token is one word (RFC 6750 b64token); so is an agent's token.
    if token.contains([' ', '\t']) {
        return refuse("malformed Authorization header: the bearer token is more than one word");
    }
    Ok(token)
}

/// The `101 Switching Protocols` answer to an accepted upgrade request.
pub fn switching_protocols<B: Default>() -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    resp
}

/// Why the agent's side of the handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The gateway answered with a refusal.
    #[error("gateway refused the tunnel with {status}: {reason}")]
    Refused {
        /// The status the gateway sent.
        status: StatusCode,
        /// Its one-line reason.
        reason: String,
        /// The authentication scheme a 401 asks for (`WWW-Authenticate`), lowercased: `bearer`
        /// from a ferry tunnel listener, `basic` from a web listener protected by basic auth.
        challenge: Option<String>,
    },
    /// The server switched protocols, but not to ferry's: something that is not a ferry
    /// gateway (a proxy, another server speaking `h2c`) answered the upgrade.
    #[error("{}", not_ferry(.upgrade.as_deref()))]
    NotFerry {
        /// The `Upgrade` header of its `101` answer, if it had one (shortened, one line).
        upgrade: Option<String>,
    },
    /// HTTP failed during the handshake.
    #[error("tunnel handshake failed")]
    Http(#[from] hyper::Error),
    /// The request could not be built (a token with characters not allowed in a header).
    #[error("invalid handshake request: {0}")]
    Request(#[from] http::Error),
}

impl HandshakeError {
    /// Whether the gateway refused our credentials (retry slowly and loudly, don't hammer).
    pub fn is_auth_refusal(&self) -> bool {
        matches!(self, HandshakeError::Refused { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
            && !self.asks_for_basic_auth()
    }

    /// Whether the answer asks for a user and password: a web listener behind basic auth (the
    /// gateway's own, with `web.config_file`), not a tunnel listener, which asks for a token.
    pub fn asks_for_basic_auth(&self) -> bool {
        matches!(self, HandshakeError::Refused { status, challenge: Some(scheme), .. }
            if *status == StatusCode::UNAUTHORIZED && scheme == "basic")
    }

    /// Whether the gateway refused our id because another token holds it now (retry slowly too:
    /// the other agent stays until it goes away).
    pub fn is_id_conflict(&self) -> bool {
        matches!(self, HandshakeError::Refused { status, .. } if *status == StatusCode::CONFLICT)
    }
}

/// Sends the upgrade request over `io` and returns the upgraded stream once the gateway agrees.
pub async fn request_upgrade<IO>(
    io: IO,
    host: &str,
    token: &str,
    agent_id: &str,
) -> Result<Upgraded, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn.with_upgrades());
    let req = Request::get(TUNNEL_PATH)
        .header(header::HOST, host)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(AGENT_ID_HEADER, agent_id)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await;
    let resp = match resp {
        Ok(resp) => resp,
        Err(e) => {
            conn.abort();
            return Err(e.into());
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_ascii_lowercase);
        let reason = refusal_reason(resp).await;
        conn.abort();
        return Err(HandshakeError::Refused {
            status,
            reason,
            challenge,
        });
    }
    // Whatever answers 101 to another protocol would speak that protocol on the connection,
    // not HTTP/2 as the gateway's client: "tunnel up" with no gateway behind it.
    if !is_ferry_upgrade(resp.headers()) {
        let upgrade = resp
            .headers()
            .get(header::UPGRADE)
            .map(|v| shortened(&String::from_utf8_lossy(v.as_bytes())));
        conn.abort();
        return Err(HandshakeError::NotFerry { upgrade });
    }
    Ok(hyper::upgrade::on(resp).await?)
}

/// Whether a `101` answer switches to ferry's protocol: one `Upgrade` header, `ferry/1`.
fn is_ferry_upgrade(headers: &http::HeaderMap) -> bool {
    let mut values = headers.get_all(header::UPGRADE).iter();
    let first = values.next().and_then(|v| v.to_str().ok());
    values.next().is_none()
        && first.is_some_and(|v| v.trim().eq_ignore_ascii_case(UPGRADE_PROTOCOL))
}

/// Why a `101` to another protocol is refused, naming what the server answered.
fn not_ferry(upgrade: Option<&str>) -> String {
    let answered = match upgrade {
        Some(protocol) => format!("to {protocol:?}"),
        None => "without an Upgrade header".to_owned(),
    };
    format!("the server switched protocols {answered}, not to {UPGRADE_PROTOCOL:?}: it is not a ferry gateway (a proxy or another server in the way?); check the gateway URL")
}

/// `text` as one line of at most 64 characters, for an error that quotes what a server sent.
fn shortened(text: &str) -> String {
    let mut chars = text.chars().filter(|c| !c.is_control());
    let line: String = chars.by_ref().take(64).collect();
    match chars.next() {
        Some(_) => format!("{line}…"),
        None => line,
    }
}

/// Most of a refusal's body the agent reads; its first line is the reason.
const MAX_REASON: usize = 512;

/// The first line of a refusal's body, from its first [`MAX_REASON`] bytes: a longer body is
/// cut, not dropped.
async fn refusal_reason(resp: Response<hyper::body::Incoming>) -> String {
    let wait = std::time::Duration::from_secs(5);
    first_line(&super::body_prefix(resp.into_body(), MAX_REASON, wait).await)
}

/// The first line of `bytes`, at most [`MAX_REASON`] of them, cut at a character boundary.
fn first_line(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(MAX_REASON)];
    // A character cut by the limit is left out rather than shown as a replacement character.
    let end = match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        _ => bytes.len(),
    };
    let text = String::from_utf8_lossy(&bytes[..end]);
    text.lines().next().unwrap_or("").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "gateway")]
    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(TUNNEL_PATH);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[cfg(feature = "gateway")]
    #[test]
    fn accepts_a_complete_upgrade_request() {
        let r = req(&[
            ("upgrade", "ferry/1"),
            ("authorization", "Bearer s3cret"),
            ("ferry-agent-id", "node-1.example.com"),
        ]);
        let u = parse_upgrade_request(&r).unwrap();
        assert_eq!(u.token, "s3cret");
        assert_eq!(u.agent_id, "node-1.example.com");
        assert!(!format!("{u:?}").contains("s3cret"));
    }

    #[cfg(feature = "gateway")]
    #[test]
    fn refuses_incomplete_requests_with_the_right_status() {
        let cases: [(&[(&str, &str)], u16); 5] = [
            (
                &[("authorization", "Bearer x"), ("ferry-agent-id", "a")],
                426,
            ),
            (&[("upgrade", "ferry/1"), ("ferry-agent-id", "a")], 401),
            (
                &[("upgrade", "ferry/1"), ("authorization", "Bearer x")],
                400,
            ),
            (
                &[
                    ("upgrade", "ferry/1"),
                    ("authorization", "Bearer x"),
                    ("ferry-agent-id", "a/b"),
                ],
                400,
            ),
            (
                &[
                    ("upgrade", "ferry/1"),
                    ("authorization", "Bearer x"),
                    ("ferry-agent-id", "Unknown."),
                ],
                400,
            ),
        ];
        for (headers, status) in cases {
            let err = parse_upgrade_request(&req(headers)).unwrap_err();
            assert_eq!(err.status.as_u16(), status, "{headers:?}: {err:?}");
        }
    }

    #[cfg(feature = "gateway")]
    #[test]
    fn a_post_and_a_long_bad_id_are_refused_in_one_short_line() {
        let mut post = req(&[
            ("upgrade", "ferry/1"),
            ("authorization", "Bearer x"),
            ("ferry-agent-id", "a"),
        ]);
        *post.method_mut() = http::Method::POST;
        assert_eq!(parse_upgrade_request(&post).unwrap_err().status, 405);
        let long = format!("{}/", "a".repeat(5000));
        let err = parse_upgrade_request(&req(&[
            ("upgrade", "ferry/1"),
            ("authorization", "Bearer x"),
            ("ferry-agent-id", &long),
        ]))
        .unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.reason.len() < 120, "{}", err.reason);
    }

    #[cfg(feature = "gateway")]
    #[test]
    fn a_lower_case_scheme_and_a_list_of_protocols_are_accepted() {
        for (upgrade, authorization) in [
            ("h2c, ferry/1", "bearer s3cret"),
            ("FERRY/1", "BEARER  s3cret"),
        ] {
            let r = req(&[
                ("upgrade", upgrade),
                ("authorization", authorization),
                ("ferry-agent-id", "node-1"),
            ]);
            let u = parse_upgrade_request(&r).unwrap_or_else(|e| panic!("{upgrade:?}: {e:?}"));
            assert_eq!(u.token, "s3cret");
        }
        let r = req(&[
            ("upgrade", "h2c, websocket"),
            ("authorization", "Bearer x"),
            ("ferry-agent-id", "node-1"),
        ]);
        assert_eq!(parse_upgrade_request(&r).unwrap_err().status, 426);
    }

    #[cfg(feature = "gateway")]
    #[test]
    fn a_header_sent_twice_or_http_1_0_is_refused_with_its_reason() {
        let cases: [(&[(&str, &str)], &str); 2] = [
            (
                &[
                    ("authorization", "Bearer x"),
                    ("ferry-agent-id", "node-1"),
                    ("ferry-agent-id", "node-2"),
                ],
                "more than one Ferry-Agent-Id header",
            ),
            (
                &[
                    ("authorization", "Bearer x"),
                    ("authorization", "Bearer y"),
                    ("ferry-agent-id", "node-1"),
                ],
                "more than one Authorization header",
            ),
        ];
        for (headers, reason) in cases {
            let mut headers = headers.to_vec();
            headers.push(("upgrade", "ferry/1"));
            let err = parse_upgrade_request(&req(&headers)).unwrap_err();
            assert_eq!((err.status.as_u16(), err.reason.as_str()), (400, reason));
        }
        let mut old = req(&[
            ("upgrade", "ferry/1"),
            ("authorization", "Bearer x"),
            ("ferry-agent-id", "node-1"),
        ]);
        *old.version_mut() = http::Version::HTTP_10;
        let err = parse_upgrade_request(&old).unwrap_err();
        assert_eq!(
            (err.status.as_u16(), err.reason.as_str()),
            (400, "the tunnel upgrade needs HTTP/1.1")
        );
    }

    /// The agent's side of the handshake against a server that answers `answer` to whatever
    /// it is sent.
    async fn upgrade_answered_with(answer: &'static [u8]) -> Result<Upgraded, HandshakeError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(64 << 10);
        let server_task = tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = server.write_all(answer).await;
            // Held open, as a server speaking the protocol it switched to would.
            let _ = server.read(&mut buf).await;
        });
        let upgrade = request_upgrade(client, "gw", "t", "node-1");
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), upgrade)
            .await
            .expect("the handshake ends within 10 s");
        server_task.abort();
        result
    }

    #[tokio::test]
    async fn a_switch_to_another_protocol_is_no_tunnel() {
        let h2c = upgrade_answered_with(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
        )
        .await
        .expect_err("h2c is not ferry/1");
        assert_eq!(
            h2c.to_string(),
            "the server switched protocols to \"h2c\", not to \"ferry/1\": it is not a ferry gateway (a proxy or another server in the way?); check the gateway URL"
        );
        assert!(!h2c.is_auth_refusal() && !h2c.is_id_conflict());
        let bare = upgrade_answered_with(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n",
        )
        .await
        .expect_err("no Upgrade header");
        assert!(
            bare.to_string()
                .starts_with("the server switched protocols without an Upgrade header, not to \"ferry/1\": it is not a ferry gateway"),
            "{bare}"
        );
        upgrade_answered_with(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: Ferry/1\r\n\r\n",
        )
        .await
        .expect("ferry/1, in any case, is the tunnel");
    }

    #[tokio::test]
    async fn a_refusal_longer_than_the_agent_reads_keeps_its_first_bytes() {
        // 1 + 2 × 300 bytes: the limit (512) falls inside an 'é'.
        const ANSWER: &str = "HTTP/1.1 403 Forbidden\r\nContent-Length: 601\r\n\r\n";
        let body = format!("x{}", "é".repeat(300));
        let answer: &'static [u8] = format!("{ANSWER}{body}").into_bytes().leak();
        let err = upgrade_answered_with(answer).await.expect_err("a refusal");
        let expected = format!("x{}", "é".repeat(255));
        assert_eq!(
            err.to_string(),
            format!("gateway refused the tunnel with 403 Forbidden: {expected}")
        );
        assert!(err.is_auth_refusal());
        assert_eq!(first_line(b"token revoked\r\nsecond line"), "token revoked");
    }

    #[cfg(any(feature = "agent", feature = "gateway"))]
    #[test]
    fn agent_ids_must_be_host_names() {
        assert!(valid_agent_id("node-1"));
        assert!(valid_agent_id("db_2.dc1.example.com"));
        for bad in ["", "a b", "a:1", "a/b", "-x", ".x", &"a".repeat(254)] {
            assert!(!valid_agent_id(bad), "{bad:?}");
        }
    }

    #[cfg(feature = "gateway")]
    #[tokio::test]
    async fn upgrade_round_trip_over_a_duplex_pipe() {
        use hyper::service::service_fn;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (client, server) = tokio::io::duplex(4096);
        let server_task = tokio::spawn(async move {
            let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                let parsed = parse_upgrade_request(&req);
                let resp: Response<Empty<Bytes>> = match parsed {
                    Ok(u) if u.token == "good" => {
                        tokio::spawn(async move {
                            let up = hyper::upgrade::on(req).await.unwrap();
                            let mut io = TokioIo::new(up);
                            io.write_all(b"hello from gateway").await.unwrap();
                        });
                        switching_protocols()
                    }
                    _ => {
                        let mut r = Response::new(Empty::new());
                        *r.status_mut() = StatusCode::UNAUTHORIZED;
                        r
                    }
                };
                Ok::<_, std::convert::Infallible>(resp)
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), svc)
                .with_upgrades()
                .await
        });
        let up = request_upgrade(client, "gw", "good", "node-1")
            .await
            .unwrap();
        let mut io = TokioIo::new(up);
        let mut buf = vec![0; 18];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello from gateway");
        drop(server_task);
    }
}

//! Opening the TCP leg of the tunnel: directly, or through an HTTP CONNECT proxy
//! (`--proxy-url` or `HTTPS_PROXY`), as corporate networks often require.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Any byte stream the tunnel can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed byte stream: a TCP connection, or a CONNECT tunnel through a proxy.
pub type BoxIo = Box<dyn Io>;

/// Header in which ferry egress says why it refused a request, on one line.
const REFUSAL_HEADER: &str = "ferry-refusal";
/// Most of a refusal's body read for its reason.
const MAX_REFUSAL_BODY: usize = 1024;
/// Longest refusal reason kept, in characters.
const MAX_REFUSAL_REASON: usize = 200;
/// How long a refusal's body may take to arrive: its status alone says enough.
const REFUSAL_BODY_WAIT: Duration = Duration::from_secs(1);

/// Why the TCP leg could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// TCP connect to the gateway failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// host:port dialled.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// TCP connect to the proxy failed: named as the proxy, with where it was configured, since
    /// a stale `HTTPS_PROXY` is easily taken for the gateway being down.
    #[error("cannot connect to proxy {proxy} (from {origin}): {source}")]
    ProxyConnect {
        /// host:port of the proxy.
        proxy: String,
        /// Where the proxy was configured (`HTTPS_PROXY`, `proxy_url`, `--proxy-url`).
        origin: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The proxy refused the CONNECT request.
    #[error("proxy {proxy} refused CONNECT {target}: {status}{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    ProxyRefused {
        /// The proxy.
        proxy: String,
        /// host:port asked for.
        target: String,
        /// The proxy's answer.
        status: StatusCode,
        /// The first line of the proxy's reason (its `ferry-refusal` header or body), if any.
        reason: Option<String>,
    },
    /// HTTP to the proxy failed.
    #[error("proxy {proxy}: {source}")]
    ProxyHttp {
        /// The proxy.
        proxy: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The TCP connection (to the gateway, or to the proxy) was not made in time.
    #[error("connecting to {what} timed out after {timeout:?}")]
    Timeout {
        /// `host:port` dialled, or `proxy host:port (from ORIGIN)`.
        what: String,
        /// The connect timeout.
        timeout: Duration,
    },
    /// The proxy took the connection but did not answer the CONNECT request in time.
    #[error("proxy {proxy} did not answer CONNECT to {target} within {timeout:?}")]
    ProxyTimeout {
        /// The proxy.
        proxy: String,
        /// host:port asked for.
        target: String,
        /// The connect timeout.
        timeout: Duration,
    },
}

impl DialError {
    /// Whether the proxy refused our credentials (407): retrying soon cannot help.
    pub fn is_proxy_auth_refusal(&self) -> bool {
        matches!(self, DialError::ProxyRefused { status, .. } if *status == StatusCode::PROXY_AUTHENTICATION_REQUIRED)
    }
}

/// An HTTP proxy to reach the gateway through, from `--proxy-url` or `HTTPS_PROXY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// `Proxy-Authorization` value built from the URL's user info, if any (hidden from `Debug`:
    /// base64 is not a disguise).
    pub authorization: Option<crate::config::Secret>,
    /// Where it was configured, as the user would look for it: `HTTPS_PROXY`, `proxy_url`,
    /// `--proxy-url`.
    pub origin: String,
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port]`, configured in `origin` (`HTTPS_PROXY`,
    /// `--proxy-url`). The user and password are percent-decoded, as curl and Go read them:
    /// `us%40er` is the user `us@er`.
    pub fn parse(url: &str, origin: &str) -> Result<Proxy, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") | None => {}
            Some(other) => {
                return Err(format!(
                    "{url:?}: proxy scheme {other:?} is not supported, use http://"
                ))
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
        let addr = if authority.port().is_some() {
            host_port.to_owned()
        } else {
            format!("{host_port}:80")
        };
        let authorization = authority.as_str().rsplit_once('@').map(|(userinfo, _)| {
            use base64::Engine as _;
            let userinfo: Vec<u8> = percent_encoding::percent_decode_str(userinfo).collect();
            let encoded = base64::engine::general_purpose::STANDARD.encode(userinfo);
            crate::config::Secret::new(format!("Basic {encoded}"))
        });
        Ok(Proxy {
            addr,
            authorization,
            origin: origin.to_owned(),
        })
    }
}

/// Opens a byte stream to `target` (`host:port`), through `proxy` if given, within `timeout`.
pub async fn dial(
    target: &str,
    proxy: Option<&Proxy>,
    timeout: Duration,
) -> Result<BoxIo, DialError> {
    match proxy {
        None => tokio::time::timeout(timeout, tcp(target))
            .await
            .map_err(|_| DialError::Timeout {
                what: target.to_owned(),
                timeout,
            })?
            .map(|stream| Box::new(stream) as BoxIo)
            .map_err(|source| DialError::Connect {
                addr: target.to_owned(),
                source,
            }),
        Some(proxy) => connect_through(proxy, target, timeout).await,
    }
}

async fn tcp(addr: &str) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    // Scrape requests and PINGs are small; don't let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    // On a slow uplink the kernel would take megabytes of a large response before sending
    // them, and every answer written after it — other scrapes', the PONG the gateway's
    // keepalive waits for — would queue behind all of it. Kept in HTTP/2's own queues
    // instead, the streams' frames interleave. Loopback and fast links never hold this much.
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(UNSENT_LIMIT);
    Ok(stream)
}

/// Most bytes the kernel holds unsent on the tunnel's socket (`TCP_NOTSENT_LOWAT`): two HTTP/2
/// frames.
#[cfg(target_os = "linux")]
const UNSENT_LIMIT: u32 = 32 * 1024;

/// Connects to the proxy and has it open a tunnel to `target`, each step within what is left of
/// `timeout`, so that a timeout says which of the two did not answer.
async fn connect_through(
    proxy: &Proxy,
    target: &str,
    timeout: Duration,
) -> Result<BoxIo, DialError> {
    let deadline = crate::http_util::deadline(Instant::now(), timeout);
    let stream = tokio::time::timeout_at(deadline, tcp(&proxy.addr))
        .await
        .map_err(|_| DialError::Timeout {
            what: format!("proxy {} (from {})", proxy.addr, proxy.origin),
            timeout,
        })?
        .map_err(|source| DialError::ProxyConnect {
            proxy: proxy.addr.clone(),
            origin: proxy.origin.clone(),
            source,
        })?;
    let (resp, conn) = tokio::time::timeout_at(deadline, send_connect(proxy, target, stream))
        .await
        .map_err(|_| DialError::ProxyTimeout {
            proxy: proxy.addr.clone(),
            target: target.to_owned(),
            timeout,
        })??;
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let reason = refusal_reason(resp).await;
        conn.abort();
        return Err(DialError::ProxyRefused {
            proxy: proxy.addr.clone(),
            target: target.to_owned(),
            status,
            reason,
        });
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|source| DialError::ProxyHttp {
            proxy: proxy.addr.clone(),
            source,
        })?;
    Ok(Box::new(TokioIo::new(upgraded)))
}

/// Sends `CONNECT target` on `stream` and returns the proxy's answer and the task driving the
/// connection (which hands it over on a 200).
async fn send_connect(
    proxy: &Proxy,
    target: &str,
    stream: TcpStream,
) -> Result<
    (
        Response<Incoming>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ),
    DialError,
> {
    let http_err = |source| DialError::ProxyHttp {
        proxy: proxy.addr.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let conn = tokio::spawn(conn.with_upgrades());
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .header(header::HOST, target);
    if let Some(auth) = &proxy.authorization {
        req = req.header(header::PROXY_AUTHORIZATION, auth.expose());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|_| DialError::ProxyRefused {
            proxy: proxy.addr.clone(),
            target: target.to_owned(),
            status: StatusCode::BAD_REQUEST,
            reason: Some(format!("{target:?} is not a valid CONNECT target")),
        })?;
    match sender.send_request(req).await {
        Ok(resp) => Ok((resp, conn)),
        Err(e) => {
            conn.abort();
            Err(http_err(e))
        }
    }
}

/// Why the proxy refused, on one line: ferry egress's `ferry-refusal` header, else the first
/// line of the body (squid and others explain there), bounded in time and size.
async fn refusal_reason(resp: Response<Incoming>) -> Option<String> {
    if let Some(reason) = resp
        .headers()
        .get(REFUSAL_HEADER)
        .and_then(|v| one_line(v.as_bytes()))
    {
        return Some(reason);
    }
    let mut head = super::body_prefix(resp.into_body(), MAX_REFUSAL_BODY, REFUSAL_BODY_WAIT).await;
    head.truncate(MAX_REFUSAL_BODY);
    one_line(&head)
}

/// The first non-blank line of `text`, control characters replaced and cut to
/// [`MAX_REFUSAL_REASON`] characters; `None` if there is none.
fn one_line(text: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(text);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut out: String = line
        .chars()
        .take(MAX_REFUSAL_REASON)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if line.chars().count() > MAX_REFUSAL_REASON {
        out.push('…');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> crate::config::Secret {
        use base64::Engine as _;
        crate::config::Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        ))
    }

    #[test]
    fn debug_output_hides_the_proxy_password() {
        let proxy = Proxy::parse("http://alice:s3cr3t-pw@127.0.0.1:3128", "test").unwrap();
        let shown = format!("{proxy:?}");
        assert!(!shown.contains("YWxpY2U6czNjcjN0LXB3"), "{shown}");
        assert!(shown.contains("127.0.0.1:3128"), "{shown}");
    }

    #[test]
    fn user_info_is_percent_decoded_as_curl_and_go_do() {
        let proxy = Proxy::parse("http://us%40er:p%3Ass@127.0.0.1:3128", "test").unwrap();
        assert_eq!(proxy.addr, "127.0.0.1:3128");
        assert_eq!(proxy.authorization, Some(basic("us@er:p:ss")));
        let proxy = Proxy::parse("http://user:pw@proxy", "test").unwrap();
        assert_eq!(proxy.addr, "proxy:80");
        assert_eq!(proxy.authorization, Some(basic("user:pw")));
        assert_eq!(
            Proxy::parse("http://proxy:3128", "test")
                .unwrap()
                .authorization,
            None
        );
    }

    #[test]
    fn a_refusal_reason_is_one_bounded_line() {
        assert_eq!(
            one_line(b"\r\n  Access denied by rule 7 \r\nsecond line"),
            Some("Access denied by rule 7".to_owned())
        );
        assert_eq!(one_line(b"a\x1bb"), Some("a?b".to_owned()));
        assert_eq!(one_line(b" \n "), None);
        let long = one_line("x".repeat(5000).as_bytes()).unwrap();
        assert_eq!(long.chars().count(), MAX_REFUSAL_REASON + 1);
    }
}

//! Opening the TCP leg of the tunnel: directly, or through an HTTP CONNECT proxy
//! (`--proxy-url` or `HTTPS_PROXY`), as corporate networks often require.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Any byte stream the tunnel can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed byte stream: a TCP connection, or a CONNECT tunnel through a proxy.
pub type BoxIo = Box<dyn Io>;

/// Why the TCP leg could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect to the gateway or the proxy failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// host:port dialled.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The proxy refused the CONNECT request.
    #[error("proxy {proxy} refused CONNECT {target}: {status}")]
    ProxyRefused {
        /// The proxy.
        proxy: String,
        /// host:port asked for.
        target: String,
        /// The proxy's answer.
        status: StatusCode,
    },
    /// HTTP to the proxy failed.
    #[error("proxy {proxy}: {source}")]
    ProxyHttp {
        /// The proxy.
        proxy: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// Nothing answered within the connect timeout.
    #[error("connecting to {0} timed out")]
    Timeout(String),
}

/// An HTTP proxy to reach the gateway through, from `--proxy-url` or `HTTPS_PROXY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// `Proxy-Authorization` value built from the URL's user info, if any.
    pub authorization: Option<String>,
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port]`. The user and password are percent-decoded, as
    /// curl and Go read them: `us%40er` is the user `us@er`.
    pub fn parse(url: &str) -> Result<Proxy, String> {
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
            format!("Basic {encoded}")
        });
        Ok(Proxy {
            addr,
            authorization,
        })
    }
}

/// Opens a byte stream to `target` (`host:port`), through `proxy` if given, within `timeout`.
pub async fn dial(
    target: &str,
    proxy: Option<&Proxy>,
    timeout: Duration,
) -> Result<BoxIo, DialError> {
    let attempt = async {
        match proxy {
            None => Ok(Box::new(tcp(target).await?) as BoxIo),
            Some(proxy) => connect_through(proxy, target).await,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| DialError::Timeout(target.to_owned()))?
}

async fn tcp(addr: &str) -> Result<TcpStream, DialError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| DialError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    // Scrape requests and PINGs are small; don't let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect_through(proxy: &Proxy, target: &str) -> Result<BoxIo, DialError> {
    let http_err = |source| DialError::ProxyHttp {
        proxy: proxy.addr.clone(),
        source,
    };
    let stream = tcp(&proxy.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let conn = tokio::spawn(conn.with_upgrades());
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .header(header::HOST, target);
    if let Some(auth) = &proxy.authorization {
        req = req.header(header::PROXY_AUTHORIZATION, auth);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|_| DialError::ProxyRefused {
            proxy: proxy.addr.clone(),
            target: target.to_owned(),
            status: StatusCode::BAD_REQUEST,
        })?;
    let resp = sender.send_request(req).await.map_err(http_err)?;
    if resp.status() != StatusCode::OK {
        conn.abort();
        return Err(DialError::ProxyRefused {
            proxy: proxy.addr.clone(),
            target: target.to_owned(),
            status: resp.status(),
        });
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(http_err)?;
    Ok(Box::new(TokioIo::new(upgraded)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> String {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    }

    #[test]
    fn user_info_is_percent_decoded_as_curl_and_go_do() {
        let proxy = Proxy::parse("http://us%40er:p%3Ass@127.0.0.1:3128").unwrap();
        assert_eq!(proxy.addr, "127.0.0.1:3128");
        assert_eq!(proxy.authorization, Some(basic("us@er:p:ss")));
        let proxy = Proxy::parse("http://user:pw@proxy").unwrap();
        assert_eq!(proxy.addr, "proxy:80");
        assert_eq!(proxy.authorization, Some(basic("user:pw")));
        assert_eq!(
            Proxy::parse("http://proxy:3128").unwrap().authorization,
            None
        );
    }
}

//! CONNECT tunnels: the same client, destination and address checks as absolute-form requests;
//! then bytes are relayed both ways, counted, and the tunnel is closed when idle, at shutdown, or
//! when a credentials reload no longer accepts the credential it was opened with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::access::AccessRecord;
use super::connector::connect_any;
use super::credentials::{self, Admitted};
use super::forward::{checked, has_path_prefix, select_rule, Target};
#[cfg(target_os = "linux")]
use super::framing::Sniff;
use super::refusal::Refusal;
#[cfg(target_os = "linux")]
use super::splice::{self, Pipe};
use super::{refused, ClientHold, State};
use crate::config::Rule;
use crate::http_util::{empty, Body};
use crate::telemetry::{DirectionLabels, ReasonLabels};

/// At shutdown a tunnel is closed once no byte has moved for this long (a request in flight
/// inside it usually keeps bytes moving), at the latest when the grace period ends.
const QUIET_AT_SHUTDOWN: Duration = Duration::from_secs(2);

pub(crate) async fn handle(
    state: &Arc<State>,
    req: Request<Incoming>,
    mut record: AccessRecord,
    hold: Arc<ClientHold>,
    admitted: Option<Admitted>,
) -> Response<Body> {
    match open(state, &req, &mut record).await {
        Ok(upstream) => {
            record.allow();
            let state = state.clone();
            state.tunnels.clone().spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let _open = state.tracker.track(&upstream);
                        relay(&state, upgraded, upstream, record, admitted).await
                    }
                    Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
                }
                // The client's connection slot is held until the tunnel closes.
                drop(hold);
            });
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        Err(refusal) => {
            let resp = refused(&mut record, &refusal);
            record.emit(&state.metrics);
            resp
        }
    }
}

async fn open(
    state: &Arc<State>,
    req: &Request<Incoming>,
    record: &mut AccessRecord,
) -> Result<TcpStream, Refusal> {
    check_target(req.uri())?;
    let target = Target::from_uri(req.uri(), 443)?;
    if req.uri().port_u16().is_none() {
        return Err(Refusal::bad_request("CONNECT needs host:port"));
    }
    let (_, rule) = select_rule(state, &target, &Method::CONNECT, "/").await?;
    record.rule = rule.name.clone();
    if rule.validates() || rule.tls_upgrade.is_some() {
        let authority = crate::http_util::authority(&target.host, target.port);
        return Err(plain_http_only(rule, &authority));
    }
    let addrs = checked(state, rule, &target).await?;
    connect_any(&target.host, &addrs, state.config.connect_timeout)
        .await
        .map_err(|e| Refusal::upstream(e.to_string()))
}

/// The refusal of a CONNECT to `authority` that `rule` allows only as plain-HTTP requests: the
/// payload checks, path prefix, methods or TLS upgrade it has need to see them. A client given an
/// `https://` URL (Prometheus `remote_write`) sends CONNECT and would otherwise learn only
/// "forbidden".
pub(crate) fn plain_http_only(rule: &Rule, authority: &str) -> Refusal {
    let why = if rule.validates() {
        "it checks payloads".to_owned()
    } else if let Some(prefix) = rule
        .path_prefix
        .as_deref()
        .filter(|p| !has_path_prefix("/", p))
    {
        format!("it allows only paths under {prefix}")
    } else if let Some(methods) = rule
        .methods
        .as_ref()
        .filter(|m| !m.contains(&Method::CONNECT))
    {
        let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
        format!("it allows only {}", names.join(", "))
    } else {
        // Only the TLS upgrade is left: it needs plain HTTP to upgrade.
        return Refusal::destination_because(
            &format!("CONNECT {authority}"),
            &format!(
                "rule {:?} upgrades plain HTTP to HTTPS itself; send http://{authority}/... to the proxy, not a tunnel",
                rule.name
            ),
        );
    };
    let upgrade = if rule.tls_upgrade.is_some() {
        " (its tls_upgrade makes it HTTPS)"
    } else {
        ""
    };
    Refusal::destination_because(
        &format!("CONNECT {authority}"),
        &format!(
            "rule {:?} allows this destination only as plain-HTTP requests ({why}); send http://{authority}/... to the proxy{upgrade}",
            rule.name
        ),
    )
}

/// A CONNECT target is `host:port` and nothing else (RFC 9110 §9.3.6): hyper also takes the
/// absolute form (`http://host:port/`) and userinfo, which would let a disguised authority
/// through (userinfo is refused in absolute-form requests for the same reason).
fn check_target(uri: &http::Uri) -> Result<(), Refusal> {
    let authority_only = uri.scheme().is_none()
        && uri.path_and_query().is_none()
        && uri.authority().is_some_and(|a| !a.as_str().contains('@'));
    if authority_only {
        Ok(())
    } else {
        Err(Refusal::bad_request(
            "the CONNECT target must be host:port, without scheme, path or userinfo",
        ))
    }
}

async fn relay(
    state: &State,
    client: hyper::upgrade::Upgraded,
    mut upstream: TcpStream,
    mut record: AccessRecord,
    mut admitted: Option<Admitted>,
) {
    state.metrics.open_tunnels.inc();
    // Counted when it opens (the histogram gets the time it took to open), so a tunnel that lives
    // for days shows up at once; its bytes are counted as they move.
    record.count(&state.metrics, record.start.elapsed());
    let bytes = |direction: &str| {
        state
            .metrics
            .bytes
            .get_or_create(&DirectionLabels {
                direction: direction.into(),
            })
            .clone()
    };
    let counters = Counters {
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        up_total: bytes("in"),
        down_total: bytes("out"),
        activity: AtomicU64::new(0),
        started: Instant::now(),
    };
    let idle = state.config.tunnel_idle_timeout;
    let mut quiet = idle;
    let mut draining = false;
    let pump = pump(client, &mut upstream, &counters);
    tokio::pin!(pump);
    let reason = loop {
        tokio::select! {
            res = &mut pump => break match res {
                Ok(()) => String::new(),
                // One end gone while the other was still sending (an agent stopped mid-stream):
                // how tunnels often end, not a fault of the proxy or of the path.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => format!("one end closed the tunnel while the other was still sending ({e})"),
                Err(e) => format!("tunnel ended with an error: {e}"),
            },
            _ = tokio::time::sleep(idle_check(quiet)) => {
                let last = Duration::from_millis(counters.activity.load(Ordering::Relaxed));
                if counters.started.elapsed().saturating_sub(last) >= quiet {
                    break if draining {
                        "closed at shutdown, once quiet".to_owned()
                    } else {
                        format!("closed after {} idle", humantime::format_duration(idle))
                    };
                }
            }
            _ = state.draining.cancelled(), if !draining => {
                draining = true;
                quiet = quiet.min(QUIET_AT_SHUTDOWN);
            }
            _ = state.hard_stop.cancelled() => {
                break "closed at shutdown: the grace period ended".to_owned()
            }
            // Dropping the pump closes the client's socket and stops both directions, spliced
            // or copied; the upstream's socket closes as this function returns.
            _ = credentials::revoked(admitted.as_mut()) => break revoke(state, &mut record),
        }
    };
    record.reason = reason;
    record.bytes_in = counters.up.load(Ordering::Relaxed);
    record.bytes_out = counters.down.load(Ordering::Relaxed);
    state.metrics.open_tunnels.dec();
    record.log(record.start.elapsed());
    record.disarm();
}

/// Marks `record` as a tunnel closed because a credentials reload revoked its credential, and
/// counts it with the refusals: the reason for its access-log line.
fn revoke(state: &State, record: &mut AccessRecord) -> String {
    record.decision = REVOKED;
    state
        .metrics
        .rejections
        .get_or_create(&ReasonLabels {
            reason: REVOKED_KIND.into(),
        })
        .inc();
    "closed: the credentials file was reloaded and no longer accepts the credential this tunnel was opened with".to_owned()
}

/// The access-log decision of a tunnel closed by [`revoke`].
const REVOKED: &str = "revoked";

/// The `ferry_egress_rejections_total` reason of a tunnel closed by [`revoke`].
const REVOKED_KIND: &str = "credentials_revoked";

/// Bytes moved each way (for the access record and the metrics) and the time of the last move
/// (ms after `started`, for the idle check).
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    up_total: Counter,
    down_total: Counter,
    activity: AtomicU64,
    started: Instant,
}

impl Counters {
    /// `n` bytes moved, client to upstream (`up`) or back.
    fn moved(&self, up: bool, n: u64) {
        if up {
            self.up.fetch_add(n, Ordering::Relaxed);
            self.up_total.inc_by(n);
        } else {
            self.down.fetch_add(n, Ordering::Relaxed);
            self.down_total.inc_by(n);
        }
        let ms = self.started.elapsed().as_millis() as u64;
        self.activity.store(ms, Ordering::Relaxed);
    }
}

/// Relays until both directions have ended: with `splice(2)` when the client connection is a
/// plain TCP socket on Linux, else by copying through user-space buffers.
async fn pump(
    client: hyper::upgrade::Upgraded,
    upstream: &mut TcpStream,
    counters: &Counters,
) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    let client = match client.downcast::<TokioIo<Sniff<TcpStream>>>() {
        Ok(parts) => {
            let client = parts.io.into_inner().into_inner();
            // What the client sent right behind its CONNECT head (a TLS ClientHello, say) was
            // read by hyper already; it goes first.
            if !parts.read_buf.is_empty() {
                upstream.write_all(&parts.read_buf).await?;
                counters.moved(true, parts.read_buf.len() as u64);
            }
            return match (Pipe::new(), Pipe::new()) {
                (Ok(up), Ok(down)) => {
                    let upstream = &*upstream;
                    tokio::try_join!(
                        splice::one_way(&client, upstream, &up, |n| counters.moved(true, n)),
                        splice::one_way(upstream, &client, &down, |n| counters.moved(false, n)),
                    )
                    .map(drop)
                }
                // Out of descriptors for pipes: copying still works.
                _ => copy(client, upstream, counters).await,
            };
        }
        Err(upgraded) => upgraded,
    };
    copy(TokioIo::new(client), upstream, counters).await
}

async fn copy<C: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    upstream: &mut TcpStream,
    counters: &Counters,
) -> std::io::Result<()> {
    let mut client = Counted {
        inner: client,
        counters,
        up: true,
    };
    let mut upstream = Counted {
        inner: upstream,
        counters,
        up: false,
    };
    tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        TUNNEL_BUFFER,
        TUNNEL_BUFFER,
    )
    .await
    .map(drop)
}

/// Relay buffer per direction when copying. tokio's default (8 KiB) costs a read and a write
/// system call per 8 KiB; a 170 KB payload then takes ~22 of each way, and each small write is
/// its own TCP send. 64 KiB (one loopback segment) cut the proxy's CPU per request in
/// `benches/egress.rs`, for 128 KiB per open tunnel.
const TUNNEL_BUFFER: usize = 64 << 10;

fn idle_check(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Counts the bytes read from one side of a copied tunnel (`up`: the client's side).
struct Counted<'a, T> {
    inner: T,
    counters: &'a Counters,
    up: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.counters.moved(self.up, n);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_target_is_host_and_port_only() {
        for ok in [
            "127.0.0.1:443",
            "[::1]:443",
            "collector.example:8443",
            "host",
        ] {
            assert!(check_target(&ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "user@127.0.0.3:443",
            "user:pw@127.0.0.3:443",
            "http://127.0.0.3:443/",
            "http://127.0.0.3:443",
            "/path",
        ] {
            let err = check_target(&bad.parse().unwrap()).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{bad}");
        }
    }
}

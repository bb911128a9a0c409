//! Test hosts: network namespaces a test creates, each joined to the root namespace by a veth
//! pair, so that real connections come from addresses other than loopback and cross a link the
//! test can shape. Needs root and `ip`/`tc` (iproute2): a machine that cannot create namespaces
//! fails the test, it does not skip.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// A test host: a network namespace joined to the root namespace by a veth pair.
pub struct TestHost {
    pub ns: String,
    /// The namespace's end of the veth pair.
    pub inner: String,
}

impl TestHost {
    /// `host_ip` on the root side, `peer_ip` inside the namespace, both in a /24.
    pub fn create(tag: &str, host_ip: &str, peer_ip: &str) -> TestHost {
        let ns = format!("fy{}{tag}", std::process::id() % 100_000);
        let (outer, inner) = (format!("{ns}o"), format!("{ns}i"));
        let _ = ip(&["netns", "del", &ns]);
        let _ = ip(&["link", "del", &outer]);
        let host = TestHost {
            ns: ns.clone(),
            inner: inner.clone(),
        };
        for args in [
            vec!["netns", "add", &ns],
            vec![
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ],
            vec!["link", "set", &inner, "netns", &ns],
            vec!["addr", "add", &format!("{host_ip}/24"), "dev", &outer],
            vec!["link", "set", &outer, "up"],
            vec![
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{peer_ip}/24"),
                "dev",
                &inner,
            ],
            vec!["-n", &ns, "link", "set", &inner, "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
        ] {
            let out = ip(&args).unwrap_or_else(|e| {
                panic!("ip {args:?}: {e} (iproute2 installed? running as root?)")
            });
            assert!(
                out.status.success(),
                "ip {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        host
    }

    /// Holds a TCP connection from inside the namespace to `addr` for `secs` seconds.
    pub fn connect_and_hold(&self, addr: SocketAddr, secs: u32) -> Child {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} && printf 'GET /-/healthy HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3 && sleep {secs}",
            addr.ip(),
            addr.port()
        );
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run bash in the namespace")
    }

    /// `program` to run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// Holds what the namespace sends to `bytes_per_second` (a token bucket on its veth end):
    /// a host on a slow uplink. What it receives is not limited.
    pub fn limit_uplink(&self, bytes_per_second: u64) {
        let rate = format!("{}bit", bytes_per_second * 8);
        let out = self
            .command("tc")
            .args([
                "qdisc",
                "add",
                "dev",
                &self.inner,
                "root",
                "tbf",
                "rate",
                &rate,
            ])
            .args(["burst", "16kb", "latency", "100ms"])
            .output()
            .expect("run tc (iproute2) in the namespace");
        assert!(
            out.status.success(),
            "tc qdisc add tbf failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, which deletes the pair.
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

pub fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).output()
}

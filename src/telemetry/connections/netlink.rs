//! The host's TCP sockets from the kernel over netlink `sock_diag` (what `ss` uses): one dump per
//! address family, filtered by state in the kernel, no text to parse.

use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Parseable, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket as NetlinkSocket, SocketAddr as NlAddr};

use super::{Socket, TcpState};

/// Receive buffer: the kernel fills each dump datagram up to about 32 KiB.
const RECV_BUF: usize = 256 * 1024;

/// Every TCP socket of the host's network namespace, IPv4 and IPv6, in every state.
pub fn dump() -> io::Result<Vec<Socket>> {
    dump_states(StateFlags::all())
}

/// The TCP sockets in `states` (the kernel does the filtering), IPv4 and IPv6.
pub fn dump_states(states: StateFlags) -> io::Result<Vec<Socket>> {
    let mut socket = NetlinkSocket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    let mut out = Dumped::default();
    let mut buf = Vec::with_capacity(RECV_BUF);
    for family in [AF_INET, AF_INET6] {
        request(&socket, family, states.clone())?;
        receive(&socket, &mut buf, &mut out)?;
    }
    Ok(out.sockets)
}

fn request(socket: &NetlinkSocket, family: u8, states: StateFlags) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    Ok(())
}

/// Reads datagrams until the dump's `NLMSG_DONE`, appending its sockets to `out`.
fn receive(socket: &NetlinkSocket, buf: &mut Vec<u8>, out: &mut Dumped) -> io::Result<()> {
    loop {
        buf.clear();
        // MSG_TRUNC: `recv` reports the real datagram length, so a truncated one is detected.
        let len = socket.recv(buf, libc::MSG_TRUNC)?;
        if len > buf.len() {
            return Err(invalid("sock_diag datagram larger than the receive buffer"));
        }
        if parse_datagram(&buf[..len], out)? {
            return Ok(());
        }
    }
}

/// Parses the messages of one datagram; true once the dump is done.
fn parse_datagram(mut bytes: &[u8], out: &mut Dumped) -> io::Result<bool> {
    while !bytes.is_empty() {
        let message = NetlinkBuffer::new_checked(bytes)
            .map_err(|e| invalid(&format!("netlink message: {e}")))?;
        let len = message.length() as usize;
        if message.message_type() == SOCK_DIAG_BY_FAMILY {
            // Only the fixed header: the attributes (shutdown, cgroup, …) are not needed.
            let header = InetResponseHeader::parse(message.payload())
                .map_err(|e| invalid(&format!("sock_diag response: {e}")))?;
            out.push(&header);
        } else if control_message(&bytes[..len])? {
            return Ok(true);
        }
        // Messages are 4-byte aligned within a datagram.
        let advance = (len + 3) & !3;
        if advance >= bytes.len() {
            break;
        }
        bytes = &bytes[advance..];
    }
    Ok(false)
}

/// The sockets of a dump so far. A dump is not a snapshot: the kernel resumes it bucket by
/// bucket, so a socket opened or closed meanwhile can make another come twice. A socket is its
/// inode (0 for TIME_WAIT, whose addresses are unique instead), as in the /proc source.
#[derive(Default)]
struct Dumped {
    sockets: Vec<Socket>,
    seen: std::collections::HashSet<(u32, Option<(SocketAddr, SocketAddr)>)>,
}

impl Dumped {
    fn push(&mut self, header: &InetResponseHeader) {
        let id = &header.socket_id;
        let local = SocketAddr::new(id.source_address, id.source_port);
        let remote = SocketAddr::new(id.destination_address, id.destination_port);
        let key = if header.inode != 0 {
            (header.inode, None)
        } else {
            (0, Some((local, remote)))
        };
        if !self.seen.insert(key) {
            return;
        }
        if let Some(state) = TcpState::from_kernel(header.state) {
            self.sockets.push(Socket::new(state, local, remote));
        }
    }
}

/// A message other than a socket: true at the end of the dump, an error for an error.
fn control_message(bytes: &[u8]) -> io::Result<bool> {
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
        .map_err(|e| invalid(&format!("netlink message: {e}")))?;
    match message.payload {
        NetlinkPayload::Done(_) => Ok(true),
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        NetlinkPayload::Overrun(_) => Err(invalid("sock_diag overrun")),
        _ => Ok(false),
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(inode: u32, local_port: u16, state: u8) -> InetResponseHeader {
        let mut socket_id = SocketId::new_v4();
        socket_id.source_address = "127.0.0.1".parse().unwrap();
        socket_id.destination_address = "127.0.0.1".parse().unwrap();
        socket_id.source_port = local_port;
        socket_id.destination_port = 8080;
        InetResponseHeader {
            family: AF_INET,
            state,
            timer: None,
            socket_id,
            recv_queue: 0,
            send_queue: 0,
            uid: 0,
            inode,
        }
    }

    #[test]
    fn a_socket_dumped_twice_counts_once() {
        const ESTABLISHED: u8 = 1;
        const TIME_WAIT: u8 = 6;
        let mut dumped = Dumped::default();
        for h in [
            header(4242, 50000, ESTABLISHED),
            header(4242, 50000, ESTABLISHED),
            header(4243, 50001, ESTABLISHED),
            header(0, 50002, TIME_WAIT),
            header(0, 50002, TIME_WAIT),
            header(0, 50003, TIME_WAIT),
        ] {
            dumped.push(&h);
        }
        assert_eq!(dumped.sockets.len(), 4);
    }
}

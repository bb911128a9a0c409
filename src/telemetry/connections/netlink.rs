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
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(RECV_BUF);
    for family in [AF_INET, AF_INET6] {
        request(&socket, family, states.clone())?;
        receive(&socket, &mut buf, &mut out)?;
    }
    Ok(out)
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
fn receive(socket: &NetlinkSocket, buf: &mut Vec<u8>, out: &mut Vec<Socket>) -> io::Result<()> {
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
fn parse_datagram(mut bytes: &[u8], out: &mut Vec<Socket>) -> io::Result<bool> {
    while !bytes.is_empty() {
        let message = NetlinkBuffer::new_checked(bytes)
            .map_err(|e| invalid(&format!("netlink message: {e}")))?;
        let len = message.length() as usize;
        if message.message_type() == SOCK_DIAG_BY_FAMILY {
            // Only the fixed header: the attributes (shutdown, cgroup, …) are not needed.
            let header = InetResponseHeader::parse(message.payload())
                .map_err(|e| invalid(&format!("sock_diag response: {e}")))?;
            push_socket(&header, out);
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

fn push_socket(header: &InetResponseHeader, out: &mut Vec<Socket>) {
    let id = &header.socket_id;
    if let Some(state) = TcpState::from_kernel(header.state) {
        out.push(Socket::new(
            state,
            SocketAddr::new(id.source_address, id.source_port),
            SocketAddr::new(id.destination_address, id.destination_port),
        ));
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
